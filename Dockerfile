# codeserve container. The install steps are scripts/install.sh, the same script `make serve` and
# `make test` run, so the image cannot drift from what CI tests.
#
#   docker build -t codeserve .                                  # portable CPU build
#   docker run -p 8000:8000 -e CODESERVE_API_KEY=... -v codeserve-models:/models codeserve
#
# Inside a container the server must listen on 0.0.0.0, which codeserve only does with an API key
# (CODESERVE_API_KEY) or the explicit CODESERVE_ALLOW_UNAUTHENTICATED_REMOTE=true.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# Debian's point releases replace package versions; pinning them would break the build, not the
# image: the Python dependencies, which decide behaviour, are pinned in pyproject.toml.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md models.toml ./
COPY scripts ./scripts
COPY server ./server
COPY quantize ./quantize
COPY bench ./bench
RUN CMAKE_ARGS="${CMAKE_ARGS}" CODESERVE_EDITABLE=0 scripts/install.sh /opt/venv

FROM ${PYTHON_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 codeserve \
 && mkdir -p /models && chown codeserve /models
COPY --from=builder /opt/venv /opt/venv
COPY --chown=codeserve models.toml /app/models.toml
USER codeserve
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    CODESERVE_HOST=0.0.0.0 \
    CODESERVE_CACHE_DIR=/models \
    CODESERVE_MODELS_FILE=/app/models.toml \
    HF_HOME=/models/huggingface
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["codeserve", "serve"]
