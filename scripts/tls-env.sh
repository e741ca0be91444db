#!/usr/bin/env bash
# The TLS/SASL Kafka broker of tests/tls.rs, apart from the shared one:
# plain 19152 (admin), SSL 19154, SASL_SSL 19155 (SCRAM-SHA-512, user
# `relay`), controller 19153; certificates from scripts/tls.sh in
# /var/tmp/outbox-relay-tls/certs. The values must match tests/tls.rs.
#   scripts/tls-env.sh up|down|status
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OUTBOX_STATE_DIR=/var/tmp/outbox-relay-tls
export OUTBOX_KAFKA_PORT=19152
export OUTBOX_KAFKA_CONTROLLER_PORT=19153
export OUTBOX_KAFKA_SSL_PORT=19154
export OUTBOX_KAFKA_SASL_SSL_PORT=19155
export OUTBOX_TLS_DIR="$OUTBOX_STATE_DIR/certs"
export OUTBOX_KAFKA_PROPS_TEMPLATE="$SCRIPT_DIR/kafka/server-tls.properties"
# Test-only credentials of this loopback broker.
export OUTBOX_KAFKA_FORMAT_ARGS="--add-scram SCRAM-SHA-512=[name=relay,password=relay-scram-secret]"

[[ "${1:-}" == up ]] && bash "$SCRIPT_DIR/tls.sh" make "$OUTBOX_TLS_DIR"
exec bash "$SCRIPT_DIR/kafka.sh" "$@"
