# syntax=docker/dockerfile:1.7
# The conveyor operator: kopf + the Kubernetes client, no torch or Ray.
# Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t ghcr.io/conveyor-ml/conveyor-operator:0.1.0 .
# The base is pinned by its full version tag; pin it by digest too in your registry mirror with
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/conveyor
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
# Only the operator's dependencies: the runtime extra (torch, Ray, KServe) lives in the runtime image.
# The s3 and gcs extras (s3fs, gcsfs): the operator reads s3:// and gs:// registries' metadata.
RUN /opt/conveyor/bin/pip install --no-compile ".[s3,gcs]" \
    && /opt/conveyor/bin/python -c "import conveyor.operator, s3fs, gcsfs"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="conveyor-operator" \
      org.opencontainers.image.source="https://github.com/conveyor-ml/conveyor" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric non-root user, matching the chart's runAsUser, so runAsNonRoot can verify it.
RUN groupadd --gid 65532 conveyor \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin conveyor
COPY --from=build /opt/conveyor /opt/conveyor
ENV PATH=/opt/conveyor/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8000 8080
ENTRYPOINT ["python", "-m", "conveyor.operator"]
