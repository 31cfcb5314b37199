"""Which of llama.cpp's CPU backend variants the engine loads.

The image builds llama.cpp with GGML_BACKEND_DL and GGML_CPU_ALL_VARIANTS
(scripts/build-llama-cpp.sh): one libggml-cpu-NAME.so per CPU family, in the `cpu`
folder of LLAMA_CPP_LIB_PATH. Each variant's own `ggml_backend_score` (compiled
without its family's instructions, so safe to call anywhere) is 0 on a CPU that
lacks what it needs, else higher the more it uses; the best is the one llama.cpp's
`ggml_backend_load_all` would load. The choice goes to both engines as
GGML_BACKEND_PATH: llama-server loads it itself; llama-cpp-python never loads a
backend (abetlen/llama-cpp-python#2069), so server/patches.py does, before the model.
"""
from __future__ import annotations

import _ctypes
import ctypes
import os
import platform
from pathlib import Path

from .errors import UserError

PREFIX, SUFFIX = "libggml-cpu-", ".so"
# The names of the image's own CPU levels before llama.cpp's variants (same instructions).
FORMER_NAMES = {"avx2": "haswell", "avx512": "skylakex", "avx512_vnni": "icelake"}
# Variants below haswell lack AVX2: they run, several times slower.
WITHOUT_AVX2 = {"x64", "sse42", "sandybridge", "ivybridge", "piledriver"}


def variant_files() -> dict[str, Path]:
    """The variants this installation holds, by name."""
    folder = Path(os.environ.get("LLAMA_CPP_LIB_PATH", "/nonexistent")) / "cpu"
    return {p.name[len(PREFIX):-len(SUFFIX)]: p for p in sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))}


def check_platform() -> None:
    """The image's llama.cpp is x86-64 code: say so, in one line, on another machine."""
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        raise SystemExit(f"error: this image runs on x86-64 (linux/amd64) only; this machine is {machine}: "
                         "build and run it with --platform linux/amd64 (emulated, and slow, on Apple Silicon; "
                         "an x86-64 machine or VM is faster)")


def variant_scores() -> dict[str, int]:
    """Each variant's score on this CPU, from the variant itself (0: it cannot run here)."""
    files = variant_files()
    if not files:
        raise UserError(f"no llama.cpp CPU variants in {os.environ.get('LLAMA_CPP_LIB_PATH', '(unset)')}/cpu: "
                        "LLAMA_CPP_LIB_PATH must name a folder built by scripts/build-llama-cpp.sh (the image sets it)")
    scores = {}
    for name, path in files.items():
        library = ctypes.CDLL(str(path))
        library.ggml_backend_score.restype = ctypes.c_int
        scores[name] = library.ggml_backend_score()
        _ctypes.dlclose(library._handle)  # as llama.cpp does: only the engine keeps one loaded
    return scores


def choose_cpu_variant(wanted: str) -> tuple[str, str]:
    """CPU_LEVEL if this CPU runs it, else the best variant for this CPU; and why."""
    scores = variant_scores()
    runnable = [name for name, score in sorted(scores.items(), key=lambda item: item[1]) if score]
    if wanted in FORMER_NAMES:
        raise UserError(f"CPU_LEVEL={wanted!r} is a former name: set CPU_LEVEL={FORMER_NAMES[wanted]} "
                        f"(the same instructions), or leave it empty to choose automatically")
    if wanted and wanted not in scores:
        raise UserError(f"CPU_LEVEL={wanted!r} is not valid: expected empty (automatic) or one of "
                        f"{', '.join(scores)}")
    if wanted and not scores[wanted]:
        raise UserError(f"CPU_LEVEL={wanted} needs instructions this CPU lacks: this CPU runs "
                        f"{', '.join(runnable)}; or leave CPU_LEVEL empty to choose automatically")
    if wanted:
        return wanted, "set"
    return runnable[-1], f"automatic: the best for this CPU of {len(scores)} llama.cpp CPU variants"


def slow_variant_warning(variant: str) -> str | None:
    """A line for the log when the variant lacks AVX2 (the image runs, but slowly)."""
    if variant in WITHOUT_AVX2:
        return (f"warning: llama.cpp's {variant} CPU variant has no AVX2 (this CPU lacks it, or CPU_LEVEL "
                "chose it): generation is several times slower than on a CPU with AVX2")
    return None


def backend_environ(variant: str) -> dict[str, str]:
    """The engine's variables that make it load `variant` (both engines read GGML_BACKEND_PATH)."""
    return {"GGML_BACKEND_PATH": str(variant_files()[variant])}
