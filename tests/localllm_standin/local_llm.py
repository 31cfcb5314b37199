"""TEST STAND-IN for Google's localllm (`local-llm`) -- not the real tool.

It imitates GoogleCloudPlatform/localllm at commit
2939bd32fa6b54a134d759176c66ad2036e034f8 (folder `local-llm/`), written only
from the project's recorded contract, ../shared/localllm-contract.md, because
the real tool's repository cannot be reached from development and CI
machines. The image itself installs the REAL tool; this stand-in is for tests.

Rule: follow the contract exactly and never be more forgiving than the real
tool, since the same flows are later checked against it. Output formats that
the contract does not fix (`ps`, `kill`, `list`) are this stand-in's own and
must not be relied on.
"""

import os
import shutil
import subprocess
import sys

import click
import psutil
from huggingface_hub import constants, hf_hub_download

READY_MARKER = "Uvicorn running on"


def guess_filename(repo_id):
    """Contract: only `...-GGUF` repos (any case) get a guess; others fail."""
    name = repo_id.split("/")[-1]
    if name.lower().endswith("-gguf"):
        return name[: -len("-gguf")].lower() + ".Q4_K_M.gguf"
    click.echo(f"Unable to determine filename to use for {repo_id}.")
    sys.exit(1)


def repo_cache_dir(repo_id):
    """`<hub cache>/models--ORG--NAME`, the hub's own cache layout."""
    return os.path.join(constants.HF_HUB_CACHE, "models--" + repo_id.replace("/", "--"))


def download(repo_id, filename):
    click.echo(f"Pulling {filename} from {repo_id}")
    path = hf_hub_download(repo_id, filename)
    click.echo(f"Pulled to {path}")
    return path


def find_cached(repo_id, filename):
    """First path under the repo's cache folder that ends with `filename`
    (a plain suffix match, as in the contract), or None."""
    for dirpath, _dirs, files in os.walk(repo_cache_dir(repo_id)):
        for name in files:
            path = os.path.join(dirpath, name)
            if path.endswith(filename):
                return path
    return None


def localllm_processes():
    """Processes whose environment has RUN_BY_LOCALLLM=1 (ours to manage)."""
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("RUN_BY_LOCALLLM") == "1":
                yield proc
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue


@click.group()
def cli():
    """Pull GGUF models from the Hugging Face hub and serve them (stand-in)."""


@cli.command()
@click.argument("repo_id")
@click.option("--filename")
def pull(repo_id, filename):
    """Download one model file into the hub cache."""
    download(repo_id, filename or guess_filename(repo_id))


@cli.command()
@click.argument("repo_id")
@click.argument("port", type=int)
@click.option("--host", default="0.0.0.0")
@click.option("--filename")
@click.option("--log-config", envvar="LOG_CONFIG")
@click.option("--verbose/--no-verbose", default=False)
def run(repo_id, port, host, filename, log_config, verbose):
    """Start the llama-cpp-python server and return once uvicorn is up.

    The child is deliberately left behind as an orphan still writing into the
    pipe we read (contract, Commands/run step 5): no new session, no reader
    thread, nothing closed or waited for.
    """
    filename = filename or guess_filename(repo_id)
    path = find_cached(repo_id, filename) or download(repo_id, filename)
    args = ["uvicorn", "--factory", "llama_cpp.server.app:create_app",
            "--host", host, "--port", str(port)]
    if log_config:
        args.append(f"--log-config={log_config}")
    env = dict(os.environ, RUN_BY_LOCALLLM="1", MODEL=path, VERBOSE="False")
    # A missing uvicorn raises FileNotFoundError here: traceback, exit 1.
    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for raw in child.stdout:
        line = raw.decode(errors="replace")
        if verbose:
            click.echo(line, nl=False)
        if READY_MARKER in line:
            click.echo(f"Running {path} at {host}:{port}")
            sys.exit(0)
    click.echo("Error starting LLM, run with --verbose for more")
    sys.exit(1)


@cli.command()
def ps():
    """List servers started by `run` (format is the stand-in's own)."""
    for proc in localllm_processes():
        try:
            click.echo(f"{proc.pid}\t{proc.environ().get('MODEL', '')}")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue


@cli.command()
@click.argument("repo_id")
@click.option("--filename")
def kill(repo_id, filename):
    """SIGKILL the `run` servers serving this repo's file."""
    filename = filename or guess_filename(repo_id)
    repo_dir = repo_cache_dir(repo_id) + os.sep
    for proc in localllm_processes():
        try:
            model = proc.environ().get("MODEL", "")
            if model.startswith(repo_dir) and model.endswith(filename):
                proc.kill()
                click.echo(f"Killed {proc.pid}")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue


@cli.command(name="list")
def list_models():
    """List `.gguf` files in the hub cache."""
    for dirpath, _dirs, files in os.walk(constants.HF_HUB_CACHE):
        for name in sorted(files):
            if name.endswith(".gguf"):
                click.echo(os.path.join(dirpath, name))


@cli.command()
@click.argument("repo_id")
@click.option("--filename")
def rm(repo_id, filename):
    """Delete a cached repo. `--filename` is broken upstream, so it fails here too."""
    if filename:
        # Upstream refers to an undefined name on this path (contract).
        raise NameError("rm --filename is broken in localllm (undefined name); "
                        "the stand-in fails the same way")
    shutil.rmtree(repo_cache_dir(repo_id))


if __name__ == "__main__":
    cli()
