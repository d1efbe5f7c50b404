#!/usr/bin/env bash
# The local stack, real parts, no Docker: Apache Kafka (KRaft, one node, 127.0.0.1:9092) and Apache
# Cassandra (127.0.0.1:9042), resolved from Maven Central into .stack/ and run as plain JVMs.
#
# Usage: deploy/stack/stack.sh fetch|up|down|status|restart [kafka|cassandra]
#   fetch    resolve the jars (idempotent; quick when cached)
#   up       fetch, start what is not running, wait for real readiness (a metadata request, a CQL query)
#   down     stop by recorded pid (TERM, then KILL after 30 s)
#   restart  down then up (used by outage tests)
# Everything lives under ${CARHOOK_STACK_DIR:-<repo>/.stack}: libs, config, data, logs, pids.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
stack="${CARHOOK_STACK_DIR:-$root/.stack}"
run="$stack/run"; logs="$stack/logs"; conf="$stack/conf"; data="$stack/data"
kafka_libs="$stack/kafka-$KAFKA_VERSION/libs"
cass_libs="$stack/cassandra-$CASSANDRA_VERSION/libs"
KAFKA_DEADLINE="${KAFKA_DEADLINE:-90}"
CASSANDRA_DEADLINE="${CASSANDRA_DEADLINE:-180}"
mkdir -p "$run" "$logs" "$conf" "$data"

log() { echo "stack: $*" >&2; }

fetch_one() { # name pom libs extra-props...
  local name=$1 pom=$2 libs=$3; shift 3
  [[ -f "$libs/.complete" ]] && return 0
  log "resolving $name from Maven Central into $libs"
  rm -rf "$libs"
  mvn -q -B -f "$pom" "$@" dependency:copy-dependencies -DoutputDirectory="$libs" >"$logs/mvn-$name.log" 2>&1 || {
    log "error: maven could not resolve $name; see $logs/mvn-$name.log"; tail -n 20 "$logs/mvn-$name.log" >&2; exit 1; }
  touch "$libs/.complete"
}

fetch() {
  fetch_one kafka "$here/kafka/pom.xml" "$kafka_libs" -Dkafka.version="$KAFKA_VERSION" \
    -Dscala.binary="$SCALA_BINARY" -Dlog4j.version="$LOG4J_VERSION" -Dslf4j.version="$SLF4J_VERSION"
  fetch_one cassandra "$here/cassandra/pom.xml" "$cass_libs" -Dcassandra.version="$CASSANDRA_VERSION"
}

pid_of() { local f="$run/$1.pid"; [[ -f "$f" ]] && cat "$f"; }
alive() { local p; p=$(pid_of "$1") && [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null && grep -q "carhook-stack=$1" "/proc/$p/cmdline" 2>/dev/null; }

# ---------------------------------------------------------------- Kafka
kafka_config() {
  mkdir -p "$data/kafka"
  cat >"$conf/kafka.properties" <<PROPS
node.id=1
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
advertised.listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:9093
log.dirs=$data/kafka
num.partitions=6
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
log.retention.hours=168
log.segment.bytes=67108864
PROPS
  cat >"$conf/kafka-log4j2.yaml" <<YAML
Configuration:
  Appenders:
    Console: { name: STDOUT, PatternLayout: { pattern: "[%d] %p %m (%c)%n" } }
  Loggers:
    Root: { level: INFO, AppenderRef: [ { ref: STDOUT } ] }
    Logger:
      - { name: kafka, level: WARN }
      - { name: org.apache.kafka, level: WARN }
      - { name: kafka.server.KafkaServer, level: INFO }
      - { name: kafka.server.KafkaRaftServer, level: INFO }
YAML
}

kafka_java() { # main-class args...
  java -Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:ActiveProcessorCount=2 \
    -Dlog4j2.configurationFile="$conf/kafka-log4j2.yaml" -cp "$kafka_libs/*" "$@"
}

kafka_start() {
  kafka_config
  if [[ ! -f "$data/kafka/meta.properties" ]]; then
    local cid; cid=$(cat "$stack/kafka-cluster-id" 2>/dev/null || true)
    if [[ -z "$cid" ]]; then cid=$(kafka_java org.apache.kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 || true); fi
    [[ -n "$cid" ]] || cid=$(python3 -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
    echo "$cid" >"$stack/kafka-cluster-id"
    log "formatting Kafka storage (cluster id $cid)"
    kafka_java kafka.tools.StorageTool format -t "$cid" -c "$conf/kafka.properties" --standalone >>"$logs/kafka.log" 2>&1 || {
      log "error: formatting Kafka storage failed; see $logs/kafka.log"; tail -n 30 "$logs/kafka.log" >&2; return 1; }
  fi
  nohup java -Dcarhook-stack=kafka -Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:ActiveProcessorCount=2 \
    -Dlog4j2.configurationFile="$conf/kafka-log4j2.yaml" -cp "$kafka_libs/*" kafka.Kafka "$conf/kafka.properties" \
    >>"$logs/kafka.log" 2>&1 &
  echo $! >"$run/kafka.pid"
}

kafka_ready() {
  kafka_java org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:9092 --list \
    --command-config /dev/null >/dev/null 2>&1
}

# ---------------------------------------------------------------- Cassandra
cassandra_config() {
  mkdir -p "$conf/cassandra" "$data/cassandra"/{data,commitlog,saved_caches,hints,cdc_raw}
  cat >"$conf/cassandra/cassandra.yaml" <<YAML
cluster_name: carhook-local
num_tokens: 16
allocate_tokens_for_local_replication_factor: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories: [ "$data/cassandra/data" ]
commitlog_directory: $data/cassandra/commitlog
saved_caches_directory: $data/cassandra/saved_caches
hints_directory: $data/cassandra/hints
cdc_raw_directory: $data/cassandra/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
commitlog_segment_size: 32MiB
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:7000"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: 7000
native_transport_port: 9042
start_native_transport: true
endpoint_snitch: SimpleSnitch
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
paxos_variant: v2
auto_snapshot: false
snapshot_before_compaction: false
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_compactors: 1
memtable_heap_space: 256MiB
memtable_offheap_space: 256MiB
read_request_timeout: 5000ms
write_request_timeout: 2000ms
cas_contention_timeout: 1000ms
request_timeout: 10000ms
disk_failure_policy: stop
commit_failure_policy: stop
materialized_views_enabled: false
sasi_indexes_enabled: false
YAML
  cat >"$conf/cassandra/logback.xml" <<XML
<configuration scan="false">
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.thinkaurelius" level="ERROR"/>
  <root level="WARN"><appender-ref ref="STDOUT"/></root>
</configuration>
XML
}

cassandra_start() {
  cassandra_config
  local jamm; jamm=$(ls "$cass_libs"/jamm-*.jar | head -n1)
  nohup java -Dcarhook-stack=cassandra \
    -Xms1g -Xmx2g -Xss256k -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 \
    -XX:G1HeapRegionSize=16m -XX:MaxGCPauseMillis=300 -XX:ActiveProcessorCount=2 -XX:+AlwaysPreTouch \
    -XX:+HeapDumpOnOutOfMemoryError -XX:HeapDumpPath="$data/cassandra" \
    -Djdk.attach.allowAttachSelf=true \
    --add-exports java.base/jdk.internal.misc=ALL-UNNAMED \
    --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED \
    --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED \
    --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED \
    --add-exports java.sql/java.sql=ALL-UNNAMED \
    --add-exports java.base/java.lang.ref=ALL-UNNAMED \
    --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED \
    --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED \
    --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED \
    --add-opens java.base/java.lang.module=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.loader=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.ref=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.math=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.module=ALL-UNNAMED \
    --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED \
    --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED \
    --add-opens java.base/sun.nio.ch=ALL-UNNAMED \
    --add-opens java.base/java.io=ALL-UNNAMED \
    --add-opens java.base/java.lang.reflect=ALL-UNNAMED \
    --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED \
    --add-opens java.base/java.lang=ALL-UNNAMED \
    --add-opens java.base/java.util=ALL-UNNAMED \
    -Dio.netty.tryReflectionSetAccessible=true \
    -Dio.netty.allocator.useCacheForAllThreads=true -Dio.netty.allocator.maxOrder=11 \
    -javaagent:"$jamm" \
    -Dcassandra.config="file://$conf/cassandra/cassandra.yaml" \
    -Dlogback.configurationFile="$conf/cassandra/logback.xml" \
    -Dcassandra.storagedir="$data/cassandra" \
    -Dcassandra.logdir="$logs" \
    -Dcassandra-foreground=yes \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Dcassandra.ring_delay_ms=100 \
    -Dcassandra.superuser_setup_delay_ms=0 \
    -Dcassandra.auto_bootstrap=false \
    -cp "$conf/cassandra:$cass_libs/*" org.apache.cassandra.service.CassandraDaemon \
    >>"$logs/cassandra.log" 2>&1 &
  echo $! >"$run/cassandra.pid"
}

cassandra_ready() { python3 "$here/cql_ping.py" 127.0.0.1 9042 >/dev/null 2>&1; }

# ---------------------------------------------------------------- common
wait_ready() { # name deadline
  local name=$1 deadline=$((SECONDS + $2))
  until "${name}_ready"; do
    if ! alive "$name"; then
      log "error: $name exited during start-up. Last lines of $logs/$name.log:"; tail -n 30 "$logs/$name.log" >&2; return 1
    fi
    if (( SECONDS > deadline )); then
      log "error: $name not ready after $2 s. Last lines of $logs/$name.log:"; tail -n 30 "$logs/$name.log" >&2; return 1
    fi
    sleep 1
  done
  log "$name ready"
}

up() {
  fetch
  local c started=()
  for c in "$@"; do
    if alive "$c"; then continue; fi
    "${c}_start"; started+=("$c")
  done
  for c in "$@"; do wait_ready "$c" "$( [[ $c == kafka ]] && echo "$KAFKA_DEADLINE" || echo "$CASSANDRA_DEADLINE")"; done
}

stop_one() {
  local name=$1 p
  p=$(pid_of "$name") || true
  if [[ -n "${p:-}" ]] && alive "$name"; then
    log "stopping $name (pid $p)"
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then log "$name did not stop in 30 s; killing"; kill -KILL "$p" 2>/dev/null || true; sleep 0.5; fi
  fi
  rm -f "$run/$name.pid"
}

status() {
  local c
  for c in "$@"; do
    if alive "$c"; then
      if "${c}_ready"; then echo "$c: ready (pid $(pid_of "$c"))"; else echo "$c: running, not ready (pid $(pid_of "$c"))"; fi
    else echo "$c: stopped"; fi
  done
}

cmd="${1:-}"; shift || true
components=("$@"); ((${#components[@]})) || components=(kafka cassandra)
for c in "${components[@]}"; do [[ $c == kafka || $c == cassandra ]] || { log "unknown component $c"; exit 2; }; done
case "$cmd" in
  fetch) fetch ;;
  up) up "${components[@]}" ;;
  down) for c in "${components[@]}"; do stop_one "$c"; done ;;
  restart) for c in "${components[@]}"; do stop_one "$c"; done; up "${components[@]}" ;;
  status) status "${components[@]}" ;;
  *) echo "usage: $0 fetch|up|down|restart|status [kafka|cassandra]" >&2; exit 2 ;;
esac
