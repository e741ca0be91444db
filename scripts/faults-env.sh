#!/usr/bin/env bash
# The dedicated PostgreSQL and Kafka that tests/faults.rs stops and starts,
# apart from the shared ones (state dir, ports) so that other test binaries
# running at the same time never lose their services.
#   scripts/faults-env.sh up|down|status|env
# The values must match the constants at the top of tests/faults.rs.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export OUTBOX_STATE_DIR=/var/tmp/outbox-relay-faults
export OUTBOX_PG_PORT=55442
export OUTBOX_KAFKA_PORT=19102
export OUTBOX_KAFKA_CONTROLLER_PORT=19103

exec bash "$SCRIPT_DIR/services.sh" "$@"
