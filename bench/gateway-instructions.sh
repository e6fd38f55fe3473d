#!/usr/bin/env bash
# User-space instructions per proxied request (not a test), counted by valgrind's
# callgrind, of the gateway, nginx and HAProxy in front of the same regional node:
# unlike CPU time, the count does not move with other work on the machine, so it
# compares builds and proxies on a loaded machine. The kernel's share (the same
# read/write/epoll calls for all three) is not in it: bench/gateway.sh measures the
# CPU time.
#
# Each proxy runs alone under callgrind with one worker (gateway GATEWAY_WORKERS=1,
# nginx one worker process without master, HAProxy one thread) and the same header
# work as in bench/gateway.sh; wrk warms it up, then counting is switched on for a
# closed-loop run (wrk -t1 -c8) and the count is divided by the requests wrk completed.
# Background work in that window (the gateway's health probes, its lease renewals) is
# counted too: a few percent at most.
#
# Usage: bash bench/gateway-instructions.sh
#   env: SECONDS_PER_RUN=8 PATHS="/health/live /api/v1/products/BENCH-1"
#        TARGETS="gateway nginx haproxy" GATEWAYS="gateway=target/release/gateway"
#        BUILD=1 (scripts/build-release.sh, the gateway with PGO as shipped; 0: use the
#        binaries as they are)
#        CACHE_SIM=1 (also simulate the caches: instruction-cache and data-cache misses
#        per request, I1mr D1mr D1mw; valgrind's model of a 32 KiB I1 and this CPU's D1)
#        KEEP_PROFILES=DIR (keep each callgrind profile as DIR/<proxy>-<path>.cg, for
#        callgrind_annotate)
# Needs: valgrind, redis-server, nginx, wrk, curl, python3; HAProxy when installed.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER_RUN=${SECONDS_PER_RUN:-8}
CACHE_SIM=${CACHE_SIM:-0}
KEEP_PROFILES=${KEEP_PROFILES:-}
PATHS=${PATHS:-/health/live /api/v1/products/BENCH-1}
GATEWAYS=${GATEWAYS:-gateway=target/release/gateway}
BUILD=${BUILD:-1}

. bench/lib.sh
bench_need valgrind
if [ "$BUILD" = "1" ]; then
    # As shipped: the gateway with profile-guided optimization.
    scripts/build-release.sh 2>&1 | tail -1
fi

bench_workdir tandem-instr
# A proxy under valgrind starts slowly: up to a minute.
WAIT_HTTP_TRIES=600 WAIT_HTTP_SLEEP=0.1

RA=$(free_port); RB=$(free_port); NA=$(free_port); NB=$(free_port)
redis-server --port "$RA" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-a.log" 2>&1 &
PIDS+=($!)
redis-server --port "$RB" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-b.log" 2>&1 &
PIDS+=($!)
sleep 0.3
for r in a b; do
    port=$NA redis=$RA
    [ "$r" = b ] && port=$NB redis=$RB
    NODE_REGION=$r NODE_LISTEN=127.0.0.1:$port NODE_REDIS_URL=redis://127.0.0.1:$redis \
        NODE_ROLE=standby NODE_ADMIN_TOKEN=bench RUST_LOG=warn target/release/regional-node \
        >"$WORK/node-$r.log" 2>&1 &
    PIDS+=($!)
done
wait_http "http://127.0.0.1:$NA/health/live"
wait_http "http://127.0.0.1:$NB/health/live"

# Counts instructions of the process valgrind runs as $1 (pid) on url $2.
count() { # pid url name
    local pid=$1 url=$2 name=$3 out n ir
    wrk -t1 -c8 -d2s "$url" >/dev/null
    callgrind_control -i on "$pid" >/dev/null 2>&1
    out=$(wrk -t1 -c8 -d"${SECONDS_PER_RUN}s" "$url")
    callgrind_control -i off "$pid" >/dev/null 2>&1
    rm -f "$WORK/cg.out."*
    callgrind_control -d "$pid" >/dev/null 2>&1
    echo "$out" >"$WORK/wrk-$name.txt"
    n=$(echo "$out" | grep -oE '[0-9]+ requests in' | grep -oE '^[0-9]+')
    if [ "${n:-0}" -eq 0 ]; then
        echo "$name: no request completed under valgrind; wrk said:" >&2
        echo "$out" >&2
        return 0
    fi
    non2xx=$(echo "$out" | grep -oE 'Non-2xx or 3xx responses: [0-9]+' | grep -oE '[0-9]+$' || echo 0)
    for _ in $(seq 1 300); do ls "$WORK"/cg.out.* >/dev/null 2>&1 && break; sleep 0.1; done
    sleep 1
    # PROGRAM TOTALS: the event counts, each followed by its share "(100.0%)".
    totals=$(callgrind_annotate "$(ls "$WORK"/cg.out.* | head -n 1)" 2>/dev/null \
        | grep -m 1 'PROGRAM TOTALS' | sed 's/([^)]*)//g; s/,//g' || true)
    ir=$(echo "$totals" | awk '{print $1}')
    if [ -n "$KEEP_PROFILES" ]; then
        mkdir -p "$KEEP_PROFILES"
        cp "$(ls "$WORK"/cg.out.* | head -n 1)" "$KEEP_PROFILES/$name-$(basename "$url").cg"
    fi
    if [ "$CACHE_SIM" = "1" ]; then
        # Events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
        misses=$(echo "$totals" | awk -v n="$n" '{printf "%8.0f %8.1f %8.1f", $4 / n, $5 / n, $6 / n}')
    else
        misses=""
    fi
    printf '%-10s %-28s %9s %12s %10s %7s %s\n' "$name" "${url#*[0-9]/}" "$n" "$ir" \
        "$((ir / n))" "$non2xx" "$misses"
}
# exec: the background job is valgrind itself, so $! is the pid callgrind_control needs.
cache_flag=()
[ "$CACHE_SIM" = "1" ] && cache_flag=(--cache-sim=yes)
callgrind() { exec valgrind --tool=callgrind --instr-atstart=no "${cache_flag[@]}" --callgrind-out-file="$WORK/cg.out" "$@"; }

header=""
[ "$CACHE_SIM" = "1" ] && header="    I1mr     D1mr     D1mw"
printf '%-10s %-28s %9s %12s %10s %7s %s\n' proxy path requests instructions per_req non2xx "$header"
# The gateway first: it makes region a active and writes the product the reads ask for.
for target in ${TARGETS:-gateway nginx haproxy}; do
    case $target in
        nginx)
            P=$(free_port)
            mkdir -p "$WORK/nginx"
            cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
master_process off;
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
    keepalive_requests 1000000;
    upstream node { server 127.0.0.1:$NA; keepalive 256; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$P;
        location / {
            proxy_pass http://node;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Request-Id \$request_id;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF
            callgrind nginx -c "$WORK/nginx.conf" -g 'daemon off;' >"$WORK/nginx.log" 2>&1 &
            pid=$!
            ;;
        haproxy)
            command -v haproxy >/dev/null || continue
            P=$(free_port)
            cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
    option forwardfor
    http-reuse always
frontend fe
    bind 127.0.0.1:$P
    http-request set-header X-Request-Id %[uuid]
    http-request set-header X-Forwarded-Proto http
    default_backend be
backend be
    server a 127.0.0.1:$NA
EOF
            callgrind haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
            pid=$!
            ;;
        *)
            bin=""
            for g in $GATEWAYS; do
                if [ "$target" = gateway ] || [ "${g%%=*}" = "$target" ]; then
                    bin="$bin ${g%%=*}=${g#*=}"
                fi
            done
            [ -n "$bin" ] || { echo "unknown target $target" >&2; exit 2; }
            for g in $bin; do
                P=$(free_port)
                # Probes and leases paced for a gateway slowed down by valgrind, and no
                # region judged down because a probe waited behind the load.
                GATEWAY_LISTEN=127.0.0.1:$P \
                    GATEWAY_REGIONS="a=http://127.0.0.1:$NA,b=http://127.0.0.1:$NB" \
                    GATEWAY_PRIMARY=a GATEWAY_STATE_DIR="$WORK/state" \
                    GATEWAY_NODE_TOKEN=bench GATEWAY_ADMIN_TOKEN=bench GATEWAY_WORKERS=1 \
                    GATEWAY_RATE_LIMIT_PER_SEC=10000000 GATEWAY_RATE_LIMIT_BURST=10000000 \
                    GATEWAY_HEALTH_INTERVAL_MS=1500 GATEWAY_HEALTH_TIMEOUT_MS=1000 \
                    GATEWAY_HEALTH_FALL=1000000 \
                    GATEWAY_LEASE_MS=10000 RUST_LOG=warn \
                    callgrind "${g#*=}" >"$WORK/gateway.log" 2>&1 &
                pid=$!
                wait_http "http://127.0.0.1:$P/gateway/health"
                curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
                    -d '{"name":"Bench","price":1000,"currency":"USD","stock":1000000}' \
                    "http://127.0.0.1:$P/api/v1/products/BENCH-1"
                for path in $PATHS; do count "$pid" "http://127.0.0.1:$P$path" "${g%%=*}"; done
                kill "$pid"
                wait "$pid" 2>/dev/null || true
            done
            continue
            ;;
    esac
    wait_http "http://127.0.0.1:$P/health/live"
    for path in $PATHS; do count "$pid" "http://127.0.0.1:$P$path" "$target"; done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
done
