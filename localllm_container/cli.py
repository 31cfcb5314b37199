"""The command line (click): serve (the default), pull, config, health, check. Each
command only calls the modules that do the work; a user's mistake (UserError) ends
as one line with exit status 2.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import sys

import click

from . import check as node_check
from . import llama_server
from .cache import check_model_file, files_to_serve, cached_path, llm, pull_files, record_key, record_path, \
    recorded_files
from .cpu import slow_variant_warning
from .errors import UserError
from .front.keys import split_keys
from .model import model_facts
from .server import HEALTH_PATH
from .server.log import uvicorn_log_config
from .settings import BOOLEANS, SETTINGS, given, load, model_env_path, parse_env_file, resolve_runtime


@click.group(invoke_without_command=True)
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Serve a GGUF model from the Hugging Face hub with localllm on port 8000."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(serve)


@cli.command()
def config() -> None:
    """Print the effective settings and where each came from."""
    cfg = load()
    paths = [cached_path(cfg["MODEL"], name) for name in recorded_files(cfg) or {}]
    model = model_facts(paths) if paths and all(paths) else None
    resolve_runtime(cfg, model)
    for name in SETTINGS:
        click.echo(f"{name}={shown(name, cfg[name])}  # {cfg.sources[name]}")
    for name in cfg.extra:
        click.echo(f"{name}={cfg[name]}  # {cfg.sources[name]}, passed on")
    if cfg["ENGINE"] == "llama-server":
        if model is None:
            click.echo("# llama-server's command: known once the model is pulled (entrypoint.py pull)")
        else:
            command = llama_server.command(cfg, model.path, model, "BACKEND_PORT")
            click.echo("# llama-server's command (BACKEND_PORT: a free port on 127.0.0.1 chosen at start, "
                       "behind the front on PORT): " + " ".join(shlex.quote(arg) for arg in command))


def shown(name: str, value: str) -> str:
    """A setting's value as `config` prints it: never the keys themselves."""
    if name != "API_KEY" or not value:
        return value
    count = len(split_keys(value))
    return f"({count} key{'s' * (count > 1)}, hidden)"


@cli.command()
def pull() -> None:
    """Download the model file(s) into the hub cache and record the choice (build time)."""
    cfg = load()
    files = pull_files(cfg)
    record = {"settings": record_key(cfg), "files": files}  # files: {name: {size, sha256}}
    record_path().parent.mkdir(parents=True, exist_ok=True)
    record_path().write_text(json.dumps(record, indent=2) + "\n")
    click.echo(f"Recorded {cfg['MODEL']} -> {', '.join(files)} in {record_path()}")


@cli.command()
def serve() -> None:
    """Run the model server on PORT and stay in the foreground (the default command)."""
    # Imported here, with psutil at its top before any signal handler can need it:
    # `check` runs on a laptop with click alone.
    from .supervisor import Supervisor, free_local_port, front_process, json_output, scratch_dir, server_env, \
        start_log_relay, stop_before_serving
    for sig in (signal.SIGTERM, signal.SIGINT):  # as PID 1 we would ignore them otherwise
        signal.signal(sig, stop_before_serving)
    cfg = load()
    if cfg["LOG_FORMAT"] == "json":
        json_output()
    files = files_to_serve(cfg)
    verify = BOOLEANS[cfg["VERIFY_MODEL_SHA256"].lower()]
    paths = [check_model_file(cfg["MODEL"], name, expected, verify) for name, expected in files.items()]
    model = model_facts(paths)
    resolve_runtime(cfg, model)
    first = next(iter(files))
    scratch = scratch_dir()
    direct = cfg["ENGINE"] == "llama-server"
    backend = free_local_port()  # the engine listens on 127.0.0.1 there, behind the front on PORT
    if direct:
        command = llama_server.command(cfg, paths[0], model, backend)
        explain = functools.partial(llama_server.start_failure, model_path=paths[0])
    else:
        log_config = scratch / "uvicorn-log.json"
        log_config.write_text(json.dumps(uvicorn_log_config(start_log_relay(), cfg["LOG_FORMAT"])))
        command = llm("run", cfg["MODEL"], str(backend), "--host", "127.0.0.1", "--filename", first,
                      "--verbose", "--log-config", str(log_config))
        explain = None
    engine, slots = ("llama-server, ", f" in each of {cfg['PARALLEL']} slots") if direct else ("", "")
    if warning := slow_variant_warning(cfg["CPU_LEVEL"]):
        click.echo(warning, err=True)
    click.echo(f"Serving {cfg['MODEL']} ({first}) as {cfg['MODEL_ALIAS']!r} on port {cfg['PORT']} with {engine}"
               f"{cfg['N_THREADS']} threads, context {cfg['N_CTX']}{slots}, CPU variant {cfg['CPU_LEVEL']}, "
               f"up to {cfg['MAX_QUEUE']} waiting; the engine on 127.0.0.1:{backend}")
    env = server_env(cfg, dict(os.environ))
    sys.stdout.flush()
    sys.exit(Supervisor(front_process(cfg, backend, dict(os.environ)), command, env, int(cfg["STOP_TIMEOUT"]),
                        scratch / "start-error.txt", direct, explain).run())


@cli.command()
def health() -> None:
    """Exit 0 when the server answers HEALTH_PATH (the image's HEALTHCHECK). Light:
    reads PORT only, so a check every few seconds costs next to nothing."""
    import urllib.request
    port = (given(os.environ).get("PORT") or given(parse_env_file(model_env_path())).get("PORT")
            or SETTINGS["PORT"].default)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{HEALTH_PATH}", timeout=4) as reply:
            click.echo(f"healthy: HTTP {reply.status}")
    except OSError as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("url")
@click.option("--node-id", help="DataSphere node id: sends x-node-id (call through node-api).")
@click.option("--alias", help="DataSphere alias name: sends x-node-alias: datasphere.user.ALIAS.")
@click.option("--folder-id", help="DataSphere folder id: sends x-folder-id.")
@click.option("--iam-token", envvar="YC_IAM_TOKEN", help="IAM token: sends Authorization: Bearer TOKEN [env YC_IAM_TOKEN].")
@click.option("--api-key", envvar="API_KEY", help="one of the server's API_KEY keys (the first, when the "
              "value holds several): sends Authorization: Bearer KEY, or x-api-key: KEY beside --iam-token "
              "[env API_KEY].")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120, show_default=True,
              help="Seconds to wait for the connection and for each part of an answer.")
def check(url, node_id, alias, folder_id, iam_token, api_key, timeout) -> None:
    """Call a running server at URL as a client would: list the models and stream one
    chat answer; exit 0 only when both worked. Uses only click and the standard library,
    so it runs on a laptop too: python entrypoint.py check http://localhost:8000"""
    headers = node_check.request_headers(node_id, alias, folder_id, iam_token, api_key)
    try:
        node_check.run_check(node_check.base_url(url), headers, timeout)
    except node_check.CheckFailed as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
