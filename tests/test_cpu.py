"""Which of llama.cpp's CPU variants the entrypoint loads (localllm_container/cpu.py): on this
CPU, on older CPUs emulated by qemu-user (CPUID answers for the emulated CPU), when
CPU_LEVEL forces one, and the platform it refuses."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clean_environ, free_port, run_entrypoint, write_model_env
from cpu_variants import NEEDS, expected_variant, kernel_flags
from localllm_container import cpu

QEMU = "qemu-x86_64-static"
GENERATE = Path(__file__).with_name("generate_on_cpu.py")
# qemu's CPU models and the variant each gets (their CPUID: qemu-x86_64 -cpu help).
EMULATED = {"qemu64": "x64", "Westmere": "sse42", "SandyBridge": "sandybridge", "IvyBridge": "ivybridge",
            "Haswell": "haswell"}
# llama.cpp's own choice, in a process of its own: ggml_backend_load_all_from_path over
# the same folder keeps only the best variant loaded.
LLAMA_CPP_CHOICE = """
import ctypes, os, re
lib = os.environ["LLAMA_CPP_LIB_PATH"]
ctypes.CDLL(os.path.join(lib, "libggml.so")).ggml_backend_load_all_from_path(os.path.join(lib, "cpu").encode())
print(*sorted(set(re.findall(r"libggml-cpu-(\\w+)\\.so", open("/proc/self/maps").read()))))
"""


def choice_under(qemu_cpu: str | None, code: str, **env: str) -> subprocess.CompletedProcess:
    """Python `code` in the repository, on an emulated `qemu_cpu` (None: this CPU)."""
    prefix = [QEMU, "-cpu", qemu_cpu] if qemu_cpu else []
    return subprocess.run([*prefix, sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_this_cpu_gets_the_variant_llama_cpp_itself_would_load(report):
    chosen, why = cpu.choose_cpu_variant("")
    upstream = choice_under(None, LLAMA_CPP_CHOICE)
    assert upstream.returncode == 0, upstream.stderr
    assert (chosen, upstream.stdout.split()) == (expected_variant(kernel_flags()), [chosen]), why
    assert why == f"automatic: the best for this CPU of {len(NEEDS)} llama.cpp CPU variants"
    model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    report("CPU variant chosen on this machine", f"{chosen} ({model})")


@pytest.mark.parametrize("qemu_cpu", EMULATED)
def test_an_older_cpu_gets_its_variant_and_a_warning_without_avx2(qemu_cpu):
    code = "from localllm_container import cpu; v = cpu.choose_cpu_variant('')[0]; print(v, cpu.slow_variant_warning(v))"
    done = choice_under(qemu_cpu, code)
    variant = EMULATED[qemu_cpu]
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" ", 1)[0] == variant
    warning = done.stdout.split(" ", 1)[1].strip()
    if "avx2" in NEEDS[variant]:
        assert warning == "None"
    else:
        assert warning == (f"warning: llama.cpp's {variant} CPU variant has no AVX2 (this CPU lacks it, or CPU_LEVEL "
                           "chose it): generation is several times slower than on a CPU with AVX2")


def generate_on(qemu_cpu: str | None, engine: str, model_path: Path, **env: str) -> subprocess.CompletedProcess:
    """tests/generate_on_cpu.py: the variant the entrypoint chooses loads the model and generates."""
    emulator = [QEMU, "-cpu", qemu_cpu] if qemu_cpu else []
    return subprocess.run([*emulator, sys.executable, str(GENERATE), engine, str(model_path), str(free_port()),
                           *emulator], capture_output=True, text=True, timeout=900, env={**os.environ, **env})


def test_an_avx2_cpu_loads_the_model_and_generates(engine, model_path):
    """qemu -cpu Haswell: AVX2, no AVX-512 (qemu has none)."""
    done = generate_on("Haswell", engine, model_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.splitlines() == ["variant haswell", "generated 2"]


def test_a_cpu_without_avx_runs_on_the_sse42_variant(model_path):
    """qemu -cpu Westmere (SSE4.2, no AVX): before llama.cpp's variants the image refused it."""
    done = generate_on("Westmere", "localllm", model_path)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.splitlines() == ["variant sse42", "generated 2"]


@pytest.fixture
def config_env(tmp_path):
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    return lambda **settings: clean_environ(MODEL_ENV_FILE=str(env_file), **settings)


def test_a_forced_variant_the_cpu_lacks_is_one_line_not_sigill(config_env):
    """qemu -cpu Haswell has no AVX-512: CPU_LEVEL=skylakex is refused before any engine starts."""
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(ROOT / "entrypoint.py"), "config"],
                          env=config_env(CPU_LEVEL="skylakex"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if not line.startswith(QEMU)] == [
        "error: CPU_LEVEL=skylakex needs instructions this CPU lacks: this CPU runs x64, sse42, sandybridge, "
        "ivybridge, piledriver, haswell; or leave CPU_LEVEL empty to choose automatically"]


@pytest.mark.parametrize("value, message", [
    ("avx512_vnni", "error: CPU_LEVEL='avx512_vnni' is a former name: set CPU_LEVEL=icelake (the same instructions), "
                    "or leave it empty to choose automatically"),
    ("avx3", "error: CPU_LEVEL='avx3' is not valid: expected empty (automatic) or one of " + ", ".join(sorted(NEEDS))),
])
def test_a_variant_that_does_not_exist_is_one_line(config_env, value, message):
    done = run_entrypoint("config", env=config_env(CPU_LEVEL=value))
    assert (done.returncode, done.stderr.strip().splitlines()) == (2, [message])


def test_a_forced_variant_is_what_config_shows(config_env):
    done = run_entrypoint("config", env=config_env(CPU_LEVEL="haswell"))
    assert done.returncode == 0, done.stderr
    assert "CPU_LEVEL=haswell  # set\n" in done.stdout, done.stdout


def test_another_platform_is_named_before_any_x86_code_runs(tmp_path):
    """`setarch i686` makes the kernel report another machine, as an arm64 container's kernel does."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    done = subprocess.run(["setarch", "i686", sys.executable, str(ROOT / "entrypoint.py"), "serve"],
                          env=clean_environ(MODEL_ENV_FILE=str(env_file)), capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: this image runs on x86-64 (linux/amd64) only; this machine is i686: build and run it with "
        "--platform linux/amd64 (emulated, and slow, on Apple Silicon; an x86-64 machine or VM is faster)"]


def engine_libraries(entrypoint) -> set[str]:
    """The CPU variants mapped into the engine's process (the entrypoint's children)."""
    found = set()
    for pid in entrypoint.leftovers():
        try:
            found |= set(re.findall(r"libggml-cpu-(\w+)\.so", Path(f"/proc/{pid}/maps").read_text()))
        except OSError:
            pass
    return found


def test_serve_with_a_forced_variant_loads_it_and_warns_without_avx2(start_server, engine):
    """CPU_LEVEL=sse42 on this CPU: the whole start, as a user would force it, and an answer."""
    entrypoint = start_server(CPU_LEVEL="sse42")
    entrypoint.wait_ready()
    assert engine_libraries(entrypoint) == {"sse42"}
    entrypoint.wait_for_line("warning: llama.cpp's sse42 CPU variant has no AVX2")
    assert "CPU variant sse42" in entrypoint.wait_for_line("Serving ")
    import urllib.request
    request = urllib.request.Request(entrypoint.url + "/v1/completions", b'{"prompt": "Hello", "max_tokens": 2}',
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        assert reply.status == 200
