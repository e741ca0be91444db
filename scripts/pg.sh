#!/usr/bin/env bash
# Local PostgreSQL 15 cluster for development and tests.
#   scripts/pg.sh up|down|status|url
# Data lives in ${OUTBOX_STATE_DIR:-/var/tmp/outbox-relay}/pg, port ${OUTBOX_PG_PORT:-55432}.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=pg
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

PG_BIN="${OUTBOX_PG_BIN:-/usr/lib/postgresql/15/bin}"
PGDATA="$OUTBOX_STATE_DIR/pg"
# Socket and log sit outside PGDATA because PGDATA must be mode 0700,
# which would stop non-postgres users from reaching the socket.
PG_RUN="$OUTBOX_STATE_DIR/pg-run"
PG_LOG="$PG_RUN/postgres.log"
PG_URL="postgres://postgres@127.0.0.1:${OUTBOX_PG_PORT}/postgres"
START_TIMEOUT="${OUTBOX_PG_START_TIMEOUT:-60}"

usage() {
  echo "usage: $0 up|down|status|url" >&2
  exit 2
}

# The server refuses to run as root, so everything touching PGDATA runs as `postgres`.
# `cd /` because postgres cannot read root's cwd and initdb/pg_ctl warn about it.
as_postgres() {
  if [[ "$(id -un)" == postgres ]]; then
    (cd / && "$@")
  elif [[ "$(id -u)" == 0 ]]; then
    (cd / && runuser -u postgres -- "$@")
  else
    die "must run as root or as the postgres user (running as $(id -un))"
  fi
}

check_prereqs() {
  [[ -x "$PG_BIN/pg_ctl" && -x "$PG_BIN/initdb" ]] ||
    die "PostgreSQL 15 server binaries not found in $PG_BIN (apt-get install postgresql-15, or set OUTBOX_PG_BIN)"
  id postgres >/dev/null 2>&1 || die "OS user 'postgres' does not exist (it comes with the postgresql-15 package)"
  # Unix socket paths are capped at 107 bytes by the kernel.
  local sock="$PG_RUN/.s.PGSQL.$OUTBOX_PG_PORT"
  ((${#sock} < 100)) || die "socket path $sock is too long for a Unix socket; use a shorter OUTBOX_STATE_DIR"
}

pg_ready() {
  "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$OUTBOX_PG_PORT" -d postgres -U postgres -t 2
}

# True when the postmaster of *our* data directory is alive (not just anything on the port).
our_server_running() {
  [[ -f "$PGDATA/postmaster.pid" ]] || return 1
  as_postgres "$PG_BIN/pg_ctl" status -D "$PGDATA" >/dev/null 2>&1
}

prepare_dirs() {
  if [[ ! -d "$OUTBOX_STATE_DIR" ]]; then
    mkdir -p "$OUTBOX_STATE_DIR"
    chmod 755 "$OUTBOX_STATE_DIR"
  fi
  if [[ "$(id -u)" == 0 ]]; then
    install -d -m 755 -o postgres -g postgres "$PG_RUN"
    [[ ! -e "$PGDATA" ]] || chown postgres:postgres "$PGDATA"
  else
    mkdir -p "$PG_RUN"
  fi
  as_postgres test -w "$PG_RUN" ||
    die "user postgres cannot write $PG_RUN; every directory above it must be traversable (chmod o+x)"
}

init_cluster() {
  if [[ -f "$PGDATA/PG_VERSION" ]]; then
    local v
    v="$(cat "$PGDATA/PG_VERSION")"
    [[ "$v" == 15 ]] || die "$PGDATA holds a PostgreSQL $v cluster, expected 15; remove it to start afresh"
    return 0
  fi
  [[ ! -e "$PGDATA" ]] || die "$PGDATA exists but holds no cluster (no PG_VERSION); remove it to start afresh"

  # initdb into a scratch directory and rename, so an interrupted initdb never
  # leaves a half-built cluster that later runs would trip over.
  local tmp="$OUTBOX_STATE_DIR/pg.initdb-tmp"
  rm -rf "$tmp"
  # Created here because the state dir belongs to root and postgres cannot create entries in it.
  if [[ "$(id -u)" == 0 ]]; then
    install -d -m 700 -o postgres -g postgres "$tmp"
  else
    mkdir -m 700 "$tmp"
  fi
  log "initdb $PGDATA"
  # Trust auth on purpose: a throwaway dev/test cluster bound to 127.0.0.1 only.
  # Never copy these settings to anything reachable from another host.
  if ! as_postgres "$PG_BIN/initdb" -D "$tmp" -U postgres -E UTF8 --locale=C \
      --auth-local=trust --auth-host=trust >"$PG_RUN/initdb.log" 2>&1; then
    show_log_tail "$PG_RUN/initdb.log"
    die "initdb failed; see $PG_RUN/initdb.log"
  fi
  cat >>"$tmp/postgresql.conf" <<'EOF'

# Settings owned by scripts/pg.sh, rewritten on every `up`.
include_if_exists = 'outbox-relay.conf'
EOF
  mv "$tmp" "$PGDATA"
}

# TLS with the suite's certificates (scripts/tls.sh, in $OUTBOX_STATE_DIR/certs):
# clients may use sslmode=verify-full with sslrootcert=$OUTBOX_STATE_DIR/certs/ca.crt;
# plain connections still work.
install_certs() {
  local certs="$OUTBOX_STATE_DIR/certs"
  bash "$SCRIPT_DIR/tls.sh" make "$certs"
  local f
  for f in server.crt server.key; do
    if [[ "$(id -u)" == 0 ]]; then
      install -m 600 -o postgres -g postgres "$certs/$f" "$PGDATA/$f"
    else
      install -m 600 "$certs/$f" "$PGDATA/$f"
    fi
  done
}

write_conf() {
  local conf
  install_certs
  conf="$(mktemp)"
  cat >"$conf" <<EOF
# Written by scripts/pg.sh on every start; edits here are lost.
listen_addresses = '127.0.0.1'
port = $OUTBOX_PG_PORT
unix_socket_directories = '$PG_RUN'
max_connections = 400
shared_buffers = 1GB
# A Debezium benchmark peer streams changes through logical decoding.
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
log_line_prefix = '%m [%p] %q%u@%d '
log_timezone = 'UTC'
timezone = 'UTC'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
EOF
  if [[ "$(id -u)" == 0 ]]; then
    install -m 644 -o postgres -g postgres "$conf" "$PGDATA/outbox-relay.conf"
  else
    cp "$conf" "$PGDATA/outbox-relay.conf"
  fi
  rm -f "$conf"
}

cmd_up() {
  check_prereqs
  take_lock pg
  prepare_dirs

  if our_server_running; then
    if pg_ready; then
      # A server started before TLS was configured takes it on reload.
      write_conf
      as_postgres "$PG_BIN/pg_ctl" reload -D "$PGDATA" >/dev/null 2>&1 || true
      log "already running on 127.0.0.1:$OUTBOX_PG_PORT"
      return 0
    fi
    log "postmaster is up but not accepting connections yet; waiting"
  else
    if pg_ready; then
      die "something else already answers on 127.0.0.1:$OUTBOX_PG_PORT (not the cluster in $PGDATA); stop it or set OUTBOX_PG_PORT"
    fi
    init_cluster
    write_conf
    log "starting on 127.0.0.1:$OUTBOX_PG_PORT (log: $PG_LOG)"
    # 9>&- : the postmaster must not inherit the lock descriptor.
    if ! as_postgres "$PG_BIN/pg_ctl" start -D "$PGDATA" -l "$PG_LOG" -w -t "$START_TIMEOUT" 9>&- >/dev/null; then
      show_log_tail "$PG_LOG"
      die "PostgreSQL failed to start; see $PG_LOG"
    fi
  fi

  local deadline=$((SECONDS + START_TIMEOUT))
  until pg_ready; do
    if ((SECONDS >= deadline)); then
      show_log_tail "$PG_LOG"
      die "PostgreSQL did not accept connections on 127.0.0.1:$OUTBOX_PG_PORT within ${START_TIMEOUT}s; see $PG_LOG"
    fi
    sleep 0.2
  done
  log "ready: $PG_URL"
}

cmd_down() {
  check_prereqs
  take_lock pg
  if ! our_server_running; then
    log "not running"
    return 0
  fi
  log "stopping"
  # fast = roll back open transactions and disconnect; fall back to immediate
  # (crash-like, recovered on next start) if a backend refuses to go away.
  if ! as_postgres "$PG_BIN/pg_ctl" stop -D "$PGDATA" -m fast -w -t 30 >/dev/null 2>&1; then
    log "fast shutdown timed out; forcing immediate shutdown"
    if ! as_postgres "$PG_BIN/pg_ctl" stop -D "$PGDATA" -m immediate -w -t 30 >/dev/null; then
      show_log_tail "$PG_LOG"
      die "could not stop PostgreSQL; see $PG_LOG"
    fi
  fi
  log "stopped"
}

cmd_status() {
  check_prereqs
  if our_server_running && pg_ready; then
    echo "pg: running on 127.0.0.1:$OUTBOX_PG_PORT ($PG_URL), data $PGDATA"
  elif our_server_running; then
    echo "pg: starting or unhealthy (postmaster alive, not accepting connections), log $PG_LOG"
    return 1
  else
    echo "pg: stopped"
    return 3
  fi
}

[[ $# -ge 1 ]] || usage
case "$1" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  url) echo "$PG_URL" ;;
  *) usage ;;
esac
