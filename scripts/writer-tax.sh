#!/usr/bin/env bash
# The writer tax of the publisher trigger: single-row INSERT transactions per
# second into the outbox, as a mapped writer login role, with pgbench, with
# and without the outbox_stamp_publisher trigger.
#
#   bash scripts/writer-tax.sh            # 8 clients, 3 rounds of 15 s per variant
#   CLIENTS=8 ROUNDS=5 SECONDS_PER_RUN=20 bash scripts/writer-tax.sh
#
# Works on a scratch database (created from migrations/*.sql, dropped at the
# end) of the local PostgreSQL that scripts/services.sh starts. Variants run
# interleaved, each on an emptied outbox after a checkpoint, and the median of
# the rounds is reported, so a noisy neighbour skews both sides alike.
# Variants: `all` = every insert trigger enabled; `no_publisher` = only
# outbox_stamp_publisher disabled; `none` = every user trigger disabled;
# `notify` = every trigger plus the optional NOTIFY wake-ups
# (outbox_enable_notify()).
# The tax is no_publisher → all. Because tx/s on a shared machine is noisy,
# the trigger's own CPU time per row is printed too (EXPLAIN ANALYZE).
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$SCRIPT_DIR/.."
LOG_TAG=writer-tax
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

CLIENTS="${CLIENTS:-8}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-3}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-15}"
ADMIN_URL="${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:${OUTBOX_PG_PORT}/postgres}"

command -v pgbench >/dev/null || die "pgbench not found (apt-get install postgresql-client-15)"
bash scripts/pg.sh status >/dev/null || die "PostgreSQL is not running: bash scripts/services.sh up"

db="writer_tax_$$"
role="writer_tax_$$"
db_url="${ADMIN_URL%/*}/$db"
# The same database as the writer role (the local server trusts every role).
writer_url="${db_url/:\/\/*@/:\/\/$role@}"
[[ "$writer_url" == *"://$role@"* ]] || die "cannot set the user in $ADMIN_URL (expected postgres://USER@HOST:PORT/DB)"
work="$(mktemp -d)"

cleanup() {
  psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  psql -q "$ADMIN_URL" -c "DROP ROLE IF EXISTS $role" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

on_db() { psql -q -X -v ON_ERROR_STOP=1 "$db_url" "$@"; }

log "scratch database $db, writer role $role"
psql -q -X -v ON_ERROR_STOP=1 "$ADMIN_URL" -c "CREATE DATABASE $db"
for f in migrations/*.sql; do
  on_db -f "$f" >/dev/null
done
# What `outbox-relay catalog sync` writes for the event used here.
on_db >/dev/null <<SQL
INSERT INTO outbox_catalog (event_type, publisher, topic, schema_version, partition_key, vpartitions)
VALUES ('money.wallet.credited', 'money', 'platform.money.events', '1.0.0', 'userId', 256);
CREATE ROLE $role LOGIN IN ROLE outbox_writer;
SELECT FROM outbox_map_publisher('$role', 'money');
SQL

cat >"$work/insert.sql" <<'SQL'
INSERT INTO outbox (event_type, payload) VALUES ('money.wallet.credited',
  '{"txId": "01j9patx500000000000000", "userId": "01j9pa5mz700000000000000", "amountCents": 10000, "currency": "USD"}');
SQL

prepare() {
  on_db -c "ALTER TABLE outbox ENABLE TRIGGER USER" -c "SELECT FROM outbox_disable_notify()"
  case "$1" in
    all) ;;
    notify) on_db -c "SELECT FROM outbox_enable_notify()" ;;
    no_publisher) on_db -c "ALTER TABLE outbox DISABLE TRIGGER outbox_stamp_publisher" ;;
    none) on_db -c "ALTER TABLE outbox DISABLE TRIGGER USER" ;;
  esac
  on_db -c "TRUNCATE outbox" -c "VACUUM ANALYZE outbox" -c "CHECKPOINT"
}

# CPU cost of the trigger itself, from EXPLAIN ANALYZE of a 20000-row insert
# as the writer role: milliseconds spent in outbox_stamp_publisher.
trigger_ms() {
  on_db -c "TRUNCATE outbox"
  psql -X -At "$writer_url" -c "EXPLAIN (ANALYZE, COSTS OFF) INSERT INTO outbox (event_type, payload)
      SELECT 'money.wallet.credited', '{\"txId\": \"t\", \"userId\": \"u\", \"amountCents\": 1, \"currency\": \"USD\"}'
      FROM generate_series(1, 20000)" |
    sed -n 's/^Trigger outbox_stamp_publisher: time=\([0-9.]*\) calls=20000$/\1/p'
}

run() {
  pgbench -n -M prepared -c "$CLIENTS" -j "$THREADS" -T "$SECONDS_PER_RUN" \
    -f "$work/insert.sql" "$writer_url" 2>&1 |
    sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p'
}

variants=(all no_publisher none notify)
for v in "${variants[@]}"; do : >"$work/$v"; done
: >"$work/trigger_ms"
for round in $(seq 1 "$ROUNDS"); do
  prepare all
  ms="$(trigger_ms)"
  [[ -n "$ms" ]] || die "EXPLAIN ANALYZE printed no time for outbox_stamp_publisher"
  echo "$ms" >>"$work/trigger_ms"
  # Rotate the order so no variant always runs first (or last) in a round.
  for i in "${!variants[@]}"; do
    v="${variants[$(((i + round) % ${#variants[@]}))]}"
    prepare "$v"
    tps="$(run)"
    [[ -n "$tps" ]] || die "pgbench printed no tps for variant $v"
    echo "$tps" >>"$work/$v"
    log "round $round: $v $tps tx/s"
  done
done

median() { sort -n "$1" | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
all="$(median "$work/all")"
no_pub="$(median "$work/no_publisher")"
none="$(median "$work/none")"
notify="$(median "$work/notify")"
tax="$(awk -v a="$all" -v b="$no_pub" 'BEGIN {printf "%.1f", (b - a) / b * 100}')"
printf 'clients=%s rounds=%s seconds=%s (medians, single-row INSERT transactions/s)\n' \
  "$CLIENTS" "$ROUNDS" "$SECONDS_PER_RUN"
printf '  with every insert trigger           %10.1f tx/s\n' "$all"
printf '  without outbox_stamp_publisher      %10.1f tx/s\n' "$no_pub"
printf '  without any insert trigger          %10.1f tx/s\n' "$none"
printf '  every trigger + NOTIFY wake-ups     %10.1f tx/s\n' "$notify"
printf 'publisher trigger writer tax: %s %%\n' "$tax"
printf 'NOTIFY wake-ups writer tax: %s %%\n' "$(awk -v a="$notify" -v b="$all" 'BEGIN {printf "%.1f", (b - a) / b * 100}')"
# The least of the rounds: contention only ever adds time.
printf 'outbox_stamp_publisher CPU per row: %s us (EXPLAIN ANALYZE, 20000-row insert, best of %s)\n' \
  "$(sort -n "$work/trigger_ms" | head -1 | awk '{printf "%.1f", $1 * 1000 / 20000}')" "$ROUNDS"
