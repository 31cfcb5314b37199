"""deploy/kubernetes/: valid for the Kubernetes API, and consistent with the image
(health path, port, thread choice, stop timeout) and with the memory rule of
docs/en/models-and-memory.md."""
from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from localllm_container.cli import HEALTH_PATH
from localllm_container.settings import MODEL_ENV_DEFAULT, parse_env_file

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
KUBERNETES_VERSION = "1.33.0"
GIB = 1 << 30

# The docs' worked example, the model model.env ships: Mistral 7B Instruct v0.2, Q4_K_M.
MODEL_FILE_BYTES = 4.37e9           # the file's size on the hub (4.37 GB)
KV_BYTES_PER_TOKEN = 2 * 32 * 1024 * 2  # K and V, 32 layers, 8 KV heads x 128, f16: 128 KiB
MARGIN = 1 * GIB                    # llama.cpp's work buffers and the Python server


def resources() -> list[dict]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod() -> dict:
    return next(doc for doc in resources() if doc["kind"] == "Deployment")["spec"]["template"]["spec"]


def container() -> dict:
    return pod()["containers"][0]


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def quantity(text: str) -> float:
    """A Kubernetes quantity (6Gi, 500Mi, 4, 3500m) as a number."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * factor
    return float(text)


def test_there_are_a_deployment_a_service_and_an_autoscaler():
    assert sorted(doc["kind"] for doc in resources()) == ["Deployment", "HorizontalPodAutoscaler", "Service"]


@pytest.mark.parametrize("resource", resources(), ids=lambda doc: doc["kind"])
def test_manifest_is_valid(resource):
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_probes_use_the_health_path_and_port_8000():
    c = container()
    assert {p["containerPort"] for p in c["ports"]} == {8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": HEALTH_PATH, "port": 8000}, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "allow minutes for the model to load"


def test_cpu_is_whole_and_requested_as_limited():
    """The automatic N_THREADS is the CPU limit rounded up: a fraction would oversubscribe."""
    limits, requests = container()["resources"]["limits"], container()["resources"]["requests"]
    assert quantity(limits["cpu"]) == int(quantity(limits["cpu"])) >= 1
    assert requests == limits


def test_memory_covers_the_model_rule():
    assert "Mistral-7B-Instruct-v0.2" in parse_env_file(MODEL_ENV_DEFAULT)["MODEL"], \
        "model.env serves another model: recompute the memory in deployment.yaml and this test"
    n_ctx = int(env_of(container())["N_CTX"])
    needed = MODEL_FILE_BYTES + n_ctx * KV_BYTES_PER_TOKEN + MARGIN
    assert quantity(container()["resources"]["requests"]["memory"]) >= needed


def test_runs_as_the_image_user_without_privileges():
    assert pod()["securityContext"]["runAsNonRoot"] is True and pod()["securityContext"]["runAsUser"] == 1000
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True  # tested in test_serve.py


def test_grace_period_matches_stop_timeout():
    assert pod()["terminationGracePeriodSeconds"] == int(env_of(container())["STOP_TIMEOUT"])


def test_service_and_autoscaler_point_at_the_deployment():
    by_kind = {doc["kind"]: doc for doc in resources()}
    labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert by_kind["Service"]["spec"]["selector"].items() <= labels.items()
    assert by_kind["Service"]["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    target = by_kind["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", by_kind["Deployment"]["metadata"]["name"])
    assert by_kind["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
