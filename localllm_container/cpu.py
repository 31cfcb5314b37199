"""The CPU's features (from CPUID itself) and the choice of the llama.cpp build
(CPU level) to load. Refuses, with one line, a machine the image cannot run on,
before anything imports llama_cpp (which would die with SIGILL instead).
"""
from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

from .errors import UserError


# What each folder's libggml-cpu.so was compiled for (scripts/cpu-levels.sh), best first.
AVX2 = {"avx", "avx2", "fma", "f16c", "bmi2"}
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
CPU_LEVELS = {"avx512_vnni": AVX512 | {"avx512vbmi", "avx512_vnni"}, "avx512": AVX512, "avx2": AVX2}
# CPUID bits: (leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3, bit)
CPUID_BITS = {"fma": (1, 0, 2, 12), "avx": (1, 0, 2, 28), "f16c": (1, 0, 2, 29), "avx2": (7, 0, 1, 5),
              "bmi2": (7, 0, 1, 8), "avx512f": (7, 0, 1, 16), "avx512dq": (7, 0, 1, 17),
              "avx512cd": (7, 0, 1, 28), "avx512bw": (7, 0, 1, 30), "avx512vl": (7, 0, 1, 31),
              "avx512vbmi": (7, 0, 2, 1), "avx512_vnni": (7, 0, 2, 11)}


def installed_cpu_levels() -> list[str]:
    """Level folders the image holds (CPU_LEVELS_DIR); none outside the image."""
    root = Path(os.environ.get("CPU_LEVELS_DIR", "/nonexistent"))
    return sorted(p.name for p in root.glob("*") if (p / "libllama.so").exists())


def cpu_features() -> set[str]:
    """x86 features from the CPUID instruction itself, with XGETBV for the OS's
    support of the AVX and AVX-512 registers. /proc/cpuinfo is not enough: under
    qemu-user it describes the host, not the emulated CPU."""
    import mmap
    # cpuid(leaf, subleaf, uint32 out[4]) and xgetbv(index) -> uint64, x86-64 System V
    cpuid_code = bytes.fromhex("5389f889f14989d00fa241890041895804418948084189500c5bc3")
    xgetbv_code = bytes.fromhex("89f90f01d048c1e2204809d0c3")
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(cpuid_code + xgetbv_code)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32 * 4))(base)
    xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(base + len(cpuid_code))

    def regs(leaf, subleaf):
        out = (ctypes.c_uint32 * 4)()
        cpuid(leaf, subleaf, ctypes.byref(out))
        return list(out)

    max_leaf = regs(0, 0)[0]
    found = {name for name, (leaf, sub, reg, bit) in CPUID_BITS.items()
             if leaf <= max_leaf and regs(leaf, sub)[reg] >> bit & 1}
    osxsave = regs(1, 0)[2] >> 27 & 1
    xcr0 = xgetbv(0) if osxsave else 0
    if xcr0 & 0x6 != 0x6:  # the OS does not save the AVX registers
        found -= AVX512 | {"avx", "avx2", "fma", "f16c"}
    if xcr0 & 0xE0 != 0xE0:  # nor the AVX-512 ones
        found -= AVX512 - AVX2 | {"avx512vbmi", "avx512_vnni"}
    del cpuid, xgetbv
    return found


def supported_cpu_features() -> set[str]:
    """The CPU's features, once it is known to be one the image runs on: x86-64 (the
    CPUID code above is x86 machine code) with AVX2 (every llama.cpp build here needs
    it). Called before anything imports llama_cpp, which would die with SIGILL instead."""
    machine = platform.machine()
    if machine not in ("x86_64", "AMD64"):
        raise SystemExit(f"error: this image runs on x86-64 (linux/amd64) only; this machine is {machine}: "
                         "build and run it with --platform linux/amd64 (emulated, and slow, on Apple Silicon; "
                         "an x86-64 machine or VM is faster)")
    features = cpu_features()
    missing = sorted(AVX2 - features)
    if missing:
        raise SystemExit(f"error: this CPU lacks {', '.join(missing)}: the image needs an x86-64 CPU with AVX2 "
                         "(Intel Haswell or AMD Zen and newer)")
    return features


def choose_cpu_level(wanted: str) -> tuple[str, str]:
    """The best installed level whose instructions this CPU has, or CPU_LEVEL."""
    features = supported_cpu_features()
    levels = installed_cpu_levels()
    if wanted:
        lacking = sorted(CPU_LEVELS.get(wanted, set()) - features)
        if lacking:
            raise UserError(f"CPU_LEVEL={wanted} needs {', '.join(lacking)}, which this CPU lacks: "
                            "leave CPU_LEVEL empty to choose automatically")
        return wanted, "set"
    if not levels:
        return "avx2", "automatic: the only build installed (llama-cpp-python's own libraries)"
    best = next(level for level in CPU_LEVELS if level in levels and CPU_LEVELS[level] <= features)
    return best, f"automatic: the best build for this CPU (of {', '.join(levels)})"
