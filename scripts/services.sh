#!/usr/bin/env bash
# All local services the relay needs: PostgreSQL (scripts/pg.sh) and Kafka (scripts/kafka.sh).
#   scripts/services.sh up|down|status|env
#   eval "$(scripts/services.sh env)"   # exports the connection settings for tests
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=services
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

usage() {
  echo "usage: $0 up|down|status|env" >&2
  exit 2
}

cmd_up() {
  local t0
  t0=$(now_ms)
  bash "$SCRIPT_DIR/pg.sh" up || die "PostgreSQL did not come up (scripts/pg.sh up failed; its message is above)"
  bash "$SCRIPT_DIR/kafka.sh" up || die "Kafka did not come up (scripts/kafka.sh up failed; its message is above)"
  local ms=$(( $(now_ms) - t0 ))
  log "all services up in $((ms / 1000)).$(( (ms % 1000) / 100 ))s"
}

# Both are attempted even if one fails, so a broken Kafka never leaves PostgreSQL running.
cmd_down() {
  local rc=0
  bash "$SCRIPT_DIR/kafka.sh" down || { log "scripts/kafka.sh down failed"; rc=1; }
  bash "$SCRIPT_DIR/pg.sh" down || { log "scripts/pg.sh down failed"; rc=1; }
  return "$rc"
}

cmd_status() {
  local rc=0
  bash "$SCRIPT_DIR/pg.sh" status || rc=$?
  bash "$SCRIPT_DIR/kafka.sh" status || rc=$?
  return "$rc"
}

cmd_env() {
  local db_url
  db_url="$(bash "$SCRIPT_DIR/pg.sh" url)"
  printf 'export OUTBOX_TEST_DATABASE_URL=%q\n' "$db_url"
  printf 'export DATABASE_URL=%q\n' "$db_url"
  printf 'export OUTBOX_TEST_KAFKA=%q\n' "$(bash "$SCRIPT_DIR/kafka.sh" bootstrap)"
}

[[ $# -ge 1 ]] || usage
case "$1" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *) usage ;;
esac
