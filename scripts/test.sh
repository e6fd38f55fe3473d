#!/usr/bin/env bash
# The project's test command (README): installs what the tests need when it is missing
# (Debian's redis-server and etcd-server; prometheus for promtool; docker-compose 1.29
# and Compose v2 where a Docker engine runs), builds every binary once, then runs every
# test. The system tests in tests/ start the real binaries from target/debug and their
# own redis-server and etcd processes on free ports; tests/tests/compose_stack.rs builds
# the container images from the same binaries (deploy/build-images.sh, which builds the
# Debian base image itself when it is missing) and runs the docker-compose.yml stack
# under Compose v2, as do tests/tests/chaos_docker.rs (the chaos campaign's Docker
# backend) and compose_gateways.rs under docker-compose 1.29;
# tests/tests/openapi.rs installs schemathesis from PyPI into target/schemathesis-venv
# (Debian's python3-venv is installed here when `python3 -m venv` is missing).
#
# Without a Docker engine the compose tests are skipped with a message, unless CI is set
# or TANDEM_REQUIRE_DOCKER=1 (.ci/run sets it): then it fails.
set -euo pipefail

cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v objcopy >/dev/null 2>&1 || missing+=(binutils)
# tests/tests/openapi.rs runs schemathesis (from PyPI) in a virtualenv under target/.
venv_probe=$(mktemp -d)
python3 -m venv "$venv_probe/v" >/dev/null 2>&1 || missing+=(python3-venv)
rm -rf "$venv_probe"
if docker info >/dev/null 2>&1; then
    if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
        missing+=(docker-compose)
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "scripts/test.sh: installing Debian's ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update </dev/null
    # The redis-server, etcd-server and prometheus packages may start services on their
    # default ports; the tests never use them.
    $SUDO apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
fi
# Compose v2 beside Debian's docker-compose 1.29: compose_stack.rs runs the stack under
# the first, compose_gateways.rs and chaos_docker.rs under the second. Bookworm has no
# Compose v2 package; deploy/install-compose-v2.sh takes trixie's from Debian's archive.
if docker info >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
    if ! $SUDO bash deploy/install-compose-v2.sh; then
        if [ "${TANDEM_REQUIRE_DOCKER:-}" = 1 ]; then
            echo "scripts/test.sh: Compose v2 could not be installed (above); CI tests both compose tools" >&2
            exit 1
        fi
        echo "scripts/test.sh: no Compose v2 (above); the compose tests run under docker-compose 1.29 only" >&2
    fi
fi
redis-server --version
promtool --version 2>&1 | head -n 1
etcd --version | sed -n 1p

# One profile (dev) for both steps, so every crate is compiled once.
cargo build --workspace --bins
# --no-fail-fast: report every failing test binary, not just the first.
cargo test --workspace --no-fail-fast "$@"
