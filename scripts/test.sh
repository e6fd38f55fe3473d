#!/usr/bin/env bash
# The project's test command (README): installs redis-server when missing, builds every
# binary once, then runs every test. The system tests in tests/ start the real binaries
# from target/debug and their own redis-server processes on free ports.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
    echo "scripts/test.sh: redis-server missing, installing Debian's package" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        SUDO="sudo -n"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update </dev/null
    $SUDO apt-get install -y --no-install-recommends redis-server </dev/null
    # The package starts a service on 6379; the tests never use it.
fi
redis-server --version

# One profile (dev) for both steps, so every crate is compiled once.
cargo build --workspace --bins
# --no-fail-fast: report every failing test binary, not just the first.
cargo test --workspace --no-fail-fast "$@"
