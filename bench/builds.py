"""What the benchmark builds from the pinned llama-cpp-python sdist's llama.cpp sources
(the CPU level folders, made by scripts/cpu-levels.sh as the image's build makes them,
and llama.cpp's own llama-bench), kept in CACHE and reused; and the log they write to.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from testkit.environment import ROOT

CACHE = Path.home() / ".cache" / "localllm-bench"
LEVELS = ["avx2", "avx512", "avx512_vnni", "native"]
BUILD_DEADLINE = 3600  # seconds


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
