#!/usr/bin/env bash
# Webhook benchmark (issue 11). Not a test.
#
# Runs bench/orders.sh twice in one go on the same rates: without webhooks, then with a
# receiver subscribed to order.status_updated (WEBHOOK=1). Reports delivery latency
# p50/p99 (status change to receiver) per rate and the highest sustained orders/s with
# webhooks on versus off (the issue's bound: on loses at most 10%).
#
# Usage: bench/webhooks.sh [RATES] [SECONDS]     e.g. bench/webhooks.sh 500,1000,1500 10
set -euo pipefail
cd "$(dirname "$0")/.."
RATES=${1:-500,1000,1500}
SECONDS_PER_RATE=${2:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "# webhooks off"
bench/orders.sh "$RATES" "$SECONDS_PER_RATE" | tee "$work/off.txt"
echo
echo "# webhooks on"
WEBHOOK=1 bench/orders.sh "$RATES" "$SECONDS_PER_RATE" | tee "$work/on.txt"
off=$(grep highest_sustained "$work/off.txt" | cut -d, -f2)
on=$(grep highest_sustained "$work/on.txt" | cut -d, -f2)
echo
python3 - "$off" "$on" <<'PY'
import sys
off, on = float(sys.argv[1]), float(sys.argv[2])
ratio = on / off if off else float("nan")
print(f"highest sustained orders/s: webhooks off {off:.0f}, on {on:.0f} = {ratio:.2f}x "
      f"({'within' if ratio >= 0.9 else 'OUTSIDE'} the 10% bound)")
PY
