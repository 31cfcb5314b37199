"""`python -m localllm_container.front`: the front on the container's port, started by
the entrypoint's supervisor before the engine (so /health answers 503 while it loads).
API_KEY comes in its environment, not on its command line, where `ps` would show it."""
from __future__ import annotations

import click
import uvicorn

from . import log
from .app import Front, Settings
from .connections import BoundedProtocol


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--backend", required=True, help="the engine's URL on 127.0.0.1")
@click.option("--engine", required=True)
@click.option("--alias", required=True)
@click.option("--slots", type=int, required=True)
@click.option("--passed-at-once", type=int, required=True, help="requests the engine gets at once (the rest wait here)")
@click.option("--max-queue", type=int, required=True)
@click.option("--add-usage/--no-add-usage", default=False)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--graceful", type=int, required=True, help="seconds answers in flight get at a stop")
@click.option("--client-timeout", type=float, required=True, help="CLIENT_TIMEOUT")
@click.option("--max-connections", type=int, required=True, help="MAX_CONNECTIONS")
@click.option("--cors-origins", default="", help="CORS_ORIGINS")
@click.option("--metrics-need-key/--metrics-open", default=False)
@click.option("--api-key", envvar="API_KEY", default="", show_envvar=True, help="API_KEY (from the environment)")
def main(port, backend, engine, alias, slots, passed_at_once, max_queue, add_usage, log_format, graceful,
         client_timeout, max_connections, cors_origins, metrics_need_key, api_key) -> None:
    log.setup(log_format)
    front = Front(Settings(engine, alias, backend, slots, max_queue, add_usage, api_key, metrics_need_key,
                           cors_origins, client_timeout, passed_at_once))
    uvicorn.run(front, host="0.0.0.0", port=port, access_log=False, log_config=None, lifespan="on",
                timeout_graceful_shutdown=graceful, server_header=False, ws="none",
                http=BoundedProtocol.bounded(max_connections, client_timeout))


main()
