# syntax=docker/dockerfile:1
#
# outbox-relay image: docker build -t outbox-relay .
#   docker run --rm -e DATABASE_URL=... -e OUTBOX_RELAY_KAFKA__BROKERS=... outbox-relay
# The default command is `run`; any subcommand works (`migrate`,
# `topics ensure`, `status --json`, `dlq list`). See docs/configuration.md.

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
# librdkafka is compiled from source (rdkafka's cmake-build feature):
# cmake builds it, libssl-dev provides TLS, and its sources include curl
# headers even though the relay does not use curl.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libssl-dev libcurl4-openssl-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the registry and compiled dependencies between
# builds; the binary is copied out of the cached target directory in the
# same step, since the mount is gone afterwards.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin outbox-relay \
    && install -D -m 0755 target/release/outbox-relay /out/outbox-relay

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 libcurl4 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --home-dir /app --no-create-home --shell /usr/sbin/nologin relay
WORKDIR /app
COPY --from=builder /out/outbox-relay /usr/local/bin/outbox-relay
# config/relay.toml and the kernel catalog; the relay reads config/relay.toml
# relative to this directory. Mount your own over /app/config, or point
# OUTBOX_RELAY_CONFIG at another file.
COPY config/ /app/config/
# In a container the probes must be reachable from outside, and logs go to
# a collector as JSON; both can still be overridden.
ENV OUTBOX_RELAY_HTTP__LISTEN=0.0.0.0:9464 \
    OUTBOX_RELAY_LOG__FORMAT=json
EXPOSE 9464
USER 10001:10001
# SIGTERM (docker stop) finishes the in-flight batch, flushes and exits 0;
# give it relay.shutdown_timeout_ms (30 s) plus a margin: docker stop -t 40.
STOPSIGNAL SIGTERM
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
