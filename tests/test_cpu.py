"""CPU features from CPUID, the choice of the llama.cpp build, and CPUs the image cannot run on."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from localllm_container import cpu
from localllm_container.errors import UserError
from conftest import ROOT, clean_environ, write_model_env


def test_cpuid_reads_the_same_features_as_the_kernel():
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    assert cpu.cpu_features() == flags & set(cpu.CPUID_BITS)


@pytest.fixture
def levels_dir(tmp_path, monkeypatch):
    for level in cpu.CPU_LEVELS:
        (tmp_path / level).mkdir()
        (tmp_path / level / "libllama.so").touch()
    monkeypatch.setenv("CPU_LEVELS_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("features, level", [
    (cpu.CPU_LEVELS["avx512_vnni"] | {"avx512_bf16"}, "avx512_vnni"),  # Ice Lake, Zen 4
    (cpu.AVX512, "avx512"),  # Skylake-X, Cascade Lake
    (cpu.AVX2, "avx2"),  # Haswell, Broadwell, Zen 1-3
])
def test_the_best_installed_build_the_cpu_supports_is_chosen(levels_dir, monkeypatch, features, level):
    monkeypatch.setattr(cpu, "cpu_features", lambda: set(features))
    assert cpu.choose_cpu_level("")[0] == level


def test_a_forced_level_the_cpu_lacks_is_refused(levels_dir, monkeypatch):
    monkeypatch.setattr(cpu, "cpu_features", lambda: set(cpu.AVX2))
    with pytest.raises(UserError, match="CPU_LEVEL=avx512 needs avx512bw, avx512cd, avx512dq, avx512f, avx512vl"):
        cpu.choose_cpu_level("avx512")


QEMU = "qemu-x86_64-static"


def under_qemu(cpu: str, levels_dir: Path) -> subprocess.CompletedProcess:
    """The entrypoint's choice on an emulated CPU: CPUID answers for that CPU."""
    code = "from localllm_container import cpu; print(cpu.choose_cpu_level('')[0])"
    return subprocess.run([QEMU, "-cpu", cpu, sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CPU_LEVELS_DIR": str(levels_dir)}, timeout=120)


def test_an_avx2_cpu_gets_the_avx2_build(levels_dir):
    done = under_qemu("Haswell", levels_dir)
    assert (done.returncode, done.stdout.strip()) == (0, "avx2"), done.stderr


def test_a_cpu_without_avx2_gets_a_clear_message(levels_dir):
    done = under_qemu("Westmere", levels_dir)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "error: this CPU lacks avx, avx2, bmi2, f16c, fma: the image needs an x86-64 CPU with AVX2 "
        "(Intel Haswell or AMD Zen and newer)")


def test_the_whole_serve_command_on_a_cpu_without_avx2(tmp_path):
    """qemu -cpu Westmere (no AVX): `serve` says so in one line before anything loads llama.cpp."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    done = subprocess.run([QEMU, "-cpu", "Westmere", sys.executable, str(ROOT / "entrypoint.py"), "serve"],
                          env=clean_environ(MODEL_ENV_FILE=str(env_file)), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: this CPU lacks avx, avx2, bmi2, f16c, fma: the image needs an x86-64 CPU with AVX2 "
        "(Intel Haswell or AMD Zen and newer)"]


def test_another_platform_is_named_before_any_x86_code_runs(tmp_path):
    """`setarch i686` makes the kernel report another machine, as an arm64 container's kernel does."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    done = subprocess.run(["setarch", "i686", sys.executable, str(ROOT / "entrypoint.py"), "serve"],
                          env=clean_environ(MODEL_ENV_FILE=str(env_file)), capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: this image runs on x86-64 (linux/amd64) only; this machine is i686: build and run it with "
        "--platform linux/amd64 (emulated, and slow, on Apple Silicon; an x86-64 machine or VM is faster)"]
