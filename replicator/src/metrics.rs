//! Every metric the replicator exports (API.md "Metrics"), in one registry per process
//! so tests can run several applications side by side.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use prometheus::{GaugeVec, HistogramVec};

pub struct Metrics {
    registry: Registry,
    /// Entries written into the local stream (duplicates of a retried batch excluded).
    pub events_copied: IntCounterVec,
    /// Entries present on the peer and not yet copied.
    pub lag_events: IntGaugeVec,
    /// Age of the oldest entry not yet copied (from its id's millisecond part); 0 when caught up.
    pub lag_seconds: GaugeVec,
    /// Consumer-group changes applied locally (create, position, pending entries, destroy).
    pub group_syncs: IntCounter,
    /// Rounds of the role gate (both role records read, a decision published): that the
    /// gate is alive, and how many decisions a quiet period held.
    pub gate_checks: IntCounter,
    pub quarantined: IntCounter,
    /// Entries the local stream already held when a batch was retried.
    pub duplicates: IntCounterVec,
    pub batch_duration: Histogram,
    pub batch_entries: Histogram,
    pub group_sync_duration: Histogram,
    /// 1 while the role gate allows copying.
    pub copying: IntGauge,
    /// `state` is one of copying, idle, rejoining; the current one is 1.
    pub state: IntGaugeVec,
    /// 1 when the last command to that side succeeded.
    pub redis_up: IntGaugeVec,
    /// 1 while the peer's Redis can be read (API.md additions): the signal that the
    /// lag gauges are measured, not extrapolated.
    pub peer_up: IntGauge,
    pub redis_errors: IntCounterVec,
    pub epoch: IntGaugeVec,
    pub streams: IntGauge,
    pub pending_entries_synced: IntCounterVec,
    pub last_copy_apply: HistogramVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            events_copied: IntCounterVec::new(
                Opts::new("tandem_replicator_events_copied_total", "Entries copied from the peer into the local stream"),
                &["stream"],
            )
            .unwrap(),
            lag_events: IntGaugeVec::new(
                Opts::new("tandem_replicator_lag_events", "Entries on the peer not yet copied"),
                &["stream"],
            )
            .unwrap(),
            lag_seconds: GaugeVec::new(
                Opts::new(
                    "tandem_replicator_lag_seconds",
                    "Age of the oldest entry not yet copied, from its id; 0 when caught up",
                ),
                &["stream"],
            )
            .unwrap(),
            group_syncs: IntCounter::new(
                "tandem_replicator_group_syncs_total",
                "Consumer-group changes applied locally (create, set position, pending entries, destroy)",
            )
            .unwrap(),
            gate_checks: IntCounter::new(
                "tandem_replicator_gate_checks_total",
                "Rounds of the role gate: both role records read and a decision taken",
            )
            .unwrap(),
            quarantined: IntCounter::new(
                "tandem_replicator_quarantined_events_total",
                "Local entries moved to tandem:quarantine on rejoin because the active peer never had them",
            )
            .unwrap(),
            duplicates: IntCounterVec::new(
                Opts::new(
                    "tandem_replicator_duplicates_skipped_total",
                    "Entries of a retried batch the local stream already held",
                ),
                &["stream"],
            )
            .unwrap(),
            batch_duration: Histogram::with_opts(
                HistogramOpts::new("tandem_replicator_batch_duration_seconds", "Time to write one batch locally")
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            )
            .unwrap(),
            batch_entries: Histogram::with_opts(
                HistogramOpts::new("tandem_replicator_batch_entries", "Entries per copied batch")
                    .buckets(vec![1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0]),
            )
            .unwrap(),
            group_sync_duration: Histogram::with_opts(
                HistogramOpts::new("tandem_replicator_group_sync_duration_seconds", "Time of one group sync round")
                    .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            )
            .unwrap(),
            copying: IntGauge::new("tandem_replicator_copying", "1 while the role gate allows copying").unwrap(),
            state: IntGaugeVec::new(
                Opts::new("tandem_replicator_state", "Current state: copying, idle or rejoining (1 = current)"),
                &["state"],
            )
            .unwrap(),
            redis_up: IntGaugeVec::new(
                Opts::new("tandem_replicator_redis_up", "1 when the last command to that Redis succeeded"),
                &["side"],
            )
            .unwrap(),
            peer_up: IntGauge::new(
                "tandem_replicator_peer_up",
                "1 while the peer region's Redis can be read; 0 while it cannot (lag_seconds then grows)",
            )
            .unwrap(),
            redis_errors: IntCounterVec::new(
                Opts::new("tandem_replicator_redis_errors_total", "Failed Redis commands by side and task"),
                &["side", "task"],
            )
            .unwrap(),
            epoch: IntGaugeVec::new(
                Opts::new("tandem_replicator_epoch", "Epoch of the role record on each side"),
                &["side"],
            )
            .unwrap(),
            streams: IntGauge::new("tandem_replicator_streams", "Streams discovered on the peer").unwrap(),
            pending_entries_synced: IntCounterVec::new(
                Opts::new(
                    "tandem_replicator_pending_entries_synced_total",
                    "Pending entries claimed or acknowledged locally to match the peer",
                ),
                &["op"],
            )
            .unwrap(),
            last_copy_apply: HistogramVec::new(
                HistogramOpts::new(
                    "tandem_replicator_copy_delay_seconds",
                    "Now minus the id time of the newest entry of each written batch",
                )
                .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 10.0]),
                &["stream"],
            )
            .unwrap(),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.events_copied.clone())).unwrap();
        r.register(Box::new(m.lag_events.clone())).unwrap();
        r.register(Box::new(m.lag_seconds.clone())).unwrap();
        r.register(Box::new(m.group_syncs.clone())).unwrap();
        r.register(Box::new(m.gate_checks.clone())).unwrap();
        r.register(Box::new(m.quarantined.clone())).unwrap();
        r.register(Box::new(m.duplicates.clone())).unwrap();
        r.register(Box::new(m.batch_duration.clone())).unwrap();
        r.register(Box::new(m.batch_entries.clone())).unwrap();
        r.register(Box::new(m.group_sync_duration.clone())).unwrap();
        r.register(Box::new(m.copying.clone())).unwrap();
        r.register(Box::new(m.state.clone())).unwrap();
        r.register(Box::new(m.redis_up.clone())).unwrap();
        r.register(Box::new(m.peer_up.clone())).unwrap();
        r.register(Box::new(m.redis_errors.clone())).unwrap();
        r.register(Box::new(m.epoch.clone())).unwrap();
        r.register(Box::new(m.streams.clone())).unwrap();
        r.register(Box::new(m.pending_entries_synced.clone()))
            .unwrap();
        r.register(Box::new(m.last_copy_apply.clone())).unwrap();
        // Families with labels only appear once a label is used; show the ones every
        // dashboard relies on from the start.
        for stream in [eventlog::keys::EVENTS, eventlog::keys::DLQ] {
            m.events_copied.with_label_values(&[stream]);
            m.lag_events.with_label_values(&[stream]);
            m.lag_seconds.with_label_values(&[stream]);
        }
        for side in ["local", "peer"] {
            m.redis_up.with_label_values(&[side]);
            m.epoch.with_label_values(&[side]);
        }
        m
    }

    pub fn set_state(&self, current: &str) {
        for s in ["copying", "idle", "rejoining"] {
            self.state
                .with_label_values(&[s])
                .set(i64::from(s == current));
        }
        self.copying.set(i64::from(current == "copying"));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding never fails");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
