//! How every Tandem binary reports what it does, set up the same way in the gateway,
//! the regional node and the replicator: logs on stderr, spans exported over OTLP, the
//! W3C trace context that ties one order's spans into one trace (DESIGN.md section 6),
//! and the exit status of a start that failed.
//!
//! # Layout
//! - [`init`] and [`Telemetry`]: logs (`RUST_LOG`, `LOG_FORMAT`) and, when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the span exporter (OTLP over HTTP/protobuf).
//! - [`trace`]: spans continued from a `traceparent`, and the `traceparent` naming a span.
//! - [`exit`]: the exit status of a failed start, one rule for every binary (sysexits).
//!
//! Spans meant for traces use the target [`trace::SPANS`]; only the exporter sees them.
//! With no exporter, no subscriber is interested in that target, so such a span costs a
//! cached check at its call site and nothing else: the request paths pay for tracing
//! only while it is on.
#![forbid(unsafe_code)]

pub mod exit;
pub mod trace;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::io::IsTerminal as _;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// Why telemetry could not be set up as configured. Logging works even then, so the
/// caller can report it (and exit with [`exit::USAGE`]).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("LOG_FORMAT={0:?}: expected \"json\" or \"text\"")]
    LogFormat(String),
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: cannot export spans: {0}")]
    Exporter(String),
}

/// Keeps the span exporter alive; [`Telemetry::shutdown`] sends what is still queued.
#[must_use = "dropping it stops exporting spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported (`OTEL_EXPORTER_OTLP_ENDPOINT` is set).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends the spans still queued (bounded by the exporter's timeout) and stops the
    /// exporter. Call it after the runtime has stopped, before the process exits.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "could not send the last spans");
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sets up logging and, when configured, span export, for the binary `service`
/// (the default `service.name` of its spans; `OTEL_SERVICE_NAME` wins).
///
/// Logs go to stderr, filtered by `RUST_LOG` (default `info`), as text or, with
/// `LOG_FORMAT=json` (any case), as one JSON object per line with the message and the
/// fields at the top level. Spans are exported when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, in batches from a thread of their own
/// (`OTEL_BSP_*` tune the batches); a full queue drops spans, it never slows a request.
///
/// On an error, logging is set up all the same (as text if `LOG_FORMAT` was the
/// problem) and nothing is exported.
pub fn init(service: &'static str, version: &'static str) -> Result<Telemetry, InitError> {
    let (rust_log_error, log_filter) = match EnvFilter::try_from_default_env() {
        Ok(f) => (None, f),
        Err(e) if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() => {
            (Some(e.to_string()), EnvFilter::new("info"))
        }
        Err(_) => (None, EnvFilter::new("info")),
    };
    // Spans for traces never reach the log lines, whatever RUST_LOG says: they would
    // cost every request a formatted span while tracing is off.
    let log_filter = log_filter.add_directive(
        format!("{}=off", trace::SPANS)
            .parse()
            .expect("a valid directive"),
    );
    let (json, format_error) = match std::env::var("LOG_FORMAT") {
        Ok(f) if f.eq_ignore_ascii_case("json") => (true, None),
        Ok(f) if f.is_empty() || f.eq_ignore_ascii_case("text") => (false, None),
        Ok(f) => (false, Some(InitError::LogFormat(f))),
        Err(_) => (false, None),
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let logs = if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_filter(log_filter)
            .boxed()
    } else {
        logs.with_filter(log_filter).boxed()
    };

    let (provider, export_error) = match span_exporter() {
        Ok(Some(exporter)) => (Some(tracer_provider(exporter, service, version)), None),
        Ok(None) => (None, None),
        Err(e) => (None, Some(e)),
    };
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            // The trace spans, and warnings (as span events of the span they happen in).
            .with_filter(
                Targets::new()
                    .with_target(trace::SPANS, LevelFilter::TRACE)
                    .with_default(LevelFilter::WARN),
            )
    });
    tracing_subscriber::registry().with(logs).with(spans).init();

    if let Some(e) = rust_log_error {
        tracing::warn!(error = %e, "RUST_LOG is not a valid filter; logging at info");
    }
    if let Some(e) = format_error.or(export_error) {
        return Err(e);
    }
    if provider.is_some() {
        tracing::info!(
            endpoint = %std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
                .unwrap_or_default(),
            "exporting spans over OTLP"
        );
    }
    Ok(Telemetry { provider })
}

/// The OTLP exporter when an endpoint is configured (and the SDK not disabled).
fn span_exporter() -> Result<Option<opentelemetry_otlp::SpanExporter>, InitError> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled =
        std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if disabled
        || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    {
        return Ok(None);
    }
    // The endpoint, headers and timeout come from the standard OTEL_EXPORTER_OTLP_*
    // variables; the path /v1/traces is appended to OTEL_EXPORTER_OTLP_ENDPOINT.
    opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .build()
        .map(Some)
        .map_err(|e| InitError::Exporter(e.to_string()))
}

fn tracer_provider(
    exporter: opentelemetry_otlp::SpanExporter,
    service: &'static str,
    version: &'static str,
) -> SdkTracerProvider {
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new("service.version", version))
        .build();
    // The batch processor runs on its own thread (and the blocking HTTP client on
    // another), so exporting needs no Tokio runtime: the gateway's per-core
    // current-thread runtimes and the node's multi-thread one are all fine.
    SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build()
}
