# shellcheck shell=bash
# Shared helpers for scripts/pg.sh, scripts/kafka.sh and scripts/services.sh.
# Sourced, never executed; the caller has already done `set -euo pipefail`.

OUTBOX_STATE_DIR="${OUTBOX_STATE_DIR:-/var/tmp/outbox-relay}"
OUTBOX_CACHE_DIR="${OUTBOX_CACHE_DIR:-${HOME:-/root}/.cache/outbox-relay}"
OUTBOX_PG_PORT="${OUTBOX_PG_PORT:-55432}"
OUTBOX_KAFKA_PORT="${OUTBOX_KAFKA_PORT:-19092}"
OUTBOX_KAFKA_CONTROLLER_PORT="${OUTBOX_KAFKA_CONTROLLER_PORT:-19093}"

# Prefixed with the script name so interleaved output from services.sh stays readable.
log() { printf '[%s] %s\n' "${LOG_TAG:-services}" "$*" >&2; }

die() {
  printf '[%s] ERROR: %s\n' "${LOG_TAG:-services}" "$*" >&2
  exit 1
}

# Prints the end of a log file to stderr so a CI failure is diagnosable from its output alone.
show_log_tail() {
  local file="$1" lines="${2:-40}"
  if [[ -r "$file" ]]; then
    printf -- '----- last %s lines of %s -----\n' "$lines" "$file" >&2
    tail -n "$lines" "$file" >&2 || true
    printf -- '----- end of %s -----\n' "$file" >&2
  else
    printf '(no log file at %s)\n' "$file" >&2
  fi
}

# bash's /dev/tcp avoids depending on nc/ss; `timeout` guards against a SYN that never gets answered.
tcp_open() {
  timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

now_ms() { date +%s%3N; }

# Serialises concurrent up/down calls (e.g. parallel test binaries) on one service.
# The descriptor must be closed in anything left running in the background,
# otherwise the daemon keeps the lock and the next `down` blocks forever.
take_lock() {
  local name="$1"
  local file="$OUTBOX_STATE_DIR/.$name.lock"
  mkdir -p "$OUTBOX_STATE_DIR"
  # Opened read-only so a different user (root vs postgres) can still lock a file the other created.
  [[ -e "$file" ]] || { : >>"$file" && chmod 644 "$file"; } || die "cannot create lock file $file"
  exec 9<"$file"
  if ! flock -w 120 9; then
    die "another $name up/down has held $OUTBOX_STATE_DIR/.$name.lock for 120 s"
  fi
}

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH; $2"
}
