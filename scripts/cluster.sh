#!/usr/bin/env bash
# A three-broker Apache Kafka 4.x cluster on loopback for the broker-fault
# tests (tests/cluster.rs): three KRaft nodes, each broker and controller.
#   scripts/cluster.sh up|down|destroy|status|env|bootstrap
#   scripts/cluster.sh kill N         SIGKILL node N (1-3), as a crash would
#   scripts/cluster.sh stop N         SIGTERM node N: controlled shutdown
#   scripts/cluster.sh start N        start node N and wait for its port
#   scripts/cluster.sh leader TOPIC PARTITION   prints the leader's node id
#   scripts/cluster.sh topics ARGS... TopicCommand against the cluster
# The jars are those of scripts/kafka.sh (same cache). State lives in
# ${OUTBOX_CLUSTER_DIR:-/var/tmp/outbox-relay-cluster} and survives down/up;
# `destroy` stops the nodes and removes it (scripts/test.sh does, at the end).
# Ports: brokers 19111-19113, controllers 19121-19123 (OUTBOX_CLUSTER_PORT
# and OUTBOX_CLUSTER_CONTROLLER_PORT move the first of each).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_TAG=cluster
OUTBOX_CLUSTER_DIR="${OUTBOX_CLUSTER_DIR:-/var/tmp/outbox-relay-cluster}"
# lib.sh's lock helper keeps its lock files in OUTBOX_STATE_DIR.
OUTBOX_STATE_DIR="$OUTBOX_CLUSTER_DIR"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$SCRIPT_DIR/lib.sh"

NODES=(1 2 3)
BROKER_PORT0="${OUTBOX_CLUSTER_PORT:-19111}"
CONTROLLER_PORT0="${OUTBOX_CLUSTER_CONTROLLER_PORT:-19121}"
PROPS_TEMPLATE="$SCRIPT_DIR/kafka/cluster.properties"
LOG4J_CONF="$SCRIPT_DIR/kafka/log4j2.properties"
CLUSTER_ID_FILE="$OUTBOX_CLUSTER_DIR/cluster.id"
# A restarted node replays the metadata log and loads every partition before
# it opens its port, slowly on a busy machine: START_TIMEOUT is how long it
# may go without writing a log line, START_MAX bounds the whole start.
START_TIMEOUT="${OUTBOX_CLUSTER_START_TIMEOUT:-120}"
START_MAX="${OUTBOX_CLUSTER_START_MAX:-600}"
STOP_TIMEOUT=60

JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
# Small heaps: three brokers share the machine with PostgreSQL and the shared broker.
BROKER_JVM_OPTS=(
  -Xms192m -Xmx384m
  -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
  -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true
)
TOOL_JVM_OPTS=(
  -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Djava.awt.headless=true
  "-Dlog4j2.configurationFile=$LOG4J_CONF"
  -Doutbox.kafka.log.appender=Stderr -Doutbox.kafka.log.level=WARN
)

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

broker_port() { echo $((BROKER_PORT0 + $1 - 1)); }
controller_port() { echo $((CONTROLLER_PORT0 + $1 - 1)); }
node_dir() { echo "$OUTBOX_CLUSTER_DIR/node$1"; }
props() { echo "$(node_dir "$1")/server.properties"; }
pid_file() { echo "$(node_dir "$1")/kafka.pid"; }
server_log() { echo "$(node_dir "$1")/logs/server.log"; }
stdout_log() { echo "$(node_dir "$1")/logs/kafka.out"; }

bootstrap() {
  local n out=()
  for n in "${NODES[@]}"; do out+=("127.0.0.1:$(broker_port "$n")"); done
  (IFS=,; echo "${out[*]}")
}

voters() {
  local n out=()
  for n in "${NODES[@]}"; do out+=("$n@127.0.0.1:$(controller_port "$n")"); done
  (IFS=,; echo "${out[*]}")
}

check_node() {
  [[ "${1:-}" =~ ^[1-3]$ ]] || die "node must be 1, 2 or 3, not '${1:-}'"
}

# The jars: scripts/kafka.sh fetches them into its cache if needed.
LIBS=""
libs() {
  [[ -n "$LIBS" ]] || LIBS="$(bash "$SCRIPT_DIR/kafka.sh" libs)" ||
    die "could not get the Kafka jars (scripts/kafka.sh libs failed; its message is above)"
  echo "$LIBS"
}

run_tool() {
  local cls="$1"
  shift
  "$JAVA" "${TOOL_JVM_OPTS[@]}" -cp "$(libs)/*" "$cls" "$@"
}

# ---------------------------------------------------------------- one node

# A pid only counts if it is still this node's broker: pids get reused.
is_node() {
  local n="$1" pid="$2" cmdline
  [[ -n "$pid" && -r "/proc/$pid/cmdline" ]] || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
  [[ "$cmdline" == *" kafka.Kafka $(props "$n") "* || "$cmdline" == *" kafka.Kafka $(props "$n")" ]]
}

node_pid() {
  local n="$1" pid=""
  [[ -f "$(pid_file "$n")" ]] && pid="$(cat "$(pid_file "$n")" 2>/dev/null || true)"
  if is_node "$n" "$pid"; then
    echo "$pid"
    return 0
  fi
  pid="$(pgrep -f -- " kafka\.Kafka $(props "$n")\$" | head -n1 || true)"
  if is_node "$n" "$pid"; then
    echo "$pid" >"$(pid_file "$n")"
    echo "$pid"
    return 0
  fi
  return 1
}

render_props() {
  local n="$1" dir
  dir="$(node_dir "$n")"
  mkdir -p "$dir/data" "$dir/logs"
  sed -e "s|@NODE_ID@|$n|g" \
      -e "s|@BROKER_PORT@|$(broker_port "$n")|g" \
      -e "s|@CONTROLLER_PORT@|$(controller_port "$n")|g" \
      -e "s|@VOTERS@|$(voters)|g" \
      -e "s|@DATA_DIR@|$dir/data|g" \
      "$PROPS_TEMPLATE" >"$(props "$n").tmp.$$"
  mv "$(props "$n").tmp.$$" "$(props "$n")"
}

cluster_id() {
  if [[ ! -s "$CLUSTER_ID_FILE" ]]; then
    mkdir -p "$OUTBOX_CLUSTER_DIR"
    local id
    id="$(run_tool kafka.tools.StorageTool random-uuid | tail -n1)" || die "kafka.tools.StorageTool random-uuid failed"
    [[ -n "$id" ]] || die "kafka.tools.StorageTool random-uuid printed nothing"
    echo "$id" >"$CLUSTER_ID_FILE"
  fi
  cat "$CLUSTER_ID_FILE"
}

# All three share one cluster id; the static voter set is in the properties,
# so format needs neither --standalone nor --initial-controllers.
format_node() {
  local n="$1" data
  data="$(node_dir "$n")/data"
  [[ -f "$data/meta.properties" ]] && return 0
  local id format_log
  id="$(cluster_id)"
  format_log="$(node_dir "$n")/logs/format.log"
  find "$data" -mindepth 1 -delete
  if ! run_tool kafka.tools.StorageTool format -t "$id" -c "$(props "$n")" >"$format_log" 2>&1; then
    show_log_tail "$format_log"
    die "formatting node $n failed; see $format_log"
  fi
}

launch_node() {
  local n="$1" dir
  dir="$(node_dir "$n")"
  printf '\n===== %s cluster.sh start %s =====\n' "$(date -u +%FT%TZ)" "$n" >>"$(stdout_log "$n")"
  # setsid + nohup: the broker outlives the caller and holds none of its
  # pipes or lock descriptors.
  (
    cd "$dir"
    exec nohup setsid "$JAVA" "${BROKER_JVM_OPTS[@]}" \
      "-Dkafka.logs.dir=$dir/logs" "-Dlog4j2.configurationFile=$LOG4J_CONF" \
      -cp "$(libs)/*" kafka.Kafka "$(props "$n")" \
      >>"$(stdout_log "$n")" 2>&1 </dev/null 8<&- 9<&-
  ) &
  echo $! >"$(pid_file "$n")"
}

# A node opens its client port once it has registered with the active
# controller and is unfenced: a cheap, good readiness signal. A node alone
# cannot get there (no quorum), so `up` launches all before waiting.
wait_port() {
  local n="$1" pid="$2" deadline=$((SECONDS + START_TIMEOUT)) hard=$((SECONDS + START_MAX))
  local size last_size
  last_size="$(stat -c %s "$(server_log "$n")" 2>/dev/null || echo 0)"
  until tcp_open 127.0.0.1 "$(broker_port "$n")"; do
    if ! is_node "$n" "$pid"; then
      show_log_tail "$(stdout_log "$n")" 15
      show_log_tail "$(server_log "$n")" 40
      die "node $n (pid $pid) exited during start-up; see $(server_log "$n")"
    fi
    size="$(stat -c %s "$(server_log "$n")" 2>/dev/null || echo 0)"
    if [[ "$size" != "$last_size" ]]; then
      # Still loading partitions or catching up: progress, not a hang.
      last_size="$size"
      deadline=$((SECONDS + START_TIMEOUT))
    fi
    if ((SECONDS >= deadline || SECONDS >= hard)); then
      show_log_tail "$(server_log "$n")" 40
      die "node $n did not open 127.0.0.1:$(broker_port "$n") (no log line for ${START_TIMEOUT}s, or ${START_MAX}s in all); see $(server_log "$n")"
    fi
    sleep 0.2
  done
}

start_node() {
  local n="$1" pid port
  if pid="$(node_pid "$n")"; then
    echo "$pid"
    return 0
  fi
  rm -f "$(pid_file "$n")"
  for port in "$(broker_port "$n")" "$(controller_port "$n")"; do
    if tcp_open 127.0.0.1 "$port"; then
      die "port 127.0.0.1:$port is taken by another process (not node $n of $OUTBOX_CLUSTER_DIR)"
    fi
  done
  render_props "$n"
  format_node "$n"
  launch_node "$n"
  cat "$(pid_file "$n")"
}

signal_node() {
  local n="$1" sig="$2" pid deadline
  if ! pid="$(node_pid "$n")"; then
    log "node $n: not running"
    rm -f "$(pid_file "$n")"
    return 0
  fi
  kill "-$sig" "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while is_node "$n" "$pid"; do
    if ((SECONDS >= deadline)); then
      log "node $n still running ${STOP_TIMEOUT}s after SIG$sig; sending SIGKILL (see $(server_log "$n"))"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 1
      is_node "$n" "$pid" && die "node $n (pid $pid) survived SIGKILL"
      break
    fi
    sleep 0.05
  done
  rm -f "$(pid_file "$n")"
  log "node $n: stopped (SIG$sig, pid $pid)"
}

# ---------------------------------------------------------------- commands

cmd_up() {
  libs >/dev/null
  take_lock cluster
  local n t0 pids=()
  t0=$(now_ms)
  for n in "${NODES[@]}"; do pids[n]="$(start_node "$n")"; done
  for n in "${NODES[@]}"; do wait_port "$n" "${pids[n]}"; done
  log "ready: $(bootstrap) in $(( ($(now_ms) - t0) / 1000 ))s (state $OUTBOX_CLUSTER_DIR)"
}

# All at once: stopped one by one, the last nodes would wait for a quorum
# (to shut down in a controlled way) that is already gone.
cmd_down() {
  take_lock cluster
  local n pid
  for n in "${NODES[@]}"; do
    if pid="$(node_pid "$n")"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
  for n in "${NODES[@]}"; do signal_node "$n" TERM; done
}

# The data goes too, so nothing needs a clean shutdown.
cmd_destroy() {
  take_lock cluster
  local n
  for n in "${NODES[@]}"; do signal_node "$n" KILL; done
  local n
  # A killed JVM's sockets can outlive its pid for a moment.
  local tries
  for n in "${NODES[@]}"; do
    for tries in $(seq 50); do
      tcp_open 127.0.0.1 "$(broker_port "$n")" || tcp_open 127.0.0.1 "$(controller_port "$n")" || break
      ((tries < 50)) || die "a port of node $n is still open; keeping $OUTBOX_CLUSTER_DIR"
      sleep 0.2
    done
  done
  # Only the nodes' own files: the lock file we hold stays.
  rm -rf "$OUTBOX_CLUSTER_DIR"/node* "$CLUSTER_ID_FILE"
  log "removed the cluster's state in $OUTBOX_CLUSTER_DIR"
}

cmd_start() {
  check_node "$1"
  libs >/dev/null
  take_lock cluster
  local pid t0
  t0=$(now_ms)
  pid="$(start_node "$1")"
  wait_port "$1" "$pid"
  log "node $1: ready on 127.0.0.1:$(broker_port "$1") (pid $pid) after $(( ($(now_ms) - t0) / 1000 ))s"
}

cmd_status() {
  local n pid rc=0
  for n in "${NODES[@]}"; do
    if pid="$(node_pid "$n")"; then
      if tcp_open 127.0.0.1 "$(broker_port "$n")"; then
        echo "node $n: running on 127.0.0.1:$(broker_port "$n") (pid $pid)"
      else
        echo "node $n: starting or unhealthy (pid $pid), log $(server_log "$n")"
        rc=1
      fi
    else
      echo "node $n: stopped"
      rc=3
    fi
  done
  return "$rc"
}

cmd_leader() {
  local topic="$1" partition="$2" leader
  leader="$(run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(bootstrap)" \
      --describe --topic "$topic" |
    awk -v p="$partition" '{
      for (i = 1; i < NF; i++) {
        if ($i == "Partition:") part = $(i + 1)
        if ($i == "Leader:" && part == p) { print $(i + 1); exit }
      }
    }')"
  [[ -n "$leader" ]] || die "no partition $partition of $topic"
  echo "$leader"
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift
case "$cmd" in
  up) cmd_up ;;
  down) cmd_down ;;
  destroy) cmd_destroy ;;
  status) cmd_status ;;
  env) printf 'export OUTBOX_TEST_CLUSTER=%q\n' "$(bootstrap)" ;;
  bootstrap) bootstrap ;;
  kill) check_node "${1:-}"; take_lock cluster; signal_node "$1" KILL ;;
  stop) check_node "${1:-}"; take_lock cluster; signal_node "$1" TERM ;;
  start) cmd_start "${1:-}" ;;
  leader) [[ $# -eq 2 ]] || usage; cmd_leader "$1" "$2" ;;
  topics) run_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$(bootstrap)" "$@" ;;
  *) usage ;;
esac
