//! One order, one trace: the spans the gateway and the nodes export over OTLP, as a
//! tracing backend receives them (a small OTLP/HTTP receiver in the test), chain the
//! caller's request, the gateway's request, the node's request and every consumer-group
//! step of the saga up to `OrderShipped` — also when the saga ends in the other region
//! after a failover. Without an exporter, the caller's `traceparent` reaches the events
//! unchanged.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use system_tests::api::HAPPY_PATH_TO_SHIPPED;
use system_tests::gateway::{Gateway, GatewayOptions, TwoRegions};
use system_tests::otlp::{OtlpReceiver, ReceivedSpan};
use system_tests::{eventually, order_body, redis_state, Api};

const SETTLE: Duration = Duration::from_secs(30);
const SKU: &str = "TRACE-1";
/// The caller's trace context: its trace id and the span id of its own (client) span.
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

fn caller_traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
}

/// Each step of the happy path as `(consumer group, event it handles)`, in saga order.
const STEPS: &[(&str, &str)] = &[
    ("inventory", "OrderPlaced"),
    ("orders", "InventoryReserved"),
    ("payments", "OrderConfirmed"),
    ("orders", "PaymentProcessed"),
    ("shipments", "OrderPaid"),
    ("orders", "ShipmentCreated"),
];

/// The span id a stored `traceparent` names as the parent of what follows it.
fn parent_in(event: &Value) -> String {
    let tp = event["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("event without traceparent: {event}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp}");
    assert_eq!(
        parts[1], TRACE_ID,
        "the event left the caller's trace: {event}"
    );
    parts[2].to_string()
}

/// Gateway, two regions (with `node_env` per region) and a product, all exporting their
/// spans to a fresh receiver.
async fn traced_setup(
    replicate: bool,
    node_env: impl Fn(&str) -> Vec<(String, String)>,
) -> (OtlpReceiver, TwoRegions, Gateway) {
    let receiver = OtlpReceiver::start().await;
    let otel = receiver.env();
    let regions = TwoRegions::start_with(replicate, |region| {
        let mut env = otel.clone();
        env.extend(node_env(region));
        env
    })
    .await;
    let mut options = GatewayOptions::new(&regions.regions());
    for (k, v) in &otel {
        options = options.env(k, v);
    }
    let gw = Gateway::start(options).await;
    gw.wait_active("a", 1, SETTLE).await;
    gw.wait_healthy(&["a", "b"], SETTLE).await;
    gw.api().put_product(SKU, 1000, 100).await;
    (receiver, regions, gw)
}

/// Places an order through the gateway inside the caller's trace; returns its id.
async fn place_traced(api: &Api, token: &str) -> String {
    let placed = api
        .http
        .post_with_headers(
            "/orders",
            &order_body("c-trace", &[(SKU, 1)], token),
            &[("traceparent", &caller_traceparent())],
        )
        .await;
    assert_eq!(placed.status, 201, "{}", placed.text);
    placed.json["orderId"]
        .as_str()
        .expect("orderId")
        .to_string()
}

/// Waits until the receiver holds `n` spans of the caller's trace; returns them.
async fn wait_spans(receiver: &OtlpReceiver, n: usize) -> Vec<ReceivedSpan> {
    eventually(
        SETTLE,
        &format!("{n} spans of trace {TRACE_ID}"),
        || async {
            let spans = receiver.trace(TRACE_ID);
            if spans.len() >= n {
                Ok(spans)
            } else {
                Err(spans
                    .iter()
                    .map(|s| format!("{} ({})", s.name, s.service))
                    .collect::<Vec<_>>())
            }
        },
    )
    .await
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str, service: &str) -> &'a ReceivedSpan {
    let found: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == name && s.service == service)
        .collect();
    assert_eq!(found.len(), 1, "one {name} span of {service} in {spans:#?}");
    found[0]
}

/// Asserts the whole chain; `step_region` says where each step of [`STEPS`] ran.
/// Returns nothing: every link is checked against the events' stored trace context.
fn assert_one_chain(
    spans: &[ReceivedSpan],
    events: &[Value],
    order_id: &str,
    step_region: impl Fn(usize) -> &'static str,
) {
    // Every span of the trace is one of the order's: the gateway's, the node's, a step's.
    assert_eq!(
        spans.len(),
        2 + STEPS.len(),
        "spans of the trace: {:#?}",
        spans
            .iter()
            .map(|s| (&s.name, &s.service, s.attr("tandem.region")))
            .collect::<Vec<_>>()
    );
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    assert_eq!(ids.len(), spans.len(), "span ids are unique");

    // The gateway's request span is the child of the caller's span.
    let gateway = find(spans, "POST /orders", "gateway");
    assert_eq!(gateway.parent_span_id.as_deref(), Some(CALLER_SPAN));
    assert_eq!(gateway.attr("http.response.status_code"), Some("201"));
    assert_eq!(gateway.attr("tandem.region"), Some("a"));

    // The node's request span is the child of the gateway's.
    let node = find(spans, "POST /orders", "regional-node");
    assert_eq!(
        node.parent_span_id.as_deref(),
        Some(gateway.span_id.as_str())
    );
    assert_eq!(node.attr("tandem.region"), Some("a"));
    assert_eq!(node.attr("http.route"), Some("/orders"));

    // The events the request committed name the node's span.
    let by_type = |ty: &str| -> &Value {
        events
            .iter()
            .find(|e| e["eventType"] == ty)
            .unwrap_or_else(|| panic!("no {ty} among {events:#?}"))
    };
    assert_eq!(parent_in(by_type("OrderPlaced")), node.span_id);

    // Each step is the child of the span that appended the event it handles, and the
    // events it appends name it in turn: one chain from the request to OrderShipped.
    for (i, (group, ty)) in STEPS.iter().enumerate() {
        let handled = by_type(ty);
        let step = find(spans, &format!("{group} {ty}"), "regional-node");
        assert_eq!(
            step.parent_span_id.as_deref(),
            Some(parent_in(handled).as_str()),
            "{group} {ty}: parent is the span that appended {ty}"
        );
        assert_eq!(step.attr("tandem.order"), Some(order_id));
        assert_eq!(step.attr("tandem.outcome"), Some("ok"), "{group} {ty}");
        assert_eq!(
            step.attr("tandem.region"),
            Some(step_region(i)),
            "{group} {ty} ran in region {}",
            step_region(i)
        );
        let caused: Vec<&Value> = events
            .iter()
            .filter(|e| e["causationId"] == handled["eventId"])
            .collect();
        assert!(!caused.is_empty(), "{group} {ty} appended nothing");
        for e in caused {
            assert_eq!(parent_in(e), step.span_id, "{e} names its step");
        }
    }
    let shipped = by_type("OrderShipped");
    assert_eq!(
        parent_in(shipped),
        find(spans, "orders ShipmentCreated", "regional-node").span_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_from_the_gateway_to_shipped() {
    // Given a gateway and two regions exporting spans, region a active
    let (receiver, regions, gw) = traced_setup(false, |_| Vec::new()).await;
    let api = gw.api();

    // When a caller places an order inside its own trace and the order ships
    let id = place_traced(&api, "tok_ok").await;
    api.wait_status(&id, &["SHIPPED"], SETTLE).await;
    let node = regions.a.node.api();
    node.wait_events(&id, HAPPY_PATH_TO_SHIPPED, SETTLE).await;

    // Then the backend holds one trace: the gateway's request, the node's request and
    // every step of the saga, each the child of the one before it
    let spans = wait_spans(&receiver, 2 + STEPS.len()).await;
    let events = node.events(&id).await;
    assert_one_chain(&spans, &events, &id, |_| "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_continues_the_order_trace_in_the_other_region() {
    // Given replicated regions exporting spans, and region a's payment step retrying
    // only after a long backoff (tok_flaky fails its first attempt)
    let (receiver, mut regions, gw) = traced_setup(true, |region| {
        if region == "a" {
            vec![("NODE_RETRY_BASE_MS".into(), "60000".into())]
        } else {
            Vec::new()
        }
    })
    .await;
    let api = gw.api();

    // When an order gets as far as its payment in region a, which then dies
    let id = place_traced(&api, "tok_flaky").await;
    let b_redis = regions.b.redis.client().await;
    redis_state::wait_payment_pending(
        &b_redis,
        &id,
        SETTLE,
        "the payment step's entry pending in b",
    )
    .await;
    // (the steps finished in a have been exported before it dies)
    wait_spans(&receiver, 4).await;
    regions.a.node.kill();
    regions.a.redis.kill();

    // Then b takes over and ships the order
    gw.wait_active("b", 2, SETTLE).await;
    api.wait_status(&id, &["SHIPPED"], SETTLE).await;
    let node_b = regions.b.node.api();
    node_b.wait_events(&id, HAPPY_PATH_TO_SHIPPED, SETTLE).await;

    // And the steps b took continue the same trace, each the child of the span that
    // appended its event, the first of them a span that ran in region a
    let spans = wait_spans(&receiver, 2 + STEPS.len()).await;
    let events = node_b.events(&id).await;
    assert_one_chain(&spans, &events, &id, |i| if i < 2 { "a" } else { "b" });
    let payment = find(&spans, "payments OrderConfirmed", "regional-node");
    assert_eq!(payment.attr("tandem.attempts"), Some("2"), "{payment:#?}");
}

#[tokio::test]
async fn without_an_exporter_the_callers_traceparent_reaches_the_events_unchanged() {
    // Given a gateway and two regions with no span exporter
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(GatewayOptions::new(&regions.regions())).await;
    gw.wait_active("a", 1, SETTLE).await;
    gw.api().put_product(SKU, 1000, 100).await;

    // When a caller places an order inside its own trace and it ships
    let id = place_traced(&gw.api(), "tok_ok").await;
    let node = regions.a.node.api();
    node.wait_events(&id, HAPPY_PATH_TO_SHIPPED, SETTLE).await;

    // Then every event carries the caller's traceparent as it was sent
    for e in node.events(&id).await {
        assert_eq!(e["traceparent"], caller_traceparent().as_str(), "{e}");
    }
}
