//! Logs and traces. Every process installs one `tracing` subscriber: log lines (text or
//! JSON) to stderr, and, when an OTLP endpoint is configured, spans exported over OTLP/gRPC.
//!
//! Log lines go to stderr (stdout is the commands' own output).
//!
//! One task is one trace across services: a publish carries the current span's W3C trace
//! context in the message's `traceparent` header ([`context_headers`]), and the service that
//! consumes it makes its span a child of that context ([`follow`]). With no endpoint, no
//! propagator is installed: nothing is injected, extracted or exported.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::Error;

/// Target of every task span. Without an OTLP endpoint it is switched off (unless
/// `RUST_LOG` names it), so that an untraced process pays nothing for spans: a disabled
/// span is a cached check, while an enabled one costs its fields' formatting for the logs.
pub const SPANS: &str = "sundara::span";

/// The span a service opens for a message it processes: target [`SPANS`], kind consumer,
/// OpenTelemetry's messaging attributes for `$subject` (displayed), then the span's own
/// fields. Continue the message's trace with [`follow`] before entering it.
#[macro_export]
macro_rules! consumer_span {
    ($name:literal, $subject:expr, $($fields:tt)*) => {
        ::tracing::info_span!(
            target: $crate::telemetry::SPANS,
            $name,
            otel.kind = "consumer",
            messaging.system = "nats",
            "messaging.operation.type" = "process",
            messaging.destination.name = %$subject,
            $($fields)*
        )
    };
}

/// Whether this process exports spans: without it, propagation is skipped outright.
static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, message, fields, the current span with
    /// its task id and trace id), for log collectors.
    Json,
}

impl LogFormat {
    pub fn parse(text: &str) -> Result<LogFormat, UnknownLogFormat> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(UnknownLogFormat(other.to_string())),
        }
    }
}

/// A log format other than `text` or `json`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format {0:?}: text or json")]
pub struct UnknownLogFormat(pub String);

/// What a process logs and where it sends its spans.
#[derive(Clone, Debug)]
pub struct TelemetryConfig {
    /// `service.name` of the exported spans, e.g. `sundara-scheduler`.
    pub service: String,
    /// Log level when `RUST_LOG` is not set, e.g. "info".
    pub log_level: String,
    pub log_format: LogFormat,
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`; no spans are exported without it.
    pub otlp_endpoint: Option<String>,
}

/// Flushes the exported spans when the process is done with them.
#[must_use = "dropping the guard does not flush; call shutdown() before exiting"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still buffered (bounded by the exporter's timeout) and stops exporting.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "spans not flushed at exit");
        }
    }

    /// Exports what is buffered now (tests wait on this instead of the batch interval).
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            let _ = provider.force_flush();
        }
    }
}

/// Installs the process's subscriber (once; later calls change nothing and export nothing).
/// Spans of Sundara's crates at `info` and above are exported whatever the log level, so a
/// quiet command still traces. Sampling follows the SDK's `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG` (default: every trace). Must run inside a Tokio runtime when
/// an endpoint is given.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, Error> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let mut directives = rust_log.clone().unwrap_or_else(|| format!("{},async_nats=warn", config.log_level));
    if config.otlp_endpoint.is_none() && !rust_log.is_some_and(|r| r.contains(SPANS)) {
        directives.push_str(&format!(",{SPANS}=off"));
    }
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("RUST_LOG {directives:?}: {e}; logging at {}", config.log_level);
        EnvFilter::new(format!("{},{SPANS}=off", config.log_level))
    });
    let logs = match config.log_format {
        // Colours only on a terminal: not in log files, nor in what a supervisor captures.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(StderrLines)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(StderrLines)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => Some(provider(&config.service, endpoint)?),
        None => None,
    };
    let spans = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sundara"))
            .with_filter(Targets::new().with_target("sundara", tracing::Level::INFO))
    });
    let installed = Registry::default().with(logs).with(spans).try_init().is_ok();
    if !installed {
        // Another subscriber is in charge (a second init in one process): export nothing.
        if let Some(p) = provider {
            let _ = p.shutdown();
        }
        return Ok(Telemetry { provider: None });
    }
    if let Some(p) = &provider {
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(p.clone());
        EXPORTING.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(endpoint = config.otlp_endpoint.as_deref().unwrap_or_default(), "exporting spans over OTLP");
    }
    Ok(Telemetry { provider })
}

/// Runs each log line's write: something else drawing on stderr (a progress bar) clears
/// itself, lets the line be written, and draws itself again.
pub type AroundLogLine = Arc<dyn Fn(&mut dyn FnMut()) + Send + Sync>;

static AROUND_LOG_LINES: RwLock<Option<AroundLogLine>> = RwLock::new(None);

/// While the returned guard lives, every log line is written inside `around`, e.g.
/// `Arc::new(move |write| bar.suspend(write))` for an indicatif progress bar, so that log
/// lines appear above the bar instead of breaking it.
pub fn log_lines_around(around: AroundLogLine) -> AroundGuard {
    *AROUND_LOG_LINES.write().unwrap_or_else(|e| e.into_inner()) = Some(around);
    AroundGuard(())
}

/// Ends [`log_lines_around`] when dropped.
#[must_use = "log lines go around the bar only while the guard lives"]
pub struct AroundGuard(());

impl Drop for AroundGuard {
    fn drop(&mut self) {
        *AROUND_LOG_LINES.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The log layers' writer: stderr, one whole line per write, around a progress bar if one
/// is drawn ([`log_lines_around`]).
struct StderrLines;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrLines {
    type Writer = LogLine;

    fn make_writer(&'a self) -> LogLine {
        LogLine(Vec::new())
    }
}

/// One log line, buffered until the formatter is done with it.
struct LogLine(Vec<u8>);

impl std::io::Write for LogLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let around = AROUND_LOG_LINES.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut write = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        match around {
            Some(around) => around(&mut write),
            None => write(),
        }
    }
}

/// Logs only (benchmarks and tools): [`init`] without an endpoint.
pub fn init_logging(default: &str, format: LogFormat) {
    let config = TelemetryConfig {
        service: "sundara".into(),
        log_level: default.into(),
        log_format: format,
        otlp_endpoint: None,
    };
    let _ = init(&config);
}

fn provider(service: &str, endpoint: &str) -> Result<SdkTracerProvider, Error> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| Error::Telemetry(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    // The batch processor's queue is bounded (2048 spans by default): when the collector is
    // slow, spans are dropped, never the work.
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Adds the current span's trace context (`traceparent`, `tracestate`) to `headers`.
pub fn inject_current(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// The current span's trace context as headers; `None` when there is none to send
/// (tracing off, or no span), so an untraced publish carries no header at all.
pub fn context_headers() -> Option<HeaderMap> {
    if !exporting() {
        return None;
    }
    let mut headers = HeaderMap::new();
    inject_current(&mut headers);
    headers.iter().next().is_some().then_some(headers)
}

/// `span`'s W3C `traceparent` (empty when nothing is exported), for a message that
/// carries several tasks, each with its own trace.
pub fn traceparent(span: &tracing::Span) -> String {
    if !exporting() {
        return String::new();
    }
    let mut headers = HeaderMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(&mut headers)));
    headers.get(sundara_schemas::subjects::TRACEPARENT).map(|v| v.to_string()).unwrap_or_default()
}

/// Headers that carry `traceparent` alone (none when it is empty), for [`follow`].
pub fn traceparent_headers(traceparent: &str) -> Option<HeaderMap> {
    if traceparent.is_empty() {
        return None;
    }
    let mut headers = HeaderMap::new();
    headers.insert(sundara_schemas::subjects::TRACEPARENT, traceparent);
    Some(headers)
}

/// The trace context a message carries (empty when it carries none).
pub fn extract(headers: Option<&HeaderMap>) -> opentelemetry::Context {
    match headers {
        Some(h) => opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h))),
        None => opentelemetry::Context::new(),
    }
}

/// Makes `span` a child of the trace context `headers` carry, and records the trace id in
/// its `trace_id` field (declared `tracing::field::Empty`) so that log lines carry it.
/// Call before the span is first entered.
pub fn follow(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if !exporting() {
        return;
    }
    let parent = extract(headers);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Links `span` to the trace context `headers` carry (another message that led to it).
pub fn link(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if !exporting() {
        return;
    }
    span.add_link(extract(headers).span().span_context().clone());
}

/// Records the trace id of `span` in its `trace_id` field, if it is traced.
pub fn record_trace_id(span: &tracing::Span) {
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_written_whole_around_a_bar_while_one_is_drawn() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tracing_subscriber::fmt::MakeWriter;
        let around = Arc::new(AtomicUsize::new(0));
        let guard = log_lines_around({
            let around = around.clone();
            Arc::new(move |write: &mut dyn FnMut()| {
                around.fetch_add(1, Ordering::SeqCst);
                write();
            })
        });
        let mut line = StderrLines.make_writer();
        line.write_all(b"WARN one ").unwrap();
        line.write_all(b"line\n").unwrap();
        assert_eq!(around.load(Ordering::SeqCst), 0, "nothing is written before the line is whole");
        drop(line);
        assert_eq!(around.load(Ordering::SeqCst), 1, "one line, written once, around the bar");
        drop(guard);
        let mut line = StderrLines.make_writer();
        line.write_all(b"WARN after the bar\n").unwrap();
        drop(line);
        assert_eq!(around.load(Ordering::SeqCst), 1, "no bar: written straight to stderr");
    }

    #[test]
    fn log_formats_parse() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        assert!(LogFormat::parse("xml").is_err());
    }

    #[test]
    fn without_a_propagator_nothing_is_injected_or_extracted() {
        // No init: the global propagator is the no-op one, as in a process without an endpoint.
        assert!(context_headers().is_none());
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert!(!extract(Some(&h)).span().span_context().is_valid());
    }

    #[test]
    fn trace_context_round_trips_through_nats_headers() {
        use opentelemetry::propagation::TextMapPropagator;
        let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
        let mut h = HeaderMap::new();
        h.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let cx = propagator.extract(&HeaderExtractor(&h));
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let mut out = HeaderMap::new();
        propagator.inject_context(&cx, &mut HeaderInjector(&mut out));
        // The header the wire contract names is the one the propagator writes.
        assert_eq!(
            out.get(sundara_schemas::subjects::TRACEPARENT).map(|v| v.as_str()),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        );
    }
}
