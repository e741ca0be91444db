#!/usr/bin/env bash
# Local single-node Apache Kafka 4.x broker (KRaft, broker+controller in one JVM).
#   scripts/kafka.sh up|down|status|bootstrap
#   scripts/kafka.sh console-consumer ARGS...   (--bootstrap-server is filled in)
#   scripts/kafka.sh console-producer ARGS...
#   scripts/kafka.sh topics ARGS...             (TopicCommand: --create/--list/--describe/--delete)
#   scripts/kafka.sh libs                       (fetches the jars if needed; prints their directory)
# Jars come from Maven Central via scripts/kafka/pom.xml and are cached in
# ${OUTBOX_CACHE_DIR:-~/.cache/outbox-relay}/kafka-<version>; data lives in
# ${OUTBOX_STATE_DIR:-/var/tmp/outbox-relay}/kafka and survives down/up.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=kafka
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

POM="$SCRIPT_DIR/kafka/pom.xml"
# Another template (scripts/kafka/server-tls.properties for the TLS/SASL
# broker of scripts/tls-env.sh) may add listeners; @SSL_PORT@,
# @SASL_SSL_PORT@ and @TLS_DIR@ are filled in from OUTBOX_KAFKA_SSL_PORT,
# OUTBOX_KAFKA_SASL_SSL_PORT and OUTBOX_TLS_DIR.
PROPS_TEMPLATE="${OUTBOX_KAFKA_PROPS_TEMPLATE:-$SCRIPT_DIR/kafka/server.properties}"
LOG4J_CONF="$SCRIPT_DIR/kafka/log4j2.properties"

KAFKA_VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM" | head -n1)"
[[ -n "$KAFKA_VERSION" ]] || die "cannot read <kafka.version> from $POM"

CACHE="$OUTBOX_CACHE_DIR/kafka-$KAFKA_VERSION"
LIBS="$CACHE/libs"
JARS_MARKER="$CACHE/complete.sha256"

KSTATE="$OUTBOX_STATE_DIR/kafka"
DATA_DIR="$KSTATE/data"
LOG_DIR="$KSTATE/logs"
SERVER_LOG="$LOG_DIR/server.log"
# The JVM's own stdout/stderr: crashes before logging is set up land here.
STDOUT_LOG="$LOG_DIR/kafka.out"
PROPS="$KSTATE/server.properties"
PID_FILE="$KSTATE/kafka.pid"
CLUSTER_ID_FILE="$KSTATE/cluster.id"
FORMAT_MARK="$KSTATE/formatted-controller-port"

BOOTSTRAP="127.0.0.1:$OUTBOX_KAFKA_PORT"
# A broker with many partitions on disk spends minutes loading them before it
# opens its port. START_TIMEOUT is how long it may go without writing a log
# line; START_MAX bounds the whole start-up however busy it looks.
START_TIMEOUT="${OUTBOX_KAFKA_START_TIMEOUT:-120}"
START_MAX="${OUTBOX_KAFKA_START_MAX:-900}"
STOP_TIMEOUT=30

JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
BROKER_JVM_OPTS=(
  -Xms256m -Xmx768m
  -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
  -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
)
# CLI tools are short-lived: C1 only and the serial GC cut JVM start-up by a good second.
TOOL_JVM_OPTS=(
  -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$LOG4J_CONF"
  -Doutbox.kafka.log.appender=Stderr -Doutbox.kafka.log.level=WARN
)

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------- jars

jars_complete() {
  [[ -f "$JARS_MARKER" && -f "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] &&
    [[ "$(cat "$JARS_MARKER")" == "$(sha256sum "$POM" | cut -d' ' -f1)" ]]
}

ensure_jars() {
  jars_complete && return 0
  need_cmd "$JAVA" "install a Java 17+ runtime (apt-get install openjdk-17-jre-headless)"
  need_cmd mvn "install Maven (apt-get install maven); it fetches the Kafka jars"
  mkdir -p "$CACHE"
  # Separate from the up/down lock so console-consumer can fetch without a running broker.
  [[ -e "$CACHE/.fetch.lock" ]] || : >>"$CACHE/.fetch.lock"
  exec 8<"$CACHE/.fetch.lock"
  flock -w 600 8 || die "timed out waiting for another jar download into $CACHE"
  if jars_complete; then exec 8<&-; return 0; fi

  local sum tmp mvn_log="$CACHE/mvn.log"
  sum="$(sha256sum "$POM" | cut -d' ' -f1)"
  tmp="$CACHE/libs.tmp.$$"
  rm -rf "$tmp"
  log "fetching Kafka $KAFKA_VERSION jars with Maven into $LIBS (log: $mvn_log)"
  local t0
  t0=$(now_ms)
  if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" >"$mvn_log" 2>&1 </dev/null; then
    rm -rf "$tmp"
    show_log_tail "$mvn_log"
    die "Maven could not fetch the Kafka jars for $POM; see $mvn_log"
  fi
  # Swap in a finished directory so a killed download is never mistaken for a cache.
  rm -rf "$LIBS" "$JARS_MARKER"
  mv "$tmp" "$LIBS"
  echo "$sum" >"$JARS_MARKER"
  exec 8<&-
  log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars in $(( ($(now_ms) - t0) / 1000 ))s"
}

run_tool() {
  local cls="$1"
  shift
  "$JAVA" "${TOOL_JVM_OPTS[@]}" -cp "$LIBS/*" "$cls" "$@"
}

# ---------------------------------------------------------------- broker process

# A pid only counts if it is still our broker: pids get reused after a reboot or crash.
is_our_broker() {
  local pid="$1" cmdline
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *" kafka.Kafka $PROPS"* ]]
}

broker_pid() {
  local pid=""
  [[ -f "$PID_FILE" ]] && pid="$(cat "$PID_FILE" 2>/dev/null || true)"
  if is_our_broker "$pid"; then
    echo "$pid"
    return 0
  fi
  # Pid file lost or stale: look for a broker started with our exact config path.
  pid="$(pgrep -f -- " kafka\.Kafka $PROPS\$" | head -n1 || true)"
  if is_our_broker "$pid"; then
    echo "$pid" >"$PID_FILE" 2>/dev/null || true
    echo "$pid"
    return 0
  fi
  return 1
}

render_props() {
  mkdir -p "$KSTATE" "$DATA_DIR" "$LOG_DIR"
  local tmp="$PROPS.tmp.$$"
  sed -e "s|@BROKER_PORT@|$OUTBOX_KAFKA_PORT|g" \
      -e "s|@CONTROLLER_PORT@|$OUTBOX_KAFKA_CONTROLLER_PORT|g" \
      -e "s|@DATA_DIR@|$DATA_DIR|g" \
      -e "s|@SSL_PORT@|${OUTBOX_KAFKA_SSL_PORT:-}|g" \
      -e "s|@SASL_SSL_PORT@|${OUTBOX_KAFKA_SASL_SSL_PORT:-}|g" \
      -e "s|@TLS_DIR@|${OUTBOX_TLS_DIR:-}|g" \
      "$PROPS_TEMPLATE" >"$tmp"
  mv "$tmp" "$PROPS"
}

format_storage() {
  if [[ -f "$DATA_DIR/meta.properties" ]]; then
    # The controller's endpoint is written into the KRaft log at format time.
    if [[ -f "$FORMAT_MARK" && "$(cat "$FORMAT_MARK")" != "$OUTBOX_KAFKA_CONTROLLER_PORT" ]]; then
      die "storage in $DATA_DIR was formatted for controller port $(cat "$FORMAT_MARK"), not $OUTBOX_KAFKA_CONTROLLER_PORT; run 'kafka.sh down' and remove $KSTATE to start afresh"
    fi
    return 0
  fi
  local format_log="$LOG_DIR/format.log" cluster_id
  if [[ -s "$CLUSTER_ID_FILE" ]]; then
    cluster_id="$(cat "$CLUSTER_ID_FILE")"
  else
    cluster_id="$(run_tool kafka.tools.StorageTool random-uuid 2>"$format_log" | tail -n1)" ||
      { show_log_tail "$format_log"; die "kafka.tools.StorageTool random-uuid failed; see $format_log"; }
    [[ -n "$cluster_id" ]] || { show_log_tail "$format_log"; die "kafka.tools.StorageTool random-uuid printed nothing; see $format_log"; }
    echo "$cluster_id" >"$CLUSTER_ID_FILE"
  fi
  log "formatting $DATA_DIR (cluster id $cluster_id)"
  # A half-formatted directory (no meta.properties) makes format refuse to run again.
  find "$DATA_DIR" -mindepth 1 -delete
  # OUTBOX_KAFKA_FORMAT_ARGS: more format options, e.g. SCRAM credentials
  # (--add-scram SCRAM-SHA-512=[name=...,password=...]), written at format time.
  local -a extra=()
  read -r -a extra <<<"${OUTBOX_KAFKA_FORMAT_ARGS:-}"
  if ! run_tool kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$PROPS" \
      "${extra[@]}" >>"$format_log" 2>&1; then
    show_log_tail "$format_log"
    die "kafka.tools.StorageTool format failed; see $format_log"
  fi
  echo "$OUTBOX_KAFKA_CONTROLLER_PORT" >"$FORMAT_MARK"
}

start_broker() {
  log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (log: $SERVER_LOG)"
  printf '\n===== %s kafka.sh up =====\n' "$(date -u +%FT%TZ)" >>"$STDOUT_LOG"
  # setsid + nohup: the broker must outlive the shell, terminal or test process that
  # ran `up`, and must not hold that caller's pipes or our lock descriptors open.
  (
    cd "$KSTATE"
    exec nohup setsid "$JAVA" "${BROKER_JVM_OPTS[@]}" \
      "-Dkafka.logs.dir=$LOG_DIR" "-Dlog4j2.configurationFile=$LOG4J_CONF" \
      -cp "$LIBS/*" kafka.Kafka "$PROPS" \
      >>"$STDOUT_LOG" 2>&1 </dev/null 8<&- 9<&-
  ) &
  echo $! >"$PID_FILE"
}

# A half-started broker is stopped so the next `up` begins from a known state
# instead of inheriting whatever went wrong.
fail_start() {
  show_log_tail "$STDOUT_LOG" 15
  show_log_tail "$SERVER_LOG" 40
  local pid
  if pid="$(broker_pid)"; then
    log "stopping the half-started broker (pid $pid)"
    stop_pid "$pid" || true
  fi
  die "$1; see $SERVER_LOG and $STDOUT_LOG"
}

log_size() { stat -c %s "$SERVER_LOG" 2>/dev/null || echo 0; }

wait_ready() {
  local pid="$1" deadline=$((SECONDS + START_TIMEOUT)) hard=$((SECONDS + START_MAX)) t0
  local size last_size next_note=$((SECONDS + 30))
  t0=$(now_ms)
  last_size="$(log_size)"
  # The broker opens its client port only once it is unfenced, so a TCP connect
  # is a cheap, good signal; each JVM-based check costs ~1-2 s.
  until tcp_open 127.0.0.1 "$OUTBOX_KAFKA_PORT"; do
    is_our_broker "$pid" || fail_start "the Kafka broker (pid $pid) exited during start-up"
    size="$(log_size)"
    if [[ "$size" != "$last_size" ]]; then
      # Still loading logs or replaying metadata: that is progress, not a hang.
      last_size="$size"
      deadline=$((SECONDS + START_TIMEOUT))
    fi
    ((SECONDS < deadline)) ||
      fail_start "Kafka did not open $BOOTSTRAP and wrote nothing to its log for ${START_TIMEOUT}s"
    ((SECONDS < hard)) ||
      fail_start "Kafka did not open $BOOTSTRAP within ${START_MAX}s (OUTBOX_KAFKA_START_MAX); 'scripts/sweep.sh' removes test topics left behind by earlier runs"
    if ((SECONDS >= next_note)); then
      log "still starting after $(( ($(now_ms) - t0) / 1000 ))s: loading $(find "$DATA_DIR" -mindepth 1 -maxdepth 1 -type d -name '*-[0-9]*' | wc -l) partition directories"
      next_note=$((SECONDS + 30))
    fi
    sleep 0.2
  done
  deadline=$((SECONDS + START_TIMEOUT))
  # One real metadata round trip through the admin client.
  local check_log="$LOG_DIR/ready-check.log"
  until timeout 30 "$JAVA" "${TOOL_JVM_OPTS[@]}" -cp "$LIBS/*" org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "$BOOTSTRAP" --list >/dev/null 2>"$check_log"; do
    is_our_broker "$pid" || fail_start "the Kafka broker (pid $pid) exited during start-up"
    if ((SECONDS >= deadline)); then
      show_log_tail "$check_log" 20
      fail_start "Kafka accepts TCP on $BOOTSTRAP but a metadata request (TopicCommand --list) failed for ${START_TIMEOUT}s"
    fi
    sleep 1
  done
  local ms=$(( $(now_ms) - t0 ))
  log "ready: $BOOTSTRAP (pid $pid, answered $((ms / 1000)).$(( (ms % 1000) / 100 ))s after launch)"
}

# ---------------------------------------------------------------- commands

cmd_up() {
  ensure_jars
  take_lock kafka
  local pid
  if pid="$(broker_pid)"; then
    if tcp_open 127.0.0.1 "$OUTBOX_KAFKA_PORT"; then
      log "already running on $BOOTSTRAP (pid $pid)"
      return 0
    fi
    log "broker (pid $pid) is running but $BOOTSTRAP is not open yet; waiting"
    wait_ready "$pid"
    return 0
  fi
  rm -f "$PID_FILE"
  local port
  for port in "$OUTBOX_KAFKA_PORT" "$OUTBOX_KAFKA_CONTROLLER_PORT"; do
    if tcp_open 127.0.0.1 "$port"; then
      die "port 127.0.0.1:$port is taken by another process (not the broker of $KSTATE); stop it or set OUTBOX_KAFKA_PORT / OUTBOX_KAFKA_CONTROLLER_PORT"
    fi
  done
  render_props
  format_storage
  start_broker
  wait_ready "$(cat "$PID_FILE")"
}

# SIGTERM lets the broker flush and close its logs, so the next start skips recovery.
stop_pid() {
  local pid="$1" deadline=$((SECONDS + STOP_TIMEOUT))
  kill -TERM "$pid" 2>/dev/null || true
  while is_our_broker "$pid"; do
    if ((SECONDS >= deadline)); then
      log "still running after ${STOP_TIMEOUT}s; sending SIGKILL (see $SERVER_LOG for why)"
      kill -KILL "$pid" 2>/dev/null || true
      local _
      for _ in $(seq 50); do
        is_our_broker "$pid" || break
        sleep 0.1
      done
      is_our_broker "$pid" && die "broker pid $pid survived SIGKILL"
      break
    fi
    sleep 0.1
  done
  rm -f "$PID_FILE"
}

cmd_down() {
  take_lock kafka
  local pid
  if ! pid="$(broker_pid)"; then
    rm -f "$PID_FILE"
    log "not running"
    return 0
  fi
  log "stopping (pid $pid)"
  stop_pid "$pid"
  log "stopped"
}

cmd_status() {
  local pid
  if pid="$(broker_pid)"; then
    if tcp_open 127.0.0.1 "$OUTBOX_KAFKA_PORT"; then
      echo "kafka: running on $BOOTSTRAP (pid $pid, Kafka $KAFKA_VERSION), data $DATA_DIR"
      return 0
    fi
    echo "kafka: starting or unhealthy (pid $pid, $BOOTSTRAP closed), log $SERVER_LOG"
    return 1
  fi
  echo "kafka: stopped"
  return 3
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift
case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  bootstrap) echo "$BOOTSTRAP" ;;
  libs) ensure_jars && echo "$LIBS" ;;
  console-consumer)
    ensure_jars
    run_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$BOOTSTRAP" "$@"
    ;;
  console-producer)
    ensure_jars
    run_tool org.apache.kafka.tools.ConsoleProducer --bootstrap-server "$BOOTSTRAP" "$@"
    ;;
  topics)
    ensure_jars
    run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$BOOTSTRAP" "$@"
    ;;
  *) usage ;;
esac
