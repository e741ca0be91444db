#!/usr/bin/env bash
# What a separate FOR UPDATE pass costs the leased claim: drains EVENTS
# outbox rows in batches of 4000 with the claim's DELETE, once with the row
# locks taken by the DELETE alone (what the relay does with leases) and once
# with FOR UPDATE in its subquery first, alternating ROUNDS times. Runs in
# PostgreSQL only (a DO block, one transaction per drain), so it measures the
# statement, not the relay.
#
#   bash bench/scripts/claim-lock-cost.sh          # 300 000 rows, 2 rounds
#
# Uses the local PostgreSQL of scripts/services.sh; the database it creates
# is dropped at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
EVENTS="${EVENTS:-300000}"
ROUNDS="${ROUNDS:-2}"
ADMIN_URL="${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:55432/postgres}"
db="claim_lock_$$"
url="${ADMIN_URL%/*}/$db"
cargo build --release -q --bin outbox-relay
psql -qX "$ADMIN_URL" -c "CREATE DATABASE $db"
trap 'psql -qX "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
DATABASE_URL="$url" OUTBOX_RELAY_CONFIG=/dev/null target/release/outbox-relay migrate >/dev/null

drain() { # $1: "" or "FOR UPDATE"
  psql -qX "$url" -c "INSERT INTO outbox (event_type, payload)
    SELECT 'auth.user.logged_in', jsonb_build_object('userId', 'user-' || (g % 1000),
      'ip', '10.0.0.1', 'userAgent', repeat('x', 200))
    FROM generate_series(1, $EVENTS) g" -c "VACUUM ANALYZE outbox" -c "CHECKPOINT"
  psql -qX "$url" 2>&1 <<SQL | sed -n 's/.*NOTICE: *//p'
SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off;
DO \$\$
DECLARE n int; after bigint := 0; total int := 0; t0 timestamptz := clock_timestamp();
        vps smallint[] := (SELECT array_agg(g::smallint) FROM generate_series(0, 255) g);
BEGIN
  LOOP
    WITH d AS (
      DELETE FROM outbox WHERE id = ANY(ARRAY(
        SELECT id FROM outbox WHERE id > after AND available_at <= now()
           AND vpartition = ANY(vps) ORDER BY id LIMIT 4000 $1))
      RETURNING id, event_id, payload::text AS payload, headers::text AS headers)
    SELECT count(*), max(id) INTO n, after FROM d;
    EXIT WHEN n = 0;
    total := total + n;
  END LOOP;
  RAISE NOTICE '%', format('%-30s %s rows in %s s', '${1:-DELETE alone}', total,
    round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3));
END \$\$;
SQL
}

for _ in $(seq "$ROUNDS"); do
  drain ""
  drain "FOR UPDATE"
done
