//! One order, one trace: the W3C `traceparent` a span continues, and the one it hands on.
//!
//! The gateway's request span continues the caller's `traceparent` (or starts a trace)
//! and hands its own to the node; the node's request span continues that one and its
//! commit stores the node span's `traceparent` in the events; each consumer-group step
//! continues the `traceparent` stored in the event it handles and stores its own in the
//! events it appends. Events are replicated with their envelope, so a step taken in the
//! other region after a failover continues the same trace.
//!
//! Both functions do nothing (and return `None`) for a disabled span, which is what
//! every span of target [`SPANS`] is while nothing is exported: callers then keep the
//! `traceparent` they were given.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The target of every span meant for traces (`tracing::info_span!(target: SPANS, ..)`).
/// Log lines never show these spans; only the span exporter sees them.
pub const SPANS: &str = "tandem::trace";

const TRACEPARENT: &str = "traceparent";

/// Makes `span` the child of the span named by `traceparent` (a W3C trace context
/// header value). Without one, or with a malformed one, `span` starts a new trace.
/// Call it before the span is entered.
pub fn continue_from(span: &Span, traceparent: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Header(traceparent));
    // Fails only when the span was already started: then it keeps its parent.
    let _ = span.set_parent(parent);
}

/// The `traceparent` that names `span`, to hand on (in a header, in an event);
/// `None` when spans are not exported.
pub fn traceparent(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut out = Captured(None);
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// A carrier of one `traceparent` value.
struct Header<'a>(Option<&'a str>);

impl Extractor for Header<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// Receives the injected `traceparent` (and ignores `tracestate`: Tandem adds none).
struct Captured(Option<String>);

impl Injector for Captured {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}
