# Headwater node image: `headwater` is the entrypoint (`docker run IMAGE node --config ...`).
#
# BASE_IMAGE must give python3 (3.11 or newer) with its venv module, and /bin/sh. The default is
# the official slim image; scripts/build-image passes a Debian bookworm root filesystem made with
# mmdebstrap instead, for machines that reach no container registry. Both stages use the same base,
# so the venv's interpreter links point at the same python3 in each.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: the wheel and a venv
FROM ${BASE_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY api/ api/
COPY client/ client/
COPY node/ node/
COPY raft/ raft/
COPY storage/ storage/
COPY chaos/ chaos/

# The wheel is built from the source (the same wheel CI installs and smoke-tests), then installed with its dependencies into
# a venv of its own, which is all the final stage takes.
RUN python3 -m venv /opt/headwater \
    && /opt/headwater/bin/pip wheel --no-deps --wheel-dir /tmp/dist . \
    && /opt/headwater/bin/pip install /tmp/dist/headwater-*.whl \
    && /opt/headwater/bin/headwater --help >/dev/null \
    && rm -rf /tmp/dist

# ---------------------------------------------------------------- final: the venv on a slim base
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="headwater" \
      org.opencontainers.image.description="Headwater node: a replicated, partitioned event log" \
      org.opencontainers.image.licenses="Apache-2.0"

# The same user and group ids as the chart's securityContext (helm/headwater/values.yaml); USER is
# numeric so that Kubernetes can check runAsNonRoot.
RUN groupadd --gid 10001 headwater \
    && useradd --uid 10001 --gid headwater --no-create-home \
       --home-dir /var/lib/headwater --shell /usr/sbin/nologin headwater \
    && mkdir -p /var/lib/headwater \
    && chown headwater:headwater /var/lib/headwater \
    && chmod 0750 /var/lib/headwater

COPY --from=build /opt/headwater /opt/headwater

# Nothing is written outside the data dir and TMPDIR, so the root filesystem may be read-only:
# mount a volume on /var/lib/headwater (data) and one on /tmp (the chart mounts an emptyDir).
# The node's default data_dir, ./data, is /var/lib/headwater/data from the working directory below.
# No HEADWATER_* setting is baked in: the environment wins over a --config file, and the chart
# configures the node through its file.
ENV PATH=/opt/headwater/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp

# Client (gRPC), Raft (metadata voters) and Prometheus metrics, as in the chart's values.
EXPOSE 9192 9392 9404
VOLUME ["/var/lib/headwater"]
USER 10001:10001
WORKDIR /var/lib/headwater

ENTRYPOINT ["headwater"]
# Without arguments: one node that is its own quorum, reachable as `-p 9192:9192` on this host.
CMD ["node", "--host", "0.0.0.0", "--advertised-host", "127.0.0.1"]
