"""What each of llama.cpp's x86 CPU variants that the image carries needs, in the kernel's
/proc/cpuinfo flag names: the tests' own expectation of the variant a CPU gets, written
from the list in the pinned llama.cpp's ggml/src/CMakeLists.txt (GGML_CPU_ALL_VARIANTS),
not from the entrypoint's code (which asks each variant's own ggml_backend_score).
"""
from __future__ import annotations

import re
from pathlib import Path

HASWELL = {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"}
SKYLAKEX = HASWELL | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
ZEN4 = SKYLAKEX | {"avx512vbmi", "avx512_vnni", "avx512_bf16"}
NEEDS = {
    "x64": set(), "sse42": {"sse4_2"}, "sandybridge": {"sse4_2", "avx"}, "ivybridge": {"sse4_2", "avx", "f16c"},
    "piledriver": {"sse4_2", "avx", "f16c", "fma"}, "haswell": HASWELL, "alderlake": HASWELL | {"avx_vnni"},
    "skylakex": SKYLAKEX, "cannonlake": SKYLAKEX | {"avx512vbmi"}, "cascadelake": SKYLAKEX | {"avx512_vnni"},
    "icelake": SKYLAKEX | {"avx512vbmi", "avx512_vnni"}, "cooperlake": SKYLAKEX | {"avx512_vnni", "avx512_bf16"},
    "zen4": ZEN4,  # and not sapphirerapids (zen4 + AMX), which the image leaves out: build-llama-cpp.sh
}


def kernel_flags() -> set[str]:
    """This CPU's features as the kernel reports them (true only where nothing is emulated)."""
    return set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())


def expected_variant(flags: set[str]) -> str:
    """The variant that uses the most of what this CPU has (each variant's needs are a
    superset of the ones it outranks, except alderlake's AVX-VNNI against AVX-512)."""
    runnable = [name for name, needs in NEEDS.items() if needs <= flags]
    return max(runnable, key=lambda name: (len(NEEDS[name] - {"avx_vnni"}), "avx_vnni" in NEEDS[name]))
