//! The seeded fault plan: which faults, when and for how long.
//!
//! Pure: the same seed, count and capabilities give the same plan on any machine (the
//! generator is a SplitMix64 of our own, not a library whose stream may change between
//! versions), so a violation is reproduced from the seed it prints.
//!
//! Faults may overlap, but never two on the same component at once (a process is not
//! paused while it is dead, a link is not cut twice): each fault holds the components it
//! touches ([`Slot`]) from its start until a short while after its heal.

use std::collections::BTreeMap;
use std::fmt;

/// One of the two regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Region {
    A,
    B,
}

impl Region {
    pub const BOTH: [Region; 2] = [Region::A, Region::B];

    pub fn id(self) -> &'static str {
        match self {
            Region::A => "a",
            Region::B => "b",
        }
    }

    pub fn other(self) -> Region {
        match self {
            Region::A => Region::B,
            Region::B => Region::A,
        }
    }

    pub fn parse(s: &str) -> Option<Region> {
        match s {
            "a" => Some(Region::A),
            "b" => Some(Region::B),
            _ => None,
        }
    }
}

/// What a process fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Node(Region),
    Redis(Region),
    Replicator(Region),
    Gateway,
    /// The region's node, Redis and replicator together.
    Region(Region),
}

/// A link a fault may cut (the process backend's proxies; the Docker backend cuts
/// [`Link::Regions`] by taking both Redis servers off the shared network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Link {
    /// Both directions between the regions: each region's node and replicator to the
    /// other region's Redis.
    Regions,
    /// The gateway to one region's node.
    Gateway(Region),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// SIGKILL; started again at the heal.
    Kill(Target),
    /// SIGSTOP; SIGCONT at the heal.
    Pause(Target),
    /// Blackhole (nothing forwarded, nothing closed); forwarding resumes at the heal.
    Cut(Link),
    /// SIGKILL of a Redis and a start from its AOF at once.
    RestartRedis(Region),
    /// SIGKILL of a replicator and a start at once.
    RestartReplicator(Region),
    /// A planned switchover to the standby (gateway admin API) under load.
    Switchover,
    /// A whole region cut off from the gateway and from the other region (its node,
    /// Redis and replicator still see each other); reconnected at the heal. The Docker
    /// backend's `docker network disconnect` of the region from the shared network.
    Partition(Region),
    /// The gateway stopped (SIGTERM, then SIGKILL after a grace) and started at once,
    /// its failover state from its state directory: `docker restart`.
    RestartGateway,
}

/// Which faults a backend can inject. A kind a backend lacks is never drawn, and the
/// kinds are drawn from one fixed list, so adding a kind for one backend leaves every
/// other backend's plan of a seed as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Kill, pause and restart processes (or their containers).
    pub processes: bool,
    /// Cut the link between the regions ([`Link::Regions`]).
    pub region_link: bool,
    /// Cut the gateway's link to one region, that region's link to the other staying up
    /// ([`Link::Gateway`]).
    pub gateway_links: bool,
    /// Cut a whole region off from the gateway and the other region
    /// ([`FaultKind::Partition`]).
    pub partitions: bool,
    /// Stop and start the gateway ([`FaultKind::RestartGateway`]).
    pub gateway_restart: bool,
    /// Planned switchover through the gateway's admin API.
    pub switchover: bool,
}

impl Capabilities {
    /// The process backend: every process local, every cuttable link proxied.
    pub const PROCESS: Capabilities = Capabilities {
        processes: true,
        region_link: true,
        gateway_links: true,
        partitions: false,
        gateway_restart: false,
        switchover: true,
    };

    /// The Docker backend: containers killed, paused and restarted, networks
    /// disconnected. The gateway reaches a node over the same network the node uses
    /// for the other region's Redis, so the gateway's link to one region alone cannot
    /// be cut; a whole region's partition can.
    pub const DOCKER: Capabilities = Capabilities {
        processes: true,
        region_link: true,
        gateway_links: false,
        partitions: true,
        gateway_restart: true,
        switchover: true,
    };

    /// A system someone else runs: at most planned switchovers (with the admin token).
    pub const fn attached(switchover: bool) -> Capabilities {
        Capabilities {
            processes: false,
            region_link: false,
            gateway_links: false,
            partitions: false,
            gateway_restart: false,
            switchover,
        }
    }
}

impl FaultKind {
    /// Faults that happen at once and have nothing to heal.
    pub fn is_instant(self) -> bool {
        matches!(
            self,
            FaultKind::RestartRedis(_)
                | FaultKind::RestartReplicator(_)
                | FaultKind::Switchover
                | FaultKind::RestartGateway
        )
    }

    /// The kind without its target, for the table of faults by kind.
    pub fn label(self) -> &'static str {
        use FaultKind::*;
        use Target::*;
        match self {
            Kill(Node(_)) => "kill node",
            Kill(Redis(_)) => "kill redis",
            Kill(Replicator(_)) => "kill replicator",
            Kill(Gateway) => "kill gateway",
            Kill(Region(_)) => "kill region",
            Pause(Node(_)) => "pause node",
            Pause(Redis(_)) => "pause redis",
            Pause(Replicator(_)) => "pause replicator",
            Pause(Gateway) => "pause gateway",
            Pause(Region(_)) => "pause region",
            Cut(Link::Regions) => "cut regions",
            Cut(Link::Gateway(_)) => "cut gateway-region",
            RestartRedis(_) => "restart redis (AOF)",
            RestartReplicator(_) => "restart replicator",
            Switchover => "switchover",
            Partition(_) => "partition region",
            RestartGateway => "restart gateway",
        }
    }

    fn needs(self, caps: Capabilities) -> bool {
        match self {
            FaultKind::Cut(Link::Regions) => caps.region_link,
            FaultKind::Cut(Link::Gateway(_)) => caps.gateway_links,
            FaultKind::Partition(_) => caps.partitions,
            FaultKind::RestartGateway => caps.gateway_restart,
            FaultKind::Switchover => caps.switchover,
            _ => caps.processes,
        }
    }

    /// The components the fault holds while it lasts.
    pub fn slots(self) -> Vec<Slot> {
        use FaultKind::*;
        let region = |r: Region| {
            vec![
                Slot::Node(r),
                Slot::Redis(r),
                Slot::Replicator(r),
                Slot::GatewayLink(r),
            ]
        };
        match self {
            Kill(t) | Pause(t) => match t {
                Target::Node(r) => vec![Slot::Node(r)],
                Target::Redis(r) => vec![Slot::Redis(r)],
                Target::Replicator(r) => vec![Slot::Replicator(r)],
                Target::Gateway => vec![Slot::Gateway],
                Target::Region(r) => region(r),
            },
            Cut(Link::Regions) => vec![Slot::RegionsLink],
            Cut(Link::Gateway(r)) => vec![Slot::GatewayLink(r)],
            RestartRedis(r) => vec![Slot::Redis(r)],
            RestartReplicator(r) => vec![Slot::Replicator(r)],
            Switchover => vec![Slot::Control],
            // Every process of the region, as for a region's kill. Not the link between
            // the regions: a cut of that link may overlap (the backend keeps a Redis off
            // the shared network until both are healed).
            Partition(r) => region(r),
            RestartGateway => vec![Slot::Gateway],
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FaultKind::*;
        let target = |t: &Target| match t {
            Target::Node(r) => format!("node {}", r.id()),
            Target::Redis(r) => format!("redis {}", r.id()),
            Target::Replicator(r) => format!("replicator {}", r.id()),
            Target::Gateway => "gateway".to_string(),
            Target::Region(r) => format!("region {}", r.id()),
        };
        match self {
            Kill(t) => write!(f, "SIGKILL {}", target(t)),
            Pause(t) => write!(f, "SIGSTOP {}", target(t)),
            Cut(Link::Regions) => write!(f, "cut link a<->b (blackhole)"),
            Cut(Link::Gateway(r)) => write!(f, "cut link gateway->{} (blackhole)", r.id()),
            RestartRedis(r) => write!(f, "restart redis {} from its AOF", r.id()),
            RestartReplicator(r) => write!(f, "restart replicator {}", r.id()),
            Switchover => write!(f, "planned switchover to the standby"),
            Partition(r) => write!(f, "partition region {} (gateway and peer)", r.id()),
            RestartGateway => write!(f, "restart gateway"),
        }
    }
}

/// A component a fault holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    Node(Region),
    Redis(Region),
    Replicator(Region),
    Gateway,
    RegionsLink,
    GatewayLink(Region),
    /// The gateway's failover control (one switchover at a time).
    Control,
}

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// 1-based, in start order.
    pub id: usize,
    /// From the start of the fault phase.
    pub start_ms: u64,
    /// How long it lasts before its heal (0 for an instant fault).
    pub duration_ms: u64,
    pub kind: FaultKind,
}

impl Fault {
    pub fn end_ms(&self) -> u64 {
        self.start_ms + self.duration_ms
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |ms: u64| ms as f64 / 1000.0;
        if self.kind.is_instant() {
            write!(
                f,
                "#{} at {:.2}s: {}",
                self.id,
                secs(self.start_ms),
                self.kind
            )
        } else {
            write!(
                f,
                "#{} at {:.2}s for {:.2}s: {}",
                self.id,
                secs(self.start_ms),
                secs(self.duration_ms),
                self.kind
            )
        }
    }
}

/// A step of the plan in time order: a fault begins or is healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Inject(Fault),
    Heal(Fault),
}

impl Step {
    pub fn at_ms(&self) -> u64 {
        match self {
            Step::Inject(f) => f.start_ms,
            Step::Heal(f) => f.end_ms(),
        }
    }
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub faults: Vec<Fault>,
}

/// Time a component stays untouched after its heal, so a restarted process is up
/// before the next fault on it.
const REST_MS: u64 = 600;
/// Chance that a fault starts while the previous one still lasts.
const OVERLAP_PERCENT: u64 = 30;

impl Schedule {
    /// `count` faults drawn from `seed`, only of the kinds `caps` allows.
    pub fn generate(seed: u64, count: usize, caps: Capabilities) -> Schedule {
        let kinds = weighted_kinds(caps);
        let mut faults: Vec<Fault> = Vec::with_capacity(count);
        if kinds.is_empty() {
            return Schedule { seed, faults };
        }
        let total_weight: u64 = kinds.iter().map(|(_, w)| w).sum();
        let mut rng = SplitMix64::new(seed);
        // When each slot is free again.
        let mut free_at: BTreeMap<Slot, u64> = BTreeMap::new();
        let mut last_end = 0u64;
        let mut prev: Option<Fault> = None;
        for id in 1..=count {
            let mut pick = rng.below(total_weight);
            let kind = kinds
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map(|(k, _)| *k)
                .expect("a kind is always picked");
            let duration_ms = if kind.is_instant() {
                0
            } else {
                rng.range(300, 3500)
            };
            let overlap = prev.is_some() && rng.below(100) < OVERLAP_PERCENT;
            let mut start_ms = match prev {
                Some(p) if overlap => p.start_ms + rng.range(100, p.duration_ms.max(101)),
                Some(_) => last_end + rng.range(300, 2500),
                None => rng.range(300, 1500),
            };
            // Never on a component another fault still holds.
            for slot in kind.slots() {
                start_ms = start_ms.max(free_at.get(&slot).copied().unwrap_or(0));
            }
            let fault = Fault {
                id,
                start_ms,
                duration_ms,
                kind,
            };
            for slot in kind.slots() {
                free_at.insert(slot, fault.end_ms() + REST_MS);
            }
            last_end = last_end.max(fault.end_ms());
            faults.push(fault);
            prev = Some(fault);
        }
        faults.sort_by_key(|f| (f.start_ms, f.id));
        for (i, f) in faults.iter_mut().enumerate() {
            f.id = i + 1;
        }
        Schedule { seed, faults }
    }

    /// Injections and heals in time order (a heal before an injection at the same
    /// instant).
    pub fn steps(&self) -> Vec<Step> {
        let mut steps: Vec<Step> = Vec::new();
        for f in &self.faults {
            steps.push(Step::Inject(*f));
            if !f.kind.is_instant() {
                steps.push(Step::Heal(*f));
            }
        }
        steps.sort_by_key(|s| (s.at_ms(), matches!(s, Step::Inject(_)), fault_of(s).id));
        steps
    }

    /// The plan, one fault a line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in &self.faults {
            out.push_str(&format!("  {f}\n"));
        }
        out
    }
}

fn fault_of(s: &Step) -> &Fault {
    match s {
        Step::Inject(f) | Step::Heal(f) => f,
    }
}

/// Every kind the capabilities allow, with its weight (how often it is drawn).
fn weighted_kinds(caps: Capabilities) -> Vec<(FaultKind, u64)> {
    use FaultKind::*;
    let mut kinds = Vec::new();
    for r in Region::BOTH {
        kinds.extend([
            (Kill(Target::Node(r)), 3),
            (Pause(Target::Node(r)), 2),
            (Kill(Target::Redis(r)), 1),
            (Pause(Target::Redis(r)), 1),
            (Kill(Target::Replicator(r)), 1),
            (Pause(Target::Replicator(r)), 1),
            (Kill(Target::Region(r)), 2),
            (Pause(Target::Region(r)), 1),
            (Cut(Link::Gateway(r)), 2),
            (RestartRedis(r), 1),
            (RestartReplicator(r), 1),
        ]);
    }
    kinds.extend([
        (Kill(Target::Gateway), 1),
        (Pause(Target::Gateway), 1),
        (Cut(Link::Regions), 3),
        (Switchover, 3),
    ]);
    // Appended after every other kind: a backend without them draws exactly what it drew
    // before they existed (the pick walks this list in order).
    kinds.extend([
        (Partition(Region::A), 2),
        (Partition(Region::B), 2),
        (RestartGateway, 1),
    ]);
    kinds.retain(|(k, _)| k.needs(caps));
    kinds
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and fixed forever, which is what a
/// seed printed today must rely on to mean the same plan next year.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for fault plans and client choices.
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..hi` (`hi` > `lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Capabilities = Capabilities::PROCESS;

    #[test]
    fn a_seed_always_gives_the_same_plan() {
        let a = Schedule::generate(42, 50, ALL);
        let b = Schedule::generate(42, 50, ALL);
        assert_eq!(a, b);
        assert_ne!(a, Schedule::generate(43, 50, ALL));
        assert_eq!(a.faults.len(), 50);
        // The generator itself is pinned: these are SplitMix64's first outputs for 0.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn no_component_is_hit_by_two_faults_at_once() {
        for seed in 0..200 {
            let plan = Schedule::generate(seed, 40, ALL);
            for (i, f) in plan.faults.iter().enumerate() {
                for g in &plan.faults[i + 1..] {
                    let shared = f.kind.slots().iter().any(|s| g.kind.slots().contains(s));
                    let overlap =
                        g.start_ms < f.end_ms() + REST_MS && f.start_ms < g.end_ms() + REST_MS;
                    assert!(
                        !(shared && overlap),
                        "seed {seed}: {f} and {g} hold the same component at once"
                    );
                }
            }
        }
    }

    #[test]
    fn some_faults_overlap_and_every_kind_is_drawn() {
        let plan = Schedule::generate(7, 400, ALL);
        let overlapping = plan
            .faults
            .windows(2)
            .filter(|w| w[1].start_ms < w[0].end_ms())
            .count();
        assert!(overlapping > 10, "only {overlapping} overlaps");
        let labels: std::collections::BTreeSet<&str> =
            plan.faults.iter().map(|f| f.kind.label()).collect();
        assert_eq!(labels.len(), 15, "{labels:?}");
    }

    #[test]
    fn without_process_control_only_switchovers_are_planned() {
        let plan = Schedule::generate(1, 10, Capabilities::attached(true));
        assert!(plan.faults.iter().all(|f| f.kind == FaultKind::Switchover));
        assert!(Schedule::generate(1, 10, Capabilities::attached(false))
            .faults
            .is_empty());
    }

    #[test]
    fn the_docker_kinds_leave_the_process_plans_as_they_were() {
        // Seed 10's first faults as the process backend drew them before the Docker
        // kinds existed (tests/tests/chaos_campaign.rs runs this seed).
        let plan = Schedule::generate(10, 4, ALL);
        let kinds: Vec<String> = plan.faults.iter().map(|f| f.kind.to_string()).collect();
        assert_eq!(
            kinds,
            [
                "SIGKILL node a",
                "SIGSTOP gateway",
                "restart replicator b",
                "SIGKILL region a"
            ]
        );
        for seed in 0..50 {
            let plan = Schedule::generate(seed, 60, ALL);
            assert!(plan
                .faults
                .iter()
                .all(|f| !matches!(f.kind, FaultKind::Partition(_) | FaultKind::RestartGateway)));
        }
    }

    #[test]
    fn the_docker_backend_draws_partitions_and_never_a_gateway_link_cut() {
        let plan = Schedule::generate(7, 400, Capabilities::DOCKER);
        let labels: std::collections::BTreeSet<&str> =
            plan.faults.iter().map(|f| f.kind.label()).collect();
        assert!(labels.contains("partition region"), "{labels:?}");
        assert!(labels.contains("restart gateway"), "{labels:?}");
        assert!(labels.contains("cut regions"), "{labels:?}");
        assert!(!labels.contains("cut gateway-region"), "{labels:?}");
        assert_eq!(labels.len(), 16, "{labels:?}");
        for (i, f) in plan.faults.iter().enumerate() {
            for g in &plan.faults[i + 1..] {
                let shared = f.kind.slots().iter().any(|s| g.kind.slots().contains(s));
                let overlap =
                    g.start_ms < f.end_ms() + REST_MS && f.start_ms < g.end_ms() + REST_MS;
                assert!(!(shared && overlap), "{f} and {g} hold the same component");
            }
        }
    }

    #[test]
    fn steps_heal_each_fault_after_injecting_it() {
        let plan = Schedule::generate(3, 30, ALL);
        let steps = plan.steps();
        for f in &plan.faults {
            let inject = steps.iter().position(|s| *s == Step::Inject(*f)).unwrap();
            if let Some(heal) = steps.iter().position(|s| *s == Step::Heal(*f)) {
                assert!(heal > inject);
            } else {
                assert!(f.kind.is_instant());
            }
        }
        assert!(steps.windows(2).all(|w| w[0].at_ms() <= w[1].at_ms()));
    }
}
