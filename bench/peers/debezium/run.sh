#!/usr/bin/env bash
# Debezium peer for the benchmark: Kafka Connect standalone running the
# Debezium PostgreSQL connector with the Outbox Event Router.
#   run.sh fetch    fetch Connect + Debezium jars from Maven Central (cached)
#   run.sh props    print the generated worker and connector properties
#   run.sh start    start the worker; prints its pid once the connector runs
#   run.sh stop     stop the worker (SIGTERM, then SIGKILL after 30 s) and
#                   remove its state (the log is kept in DBZ_LOG_DEST if set)
# Settings come from the environment (the harness sets them per run):
#   DBZ_NAME (required)         run name: state dir, slot and publication names
#   DBZ_DB_NAME (required)      database holding the dbz_outbox table
#   DBZ_TOPIC_PREFIX (required) prepended to platform.<domain>.events
#   DBZ_DB_HOST, DBZ_DB_PORT, DBZ_DB_USER, DBZ_DB_PASSWORD  (127.0.0.1, 55432, postgres, "")
#   DBZ_KAFKA (127.0.0.1:19092)  DBZ_REST_PORT (18083)  DBZ_HEAP (1g)
# Jars: ${OUTBOX_CACHE_DIR:-~/.cache/outbox-relay}/debezium-<pom sha>/libs.
# State: ${OUTBOX_STATE_DIR:-/var/tmp/outbox-relay}/bench-debezium/$DBZ_NAME.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$HERE/pom.xml"
LOG4J_CONF="$HERE/log4j2.properties"
CACHE_ROOT="${OUTBOX_CACHE_DIR:-${HOME:-/root}/.cache/outbox-relay}"
SUM="$(sha256sum "$POM" | cut -c1-16)"
LIBS="$CACHE_ROOT/debezium-$SUM/libs"
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

log() { printf '[debezium] %s\n' "$*" >&2; }
die() { printf '[debezium] ERROR: %s\n' "$*" >&2; exit 1; }

fetch() {
  [[ -f "$LIBS/.complete" ]] && return 0
  command -v mvn >/dev/null || die "Maven not found (apt-get install maven); it fetches the jars"
  mkdir -p "$CACHE_ROOT"
  exec 8>>"$CACHE_ROOT/.debezium-fetch.lock"
  flock -w 600 8 || die "timed out waiting for another fetch"
  [[ -f "$LIBS/.complete" ]] && return 0
  local tmp="$LIBS.tmp.$$" mvn_log="$CACHE_ROOT/debezium-$SUM.mvn.log"
  rm -rf "$tmp"
  log "fetching Kafka Connect and Debezium jars into $LIBS"
  if ! mvn -q -B -Dstyle.color=never -f "$POM" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" >"$mvn_log" 2>&1 </dev/null; then
    tail -n 30 "$mvn_log" >&2 || true
    rm -rf "$tmp"
    die "Maven could not fetch the jars; see $mvn_log"
  fi
  touch "$tmp/.complete"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  log "fetched $(find "$LIBS" -name '*.jar' | wc -l) jars"
}

settings() {
  : "${DBZ_NAME:?set DBZ_NAME}"
  [[ "$DBZ_NAME" =~ ^[a-z0-9_]+$ ]] || die "DBZ_NAME must be lowercase letters, digits and _"
  STATE="${OUTBOX_STATE_DIR:-/var/tmp/outbox-relay}/bench-debezium/$DBZ_NAME"
  PID_FILE="$STATE/connect.pid"
  REST_PORT="${DBZ_REST_PORT:-18083}"
}

# Worker: the same acks=all, idempotent, lz4 producer as the relay, batched
# for throughput as Kafka's producer tuning advice says (bigger batches, a
# few ms of linger). Strings in and out: the key is aggregateid and the value
# the payload column verbatim (the Event Model envelope as JSON text), so no
# converter re-encodes what the writer already serialized.
worker_props() {
  cat <<PROPS
bootstrap.servers=${DBZ_KAFKA:-127.0.0.1:19092}
listeners=http://127.0.0.1:$REST_PORT
key.converter=org.apache.kafka.connect.storage.StringConverter
value.converter=org.apache.kafka.connect.storage.StringConverter
offset.storage.file.filename=$STATE/offsets.dat
offset.flush.interval.ms=1000
plugin.discovery=only_scan
producer.acks=all
producer.enable.idempotence=true
producer.max.in.flight.requests.per.connection=5
producer.compression.type=lz4
producer.linger.ms=5
producer.batch.size=262144
producer.buffer.memory=67108864
PROPS
}

# Connector: pgoutput, only the outbox table, no snapshot (the benchmark's
# events are all new), a larger queue and batch than the defaults (8192 and
# 2048) and a 5 ms poll interval (the default 500 ms would dominate latency;
# the relay polls every 5 ms when idle).
connector_props() {
  : "${DBZ_DB_NAME:?set DBZ_DB_NAME}" "${DBZ_TOPIC_PREFIX:?set DBZ_TOPIC_PREFIX}"
  cat <<PROPS
name=outbox-bench
connector.class=io.debezium.connector.postgresql.PostgresConnector
tasks.max=1
plugin.name=pgoutput
database.hostname=${DBZ_DB_HOST:-127.0.0.1}
database.port=${DBZ_DB_PORT:-55432}
database.user=${DBZ_DB_USER:-postgres}
database.password=${DBZ_DB_PASSWORD:-}
database.dbname=$DBZ_DB_NAME
topic.prefix=${DBZ_NAME}_cdc
slot.name=${DBZ_NAME}_slot
publication.name=${DBZ_NAME}_pub
publication.autocreate.mode=filtered
table.include.list=public.dbz_outbox
snapshot.mode=no_data
tombstones.on.delete=false
max.batch.size=8192
max.queue.size=32768
poll.interval.ms=5
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.route.by.field=aggregatetype
transforms.outbox.route.topic.replacement=${DBZ_TOPIC_PREFIX}\${routedByValue}
transforms.outbox.table.field.event.key=aggregateid
transforms.outbox.table.fields.additional.placement=type:header:ce_type
PROPS
}

worker_running() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "ConnectStandalone $STATE/"
}

start() {
  settings
  fetch
  if worker_running; then die "a worker for $DBZ_NAME is already running (pid $(cat "$PID_FILE"))"; fi
  mkdir -p "$STATE"
  rm -f "$STATE/offsets.dat"
  worker_props >"$STATE/worker.properties"
  connector_props >"$STATE/connector.properties"
  if (exec 3<>"/dev/tcp/127.0.0.1/$REST_PORT") 2>/dev/null; then
    die "127.0.0.1:$REST_PORT is taken; set DBZ_REST_PORT"
  fi
  (
    cd "$STATE"
    exec setsid "$JAVA" "-Xms256m" "-Xmx${DBZ_HEAP:-1g}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -Djava.awt.headless=true "-Dlog4j2.configurationFile=$LOG4J_CONF" \
      "-Dconnect.log.file=$STATE/connect.log" \
      -cp "$LIBS/*" org.apache.kafka.connect.cli.ConnectStandalone \
      "$STATE/worker.properties" "$STATE/connector.properties" \
      >"$STATE/connect.out" 2>&1 </dev/null 8<&- 9<&-
  ) &
  local pid=$!
  echo "$pid" >"$PID_FILE"
  local deadline=$((SECONDS + 180)) status=""
  until [[ "$status" == *'"connector":{"state":"RUNNING"'*'"tasks":[{"id":0,"state":"RUNNING"'* ]]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$STATE/connect.out" "$STATE/connect.log" >&2 2>/dev/null || true
      die "Kafka Connect exited during start-up; see $STATE/connect.log"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 40 "$STATE/connect.log" >&2 2>/dev/null || true
      kill "$pid" 2>/dev/null || true
      die "connector not RUNNING after 180 s (last status: ${status:-none}); see $STATE/connect.log"
    fi
    sleep 0.5
    status="$(curl -fsS "http://127.0.0.1:$REST_PORT/connectors/outbox-bench/status" 2>/dev/null | tr -d ' \n' || true)"
  done
  log "Kafka Connect running (pid $pid, REST 127.0.0.1:$REST_PORT, log $STATE/connect.log)"
  echo "$pid"
}

remove_state() {
  if [[ -n "${DBZ_LOG_DEST:-}" && -f "$STATE/connect.log" ]]; then
    cp "$STATE/connect.log" "$DBZ_LOG_DEST" || true
  fi
  rm -rf "$STATE"
}

stop() {
  settings
  if ! worker_running; then
    remove_state
    return 0
  fi
  local pid deadline=$((SECONDS + 30))
  pid="$(cat "$PID_FILE")"
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      log "worker $pid still running 30 s after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  remove_state
}

case "${1:-}" in
  fetch) fetch ;;
  props) settings; worker_props; echo; connector_props ;;
  start) start ;;
  stop) stop ;;
  *) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
