#!/usr/bin/env bash
# The whole test suite on a fresh machine: system packages, local PostgreSQL
# and Kafka, formatting and lints, every test, the alert rules, and the
# benchmark harness's smoke mode.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SCRIPT_DIR/.."
LOG_TAG="test"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

bash scripts/deps.sh
bash scripts/services.sh up
eval "$(bash scripts/services.sh env)"
# Each test makes its own database and topics; left to pile up they slow every
# later broker start (see scripts/sweep.sh).
bash scripts/sweep.sh
trap 'bash scripts/sweep.sh || true' EXIT

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
if [[ -f deploy/prometheus/alerts.yml ]]; then
  log "promtool check rules"
  promtool check rules deploy/prometheus/alerts.yml
fi
log "cargo test"
cargo test --workspace -- --test-threads="${OUTBOX_TEST_THREADS:-4}"
if [[ -f bench/src/main.rs ]] && grep -q smoke bench/src/main.rs; then
  log "benchmark smoke run"
  cargo run --release -q -p outbox-bench -- smoke
fi
