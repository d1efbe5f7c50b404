#!/usr/bin/env bash
# The local stack, real parts, no Docker: Apache Kafka (KRaft, one combined broker+controller node,
# 127.0.0.1:9092) and Apache Cassandra (127.0.0.1:9042), resolved from Maven Central into .stack/
# and run as plain background JVMs. Versions are pinned in deploy/stack/versions.env.
#
# Usage: deploy/stack/stack.sh COMMAND [kafka|cassandra]...      (no component = both)
#   fetch     resolve the jars with Maven (idempotent; instant when cached)
#   up        fetch, start what is not running (both concurrently), wait for real readiness:
#             Kafka answers a metadata request, Cassandra answers `SELECT release_version FROM system.local`
#   down      stop by recorded pid (SIGTERM, SIGKILL after 30 s); leaves nothing of ours listening
#   status    one line per component: ready / running (not ready) / stopped
#   logs      last lines of each log (-n N for more, -f to follow)
#   restart   down, then up
#
# Listeners: Kafka PLAINTEXT 127.0.0.1:9092 and SASL_SSL 127.0.0.1:9093 (SCRAM-SHA-512, user carhook),
# controller 127.0.0.1:9094; Cassandra 127.0.0.1:9042 with password authentication (role carhook) and
# optional client TLS (plain and TLS connections on the same port). Development credentials are made
# on first start: a CA (tls/ca.pem), broker/node certificates for 127.0.0.1 and localhost, and random
# passwords in secrets/kafka-password and secrets/cql-password.
#
# Everything lives under ${CARHOOK_STACK_DIR:-<repo>/.stack}:
#   kafka-<v>/libs, cassandra-<v>/libs   jars (marker .carhook-fetched written after a successful fetch)
#   secrets/, tls/                        development passwords, CA and certificates (never in git)
#   conf/                                 generated configuration (rewritten on every start)
#   data/kafka, data/cassandra            persistent data; kafka-cluster-id keeps the KRaft cluster id
#                                         (Cassandra's commit log is in /dev/shm/carhook-<id>-commitlog
#                                         when /dev/shm has room, see cassandra_commitlog_dir)
#   logs/<component>.log                  logs;  run/<component>.pid  pid files
#
# Environment (all optional):
#   CARHOOK_STACK_DIR                     root directory (default <repo>/.stack)
#   CARHOOK_KAFKA_READY_TIMEOUT           seconds to wait for Kafka readiness (default 180: a broker's
#                                         start time grows with the partitions it holds, and every
#                                         test run leaves its topics behind)
#   CARHOOK_CASSANDRA_READY_TIMEOUT       seconds to wait for Cassandra readiness (default 180)
#   CARHOOK_STACK_STOP_TIMEOUT            seconds between SIGTERM and SIGKILL on down (default 30)
#   CARHOOK_KAFKA_HEAP, CARHOOK_CASSANDRA_HEAP   heap flags (default "-Xms512m -Xmx1g", "-Xms1g -Xmx2g")
#   CARHOOK_JAVA, CARHOOK_PYTHON          interpreters (default: java, python3 on PATH)
#   CARHOOK_KAFKA_PORT, CARHOOK_KAFKA_SECURE_PORT, CARHOOK_KAFKA_CONTROLLER_PORT, CARHOOK_CQL_PORT,
#   CARHOOK_CASSANDRA_STORAGE_PORT, CARHOOK_CASSANDRA_JMX_PORT   ports, only to run a second stack
#                                         beside the first (with its own CARHOOK_STACK_DIR)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
: "${KAFKA_VERSION:?versions.env}" "${SCALA_BINARY:?versions.env}" "${LOG4J_VERSION:?versions.env}"
: "${SLF4J_VERSION:?versions.env}" "${CASSANDRA_VERSION:?versions.env}"

STACK_DIR="${CARHOOK_STACK_DIR:-$root/.stack}"
mkdir -p "$STACK_DIR"
STACK_DIR="$(cd "$STACK_DIR" && pwd)"
RUN="$STACK_DIR/run" LOGS="$STACK_DIR/logs" CONF="$STACK_DIR/conf" DATA="$STACK_DIR/data"
JAVA="${CARHOOK_JAVA:-java}"
PYTHON="${CARHOOK_PYTHON:-python3}"
KAFKA_READY_TIMEOUT="${CARHOOK_KAFKA_READY_TIMEOUT:-${KAFKA_DEADLINE:-180}}"
CASSANDRA_READY_TIMEOUT="${CARHOOK_CASSANDRA_READY_TIMEOUT:-${CASSANDRA_DEADLINE:-180}}"
STOP_TIMEOUT="${CARHOOK_STACK_STOP_TIMEOUT:-30}"
read -r -a KAFKA_HEAP <<<"${CARHOOK_KAFKA_HEAP:--Xms512m -Xmx1g}"
read -r -a CASSANDRA_HEAP <<<"${CARHOOK_CASSANDRA_HEAP:--Xms1g -Xmx2g}"

# The services and tests connect to these; override only for a second stack beside the first.
KAFKA_PORT=${CARHOOK_KAFKA_PORT:-9092} KAFKA_SECURE_PORT=${CARHOOK_KAFKA_SECURE_PORT:-9093}
KAFKA_CONTROLLER_PORT=${CARHOOK_KAFKA_CONTROLLER_PORT:-9094}
CQL_PORT=${CARHOOK_CQL_PORT:-9042} CASSANDRA_STORAGE_PORT=${CARHOOK_CASSANDRA_STORAGE_PORT:-7000}
CASSANDRA_JMX_PORT=${CARHOOK_CASSANDRA_JMX_PORT:-7199}
SECRETS="$STACK_DIR/secrets" TLS="$STACK_DIR/tls"
# Bumped when the Kafka listener layout changes in a way an existing KRaft log cannot follow (the
# controller moved from 9093 to 9094 for the SASL_SSL listener): such a log is reformatted.
KAFKA_LAYOUT=2
LOG_ROTATE_BYTES=$((64 * 1024 * 1024))

mkdir -p "$RUN" "$LOGS" "$CONF" "$DATA"

log() { echo "stack: $*" >&2; }
die() { echo "stack: error: $*" >&2; exit 1; }
write_file() { cat >"$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"; } # path <content ; atomic replace
now_ms() { if [[ -n ${EPOCHREALTIME:-} ]]; then local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); else echo $((SECONDS * 1000)); fi; }

ports_of() {
  case $1 in
    kafka) echo "$KAFKA_PORT $KAFKA_SECURE_PORT $KAFKA_CONTROLLER_PORT" ;;
    cassandra) echo "$CQL_PORT $CASSANDRA_STORAGE_PORT $CASSANDRA_JMX_PORT" ;;
  esac
}
libs_of() {
  case $1 in
    kafka) echo "$STACK_DIR/kafka-$KAFKA_VERSION/libs" ;;
    cassandra) echo "$STACK_DIR/cassandra-$CASSANDRA_VERSION/libs" ;;
  esac
}
log_of() { echo "$LOGS/$1.log"; }
pidfile_of() { echo "$RUN/$1.pid"; }
timeout_of() { if [[ $1 == kafka ]]; then echo "$KAFKA_READY_TIMEOUT"; else echo "$CASSANDRA_READY_TIMEOUT"; fi; }

# ------------------------------------------------------------------------------------------ fetch

fetch_fingerprint() { # component -> hash of everything that determines the resolved jar set
  {
    cat "$here/$1/pom.xml"
    case $1 in
      kafka) echo "$KAFKA_VERSION $SCALA_BINARY $LOG4J_VERSION $SLF4J_VERSION" ;;
      cassandra) echo "$CASSANDRA_VERSION" ;;
    esac
  } | sha256sum | cut -d' ' -f1
}

jar_listing() { (cd "$1" && find . -maxdepth 1 -name '*.jar' -printf '%f %s\n' | sort); }

fetch_one() {
  local comp=$1 libs fp marker tmp mlog main_jar
  libs=$(libs_of "$comp"); fp=$(fetch_fingerprint "$comp"); marker="$libs/.carhook-fetched"
  if [[ -f $marker && "$(<"$marker")" == "$fp" ]]; then return 0; fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed once to download the $comp jars; install it (e.g. apt-get install maven)"
  local props=()
  case $comp in
    kafka)
      props=(-Dkafka.version="$KAFKA_VERSION" -Dscala.binary="$SCALA_BINARY" -Dlog4j.version="$LOG4J_VERSION"
        -Dslf4j.version="$SLF4J_VERSION")
      main_jar="kafka_$SCALA_BINARY-$KAFKA_VERSION.jar" ;;
    cassandra)
      props=(-Dcassandra.version="$CASSANDRA_VERSION")
      main_jar="cassandra-all-$CASSANDRA_VERSION.jar" ;;
  esac
  tmp="$libs.partial.$$"; mlog="$LOGS/mvn-$comp.log"
  log "$comp: resolving jars from Maven Central into $libs (log: $mlog)"
  rm -rf "$tmp"
  if ! mvn -q -B -f "$here/$comp/pom.xml" "${props[@]}" dependency:copy-dependencies \
      -DoutputDirectory="$tmp" >"$mlog" 2>&1; then
    rm -rf "$tmp"
    tail -n 20 "$mlog" >&2 || true
    die "$comp: Maven could not resolve the jars; full log: $mlog"
  fi
  [[ -f "$tmp/$main_jar" ]] || { rm -rf "$tmp"; die "$comp: $main_jar missing after resolution; see $mlog"; }
  if [[ -d $libs ]] && [[ "$(jar_listing "$libs")" == "$(jar_listing "$tmp")" ]]; then
    rm -rf "$tmp" # same jars already in place (e.g. fetched by an older revision of this script)
  else
    if running_pid "$comp" >/dev/null; then log "$comp: jars changed while it is running; restart it to use them"; fi
    rm -rf "$libs.old"
    if [[ -d $libs ]]; then mv "$libs" "$libs.old"; fi
    mv "$tmp" "$libs"
    rm -rf "$libs.old"
  fi
  echo "$fp" >"$marker"
}

cmd_fetch() {
  local comp
  if command -v flock >/dev/null; then
    (
      flock 9
      for comp in "$@"; do fetch_one "$comp"; done
    ) 9>"$RUN/fetch.lock"
  else
    for comp in "$@"; do fetch_one "$comp"; done
  fi
}

# ------------------------------------------------------------------------------- process identity

cmdline_of() { # pid -> its argv, one argument per line
  if [[ -r /proc/$1/cmdline ]]; then
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null
  else
    ps -ww -o args= -p "$1" 2>/dev/null | tr ' ' '\n'
  fi
}

# Ours = a JVM this script started for this component out of this stack directory. Processes started
# by the previous revision of this script (-Dcarhook-stack=<component>) are recognised too.
is_ours() { # pid component
  local args
  args=$(cmdline_of "$1") || return 1
  [[ -n $args ]] || return 1
  if grep -qxF -- "-Dcarhook.stack.component=$2" <<<"$args" &&
    grep -qxF -- "-Dcarhook.stack.dir=$STACK_DIR" <<<"$args"; then
    return 0
  fi
  grep -qxF -- "-Dcarhook-stack=$2" <<<"$args" && grep -qF -- "$STACK_DIR/" <<<"$args"
}

recorded_pid() {
  local f p
  f=$(pidfile_of "$1")
  [[ -f $f ]] || return 1
  p=$(<"$f")
  [[ $p =~ ^[0-9]+$ ]] || return 1
  echo "$p"
}

running_pid() { # component -> pid, if its recorded process is alive and ours
  local p
  p=$(recorded_pid "$1") || return 1
  kill -0 "$p" 2>/dev/null && is_ours "$p" "$1" || return 1
  echo "$p"
}

find_ours() { # component -> pids of our processes for it, recorded or not
  local f p
  [[ -d /proc ]] || return 0
  # shellcheck disable=SC2013 # /proc/<pid>/cmdline paths contain no whitespace
  for f in $(grep -laF -- carhook /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}; p=${p%/cmdline}
    if is_ours "$p" "$1"; then echo "$p"; fi
  done
}

describe_pid() { ps -o pid=,args= -p "$1" 2>/dev/null | cut -c1-160 || echo "$1"; }

port_in_use() { # port -> is anything listening on it?
  if command -v ss >/dev/null; then
    [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

listener_pids() { # port -> pids listening on it (as far as we may see)
  if command -v ss >/dev/null; then
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
  elif command -v lsof >/dev/null; then
    lsof -nP -t -iTCP:"$1" -sTCP:LISTEN 2>/dev/null | sort -u
  fi
}

# -------------------------------------------------------------------------------------- launching

rotate_log() {
  local f=$1
  if [[ -f $f ]] && (($(stat -c %s "$f" 2>/dev/null || echo 0) > LOG_ROTATE_BYTES)); then mv -f "$f" "$f.1"; fi
}

launch() { # component command... ; runs it detached (own session) with stdout/stderr appended to the log
  local comp=$1 pf log i p
  shift
  pf=$(pidfile_of "$comp"); log=$(log_of "$comp")
  rm -f "$pf"
  rotate_log "$log"
  printf '===== %s carhook stack.sh: starting %s =====\n' "$(date '+%F %T')" "$comp" >>"$log"
  # `bash -c 'echo $$ ...; exec java'` records the pid the JVM will have; setsid detaches it from the
  # caller's session so Ctrl-C in a terminal or a finishing CI step does not take the stack down.
  # shellcheck disable=SC2016 # $$ and $@ are for the inner bash
  if command -v setsid >/dev/null; then
    setsid -f bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pf" "$@" </dev/null >>"$log" 2>&1 8>&-
  else
    nohup bash -c 'echo $$ >"$0.tmp" && mv "$0.tmp" "$0" && exec "$@"' "$pf" "$@" </dev/null >>"$log" 2>&1 8>&- &
  fi
  for ((i = 0; i < 200; i++)); do # until the pid file exists and that pid has become the JVM
    if running_pid "$comp" >/dev/null; then
      log "$comp: started (pid $(recorded_pid "$comp")), log: $log"
      return 0
    fi
    if p=$(recorded_pid "$comp") && ! kill -0 "$p" 2>/dev/null; then break; fi
    sleep 0.05
  done
  rm -f "$pf"
  fail_report "$comp" "the JVM did not start"
  exit 1
}

# ------------------------------------------------------------------------------------------ Kafka

# ------------------------------------------------------------------------- development credentials

secret_of() { cat "$SECRETS/$1"; }

credentials_init() { # once: passwords, a CA, and a certificate for 127.0.0.1/localhost in PEM and PKCS12
  command -v openssl >/dev/null || die "openssl not found; it makes the development CA and certificates"
  mkdir -p "$SECRETS" "$TLS"
  chmod 700 "$SECRETS"
  local name
  for name in kafka-password cql-password keystore-password; do
    [[ -s $SECRETS/$name ]] || (umask 077 && openssl rand -hex 16 >"$SECRETS/$name")
  done
  if [[ ! -s $TLS/ca.pem || ! -s $TLS/ca.key ]]; then
    log "making a development CA in $TLS"
    (umask 077 && openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=carhook development CA" \
      -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null) || die "openssl could not make the CA"
    rm -f "$TLS/node.pem" "$TLS/node.p12"
  fi
  if [[ ! -s $TLS/node.pem || ! -s $TLS/node.p12 ]]; then
    log "making the broker/node certificate (127.0.0.1, localhost) in $TLS"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >"$TLS/node.ext"
    (umask 077 && openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout "$TLS/node.key" \
      -out "$TLS/node.csr" 2>/dev/null &&
      openssl x509 -req -in "$TLS/node.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial \
        -days 3650 -extfile "$TLS/node.ext" -out "$TLS/node.pem" 2>/dev/null &&
      openssl pkcs12 -export -in "$TLS/node.pem" -inkey "$TLS/node.key" -certfile "$TLS/ca.pem" \
        -name node -passout "pass:$(secret_of keystore-password)" -out "$TLS/node.p12") ||
      die "openssl could not make the node certificate"
    rm -f "$TLS/node.csr"
  fi
  chmod 644 "$TLS/ca.pem" "$TLS/node.pem"
  write_file "$STACK_DIR/env" <<EOF
# Generated by deploy/stack/stack.sh: the carhook settings that reach this stack with its development
# credentials (file paths, never the secrets themselves). \`make up\` uses it; source it to run
# \`processor\` subcommands or \`smartcar-sim check\` by hand: . $STACK_DIR/env
# A CARHOOK__KAFKA__BROKERS or CARHOOK__CQL__NODES already set means another cluster: left alone.
if [ -z "\${CARHOOK__KAFKA__BROKERS:-}" ]; then
  export CARHOOK__KAFKA__BROKERS=127.0.0.1:$KAFKA_SECURE_PORT
  export CARHOOK__KAFKA__SECURITY_PROTOCOL=sasl_ssl
  export CARHOOK__KAFKA__SASL_MECHANISM=SCRAM-SHA-512
  export CARHOOK__KAFKA__SASL_USERNAME=carhook
  export CARHOOK__KAFKA__SASL_PASSWORD_FILE=$SECRETS/kafka-password
  export CARHOOK__KAFKA__SSL_CA_FILE=$TLS/ca.pem
fi
if [ -z "\${CARHOOK__CQL__NODES:-}" ]; then
  export CARHOOK__CQL__NODES=127.0.0.1:$CQL_PORT
  export CARHOOK__CQL__USERNAME=carhook
  export CARHOOK__CQL__PASSWORD_FILE=$SECRETS/cql-password
  export CARHOOK__CQL__TLS_CA_FILE=$TLS/ca.pem
fi
EOF
}

kafka_tool() { # main-class args... ; a short-lived JVM on the Kafka classpath
  "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Dlog4j2.configurationFile="$CONF/kafka-tools-log4j2.xml" -cp "$(libs_of kafka)/*" "$@"
}

kafka_configure() {
  mkdir -p "$CONF" "$DATA/kafka"
  write_file "$CONF/kafka.properties" <<EOF
# Generated by deploy/stack/stack.sh on every start; edit the script, not this file.
# KRaft combined mode: one node is both broker and controller.
node.id=1
process.roles=broker,controller
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,SASL_SSL://127.0.0.1:$KAFKA_SECURE_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT

# The secured listener: TLS with the development CA's certificate, SCRAM-SHA-512 logins.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.ssl.keystore.type=PKCS12
listener.name.sasl_ssl.ssl.keystore.location=$TLS/node.p12
listener.name.sasl_ssl.ssl.keystore.password=$(secret_of keystore-password)
listener.name.sasl_ssl.ssl.client.auth=none
controller.listener.names=CONTROLLER
# Dynamic quorum (KIP-853): storage formatted with --standalone, this node is the only voter.
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
log.dirs=$DATA/kafka

# Single node: every internal topic has one replica.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1

num.partitions=6
auto.create.topics.enable=false
delete.topic.enable=true
group.initial.rebalance.delay.ms=0

# Sized for a 2-core development machine.
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
log.retention.hours=168
log.segment.bytes=67108864
EOF

  write_file "$CONF/kafka-log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/stack/stack.sh. Kafka broker logging (log4j2), appended to the stack log. -->
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="$(log_of kafka)" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="INFO"><AppenderRef ref="file"/></Root>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="kafka.network.RequestChannel\$" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.authorizer.logger" level="WARN"/>
    <Logger name="kafka.log.LogCleaner" level="WARN"/>
    <Logger name="org.apache.kafka.storage.internals.log" level="WARN"/>
    <Logger name="kafka.cluster.Partition" level="WARN"/>
    <Logger name="kafka.server.ReplicaFetcherManager" level="WARN"/>
    <Logger name="kafka.server.ReplicaAlterLogDirsManager" level="WARN"/>
    <Logger name="org.apache.kafka.clients" level="WARN"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
    <Logger name="org.apache.kafka.common.metrics" level="WARN"/>
  </Loggers>
</Configuration>
EOF

  kafka_tool_configure
}

kafka_tool_configure() { # configuration of the short-lived tool JVMs (format, readiness probe)
  mkdir -p "$CONF"
  write_file "$CONF/kafka-tools-log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/stack/stack.sh. Logging for short-lived Kafka tools (format, readiness probe). -->
<Configuration status="WARN">
  <Appenders>
    <Console name="stderr" target="SYSTEM_ERR"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stderr"/></Root>
    <Logger name="org.apache.kafka.clients" level="ERROR"/>
  </Loggers>
</Configuration>
EOF

  write_file "$CONF/kafka-client.properties" <<'EOF'
# Generated by deploy/stack/stack.sh. Admin client settings for the readiness probe: fail fast, retry soon.
request.timeout.ms=5000
default.api.timeout.ms=10000
socket.connection.setup.timeout.ms=2000
socket.connection.setup.timeout.max.ms=5000
retry.backoff.ms=200
EOF
  (umask 077 && write_file "$CONF/kafka-client-secure.properties" <<EOF
# Generated by deploy/stack/stack.sh. The readiness probe of the SASL_SSL listener, as user carhook.
request.timeout.ms=5000
default.api.timeout.ms=10000
socket.connection.setup.timeout.ms=2000
socket.connection.setup.timeout.max.ms=5000
retry.backoff.ms=200
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="carhook" password="$(secret_of kafka-password)";
ssl.truststore.type=PEM
ssl.truststore.location=$TLS/ca.pem
EOF
  )
}

kafka_format() { # once: generate (or reuse) the cluster id and format the log dir
  local meta="$DATA/kafka/meta.properties" idf="$STACK_DIR/kafka-cluster-id" cid flog
  local layout="$DATA/kafka/.carhook-layout"
  if [[ -f $meta && "$(cat "$layout" 2>/dev/null)" != "$KAFKA_LAYOUT" ]]; then
    log "kafka: the log in $DATA/kafka predates listener layout $KAFKA_LAYOUT (controller on $KAFKA_CONTROLLER_PORT); reformatting it (development data only)"
    rm -rf "$DATA/kafka"
    mkdir -p "$DATA/kafka"
  fi
  if [[ -f $meta ]]; then
    cid=$(sed -n 's/^cluster\.id=//p' "$meta")
    if [[ -n $cid && (! -f $idf || "$(<"$idf")" != "$cid") ]]; then echo "$cid" >"$idf"; fi
    return 0
  fi
  if [[ -s $idf ]]; then
    cid=$(<"$idf")
  else
    cid=$(kafka_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1) || true
    [[ $cid =~ ^[A-Za-z0-9_-]{22}$ ]] || die "kafka: could not generate a cluster id (got '$cid')"
    echo "$cid" >"$idf"
  fi
  flog=$(log_of kafka)
  log "kafka: formatting storage in $DATA/kafka (cluster id $cid)"
  if ! kafka_tool kafka.tools.StorageTool format -t "$cid" -c "$CONF/kafka.properties" --standalone \
      --add-scram "SCRAM-SHA-512=[name=carhook,password=$(secret_of kafka-password)]" >>"$flog" 2>&1; then
    tail -n 30 "$flog" >&2 || true
    die "kafka: formatting the storage failed; log: $flog"
  fi
  echo "$KAFKA_LAYOUT" >"$layout"
}

kafka_start() {
  credentials_init
  kafka_configure
  kafka_format
  launch kafka "$JAVA" -Dcarhook.stack.component=kafka -Dcarhook.stack.dir="$STACK_DIR" \
    "${KAFKA_HEAP[@]}" -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    "-Xlog:gc:file=$LOGS/kafka-gc.log:time,uptime:filecount=2,filesize=10m" \
    -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$CONF/kafka-log4j2.xml" -Dkafka.logs.dir="$LOGS" \
    -cp "$(libs_of kafka)/*" kafka.Kafka "$CONF/kafka.properties"
}

kafka_probe() { # a real metadata request (list topics); the reason for failure goes to stdout
  port_in_use "$KAFKA_PORT" || { echo "nothing listening on 127.0.0.1:$KAFKA_PORT yet"; return 1; }
  local out
  [[ -f "$CONF/kafka-client.properties" && -f "$CONF/kafka-tools-log4j2.xml" ]] || kafka_tool_configure
  if out=$(timeout 30 "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
      -Dlog4j2.configurationFile="$CONF/kafka-tools-log4j2.xml" -cp "$(libs_of kafka)/*" \
      org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list \
      --command-config "$CONF/kafka-client.properties" 2>&1 >/dev/null); then
    [[ -f "$CONF/kafka-client-secure.properties" ]] || { credentials_init && kafka_configure; }
    kafka_secure_probe
    return
  fi
  echo "metadata request failed: $(grep -v '^\s*at ' <<<"$out" | tail -n 2 | tr '\n' ' ' | cut -c1-300)"
  return 1
}

kafka_secure_probe() { # the same request over SASL_SSL as user carhook: TLS and SCRAM both work
  local out
  if out=$(timeout 30 "$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
      -Dlog4j2.configurationFile="$CONF/kafka-tools-log4j2.xml" -cp "$(libs_of kafka)/*" \
      org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_SECURE_PORT" --list \
      --command-config "$CONF/kafka-client-secure.properties" 2>&1 >/dev/null); then
    return 0
  fi
  echo "SASL_SSL metadata request failed: $(grep -v '^\s*at ' <<<"$out" | tail -n 2 | tr '\n' ' ' | cut -c1-300)"
  return 1
}

# -------------------------------------------------------------------------------------- Cassandra

# Where Cassandra's commit log lives: a directory of this data directory in /dev/shm (tmpfs) when it
# has 1 GiB free, else the data directory. The /dev/shm name carries a random id kept in the data
# directory, so a new data directory (a fresh clone at the same path, or the old one deleted) never
# replays another node's segments. Segments a crash left in the other place are moved here first, so
# a restart still replays them.
cassandra_commitlog_dir() {
  local disk="$DATA/cassandra/commitlog" id="$DATA/cassandra/commitlog-id" free dir other shm
  [[ -s $id ]] || od -An -N8 -tx1 /dev/urandom | tr -d ' \n' >"$id"
  shm="/dev/shm/carhook-$(cat "$id")-commitlog"
  dir=$disk
  if [[ -d $shm ]]; then
    dir=$shm
  elif [[ -d /dev/shm && -w /dev/shm ]]; then
    free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $4 }')
    if [[ ${free:-0} -ge 1048576 ]]; then dir=$shm; fi
  fi
  [[ $dir == "$shm" ]] || log "cassandra: /dev/shm has less than 1 GiB free; the commit log is on disk, and each write waits for its sync there (slower)"
  mkdir -p "$dir"
  for other in "$disk" "$shm"; do
    [[ $other != "$dir" ]] && compgen -G "$other/CommitLog-*.log" >/dev/null || continue
    log "cassandra: moving commit log segments from $other to $dir, to be replayed"
    mv -f "$other"/CommitLog-*.log "$dir"/
  done
  echo "$dir"
}

cassandra_configure() {
  local c="$CONF/cassandra" d="$DATA/cassandra" commitlog
  mkdir -p "$c/triggers" "$d"/{data,saved_caches,hints,cdc_raw}
  commitlog=$(cassandra_commitlog_dir)
  write_file "$c/cassandra.yaml" <<EOF
# Generated by deploy/stack/stack.sh on every start; edit the script, not this file.
# Minimal single-node Cassandra 5.0 configuration; everything not set here keeps its default.
cluster_name: carhook-local
num_tokens: 16
allocate_tokens_for_local_replication_factor: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:$CASSANDRA_STORAGE_PORT"
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: $CASSANDRA_STORAGE_PORT
native_transport_port: $CQL_PORT
start_native_transport: true

data_file_directories:
  - $d/data
commitlog_directory: $commitlog
saved_caches_directory: $d/saved_caches
hints_directory: $d/hints
cdc_raw_directory: $d/cdc_raw

# A write is acknowledged only once its commit-log entry is synced (concurrent writes share a sync).
# With \`periodic\` (Cassandra's default) a restart replays the commit log only up to its last sync
# marker, and the writes acknowledged in the moments before a kill -9 of this single node were gone
# after it (7 and 34 of about 450 in two runs of the outage suite's
# store_keeps_every_acknowledged_write_across_a_kill_9). Production relies on replication (RF 3,
# QUORUM writes) for that; one node here has none. The log is in /dev/shm when it can be (see
# cassandra_commitlog_dir): a sync there is a memory write, and tmpfs outlives a killed process, so
# durability costs about what \`periodic\` did (with the log on this disk, the processor drained 4 KB
# events about 30 % slower and the end-to-end p99 rose from 77 to 149 ms). A stop (SIGTERM) drains the
# memtables to disk and empties the log; only a crash of the machine itself can lose recent writes.
commitlog_sync: batch
commitlog_total_space: 512MiB
commitlog_segment_size: 32MiB
paxos_variant: v2
auto_snapshot: false
snapshot_before_compaction: false
incremental_backups: false
disk_failure_policy: stop
commit_failure_policy: stop

authenticator: PasswordAuthenticator
authorizer: AllowAllAuthorizer
role_manager: CassandraRoleManager
network_authorizer: AllowAllNetworkAuthorizer

# Sized for a 2-core development machine.
concurrent_reads: 8
concurrent_writes: 8
concurrent_counter_writes: 8
concurrent_materialized_view_writes: 8
concurrent_compactors: 1
memtable_flush_writers: 1
memtable_heap_space: 256MiB
memtable_offheap_space: 256MiB
compaction_throughput: 64MiB/s

# TLS on the CQL port, optional: plain and TLS clients share 127.0.0.1:$CQL_PORT.
client_encryption_options:
  enabled: true
  optional: true
  keystore: $TLS/node.p12
  keystore_password: $(secret_of keystore-password)
  store_type: PKCS12
  require_client_auth: false
EOF

  write_file "$c/logback.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by deploy/stack/stack.sh. Cassandra logging (logback), appended to the stack log. -->
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$(log_of cassandra)</file>
    <append>true</append>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="org.apache.cassandra.utils.SigarLibrary" level="WARN"/>
  <logger name="org.apache.cassandra.db.compaction" level="WARN"/>
  <logger name="org.apache.cassandra.db.ColumnFamilyStore" level="WARN"/>
  <logger name="org.apache.cassandra.db.memtable" level="WARN"/>
  <logger name="org.apache.cassandra.db.lifecycle.LogTransaction" level="WARN"/>
  <logger name="org.apache.cassandra.io.sstable.format" level="WARN"/>
  <logger name="io.netty" level="WARN"/>
  <logger name="com.datastax" level="WARN"/>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
EOF
}

cassandra_start() {
  credentials_init
  cassandra_configure
  local libs jamm
  libs=$(libs_of cassandra)
  jamm=$(compgen -G "$libs/jamm-*.jar" | head -n 1) || true
  [[ -n $jamm ]] || die "cassandra: no jamm jar in $libs (needed as -javaagent); run: $0 fetch"
  launch cassandra "$JAVA" -Dcarhook.stack.component=cassandra -Dcarhook.stack.dir="$STACK_DIR" \
    "${CASSANDRA_HEAP[@]}" -Xss256k -ea -da:net.openhft... -XX:+ExitOnOutOfMemoryError \
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 -XX:G1HeapRegionSize=16m \
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 -XX:InitiatingHeapOccupancyPercent=70 \
    "-Xlog:gc:file=$LOGS/cassandra-gc.log:time,uptime:filecount=2,filesize=10m" \
    -XX:+UseTLAB -XX:+ResizeTLAB -Djava.net.preferIPv4Stack=true \
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
    -Dcassandra.jmx.local.port="$CASSANDRA_JMX_PORT" -Dcom.sun.management.jmxremote.rmi.port="$CASSANDRA_JMX_PORT" \
    -Dcassandra-foreground=yes \
    -Dcassandra.config="file://$CONF/cassandra/cassandra.yaml" \
    -Dlogback.configurationFile="$CONF/cassandra/logback.xml" \
    -Dcassandra.storagedir="$DATA/cassandra" \
    -Dcassandra.logdir="$LOGS" \
    -Dcassandra.triggers_dir="$CONF/cassandra/triggers" \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 -Dcassandra.ring_delay_ms=1000 \
    -Dcassandra.superuser_setup_delay_ms=0 \
    -cp "$CONF/cassandra:$libs/*" org.apache.cassandra.service.CassandraDaemon
}

cassandra_probe() { # a real CQL query; the reason for failure goes to stdout
  port_in_use "$CQL_PORT" || { echo "nothing listening on 127.0.0.1:$CQL_PORT yet"; return 1; }
  local out
  # As role carhook, over TLS; the first time, the default superuser creates that role.
  out=$("$PYTHON" "$here/cql_ping.py" 127.0.0.1 "$CQL_PORT" --timeout 3 --tls-ca "$TLS/ca.pem" \
    --user carhook --password-file "$SECRETS/cql-password" --ensure-role 2>&1) && return 0
  echo "$out"
  return 1
}

# ------------------------------------------------------------------------------------------- up

preflight() { # component...
  local comp major
  command -v "$JAVA" >/dev/null || die "java not found (Java 17 is needed); set CARHOOK_JAVA or put java on PATH"
  major=$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
  if [[ -z $major || $major -lt 17 ]]; then die "Java 17 is needed, found: $("$JAVA" -version 2>&1 | head -n 1)"; fi
  for comp in "$@"; do
    if [[ $comp == cassandra && $major != 17 ]]; then
      log "warning: Cassandra $CASSANDRA_VERSION supports Java 11 and 17; found Java $major"
    fi
    if [[ $comp == cassandra ]] && ! command -v "$PYTHON" >/dev/null; then
      die "$PYTHON not found; it runs the Cassandra readiness probe (set CARHOOK_PYTHON)"
    fi
  done
  command -v timeout >/dev/null || die "coreutils 'timeout' not found"
}

# Before starting a component: adopt an unrecorded process of ours, refuse ports held by others.
# Returns 0 when the component must be started, 1 when it is (now) known to be running.
check_before_start() {
  local comp=$1 p port pids owner
  if p=$(running_pid "$comp"); then return 1; fi
  rm -f "$(pidfile_of "$comp")"
  p=$(find_ours "$comp" | head -n 1)
  if [[ -n $p ]]; then
    echo "$p" >"$(pidfile_of "$comp")"
    log "$comp: found our running process without a pid file (pid $p); adopting it"
    return 1
  fi
  for port in $(ports_of "$comp"); do
    port_in_use "$port" || continue
    owner=""
    pids=$(listener_pids "$port")
    for p in $pids; do owner+=$'\n'"  $(describe_pid "$p")"; done
    die "$comp: cannot start, 127.0.0.1:$port is already in use by another process:${owner:- (unknown process)}
  stop it first (it is not one this script started from $STACK_DIR)"
  done
  return 0
}

fail_report() { # component reason
  local comp=$1 log
  log=$(log_of "$comp")
  {
    echo "stack: error: $comp: $2"
    echo "stack: last 30 lines of $log:"
    tail -n 30 "$log" 2>/dev/null | sed 's/^/    /' || true
    echo "stack: full $comp log: $log"
  } >&2
}

wait_ready() { # component ; prints the ready line on stdout, a failure report on stderr (cmd_up routes both)
  local comp=$1 limit t0ms reason p ms
  t0ms=$(now_ms)
  limit=$(timeout_of "$comp")
  while :; do
    if ! p=$(running_pid "$comp"); then
      fail_report "$comp" "the process exited during start-up (before it became ready)"
      rm -f "$(pidfile_of "$comp")"
      return 1
    fi
    if reason=$("${comp}_probe"); then
      ms=$(($(now_ms) - t0ms))
      printf 'stack: %s ready after %d.%d s (pid %s, 127.0.0.1:%s)\n' "$comp" $((ms / 1000)) $((ms % 1000 / 100)) "$p" \
        "$(ports_of "$comp" | cut -d' ' -f1)"
      return 0
    fi
    if (($(now_ms) - t0ms >= limit * 1000)); then
      fail_report "$comp" "not ready within $limit s (last probe: ${reason:-no detail})"
      return 1
    fi
    sleep 0.5
  done
}

cmd_up() {
  local comp rc=0 order=() to_start=()
  preflight "$@"
  cmd_fetch "$@"
  credentials_init
  # Start the slow one (Cassandra) first so Kafka's storage format runs while it boots.
  for comp in cassandra kafka; do if [[ " $* " == *" $comp "* ]]; then order+=("$comp"); fi; done
  for comp in "${order[@]}"; do
    if check_before_start "$comp"; then to_start+=("$comp"); else log "$comp: already running (pid $(recorded_pid "$comp"))"; fi
  done
  for comp in "${to_start[@]}"; do "${comp}_start"; done

  local -A waiter=() errf=()
  for comp in "${order[@]}"; do
    errf[$comp]="$RUN/$comp.wait.err"
    wait_ready "$comp" >&2 2>"${errf[$comp]}" &
    waiter[$comp]=$!
  done
  for comp in "${order[@]}"; do
    if ! wait "${waiter[$comp]}"; then rc=1; fi
    cat "${errf[$comp]}" >&2 || true
    rm -f "${errf[$comp]}"
  done
  ((rc == 0)) || die "the stack is not ready (see above); '$0 status' shows the state, '$0 down' stops it"
}

# ----------------------------------------------------------------------------------------- down

cmd_down() {
  local comp p port pids=() deadline leftover owner
  local -A name_of=()
  local -A stopping=()
  for comp in "$@"; do
    for p in $(
      running_pid "$comp" || true
      find_ours "$comp"
    ); do
      [[ -n ${name_of[$p]:-} ]] && continue
      name_of[$p]=$comp; pids+=("$p"); stopping[$comp]=1
      log "$comp: stopping (pid $p)"
      kill -TERM "$p" 2>/dev/null || true
    done
  done
  deadline=$(($(now_ms) + STOP_TIMEOUT * 1000))
  while :; do
    leftover=()
    for p in "${pids[@]}"; do if kill -0 "$p" 2>/dev/null && is_ours "$p" "${name_of[$p]}"; then leftover+=("$p"); fi; done
    ((${#leftover[@]})) || break
    if (($(now_ms) >= deadline)); then
      for p in "${leftover[@]}"; do
        log "${name_of[$p]}: did not stop within $STOP_TIMEOUT s; sending SIGKILL to pid $p"
        kill -KILL "$p" 2>/dev/null || true
      done
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  for comp in "$@"; do
    rm -f "$(pidfile_of "$comp")"
    # Anything of ours still listening on this component's ports (e.g. started outside a pid file).
    for port in $(ports_of "$comp"); do
      for p in $(listener_pids "$port"); do
        if is_ours "$p" kafka || is_ours "$p" cassandra; then
          log "$comp: pid $p of ours still listens on $port; sending SIGKILL"
          kill -KILL "$p" 2>/dev/null || true
        fi
      done
    done
  done
  deadline=$(($(now_ms) + 5000))
  for comp in "$@"; do
    for port in $(ports_of "$comp"); do
      while port_in_use "$port" && (($(now_ms) < deadline)); do sleep 0.2; done
      if port_in_use "$port"; then
        owner=$(listener_pids "$port" | while read -r p; do describe_pid "$p"; done)
        log "warning: 127.0.0.1:$port is still in use, not by this stack: ${owner:-unknown process}"
      fi
    done
    if [[ -n ${stopping[$comp]:-} ]]; then log "$comp: stopped"; else log "$comp: not running"; fi
  done
}

# --------------------------------------------------------------------------------- status, logs

cmd_status() {
  local comp p reason port busy
  for comp in "$@"; do
    if p=$(running_pid "$comp"); then
      if reason=$("${comp}_probe"); then
        echo "$comp: ready (pid $p, 127.0.0.1:$(ports_of "$comp" | cut -d' ' -f1))"
      else
        echo "$comp: running, not ready (pid $p): $reason"
      fi
    else
      busy=""
      for port in $(ports_of "$comp"); do if port_in_use "$port"; then busy+=" $port"; fi; done
      if [[ -n $busy ]]; then echo "$comp: stopped (but ports in use by another process:$busy)"; else echo "$comp: stopped"; fi
    fi
  done
}

cmd_logs() { # [-f] [-n N] component...
  local follow=0 lines=50 comps=() comp files=()
  while (($#)); do
    case $1 in
      -f | --follow) follow=1 ;;
      -n) lines=${2:?-n needs a number}; shift ;;
      *) comps+=("$1") ;;
    esac
    shift
  done
  for comp in "${comps[@]}"; do files+=("$(log_of "$comp")"); done
  if ((follow)); then exec tail -n "$lines" -F "${files[@]}"; fi
  for comp in "${comps[@]}"; do
    echo "==> $(log_of "$comp") <=="
    tail -n "$lines" "$(log_of "$comp")" 2>/dev/null || echo "(no log yet)"
  done
}

# ----------------------------------------------------------------------------------------- main

# up/down/restart of one stack directory run one at a time (a second `up` waits, then finds it running).
lock_stack() {
  command -v flock >/dev/null || return 0
  exec 8>"$RUN/stack.lock"
  flock -n 8 && return 0
  log "another stack.sh up/down is running for $STACK_DIR; waiting for it"
  flock -w 600 8 || die "timed out waiting for the other stack.sh to finish"
}

usage() {
  echo "usage: $0 fetch|up|down|status|logs|restart [kafka|cassandra]...   (logs also takes -f, -n N)" >&2
  exit 2
}

cmd="${1:-}"
(($#)) && shift
components=() opts=()
for arg in "$@"; do
  case $arg in
    kafka | cassandra) [[ " ${components[*]} " == *" $arg "* ]] || components+=("$arg") ;;
    -*) [[ $cmd == logs ]] || usage; opts+=("$arg") ;;
    *) if [[ $cmd == logs && ${opts[*]: -1} == -n ]]; then opts+=("$arg"); else log "unknown component '$arg'"; usage; fi ;;
  esac
done
((${#components[@]})) || components=(kafka cassandra)

case "$cmd" in
  fetch) cmd_fetch "${components[@]}" ;;
  up) lock_stack; cmd_up "${components[@]}" ;;
  down) lock_stack; cmd_down "${components[@]}" ;;
  status) cmd_status "${components[@]}" ;;
  logs) cmd_logs "${opts[@]}" "${components[@]}" ;;
  restart)
    lock_stack
    cmd_down "${components[@]}"
    cmd_up "${components[@]}"
    ;;
  *) usage ;;
esac
