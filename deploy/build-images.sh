#!/usr/bin/env bash
# Builds every image docker-compose.yml runs, on a machine with or without an image
# registry:
#
#   tandem-regional-node, tandem-replicator, tandem-gateway   the cargo-built binaries
#   tandem-redis, tandem-prometheus, tandem-etcd              Debian's packages
#
# all FROM debian:bookworm-slim. When the engine lacks that base and cannot pull it, it
# is built here from Debian's packages (debootstrap into a folder, then `docker import`)
# and tagged debian:bookworm-slim, so the Dockerfiles in deploy/images/ build unchanged
# either way. The Rust binaries are not compiled in a container: cargo builds them on
# the host (Debian bookworm, the base's glibc) and each image copies its one binary.
#
#   scripts/build-release.sh                     # cargo build --release, the gateway with PGO
#   deploy/build-images.sh                       # tag :local, from target/release
#   deploy/build-images.sh --bin-dir target/debug --tag test
#
# Every step is cached: the base image stays in the engine, the .debs debootstrap
# fetched stay in the cache directory, and docker's layer cache skips unchanged steps.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
Usage: deploy/build-images.sh [--bin-dir DIR] [--tag TAG] [--base auto|debootstrap]

Builds tandem-{regional-node,replicator,gateway,redis,prometheus,etcd}:TAG
(etcd: for docker-compose.gateways.yml).

  --bin-dir DIR   where cargo put regional-node, replicator and gateway
                  [$TANDEM_BIN_DIR, else target/release]
  --tag TAG       image tag [$TANDEM_IMAGE_TAG, else local]
  --base MODE     auto: use debian:bookworm-slim if the engine has it, else pull it,
                  else build it with debootstrap; debootstrap: always build it anew
                  (replaces the local debian:bookworm-slim tag) [auto]
  -h, --help      this text

Environment:
  DEBIAN_MIRROR             mirror for debootstrap [http://deb.debian.org/debian]
  TANDEM_DEBOOTSTRAP_CACHE  where debootstrap keeps the .debs it fetched
                            [${XDG_CACHE_HOME:-$HOME/.cache}/tandem/debootstrap]
EOF
}

BASE_IMAGE=debian:bookworm-slim
SUITE=bookworm
BIN_DIR=${TANDEM_BIN_DIR:-target/release}
TAG=${TANDEM_IMAGE_TAG:-local}
BASE_MODE=auto
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${TANDEM_DEBOOTSTRAP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/debootstrap}
SERVICES=(regional-node replicator gateway)
LABEL=org.tandem.built-by=deploy/build-images.sh

while [ $# -gt 0 ]; do
    case "$1" in
        --bin-dir) BIN_DIR=${2:?--bin-dir needs a directory}; shift 2 ;;
        --tag) TAG=${2:?--tag needs a value}; shift 2 ;;
        --base) BASE_MODE=${2:?--base needs auto or debootstrap}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build-images: unknown argument '$1'" >&2; usage >&2; exit 64 ;;
    esac
done
case "$BASE_MODE" in auto | debootstrap) ;; *)
    echo "build-images: --base must be auto or debootstrap, not '$BASE_MODE'" >&2; exit 64 ;;
esac

say() { echo "build-images: $*" >&2; }
die() { say "$*"; exit 1; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

command -v docker >/dev/null || die "no docker client on PATH"
command -v objcopy >/dev/null || die "objcopy is missing (Debian: apt-get install binutils)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info failed)"
for s in "${SERVICES[@]}"; do
    [ -x "$BIN_DIR/$s" ] || die "$BIN_DIR/$s is missing: run
  scripts/build-release.sh   (or: cargo build --release --bins -p regional-node -p replicator -p gateway)
or pass --bin-dir with the directory that holds the binaries"
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi

# --- the base image ---------------------------------------------------------------

# A folder made like Debian's official slim image: minbase, the security and updates
# suites in the sources, no services started by package scripts, no docs or man pages,
# no apt lists or caches left behind.
debootstrap_base() {
    local started work root
    started=$(date +%s)
    if ! command -v debootstrap >/dev/null; then
        say "installing debootstrap from Debian's packages"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends debootstrap </dev/null \
            || { $SUDO apt-get update </dev/null && DEBIAN_FRONTEND=noninteractive \
                $SUDO apt-get install -y --no-install-recommends debootstrap </dev/null; }
    fi
    mkdir -p "$CACHE"
    work=$(mktemp -d "${TMPDIR:-/var/tmp}/tandem-base.XXXXXX")
    root="$work/rootfs"
    # shellcheck disable=SC2064 # expand $work now: it is local
    trap "$SUDO rm -rf '$work'" EXIT
    say "debootstrap $SUITE (minbase) from $MIRROR into $root (.debs cached in $CACHE)"
    if ! $SUDO debootstrap --variant=minbase --cache-dir="$CACHE" "$SUITE" "$root" "$MIRROR" \
        >"$work/debootstrap.log" 2>&1; then
        tail -n 30 "$work/debootstrap.log" >&2
        die "debootstrap failed (log above)"
    fi

    $SUDO tee "$root/usr/sbin/policy-rc.d" >/dev/null <<'EOF'
#!/bin/sh
# No init system in a container: package scripts must not start services.
exit 101
EOF
    $SUDO chmod 755 "$root/usr/sbin/policy-rc.d"
    $SUDO rm -f "$root/etc/apt/sources.list"
    $SUDO tee "$root/etc/apt/sources.list.d/debian.sources" >/dev/null <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${MIRROR%/debian}/debian-security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    $SUDO tee "$root/etc/dpkg/dpkg.cfg.d/tandem-slim" >/dev/null <<'EOF'
# Images carry no documentation: keep only the copyright files.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    $SUDO tee "$root/etc/apt/apt.conf.d/tandem-slim" >/dev/null <<'EOF'
# Package lists and downloaded .debs would stay in every layer that installs something.
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Acquire::Languages "none";
EOF
    # Fixes from bookworm-security and -updates that postdate the point release.
    say "applying $SUITE-security and $SUITE-updates"
    if ! { $SUDO chroot "$root" apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive $SUDO chroot "$root" apt-get -y -q upgrade; } \
        >"$work/upgrade.log" 2>&1; then
        tail -n 30 "$work/upgrade.log" >&2
        die "apt-get upgrade in the new base failed (log above)"
    fi
    # What the dpkg excludes above keep out of later installs, out of the base too.
    $SUDO find "$root/usr/share/doc" -mindepth 1 -not -type d -not -name copyright -delete
    $SUDO find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias \
        -exec rm -rf {} +
    $SUDO rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/* "$root"/dev/* \
        "$root"/etc/resolv.conf "$root"/etc/hostname
    # Docker writes /etc/hostname, /etc/hosts and /etc/resolv.conf for each container.
    $SUDO tar --numeric-owner -C "$root" -c . |
        docker import \
            --change 'CMD ["bash"]' \
            --change "LABEL $LABEL" \
            --change "LABEL org.opencontainers.image.description=\"Debian $SUITE minbase from $MIRROR (debootstrap)\"" \
            - "$BASE_IMAGE" >/dev/null
    $SUDO rm -rf "$work"
    trap - EXIT
    say "built $BASE_IMAGE from Debian's packages in $(elapsed "$started")"
}

if [ "$BASE_MODE" = debootstrap ]; then
    debootstrap_base
elif docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    say "using $BASE_IMAGE from the engine"
elif docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    say "pulled $BASE_IMAGE"
else
    say "$BASE_IMAGE is not in the engine and cannot be pulled: building it"
    debootstrap_base
fi

# --- the images -------------------------------------------------------------------

build() { # image, dockerfile, context, then extra docker build arguments
    local image=$1 dockerfile=$2 context=$3 started
    shift 3
    started=$(date +%s)
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/tandem-build.XXXXXX")
    if ! docker build --label "$LABEL" -f "$dockerfile" -t "$image" "$@" "$context" >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        rm -f "$log"
        die "docker build of $image failed (output above)"
    fi
    rm -f "$log"
    say "built $image in $(elapsed "$started")"
}

# Each service's context is a folder holding only its binary and the healthcheck, so
# the engine is sent one binary, not the workspace. The binary loses its debug info
# (a dev build shrinks from ~100 MB to ~25 MB): panic messages keep file and line (they
# are compiled in) and backtraces keep function names (the symbol table stays).
stage=$(mktemp -d "${TMPDIR:-/tmp}/tandem-images.XXXXXX")
trap 'rm -rf "$stage"' EXIT
tandem_images() {
    for s in "${SERVICES[@]}"; do
        mkdir -p "$stage/$s"
        objcopy --strip-debug "$BIN_DIR/$s" "$stage/$s/$s"
        cp deploy/images/tandem-healthcheck "$stage/$s/"
        build "tandem-$s:$TAG" deploy/images/tandem.Dockerfile "$stage/$s" --build-arg "BINARY=$s"
    done
}
# Redis, Prometheus and etcd copy nothing in: an empty context.
mkdir -p "$stage/empty"
# The chains share nothing but the base, and mostly wait on the package mirror
# and the disk: run them side by side.
tandem_images & tandem_pid=$!
build "tandem-redis:$TAG" deploy/images/redis.Dockerfile "$stage/empty" & redis_pid=$!
build "tandem-prometheus:$TAG" deploy/images/prometheus.Dockerfile "$stage/empty" & prometheus_pid=$!
build "tandem-etcd:$TAG" deploy/images/etcd.Dockerfile "$stage/empty" & etcd_pid=$!
failed=""
for pid in "$tandem_pid" "$redis_pid" "$prometheus_pid" "$etcd_pid"; do
    wait "$pid" || failed=1
done
[ -z "$failed" ] || die "an image failed to build (output above)"

# The binaries come from the host: a newer glibc there than in the base shows here,
# not when the stack starts.
for s in "${SERVICES[@]}"; do
    if ! out=$(docker run --rm --network none "tandem-$s:$TAG" --help 2>&1); then
        echo "$out" | tail -n 5 >&2
        die "tandem-$s:$TAG does not run its binary (built against a newer glibc than $BASE_IMAGE's? build on Debian $SUITE)"
    fi
done
# A rebuilt image leaves its predecessor untagged: drop ours (only dangling ones, only
# with our label), or every test run would leave ~100 MB behind.
docker image prune -f --filter "label=$LABEL" >/dev/null
say "images ready: $(printf 'tandem-%s:'"$TAG"' ' "${SERVICES[@]}" redis prometheus etcd)"
