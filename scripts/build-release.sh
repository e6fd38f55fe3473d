#!/usr/bin/env bash
# The release build as shipped: the three binaries in target/release, the gateway
# among them built with profile-guided optimization (PGO).
#
# The gateway's per-request work is spread thin over hundreds of functions of hyper,
# http, tokio, rustls and its own, so its user-space time goes as much to instruction-
# cache misses as to instructions. A build that knows which paths are hot lays them
# out together and inlines along them: callgrind counted 23,817 -> 18,835 instructions
# and 1,486 -> 777 instruction-cache misses per proxied product read (README, issue 12).
#
# How: the gateway is built once more with instrumentation (target/pgo-generate), run
# in front of a real regional node and Redis on free loopback ports while wrk and curl
# drive its hot paths over plain HTTP and TLS (health checks, product reads and
# writes, orders, unknown paths) and with access tokens checked (RS256 and ES256
# against a JWKS; no token, a bad one), stopped with SIGTERM so it writes its profile, and
# built a last time from that profile (target/pgo); that binary replaces
# target/release/gateway. Paths the training does not run (failover, retries) are
# laid out as cold code: correct, a little slower, and rare.
#
# Usage: scripts/build-release.sh [--no-pgo]
#   --no-pgo    only `cargo build --release` (also TANDEM_PGO=0)
#   env: TANDEM_PGO_SECONDS=4 (wrk seconds per path and scheme)
# Needs: redis-server, wrk, curl, openssl, python3 (installed with apt-get when
# missing) and rustup's llvm-tools component (added when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

PGO=${TANDEM_PGO:-1}
SECONDS_PER_PATH=${TANDEM_PGO_SECONDS:-4}
case "${1:-}" in
    --no-pgo) PGO=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "build-release: unknown argument '$1' (try --help)" >&2; exit 64 ;;
esac

say() { echo "build-release: $*" >&2; }
die() { say "$*"; exit 1; }

cargo build --release --bins -p regional-node -p replicator -p gateway
if [ "$PGO" = "0" ]; then
    say "done, without PGO: target/release/{regional-node,replicator,gateway}"
    exit 0
fi

. bench/lib.sh
bench_need redis-server wrk curl openssl python3

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    say "adding rustup's llvm-tools component (llvm-profdata)"
    rustup component add llvm-tools >&2 ||
        die "llvm-profdata is missing and 'rustup component add llvm-tools' failed; build without PGO with --no-pgo"
fi

bench_workdir tandem-pgo
# A fixed place, so the flags stay the same and the next build reuses the compiled
# dependencies.
RAW=$PWD/target/pgo-generate/profiles
say "building the instrumented gateway (target/pgo-generate)"
RUSTFLAGS="-Cprofile-generate=$RAW" CARGO_TARGET_DIR=target/pgo-generate \
    cargo build --release -p gateway
# Build scripts ran instrumented too; only the gateway's own runs count.
rm -rf "$RAW"

# A self-signed certificate for the TLS run (wrk does not check it, curl runs with -k).
(
    cd "$WORK"
    openssl ecparam -name prime256v1 -genkey -noout -out server.key 2>/dev/null
    openssl req -new -x509 -key server.key -subj /CN=localhost -days 1 \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -out server.pem 2>/dev/null
)

RA=$(free_port); RB=$(free_port); NA=$(free_port); NB=$(free_port); GW=$(free_port)
for r in "a $RA" "b $RB"; do
    set -- $r
    redis-server --port "$2" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-$1.log" 2>&1 &
    PIDS+=($!)
done
for r in "a $NA $RA" "b $NB $RB"; do
    set -- $r
    NODE_REGION=$1 NODE_LISTEN=127.0.0.1:$2 NODE_REDIS_URL=redis://127.0.0.1:$3 NODE_ROLE=standby \
        NODE_ADMIN_TOKEN=pgo RUST_LOG=warn target/release/regional-node >"$WORK/node-$1.log" 2>&1 &
    PIDS+=($!)
done
wait_http "http://127.0.0.1:$NA/health/live"
wait_http "http://127.0.0.1:$NB/health/live"

# Keys, a JWKS and a token signed with each key, for the run with access tokens.
make_jwks "$WORK" https://idp.pgo/ tandem-api pgo "orders:read orders:write"

train() { # scheme [auth]
    local scheme=$1 base="$1://127.0.0.1:$GW" extra=() pid i
    if [ "$scheme" = https ]; then
        extra=(GATEWAY_TLS_CERT="$WORK/server.pem" GATEWAY_TLS_KEY="$WORK/server.key")
    fi
    if [ "${2:-}" = auth ]; then
        extra+=(GATEWAY_AUTH_JWKS="$WORK/jwks.json" GATEWAY_AUTH_ISSUER=https://idp.pgo/
            GATEWAY_AUTH_AUDIENCE=tandem-api)
    fi
    env "${extra[@]}" GATEWAY_LISTEN=127.0.0.1:$GW \
        GATEWAY_REGIONS="a=http://127.0.0.1:$NA,b=http://127.0.0.1:$NB" GATEWAY_PRIMARY=a \
        GATEWAY_STATE_DIR="$WORK/gateway-state" GATEWAY_NODE_TOKEN=pgo GATEWAY_ADMIN_TOKEN=pgo \
        GATEWAY_RATE_LIMIT_PER_SEC=10000000 GATEWAY_RATE_LIMIT_BURST=10000000 \
        GATEWAY_HEALTH_TIMEOUT_MS=1000 GATEWAY_CONNECT_TIMEOUT_MS=1000 GATEWAY_LEASE_MS=5000 \
        RUST_LOG=warn target/pgo-generate/release/gateway >>"$WORK/gateway.log" 2>&1 &
    pid=$!
    PIDS+=($pid)
    wait_http "$base/gateway/health" -k
    if [ "${2:-}" = auth ]; then
        say "training over $scheme with access tokens"
        for alg in RS256 ES256; do
            wrk -t2 -c16 -d"${SECONDS_PER_PATH}s" -H "Authorization: Bearer $(cat "$WORK/$alg.token")" \
                "$base/api/v1/products/PGO-1" >/dev/null
        done
        for i in $(seq 1 20); do
            curl -sS -k -o /dev/null "$base/api/v1/products/PGO-1"
            curl -sS -k -o /dev/null -H "Authorization: Bearer not.a.token" "$base/api/v1/products/PGO-1"
        done
        curl -fsS -k -o /dev/null -H "Authorization: Bearer $(cat "$WORK/ES256.token")" \
            "$base/api/v1/products/PGO-1" || die "the trained gateway refused a good token"
        stop_training "$pid"
        return
    fi
    say "training over $scheme"
    for i in $(seq 1 50); do
        curl -fsS -k -o /dev/null -X PUT -H 'content-type: application/json' \
            -d '{"name":"Training","price":1000,"currency":"USD","stock":1000000}' \
            "$base/api/v1/products/PGO-$((i % 5))"
        curl -fsS -k -o /dev/null -X POST -H 'content-type: application/json' \
            -H "Idempotency-Key: pgo-$scheme-$i" \
            -d "{\"customerId\":\"c-$i\",\"items\":[{\"sku\":\"PGO-$((i % 5))\",\"quantity\":1}],\"shippingAddress\":\"1 Main St\",\"paymentToken\":\"tok_ok\"}" \
            "$base/orders"
        curl -sS -k -o /dev/null "$base/api/v1/products/NO-SUCH-PRODUCT"
        curl -sS -k -o /dev/null "$base/no/such/path"
    done
    for path in /health/live /api/v1/products/PGO-1 /health/ready; do
        wrk -t2 -c16 -d"${SECONDS_PER_PATH}s" "$base$path" >/dev/null
    done
    # A new connection per request: accept, hand-over, TLS handshakes.
    wrk -t2 -c16 -d1s -H 'Connection: close' "$base/health/live" >/dev/null
    stop_training "$pid"
}
stop_training() { # pid
    kill -TERM "$1"
    wait "$1" || die "the instrumented gateway did not stop cleanly (see $WORK/gateway.log)"
}
train http
train https
train http auth

shopt -s nullglob
raws=("$RAW"/*.profraw)
[ ${#raws[@]} -gt 0 ] || die "the instrumented gateway wrote no profile into $RAW"
"$profdata" merge -o "$WORK/gateway.profdata" "${raws[@]}"

# The profile is new each time, so target/pgo's dependencies are built again with it.
say "building the gateway from its profile (target/pgo)"
RUSTFLAGS="-Cprofile-use=$WORK/gateway.profdata" CARGO_TARGET_DIR=target/pgo \
    cargo build --release -p gateway
install -m 0755 target/pgo/release/gateway target/release/gateway
say "done: target/release/{regional-node,replicator,gateway}, the gateway with PGO"
