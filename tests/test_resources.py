"""The CPUs this container may use (resources.available_cpus)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from localllm_container import resources
from conftest import ROOT, clean_environ, write_model_env


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000"}, (1, "affinity 64, cgroup cpu.max 1.5 (floored)")),  # --cpus 1.5
    ({"cpu.max": "350000 100000"}, (3, "affinity 64, cgroup cpu.max 3.5 (floored)")),  # limits.cpu: 3500m
    ({"cpu.max": "250000 100000"}, (2, "affinity 64, cgroup cpu.max 2.5 (floored)")),
    ({"cpu.max": "max 100000"}, (64, "affinity 64")),
    ({"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"}, (4, "affinity 64, cgroup cfs quota 4")),
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, (64, "affinity 64")),
    ({"cpu.max": "50000 100000"}, (1, "affinity 64, cgroup cpu.max 0.5 (floored)")),  # at least 1
])
def test_available_cpus_follow_the_cgroup_quota(tmp_path, monkeypatch, files, expected):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(64)))
    for name, text in files.items():
        path = tmp_path / "sys/fs/cgroup" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    assert resources.available_cpus(tmp_path) == expected


def test_taskset_limits_the_automatic_threads(tmp_path):
    """A real affinity mask, as `docker run --cpuset-cpus` or a Kubernetes CPU manager sets it."""
    env_file = write_model_env(tmp_path / "model.env", MODEL="TheBloke/Foo-7B-GGUF")
    done = subprocess.run(["taskset", "-c", "0", sys.executable, str(ROOT / "entrypoint.py"), "config"],
                          env=clean_environ(MODEL_ENV_FILE=str(env_file)), capture_output=True, text=True)
    assert "N_THREADS=1  # automatic: affinity 1" in done.stdout.splitlines(), done.stdout + done.stderr
