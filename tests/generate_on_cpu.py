"""Run by the tests under qemu-user (an emulated CPU) or natively, in the repository or in
the image: choose llama.cpp's CPU variant as the entrypoint does (CPU_LEVEL forces one),
load MODEL on it with ENGINE and generate 2 tokens. Prints `variant NAME`, then
`generated N`; llama.cpp's log goes to stderr. llama-server is started under the same
EMULATOR (qemu-user runs what it was started with, not the programs that one starts).

usage: python generate_on_cpu.py ENGINE MODEL PORT [EMULATOR ...]
"""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.environ.get("LOCALLLM_ROOT", str(Path(__file__).resolve().parents[1])))
from localllm_container import cpu, llama_server  # noqa: E402

engine, model, port, emulator = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
variant = cpu.choose_cpu_variant(os.environ.get("CPU_LEVEL", ""))[0]
print("variant", variant, flush=True)
if engine == "localllm":
    os.environ.update(cpu.backend_environ(variant))
    from localllm_container.server.patches import load_cpu_backend
    load_cpu_backend()  # as in the server process
    from llama_cpp import Llama
    llm = Llama(model, n_ctx=64, n_threads=2, verbose=True)  # verbose: the system_info line
    print("generated", llm.create_completion("Hello", max_tokens=2)["usage"]["completion_tokens"], flush=True)
    sys.exit()
server = subprocess.Popen([*emulator, llama_server.binary(), "--model", model, "--port", port, "--ctx-size", "64",
                           "--threads", "2", "--log-verbosity", "4"],
                          env=llama_server.environment(dict(os.environ), variant))
deadline = time.monotonic() + 480
while server.poll() is None and time.monotonic() < deadline:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
        break
    except OSError:
        time.sleep(0.5)
if server.poll() is not None:  # died: its status, as a shell reports it
    sys.exit(server.returncode if server.returncode >= 0 else 128 - server.returncode)
try:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", b'{"prompt": "Hello", "n_predict": 2}')
    with urllib.request.urlopen(request, timeout=120) as reply:
        print("generated", json.load(reply)["tokens_predicted"], flush=True)
finally:
    server.kill()
    server.wait()
