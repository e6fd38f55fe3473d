#!/usr/bin/env bash
# What TLS on the gateway -> node link costs (not a test). The same two regions behind
# the gateway, reached
#   plain - http://, the gateway's own HTTP/1.1 pool
#   mtls  - https:// with the CA pinned (GATEWAY_NODE_CA) and mutual TLS (the node
#           requires the gateway's client certificate: NODE_TLS_CLIENT_CA)
# Load: wrk (closed loop, -t1 -c CONNS) on a product read through the gateway, so
# every request crosses the link. Reported per run: requests/s, and CPU per request of
# the gateway and of the active node (utime+stime from /proc/PID/stat before and after,
# divided by the requests wrk completed). Rounds alternate the two modes; the summary
# gives medians. The pool keeps connections, so TLS costs per-record encryption, not a
# handshake per request.
#
# Usage: bash bench/internal-tls.sh
#   env: BIN=target/release (BIN=target/debug for a quick look) ROUNDS=3 DURATION=5s
#        CONNS=16 WORKERS=$(nproc)
# Needs: redis-server, wrk, curl, openssl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
CONNS=${CONNS:-16}
WORKERS=${WORKERS:-$(nproc)}
. bench/lib.sh
bench_workdir tandem-internal-tls-bench
WAIT_HTTP_TRIES=400

# A CA, a server certificate for localhost/127.0.0.1 (both nodes) and a client
# certificate (the gateway; also curl's, to wait for the nodes).
mkdir -p "$WORK/tls"
(
    cd "$WORK/tls"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -days 2 -subj "/CN=tandem bench CA" -out ca.pem 2>/dev/null
    for who in server client; do
        eku=serverAuth; [ "$who" = client ] && eku=clientAuth
        printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' "$eku" >"$who.ext"
        openssl ecparam -name prime256v1 -genkey -noout -out "$who.key" 2>/dev/null
        openssl req -new -key "$who.key" -subj "/CN=$who" -out "$who.csr" 2>/dev/null
        openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile "$who.ext" -out "$who.pem" 2>/dev/null
    done
)
T=$WORK/tls

RA=$(free_port); RB=$(free_port)
redis-server --port "$RA" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-a.log" 2>&1 &
PIDS+=($!)
redis-server --port "$RB" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-b.log" 2>&1 &
PIDS+=($!)
sleep 0.3

run() { # mode -> "rps gateway_us node_us"
    local mode=$1 scheme=http tls_node=() tls_gw=() curl_tls=()
    if [ "$mode" = mtls ]; then
        scheme=https
        tls_node=(NODE_TLS_CERT="$T/server.pem" NODE_TLS_KEY="$T/server.key" NODE_TLS_CLIENT_CA="$T/ca.pem")
        tls_gw=(GATEWAY_NODE_CA="$T/ca.pem" GATEWAY_NODE_CLIENT_CERT="$T/client.pem" GATEWAY_NODE_CLIENT_KEY="$T/client.key")
        curl_tls=(--cacert "$T/ca.pem" --cert "$T/client.pem" --key "$T/client.key")
    fi
    local na nb gw
    na=$(free_port); nb=$(free_port); gw=$(free_port)
    redis-cli -p "$RA" flushall >/dev/null; redis-cli -p "$RB" flushall >/dev/null
    env "${tls_node[@]}" NODE_REGION=a NODE_LISTEN=127.0.0.1:$na NODE_REDIS_URL=redis://127.0.0.1:$RA \
        NODE_ROLE=standby NODE_ADMIN_TOKEN=bench RUST_LOG=warn "$BIN/regional-node" >>"$WORK/node-a.log" 2>&1 &
    local node_a=$!
    env "${tls_node[@]}" NODE_REGION=b NODE_LISTEN=127.0.0.1:$nb NODE_REDIS_URL=redis://127.0.0.1:$RB \
        NODE_ROLE=standby NODE_ADMIN_TOKEN=bench RUST_LOG=warn "$BIN/regional-node" >>"$WORK/node-b.log" 2>&1 &
    local node_b=$!
    wait_http "$scheme://localhost:$na/health/live" "${curl_tls[@]}"
    wait_http "$scheme://localhost:$nb/health/live" "${curl_tls[@]}"
    env "${tls_gw[@]}" GATEWAY_LISTEN=127.0.0.1:$gw \
        GATEWAY_REGIONS="a=$scheme://localhost:$na,b=$scheme://localhost:$nb" \
        GATEWAY_PRIMARY=a GATEWAY_STATE_DIR="$WORK/state-$mode-$gw" \
        GATEWAY_NODE_TOKEN=bench GATEWAY_ADMIN_TOKEN=bench GATEWAY_WORKERS="$WORKERS" \
        GATEWAY_RATE_LIMIT_PER_SEC=0 \
        GATEWAY_HEALTH_TIMEOUT_MS=1000 GATEWAY_CONNECT_TIMEOUT_MS=1000 GATEWAY_LEASE_MS=5000 \
        RUST_LOG=warn "$BIN/gateway" >>"$WORK/gateway.log" 2>&1 &
    local gw_pid=$!
    for _ in $(seq 1 400); do
        curl -fsS "http://127.0.0.1:$gw/gateway/health" 2>/dev/null | grep -q '"writes":true' && break
        sleep 0.05
    done
    curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
        -d '{"name":"Bench","price":100,"currency":"USD","stock":1000}' \
        "http://127.0.0.1:$gw/api/v1/products/BENCH-1"
    wait_http "http://127.0.0.1:$gw/api/v1/products/BENCH-1"
    local g0 n0 g1 n1 out rps total
    g0=$(cpu_ticks "$gw_pid"); n0=$(cpu_ticks "$node_a")
    out=$(wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$gw/api/v1/products/BENCH-1")
    g1=$(cpu_ticks "$gw_pid"); n1=$(cpu_ticks "$node_a")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    kill "$gw_pid" "$node_a" "$node_b" 2>/dev/null || true
    wait "$gw_pid" "$node_a" "$node_b" 2>/dev/null || true
    python3 -c "import sys; r,t,g,n,hz=map(float,sys.argv[1:]); print(f'{r:.0f} {(g*1e6/hz)/t:.0f} {(n*1e6/hz)/t:.0f}')" \
        "$rps" "$total" "$((g1 - g0))" "$((n1 - n0))" "$HZ"
}

declare -A results
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round: $(uptime)"
    for mode in plain mtls; do
        r=$(run "$mode")
        echo "  $mode: requests/s, gateway CPU us/request, node CPU us/request = $r"
        results[$mode]+="$r;"
    done
done
echo "medians over $ROUNDS rounds (requests/s, gateway us/req, node us/req):"
for mode in plain mtls; do
    python3 -c "
import statistics, sys
rows=[list(map(float, r.split())) for r in sys.argv[2].split(';') if r.strip()]
print(sys.argv[1], *[round(statistics.median(c)) for c in zip(*rows)])
" "$mode" "${results[$mode]}"
done
