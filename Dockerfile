# syntax=docker/dockerfile:1
# SpecOps images: `--target operator` (kopf + Kubernetes client + pydantic, no torch) and
# `--target workload` (torch, transformers, vLLM for GPU generation; runs every `specops` command).
#   docker build --target operator -t ghcr.io/specops/operator:0.1.0 .
#   docker build --target workload -t ghcr.io/specops/workload:0.1.0 .
# Both run as the non-root user 1000 (the uid the operator's pod templates and the Helm chart
# ask for). The operator's packages come from the pinned constraints in requirements-pins.txt;
# the workload's from hack/image-requirements.lock (CUDA torch + CUDA vLLM for Linux x86_64,
# with hashes; hack/image-lock.sh writes it and CI checks it). The builder stages own the pip
# work so no compiler, wheel or pip cache reaches a final image.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- common base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --gid 1000 specops \
    && useradd --uid 1000 --gid 1000 --home-dir /home/specops --create-home --shell /usr/sbin/nologin specops

# The project's sources, once, for both builders.
FROM base AS source
WORKDIR /src
COPY pyproject.toml README.md requirements-pins.txt ./
COPY hack/image-requirements.lock ./hack/
COPY workloads ./workloads
COPY operator ./operator

# ---------------------------------------------------------------- operator
FROM source AS operator-build
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir -c requirements-pins.txt ".[operator]"

FROM base AS operator
COPY --from=operator-build /opt/venv /opt/venv
USER 1000:1000
WORKDIR /home/specops
EXPOSE 8080
ENTRYPOINT ["specops-operator"]
CMD ["run", "--all-namespaces"]

# ---------------------------------------------------------------- workload
FROM source AS workload-build
# Every dependency from the hashed lock (PyPI's Linux torch wheel is the CUDA build), then the
# project itself without resolving anything again.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --require-hashes -r hack/image-requirements.lock \
    && pip install --no-cache-dir --no-deps .

FROM base AS workload
# Triton (under vLLM and torch.compile) compiles small C launchers at run time: it needs gcc.
# Debian package versions are fixed by the pinned base image's suite (security updates move the
# exact versions, so pinning them would break rebuilds).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=workload-build /opt/venv /opt/venv
USER 1000:1000
WORKDIR /home/specops
ENTRYPOINT ["specops"]
CMD ["--help"]
