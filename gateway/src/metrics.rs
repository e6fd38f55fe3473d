//! The gateway's Prometheus metrics (names and labels as API.md lists them) and the
//! route templates that keep their label sets small.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Values of `tandem_gateway_failovers_total{reason}`.
pub const FAILOVER_REASONS: [&str; 2] = ["unhealthy", "planned"];
/// Values of `tandem_gateway_retries_total{reason}`: how the previous attempt failed.
pub const RETRY_REASONS: [&str; 5] = ["connect", "reset", "timeout", "status_5xx", "failover"];

/// All gateway metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
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
                "Client connections the gateway closed itself: idle past the timeout (idle) or to make room at the cap (evicted).",
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
        for failure in crate::auth::Failure::ALL {
            auth_failures.with_label_values(&[failure.reason()]);
        }
        Metrics {
            registry,
            requests,
            duration,
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
            connections_refused,
            connections_closed,
            lingering_closes,
        }
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

/// A route template for metric labels: ids are replaced so the label set stays bounded.
pub fn route_template(path: &str) -> &'static str {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segs.as_slice() {
        [] | [""] => "/",
        ["orders"] => "/orders",
        ["orders", _] => "/orders/{orderId}",
        ["orders", _, "cancel"] => "/orders/{orderId}/cancel",
        ["api", "v1", "products", "check-availability"] => "/api/v1/products/check-availability",
        ["api", "v1", "products", _] => "/api/v1/products/{sku}",
        ["shipments", _, "dispatch"] => "/shipments/{shipmentId}/dispatch",
        ["shipments", _, "deliver"] => "/shipments/{shipmentId}/deliver",
        ["api", "events"] => "/api/events",
        ["api", "events", _] => "/api/events/{eventId}",
        ["health", "live"] => "/health/live",
        ["health", "ready"] => "/health/ready",
        ["metrics"] => "/metrics",
        ["gateway", "health"] => "/gateway/health",
        ["gateway", "regions"] => "/gateway/regions",
        ["gateway", "failover"] => "/gateway/failover",
        ["gateway", "regions", _, "drain"] => "/gateway/regions/{id}/drain",
        ["gateway", "regions", _, "undrain"] => "/gateway/regions/{id}/undrain",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::route_template;

    #[test]
    fn ids_never_reach_labels() {
        assert_eq!(route_template("/orders/123e4567"), "/orders/{orderId}");
        assert_eq!(
            route_template("/orders/x/cancel"),
            "/orders/{orderId}/cancel"
        );
        assert_eq!(route_template("/orders"), "/orders");
        assert_eq!(
            route_template("/api/v1/products/W-1"),
            "/api/v1/products/{sku}"
        );
        assert_eq!(
            route_template("/api/v1/products/check-availability"),
            "/api/v1/products/check-availability"
        );
        assert_eq!(route_template("/whatever/1/2/3"), "other");
        assert_eq!(route_template("/"), "/");
    }
}
