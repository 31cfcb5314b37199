# syntax=docker/dockerfile:1
# localllm on CPU behind an OpenAI-compatible API on port 8000 (or llama.cpp's
# llama-server: ENGINE in model.env).
# Choose the model in model.env, then: docker build --platform linux/amd64 -t localllm .

# Debian 12 (bookworm), pinned by digest (the dated tag beside it says which build):
# the same system libraries on every build, and no other image under the same name.
# scripts/renew-pins refreshes it (docs/en/maintaining.md).
ARG BASE_IMAGE=docker.io/library/debian:bookworm-20251229-slim@sha256:d5d3f9c23164ea16f31852f95bd5959aad1c5e854332fe00f7b3a20fcc9f635c

# ---- builder: compilers stay in this stage --------------------------------
FROM ${BASE_IMAGE} AS builder
# First, on another platform (Apple Silicon without --platform linux/amd64): every
# llama.cpp build below is x86-64 code. The entrypoint checks the same at start.
RUN arch="$(uname -m)"; if [ "$arch" != x86_64 ]; then \
        echo "error: this image runs on x86-64 (linux/amd64) only; this machine is $arch: build and run it with --platform linux/amd64 (emulated, and slow, on Apple Silicon; an x86-64 machine or VM is faster)" >&2; \
        exit 1; \
    fi
# DL3008 (apt versions unpinned): the dated base tag fixes the Debian release;
# exact package versions would break the build at each security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git patch ca-certificates \
        python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/*

# A CA bundle for pip behind a TLS-inspecting proxy: pass a path that a build
# volume provides (see docs); nothing of it stays in the image.
ARG PIP_CERT=
# Every Python package is checked against its SHA-256 in the lock (--require-hashes).
# llama-cpp-python comes as its sdist, checked before anything of it is built, and is
# built as its Python code only, by the build backend pinned in requirements/build.txt
# (scripts/llama-cpp-python.sh); llama.cpp itself is built once below, for both engines,
# and loaded through LLAMA_CPP_LIB_PATH.
COPY requirements/image.txt requirements/build.txt /tmp/requirements/
COPY scripts/llama-cpp-python.sh /tmp/llama-cpp-build/
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
    && PIP_NO_CACHE_DIR=1 sh /tmp/llama-cpp-build/llama-cpp-python.sh /tmp/requirements /tmp/llama-cpp-python \
    && python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/llama-cpp-python/wheels/*.whl \
    && /opt/venv/bin/pip install --no-cache-dir --require-hashes -r /tmp/requirements/image.txt

# llama.cpp from the sources that sdist vendors, with this repository's patches
# (scripts/llama-*.patch, to libllama and its server): the libraries both engines load,
# llama-server, and llama.cpp's CPU variants (x64 to Sapphire Rapids and Zen 4), of
# which the entrypoint loads the best for the CPU it runs on.
COPY scripts/build-llama-cpp.sh scripts/llama-*.patch /tmp/llama-cpp-build/
RUN /tmp/llama-cpp-build/build-llama-cpp.sh /tmp/llama-cpp-python/llama_cpp_python-*/vendor/llama.cpp /opt/llama.cpp \
    && rm -rf /tmp/llama-cpp-python /tmp/llama-cpp-build

# localllm is not on PyPI: installed from git at a fixed commit (the last one; the commit
# hash is what pins it), without its dependencies, which the lock above installed.
# Tests pass a local stand-in here; keep the default for real images.
ARG LOCALLLM="local-llm @ git+https://github.com/GoogleCloudPlatform/localllm.git@2939bd32fa6b54a134d759176c66ad2036e034f8#subdirectory=local-llm"
RUN if [ -z "$PIP_CERT" ]; then unset PIP_CERT; fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps "$LOCALLLM" \
    && /opt/venv/bin/pip check \
    && if /opt/venv/bin/pip show llm >/dev/null 2>&1; then echo "an unrelated 'llm' package is installed" >&2; exit 1; fi \
    && ln -s local-llm /opt/venv/bin/llm

# ---- runtime ----------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="localllm" \
      org.opencontainers.image.description="A GGUF model served on CPU by Google's localllm (llama-cpp-python), or by llama.cpp's llama-server (ENGINE=llama-server), behind an OpenAI-compatible API on port 8000" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
# DL3008: as in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin llm \
    && mkdir -p /opt/models \
    && chown llm:llm /opt/models
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/llama.cpp /opt/llama.cpp
# llama-cpp-python loads llama.cpp from LLAMA_CPP_LIB_PATH (and mtmd from MTMD_CPP_LIB).
ENV PATH=/opt/venv/bin:/opt/llama.cpp:$PATH \
    LLAMA_CPP_LIB_PATH=/opt/llama.cpp \
    MTMD_CPP_LIB=/opt/llama.cpp \
    HF_HOME=/opt/models \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1
WORKDIR /app
COPY entrypoint.py /app/
COPY localllm_container /app/localllm_container
# model.env after the heavy layers: editing it re-runs only the pull below.
COPY model.env /app/
# Numeric, so Kubernetes runAsNonRoot can verify it: the user llm created above.
USER 1000:1000

# PULL_MODEL=0 builds a slim image that downloads the model at start.
ARG PULL_MODEL=1
# A hub mirror, or a local endpoint in tests.
ARG HF_ENDPOINT=https://huggingface.co
# A token for gated or private repos comes only as a build secret:
#   docker build --secret id=hf_token,env=HF_TOKEN ...
RUN --mount=type=secret,id=hf_token,uid=1000 \
    case "$PULL_MODEL" in \
      1) HF_TOKEN_PATH=/run/secrets/hf_token python /app/entrypoint.py pull ;; \
      0) echo "PULL_MODEL=0: the model is downloaded when the container starts" ;; \
      *) echo "PULL_MODEL=$PULL_MODEL is not valid: expected 1 (pull at build) or 0 (pull at start)" >&2; exit 2 ;; \
    esac
# With the model inside, serving never needs the network.
ENV HF_HUB_OFFLINE=${PULL_MODEL}

EXPOSE 8000
# Passes only once the model is loaded and the server answers (no curl needed).
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/app/entrypoint.py", "health"]
ENTRYPOINT ["python", "/app/entrypoint.py"]
CMD ["serve"]
