"""The repository's real Dockerfile, built with buildah and run (no Docker engine here).

Only what cannot be reached is replaced, through the Dockerfile's own build
arguments: the base image comes from debootstrap (BASE_IMAGE), localllm from the
stand-in's wheel (LOCALLLM), the hub from testkit/hub_standin.py (HF_ENDPOINT).
The hub asks for a token, which reaches the build only as a secret.

One image holds both engines: the tests that run it (`engine`) run once with the
default (localllm) and once with `-e ENGINE=llama-server`, as a user would.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest

from conftest import ALIAS, LOG_LINES, REPO, REPO_FILES, ROOT, free_port
from cpu_variants import NEEDS, expected_variant, kernel_flags
from localllm_container.server import HEALTH_PATH
from testkit.hub_standin import HubStandin
from testkit.server import processes_with_env

GENERATE = Path(__file__).with_name("generate_on_cpu.py")

BASE_IMAGE = "localhost/debian:bookworm-slim"
CACHE = Path(os.environ.get("LOCALLLM_TEST_CACHE", Path.home() / ".cache/localllm-tests"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
TOKEN = "hf_build_secret_" + uuid.uuid4().hex  # must never appear in the image
PORT = 8000
BUILDAH_FLAKE = "sealing memfd copy: Device or resource busy"  # see ImageBuild.build
# The model server's process in the container: its command line contains this.
SERVER_PROCESS = {"localllm": "llama_cpp.server.app", "llama-server": "/opt/llama.cpp/llama-server"}
# `docker run -e` for each engine. localllm is the default: nothing set. llama-server's system_info
# line (which CPU code llama.cpp runs) is at its trace level, 4; setting it also takes a LLAMA_ARG_*
# variable through the image's check of names against its `llama-server --help`.
ENGINE_SETTINGS = {"localllm": {}, "llama-server": {"ENGINE": "llama-server", "LLAMA_ARG_LOG_VERBOSITY": "4"}}

pytestmark = pytest.mark.skipif(os.environ.get("LOCALLLM_SKIP_IMAGE_TEST") == "1",
                                reason="LOCALLLM_SKIP_IMAGE_TEST=1")


def buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def base_image() -> str:
    """debian:bookworm-slim without a registry: debootstrap, once per machine."""
    if buildah("inspect", "--type", "image", BASE_IMAGE, check=False).returncode != 0:
        rootfs = CACHE / "debian-bookworm-rootfs"
        if not (rootfs / "etc/debian_version").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs),
                            "http://deb.debian.org/debian"], check=True, capture_output=True)
        container = buildah("from", "scratch").stdout.strip()
        try:
            mount = buildah("mount", container).stdout.strip()
            subprocess.run(["cp", "-a", f"{rootfs}/.", mount], check=True)
            buildah("umount", container)
            buildah("commit", "--quiet", container, BASE_IMAGE)
        finally:
            buildah("rm", container, check=False)
    return BASE_IMAGE


def set_model_env(path: Path, **values: str) -> None:
    """Edit model.env the way a user does: change the value on the variable's line."""
    text = path.read_text()
    for name, value in values.items():
        text, count = re.subn(rf"(?m)^{name}=.*$", f"{name}={value}", text)
        assert count == 1, f"{name} has no line in model.env"
    path.write_text(text)


class ImageBuild:
    """Builds from a copy of the repository, as `docker build` would from a checkout."""

    def __init__(self, workdir: Path, hub: HubStandin, base: str):
        self.context = workdir / "context"
        shutil.copytree(ROOT, self.context, ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache"))
        self.wheels = workdir / "localllm-wheel"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(self.wheels),
                        str(ROOT / "tests/localllm_standin")], check=True)
        self.token_file = workdir / "hf_token"
        self.token_file.write_text(TOKEN)
        self.hub, self.base = hub, base
        self.tags: list[str] = []
        self.seconds: dict[str, float] = {}
        self.flakes: list[str] = []  # builds retried after BUILDAH_FLAKE

    def build(self, name: str, *build_args: str) -> str:
        """Build with the Dockerfile's own arguments; returns buildah's log."""
        tag = f"localhost/localllm-test-{name}:{uuid.uuid4().hex[:8]}"
        wheel = next(self.wheels.glob("*.whl"))
        args = [f"BASE_IMAGE={self.base}", "PIP_CERT=/run/host-ca.crt", f"LOCALLLM=/run/localllm/{wheel.name}",
                f"HF_ENDPOINT={self.hub.url}", *build_args]
        command = ["buildah", "bud", "--layers", "--format", "docker", "--isolation", "chroot", "--network", "host",
                   "--pull=never", "--volume", f"{HOST_CA}:/run/host-ca.crt:ro",
                   "--volume", f"{self.wheels}:/run/localllm:ro", "--secret", f"id=hf_token,src={self.token_file}",
                   *[part for arg in args for part in ("--build-arg", arg)],
                   "-t", tag, "-f", str(self.context / "Dockerfile"), str(self.context)]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 and BUILDAH_FLAKE in done.stdout + done.stderr:
            # buildah's chroot run copies itself into a sealed memfd; the kernel refuses the seal (EBUSY)
            # now and then while the machine is busy. Not the Dockerfile: the build goes on from its cache.
            self.flakes.append(name)
            done = subprocess.run(command, capture_output=True, text=True)
        self.seconds[name] = time.monotonic() - started
        assert done.returncode == 0, f"build {name} failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
        self.tags.append(tag)
        self.last_tag = tag
        return done.stdout

    def remove(self) -> None:
        for tag in self.tags:
            buildah("rmi", "--force", tag, check=False)
        buildah("rmi", "--prune", check=False)  # the intermediate layers of these builds


@pytest.fixture(scope="module")
def images(tmp_path_factory, base_image, model_path, report):
    """The image built from the repository with the test model, and facts about it."""
    started = time.monotonic()
    hub = HubStandin({REPO: {name: model_path for name in REPO_FILES}}, token=TOKEN).start()
    image = ImageBuild(tmp_path_factory.mktemp("image"), hub, base_image)
    try:
        set_model_env(image.context / "model.env", MODEL=REPO, MODEL_QUANT="q4_k_m", CHAT_FORMAT="gemma")
        first_log = image.build("first")
        image.full = image.last_tag
        set_model_env(image.context / "model.env", N_CTX="2048")
        image.rebuild_log = image.build("rebuild")
        image.served = image.last_tag
        image.build("slim", "PULL_MODEL=0")
        image.slim = image.last_tag
        assert "Pulling gemma-3-270m-Q4_K_M.gguf" in first_log
        report("image: first build", f"{image.seconds['first']:.0f} s")
        report("image: rebuild after a model.env change",
               f"{image.seconds['rebuild']:.0f} s ({image.seconds['rebuild'] / image.seconds['first']:.2f} of the first)")
        report("image: size with the model", size(image.full))
        report("image: size without the model (PULL_MODEL=0)", size(image.slim))
        hub.stop()  # from here on nothing may need the network
        yield image
    finally:
        hub.stop()
        image.remove()
        report("image: whole image test (builds, checks, clean-up)", f"{time.monotonic() - started:.0f} s")
        report("image: builds retried after buildah's memfd error", ", ".join(image.flakes) or "none")


def size(tag: str) -> str:
    return buildah("images", "--format", "{{.Size}}", tag).stdout.strip()


def inspect(tag: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", tag).stdout)


def steps(log: str) -> list[tuple[str, bool]]:
    """(instruction, taken from cache) for each step of the final stage in a build log."""
    found = []
    for match in re.finditer(r"STEP \d+/\d+: (.*)\n(--> Using cache)?", log):
        found.append((match.group(1), bool(match.group(2))))
    return found


def test_editing_model_env_reuses_the_heavy_layers(images):
    rebuilt = steps(images.rebuild_log)
    assert rebuilt, images.rebuild_log
    heavy = [s for s in rebuilt if any(word in s[0] for word in ("pip install", "apt-get", "build-llama-cpp.sh"))]
    assert any("build-llama-cpp.sh" in s[0] for s in heavy), heavy
    assert heavy and all(cached for _, cached in heavy), heavy
    pull = [s for s in rebuilt if "entrypoint.py pull" in s[0]]
    assert pull and not pull[0][1], "the pull must run again after model.env changed"


def test_image_config(images):
    config = inspect(images.served)["Docker"]["config"]
    assert config["User"] == "1000:1000"
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["Entrypoint"] == ["python", "/app/entrypoint.py"] and config["Cmd"] == ["serve"]
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "/app/entrypoint.py", "health"]
    assert "HF_HUB_OFFLINE=1" in config["Env"]
    assert config["Labels"]["org.opencontainers.image.title"] == "localllm"
    slim = inspect(images.slim)["Docker"]["config"]
    assert "HF_HUB_OFFLINE=0" in slim["Env"]


def test_build_secret_leaves_no_trace(images):
    for tag in (images.full, images.served, images.slim):
        assert TOKEN not in buildah("inspect", "--type", "image", tag).stdout  # config, env, history
        container = buildah("from", tag).stdout.strip()
        try:
            root = buildah("mount", container).stdout.strip()
            found = subprocess.run(["grep", "-r", "-l", "-F", "--binary-files=text", TOKEN, root],
                                   capture_output=True, text=True)
            assert found.returncode == 1, f"token found in {found.stdout}"
            assert not any((Path(root) / "run/secrets").glob("*"))
        finally:
            buildah("umount", container, check=False)
            buildah("rm", container, check=False)


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


class Container:
    """`docker run` with buildah: the image's own entrypoint, command, user,
    environment and working directory, on the host network. One variable is
    added, a marker that tells this container's processes from other tests'."""

    def __init__(self, tag: str, **environ: str):
        """`environ`: `docker run -e NAME=VALUE` options."""
        config = inspect(tag)["Docker"]["config"]
        self.config = config
        self.name = buildah("from", tag).stdout.strip()
        self.marker = f"LOCALLLM_TEST_MARKER={uuid.uuid4().hex}"
        options = ["--isolation", "chroot", "--network", "host", "--user", config["User"],
                   "--workingdir", config["WorkingDir"], "--env", self.marker]
        image_env = dict(entry.split("=", 1) for entry in config["Env"])
        for name, value in {**image_env, **environ}.items():  # -e replaces the image's value
            options += ["--env", f"{name}={value}"]
        self.options = options
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"{self.name}.log", "w")
        self.proc = subprocess.Popen(["buildah", "run", *options, self.name, "--",
                                      *config["Entrypoint"], *config["Cmd"]],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return buildah("run", *self.options, self.name, "--", *command, check=False)

    def processes(self, needle: str) -> list[int]:
        """Host pids of this container's live processes whose command line contains `needle`."""
        found = []
        for pid in processes_with_env(self.marker):
            try:
                if needle in command_line(pid):
                    found.append(pid)
            except OSError:
                continue
        return found

    def wait_ready(self, port: int, seconds: float) -> None:
        """Until /v1/models answers on `port`; fails with the container's log if it exits or takes longer."""
        deadline = time.monotonic() + seconds
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    return
            except OSError:
                assert time.monotonic() < deadline, self.output()
                time.sleep(0.2)

    def output(self) -> str:
        # Read through a file description of its own: seeking the one the container writes
        # through would make its next lines overwrite the log's beginning.
        return Path(self.log.name).read_text(errors="replace")

    def remove(self) -> None:
        for pid in [pid for needle in ("/app/entrypoint.py serve", "localllm_container.front", *SERVER_PROCESS.values())
                    for pid in self.processes(needle)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        buildah("rm", self.name, check=False)


def assert_port_free(port: int) -> None:
    """Fail early and clearly when something else already listens on the port."""
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is already in use"


@pytest.fixture(scope="module")
def container(images, engine):
    """The served image, on each engine in turn (one container at a time, on the image's port)."""
    assert_port_free(PORT)
    running = Container(images.served, **ENGINE_SETTINGS[engine])
    try:
        running.wait_ready(PORT, 180)
        yield running
    finally:
        running.remove()


def test_the_slim_image_downloads_its_model_at_start_and_answers(images, model_path, report):
    """PULL_MODEL=0: `serve` pulls from the hub (the stand-in) when the container starts."""
    port = free_port()
    with HubStandin({REPO: {name: model_path for name in REPO_FILES}}) as hub:
        running = Container(images.slim, PORT=str(port), HF_ENDPOINT=hub.url)
        try:
            running.wait_ready(port, 300)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            reply = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hello"}],
                                                   max_tokens=8, temperature=0)
            assert reply.choices[0].message.content.strip() and reply.model == ALIAS
            assert "downloading it now" in running.output()
            report("slim image: first answer", repr(reply.choices[0].message.content))
        finally:
            running.remove()


def test_the_slim_image_offline_without_its_model_says_so(images):
    running = Container(images.slim, PORT=str(free_port()), HF_HUB_OFFLINE="1")
    try:
        assert running.proc.wait(120) == 2, running.output()
        said = [line for line in running.output().splitlines() if line.startswith("error: ")]
        assert said and "Traceback" not in running.output(), running.output()
        last = said[-1]  # the entrypoint's line (buildah adds one of its own after it)
        assert last.startswith(f"error: MODEL={REPO} is not in this image's model cache and HF_HUB_OFFLINE=1"), last
    finally:
        running.remove()


def test_container_answers_offline(container, engine):
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v1/models", timeout=5) as reply:
        assert [m["id"] for m in json.load(reply)["data"]] == [ALIAS]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content.strip() and reply.model == ALIAS
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{HEALTH_PATH}", timeout=5) as health:
        assert health.status == 200
    assert "context 2048" in container.output()  # the rebuilt model.env is the one served
    assert LOG_LINES[engine]["running"] in container.output()  # that engine's server, not the other


# A grammar llama.cpp cannot parse, in each engine's words.
BAD_GRAMMAR_ANSWER = {"localllm": "grammar: llama.cpp cannot parse it", "llama-server": "failed to parse grammar"}


def test_a_grammar_llama_cpp_cannot_parse_gets_a_400_from_the_image(container, engine):
    """It kills an unguarded llama-cpp-python server (see test_bad_input.py): the localllm engine's
    request guard answers 400; llama-server refuses it itself, with a 400 of its own."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=BAD_GRAMMAR_ANSWER[engine]):
        client.completions.create(model=ALIAS, prompt="Hi", max_tokens=4, extra_body={"grammar": "nonsense"})
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v1/models", timeout=5) as reply:
        assert reply.status == 200


def test_healthcheck_command_succeeds_inside(container):
    test = container.config["Healthcheck"]["Test"]
    assert test[0] == "CMD"
    done = container.exec(*test[1:])
    assert done.returncode == 0, done.stdout + done.stderr


def test_server_runs_as_non_root_and_only_its_port_is_open_to_the_network(container, engine):
    import psutil
    servers = container.processes(SERVER_PROCESS[engine])
    assert len(servers) == 1
    status = Path(f"/proc/{servers[0]}/status").read_text()
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M).groups()
    assert uids == ("1000", "1000")
    listening = {(c.laddr.ip, c.laddr.port) for pid in container.processes("")
                 for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    behind = listening - {("0.0.0.0", PORT)}  # the front on PORT; the engine behind it, on loopback only
    assert ("0.0.0.0", PORT) in listening and len(behind) == 1 and next(iter(behind))[0] == "127.0.0.1", listening


def test_the_best_cpu_variant_for_this_machine_is_loaded(container, engine, report):
    """The expectation from /proc/cpuinfo (tests/cpu_variants.py), not from the entrypoint's
    code; what runs, from the engine process's own memory map."""
    expected = expected_variant(kernel_flags())
    (server,) = container.processes(SERVER_PROCESS[engine])
    environ = Path(f"/proc/{server}/environ").read_bytes().split(b"\0")
    assert f"GGML_BACKEND_PATH=/opt/llama.cpp/cpu/libggml-cpu-{expected}.so".encode() in environ
    mapped = set(re.findall(r"/opt/llama\.cpp/cpu/libggml-cpu-\w+\.so", Path(f"/proc/{server}/maps").read_text()))
    assert mapped == {f"/opt/llama.cpp/cpu/libggml-cpu-{expected}.so"}
    assert f"CPU variant {expected}" in container.output()
    report(f"image: the CPU variant {engine} runs here", expected)


@pytest.fixture(scope="module")
def image_root(images):
    """The served image's file system, with qemu-user copied in to emulate older CPUs, and /proc as
    in a container (the dynamic loader finds llama-server's own libraries, $ORIGIN, through it)."""
    name = buildah("from", images.served).stdout.strip()
    proc = None
    try:
        root = Path(buildah("mount", name).stdout.strip())
        shutil.copy(shutil.which("qemu-x86_64-static"), root / "tmp/qemu")
        subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
        proc = root / "proc"
        yield root, inspect(images.served)["Docker"]["config"]
    finally:
        if proc:
            subprocess.run(["umount", str(proc)], check=False)
        buildah("umount", name, check=False)
        buildah("rm", name, check=False)


def emulator(cpu: str | None) -> list[str]:
    return ["/tmp/qemu", "-cpu", cpu] if cpu else []


def run_in_image(image_root, cpu: str | None, *command: str, **env: str) -> subprocess.CompletedProcess:
    """`command` in the image's file system, as its user with its environment, on an emulated
    `cpu` (None: this CPU itself)."""
    root, config = image_root
    environ = dict(entry.split("=", 1) for entry in config["Env"])
    return subprocess.run(["chroot", "--userspec=1000:1000", str(root), *emulator(cpu), *command],
                          env={**environ, **env}, capture_output=True, text=True, timeout=600)


def generate_in_image(image_root, engine: str, cpu: str | None, **env: str) -> subprocess.CompletedProcess:
    """tests/generate_on_cpu.py in the image: the variant its entrypoint chooses loads the image's
    model with `engine` and generates, on an emulated `cpu` (None: this CPU itself)."""
    root, _ = image_root
    shutil.copy(GENERATE, root / "tmp/generate_on_cpu.py")
    (model,) = root.glob("opt/models/hub/models--*/snapshots/*/*.gguf")
    return run_in_image(image_root, cpu, "/opt/venv/bin/python3", "/tmp/generate_on_cpu.py", engine,
                        f"/{model.relative_to(root)}", str(free_port()), *emulator(cpu), LOCALLLM_ROOT="/app", **env)


def test_every_library_and_cpu_variant_links(image_root):
    """llama-server and each variant find every library and symbol they need (ldd -r only loads
    and links, so this holds on any CPU); llama-cpp-python carries no llama.cpp of its own."""
    root, _ = image_root
    variants = sorted(f"/{path.relative_to(root)}" for path in root.glob("opt/llama.cpp/cpu/libggml-cpu-*.so"))
    assert len(variants) == len(NEEDS), variants
    for binary in ["/opt/llama.cpp/llama-server", *variants]:
        done = run_in_image(image_root, None, "ldd", "-r", binary)
        assert done.returncode == 0 and "not found" not in done.stdout + done.stderr, done.stdout + done.stderr
        assert "undefined symbol" not in done.stdout + done.stderr, done.stdout + done.stderr
        base = next(line for line in done.stdout.splitlines() if "libggml-base.so" in line)
        assert os.path.normpath(base.split("=> ")[1].split(" (")[0]) == "/opt/llama.cpp/libggml-base.so.0", base
    assert not list(root.glob("opt/venv/lib/python3*/site-packages/llama_cpp/lib/*.so"))


def test_an_avx2_cpu_runs_the_image_on_the_haswell_variant(image_root, engine):
    """qemu -cpu Haswell: AVX2 but no AVX-512. The model loads and generates."""
    done = generate_in_image(image_root, engine, "Haswell")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.splitlines() == ["variant haswell", "generated 2"]


def test_sigterm_stops_the_container(container, engine):
    """`docker stop` sends SIGTERM to the container's main process. Last: it ends the container."""
    entrypoints = container.processes("/app/entrypoint.py serve")
    main = [pid for pid in entrypoints if command_line(pid).split()[0].endswith(("/python", "/python3"))]
    assert len(main) == 1, [command_line(pid) for pid in entrypoints]
    os.kill(main[0], signal.SIGTERM)
    assert container.proc.wait(10) == 0, container.output()
    assert container.processes(SERVER_PROCESS[engine]) == []
    assert LOG_LINES[engine]["stopped"] in container.output()  # a graceful stop, not the SIGKILL fallback
