#!/usr/bin/env bash
# The README's "run it" command: the whole two-region system on this machine.
#
#   region a: redis-server :7101, regional-node :8081 (active), replicator :9101 (copies b -> a)
#   region b: redis-server :7102, regional-node :8082 (standby), replicator :9102 (copies a -> b)
#   gateway:  :8080, the one endpoint clients use; it fails over between a and b.
#
# GATEWAYS=2 runs two gateways instead (:8080 gw-1 and :8090 gw-2) sharing failover
# control through an etcd member (:2479, Debian's etcd-server): either serves clients,
# one controls failover; kill it and the other takes over.
#
# Installs redis-server (and etcd-server) from Debian's packages when missing, builds the release
# binaries, runs everything in the foreground and stops it all on Ctrl-C / SIGTERM.
# State (Redis AOF files, the gateway's epoch, logs) lives in .run/ and survives restarts;
# delete .run/ to start from scratch. Ports can be moved with the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_A=${REDIS_A:-7101} REDIS_B=${REDIS_B:-7102}
NODE_A=${NODE_A:-8081} NODE_B=${NODE_B:-8082}
REPL_A=${REPL_A:-9101} REPL_B=${REPL_B:-9102}
GATEWAY=${GATEWAY:-8080}
GATEWAYS=${GATEWAYS:-1} GATEWAY2=${GATEWAY2:-8090}
ETCD=${ETCD:-2479} ETCD_PEER=${ETCD_PEER:-2480}
RUN=${RUN_DIR:-.run}
case $GATEWAYS in 1|2) ;; *) echo "run-local: GATEWAYS must be 1 or 2" >&2; exit 64 ;; esac

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ "$GATEWAYS" = 2 ] && ! command -v etcd >/dev/null 2>&1 && missing+=(etcd-server)
if [ ${#missing[@]} -gt 0 ]; then
    echo "run-local: installing ${missing[*]} from Debian's packages" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update </dev/null && $SUDO apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
fi

cargo build --release --bins -p regional-node -p replicator -p gateway
mkdir -p "$RUN/logs" "$RUN/redis-a" "$RUN/redis-b" "$RUN/gateway" "$RUN/etcd"
pids=()
names=()
stopped=""
stop() {
    [ -n "$stopped" ] && return
    stopped=1
    echo "run-local: stopping" >&2
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM

start() { # name, then the command
    local name=$1; shift
    "$@" >"$RUN/logs/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
    echo "run-local: $name started (pid $!, log $RUN/logs/$name.log)"
}
wait_http() { # url
    for _ in $(seq 1 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done
    echo "run-local: $1 did not answer; see $RUN/logs" >&2; return 1
}

for r in a b; do
    port=$REDIS_A; [ $r = b ] && port=$REDIS_B
    # appendonly + fsync every second: a restarted Redis keeps what it acknowledged.
    start "redis-$r" redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/$RUN/redis-$r" \
        --appendonly yes --appendfsync everysec --save ""
done
for port in $REDIS_A $REDIS_B; do
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
done

export LOG_FORMAT=${LOG_FORMAT:-json}
start node-a env NODE_REGION=a NODE_LISTEN=127.0.0.1:$NODE_A NODE_REDIS_URL=redis://127.0.0.1:$REDIS_A \
    NODE_PEER_REDIS_URL=redis://127.0.0.1:$REDIS_B NODE_ROLE=active target/release/regional-node
start node-b env NODE_REGION=b NODE_LISTEN=127.0.0.1:$NODE_B NODE_REDIS_URL=redis://127.0.0.1:$REDIS_B \
    NODE_PEER_REDIS_URL=redis://127.0.0.1:$REDIS_A NODE_ROLE=standby target/release/regional-node
start replicator-a env REPLICATOR_LOCAL_REGION=a REPLICATOR_LOCAL_REDIS_URL=redis://127.0.0.1:$REDIS_A \
    REPLICATOR_PEER_REGION=b REPLICATOR_PEER_REDIS_URL=redis://127.0.0.1:$REDIS_B \
    REPLICATOR_LISTEN=127.0.0.1:$REPL_A target/release/replicator
start replicator-b env REPLICATOR_LOCAL_REGION=b REPLICATOR_LOCAL_REDIS_URL=redis://127.0.0.1:$REDIS_B \
    REPLICATOR_PEER_REGION=a REPLICATOR_PEER_REDIS_URL=redis://127.0.0.1:$REDIS_A \
    REPLICATOR_LISTEN=127.0.0.1:$REPL_B target/release/replicator
wait_http "http://127.0.0.1:$NODE_A/health/live"
wait_http "http://127.0.0.1:$NODE_B/health/live"
REGIONS=a=http://127.0.0.1:$NODE_A,b=http://127.0.0.1:$NODE_B
if [ "$GATEWAYS" = 1 ]; then
    start gateway env GATEWAY_LISTEN=127.0.0.1:$GATEWAY GATEWAY_REGIONS=$REGIONS \
        GATEWAY_PRIMARY=a GATEWAY_STATE_DIR="$PWD/$RUN/gateway" target/release/gateway
    GATEWAY_URLS=":$GATEWAY"
else
    # One etcd member; heartbeat 50 ms / election 500 ms let it grant the gateways'
    # 1 s controller lease (its minimum TTL is 1.5 election timeouts).
    start etcd etcd --name local --data-dir "$PWD/$RUN/etcd" \
        --listen-client-urls http://127.0.0.1:$ETCD --advertise-client-urls http://127.0.0.1:$ETCD \
        --listen-peer-urls http://127.0.0.1:$ETCD_PEER --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER \
        --initial-cluster local=http://127.0.0.1:$ETCD_PEER --heartbeat-interval 50 --election-timeout 500 \
        --logger zap --log-level warn
    wait_http "http://127.0.0.1:$ETCD/health"
    for n in 1 2; do
        port=$GATEWAY; [ $n = 2 ] && port=$GATEWAY2
        start "gateway-$n" env GATEWAY_ID=gw-$n GATEWAY_LISTEN=127.0.0.1:$port GATEWAY_REGIONS=$REGIONS \
            GATEWAY_PRIMARY=a GATEWAY_ETCD_ENDPOINTS=http://127.0.0.1:$ETCD target/release/gateway
    done
    wait_http "http://127.0.0.1:$GATEWAY2/gateway/health"
    GATEWAY_URLS=":$GATEWAY :$GATEWAY2 (curl :$GATEWAY/gateway/regions names the controller)"
fi
wait_http "http://127.0.0.1:$GATEWAY/gateway/health"

cat <<MSG

Tandem is running; gateways: $GATEWAY_URLS. Try:
  curl -X PUT localhost:$GATEWAY/api/v1/products/WIDGET-001 -d '{"name":"Widget","price":1000,"currency":"USD","stock":150}'
  curl -X POST localhost:$GATEWAY/orders -H 'Idempotency-Key: demo-1' \\
       -d '{"customerId":"c-1","items":[{"sku":"WIDGET-001","quantity":2}],"shippingAddress":"1 Main St","paymentToken":"tok_ok"}'
  curl localhost:$GATEWAY/gateway/regions
  curl -X POST localhost:$GATEWAY/gateway/failover -d '{"to":"b"}'      # planned switchover
Metrics: :$GATEWAY/metrics :$NODE_A/metrics :$NODE_B/metrics :$REPL_A/metrics :$REPL_B/metrics
Logs: $RUN/logs/. Ctrl-C stops everything.
MSG
# Keep running when a process dies (a chaos drill kills regions on purpose): report it.
reported=()
while sleep 1; do
    for i in "${!pids[@]}"; do
        if [ -z "${reported[$i]:-}" ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "run-local: ${names[$i]} (pid ${pids[$i]}) exited; see $RUN/logs/${names[$i]}.log" >&2
            reported[$i]=1
        fi
    done
done
