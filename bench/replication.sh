#!/usr/bin/env bash
# Replication benchmark (not a test). On this machine, in one run:
#  1. raw baseline: redis-benchmark pipelined XADD of the same ~400-byte envelope;
#  2. catch-up: 1,000,000 events pre-loaded in the peer, copied by the real replicator
#     (release build) into a fresh local Redis; rate from the first copied entry to the
#     last, and its ratio to the raw baseline (target >= 50%);
#  3. steady state: 5,000 events/s written to the peer one XADD at a time while a
#     consumer group on the peer reads and acknowledges them; event lag (XADD on the
#     peer -> visible in the standby) and group lag (XACK on the peer -> position and
#     ack visible in the standby), p50/p99 (targets p99 < 10 ms and < 100 ms).
#
# Usage: bench/replication.sh            (N=1000000 RATE=5000 STEADY_SECONDS=30 TANDEM_BIN_DIR=)
set -euo pipefail

N=${N:-1000000}
RATE=${RATE:-5000}
STEADY_SECONDS=${STEADY_SECONDS:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
for tool in redis-server redis-cli redis-benchmark python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/replication.sh: $tool missing" >&2; exit 1; }
done

# TANDEM_BIN_DIR: the replicator and replication-bench of another build (an A/B run).
if [ -n "${TANDEM_BIN_DIR:-}" ]; then
  bin=$TANDEM_BIN_DIR
else
  cargo build --release -q -p replicator --bins
  bin="$root/target/release"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench-replication-XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start_redis() { # name port
  mkdir -p "$work/$1"
  redis-server --port "$2" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/$1" \
    --daemonize no >"$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$2" ping >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "redis $1 did not start" >&2; exit 1
}

peer_port=$(free_port); local_port=$(free_port); http_port=$(free_port)
start_redis peer "$peer_port"
start_redis local "$local_port"
payload=$("$bin/replication-bench" payload 2>/dev/null)
echo "machine: $(nproc) cores, $(redis-server --version | awk '{print $3}')"
echo "payload: event field ${#payload} bytes (+ type field)"

# 1. Raw baseline into the (still empty) local Redis: the best of two pipelined shapes.
raw_best=0
for shape in "-c 1 -P 1000" "-c 4 -P 100"; do
  # shellcheck disable=SC2086
  rps=$(redis-benchmark -h 127.0.0.1 -p "$local_port" -n "$N" $shape -q \
          XADD bench:raw '*' type OrderPlaced event "$payload" 2>&1 | tr '\r' '\n' \
        | grep -o '[0-9.]* requests per second' | tail -1 | cut -d' ' -f1)
  echo "raw redis-benchmark XADD ($shape, n=$N): ${rps} XADD/s"
  raw_best=$(python3 -c "print(max($raw_best, $rps))")
  redis-cli -p "$local_port" flushall >/dev/null
done

# 2. Catch-up copy of N events.
"$bin/replication-bench" load --url "redis://127.0.0.1:$peer_port" --count "$N"
redis-cli -p "$peer_port" hset tandem:role role active epoch 1 >/dev/null
redis-cli -p "$local_port" hset tandem:role role standby epoch 1 >/dev/null
REPLICATOR_LOCAL_REGION=b REPLICATOR_LOCAL_REDIS_URL="redis://127.0.0.1:$local_port" \
REPLICATOR_PEER_REGION=a REPLICATOR_PEER_REDIS_URL="redis://127.0.0.1:$peer_port" \
REPLICATOR_LISTEN="127.0.0.1:$http_port" RUST_LOG=warn \
  "$bin/replicator" >"$work/replicator.log" 2>&1 &
pids+=($!)
copy=$("$bin/replication-bench" wait-copied --url "redis://127.0.0.1:$local_port" --count "$N")
echo "$copy" | grep -v COPY_RATE
copy_rate=$(echo "$copy" | awk '/^COPY_RATE/ {print $2}')
echo "catch-up: $copy_rate events/s vs raw $raw_best XADD/s = $(python3 -c "print(f'{100*$copy_rate/$raw_best:.0f}%')") of raw (target >= 50%)"
if ! cmp -s <(redis-cli -p "$peer_port" xinfo stream tandem:events | sed -n '/last-generated-id/{n;p}') \
             <(redis-cli -p "$local_port" xinfo stream tandem:events | sed -n '/last-generated-id/{n;p}'); then
  echo "WARNING: last ids differ after catch-up" >&2
fi

# 3. Steady state.
"$bin/replication-bench" steady --peer "redis://127.0.0.1:$peer_port" --local "redis://127.0.0.1:$local_port" \
  --rate "$RATE" --seconds "$STEADY_SECONDS"
echo "replicator metrics at the end:"
curl -fsS "http://127.0.0.1:$http_port/metrics" | grep -E '^tandem_replicator_(events_copied_total|lag_events|lag_seconds|group_syncs_total|duplicates)' || true
