#!/usr/bin/env bash
# Runs the relay on local PostgreSQL + Kafka: starts both, applies the
# migrations, creates the catalog's topics, starts the relay, writes one
# sample event with plain SQL and shows it arriving on its topic. The relay
# then keeps running until Ctrl-C.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SCRIPT_DIR/.."
LOG_TAG=dev
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

bash scripts/deps.sh
bash scripts/services.sh up
eval "$(bash scripts/services.sh env)"
export DATABASE_URL
log "building"
cargo build --release -q --bin outbox-relay
relay=target/release/outbox-relay
"$relay" migrate
"$relay" topics ensure

# The deployment docs/security.md describes: the relay and the service that
# writes the sample event connect as least-privilege login roles (the local
# server trusts loopback connections, so they need no password here).
log "login roles dev_relay (outbox_relay) and dev_iam (outbox_writer, mapped to iam)"
psql -q -X -v ON_ERROR_STOP=1 "$DATABASE_URL" >/dev/null <<'SQL'
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dev_relay') THEN
        CREATE ROLE dev_relay LOGIN IN ROLE outbox_relay;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'dev_iam') THEN
        CREATE ROLE dev_iam LOGIN IN ROLE outbox_writer;
    END IF;
END
$$;
SELECT outbox_map_publisher('dev_iam', 'iam');
SQL
relay_url="${DATABASE_URL/:\/\/*@/:\/\/dev_relay@}"
writer_url="${DATABASE_URL/:\/\/*@/:\/\/dev_iam@}"

DATABASE_URL="$relay_url" "$relay" run &
relay_pid=$!
trap 'kill -TERM "$relay_pid" 2>/dev/null; wait "$relay_pid" 2>/dev/null' EXIT INT TERM

user="01j9pa5mz7$(date +%s%N | tail -c 15)"
log "waiting for a consumer on platform.auth.events, then inserting auth.user.created for userId $user"
bash scripts/kafka.sh console-consumer --topic platform.auth.events --max-messages 1 --timeout-ms 30000 \
  --property print.key=true --property print.headers=true &
consumer_pid=$!
sleep 4
psql -q "$writer_url" -c "INSERT INTO outbox (event_type, tenant_id, payload) VALUES ('auth.user.created', '01j9p3kz5f00000000000000',
  '{\"userId\": \"$user\", \"email\": \"ada@example.com\", \"tenantId\": \"01j9p3kz5f00000000000000\", \"roles\": [\"member\"]}'::jsonb);"
wait "$consumer_pid" || die "the sample event did not arrive within 30 s; see the relay's log above"
log "the sample event arrived (headers, key, envelope above). The relay keeps running: Ctrl-C stops it."
log "metrics: curl -s http://127.0.0.1:9464/metrics | grep ^outbox_"
wait "$relay_pid"
