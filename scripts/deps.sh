#!/usr/bin/env bash
# System packages the build and the checks need, installed only when missing.
#   libcurl4-openssl-dev: librdkafka 2.12's sources include curl headers even when built without it.
#   prometheus: promtool validates deploy/prometheus rules; the dashboard and alert
#     tests (tests/it/observability.rs) run its server against a real relay.
#   python3-jsonschema: the independent JSON Schema validator that checks every
#     published event against `outbox-relay catalog schema` (scripts/validate-events.py).
#   openssl: certificates for the TLS/SASL tests (scripts/tls.sh).
#   podman, runc, debootstrap, uidmap: the container image test (tests/image.rs,
#     scripts/image.sh builds the base images locally).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=deps
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

need=()
for pkg in libcurl4-openssl-dev libssl-dev cmake pkg-config prometheus python3-jsonschema openssl \
  podman runc debootstrap uidmap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  [[ $(id -u) -eq 0 ]] || die "missing packages ${need[*]}: install them with apt-get (needs root)"
  log "installing ${need[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian prometheus package may start a server on install; it is not used here.
if command -v service >/dev/null 2>&1; then service prometheus stop >/dev/null 2>&1 || true; fi
