//! The campaign's table: faults by kind with their recovery times, client-visible
//! errors, what was acknowledged and quarantined, each invariant, and the last line
//! `N faults, M violations`. With a violation it also says how to reproduce the run.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::campaign::Report;
use super::history::Fate;

fn secs(ms: u64) -> String {
    format!("{:.2}s", ms as f64 / 1000.0)
}

/// The whole report; its last line is exactly `N faults, M violations`.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let s = &r.settings;
    let w = &mut out;
    let _ = writeln!(
        w,
        "== chaos campaign: seed {}, {} faults, durability {}, {} backend ==",
        s.seed,
        s.faults,
        s.durability.as_str(),
        r.backend
    );

    let _ = writeln!(
        w,
        "\nfaults (RTO = injection to the next acknowledged new write):"
    );
    let _ = writeln!(
        w,
        "  {:>4}  {:<42} {:>8} {:>8} {:>8}  result",
        "#", "fault", "at", "held", "RTO"
    );
    for f in &r.faults {
        let held = match (f.injected_ms, f.healed_ms) {
            (Some(i), Some(h)) => secs(h.saturating_sub(i)),
            _ => "-".into(),
        };
        let _ = writeln!(
            w,
            "  {:>4}  {:<42} {:>8} {:>8} {:>8}  {}",
            f.fault.id,
            f.fault.kind.to_string(),
            f.injected_ms.map(secs).unwrap_or_else(|| "-".into()),
            held,
            f.rto_ms.map(secs).unwrap_or_else(|| "none".into()),
            f.result
        );
    }

    let injected = r.faults.iter().filter(|f| f.injected()).count();
    let heal_failed = r.faults.iter().filter(|f| f.heal_failed).count();
    let _ = writeln!(
        w,
        "injected: {injected} of {} faults ({} not injected, {heal_failed} heals failed)",
        r.faults.len(),
        r.faults.len() - injected
    );

    let _ = writeln!(w, "\nfaults by kind:");
    let mut by_kind: BTreeMap<&str, Vec<Option<u64>>> = BTreeMap::new();
    for f in &r.faults {
        by_kind
            .entry(f.fault.kind.label())
            .or_default()
            .push(f.rto_ms);
    }
    for (kind, rtos) in &by_kind {
        let mut known: Vec<u64> = rtos.iter().flatten().copied().collect();
        known.sort_unstable();
        let rto = if known.is_empty() {
            "RTO -".to_string()
        } else {
            format!(
                "RTO p50 {} max {}",
                secs(known[known.len() / 2]),
                secs(*known.last().expect("not empty"))
            )
        };
        let _ = writeln!(w, "  {:<22} {:>5}   {rto}", kind, rtos.len());
    }

    let _ = writeln!(w, "\nclient-visible errors (write attempts):");
    let errors = r.history.write_errors();
    if errors.is_empty() {
        let _ = writeln!(w, "  none");
    }
    for (k, n) in &errors {
        let _ = writeln!(w, "  {k:<40} {n:>6}");
    }
    let reads: Vec<String> = r
        .history
        .reads
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(w, "reads: {}", reads.join(", "));

    let count = |f: &dyn Fn(&Fate) -> bool, fates: &mut dyn Iterator<Item = &Fate>| {
        fates.filter(|x| f(x)).count()
    };
    let refused = |x: &Fate| matches!(x, Fate::Refused { .. });
    let unresolved = |x: &Fate| matches!(x, Fate::Unresolved);
    let v = &r.verdict;
    let _ = writeln!(
        w,
        "\norders: {} attempted, {} acknowledged ({} local-only acks), {} refused, {} unresolved",
        r.history.orders.len(),
        v.acked_orders,
        v.acked_local,
        count(&refused, &mut r.history.orders.iter().map(|o| &o.fate)),
        count(&unresolved, &mut r.history.orders.iter().map(|o| &o.fate)),
    );
    let _ = writeln!(
        w,
        "cancellations: {} attempted, {} acknowledged, {} refused, {} unresolved",
        r.history.cancels.len(),
        v.acked_cancels,
        count(&refused, &mut r.history.cancels.iter().map(|c| &c.fate)),
        count(&unresolved, &mut r.history.cancels.iter().map(|c| &c.fate)),
    );
    let _ = writeln!(
        w,
        "quarantined and reported: {} acknowledged orders {:?}, {} acknowledged cancellations {:?}",
        v.quarantined_orders.len(),
        v.quarantined_orders.iter().take(10).collect::<Vec<_>>(),
        v.quarantined_cancels.len(),
        v.quarantined_cancels.iter().take(10).collect::<Vec<_>>()
    );
    let _ = writeln!(
        w,
        "settle: {} after {:.1}s{}; active region {}",
        if r.settle.converged {
            "converged"
        } else {
            "did NOT converge"
        },
        r.settle.waited.as_secs_f64(),
        if r.settle.missing.is_empty() {
            String::new()
        } else {
            format!(" (still: {})", r.settle.missing)
        },
        v.active.as_deref().unwrap_or("none")
    );

    let _ = writeln!(w, "\ninvariants:");
    for i in &v.invariants {
        let status = if !i.judged {
            "NOT JUDGED (no settle)".to_string()
        } else if i.count == 0 {
            "OK".to_string()
        } else {
            format!("VIOLATED ({})", i.count)
        };
        let _ = writeln!(w, "  ({}) {:<66} {status}", i.number, i.name);
        for e in &i.examples {
            let _ = writeln!(w, "        - {e}");
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(w, "\nnotes:");
        for n in &r.notes {
            let _ = writeln!(w, "  - {n}");
        }
    }
    let violations = v.violations();
    if violations > 0 {
        let _ = writeln!(
            w,
            "\nreproduce: chaos --faults {} --seed {} --durability {}{} (clients {}, rate {})",
            s.faults,
            s.seed,
            s.durability.as_str(),
            if r.backend == "docker" {
                " --backend docker"
            } else {
                ""
            },
            s.clients,
            s.rate
        );
        let _ = write!(w, "schedule of seed {}:\n{}", s.seed, r.schedule.render());
        if !r.logs.is_empty() {
            let _ = writeln!(w, "logs kept:");
            for (what, dir) in &r.logs {
                let _ = writeln!(w, "  {what}: {}", dir.display());
            }
        }
    }
    let _ = write!(w, "{}", summary_line(r.faults.len(), violations));
    out
}

/// The last line, which scripts and the CI test read.
pub fn summary_line(faults: usize, violations: usize) -> String {
    format!("{faults} faults, {violations} violations")
}
