#!/usr/bin/env bash
# Failover drill benchmark (not a test): recovery time (RTO) when the active region is
# killed (node and Redis, SIGKILL) or hangs (node SIGSTOPped), measured N times each:
#
#   tandem  - the gateway in front of two regions with replicators; RTO is the time from
#             the fault to the first order answered 201 by region b. The drills are the
#             system tests in tests/tests/gateway_failover.rs, run with release binaries.
#   haproxy - HAProxy 2.x primary/backup (`check inter 200 fall 3 rise 2`, b `backup`) in
#             front of the same two nodes, both active (HAProxy cannot promote a standby,
#             so the backup must already take writes); RTO is the time from the fault to
#             the first 201 from b, with a new request (own connection) every 10 ms.
#
# Usage: bench/failover-drill.sh [N]          (N=10)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}

. bench/lib.sh
bench_need redis-server haproxy
cargo build --release -q --bins -p regional-node -p replicator -p gateway

WORK=$(mktemp -d /tmp/tandem-drill-XXXXXX)
trap 'pkill -P $$ 2>/dev/null || true; rm -rf "$WORK"' EXIT

echo "## tandem gateway: $N x kill, $N x hang (release binaries)"
for i in $(seq 1 "$N"); do
    TANDEM_BIN_DIR="$PWD/target/release" cargo test -q -p system-tests --test gateway_failover \
        -- --nocapture --test-threads 1 order_stream_survives_killing_the_active_region \
        hung_active_region_is_replaced_and_demoted_when_it_wakes 2>&1 |
        grep -oE '\[drill\] (kill|hang): first order from b [0-9.]+(ms|s|µs)' >>"$WORK/tandem.txt" || true
done

echo "## haproxy primary/backup, inter 200 ms: $N x kill, $N x hang"
python3 - "$N" "$WORK" "$PWD/target/release/regional-node" >"$WORK/haproxy.txt" <<'PY'
import http.client, json, os, signal, socket, subprocess, sys, threading, time

n, work, node_bin = int(sys.argv[1]), sys.argv[2], sys.argv[3]

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_http(port, path, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path); r = c.getresponse(); r.read()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"port {port} {path} did not answer")

def drill(mode, run):
    procs = []
    def spawn(args, env=None, log="x"):
        p = subprocess.Popen(args, env=env, stdout=open(f"{work}/{log}.log", "w"), stderr=subprocess.STDOUT)
        procs.append(p); return p
    ports = {r: (free_port(), free_port()) for r in "ab"}
    nodes = {}
    for r, (rp, np_) in ports.items():
        spawn(["redis-server", "--port", str(rp), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", work], log=f"redis-{r}")
    time.sleep(0.3)
    for r, (rp, np_) in ports.items():
        env = dict(os.environ, NODE_REGION=r, NODE_ROLE="active", NODE_LISTEN=f"127.0.0.1:{np_}",
                   NODE_REDIS_URL=f"redis://127.0.0.1:{rp}", RUST_LOG="warn")
        nodes[r] = spawn([node_bin], env=env, log=f"node-{r}")
    for r, (rp, np_) in ports.items():
        wait_http(np_, "/health/ready")
        c = http.client.HTTPConnection("127.0.0.1", np_, timeout=2)
        c.request("PUT", "/api/v1/products/DRILL-1", json.dumps({"name": "d", "price": 100, "stock": 1000000}))
        c.getresponse().read()
    hp = free_port()
    cfg = f"""global
    maxconn 1000
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    retries 0
frontend f
    bind 127.0.0.1:{hp}
    default_backend b
backend b
    option httpchk GET /health/ready
    server a 127.0.0.1:{ports['a'][1]} check inter 200 fall 3 rise 2
    server b 127.0.0.1:{ports['b'][1]} check inter 200 fall 3 rise 2 backup
"""
    open(f"{work}/haproxy.cfg", "w").write(cfg)
    spawn(["haproxy", "-f", f"{work}/haproxy.cfg", "-db"], log="haproxy")
    wait_http(hp, "/health/live")
    body = json.dumps({"customerId": "c", "items": [{"sku": "DRILL-1", "quantity": 1}],
                       "shippingAddress": "x", "paymentToken": "tok_ok"})
    def post(k, timeout=10):
        # One connection per request, as many concurrent clients would: a request stuck
        # on a hung server does not hold back the ones after it.
        try:
            c = http.client.HTTPConnection("127.0.0.1", hp, timeout=timeout)
            c.request("POST", "/orders", body, {"Idempotency-Key": f"{mode}-{run}-{k}", "Content-Type": "application/json"})
            r = c.getresponse(); r.read(); c.close()
            return r.status, r.getheader("X-Region")
        except OSError:
            return 0, None
    for k in range(20):  # warm: a serves
        post(f"warm{k}"); time.sleep(0.01)
    fault = time.time()
    if mode == "kill":
        nodes["a"].send_signal(signal.SIGKILL)
        procs[0].send_signal(signal.SIGKILL)  # redis a
    else:
        nodes["a"].send_signal(signal.SIGSTOP)
    first_b = []
    def client(k):
        status, region = post(k)
        if status == 201 and region == "b":
            first_b.append(time.time())
    threads = []
    k = 0
    while time.time() - fault < 30 and not first_b:
        t = threading.Thread(target=client, args=(k,), daemon=True); t.start(); threads.append(t)
        k += 1
        time.sleep(0.01)
    rto = (min(first_b) - fault) if first_b else None
    if mode == "hang":
        nodes["a"].send_signal(signal.SIGCONT)
    for p in procs:
        try:
            p.kill(); p.wait(5)
        except Exception:
            pass
    return rto

for mode in ("kill", "hang"):
    for run in range(n):
        rto = drill(mode, run)
        print(f"{mode} {rto if rto is not None else 'none'}", flush=True)
PY

python3 - "$WORK/tandem.txt" "$WORK/haproxy.txt" <<'PY'
import re, sys

sys.path.insert(0, "bench")
from rto import pct, secs

tandem = {"kill": [], "hang": []}
for line in open(sys.argv[1]):
    m = re.search(r"\[drill\] (kill|hang): first order from b (\S+)", line)
    if m:
        tandem[m.group(1)].append(secs(m.group(2)))
haproxy = {"kill": [], "hang": []}
for line in open(sys.argv[2]):
    mode, rto = line.split()
    if rto != "none":
        haproxy[mode].append(float(rto))
print("system   fault  runs  RTO p50    RTO p95    max")
for name, data in (("tandem", tandem), ("haproxy", haproxy)):
    for mode in ("kill", "hang"):
        v = data[mode]
        print(f"{name:8} {mode:6} {len(v):4}  {pct(v, .5) * 1000:7.0f} ms {pct(v, .95) * 1000:7.0f} ms {max(v, default=float('nan')) * 1000:7.0f} ms")
PY
