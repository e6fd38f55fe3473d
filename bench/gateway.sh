#!/usr/bin/env bash
# Gateway benchmark (not a test): requests/s and latency of
#   direct  - wrk straight to one regional node
#   nginx   - nginx reverse proxy (keep-alive upstream pool) in front of that node
#   haproxy - HAProxy (http-reuse always, one thread per core) in front of that node,
#             when installed
#   gateway - the Tandem gateway in front of the same node
# with the same load tool (wrk) and the same settings, in one run, rounds interleaved.
# Then, unless DRILL=0, the failover drills with release binaries, which print the RTO.
#
# Usage: bash bench/gateway.sh            (env: DURATION=10s CONNS=64 THREADS=2 ROUNDS=2)
# Needs: redis-server, nginx, wrk, curl, python3 (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-2}
DRILL=${DRILL:-1}

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update </dev/null >/dev/null
    apt-get install -y --no-install-recommends "${need[@]}" </dev/null >/dev/null
fi

cargo build --release -p gateway -p regional-node -p replicator 2>&1 | tail -1

WORK=$(mktemp -d /tmp/tandem-bench-XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_http() { # url
    for _ in $(seq 1 200); do
        if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "no answer from $1; logs:" >&2
    tail -n 20 "$WORK"/*.log "$WORK"/nginx/error.log 2>/dev/null >&2 || true
    return 1
}

RA=$(free_port); RB=$(free_port); NA=$(free_port); NB=$(free_port); NG=$(free_port); GW=$(free_port)
HP=$(free_port)
redis-server --port "$RA" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-a.log" 2>&1 &
PIDS+=($!)
redis-server --port "$RB" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-b.log" 2>&1 &
PIDS+=($!)
sleep 0.3

start_node() { # region port redis_port role
    NODE_REGION=$1 NODE_LISTEN=127.0.0.1:$2 NODE_REDIS_URL=redis://127.0.0.1:$3 NODE_ROLE=$4 \
        NODE_ADMIN_TOKEN=bench RUST_LOG=warn target/release/regional-node >"$WORK/node-$1.log" 2>&1 &
    PIDS+=($!)
}
start_node a "$NA" "$RA" standby
start_node b "$NB" "$RB" standby
wait_http "http://127.0.0.1:$NA/health/live"
wait_http "http://127.0.0.1:$NB/health/live"

GATEWAY_LISTEN=127.0.0.1:$GW \
GATEWAY_REGIONS="a=http://127.0.0.1:$NA,b=http://127.0.0.1:$NB" \
GATEWAY_PRIMARY=a GATEWAY_STATE_DIR="$WORK/gateway-state" \
GATEWAY_NODE_TOKEN=bench GATEWAY_ADMIN_TOKEN=bench \
GATEWAY_RATE_LIMIT_PER_SEC=0 RUST_LOG=warn \
    target/release/gateway >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$GW/gateway/health"

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    upstream node { server 127.0.0.1:$NA; keepalive 256; }
    server {
        listen 127.0.0.1:$NG;
        location / {
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Request-Id \$request_id;
        }
    }
}
EOF
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
wait_http "http://127.0.0.1:$NG/health/live"

TARGETS="direct nginx gateway"
if command -v haproxy >/dev/null; then
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread $(nproc)
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:$HP
    default_backend be
backend be
    server a 127.0.0.1:$NA
EOF
    haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$HP/health/live"
    TARGETS="direct nginx haproxy gateway"
fi

curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
    -d '{"name":"Bench","price":1000,"currency":"USD","stock":1000000}' \
    "http://127.0.0.1:$GW/api/v1/products/BENCH-1"

run_wrk() { # name url -> "rps p50_ms p99_ms"
    local out
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$2" 2>&1)
    echo "$out" >"$WORK/wrk-$1.txt"
    python3 - "$out" <<'PY'
import re, sys
t = sys.argv[1]
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n * 1000 if u == "s" else n
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"\s50%\s+(\S+)", t).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: (.*)", t)
print(f"{rps:.0f} {p50:.3f} {p99:.3f} {errs.group(1) if errs else 0} {'sock-errors' if sock else 'ok'}")
PY
}

declare -A RPS P99 P50
echo
echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency; $ROUNDS rounds interleaved; $(nproc) cores"
printf '%-8s %-28s %10s %9s %9s %6s\n' target path rps p50_ms p99_ms non2xx
for path in /health/live /api/v1/products/BENCH-1; do
    for round in $(seq 1 "$ROUNDS"); do
        for target in $TARGETS; do
            case $target in
                direct) port=$NA ;;
                nginx) port=$NG ;;
                haproxy) port=$HP ;;
                gateway) port=$GW ;;
            esac
            read -r rps p50 p99 non2xx sock < <(run_wrk "$target-$round" "http://127.0.0.1:$port$path")
            printf '%-8s %-28s %10s %9s %9s %6s %s\n' "$target" "$path" "$rps" "$p50" "$p99" "$non2xx" "$sock"
            key="$target $path"
            RPS[$key]="${RPS[$key]:-} $rps"
            P99[$key]="${P99[$key]:-} $p99"
        done
    done
done

echo
echo "summary (mean over rounds):"
for path in /health/live /api/v1/products/BENCH-1; do
    python3 - "$path" "${RPS[direct $path]}" "${RPS[nginx $path]}" "${RPS[gateway $path]}" \
        "${P99[direct $path]}" "${P99[nginx $path]}" "${P99[gateway $path]}" \
        "${RPS[haproxy $path]:-0}" "${P99[haproxy $path]:-0}" <<'PY'
import sys
path = sys.argv[1]
m = lambda s: sum(map(float, s.split())) / len(s.split())
rd, rn, rg, pd, pn, pg, rh, ph = (m(a) for a in sys.argv[2:10])
hap = f"; haproxy {rh:.0f} rps, p99 {ph:.2f} ms (gateway/haproxy {rg / rh:.2f}x)" if rh else ""
print(f"  {path}: rps direct {rd:.0f}, nginx {rn:.0f}, gateway {rg:.0f} "
      f"-> gateway/nginx {rg / rn:.2f}x; p99 direct {pd:.2f} ms, nginx {pn:.2f} ms, "
      f"gateway {pg:.2f} ms -> gateway adds {pg - pd:+.2f} ms over direct{hap}")
PY
done

if [ "$DRILL" = "1" ]; then
    echo
    echo "failover drills with release binaries (RTO = kill/SIGSTOP/cut to first order served by b):"
    TANDEM_BIN_DIR="$PWD/target/release" cargo test -q -p system-tests --test gateway_failover \
        -- --nocapture --test-threads 1 2>&1 | grep -oE '\[drill\].*|test result.*' || true
fi
