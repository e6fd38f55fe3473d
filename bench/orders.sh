#!/usr/bin/env bash
# Order workflow benchmark for one region (issue: regional node). Not a test.
#
# Starts its own redis-server and a release build of regional-node on free loopback
# ports, places orders at fixed rates with tests/src/bin/order_bench.rs and reports
# POST -> SHIPPED p50/p99 per rate and the highest sustained rate. Then measures the
# baseline in the same run: redis-benchmark XADD of an envelope-sized entry into the
# same Redis, and reports the node's events/s as a ratio of it.
#
# With WEBHOOK=1 a webhook receiver is subscribed to order.status_updated and each rate
# also reports the deliveries and their latency (see bench/webhooks.sh).
#
# Usage: bench/orders.sh [RATES] [SECONDS]     e.g. bench/orders.sh 200,1000,2000 10
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${1:-200,500,1000,1500,2000,2500}
SECONDS_PER_RATE=${2:-10}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
command -v redis-server >/dev/null || { echo "redis-server missing: run scripts/test.sh once or apt-get install redis-server" >&2; exit 1; }

cargo build --release -q -p regional-node -p system-tests --bins
work=$(mktemp -d)
redis_port=$(free_port); node_port=$(free_port)
cleanup() { kill "${node_pid:-}" 2>/dev/null || true; redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --daemonize yes --logfile "$work/redis.log"
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.05; done
NODE_REGION=a NODE_ROLE=active NODE_LISTEN="127.0.0.1:$node_port" NODE_REDIS_URL="redis://127.0.0.1:$redis_port" \
  RUST_LOG=warn target/release/regional-node >"$work/node.log" 2>&1 &
node_pid=$!
until curl -sf "http://127.0.0.1:$node_port/health/ready" >/dev/null; do sleep 0.05; done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
redis_pid=$(redis-cli -p "$redis_port" info server | tr -d '\r' | awk -F: '/^process_id/ {print $2}')
node_cpu0=$(cpu_ticks "$node_pid"); redis_cpu0=$(cpu_ticks "$redis_pid")

echo "## order workflow: $(nproc) cores, rates $RATES, ${SECONDS_PER_RATE}s each"
target/release/order_bench --node "http://127.0.0.1:$node_port" --redis "redis://127.0.0.1:$redis_port" \
  --rates "$RATES" --seconds "$SECONDS_PER_RATE" ${WEBHOOK:+--webhook} | tee "$work/bench.csv"

events=$(redis-cli -p "$redis_port" xlen tandem:events)
orders=$(redis-cli -p "$redis_port" hget tandem:stats:orders SHIPPED)
echo "events in stream: $events; orders shipped: $orders"
hz=$(getconf CLK_TCK)
node_cpu=$(( $(cpu_ticks "$node_pid") - node_cpu0 )); redis_cpu=$(( $(cpu_ticks "$redis_pid") - redis_cpu0 ))
echo "CPU per shipped order: node $(( node_cpu * 1000000 / hz / orders )) us, redis $(( redis_cpu * 1000000 / hz / orders )) us"

payload=$(printf '%0400d' 0)
echo "## baseline: redis-benchmark XADD (${#payload}-byte field, 50 clients, no pipelining) on the same Redis"
raw=$(redis-benchmark -p "$redis_port" -n 200000 -c 50 -q XADD bench:raw '*' type OrderPlaced event "$payload" | tr -d '\r' | grep -oE '[0-9.]+ requests per second' | cut -d' ' -f1)
echo "raw XADD/s: $raw"
best=$(grep highest_sustained "$work/bench.csv" | cut -d, -f2)
python3 - "$best" "$raw" <<'PY'
import sys
best, raw = float(sys.argv[1]), float(sys.argv[2])
events = best * 7  # OrderPlaced .. OrderShipped: 7 events per order
print(f"node at its highest sustained rate: {best:.0f} orders/s ~ {events:.0f} events/s = {events / raw:.2f}x raw XADD/s")
PY
