"""Code that runs inside the model server process, not in the entrypoint.

`llm run` starts the server as `uvicorn --factory llama_cpp.server.app:create_app
--log-config FILE` and takes no other options, so the log config is the one way
in: uvicorn applies it before it imports the app (log.uvicorn_log_config). It brings in:
- log: the server's log reaches the container's log after `llm run` has returned
  (../shared/localllm-contract.md, "Consequences for a container"), and the reason
  a start failed reaches the entrypoint as one line.
- patches: every change to llama-cpp-python, sse-starlette and starlette, checked
  against the versions they were written for.
- guard, checks, client, streaming: each request checked before llama-cpp-python sees
  it (a 400 naming the field instead of a 500 or a crash of the shared server), and a
  client that leaves stops its generation.
- translate, replies: today's OpenAI requests and replies (pure JSON).
Nothing here imports the rest of the package: the server process needs only this.
"""

# The health route of both engines (llama-server's own; server/guard.py answers it for
# llama-cpp-python's server, before the API key check and without waiting for the model).
HEALTH_PATH = "/health"
