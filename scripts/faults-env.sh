#!/usr/bin/env bash
# The dedicated PostgreSQL and Kafka that tests/faults.rs stops and starts,
# apart from the shared ones (state dir, ports: scripts/faults.env) so that
# other tests running at the same time never lose their services.
#   scripts/faults-env.sh up|down|status|env
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
set -a
# shellcheck source=faults.env
source "$SCRIPT_DIR/faults.env"
set +a

exec bash "$SCRIPT_DIR/services.sh" "$@"
