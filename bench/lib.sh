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
