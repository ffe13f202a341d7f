# syntax=docker/dockerfile:1
# Multi-stage: install the package and its locked dependencies in a build stage,
# copy only the installed tree into a slim runtime that runs as a numeric non-root user.
#
# Base image: a full patch version, so a rebuild gets the same interpreter and Debian
# release; raising it is a deliberate edit of this line. 3.11.17 is the newest 3.11 patch
# we found published as python:3.11.17-slim-bookworm (3.11 is in its security-fix phase,
# upstream end of life 2027-10). Not verified here: this machine has no Docker engine and
# no access to Docker Hub. Pin the digest too where builds must be bit-for-bit:
#   docker buildx imagetools inspect python:3.11.17-slim-bookworm   -> @sha256:...
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# A C compiler for mypyc (the worker's hot path compiled, below); in this stage only. The
# versions follow the base image's Debian release (bookworm).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# constraints.txt pins every dependency (the code relies on aiokafka and Faust internals);
# `make lock` regenerates it from the tested virtualenv. Only the runtime ones are installed.
COPY constraints.txt pyproject.toml README.md ./
COPY aggregator ./aggregator
COPY tools/native.py ./tools/native.py
RUN pip install --prefix=/install --constraint constraints.txt ".[otlp]"
# The worker's hot path compiled with mypyc (the locked mypy, installed outside /install so it
# stays out of the runtime) beside the installed sources: an extension module per listed
# module and the manifest the package's guard checks (README, "Compiled hot path").
RUN pip install --constraint constraints.txt mypy \
    && python /src/tools/native.py build \
       --root "$(python -c 'import sysconfig; print(sysconfig.get_path("purelib", vars={"base": "/install"}))')"

FROM ${PYTHON_IMAGE}
# OCI labels; `make image` passes VERSION (pyproject.toml), REVISION and SOURCE (git).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="clickstream-aggregator" \
      org.opencontainers.image.description="Real-time windowed aggregation of click-streams per region, on Kafka and Faust, with exact counts" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
# A numeric USER: Kubernetes runAsNonRoot can only verify a uid, not a name. The passwd
# entry stays so that tools asking for the user's name or home still work.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home app \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /install /usr/local
# the installed set is consistent (every requirement met, at the locked versions)
RUN python -m pip check --disable-pip-version-check
USER 10001:10001
WORKDIR /home/app
ENV AGG_WEB_HOST=0.0.0.0 \
    AGG_WEB_PORT=8080 \
    AGG_DATA_DIR=/data
# Documentation only: the service listens on AGG_WEB_PORT, which a deployment may change.
EXPOSE 8080
# Each container gets its own /data (the data dir is locked by one process at a time).
VOLUME ["/data"]
# /healthz on the port and address the service was given at run time (AGG_WEB_PORT,
# AGG_WEB_HOST; a wildcard address is reached on loopback), not a port fixed at build time.
# It reads the environment only: set the port there (not by --web-port or an AGG_CONFIG file)
# or override the check. Containers that run no HTTP server (gen) disable it (compose).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os,sys,urllib.request as u; h=os.environ.get('AGG_WEB_HOST') or '127.0.0.1'; h={'0.0.0.0':'127.0.0.1','::':'::1'}.get(h,h); h='['+h+']' if ':' in h else h; p=os.environ.get('AGG_WEB_PORT') or '8080'; sys.exit(0 if u.urlopen('http://%s:%s/healthz' % (h,p), timeout=2).status == 200 else 1)"]
ENTRYPOINT ["aggregator"]
CMD ["run"]
