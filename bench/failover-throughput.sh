#!/usr/bin/env bash
# Failover throughput benchmark (not a test): orders/s acknowledged through the gateway
# before and after the active region is SIGKILLed (node and Redis), and the RTO, per
# durability mode (async; replicated with NODE_REPLICATED_FALLBACK=async; and =refuse).
# Closed-loop clients, each order with its own Idempotency-Key, retried until answered.
#
# Usage: bench/failover-throughput.sh [SECONDS] [CLIENTS] [RUNS]     (10 16 3)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-10}
CLIENTS=${2:-16}
RUNS=${3:-3}
command -v redis-server >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update </dev/null >/dev/null
    apt-get install -y --no-install-recommends redis-server </dev/null >/dev/null
}
cargo build --release -q --bins
for i in $(seq 1 "$RUNS"); do
    echo "## run $i"
    TANDEM_BIN_DIR="$PWD/target/release" ./target/release/failover_bench \
        --seconds "$SECONDS_PER_RUN" --clients "$CLIENTS" \
        --modes async,replicated,replicated-refuse
done
