#!/usr/bin/env bash
# The TLS/SASL Kafka broker of tests/it/tls.rs, apart from the shared one,
# with the state directory, ports and credentials of scripts/tls.env;
# certificates from scripts/tls.sh in $OUTBOX_STATE_DIR/certs.
#   scripts/tls-env.sh up|down|status
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
set -a
# shellcheck source=tls.env
source "$SCRIPT_DIR/tls.env"
set +a
export OUTBOX_TLS_DIR="$OUTBOX_STATE_DIR/certs"
export OUTBOX_KAFKA_PROPS_TEMPLATE="$SCRIPT_DIR/kafka/server-tls.properties"
export OUTBOX_KAFKA_FORMAT_ARGS="--add-scram SCRAM-SHA-512=[name=$OUTBOX_TLS_SCRAM_USER,password=$OUTBOX_TLS_SCRAM_PASSWORD]"

[[ "${1:-}" == up ]] && bash "$SCRIPT_DIR/tls.sh" make "$OUTBOX_TLS_DIR"
exec bash "$SCRIPT_DIR/kafka.sh" "$@"
