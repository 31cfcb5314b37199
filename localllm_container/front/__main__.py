"""`python -m localllm_container.front`: the front on the container's port, started by
the entrypoint's supervisor before the engine (so /health answers 503 while it loads)."""
from __future__ import annotations

import click
import uvicorn

from . import log
from .app import Front, Settings


@click.command()
@click.option("--port", type=int, required=True)
@click.option("--backend", required=True, help="the engine's URL on 127.0.0.1")
@click.option("--engine", required=True)
@click.option("--alias", required=True)
@click.option("--slots", type=int, required=True)
@click.option("--max-queue", type=int, required=True)
@click.option("--add-usage/--no-add-usage", default=False)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text")
@click.option("--graceful", type=int, required=True, help="seconds answers in flight get at a stop")
def main(port, backend, engine, alias, slots, max_queue, add_usage, log_format, graceful) -> None:
    log.setup(log_format)
    front = Front(Settings(engine, alias, backend, slots, max_queue, add_usage))
    uvicorn.run(front, host="0.0.0.0", port=port, access_log=False, log_config=None, lifespan="on",
                timeout_graceful_shutdown=graceful, server_header=False)


main()
