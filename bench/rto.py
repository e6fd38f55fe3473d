"""Reading the failover drills' results (bench/failover-drill.sh, controller-drill.sh).

The system tests print a drill's recovery time as `[drill] <fault>: first order from b
<duration>`, the duration as Rust's Debug writes it (`812.3ms`, `1.2s`, `950µs`).
"""
import re


def pct(v, p):
    """The p-quantile (0..1) of v, nearest rank; NaN when v is empty."""
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))] if v else float("nan")


def secs(s):
    """Seconds in a Rust Debug duration."""
    m = re.match(r"([0-9.]+)(ms|s|µs)", s)
    x = float(m.group(1))
    return {"ms": x / 1000, "s": x, "µs": x / 1e6}[m.group(2)]
