//! The gateway's Prometheus metrics (names and labels as API.md lists them) and the
//! route templates that keep their label sets small.

use hyper::http::{Method, StatusCode};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::OnceLock;

/// Values of `tandem_gateway_failovers_total{reason}`.
pub const FAILOVER_REASONS: [&str; 2] = ["unhealthy", "planned"];
/// Values of `tandem_gateway_retries_total{reason}`: how the previous attempt failed.
pub const RETRY_REASONS: [&str; 5] = ["connect", "reset", "timeout", "status_5xx", "failover"];

/// Values of the `method` label; anything else is `other`.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "other",
];
/// Statuses whose `requests_total` series are found by index; any other status takes
/// the labelled lookup (they are rare).
const HOT_STATUSES: [u16; 21] = [
    200, 201, 202, 204, 301, 302, 304, 400, 401, 403, 404, 405, 409, 413, 422, 429, 431, 500, 502,
    503, 504,
];
/// The `region` label of a request no region answered.
pub const NO_REGION_LABEL: &str = "gateway";

/// All gateway metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// Recorded through [`Metrics::record_request`].
    requests: IntCounterVec,
    duration: HistogramVec,
    /// The request series by index, so recording a request takes no lock and hashes no
    /// label: `with_label_values` hashes the four labels and takes the vector's lock
    /// (shared by every worker) on each call. Each series is still created on first use,
    /// as before, so `/metrics` shows the same series.
    hot: HotSeries,
    pub region_healthy: IntGaugeVec,
    pub active_region: IntGaugeVec,
    pub epoch: IntGauge,
    pub controller: IntGauge,
    pub failovers: IntCounterVec,
    pub retries: IntCounterVec,
    pub rejected: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub jwks_fetches: IntCounterVec,
    pub jwks_keys: IntGauge,
    pub connections_open: IntGauge,
    pub worker_connections: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub lingering_closes: IntCounter,
}

impl Metrics {
    pub fn new(regions: &[String]) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_requests_total",
                "Requests answered, by the region that served them ('none' when no region did).",
            ),
            &["region", "method", "route", "status"],
        )
        .expect("metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tandem_gateway_request_duration_seconds",
                "Time from receiving a request to sending its response head.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["region", "route"],
        )
        .expect("metric");
        let region_healthy = IntGaugeVec::new(
            Opts::new(
                "tandem_gateway_region_healthy",
                "1 while the region passes its checks and is not ejected.",
            ),
            &["region"],
        )
        .expect("metric");
        let active_region = IntGaugeVec::new(
            Opts::new(
                "tandem_gateway_active_region",
                "1 for the region the gateway sends writes to.",
            ),
            &["region"],
        )
        .expect("metric");
        let epoch =
            IntGauge::new("tandem_gateway_epoch", "The active region's epoch.").expect("metric");
        let controller = IntGauge::new(
            "tandem_gateway_controller",
            "1 while this gateway controls failover (always, without etcd).",
        )
        .expect("metric");
        let failovers = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_failovers_total",
                "Promotions of another region, by reason (unhealthy, planned).",
            ),
            &["from", "to", "reason"],
        )
        .expect("metric");
        let retries = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_retries_total",
                "Requests sent again, by what made the previous attempt fail.",
            ),
            &["reason"],
        )
        .expect("metric");
        let rejected = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_rejected_total",
                "Requests refused by the gateway itself, by error code.",
            ),
            &["code"],
        )
        .expect("metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_auth_failures_total",
                "Requests refused for their access token or its rights, by reason.",
            ),
            &["reason"],
        )
        .expect("metric");
        let jwks_fetches = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_jwks_fetches_total",
                "Loads of the JSON Web Key Set, by outcome (ok, error).",
            ),
            &["outcome"],
        )
        .expect("metric");
        let jwks_keys = IntGauge::new(
            "tandem_gateway_jwks_keys",
            "Usable verification keys in the loaded JWKS.",
        )
        .expect("metric");
        let connections_open = IntGauge::new(
            "tandem_gateway_connections_open",
            "Client connections open (lingering ones included).",
        )
        .expect("metric");
        let worker_connections = IntGaugeVec::new(
            Opts::new(
                "tandem_gateway_worker_connections",
                "Client connections each worker thread serves (connections being handed from one worker to another included).",
            ),
            &["worker"],
        )
        .expect("metric");
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_connections_refused_total",
                "Client connections closed at once: over the cap with none idle (limit) or over the per-address cap (per_client).",
            ),
            &["reason"],
        )
        .expect("metric");
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "tandem_gateway_connections_closed_total",
                "Client connections the gateway closed itself: no whole first request head within the header read timeout (header_timeout), idle past the timeout (idle) or to make room at the cap (evicted).",
            ),
            &["reason"],
        )
        .expect("metric");
        let lingering_closes = IntCounter::new(
            "tandem_gateway_lingering_closes_total",
            "Connections closed by reading on after an answer given before the request body was read (413, 401, ...).",
        )
        .expect("metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(duration.clone()),
            Box::new(region_healthy.clone()),
            Box::new(active_region.clone()),
            Box::new(epoch.clone()),
            Box::new(controller.clone()),
            Box::new(failovers.clone()),
            Box::new(retries.clone()),
            Box::new(rejected.clone()),
            Box::new(auth_failures.clone()),
            Box::new(jwks_fetches.clone()),
            Box::new(jwks_keys.clone()),
            Box::new(connections_open.clone()),
            Box::new(worker_connections.clone()),
            Box::new(connections_refused.clone()),
            Box::new(connections_closed.clone()),
            Box::new(lingering_closes.clone()),
        ] {
            registry.register(c).expect("register metric");
        }
        // Every series a dashboard may query exists from the start, at 0.
        for r in regions {
            region_healthy.with_label_values(&[r.as_str()]).set(0);
            active_region.with_label_values(&[r.as_str()]).set(0);
            for to in regions.iter().filter(|to| *to != r) {
                for reason in FAILOVER_REASONS {
                    failovers.with_label_values(&[r.as_str(), to.as_str(), reason]);
                }
            }
        }
        for reason in RETRY_REASONS {
            retries.with_label_values(&[reason]);
        }
        for reason in ["limit", "per_client"] {
            connections_refused.with_label_values(&[reason]);
        }
        for reason in ["idle", "evicted"] {
            connections_closed.with_label_values(&[reason]);
        }
        let hot = HotSeries::new(regions);
        Metrics {
            registry,
            requests,
            duration,
            hot,
            region_healthy,
            active_region,
            epoch,
            controller,
            failovers,
            retries,
            rejected,
            auth_failures,
            jwks_fetches,
            jwks_keys,
            connections_open,
            worker_connections,
            connections_refused,
            connections_closed,
            lingering_closes,
        }
    }

    /// Counts an answered request and observes its duration. `region`: the index of
    /// the region that answered (as in the routing table), `None` for the gateway's own
    /// answer.
    pub fn record_request(
        &self,
        region: Option<usize>,
        method: &Method,
        route: Route,
        status: StatusCode,
        seconds: f64,
    ) {
        let h = &self.hot;
        let r = region.map_or(h.labels.len() - 1, |i| i.min(h.labels.len() - 1));
        let m = method_index(method);
        let cell = (r * METHODS.len() + m) * Route::COUNT + route as usize;
        match HOT_STATUSES.iter().position(|&s| s == status.as_u16()) {
            Some(s) => h.requests[cell * HOT_STATUSES.len() + s]
                .get_or_init(|| {
                    self.requests.with_label_values(&[
                        h.labels[r].as_str(),
                        METHODS[m],
                        route.template(),
                        status.as_str(),
                    ])
                })
                .inc(),
            None => self
                .requests
                .with_label_values(&[
                    h.labels[r].as_str(),
                    METHODS[m],
                    route.template(),
                    status.as_str(),
                ])
                .inc(),
        }
        h.duration[r * Route::COUNT + route as usize]
            .get_or_init(|| {
                self.duration
                    .with_label_values(&[h.labels[r].as_str(), route.template()])
            })
            .observe(seconds);
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encode metrics");
        buf
    }
}

/// The request series, each resolved once, by index.
struct HotSeries {
    /// `region` label values: the regions in routing-table order, then the gateway's.
    labels: Vec<String>,
    /// By region, method, route, then status (`HOT_STATUSES`).
    requests: Box<[OnceLock<IntCounter>]>,
    /// By region, then route.
    duration: Box<[OnceLock<Histogram>]>,
}

impl HotSeries {
    fn new(regions: &[String]) -> HotSeries {
        let mut labels = regions.to_vec();
        labels.push(NO_REGION_LABEL.to_string());
        let cells = labels.len() * METHODS.len() * Route::COUNT;
        HotSeries {
            requests: (0..cells * HOT_STATUSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            duration: (0..labels.len() * Route::COUNT)
                .map(|_| OnceLock::new())
                .collect(),
            labels,
        }
    }
}

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::HEAD => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The `method` label of a request: a bounded set of values.
pub fn method_label(m: &Method) -> &'static str {
    METHODS[method_index(m)]
}

/// A request's route template, for metric labels: ids are replaced so the label set
/// stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Root,
    Orders,
    Order,
    OrderCancel,
    CheckAvailability,
    Product,
    ShipmentDispatch,
    ShipmentDeliver,
    Events,
    Event,
    Webhooks,
    Webhook,
    WebhookDeadLetters,
    HealthLive,
    HealthReady,
    Metrics,
    OpenApi,
    GatewayHealth,
    GatewayRegions,
    GatewayFailover,
    RegionDrain,
    RegionUndrain,
    Other,
}

impl Route {
    const COUNT: usize = Route::Other as usize + 1;

    /// The route of a request path; no allocation (this runs for every request).
    pub fn of(path: &str) -> Route {
        // No route has more than four segments: a longer path is "other".
        let mut segs = [""; 4];
        let mut n = 0;
        for seg in path.trim_end_matches('/').split('/').skip(1) {
            if n == segs.len() {
                return Route::Other;
            }
            segs[n] = seg;
            n += 1;
        }
        match &segs[..n] {
            [] | [""] => Route::Root,
            ["orders"] => Route::Orders,
            ["orders", _] => Route::Order,
            ["orders", _, "cancel"] => Route::OrderCancel,
            ["api", "v1", "products", "check-availability"] => Route::CheckAvailability,
            ["api", "v1", "products", _] => Route::Product,
            ["shipments", _, "dispatch"] => Route::ShipmentDispatch,
            ["shipments", _, "deliver"] => Route::ShipmentDeliver,
            ["api", "events"] => Route::Events,
            ["api", "events", _] => Route::Event,
            ["api", "v1", "webhooks"] => Route::Webhooks,
            ["api", "v1", "webhooks", _] => Route::Webhook,
            ["api", "v1", "webhooks", _, "dead-letters"] => Route::WebhookDeadLetters,
            ["health", "live"] => Route::HealthLive,
            ["health", "ready"] => Route::HealthReady,
            ["metrics"] => Route::Metrics,
            ["openapi.json"] => Route::OpenApi,
            ["gateway", "health"] => Route::GatewayHealth,
            ["gateway", "regions"] => Route::GatewayRegions,
            ["gateway", "failover"] => Route::GatewayFailover,
            ["gateway", "regions", _, "drain"] => Route::RegionDrain,
            ["gateway", "regions", _, "undrain"] => Route::RegionUndrain,
            _ => Route::Other,
        }
    }

    /// The label value.
    pub fn template(self) -> &'static str {
        match self {
            Route::Root => "/",
            Route::Orders => "/orders",
            Route::Order => "/orders/{orderId}",
            Route::OrderCancel => "/orders/{orderId}/cancel",
            Route::CheckAvailability => "/api/v1/products/check-availability",
            Route::Product => "/api/v1/products/{sku}",
            Route::ShipmentDispatch => "/shipments/{shipmentId}/dispatch",
            Route::ShipmentDeliver => "/shipments/{shipmentId}/deliver",
            Route::Events => "/api/events",
            Route::Event => "/api/events/{eventId}",
            Route::Webhooks => "/api/v1/webhooks",
            Route::Webhook => "/api/v1/webhooks/{webhookId}",
            Route::WebhookDeadLetters => "/api/v1/webhooks/{webhookId}/dead-letters",
            Route::HealthLive => "/health/live",
            Route::HealthReady => "/health/ready",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::GatewayHealth => "/gateway/health",
            Route::GatewayRegions => "/gateway/regions",
            Route::GatewayFailover => "/gateway/failover",
            Route::RegionDrain => "/gateway/regions/{id}/drain",
            Route::RegionUndrain => "/gateway/regions/{id}/undrain",
            Route::Other => "other",
        }
    }
}

/// A route template for metric labels (see [`Route`]).
pub fn route_template(path: &str) -> &'static str {
    Route::of(path).template()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_never_reach_labels() {
        assert_eq!(route_template("/orders/123e4567"), "/orders/{orderId}");
        assert_eq!(
            route_template("/orders/x/cancel"),
            "/orders/{orderId}/cancel"
        );
        assert_eq!(route_template("/orders"), "/orders");
        assert_eq!(
            route_template("/api/v1/webhooks/wh_1"),
            "/api/v1/webhooks/{webhookId}"
        );
        assert_eq!(route_template("/api/v1/webhooks"), "/api/v1/webhooks");
        assert_eq!(
            route_template("/api/v1/products/W-1"),
            "/api/v1/products/{sku}"
        );
        assert_eq!(
            route_template("/api/v1/products/check-availability"),
            "/api/v1/products/check-availability"
        );
        assert_eq!(route_template("/whatever/1/2/3"), "other");
        assert_eq!(route_template("/api/v1/products/W-1/x"), "other");
        assert_eq!(
            route_template("/gateway/regions/a/undrain"),
            "/gateway/regions/{id}/undrain"
        );
        assert_eq!(route_template("/health/live/"), "/health/live");
        assert_eq!(route_template("/"), "/");
        assert_eq!(route_template(""), "/");
    }

    #[test]
    fn requests_are_counted_under_their_labels() {
        let m = Metrics::new(&["a".to_string(), "b".to_string()]);
        let product = Route::of("/api/v1/products/W-1");
        m.record_request(Some(1), &Method::GET, product, StatusCode::OK, 0.002);
        m.record_request(Some(1), &Method::GET, product, StatusCode::OK, 0.002);
        m.record_request(
            None,
            &Method::POST,
            Route::Orders,
            StatusCode::IM_A_TEAPOT,
            0.1,
        );
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            r#"tandem_gateway_requests_total{method="GET",region="b",route="/api/v1/products/{sku}",status="200"} 2"#
        ), "{text}");
        assert!(text.contains(
            r#"tandem_gateway_requests_total{method="POST",region="gateway",route="/orders",status="418"} 1"#
        ), "{text}");
        assert!(text.contains(
            r#"tandem_gateway_request_duration_seconds_count{region="b",route="/api/v1/products/{sku}"} 2"#
        ), "{text}");
        // Nothing recorded, no series: as `with_label_values` on first use.
        assert!(!text.contains(r#"region="a",route"#), "{text}");
    }
}
