#!/usr/bin/env bash
# What partitioning processed_event_ids (migration 0008) costs the consumer
# kit's dedupe insert: single-row `INSERT … ON CONFLICT DO NOTHING`
# transactions as a mapped consumer login role (row security on), with
# pgbench, into the partitioned table and into a plain table of the same
# shape (same primary key, same policy), each holding ROWS dedupe rows of 8
# consumers spread over the last 12 months (one partition per month).
#
#   bash bench/scripts/dedupe-partitioning.sh                  # 10 M rows, 3 rounds of 20 s
#   ROWS=100000000 bash bench/scripts/dedupe-partitioning.sh   # 100 M rows (22 GB of disk, about 25 minutes to fill here)
#
# Each round runs both tables, alternating, twice: with the server's
# synchronous_commit (what a consumer's transaction pays: the WAL flush
# dominates) and with synchronous_commit = off (so the partition routing's
# CPU cost is not hidden behind the flush). Prints inserts/s and the p99
# latency (from pgbench's per-transaction log) per round, then the medians.
# Uses the local PostgreSQL of scripts/services.sh; the scratch database it
# creates is dropped at the end.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROWS="${ROWS:-10000000}"
ROUNDS="${ROUNDS:-3}"
SECONDS_PER_RUN="${SECONDS_PER_RUN:-20}"
CLIENTS="${CLIENTS:-4}"
THREADS="${THREADS:-2}"
ADMIN_URL="${OUTBOX_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:55432/postgres}"
command -v pgbench >/dev/null || { echo "pgbench not found (apt-get install postgresql-client-15)" >&2; exit 1; }

db="dedupe_part_$$"
role="dedupe_part_$$"
url="${ADMIN_URL%/*}/$db"
consumer_url="${url/:\/\/*@/:\/\/$role@}"
work="$(mktemp -d)"
cleanup() {
  psql -qX "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  psql -qX "$ADMIN_URL" -c "DROP ROLE IF EXISTS $role" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '[dedupe-partitioning] %s\n' "$*" >&2; }
on_db() { psql -qX -v ON_ERROR_STOP=1 "$url" "$@"; }

psql -qX -v ON_ERROR_STOP=1 "$ADMIN_URL" -c "CREATE DATABASE $db"
for f in migrations/*.sql; do on_db -1 -f "$f" >/dev/null; done
on_db >/dev/null <<SQL
-- The 12 past months' partitions, as a year of relay uptime leaves them.
SELECT outbox_dedupe_partitions_ensure(0, now() - make_interval(months => m)) FROM generate_series(1, 12) m;
-- The same table unpartitioned, with the same key, policy and grants.
CREATE TABLE dedupe_plain (LIKE processed_event_ids INCLUDING DEFAULTS);
ALTER TABLE dedupe_plain ADD PRIMARY KEY (consumer, event_id);
ALTER TABLE dedupe_plain ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_consumer ON dedupe_plain FOR ALL TO outbox_consumer
    USING (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user))
    WITH CHECK (consumer IN (SELECT m.consumer FROM outbox_consumer_roles m WHERE m.role_name = current_user));
GRANT SELECT, INSERT ON dedupe_plain TO outbox_consumer;
CREATE ROLE $role LOGIN IN ROLE outbox_consumer;
SELECT outbox_map_consumer('$role', 'c' || g) FROM generate_series(0, 7) g;
-- The benchmark's new event ids: ULIDs of now (a scratch database only).
GRANT EXECUTE ON FUNCTION outbox_ulid() TO $role;
SQL

# Rows in time order, 1 M per statement, the primary keys built afterwards:
# the tables a year of consumers leaves, without a year of index inserts.
chunks=$(( (ROWS + 999999) / 1000000 ))
say "filling both tables with $ROWS rows ($chunks chunks)"
on_db -c "ALTER TABLE processed_event_ids DROP CONSTRAINT processed_event_ids_pkey" \
      -c "ALTER TABLE dedupe_plain DROP CONSTRAINT dedupe_plain_pkey"
for table in processed_event_ids dedupe_plain; do
  started=$(date +%s)
  for ((k = 0; k < chunks; k++)); do
    n=$(( ROWS - k * 1000000 < 1000000 ? ROWS - k * 1000000 : 1000000 ))
    # One ULID time prefix per 1 000 rows (the function is the fill's cost).
    # One ULID time prefix per 1 000 rows, computed once (MATERIALIZED:
    # otherwise the plan may call the function for every row).
    on_db -c "WITH p AS MATERIALIZED (
        SELECT n, t, substr(outbox_ulid_floor(t), 1, 10) AS prefix
          FROM (SELECT n, now() - interval '365 days' * (1 - ($k * 1000000 + n * 1000)::float8 / $ROWS) AS t
                  FROM generate_series(0, $n / 1000 - 1) n) s)
      INSERT INTO $table (consumer, event_id, processed_at)
      SELECT 'c' || (q % 8), p.prefix || substr(md5(p.n::text || ':' || q || ':$k'), 1, 16), p.t
        FROM p CROSS JOIN generate_series(1, 1000) q"
  done
  on_db -c "SET maintenance_work_mem = '512MB'" -c "ALTER TABLE $table ADD PRIMARY KEY (consumer, event_id)"
  say "$table filled and indexed in $(( $(date +%s) - started )) s"
done
on_db -c "VACUUM ANALYZE processed_event_ids" -c "VACUUM ANALYZE dedupe_plain" -c "CHECKPOINT"
on_db -At -c "SELECT 'size: processed_event_ids ' || pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits WHERE inhparent = 'processed_event_ids'::regclass" \
          -c "SELECT 'size: dedupe_plain ' || pg_size_pretty(pg_total_relation_size('dedupe_plain'))" >&2

for table in processed_event_ids dedupe_plain; do
  cat >"$work/$table.sql" <<SQL
\set c random(0, 7)
INSERT INTO $table (consumer, event_id) VALUES ('c' || :c, outbox_ulid()) ON CONFLICT DO NOTHING;
SQL
done

results="$work/results"
: >"$results"
run() { # $1 table, $2 sync mode, $3 round
  local logdir="$work/log-$1-$2-$3"
  mkdir -p "$logdir"
  local out
  out=$( cd "$logdir" && PGOPTIONS="-c synchronous_commit=$2" pgbench -n -c "$CLIENTS" -j "$THREADS" \
          -T "$SECONDS_PER_RUN" -f "$work/$1.sql" --log --log-prefix=tx "$consumer_url" 2>&1 )
  local tps p99
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
  # Field 3 of pgbench's per-transaction log: latency in microseconds.
  p99=$(cat "$logdir"/tx.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int(NR*0.99)]/1000}')
  printf '%s %s %s %.0f %.2f\n' "$2" "$1" "$3" "$tps" "$p99" | tee -a "$results" >&2
}

say "$ROUNDS rounds of ${SECONDS_PER_RUN}s, $CLIENTS clients, alternating tables (mode table round inserts/s p99_ms)"
for ((r = 1; r <= ROUNDS; r++)); do
  for mode in on off; do
    if (( r % 2 )); then order="processed_event_ids dedupe_plain"; else order="dedupe_plain processed_event_ids"; fi
    for table in $order; do
      run "$table" "$mode" "$r"
    done
  done
done

echo
echo "rows per table: $ROWS; $CLIENTS clients; median of $ROUNDS rounds of ${SECONDS_PER_RUN}s"
printf '%-18s %-22s %12s %10s\n' synchronous_commit table inserts/s p99_ms
for mode in on off; do
  for table in dedupe_plain processed_event_ids; do
    tps=$(awk -v m="$mode" -v t="$table" '$1 == m && $2 == t {print $4}' "$results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    p99=$(awk -v m="$mode" -v t="$table" '$1 == m && $2 == t {print $5}' "$results" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    printf '%-18s %-22s %12s %10s\n' "$mode" "$table" "$tps" "$p99"
  done
done
