#!/usr/bin/env bash
# Long chaos campaigns (README "Chaos campaigns"): RUNS campaigns of FAULTS faults each,
# seeds FIRST_SEED, FIRST_SEED+1, ..., in one durability mode, with the release binaries.
# Every report is kept in OUT_DIR/<mode>-<seed>.txt and every last line
# (`N faults, M violations`) is appended to OUT_DIR/summary.txt with its command.
#
#   bench/chaos.sh async 100 10 1000          # 1,000 faults in async, seeds 1000..1009
#   MODE=replicated bench/chaos.sh replicated 100 10 2000
#   BACKEND=docker bench/chaos.sh async 30 10 8000   # the compose stack, Docker's faults
#
# Variables: OUT_DIR [chaos-results], BIN_DIR [target/release], RATE [20], CLIENTS [4],
# BUILD=0 to skip `cargo build --release`, BACKEND [process] or docker. With
# BACKEND=docker each run starts its own compose project from the images tagged
# IMAGE_TAG [local], built first from BIN_DIR's binaries (deploy/build-images.sh; cached
# after the first run); reports are named docker-<mode>-<seed>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:?usage: bench/chaos.sh MODE FAULTS RUNS FIRST_SEED}
FAULTS=${2:?faults per run}
RUNS=${3:?runs}
FIRST_SEED=${4:?first seed}
OUT_DIR=${OUT_DIR:-chaos-results}
BIN_DIR=${BIN_DIR:-target/release}
RATE=${RATE:-20}
CLIENTS=${CLIENTS:-4}
BACKEND=${BACKEND:-process}
IMAGE_TAG=${IMAGE_TAG:-local}
case "$BACKEND" in
    process) backend_args=""; prefix="" ;;
    docker) backend_args=" --backend docker --build-images --image-tag $IMAGE_TAG"; prefix="docker-" ;;
    *) echo "bench/chaos.sh: BACKEND must be process or docker, not '$BACKEND'" >&2; exit 64 ;;
esac

if [ "${BUILD:-1}" = 1 ]; then
    cargo build --release -p regional-node -p replicator -p gateway -p system-tests --bins
fi
mkdir -p "$OUT_DIR"
for ((i = 0; i < RUNS; i++)); do
    seed=$((FIRST_SEED + i))
    cmd="$BIN_DIR/chaos --faults $FAULTS --seed $seed --durability $MODE --rate $RATE --clients $CLIENTS$backend_args"
    report="$OUT_DIR/$prefix$MODE-$seed.txt"
    started=$(date -u +%FT%TZ)
    set +e
    $cmd >"$report" 2>"$OUT_DIR/$prefix$MODE-$seed.progress"
    status=$?
    set -e
    last=$(tail -n 1 "$report")
    echo "$started  exit $status  $last  ($cmd)" | tee -a "$OUT_DIR/summary.txt"
done
