#!/usr/bin/env bash
# Cost of checking access tokens at the gateway (not a test): the same gateway binary
# in front of the same node, once with auth off and once with a JWKS (RS256 and ES256
# tokens), product reads with wrk, rounds interleaved; requests/s and gateway CPU per
# request (utime+stime from /proc/PID/stat), as ratios to auth off measured in the run.
#
# Usage: bash bench/gateway-auth.sh        (env: DURATION=10s CONNS=64 THREADS=2 ROUNDS=3
#        GATEWAY_BIN=target/release/gateway, BUILD=1: cargo build first, 0: do not)
# Needs: redis-server, wrk, curl, openssl, python3 (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
GATEWAY_BIN=${GATEWAY_BIN:-target/release/gateway}

. bench/lib.sh
bench_need redis-server wrk curl openssl

if [ "${BUILD:-1}" = 1 ]; then
    cargo build --release -p gateway -p regional-node 2>&1 | tail -1
fi

bench_workdir tandem-bench-auth

# Keys, JWKS and long-lived tokens (bench/lib.sh).
make_jwks "$WORK" https://idp.bench/ tandem-api bench orders:read

RA=$(free_port); RB=$(free_port); NA=$(free_port); NB=$(free_port); OFF=$(free_port); ON=$(free_port)
for port in "$RA" "$RB"; do
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-$port.log" 2>&1 &
    PIDS+=($!)
done
sleep 0.3
for r in a:$NA:$RA b:$NB:$RB; do
    IFS=: read -r region port redis <<<"$r"
    NODE_REGION=$region NODE_LISTEN=127.0.0.1:$port NODE_REDIS_URL=redis://127.0.0.1:$redis \
        NODE_ROLE=standby NODE_ADMIN_TOKEN=bench RUST_LOG=warn \
        target/release/regional-node >"$WORK/node-$region.log" 2>&1 &
    PIDS+=($!)
done
wait_http "http://127.0.0.1:$NA/health/live"
wait_http "http://127.0.0.1:$NB/health/live"

start_gateway() { # name port [auth env...]
    local name=$1 port=$2
    shift 2
    env GATEWAY_LISTEN=127.0.0.1:$port \
        GATEWAY_REGIONS="a=http://127.0.0.1:$NA,b=http://127.0.0.1:$NB" \
        GATEWAY_PRIMARY=a GATEWAY_STATE_DIR="$WORK/state-$name" \
        GATEWAY_NODE_TOKEN=bench GATEWAY_ADMIN_TOKEN=bench \
        GATEWAY_RATE_LIMIT_PER_SEC=0 RUST_LOG=warn "$@" \
        "$GATEWAY_BIN" >"$WORK/gateway-$name.log" 2>&1 &
    PIDS+=($!)
    eval "PID_$name=$!"
    wait_http "http://127.0.0.1:$port/gateway/health"
}
# Both gateways control the same two nodes; the second one adopts the active region.
start_gateway off "$OFF"
start_gateway on "$ON" GATEWAY_AUTH_JWKS="$WORK/jwks.json" \
    GATEWAY_AUTH_ISSUER=https://idp.bench/ GATEWAY_AUTH_AUDIENCE=tandem-api

curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
    -d '{"name":"Bench","price":1000,"currency":"USD","stock":1000000}' \
    "http://127.0.0.1:$OFF/api/v1/products/BENCH-1"
RS=$(cat "$WORK/RS256.token")
ES=$(cat "$WORK/ES256.token")
for t in "$RS" "$ES"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $t" "http://127.0.0.1:$ON/api/v1/products/BENCH-1")
    [ "$code" = 200 ] || { echo "token refused ($code)" >&2; tail "$WORK/gateway-on.log" >&2; exit 1; }
done


run() { # name pid port [header] -> "rps cpu_us_per_request non2xx"
    local name=$1 pid=$2 port=$3 header=${4:-} before after out
    before=$(cpu_ticks "$pid")
    if [ -n "$header" ]; then
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" -H "$header" "http://127.0.0.1:$port/api/v1/products/BENCH-1" 2>&1)
    else
        out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$port/api/v1/products/BENCH-1" 2>&1)
    fi
    after=$(cpu_ticks "$pid")
    python3 - "$out" "$before" "$after" "$(getconf CLK_TCK)" <<'PY'
import re, sys
t, before, after, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
n = int(re.search(r"(\d+) requests in", t).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
bad = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
print(f"{rps:.0f} {(after - before) / hz / n * 1e6:.1f} {bad.group(1) if bad else 0}")
PY
}

declare -A RPS CPU
echo
echo "GET /api/v1/products/BENCH-1, wrk -t$THREADS -c$CONNS -d$DURATION; $ROUNDS rounds interleaved; $(nproc) cores"
printf '%-10s %10s %14s %7s\n' case rps cpu_us/req non2xx
for round in $(seq 1 "$ROUNDS"); do
    for case in off rs256 es256; do
        case $case in
            off) line=$(run off "$PID_off" "$OFF") ;;
            rs256) line=$(run on "$PID_on" "$ON" "Authorization: Bearer $RS") ;;
            es256) line=$(run on "$PID_on" "$ON" "Authorization: Bearer $ES") ;;
        esac
        read -r rps cpu bad <<<"$line"
        printf '%-10s %10s %14s %7s\n' "$case" "$rps" "$cpu" "$bad"
        RPS[$case]="${RPS[$case]:-} $rps"
        CPU[$case]="${CPU[$case]:-} $cpu"
    done
done
echo
python3 - "${RPS[off]}" "${RPS[rs256]}" "${RPS[es256]}" "${CPU[off]}" "${CPU[rs256]}" "${CPU[es256]}" <<'PY'
import sys
m = lambda s: sum(map(float, s.split())) / len(s.split())
ro, rr, re_, co, cr, ce = (m(a) for a in sys.argv[1:7])
print(f"summary (mean): auth off {ro:.0f} rps, {co:.1f} us CPU/request; "
      f"RS256 {rr:.0f} rps ({rr / ro:.2f}x), {cr:.1f} us ({cr / co:.2f}x); "
      f"ES256 {re_:.0f} rps ({re_ / ro:.2f}x), {ce:.1f} us ({ce / co:.2f}x)")
PY
