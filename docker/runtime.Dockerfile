# syntax=docker/dockerfile:1.7
# The conveyor runtime: what runs in pods. RayJob head and workers run
# `python -m conveyor.runtime.train`; the KServe predictor runs the conveyor model server.
# torch from PyPI carries its CUDA libraries, so one image serves CPU and GPU node pools (the
# node's NVIDIA driver is mounted by the container toolkit).
# Build from the repository root:
#   docker build -f docker/runtime.Dockerfile -t ghcr.io/conveyor-ml/conveyor-runtime:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/conveyor
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
RUN /opt/conveyor/bin/pip install --no-compile ".[runtime,s3,gcs]" \
    && /opt/conveyor/bin/python -c "import conveyor.runtime, ray, torch, kserve"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="conveyor-runtime" \
      org.opencontainers.image.source="https://github.com/conveyor-ml/conveyor" \
      org.opencontainers.image.licenses="Apache-2.0"
# No wget or curl: KubeRay (>= 1.6) probes Ray >= 2.53 over HTTP and its submitter checks with python.
# Ray's images run as uid 1000 with a writable home (Ray keeps its session files under /tmp/ray and
# the home directory); KubeRay's pod templates expect that.
RUN groupadd --gid 1000 ray \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray
COPY --from=build /opt/conveyor /opt/conveyor
ENV PATH=/opt/conveyor/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/ray
WORKDIR /home/ray
USER 1000:1000
# 8080: the KServe model server (HTTP, v1 and v2 protocols); 8265/6379/10001: Ray dashboard, GCS, client.
EXPOSE 8080 8265 6379 10001
CMD ["python", "-m", "conveyor.runtime.serve"]
