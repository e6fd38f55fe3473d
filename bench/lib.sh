# What the bench scripts share. Sourced (`. bench/lib.sh`) from the repository root by
# a script that has already set `set -euo pipefail`; it runs nothing by itself.
#
#   bench_need TOOL...      installs the tools that are missing with apt-get; a TOOL
#                           is a command, or `command:package` when Debian's package
#                           is named otherwise (etcd:etcd-server)
#   bench_workdir PREFIX    WORK, a fresh directory /tmp/PREFIX-XXXXXX, and PIDS: on
#                           exit bench_stop_more (when the script defines it) runs, every
#                           pid in PIDS is killed, and WORK is removed
#   free_port               a free loopback TCP port
#   wait_http URL [CURL ARGS...]
#                           polls URL until it answers 2xx, WAIT_HTTP_TRIES times
#                           (200) WAIT_HTTP_SLEEP seconds apart (0.05); otherwise prints
#                           the tails of WORK's logs and fails
#   cpu_ticks PID...        utime+stime of the processes together, in clock ticks (HZ a
#                           second); -1 when the first PID is -1 (nothing to measure)
#   machine_ticks           the whole machine's busy time (user, nice, system, irq,
#                           softirq of /proc/stat's `cpu` line; not idle, iowait, steal)
#   make_jwks DIR ISSUER AUDIENCE SUBJECT SCOPE
#                           an RSA and a P-256 key made with openssl, DIR/jwks.json
#                           holding both (kids rsa-1, ec-1), and a token signed with
#                           each for those claims, valid a day: DIR/RS256.token,
#                           DIR/ES256.token

bench_need() {
    local need=() tool
    for tool in "$@"; do
        command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
    done
    if [ ${#need[@]} -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update </dev/null >/dev/null
        apt-get install -y --no-install-recommends "${need[@]}" </dev/null >/dev/null
    fi
}

bench_workdir() {
    WORK=$(mktemp -d "/tmp/$1-XXXXXX")
    PIDS=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    if declare -F bench_stop_more >/dev/null; then bench_stop_more || true; fi
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() {
    local url=$1 _
    shift
    for _ in $(seq 1 "${WAIT_HTTP_TRIES:-200}"); do
        if curl -fsS -o /dev/null "$@" "$url" 2>/dev/null; then return 0; fi
        sleep "${WAIT_HTTP_SLEEP:-0.05}"
    done
    echo "no answer from $url; logs:" >&2
    tail -n 20 "$WORK"/*.log "$WORK"/*/error.log 2>/dev/null >&2 || true
    return 1
}

HZ=$(getconf CLK_TCK)
machine_ticks() {
    awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat
}

cpu_ticks() {
    local t=0 p
    if [ "$1" = "-1" ]; then echo -1; return; fi
    for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$t"
}

make_jwks() {
    local dir=$1
    openssl genrsa -traditional -out "$dir/rsa.pem" 2048 2>/dev/null
    openssl ecparam -name prime256v1 -genkey -noout -out "$dir/ec.pem"
    python3 - "$dir" "$2" "$3" "$4" "$5" <<'PY'
import base64, json, subprocess, sys, time
work = sys.argv[1]
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
def run(*args, data=None):
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True).stdout
modulus = run("rsa", "-in", f"{work}/rsa.pem", "-noout", "-modulus").decode().strip().split("=")[1]
point = run("ec", "-in", f"{work}/ec.pem", "-pubout", "-outform", "DER")[-65:]
jwks = {"keys": [
    {"kty": "RSA", "kid": "rsa-1", "alg": "RS256", "use": "sig", "n": b64(bytes.fromhex(modulus)), "e": "AQAB"},
    {"kty": "EC", "kid": "ec-1", "alg": "ES256", "use": "sig", "crv": "P-256", "x": b64(point[1:33]), "y": b64(point[33:])},
]}
open(f"{work}/jwks.json", "w").write(json.dumps(jwks))
now = int(time.time())
claims = {"iss": sys.argv[2], "aud": sys.argv[3], "sub": sys.argv[4], "scope": sys.argv[5], "iat": now, "exp": now + 86400}
def der_to_raw(der):
    # ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } -> r || s, 32 bytes each
    i = 2 if der[1] < 0x80 else 3
    out = b""
    for _ in range(2):
        n = der[i + 1]
        out += der[i + 2:i + 2 + n].lstrip(b"\0").rjust(32, b"\0")
        i += 2 + n
    return out
for alg, kid, key in (("RS256", "rsa-1", "rsa.pem"), ("ES256", "ec-1", "ec.pem")):
    signing_input = (b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())).encode()
    sig = run("dgst", "-sha256", "-sign", f"{work}/{key}", data=signing_input)
    if alg == "ES256":
        sig = der_to_raw(sig)
    open(f"{work}/{alg}.token", "w").write(signing_input.decode() + "." + b64(sig))
PY
}
