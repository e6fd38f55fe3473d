#!/usr/bin/env bash
# Controller drill benchmark (not a test): recovery time (RTO) when the gateway that
# controls failover dies together with the active region, next to the single-gateway
# region kill, N runs each, release binaries.
#
#   single     - one gateway (epoch in a file) in front of two replicated regions; region
#                a's node and Redis SIGKILLed (tests/tests/gateway_failover.rs,
#                order_stream_survives_killing_the_active_region).
#   controller - two gateways sharing control through a three-member etcd cluster
#                (Debian's etcd-server, 1 s controller lease); the controlling gateway,
#                a's node and a's Redis SIGKILLed at once; clients switch gateway on every
#                request (tests/tests/gateway_controllers.rs,
#                controller_and_active_region_die_together_and_b_is_promoted_once).
#
# RTO: from the kill to the first order answered 201 by region b. Goal: under 2 s.
# Usage: bench/controller-drill.sh [N]          (N=10)
# Variables: BIN_DIR [target/release]; BUILD=0 skips `cargo build --release` (e.g. to
# time the debug binaries the tests use: RTO is mostly timeouts, not CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}

. bench/lib.sh
bench_need redis-server etcd:etcd-server
if [ "${BUILD:-1}" = 1 ]; then
    cargo build --release -q --bins -p regional-node -p replicator -p gateway
fi

OUT=$(mktemp /tmp/tandem-controller-drill-XXXXXX)
trap 'rm -f "$OUT"' EXIT
BIN_DIR=${BIN_DIR:-target/release}
export TANDEM_BIN_DIR="$(cd "$BIN_DIR" && pwd)"
for i in $(seq 1 "$N"); do
    echo "## run $i/$N" >&2
    cargo test -q -p system-tests --test gateway_failover -- --nocapture --test-threads 1 \
        order_stream_survives_killing_the_active_region 2>&1 |
        grep -oE '\[drill\] kill: first order from b [0-9.]+(ms|s|µs)' >>"$OUT" || true
    cargo test -q -p system-tests --test gateway_controllers -- --nocapture --test-threads 1 \
        controller_and_active_region_die_together_and_b_is_promoted_once 2>&1 |
        grep -oE '\[drill\] controller\+region kill: first order from b [0-9.]+(ms|s|µs)' >>"$OUT" || true
done

python3 - "$OUT" "$N" <<'PY'
import re, sys

sys.path.insert(0, "bench")
from rto import pct, secs

rto = {"single": [], "controller": []}
for line in open(sys.argv[1]):
    m = re.search(r"\[drill\] (kill|controller\+region kill): first order from b (\S+)", line)
    if m:
        rto["single" if m.group(1) == "kill" else "controller"].append(secs(m.group(2)))
print(f"runs asked: {sys.argv[2]}")
print("drill                                  runs  RTO p50    RTO p95    max")
names = {"single": "single gateway: region a killed",
         "controller": "controller gateway + region a killed"}
for k in ("single", "controller"):
    v = rto[k]
    print(f"{names[k]:38} {len(v):4}  {pct(v, .5) * 1000:7.0f} ms {pct(v, .95) * 1000:7.0f} ms "
          f"{max(v, default=float('nan')) * 1000:7.0f} ms")
s, c = rto["single"], rto["controller"]
if s and c:
    print(f"ratio controller/single at p50: {pct(c, .5) / pct(s, .5):.2f}x")
PY
