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
# tests/faults.rs starts its own PostgreSQL and Kafka (state directory and
# ports in scripts/faults.env) so that it can stop and kill them; they go when
# the suite ends.
faults_down() {
  bash scripts/faults-env.sh down >/dev/null 2>&1 || true
  (
    set -a
    # shellcheck source-path=SCRIPTDIR source=faults.env
    source scripts/faults.env
    # Only a stopped server's files may go: deleted under a running one, the
    # next run would find its port taken and no pid file to stop it by.
    if tcp_open 127.0.0.1 "$OUTBOX_PG_PORT" || tcp_open 127.0.0.1 "$OUTBOX_KAFKA_PORT"; then
      log "the fault tests' services are still running; keeping $OUTBOX_STATE_DIR"
    else
      rm -rf "$OUTBOX_STATE_DIR"
    fi
  )
}
# tests/cluster.rs starts a three-broker cluster (scripts/cluster.sh); it goes too.
cluster_down() {
  bash scripts/cluster.sh destroy >/dev/null 2>&1 ||
    log "the test cluster did not stop; see 'bash scripts/cluster.sh status'"
}
# The observability tests (tests/it/observability.rs) stop a broker of their
# own (scripts/kafka.sh with the state directory and ports of
# scripts/observability.env).
obs_down() {
  (
    set -a
    # shellcheck source-path=SCRIPTDIR source=observability.env
    source scripts/observability.env
    bash scripts/kafka.sh down >/dev/null 2>&1 || true
    tcp_open 127.0.0.1 "$OUTBOX_KAFKA_PORT" || rm -rf "$OUTBOX_STATE_DIR"
  )
}
# The TLS tests (tests/it/tls.rs) run the TLS/SASL broker of scripts/tls-env.sh
# (scripts/tls.env).
tls_down() {
  bash scripts/tls-env.sh down >/dev/null 2>&1 || true
  (
    set -a
    # shellcheck source-path=SCRIPTDIR source=tls.env
    source scripts/tls.env
    tcp_open 127.0.0.1 "$OUTBOX_KAFKA_PORT" || rm -rf "$OUTBOX_STATE_DIR"
  )
}
trap 'bash scripts/sweep.sh || true; faults_down; cluster_down; obs_down; tls_down' EXIT

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
log "library crates' dependency trees"
bash scripts/check-deps.sh
if [[ -f deploy/prometheus/alerts.yml ]]; then
  log "promtool check rules"
  promtool check rules deploy/prometheus/alerts.yml
fi
log "cargo test"
# The integration tests are one binary, tests/it (one module per area; run
# one with e.g. `cargo test --test it security::`), plus tests/faults.rs and
# tests/cluster.rs, which run services of their own, and tests/image.rs
# (ignored here, run below).
# Every event a test reads back from Kafka is recorded here and checked
# against its JSON Schema after the suite (tests/common/mod.rs).
export OUTBOX_TEST_EVENT_LOG="${OUTBOX_STATE_DIR:-/var/tmp/outbox-relay}/published-events"
rm -rf "$OUTBOX_TEST_EVENT_LOG"
cargo test --workspace -- --test-threads="${OUTBOX_TEST_THREADS:-4}"
log "every published event against its JSON Schema (config/schemas)"
python3 scripts/validate-events.py --min 100 config/schemas "$OUTBOX_TEST_EVENT_LOG"
# The container image: built from the Dockerfile with podman and run against
# the services above (scripts/image.sh; minutes on a cold cache).
log "container image (tests/image.rs)"
t_image=$(now_ms)
cargo test --test image -- --ignored --nocapture
log "container image test took $(( ($(now_ms) - t_image) / 1000 ))s"
if [[ -f bench/src/main.rs ]] && grep -q smoke bench/src/main.rs; then
  log "benchmark smoke run"
  cargo run --release -q -p outbox-bench -- smoke
fi
