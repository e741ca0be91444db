#!/usr/bin/env bash
# Drain throughput with 1..K relay processes on one outbox: inserts EVENTS
# pending events (auth.user.logged_in over 1000 keys), starts the relays
# together and times until the outbox is empty (every row deleted only
# after Kafka's acknowledgement).
#
#   bash bench/scripts/scale-drain.sh            # 300 000 events, 1, 2 and 3 relays
#   EVENTS=500000 RELAYS="1 3" bash bench/scripts/scale-drain.sh
#
# Uses the local services of scripts/services.sh and the release binary;
# every run gets its own database and topic prefix, dropped at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
EVENTS="${EVENTS:-300000}"
RELAYS="${RELAYS:-1 2 3}"
ADMIN_URL="${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:55432/postgres}"
bin=target/release/outbox-relay
cargo build --release -q --bin outbox-relay

for k in $RELAYS; do
  db="scale_drain_$$_$k"
  export DATABASE_URL="${ADMIN_URL%/*}/$db"
  export OUTBOX_RELAY_CONFIG=/dev/null
  export OUTBOX_RELAY_KAFKA__TOPIC_PREFIX="sd$$k$k."
  export OUTBOX_RELAY_HTTP__LISTEN=""
  psql -qX "$ADMIN_URL" -c "CREATE DATABASE $db"
  "$bin" migrate >/dev/null
  "$bin" topics ensure >/dev/null
  psql -qX "$DATABASE_URL" -c "INSERT INTO outbox (event_type, payload)
    SELECT 'auth.user.logged_in', jsonb_build_object('userId', 'user-' || (g % 1000),
           'tenantId', '01j9p3kz5f00000000000000', 'ip', '203.0.113.42',
           'userAgent', 'Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15')
      FROM generate_series(1, $EVENTS) AS g" -c "VACUUM ANALYZE outbox"
  pids=()
  start=$(date +%s.%N)
  for _ in $(seq 1 "$k"); do
    "$bin" run 2>/dev/null &
    pids+=($!)
  done
  while [[ "$(psql -qXtA "$DATABASE_URL" -c 'SELECT count(*) FROM outbox')" != 0 ]]; do sleep 0.05; done
  end=$(date +%s.%N)
  kill -TERM "${pids[@]}"
  wait "${pids[@]}" || true
  awk -v n="$EVENTS" -v k="$k" -v s="$start" -v e="$end" \
    'BEGIN {printf "%d relay(s): %d events in %.2f s = %.0f events/s\n", k, n, e - s, n / (e - s)}'
  psql -qX "$ADMIN_URL" -c "DROP DATABASE $db WITH (FORCE)"
  bash scripts/kafka.sh topics --delete --if-exists --topic "^sd$$k${k}[.].*" >/dev/null
done
