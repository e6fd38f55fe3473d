#!/usr/bin/env bash
# What tracing costs (a benchmark, not a test). Compares, in one run with rounds
# interleaved, three builds of the hot paths:
#   base - the binaries in $BASE (e.g. release binaries of the commit before tracing)
#   off  - this tree's release binaries, no OTEL_EXPORTER_OTLP_ENDPOINT (spans disabled)
#   on   - this tree's release binaries exporting every span to a local OTLP sink
# and reports
#   gateway: CPU per proxied request (utime+stime of the gateway from /proc/PID/stat over
#            a wrk run on a product read, divided by the requests wrk counted), req/s, p99;
#   node:    CPU per shipped order (the node's, the same way) and POST->SHIPPED p99 at a
#            fixed order rate (order_bench, open loop).
# Ratios are against "base" measured in the same run.
#
# Usage: BASE=/tmp/tandem-base [NEW=dir] bash bench/tracing.sh
#        (env: DURATION=10s CONNS=64 ROUNDS=3 RATE=1000 SECONDS_PER_RUN=10 PARTS="gateway node")
# Needs: redis-server, wrk, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:?set BASE to a directory with the baseline gateway and regional-node binaries}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-1000}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
PARTS=${PARTS:-gateway node}

# NEW: another build's binaries instead of this tree's release build.
if [ -z "${NEW:-}" ]; then
    cargo build --release -q -p gateway -p regional-node -p system-tests --bins
    NEW=$PWD/target/release
fi

. bench/lib.sh
bench_workdir tandem-bench-tracing
WAIT_HTTP_TRIES=400

# An OTLP/HTTP sink: accepts POST /v1/traces and counts the bytes; answers 200.
SINK=$(free_port)
python3 - "$SINK" >"$WORK/sink.log" 2>&1 <<'PY' &
import sys
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
PIDS+=($!)

bin_of() { case $1 in base) echo "$BASE" ;; *) echo "$NEW" ;; esac; }
env_of() { case $1 in on) echo "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$SINK" ;; *) echo "TANDEM_BENCH=1" ;; esac; }

start_redis() { # port
    redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
        --daemonize yes --logfile "$WORK/redis-$1.log" --pidfile "$WORK/redis-$1.pid"
    until redis-cli -p "$1" ping >/dev/null 2>&1; do sleep 0.05; done
}
stop_redis() { redis-cli -p "$1" shutdown nosave >/dev/null 2>&1 || true; }

# ---------------------------------------------------------------------------------------
if [[ " $PARTS " == *" gateway "* ]]; then
    RA=$(free_port); RB=$(free_port); NA=$(free_port); NB=$(free_port)
    start_redis "$RA"; start_redis "$RB"
    for r in a b; do
        port=$NA; rp=$RA; [ $r = b ] && { port=$NB; rp=$RB; }
        NODE_REGION=$r NODE_LISTEN=127.0.0.1:$port NODE_REDIS_URL=redis://127.0.0.1:$rp \
            NODE_ROLE=standby NODE_ADMIN_TOKEN=bench RUST_LOG=warn \
            "$NEW/regional-node" >"$WORK/node-$r.log" 2>&1 &
        PIDS+=($!)
    done
    wait_http "http://127.0.0.1:$NA/health/live"; wait_http "http://127.0.0.1:$NB/health/live"
    STATE=$WORK/gateway-state
    echo
    echo "## gateway: wrk -t2 -c$CONNS -d$DURATION on a product read through the gateway; $ROUNDS rounds; $(nproc) cores"
    printf '%-5s %6s %10s %9s %14s\n' build round req/s p99_ms cpu_us/req
    for round in $(seq 1 "$ROUNDS"); do
        for v in ${VARIANTS:-base off on}; do
            GW=$(free_port)
            env $(env_of $v) GATEWAY_LISTEN=127.0.0.1:$GW \
                GATEWAY_REGIONS="a=http://127.0.0.1:$NA,b=http://127.0.0.1:$NB" \
                GATEWAY_PRIMARY=a GATEWAY_STATE_DIR="$STATE" GATEWAY_NODE_TOKEN=bench \
                GATEWAY_ADMIN_TOKEN=bench GATEWAY_RATE_LIMIT_PER_SEC=0 RUST_LOG=warn \
                "$(bin_of $v)/gateway" >"$WORK/gateway-$v-$round.log" 2>&1 &
            gw=$!
            wait_http "http://127.0.0.1:$GW/gateway/health"
            url="http://127.0.0.1:$GW/api/v1/products/BENCH-1"
            until curl -fsS -o /dev/null "$url" 2>/dev/null; do
                curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
                    -d '{"name":"Bench","price":1000,"currency":"USD","stock":1000000}' \
                    "http://127.0.0.1:$GW/api/v1/products/BENCH-1" 2>/dev/null || sleep 0.1
            done
            wrk -t2 -c"$CONNS" -d2s "$url" >/dev/null 2>&1 # warm-up
            c0=$(cpu_ticks $gw)
            out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency "$url" 2>&1)
            c1=$(cpu_ticks $gw)
            kill $gw; wait $gw 2>/dev/null || true
            python3 - "$out" "$((c1 - c0))" "$HZ" "$v" "$round" >>"$WORK/gateway.txt" <<'PY'
import re, sys
t, ticks, hz, v, rnd = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
def ms(x):
    m = re.match(r"([\d.]+)(us|ms|s)", x); n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n * 1000 if u == "s" else n
reqs = int(re.search(r"(\d+) requests in", t).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
print(v, rnd, f"{rps:.0f}", f"{p99:.2f}", f"{ticks * 1e6 / hz / reqs:.1f}")
PY
            tail -n1 "$WORK/gateway.txt" | awk '{printf "%-5s %6s %10s %9s %14s\n", $1, $2, $3, $4, $5}'
        done
    done
    python3 - "$WORK/gateway.txt" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
by = {v: [r for r in rows if r[0] == v] for v in ("base", "off", "on") if any(r[0] == v for r in rows)}
med = lambda v, i: st.median(float(r[i]) for r in by[v])
b = med("base", 4)
print("gateway medians: " + "; ".join(
    f"{v} {med(v, 4):.1f} us/req ({med(v, 4) / b:.2f}x base), {med(v, 2):.0f} req/s, p99 {med(v, 3):.2f} ms"
    for v in by))
PY
    for p in "${PIDS[@]:1}"; do kill "$p" 2>/dev/null || true; done
    stop_redis "$RA"; stop_redis "$RB"
fi

# ---------------------------------------------------------------------------------------
if [[ " $PARTS " == *" node "* ]]; then
    echo
    echo "## node: order_bench at $RATE orders/s for ${SECONDS_PER_RUN}s (fresh Redis each run); $ROUNDS rounds"
    printf '%-5s %6s %9s %14s %16s\n' build round shipped cpu_us/order shipped_p99_ms
    for round in $(seq 1 "$ROUNDS"); do
        for v in ${VARIANTS:-base off on}; do
            RP=$(free_port); NP=$(free_port)
            start_redis "$RP"
            env $(env_of $v) NODE_REGION=a NODE_ROLE=active NODE_LISTEN=127.0.0.1:$NP \
                NODE_REDIS_URL=redis://127.0.0.1:$RP RUST_LOG=warn \
                "$(bin_of $v)/regional-node" >"$WORK/order-node-$v-$round.log" 2>&1 &
            node=$!
            until curl -sf "http://127.0.0.1:$NP/health/ready" >/dev/null; do sleep 0.05; done
            c0=$(cpu_ticks $node)
            csv=$("$NEW/order_bench" --node "http://127.0.0.1:$NP" --redis "redis://127.0.0.1:$RP" \
                --rates "$RATE" --seconds "$SECONDS_PER_RUN")
            c1=$(cpu_ticks $node)
            shipped=$(redis-cli -p "$RP" hget tandem:stats:orders SHIPPED)
            kill $node; wait $node 2>/dev/null || true
            stop_redis "$RP"
            p99=$(echo "$csv" | awk -F, 'NR==2 {print $9}')
            cpu=$(python3 -c "print(f'{($c1 - $c0) * 1e6 / $HZ / max(1, ${shipped:-0}):.0f}')")
            echo "$v $round ${shipped:-0} $cpu $p99" >>"$WORK/node.txt"
            printf '%-5s %6s %9s %14s %16s\n' "$v" "$round" "${shipped:-0}" "$cpu" "$p99"
        done
    done
    python3 - "$WORK/node.txt" <<'PY'
import sys, statistics as st
rows = [l.split() for l in open(sys.argv[1])]
by = {v: [r for r in rows if r[0] == v] for v in ("base", "off", "on") if any(r[0] == v for r in rows)}
med = lambda v, i: st.median(float(r[i]) for r in by[v])
b = med("base", 3)
print("node medians: " + "; ".join(
    f"{v} {med(v, 3):.0f} us/order ({med(v, 3) / b:.2f}x base), shipped p99 {med(v, 4):.1f} ms"
    for v in by))
PY
fi
