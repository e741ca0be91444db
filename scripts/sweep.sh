#!/usr/bin/env bash
# Removes what test and benchmark runs leave on the local services: their
# databases (t_<ulid>, bench_<id>, scale_drain_<pid>_<n>, claim_lock_<pid>), the
# test login roles of those databases (t_<ulid>_<what>)
# and their topics (t<ulid>., o<ulid>., missing<ulid>., bench<id>r./d.,
# sd<pid>k<n>. prefixes). Every test gets its own database and topics and
# nothing drops them while a test binary may still read them,
# so scripts/test.sh sweeps before and after the suite. A broker that keeps
# thousands of stale partitions takes minutes to start.
#   scripts/sweep.sh            # both services must be up
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=sweep
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

PG_URL="$(bash "$SCRIPT_DIR/pg.sh" url)"
need_cmd psql "install the PostgreSQL client (apt-get install postgresql-client-15)"

t0=$(now_ms)
dbs="$(psql -X -q -At -d "$PG_URL" -c \
  "SELECT datname FROM pg_database WHERE datname ~ '^(t_01[0-9a-z]{24}|bench_[0-9a-z]+|scale_drain_[0-9]+_[0-9]+|claim_lock_[0-9]+)$'")"
n_db=0
for db in $dbs; do
  # FORCE: a test that panicked may have left a pool connected.
  psql -X -q -d "$PG_URL" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  n_db=$((n_db + 1))
done

# Test login roles (t_<ulid>_<what>) are cluster-wide: they go once their
# database has (its grants and mappings went with it). One statement for all:
# a psql per role takes minutes after a full suite.
role_re='^t_01[0-9a-z]{24}_[a-z0-9_]+$'
count_roles() {
  psql -X -q -At -d "$PG_URL" -c "SELECT count(*) FROM pg_roles WHERE rolname ~ '$role_re'"
}
roles_before="$(count_roles)"
psql -X -q -d "$PG_URL" >/dev/null <<SQL
DO \$\$
DECLARE
    r name;
BEGIN
    FOR r IN SELECT rolname FROM pg_roles
              WHERE rolname ~ '$role_re'
                AND NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = substr(rolname, 1, 28))
    LOOP
        BEGIN
            EXECUTE format('DROP ROLE %I', r);
        EXCEPTION WHEN dependent_objects_still_exist THEN
            NULL; -- still granted something somewhere: left for a later sweep
        END;
    END LOOP;
END
\$\$;
SQL
n_roles=$((roles_before - $(count_roles)))

topic_re='^((t|o|missing)01[0-9a-z]{24}|bench[0-9a-z]+[rd]|sd[0-9]+k[0-9]+)[.].*'
topics="$(bash "$SCRIPT_DIR/kafka.sh" topics --list 2>/dev/null | grep -E "$topic_re" || true)"
n_topics=0
if [[ -n "$topics" ]]; then
  n_topics="$(wc -l <<<"$topics")"
  # One admin call with a regex instead of one JVM per topic.
  bash "$SCRIPT_DIR/kafka.sh" topics --delete --if-exists --topic "$topic_re" >/dev/null
fi
log "dropped $n_db databases and $n_roles roles and deleted $n_topics topics in $(( ($(now_ms) - t0) / 1000 ))s"
