#!/usr/bin/env bash
# Gateway benchmark (not a test). The same regional node behind
#   direct  - no proxy (the baseline for added latency)
#   nginx   - nginx reverse proxy, keep-alive upstream pool
#   haproxy - HAProxy, http-reuse always (when installed)
#   gateway - the Tandem gateway (one or more builds, see GATEWAYS)
# with the same worker count for the three proxies (WORKERS: nginx worker processes,
# HAProxy threads, gateway worker threads), and the same jobs asked of each: every proxy
# adds X-Request-Id, X-Forwarded-For and X-Forwarded-Proto; the gateway also does what
# it always does (routing, retry budget, rate limit, connection caps, metrics, X-Region,
# traceparent). The rate limit is on, set high enough never to refuse: all the load
# comes from one address. Probe, connect and lease timeouts are longer than the
# defaults: on a machine saturated by the benchmark itself (and others' work) 100 ms
# probes time out and the gateway fails over in the middle of a run (region b has no
# copy of the product: no replicator runs here).
#
# For each scheme (http; https = TLS on the client side with one certificate for all:
# gateway rustls, nginx and HAProxy OpenSSL; the node behind stays plain HTTP, so the
# https rows' "added over direct" is over plain HTTP straight to the node) and each
# path (/health/live, a product read), per target:
#   1. fixed rates (RATES, default 5,000 and 10,000 requests/s) from rate_bench, a
#      constant-rate generator that times each request from its intended send time (no
#      coordinated omission): p50 and p99, and p50/p99 added over direct in the same round;
#   2. saturation with wrk (closed loop, -t THREADS -c CONNS): requests/s;
#   and for both, CPU per request of the proxy's processes (utime+stime from
#   /proc/PID/stat of every process of the proxy, before and after, divided by the
#   requests the load generator completed); at saturation also the CPU per request of
#   the node and Redis behind the proxy ("behind"), who share the cores with it, and of
#   the whole machine ("machine", from /proc/stat).
# Rounds are interleaved, and the target order rotates each round (the first and last
# places of a round fare differently on a shared machine). The summary gives medians
# over rounds with [min..max], and ratios gateway/nginx and gateway/HAProxy; `uptime`
# is printed with each round, since other work on the machine moves every figure.
#
# Usage: bash bench/gateway.sh
#   env: ROUNDS=3 DURATION=5s (wrk) CONNS=64 THREADS=2 RATES=5000,10000 RATE_SECONDS=5
#        RATE_CONNS=16 WORKERS=$(nproc) SCHEMES="http https"
#        PATHS="/health/live /api/v1/products/BENCH-1" TARGETS="direct nginx haproxy gateway"
#        GATEWAYS="gateway=target/release/gateway" (several "name=binary" compare builds,
#        each started in turn on the same port and state)
#        BUILD=1 (scripts/build-release.sh, the gateway with PGO as shipped; 0: use the
#        binaries as they are) DRILL=1 (then the failover drills)
# Needs: redis-server, nginx, wrk, curl, python3, openssl (installed with apt-get when
# missing); HAProxy is used when installed.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
RATES=${RATES:-5000,10000}
RATE_SECONDS=${RATE_SECONDS:-5}
RATE_CONNS=${RATE_CONNS:-16}
WORKERS=${WORKERS:-$(nproc)}
SCHEMES=${SCHEMES:-http https}
PATHS=${PATHS:-/health/live /api/v1/products/BENCH-1}
GATEWAYS=${GATEWAYS:-gateway=target/release/gateway}
BUILD=${BUILD:-1}
DRILL=${DRILL:-1}

. bench/lib.sh
bench_need redis-server nginx wrk curl openssl

if [ "$BUILD" = "1" ]; then
    # As shipped: the gateway with profile-guided optimization.
    scripts/build-release.sh 2>&1 | tail -1
    cargo build --release -p system-tests --bin rate_bench 2>&1 | tail -1
fi
RATE_BENCH=$PWD/target/release/rate_bench

bench_workdir tandem-bench
# The gateway under measurement comes and goes (start_gateway, stop_gateway).
GW_PID=""
bench_stop_more() { if [ -n "$GW_PID" ]; then kill "$GW_PID" 2>/dev/null; fi; }

# One certificate for every TLS listener: a CA and a server certificate it signed for
# 127.0.0.1 (ECDSA P-256), as the system tests make them.
mkdir -p "$WORK/tls"
(
    cd "$WORK/tls"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' >server.ext
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -days 2 -subj "/CN=tandem bench CA" -out ca.pem 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out server.key 2>/dev/null
    openssl req -new -key server.key -subj /CN=localhost -out server.csr 2>/dev/null
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile server.ext -out server.pem 2>/dev/null
    cat server.pem server.key >combined.pem
)
CA=$WORK/tls/ca.pem

RA=$(free_port); RB=$(free_port); NA=$(free_port); NB=$(free_port)
NG=$(free_port); NGS=$(free_port); HP=$(free_port); HPS=$(free_port); GW=$(free_port)
redis-server --port "$RA" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-a.log" 2>&1 &
PIDS+=($!)
REDIS_A_PID=$!
redis-server --port "$RB" --bind 127.0.0.1 --save "" --appendonly no >"$WORK/redis-b.log" 2>&1 &
PIDS+=($!)
sleep 0.3

start_node() { # region port redis_port role
    NODE_REGION=$1 NODE_LISTEN=127.0.0.1:$2 NODE_REDIS_URL=redis://127.0.0.1:$3 NODE_ROLE=$4 \
        NODE_ADMIN_TOKEN=bench RUST_LOG=warn target/release/regional-node >"$WORK/node-$1.log" 2>&1 &
    PIDS+=($!)
}
start_node a "$NA" "$RA" standby
NODE_A_PID=$!
start_node b "$NB" "$RB" standby
wait_http "http://127.0.0.1:$NA/health/live"
wait_http "http://127.0.0.1:$NB/health/live"

start_gateway() { # binary scheme
    local tls_env=()
    if [ "$2" = "https" ]; then
        tls_env=(GATEWAY_TLS_CERT="$WORK/tls/server.pem" GATEWAY_TLS_KEY="$WORK/tls/server.key")
    fi
    env "${tls_env[@]}" \
        GATEWAY_LISTEN=127.0.0.1:$GW \
        GATEWAY_REGIONS="a=http://127.0.0.1:$NA,b=http://127.0.0.1:$NB" \
        GATEWAY_PRIMARY=a GATEWAY_STATE_DIR="$WORK/gateway-state" \
        GATEWAY_NODE_TOKEN=bench GATEWAY_ADMIN_TOKEN=bench GATEWAY_WORKERS="$WORKERS" \
        GATEWAY_RATE_LIMIT_PER_SEC=10000000 GATEWAY_RATE_LIMIT_BURST=10000000 \
        GATEWAY_HEALTH_TIMEOUT_MS=1000 GATEWAY_CONNECT_TIMEOUT_MS=1000 GATEWAY_LEASE_MS=5000 \
        RUST_LOG=warn "$1" >>"$WORK/gateway.log" 2>&1 &
    GW_PID=$!
    wait_http "$2://127.0.0.1:$GW/gateway/health" -k
}
stop_gateway() {
    kill "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    GW_PID=""
}

mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<EOF
worker_processes $WORKERS;
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
    # nginx closes a client connection after 1,000 requests by default; the gateway
    # and HAProxy do not, and reconnecting (and new TLS handshakes) would count against it.
    keepalive_requests 1000000;
    upstream node { server 127.0.0.1:$NA; keepalive 256; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$NG;
        listen 127.0.0.1:$NGS ssl;
        ssl_certificate $WORK/tls/server.pem;
        ssl_certificate_key $WORK/tls/server.key;
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
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
NGINX_MASTER=$!
PIDS+=($NGINX_MASTER)
wait_http "http://127.0.0.1:$NG/health/live"
wait_http "https://127.0.0.1:$NGS/health/live" -k
# The master and its workers (the master does no request work, but it is nginx's).
NGINX_PIDS="$NGINX_MASTER $(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')"

ALL_TARGETS="direct nginx"
if command -v haproxy >/dev/null; then
    cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
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
    bind 127.0.0.1:$HP
    bind 127.0.0.1:$HPS ssl crt $WORK/tls/combined.pem
    http-request set-header X-Request-Id %[uuid]
    http-request set-header X-Forwarded-Proto https if { ssl_fc }
    http-request set-header X-Forwarded-Proto http if !{ ssl_fc }
    default_backend be
backend be
    server a 127.0.0.1:$NA
EOF
    haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS+=($HAPROXY_PID)
    wait_http "http://127.0.0.1:$HP/health/live"
    wait_http "https://127.0.0.1:$HPS/health/live" -k
    ALL_TARGETS="$ALL_TARGETS haproxy"
fi
GW_NAMES=""
for g in $GATEWAYS; do GW_NAMES="$GW_NAMES ${g%%=*}"; done
TARGETS=${TARGETS:-$ALL_TARGETS$GW_NAMES}
# "gateway" in TARGETS means every build in GATEWAYS (each once, even when one of them
# is itself named gateway).
TARGETS=$(echo " $TARGETS " | sed "s/ gateway / $GW_NAMES /" | xargs -n1 | awk '!seen[$0]++' | xargs)

# The product the read path asks for, written once through the first gateway build.
first_gw=${GATEWAYS%% *}
start_gateway "${first_gw#*=}" http
curl -fsS -o /dev/null -X PUT -H 'content-type: application/json' \
    -d '{"name":"Bench","price":1000,"currency":"USD","stock":1000000}' \
    "http://127.0.0.1:$GW/api/v1/products/BENCH-1"
stop_gateway

RESULTS=$WORK/results.txt
: >"$RESULTS"

measure() { # scheme target path port pids...   (results filed under $label, the round's scheme)
    local scheme=$1 target=$2 path=$3 port=$4
    shift 4
    local url="$scheme://127.0.0.1:$port$path" c0 c1 out rate
    for rate in ${RATES//,/ }; do
        c0=$(cpu_ticks "$@")
        out=$("$RATE_BENCH" --url "$url" --rate "$rate" --seconds "$RATE_SECONDS" --warmup 1 \
            --conns "$RATE_CONNS" --ca "$CA")
        c1=$(cpu_ticks "$@")
        python3 - "$out" "$c0" "$c1" "$HZ" "$label $target $path rate$rate $round" >>"$RESULTS" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); c0, c1, hz = map(int, sys.argv[2:5])
cpu = (c1 - c0) * 1e6 / hz / max(1, r["ok"] + r["non2xx"]) if c0 >= 0 else -1
print(sys.argv[5], r["ok"] / max(r["elapsed_s"], 1e-9), r["p50_us"] / 1000, r["p99_us"] / 1000,
      f"{cpu:.2f}", r["non2xx"], r["errors"], -1, -1)
PY
        tail -n 1 "$RESULTS"
    done
    # At saturation the node and Redis behind the proxy share the cores with it: their
    # CPU per request is recorded too, since a proxy that makes them work harder (fewer
    # requests per wakeup, more upstream connections) lowers everyone's requests/s.
    # And the whole machine's (the `cpu` line of /proc/stat: every process, interrupts),
    # of which the proxy's share says how much its own CPU can move requests/s.
    local b0 b1 m0 m1
    c0=$(cpu_ticks "$@")
    b0=$(cpu_ticks "$NODE_A_PID" "$REDIS_A_PID")
    m0=$(machine_ticks)
    out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$url" 2>&1)
    c1=$(cpu_ticks "$@")
    b1=$(cpu_ticks "$NODE_A_PID" "$REDIS_A_PID")
    m1=$(machine_ticks)
    python3 - "$out" "$c0" "$c1" "$HZ" "$label $target $path sat $round" "$b0" "$b1" "$m0" "$m1" >>"$RESULTS" <<'PY'
import re, sys
t = sys.argv[1]; c0, c1, hz = map(int, sys.argv[2:5]); b0, b1, m0, m1 = map(int, sys.argv[6:10])
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n * 1000 if u == "s" else n
reqs = int(re.search(r"(\d+) requests in", t).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
p50 = ms(re.search(r"\s50%\s+(\S+)", t).group(1))
p99 = ms(re.search(r"\s99%\s+(\S+)", t).group(1))
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
cpu = (c1 - c0) * 1e6 / hz / max(1, reqs) if c0 >= 0 else -1
print(sys.argv[5], rps, p50, p99, f"{cpu:.2f}", errs.group(1) if errs else 0,
      sum(map(int, sock.groups())) if sock else 0, f"{(b1 - b0) * 1e6 / hz / max(1, reqs):.2f}",
      f"{(m1 - m0) * 1e6 / hz / max(1, reqs):.2f}")
PY
    tail -n 1 "$RESULTS"
}

echo
echo "results: scheme target path load round rps p50_ms p99_ms cpu_us_per_req non2xx errors behind_cpu_us_per_req machine_cpu_us_per_req"
echo "workers per proxy: $WORKERS; $(nproc) cores; targets: $TARGETS"
read -ra target_list <<<"$TARGETS"
n_targets=${#target_list[@]}
for round in $(seq 1 "$ROUNDS"); do
    echo "# round $round: $(uptime)"
    for scheme in $SCHEMES; do
        label=$scheme
        for i in $(seq 0 $((n_targets - 1))); do
            target=${target_list[$(((i + round - 1) % n_targets))]}
            for path in $PATHS; do
                case "$target/$scheme" in
                    # The node speaks plain HTTP only: direct is the baseline either way.
                    direct/*) measure http direct "$path" "$NA" -1 ;;
                    nginx/http) measure http nginx "$path" "$NG" $NGINX_PIDS ;;
                    nginx/https) measure https nginx "$path" "$NGS" $NGINX_PIDS ;;
                    haproxy/http) measure http haproxy "$path" "$HP" "$HAPROXY_PID" ;;
                    haproxy/https) measure https haproxy "$path" "$HPS" "$HAPROXY_PID" ;;
                    *)
                        bin=""
                        for g in $GATEWAYS; do [ "${g%%=*}" = "$target" ] && bin=${g#*=}; done
                        [ -n "$bin" ] || { echo "unknown target $target" >&2; exit 2; }
                        [ "$path" = "${PATHS%% *}" ] && start_gateway "$bin" "$scheme"
                        measure "$scheme" "$target" "$path" "$GW" "$GW_PID"
                        ;;
                esac
            done
            if [ -n "$GW_PID" ]; then stop_gateway; fi
        done
    done
done
echo "# end: $(uptime)"
cp "$RESULTS" "${RESULTS_COPY:-/tmp/gateway-bench-results.txt}"

echo
python3 - "$RESULTS" "$TARGETS" "$GW_NAMES" <<'PY'
import collections, statistics as st, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
targets = sys.argv[2].split()
gateways = sys.argv[3].split()
proxies = [t for t in targets if t != "direct"]
# (scheme, path, load, target) -> round -> (rps, p50, p99, cpu, behind, machine)
data = collections.defaultdict(dict)
bad = collections.Counter()
for scheme, target, path, load, rnd, rps, p50, p99, cpu, non2xx, errors, behind, machine in rows:
    data[(scheme, path, load, target)][rnd] = tuple(map(float, (rps, p50, p99, cpu, behind, machine)))
    bad[target] += int(non2xx) + int(errors)
def fmt(vals, digits):
    if not vals:
        return "-"
    m = st.median(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(vals):.{digits}f}..{max(vals):.{digits}f}]"
def series(scheme, path, load, target, metric):
    d = data.get((scheme, path, load, target), {})
    if metric == "rps":
        return [v[0] for v in d.values()]
    if metric == "cpu":
        return [v[3] for v in d.values() if v[3] >= 0]
    if metric == "behind":
        return [v[4] for v in d.values() if v[4] >= 0]
    if metric == "machine":
        return [v[5] for v in d.values() if v[5] >= 0]
    i = 1 if metric in ("p50", "add50") else 2
    base = data.get((scheme, path, load, "direct"), {})
    if metric.startswith("add"):
        # Added over direct in the same round.
        return [v[i] - base[r][i] for r, v in d.items() if r in base]
    return [v[i] for v in d.values()]
def ratio(a, b):
    return f"{st.median(a) / st.median(b):.2f}x" if a and b and st.median(b) else "-"
def diff(a, b):
    return f"{st.median(a) - st.median(b):+.3f}" if a and b else "-"
loads = sorted({k[2] for k in data}, key=lambda l: (l == "sat", int(l[4:]) if l.startswith("rate") else 0))
cols = targets
head = f"{'scheme':6} {'path':26} {'load':9} {'metric':14}" + "".join(f" {c:>24}" for c in cols)
comp = [(g, o) for g in gateways for o in ("nginx", "haproxy") if o in targets and g in targets]
head += "".join(f" {g + '/' + o:>16}" for g, o in comp)
print("medians over rounds [min..max]; ratios of medians (CPU and rps: gateway/other; added")
print("latency: gateway minus other, ms); CPU = proxy's utime+stime per completed request;")
print("behind = the node's and Redis's CPU per request, machine = all of the machine's")
print("(saturated runs)")
print(head)
print("-" * len(head))
metrics = [("cpu", "cpu us/req", 2), ("add50", "p50 added ms", 3), ("add99", "p99 added ms", 3),
           ("p50", "p50 ms", 3), ("p99", "p99 ms", 3)]
for scheme in dict.fromkeys(k[0] for k in data):
    for path in dict.fromkeys(k[1] for k in data):
        for load in loads:
            label = "saturated" if load == "sat" else f"{load[4:]}/s"
            ms = [("rps", "requests/s", 0), ("cpu", "cpu us/req", 2),
                  ("behind", "behind us/req", 2),
                  ("machine", "machine us/req", 2)] if load == "sat" else metrics
            for key, name, digits in ms:
                line = f"{scheme:6} {path:26} {label:9} {name:14}"
                vals = {}
                for c in cols:
                    vals[c] = [] if (c == "direct" and key in ("cpu", "add50", "add99")) else series(scheme, path, load, c, key)
                    line += f" {fmt(vals[c], digits):>24}"
                for g, o in comp:
                    if key in ("rps", "cpu", "behind", "machine"):
                        cell = ratio(vals[g], vals[o])
                    elif key.startswith("add"):
                        cell = diff(vals[g], vals[o])
                    else:
                        cell = ""
                    line += f" {cell:>16}"
                if any(vals[c] for c in cols):
                    print(line)
        print()
if sum(bad.values()):
    print("non-2xx answers or errors:", dict(bad))
PY

if [ "$DRILL" = "1" ]; then
    echo
    echo "failover drills with release binaries (RTO = kill/SIGSTOP/cut to first order served by b):"
    TANDEM_BIN_DIR="$PWD/target/release" cargo test -q -p system-tests --test gateway_failover \
        -- --nocapture --test-threads 1 2>&1 | grep -oE '\[drill\].*|test result.*' || true
fi
