# codeserve container. Its install step is scripts/install.sh, the same script `make serve` and
# `make test` run, so the image cannot drift from what CI tests (tests/test_container.py replays it).
#
# CPU (portable x86-64):
#   docker build -t codeserve:cpu .
# NVIDIA GPU:
#   docker build -t codeserve:cuda \
#     --build-arg BUILDER_IMAGE=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#     --build-arg RUNTIME_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#     --build-arg CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined" .
# Run (the server listens on 0.0.0.0 inside the container, which codeserve allows only with an API
# key, or with CODESERVE_ALLOW_UNAUTHENTICATED_REMOTE=true typed by you):
#   docker run -p 127.0.0.1:8000:8000 -e CODESERVE_API_KEY=change-me -v codeserve-models:/models codeserve:cpu

ARG BUILDER_IMAGE=python:3.11-slim-bookworm
ARG RUNTIME_IMAGE=python:3.11-slim-bookworm

FROM ${BUILDER_IMAGE} AS builder
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# Debian/Ubuntu point releases replace package versions, so pinning them breaks builds; what
# decides behaviour (the Python dependencies) is pinned in pyproject.toml and scripts/install.sh.
# CUDA base images have no Python: install the distribution's (3.11+ on the supported bases).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && if ! command -v python3 >/dev/null; then \
      apt-get install -y --no-install-recommends python3 python3-venv python3-dev; fi \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md models.toml ./
COPY scripts ./scripts
COPY patches ./patches
COPY server ./server
COPY quantize ./quantize
COPY bench ./bench
# No extra: the image serves; bench and quantize dependencies stay out of it.
RUN CMAKE_ARGS="${CMAKE_ARGS}" CODESERVE_EDITABLE=0 PYTHON=python3 scripts/install.sh /opt/venv

FROM ${RUNTIME_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && if ! command -v python3 >/dev/null; then \
      apt-get install -y --no-install-recommends python3; fi \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 codeserve \
 && mkdir -p /models && chown codeserve /models
COPY --from=builder /opt/venv /opt/venv
COPY --chown=codeserve models.toml /app/models.toml
USER 10001
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    CODESERVE_HOST=0.0.0.0 \
    CODESERVE_CACHE_DIR=/models \
    CODESERVE_MODELS_FILE=/app/models.toml \
    HF_HOME=/models/huggingface
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["codeserve", "serve"]
