"""What the benchmarks build from the pinned llama-cpp-python sdist's llama.cpp sources
(llama.cpp as the image builds it, with llama-bench; and llama-bench for -march=native),
kept in CACHE and reused; and the log they write to.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from testkit.environment import ROOT

CACHE = Path.home() / ".cache" / "localllm-bench"
BUILD_DEADLINE = 3600  # seconds


def command_line(command: str) -> str:
    """`command` with this run's arguments, as it was run: under `nice` when it was, since the
    niceness changes how much the machine's other jobs disturb the figures."""
    niceness = os.nice(0)
    return " ".join([*(["nice", "-n", str(niceness)] if niceness else []), command, *sys.argv[1:]])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


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
    """The llama.cpp sources vendored by the pinned llama-cpp-python sdist, its SHA-256
    checked by scripts/llama-cpp-python.sh as for the image and the tests."""
    folder = CACHE / "llama-cpp-python"
    source = folder / f"llama_cpp_python-{pinned_version()}" / "vendor/llama.cpp"
    if not (source / "CMakeLists.txt").exists():
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        run_step("sdist", ["sh", ROOT / "scripts/llama-cpp-python.sh", ROOT / "requirements", staging], 900)
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    return source


def use_llama_cpp(source: Path) -> Path:
    """llama.cpp as the image builds it (scripts/build-llama-cpp.sh: its libraries, llama-server,
    the CPU variants), plus llama-bench, built once into CACHE; then named in this process's
    environment as the image's ENV names it, with the CPU variant the entrypoint would choose,
    so the entrypoint's functions, its servers and llama_cpp here (after
    server.patches.load_cpu_backend) all load it. Call before anything imports llama_cpp."""
    stamp = hashlib.sha256(b"".join(path.read_bytes() for path in sorted((ROOT / "scripts").glob("*")))).hexdigest()
    out = CACHE / f"llama.cpp-{stamp[:12]}"
    if not (out / "llama-bench").exists():
        staging = out.with_name(out.name + ".partial")  # the folder appears only when complete
        shutil.rmtree(staging, ignore_errors=True)
        run_step("llama.cpp", ["sh", ROOT / "scripts/build-llama-cpp.sh", source, staging, "llama-bench"],
                 BUILD_DEADLINE)
        staging.rename(out)
    os.environ.update(LLAMA_CPP_LIB_PATH=str(out), MTMD_CPP_LIB=str(out),
                      PATH=os.pathsep.join([str(out), os.environ.get("PATH", "")]))
    from localllm_container import cpu
    os.environ.update(cpu.backend_environ(cpu.choose_cpu_variant("")[0]))  # for llama_cpp loaded here
    return out


# GCC keeps an explicit -mno-* over what -march=native turns on. This llama.cpp's AMX code dies
# of SIGILL on a Sapphire Rapids VM (why the image leaves the sapphirerapids variant out), and
# -march=native compiles it in wherever the CPU has AMX; harmless on a CPU without.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def native_llama_bench(source: Path) -> Path:
    """llama-bench built with -march=native for this machine but AMX (GGML_NATIVE, no CPU
    variants): what the image's portable variants are measured against."""
    build = CACHE / "llama-bench-native-no-amx"
    binary = build / "bin" / "llama-bench"
    if not binary.exists():
        run_step("native-configure", [
            "cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
            "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF"], 900)
        run_step("native-build", ["cmake", "--build", build, "--target", "llama-bench", f"-j{os.cpu_count()}"],
                 BUILD_DEADLINE)
    return binary
