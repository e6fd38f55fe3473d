//! The node's Prometheus metrics (names fixed by API.md).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub events_appended: IntCounterVec,
    pub events_handled: IntCounterVec,
    pub handler_duration: HistogramVec,
    pub consumer_lag: GaugeVec,
    pub dead_letters: GaugeVec,
    pub role: GaugeVec,
    pub epoch: IntGauge,
    pub orders: GaugeVec,
    pub redis_up: Gauge,
    /// 1 while the standby's projection is stopped at an entry it cannot apply.
    pub projection_halted: IntGauge,
    /// 1 while `replicated` durability acknowledges without the standby (API.md).
    pub durability_degraded: IntGauge,
    /// 1 while the node holds the active role but may not write: its lease lapsed and
    /// the peer did not vouch for it (alert: a region that should serve, cannot).
    pub fenced: IntGauge,
    /// Entries in the region's quarantine stream: events of an old epoch the new active
    /// never received, waiting for an operator (alert while not empty).
    pub quarantined_events: IntGauge,
    /// Orders this node cancelled because their saga ran out of time (API.md
    /// `tandem_node_saga_timeouts_total`).
    pub saga_timeouts: IntCounter,
    /// Webhook delivery attempts by outcome: `delivered` (2xx), `failed` (non-2xx,
    /// timeout or unreachable: retried), `parked` (gave up after the bound of attempts).
    pub webhook_deliveries: IntCounterVec,
    /// From the status change (the event's `occurredAt`) to the receiver's 2xx.
    pub webhook_delivery_latency: Histogram,
    /// Client connections open now (`NODE_HTTP_MAX_CONNECTIONS` at most).
    pub http_connections: IntGauge,
    /// Connections the node closed itself: `header_timeout` (slow or silent clients),
    /// `idle_timeout`, `lingered` (after an answer given before the body was read).
    pub http_connections_closed: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Webhook latency spans retries with backoff: seconds to minutes.
const WEBHOOK_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let metrics = Metrics {
            http_requests: counter(
                "tandem_node_http_requests_total",
                "HTTP requests by route template, method and status",
                &["route", "method", "status"],
            ),
            http_duration: histogram(
                "tandem_node_http_request_duration_seconds",
                "HTTP request latency by route template",
                &["route"],
            ),
            events_appended: counter(
                "tandem_node_events_appended_total",
                "Events appended to the region's event stream",
                &["event_type"],
            ),
            events_handled: counter(
                "tandem_node_events_handled_total",
                "Stream entries handled by consumer groups; outcome: ok, skipped, retried, dead_lettered",
                &["group", "event_type", "outcome"],
            ),
            handler_duration: histogram(
                "tandem_node_handler_duration_seconds",
                "Time to handle one stream entry, retries included",
                &["group"],
            ),
            consumer_lag: gauge(
                "tandem_node_consumer_lag",
                "Entries of the event stream a group has not finished (undelivered + pending)",
                &["group"],
            ),
            dead_letters: gauge(
                "tandem_node_dead_letters",
                "Entries parked in the dead-letter stream, by group",
                &["group"],
            ),
            role: gauge("tandem_node_role", "1 for the region's current role", &["role"]),
            epoch: IntGauge::new("tandem_node_epoch", "The region's current epoch").expect("valid metric"),
            orders: gauge("tandem_node_orders", "Orders by status (derived state)", &["status"]),
            redis_up: Gauge::new("tandem_node_redis_up", "1 when the region's Redis answered the last probe")
                .expect("valid metric"),
            durability_degraded: IntGauge::new(
                "tandem_node_durability_degraded",
                "1 while replicated durability cannot reach the standby and falls back (NODE_REPLICATED_FALLBACK)",
            )
            .expect("valid metric"),
            projection_halted: IntGauge::new(
                "tandem_node_projection_halted",
                "1 while the standby's projection is stopped at an event it cannot apply (see /health/ready)",
            )
            .expect("valid metric"),
            fenced: IntGauge::new(
                "tandem_node_fenced",
                "1 while the node is active but fenced (lease lapsed, not vouched for by the peer)",
            )
            .expect("valid metric"),
            quarantined_events: IntGauge::new(
                "tandem_node_quarantined_events",
                "Entries in the region's quarantine stream (tandem:quarantine)",
            )
            .expect("valid metric"),
            http_connections: IntGauge::new(
                "tandem_node_http_connections",
                "Client connections open now",
            )
            .expect("valid metric"),
            http_connections_closed: counter(
                "tandem_node_http_connections_closed_total",
                "Connections the node closed itself; reason: header_timeout, idle_timeout, lingered",
                &["reason"],
            ),
            saga_timeouts: IntCounter::new(
                "tandem_node_saga_timeouts_total",
                "Orders cancelled because they were not paid NODE_SAGA_TIMEOUT_MS after they were placed",
            )
            .expect("valid metric"),
            webhook_deliveries: counter(
                "tandem_node_webhook_deliveries_total",
                "Webhook delivery attempts; outcome: delivered, failed (retried), parked",
                &["outcome"],
            ),
            webhook_delivery_latency: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "tandem_node_webhook_delivery_latency_seconds",
                        "From an order's status change to the receiver's 2xx, retries included",
                    )
                    .buckets(WEBHOOK_BUCKETS.to_vec()),
                )
                .expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            registry,
        };
        for gauge in [
            &metrics.epoch,
            &metrics.projection_halted,
            &metrics.durability_degraded,
            &metrics.fenced,
            &metrics.quarantined_events,
            &metrics.http_connections,
        ] {
            metrics
                .registry
                .register(Box::new(gauge.clone()))
                .expect("unique metric");
        }
        metrics
            .registry
            .register(Box::new(metrics.redis_up.clone()))
            .expect("unique metric");
        metrics
            .registry
            .register(Box::new(metrics.saga_timeouts.clone()))
            .expect("unique metric");
        metrics
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
