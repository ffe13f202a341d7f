#!/usr/bin/env bash
# A single-node Apache Kafka 4.x broker (KRaft, combined broker+controller) on
# loopback, assembled from Maven Central: no Docker, no tarball.
#
#   scripts/kafka.sh start  [--port 19092] [--dir var/kafka] [--version 4.4.0] [--heap 512m]
#                           [--sasl-ssl CERTDIR --sasl-port P --sasl-user NAME:PASSWORD ...
#                            [--acl-super NAME ...] [--oauthbearer [--reauth-ms MS]]]
#   scripts/kafka.sh stop   [--port ...] [--dir ...] [--kill]
#   scripts/kafka.sh status [--dir ...]
#   scripts/kafka.sh fetch  [--version ...]     # only assemble / check the jar cache
#
# Defaults come from KAFKA_PORT, KAFKA_DIR, KAFKA_VERSION, KAFKA_HEAP, KAFKA_CACHE; KAFKA_JVM_OPTS
# adds JVM options (e.g. "-Xlog:gc:file=/tmp/gc.log").
# The jars are fetched once with `mvn dependency:copy-dependencies` into
# $KAFKA_CACHE/<version>/libs (default ~/.cache/aggregator-kafka); later runs
# start from there without touching the network.  The storage in DIR/data is
# formatted once and kept, so `start` after `stop` (or after the broker was
# killed) comes back with the same topics and records.  `start` is idempotent:
# a broker already running from DIR is reported, not started twice.  It returns
# once the broker logged "Kafka Server started" and answers on its port, and
# prints the bootstrap address (host:port) as its last line.
#
# --sasl-ssl CERTDIR adds a SASL_SSL listener on --sasl-port (like a managed Kafka):
# TLS with the PEM files CERTDIR/broker.pem (the broker's unencrypted PKCS#8 key, then
# its certificate chain) and CERTDIR/ca.pem, and SASL with SCRAM-SHA-512,
# SCRAM-SHA-256 and PLAIN for every --sasl-user (SCRAM credentials are written when the
# storage is formatted).  The PLAINTEXT listener stays (inter-broker traffic, tools).
# --oauthbearer adds SASL/OAUTHBEARER to that listener with Kafka's unsecured validator
# (OAuthBearerUnsecuredValidatorCallbackHandler): it takes any unsigned JWT ("alg":"none")
# with a "sub" (the principal) and an "exp" not passed, so it is for tests only (with
# --acl-super, a token naming a super user is one); --sasl-user is optional then.
# --reauth-ms MS ends (or, for clients that can, re-authenticates) an OAUTHBEARER
# session after MS or when its token expires, whichever comes first
# (connections.max.reauth.ms, for OAUTHBEARER on that listener only).
# --acl-super NAME turns Kafka's authorizer on (StandardAuthorizer): NAME and the
# PLAINTEXT listener's ANONYMOUS are super users, every other SASL user may do only
# what an ACL allows (created over the PLAINTEXT listener).
# Like the port, these are fixed when DIR is first configured.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
CMD=${1:-}
[ $# -gt 0 ] && shift
PORT=${KAFKA_PORT:-19092}
DIR=${KAFKA_DIR:-}
VERSION=${KAFKA_VERSION:-4.4.0}
HEAP=${KAFKA_HEAP:-512m}
CACHE=${KAFKA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aggregator-kafka}
KILL=0
SASL_DIR=
SASL_PORT=
SASL_USERS=()
ACL_SUPERS=()
OAUTH=0
REAUTH_MS=0
PORT_SET=${KAFKA_PORT:+1}
TIMEOUT=${KAFKA_START_TIMEOUT:-120}
LOG4J_VERSION=2.24.3
HOST=127.0.0.1

while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT=$2; PORT_SET=1; shift 2 ;;
    --dir) DIR=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --heap) HEAP=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --kill) KILL=1; shift ;;
    --sasl-ssl) SASL_DIR=$(cd "$2" && pwd); shift 2 ;;
    --sasl-port) SASL_PORT=$2; shift 2 ;;
    --sasl-user) SASL_USERS+=("$2"); shift 2 ;;
    --acl-super) ACL_SUPERS+=("$2"); shift 2 ;;
    --oauthbearer) OAUTH=1; shift ;;
    --reauth-ms) REAUTH_MS=$2; shift 2 ;;
    *) echo "kafka.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
DIR=${DIR:-$HERE/var/kafka}
if [ -n "$SASL_DIR" ]; then
  [ -n "$SASL_PORT" ] || { echo "kafka.sh: --sasl-ssl needs --sasl-port" >&2; exit 2; }
  [ ${#SASL_USERS[@]} -gt 0 ] || [ "$OAUTH" = 1 ] \
    || { echo "kafka.sh: --sasl-ssl needs at least one --sasl-user (or --oauthbearer)" >&2; exit 2; }
  for f in broker.pem ca.pem; do
    [ -f "$SASL_DIR/$f" ] || { echo "kafka.sh: $SASL_DIR/$f is missing" >&2; exit 2; }
  done
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
LIBS=$CACHE/$VERSION/libs
PIDFILE=$DIR/kafka.pid
LOG=$DIR/kafka.log
if [ -z "$PORT_SET" ] && [ -f "$DIR/server.properties" ]; then
  # a DIR remembers its port
  PORT=$(sed -n 's#^listeners=PLAINTEXT://[^:]*:\([0-9]*\),.*#\1#p' "$DIR/server.properties")
fi

say() { echo "kafka.sh: $*" >&2; }

fetch() {
  [ -f "$CACHE/$VERSION/.complete" ] && return 0
  command -v java >/dev/null || { say "java (17+) is needed: apt-get install openjdk-17-jre-headless"; exit 1; }
  command -v mvn >/dev/null || { say "maven is needed once to fetch the jars: apt-get install maven"; exit 1; }
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"
  flock 9                               # two first runs at once: one downloads, one waits
  if [ -f "$CACHE/$VERSION/.complete" ]; then exec 9>&-; return 0; fi
  say "assembling Apache Kafka $VERSION from Maven Central into $CACHE/$VERSION (once)"
  local work
  work=$(mktemp -d)
  # Kafka's published pom leaves out the log4j2 binding; slf4j-api is pinned to 1.7
  # so that log4j-slf4j-impl is the binding used (with slf4j 2.x the broker logs nothing).
  cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.aggregator</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>1.7.36</version></dependency>
  </dependencies>
</project>
EOF
  rm -rf "$CACHE/$VERSION"
  mkdir -p "$LIBS"
  if ! (cd "$work" && mvn -B -q dependency:copy-dependencies -DincludeScope=runtime \
          -DoutputDirectory="$LIBS" >"$work/mvn.log" 2>&1); then
    tail -30 "$work/mvn.log" >&2
    say "maven could not fetch org.apache.kafka:kafka_2.13:$VERSION"
    rm -rf "$CACHE/$VERSION" "$work"
    exit 1
  fi
  rm -rf "$work"
  ls "$LIBS"/kafka_2.13-*.jar "$LIBS"/log4j-slf4j-impl-*.jar >/dev/null
  touch "$CACHE/$VERSION/.complete"
  exec 9>&-
  say "cached $(ls "$LIBS" | wc -l) jars ($(du -sh "$LIBS" | cut -f1))"
}

running_pid() {
  # the pid from the pid file if that process is a Kafka broker started from DIR
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "kafka.Kafka $DIR/server.properties" || return 1
  echo "$pid"
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

configure() {
  # written once per DIR: the controller port and cluster id must stay the same across restarts
  if [ -f "$DIR/server.properties" ]; then
    local old
    old=$(sed -n 's#^listeners=PLAINTEXT://[^:]*:\([0-9]*\),.*#\1#p' "$DIR/server.properties")
    if [ "$old" != "$PORT" ]; then
      say "$DIR holds a broker configured for port $old, not $PORT (use another --dir)"; exit 2
    fi
    return 0
  fi
  local ctl sasl_listener="" sasl_map=""
  ctl=${KAFKA_CONTROLLER_PORT:-$(free_port)}
  if [ -n "$SASL_DIR" ]; then
    sasl_listener=",SASL_SSL://$HOST:$SASL_PORT"
    sasl_map=",SASL_SSL:SASL_SSL"
  fi
  mkdir -p "$DIR/data"
  cat >"$DIR/server.properties" <<EOF
# written by scripts/kafka.sh: one node, broker and controller (KRaft), loopback only
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$ctl
listeners=PLAINTEXT://$HOST:$PORT$sasl_listener,CONTROLLER://$HOST:$ctl
advertised.listeners=PLAINTEXT://$HOST:$PORT$sasl_listener
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT$sasl_map
log.dirs=$DIR/data
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# the service creates its topics with explicit configs; nothing appears by accident
auto.create.topics.enable=false
delete.topic.enable=true
EOF
  if [ -n "$SASL_DIR" ]; then
    local plain_users="" u mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
    for u in ${SASL_USERS[@]+"${SASL_USERS[@]}"}; do plain_users+=" user_${u%%:*}=\"${u#*:}\""; done
    [ "$OAUTH" = 1 ] && mechanisms+=,OAUTHBEARER
    cat >>"$DIR/server.properties" <<EOF
# --sasl-ssl: TLS (PEM key and chain, PEM CA) and SASL on the SASL_SSL listener
ssl.keystore.type=PEM
ssl.keystore.location=$SASL_DIR/broker.pem
ssl.truststore.type=PEM
ssl.truststore.location=$SASL_DIR/ca.pem
ssl.client.auth=none
sasl.enabled.mechanisms=$mechanisms
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$plain_users;
EOF
    if [ "$OAUTH" = 1 ]; then
      # the broker logs itself in too (its own unsigned token, sub "kafka"); clients' tokens
      # go to the unsecured validator (Kafka's default for OAUTHBEARER, named here to be plain)
      cat >>"$DIR/server.properties" <<EOF
listener.name.sasl_ssl.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required unsecuredLoginStringClaim_sub="kafka";
listener.name.sasl_ssl.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.internals.unsecured.OAuthBearerUnsecuredValidatorCallbackHandler
listener.name.sasl_ssl.oauthbearer.connections.max.reauth.ms=$REAUTH_MS
EOF
    fi
  fi
  if [ ${#ACL_SUPERS[@]} -gt 0 ]; then
    local supers="User:ANONYMOUS" n
    for n in "${ACL_SUPERS[@]}"; do supers+=";User:$n"; done
    cat >>"$DIR/server.properties" <<EOF
# --acl-super: the authorizer on; nothing is allowed but what an ACL allows, except to these
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=$supers
allow.everyone.if.no.acl.found=false
EOF
  fi
  cat >"$DIR/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
EOF
}

format_storage() {
  [ -f "$DIR/data/meta.properties" ] && return 0
  local id u
  local -a scram=()
  id=$(java -cp "$LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)
  if [ -n "$SASL_DIR" ]; then
    for u in ${SASL_USERS[@]+"${SASL_USERS[@]}"}; do
      scram+=(--add-scram "SCRAM-SHA-512=[name=${u%%:*},password=${u#*:}]"
              --add-scram "SCRAM-SHA-256=[name=${u%%:*},password=${u#*:}]")
    done
  fi
  java -Dlog4j2.configurationFile="$DIR/log4j2.properties" -cp "$LIBS/*" kafka.tools.StorageTool \
    format -t "$id" -c "$DIR/server.properties" ${scram[@]+"${scram[@]}"} >"$DIR/format.log" 2>&1 \
    || { cat "$DIR/format.log" >&2; say "formatting $DIR/data failed"; exit 1; }
}

start() {
  fetch
  local pid
  if pid=$(running_pid); then
    if port_open "$PORT"; then
      say "already running (pid $pid, $DIR)"
      echo "$HOST:$PORT"
      return 0
    fi
    say "pid $pid from $DIR is not answering on $PORT: waiting for it"
  else
    rm -f "$PIDFILE"
    if port_open "$PORT"; then
      say "port $PORT is taken by another process (not a broker from $DIR)"; exit 1
    fi
    configure
    format_storage
    [ -f "$LOG" ] && mv -f "$LOG" "$LOG.1"
    # KAFKA_JVM_OPTS: split on blanks, never glob-expanded (-Xlog:gc* stays as written)
    local -a jvm_opts=()
    read -r -a jvm_opts <<<"${KAFKA_JVM_OPTS:-}"
    # own session: the broker outlives the shell or make that started it
    setsid java -Xms"$HEAP" -Xmx"$HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 ${jvm_opts[@]+"${jvm_opts[@]}"} \
      -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$DIR/log4j2.properties" \
      -cp "$LIBS/*" kafka.Kafka "$DIR/server.properties" >"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
  fi
  local deadline=$((SECONDS + TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -40 "$LOG" >&2; rm -f "$PIDFILE"; say "the broker exited during start-up (log: $LOG)"; exit 1
    fi
    if grep -q "Kafka Server started" "$LOG" 2>/dev/null && port_open "$PORT" \
        && { [ -z "$SASL_DIR" ] || port_open "$SASL_PORT"; }; then
      say "Apache Kafka $VERSION ready (pid $pid, data $DIR/data, log $LOG)${SASL_DIR:+, SASL_SSL on $HOST:$SASL_PORT}"
      echo "$HOST:$PORT"
      return 0
    fi
    sleep 0.3
  done
  tail -40 "$LOG" >&2
  say "not ready within ${TIMEOUT}s; stopping it"
  stop
  exit 1
}

stop() {
  local pid
  if ! pid=$(running_pid); then
    rm -f "$PIDFILE"
    say "not running ($DIR)"
    return 0
  fi
  if [ "$KILL" = 1 ]; then
    kill -KILL "$pid" 2>/dev/null || true
  else
    kill -TERM "$pid" 2>/dev/null || true
  fi
  local deadline=$((SECONDS + 60))
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    say "pid $pid did not stop in 60s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
  fi
  rm -f "$PIDFILE"
  say "stopped (pid $pid)"
}

status() {
  local pid
  if pid=$(running_pid) && port_open "$PORT"; then
    echo "running pid $pid on $HOST:$PORT ($DIR)"
  else
    echo "not running ($DIR)"; return 1
  fi
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  fetch) fetch; echo "$LIBS" ;;
  *) sed -n '2,/^set -e/{/^set -e/!p}' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
