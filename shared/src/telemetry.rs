//! Logging and tracing, set up once for both binaries.
//!
//! Logs are JSON lines (or pretty for a terminal) from `tracing`; each line carries the fields of the
//! current span, and request/record spans record a `trace_id`, so every line of one delivery can be
//! found from its trace. Spans go to OpenTelemetry through `tracing-opentelemetry`: with an OTLP
//! endpoint they are exported in batches; without one the provider still creates real trace ids (so
//! `traceparent` headers connect receiver and processor) and exports nothing.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetrySettings};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("configuration key `telemetry.log_level`: {0}")]
    Filter(String),
    #[error("configuration key `telemetry.otlp_endpoint`: {0}")]
    Exporter(String),
    #[error("a global subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps the tracer provider alive; flush it on shutdown with [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes pending spans. Called last on shutdown.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "tracer provider shutdown");
        }
    }
}

/// Builds the tracer provider (exporting only when an endpoint is configured).
pub fn tracer_provider(
    s: &TelemetrySettings,
    default_service: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let service = s
        .service_name
        .clone()
        .unwrap_or_else(|| default_service.to_string());
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            s.sampling_ratio,
        ))))
        .with_resource(Resource::builder().with_service_name(service).build());
    if let Some(endpoint) = &s.otlp_endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Installs the global subscriber and propagator. Call once, from `main`, inside the runtime.
pub fn init(
    s: &TelemetrySettings,
    default_service: &'static str,
) -> Result<Telemetry, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider(s, default_service)?;
    let filter =
        EnvFilter::try_new(&s.log_level).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    // The log level filters log lines only: request and record spans are always traced, so a quiet
    // log level never breaks trace propagation between receiver and processor.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(default_service))
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let result = match s.log_format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stdout)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stdout)
                    .with_filter(filter),
            )
            .try_init(),
    };
    result.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(Telemetry { provider })
}

/// The current span's trace id as hex, for the `trace_id` log field ("" when not sampled).
pub fn trace_id(span: &tracing::Span) -> String {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// Writes the span's W3C trace context into `(name, value)` pairs for record headers.
pub fn inject(span: &tracing::Span) -> Vec<(String, String)> {
    struct Pairs(Vec<(String, String)>);
    impl Injector for Pairs {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_string(), value));
        }
    }
    let mut pairs = Pairs(Vec::new());
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut pairs));
    pairs.0
}

/// Makes `span` a child of the W3C trace context found through `get` (e.g. Kafka record headers).
/// Must be called before the span is entered.
pub fn continue_from(span: &tracing::Span, get: &dyn Fn(&str) -> Option<String>) {
    struct Lookup(Vec<(&'static str, String)>);
    impl Extractor for Lookup {
        fn get(&self, key: &str) -> Option<&str> {
            self.0
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| *k).collect()
        }
    }
    let lookup = Lookup(
        [crate::headers::TRACEPARENT, crate::headers::TRACESTATE]
            .into_iter()
            .filter_map(|k| get(k).map(|v| (k, v)))
            .collect(),
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&lookup));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}
