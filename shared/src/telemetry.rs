//! Logging and tracing, set up once for both binaries.
//!
//! Export is OTLP over gRPC or HTTP/protobuf, to a plain or TLS endpoint (public roots, or a private
//! CA), with request headers (an API key) from a file; the standard `OTEL_EXPORTER_OTLP_*`,
//! `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` variables are honoured where carhook's own keys
//! are not set. Spans carry `service.name`, `service.version` and `service.instance.id`.
//!
//! Logs are JSON lines (or pretty for a terminal) from `tracing`; each line carries the plain-named
//! fields of the current span (`event_id`, `vehicle_id`, `trace_id` …) but not its dotted
//! OpenTelemetry attributes (`otel.*`, `messaging.*`, `http.*`, `db.*`): those describe the span for
//! the trace backend and repeated on every line they were most of its bytes. Request/record spans
//! record a `trace_id`, so every line of one delivery can be found from its trace. Each service writes
//! one INFO line per event; [`EventLines`] samples or drops the successful ones
//! (`telemetry.event_log`), never a failure. Spans go to OpenTelemetry through `tracing-opentelemetry`: with an OTLP
//! endpoint they are exported in batches; without one the provider still creates real trace ids (so
//! `traceparent` headers connect receiver and processor) and exports nothing.
//!
//! Per request this is on the hot path, so two things are done differently from `tracing-subscriber`'s
//! defaults (the receiver's profile showed them as the largest costs after Kafka itself):
//! - span fields are kept as a JSON object that a later `record` appends to ([`AppendJsonFields`]);
//!   the stock JSON formatter parses and re-serialises every field of the span on each `record`;
//! - lines are handed to one writer thread ([`LogWriter`]) that writes whatever has queued every 5 ms
//!   in one `write`, instead of a `write` syscall per line under the stdout lock on the async worker
//!   threads. The queue is bounded: when full, loggers wait (lines are never dropped). [`Telemetry`]
//!   flushes it when dropped; a process killed outright loses at most the last 5 ms of lines.

use std::io::Write as _;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::field::{RecordFields, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use std::collections::HashMap;

use crate::config::{EventLog, LogFormat, OtlpProtocol, TelemetrySettings};

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("configuration key `telemetry.log_level`: {0}")]
    Filter(String),
    #[error("configuration key `telemetry.otlp_endpoint`: {0}")]
    Exporter(String),
    #[error("configuration key `{key}`: {problem}")]
    Setting { key: &'static str, problem: String },
    #[error("a global subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Keeps the tracer provider alive; flush it on shutdown with [`Telemetry::shutdown`]. Dropping it
/// writes out every log line queued so far.
pub struct Telemetry {
    provider: SdkTracerProvider,
    logs: LogWriter,
}

impl Telemetry {
    /// Flushes pending spans and log lines. Called last on shutdown.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "tracer provider shutdown");
        }
    }
}

/// Where and how spans are exported, with the standard variables folded in.
#[derive(Debug, Default)]
struct Export {
    /// carhook's own endpoint key; None lets the exporter resolve the standard variables itself
    /// (so `OTEL_EXPORTER_OTLP_ENDPOINT` gets `/v1/traces` appended for HTTP, as specified).
    endpoint: Option<String>,
    protocol: Option<OtlpProtocol>,
    ca_pem: Option<Vec<u8>>,
    headers: HashMap<String, String>,
}

/// The export settings, or None when no endpoint is configured anywhere (nothing is exported).
fn export_settings(
    s: &TelemetrySettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Export>, TelemetryError> {
    let standard_endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|k| env(k).is_some_and(|v| !v.is_empty()));
    if s.otlp_endpoint.is_none() && !standard_endpoint {
        return Ok(None);
    }
    let protocol = match s.otlp_protocol {
        Some(p) => Some(p),
        None => match [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .iter()
        .find_map(|k| env(k).map(|v| (*k, v)))
        {
            None => None,
            Some((_, v)) if v == "grpc" => Some(OtlpProtocol::Grpc),
            Some((_, v)) if v == "http/protobuf" => Some(OtlpProtocol::HttpProtobuf),
            Some((key, v)) => {
                return Err(TelemetryError::Setting {
                    key: if key.contains("TRACES") {
                        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                    } else {
                        "OTEL_EXPORTER_OTLP_PROTOCOL"
                    },
                    problem: format!("{v:?}: carhook exports grpc or http/protobuf"),
                })
            }
        },
    };
    let (ca_key, ca_path) = match &s.otlp_ca_file {
        Some(p) => ("telemetry.otlp_ca_file", Some(p.clone())),
        None => (
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            env("OTEL_EXPORTER_OTLP_CERTIFICATE").map(std::path::PathBuf::from),
        ),
    };
    let ca_pem = ca_path
        .map(|p| {
            std::fs::read(&p).map_err(|e| TelemetryError::Setting {
                key: ca_key,
                problem: format!("cannot read {}: {e}", p.display()),
            })
        })
        .transpose()?;
    let mut headers = HashMap::new();
    if let Some(path) = &s.otlp_headers_file {
        let text = std::fs::read_to_string(path).map_err(|e| TelemetryError::Setting {
            key: "telemetry.otlp_headers_file",
            problem: format!("cannot read {}: {e}", path.display()),
        })?;
        headers = parse_headers(&text).map_err(|problem| TelemetryError::Setting {
            key: "telemetry.otlp_headers_file",
            problem: format!("{}: {problem}", path.display()),
        })?;
    }
    Ok(Some(Export {
        endpoint: s.otlp_endpoint.clone(),
        protocol,
        ca_pem,
        headers,
    }))
}

/// `key=value,key=value` (the `OTEL_EXPORTER_OTLP_HEADERS` format; values may be
/// percent-encoded). The error never contains a value: it may be a secret.
fn parse_headers(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (i, pair) in text.trim().split(',').enumerate() {
        if pair.trim().is_empty() {
            continue;
        }
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("entry {} is not key=value", i + 1));
        };
        let key = k.trim();
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("entry {} has no valid header name", i + 1));
        }
        let value = percent_decode(v.trim())
            .ok_or_else(|| format!("header {key}: bad percent-encoding"))?;
        out.insert(key.to_ascii_lowercase(), value);
    }
    Ok(out)
}

fn percent_decode(v: &str) -> Option<String> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The span exporter for `e`.
fn exporter(e: Export) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let failed =
        |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter(e.to_string());
    match e.protocol.unwrap_or(OtlpProtocol::Grpc) {
        OtlpProtocol::Grpc => {
            use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = e.endpoint.clone() {
                b = b.with_endpoint(endpoint);
            }
            if !e.headers.is_empty() {
                let mut metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::new();
                for (k, v) in &e.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.as_bytes()).map_err(|_| {
                            TelemetryError::Setting {
                                key: "telemetry.otlp_headers_file",
                                problem: format!("header {k}: not a valid gRPC metadata name"),
                            }
                        })?;
                    let value = v.parse().map_err(|_| TelemetryError::Setting {
                        key: "telemetry.otlp_headers_file",
                        problem: format!("header {k}: not a valid gRPC metadata value"),
                    })?;
                    metadata.insert(key, value);
                }
                b = b.with_metadata(metadata);
            }
            let https = e
                .endpoint
                .as_deref()
                .or(std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    .ok()
                    .as_deref())
                .is_some_and(|u| u.starts_with("https://"))
                || std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .is_ok_and(|u| u.starts_with("https://"));
            if https || e.ca_pem.is_some() {
                let mut tls = ClientTlsConfig::new().with_webpki_roots();
                if let Some(pem) = &e.ca_pem {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                b = b.with_tls_config(tls);
            }
            b.build().map_err(failed)
        }
        OtlpProtocol::HttpProtobuf => {
            install_crypto_provider();
            // Blocking: the batch span processor exports from a thread of its own, outside any
            // tokio runtime, where an async client has no reactor.
            let mut client = reqwest::blocking::Client::builder().tls_backend_rustls();
            if let Some(pem) = &e.ca_pem {
                let cert =
                    reqwest::Certificate::from_pem(pem).map_err(|err| TelemetryError::Setting {
                        key: "telemetry.otlp_ca_file",
                        problem: format!("not a PEM certificate: {err}"),
                    })?;
                client = client.add_root_certificate(cert);
            }
            let client = client
                .build()
                .map_err(|err| TelemetryError::Exporter(err.to_string()))?;
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(client);
            if let Some(endpoint) = e.endpoint {
                b = b.with_endpoint(endpoint);
            }
            if !e.headers.is_empty() {
                b = b.with_headers(e.headers);
            }
            b.build().map_err(failed)
        }
    }
}

/// rustls needs one process-wide crypto provider for reqwest: ring (no C toolchain beyond cc).
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The resource every span carries: `service.name` (carhook's key, else `OTEL_SERVICE_NAME`, else
/// the binary's), `service.version`, `service.instance.id` (the pod name from `HOSTNAME`, else a
/// random id), overridden by `OTEL_RESOURCE_ATTRIBUTES` except for the service name.
fn resource(s: &TelemetrySettings, default_service: &str) -> Resource {
    use opentelemetry::KeyValue;
    let service = s
        .service_name
        .clone()
        .or_else(|| {
            std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|v| !v.is_empty())
        })
        .unwrap_or_else(|| default_service.to_string());
    let instance = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("service.instance.id", instance),
        ])
        .with_detector(Box::new(
            opentelemetry_sdk::resource::EnvResourceDetector::new(),
        ))
        .with_service_name(service)
        .build()
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.logs.flush(Duration::from_secs(2));
    }
}

enum LogMsg {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

/// Log lines queued for one writer thread that owns stdout's output (see the module doc).
#[derive(Clone)]
pub struct LogWriter {
    tx: SyncSender<LogMsg>,
}

/// Lines that may wait for the writer thread before loggers block.
const LOG_QUEUE_LINES: usize = 16 * 1024;

/// How often the writer thread writes out what has queued: a line reaches stdout within this.
const LOG_TICK: Duration = Duration::from_millis(5);

impl LogWriter {
    /// Starts the writer thread; it writes to `out` until the process ends.
    pub fn spawn<W: std::io::Write + Send + 'static>(out: W) -> Self {
        let (tx, rx) = sync_channel(LOG_QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || Self::run(&rx, std::io::BufWriter::with_capacity(64 * 1024, out)));
        if let Err(e) = spawned {
            // No thread: lines queue until the bound and then block. Say so where it is seen.
            eprintln!("log writer thread could not start: {e}");
        }
        Self { tx }
    }

    fn run<W: std::io::Write>(rx: &Receiver<LogMsg>, mut out: std::io::BufWriter<W>) {
        // Polled, never parked on the queue: a logger then never has to wake this thread (a
        // futex syscall per line), and whatever queued in a tick goes out in one `write`.
        loop {
            loop {
                match rx.try_recv() {
                    Ok(LogMsg::Line(line)) => {
                        let _ = out.write_all(&line);
                    }
                    Ok(LogMsg::Flush(ack)) => {
                        let _ = out.flush();
                        let _ = ack.send(());
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        let _ = out.flush();
                        return;
                    }
                }
            }
            let _ = out.flush();
            std::thread::sleep(LOG_TICK);
        }
    }

    /// Waits until every line queued before this call is written, for at most `within`.
    pub fn flush(&self, within: Duration) {
        let (ack, done) = sync_channel(1);
        if self.tx.send(LogMsg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(within);
        }
    }
}

/// One formatted line on its way to the writer thread.
pub struct QueuedLine<'a>(&'a LogWriter);

impl std::io::Write for QueuedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .tx
            .send(LogMsg::Line(buf.to_vec()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = QueuedLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        QueuedLine(self)
    }
}

/// Span fields as one JSON object; recording more fields appends them (a field recorded again
/// appears twice and the later value wins when the line is written, as the JSON formatter reads
/// the object back with `serde_json`).
#[derive(Debug, Default, Clone, Copy)]
pub struct AppendJsonFields;

struct JsonEntries<'a> {
    out: &'a mut dyn std::fmt::Write,
    first: bool,
    result: std::fmt::Result,
}

impl JsonEntries<'_> {
    fn entry(&mut self, name: &str, value: serde_json::Value) {
        // Dotted names are OpenTelemetry attributes (`otel.name`, `messaging.kafka.offset`, …):
        // exported with the span, left out of the log line's copy of it.
        if self.result.is_err() || name.contains('.') {
            return;
        }
        let sep = if std::mem::take(&mut self.first) {
            ""
        } else {
            ","
        };
        let key = serde_json::Value::from(name);
        self.result = write!(self.out, "{sep}{key}:{value}");
    }
}

impl Visit for JsonEntries<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.entry(field.name(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.entry(field.name(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.entry(field.name(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.entry(field.name(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.entry(field.name(), value.into());
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.entry(field.name(), format!("{value:?}").into());
    }
}

impl<'w> FormatFields<'w> for AppendJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        writer.write_char('{')?;
        let mut v = JsonEntries {
            out: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result?;
        writer.write_char('}')
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> std::fmt::Result {
        if current.fields.is_empty() {
            return self.format_fields(current.as_writer(), fields);
        }
        current.fields.pop(); // the closing brace
        let first = current.fields.ends_with('{');
        let mut v = JsonEntries {
            out: &mut current.fields,
            first,
            result: Ok(()),
        };
        fields.record(&mut v);
        let result = v.result;
        current.fields.push('}');
        result
    }
}

/// Decides which successful per-event lines are written (`telemetry.event_log`). Callers log
/// failures regardless: this only ever drops lines of events that went well.
#[derive(Debug, Clone, Copy)]
pub struct EventLines {
    mode: EventLog,
    /// The share kept under `sample`.
    ratio: f64,
}

impl EventLines {
    /// From the settings.
    pub fn new(s: &TelemetrySettings) -> Self {
        Self {
            mode: s.event_log,
            ratio: s.event_log_sample_ratio,
        }
    }

    /// Whether the successful event traced by `span` gets its line. Sampling is by trace id, as
    /// the trace sampler does, so receiver and processor keep the lines of the same events; a span
    /// without a trace id is kept.
    pub fn keep(&self, span: &tracing::Span) -> bool {
        match self.mode {
            EventLog::All => true,
            EventLog::Errors => false,
            EventLog::Sample => {
                let cx = span.context();
                let sc = cx.span().span_context().clone();
                if !sc.is_valid() {
                    return true;
                }
                // The low 64 bits of a trace id are random (W3C trace context, level 2).
                let low = u128::from_be_bytes(sc.trace_id().to_bytes()) as u64;
                (low as f64) < self.ratio * (u64::MAX as f64)
            }
        }
    }
}

/// Builds the tracer provider (exporting only when an endpoint is configured).
pub fn tracer_provider(
    s: &TelemetrySettings,
    default_service: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            s.sampling_ratio,
        ))))
        .with_resource(resource(s, default_service));
    if let Some(export) = export_settings(s, &|k| std::env::var(k).ok())? {
        let built = if export.protocol == Some(OtlpProtocol::HttpProtobuf) {
            // On a plain thread: the HTTP exporter's blocking client owns a runtime, which may be
            // neither created nor dropped inside the service's tokio runtime.
            std::thread::spawn(move || exporter(export))
                .join()
                .map_err(|_| TelemetryError::Exporter("building the exporter panicked".into()))??
        } else {
            // Here: the gRPC channel needs the service's tokio runtime.
            exporter(export)?
        };
        builder = builder.with_batch_exporter(built);
    }
    Ok(builder.build())
}

/// The JSON log layer: one flat line per event with the current span's fields, which later
/// `record`s append to ([`AppendJsonFields`]), written through `logs`. Production and the tests
/// build it here, so the tests check what runs.
fn json_layer<S>(
    logs: LogWriter,
) -> tracing_subscriber::fmt::Layer<
    S,
    AppendJsonFields,
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
    LogWriter,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .fmt_fields(AppendJsonFields)
        .with_writer(logs)
}

/// Installs the global subscriber and propagator, logging to stdout (the services). Call once,
/// from `main`, inside the runtime.
pub fn init(
    s: &TelemetrySettings,
    default_service: &'static str,
) -> Result<Telemetry, TelemetryError> {
    use std::io::IsTerminal;
    let ansi = std::io::stdout().is_terminal();
    init_with(
        s,
        default_service,
        LogWriter::spawn(std::io::stdout()),
        ansi,
    )
}

/// As [`init`], for operator commands: log lines go to stderr, so stdout carries only the
/// command's result (`processor replay … | jq` works).
pub fn init_for_tool(
    s: &TelemetrySettings,
    default_service: &'static str,
) -> Result<Telemetry, TelemetryError> {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    init_with(
        s,
        default_service,
        LogWriter::spawn(std::io::stderr()),
        ansi,
    )
}

fn init_with(
    s: &TelemetrySettings,
    default_service: &'static str,
    logs: LogWriter,
    ansi: bool,
) -> Result<Telemetry, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let provider = tracer_provider(s, default_service)?;
    let filter =
        EnvFilter::try_new(&s.log_level).map_err(|e| TelemetryError::Filter(e.to_string()))?;
    // The log level filters log lines only: request and record spans are always traced, so a quiet
    // log level never breaks trace propagation between receiver and processor.
    // Nothing is done per poll of an instrumented future beyond what the span needs: no busy/idle
    // time (a clock read and the span's lock on every enter and exit; no dashboard or query here
    // uses `busy_ns` / `idle_ns`) and no OpenTelemetry context attached on enter (carhook passes
    // contexts explicitly, `inject` and `continue_from`; nothing here reads `Context::current()`).
    // With both off the layer's enter hook returns at once; it was about 9 µs of a 50 KB webhook
    // request's CPU under `perf` (`bench/latest.md`).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(default_service))
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let result = match s.log_format {
        LogFormat::Json => registry
            .with(json_layer(logs.clone()).with_filter(filter))
            .try_init(),
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(logs.clone())
                    .with_filter(filter),
            )
            .try_init(),
    };
    result.map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(Telemetry { provider, logs })
}

/// Marks `span` failed for OpenTelemetry: status Error with `description`, and `error.type` =
/// `error_type` (a short, bounded class, never a message). The span must declare
/// `otel.status_code`, `otel.status_description` and `error.type` (as `Empty`): a field a span
/// did not declare is silently dropped.
pub fn record_error(span: &tracing::Span, error_type: &str, description: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", description);
    span.record("error.type", error_type);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            match self.0.lock() {
                Ok(mut v) => v.extend_from_slice(b),
                Err(p) => p.into_inner().extend_from_slice(b),
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            let bytes = match self.0.lock() {
                Ok(v) => v.clone(),
                Err(p) => p.into_inner().clone(),
            };
            String::from_utf8(bytes).unwrap_or_else(|e| panic!("{e}"))
        }
    }

    #[test]
    fn standard_variables_enable_and_shape_the_export() {
        let none = TelemetrySettings::default();
        assert!(matches!(export_settings(&none, &env(&[])), Ok(None)));
        let e = export_settings(
            &none,
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ]),
        );
        let e = e.ok().flatten().unwrap_or_default();
        assert_eq!(e.protocol, Some(OtlpProtocol::HttpProtobuf));
        assert_eq!(
            e.endpoint, None,
            "the exporter resolves the standard endpoint itself"
        );
        let json = export_settings(
            &none,
            &env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ]),
        );
        assert!(
            matches!(
                &json,
                Err(TelemetryError::Setting {
                    key: "OTEL_EXPORTER_OTLP_PROTOCOL",
                    ..
                })
            ),
            "{json:?}"
        );
        let own = TelemetrySettings {
            otlp_endpoint: Some("http://c:4317".into()),
            otlp_ca_file: Some("/nonexistent/ca.pem".into()),
            ..TelemetrySettings::default()
        };
        let missing = export_settings(&own, &env(&[]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(missing.contains("telemetry.otlp_ca_file"), "{missing}");
    }

    #[test]
    fn header_files_parse_like_the_standard_variable_and_never_echo_values() {
        let h = parse_headers("x-api-key=abc%3D%3D, X-Tenant = t1\n").unwrap_or_default();
        assert_eq!(h.get("x-api-key").map(String::as_str), Some("abc=="));
        assert_eq!(h.get("x-tenant").map(String::as_str), Some("t1"));
        let bad = parse_headers("x-api-key").err().unwrap_or_default();
        assert!(bad.contains("entry 1"), "{bad}");
        let bad = parse_headers("x-api-key=s3cret%zz")
            .err()
            .unwrap_or_default();
        assert!(!bad.contains("s3cret"), "a value in an error: {bad}");
    }

    #[test]
    fn json_lines_carry_the_latest_span_fields() {
        let sink = Sink::default();
        let logs = LogWriter::spawn(sink.clone());
        let subscriber = tracing_subscriber::registry().with(json_layer(logs.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "request",
                otel.kind = "server",
                messaging.kafka.offset = 7,
                path = "/a\"b\\c",
                status = tracing::field::Empty,
                event_id = tracing::field::Empty,
            );
            span.record("event_id", "e-1");
            span.record("status", 200_u64);
            span.record("event_id", "e-2");
            let _entered = span.enter();
            tracing::info!(n = 3, ok = true, "delivery accepted");
        });
        logs.flush(Duration::from_secs(10));
        let text = sink.text();
        let line: serde_json::Value =
            serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(line["span"]["event_id"], "e-2", "{text}");
        assert_eq!(line["span"]["status"], 200, "{text}");
        assert_eq!(line["span"]["path"], "/a\"b\\c", "{text}");
        assert_eq!(line["span"]["name"], "request", "{text}");
        let span_keys: Vec<_> = line["span"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        assert!(
            span_keys.iter().all(|k| !k.contains('.')),
            "OpenTelemetry attributes repeated in a log line: {text}"
        );
        assert_eq!(line["n"], 3, "{text}");
        assert_eq!(line["message"], "delivery accepted", "{text}");
    }

    #[test]
    fn event_lines_keep_by_mode_and_sample_by_trace_id() {
        let lines = |mode, ratio| {
            EventLines::new(&TelemetrySettings {
                event_log: mode,
                event_log_sample_ratio: ratio,
                ..TelemetrySettings::default()
            })
        };
        let untraced = tracing::Span::none();
        assert!(lines(EventLog::All, 0.0).keep(&untraced));
        assert!(!lines(EventLog::Errors, 1.0).keep(&untraced));
        assert!(
            lines(EventLog::Sample, 0.0).keep(&untraced),
            "no trace id: kept"
        );
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let quarter = lines(EventLog::Sample, 0.25);
            let spans: Vec<_> = (0..2000).map(|_| tracing::info_span!("event")).collect();
            let kept = spans.iter().filter(|s| quarter.keep(s)).count();
            assert!((300..700).contains(&kept), "{kept} of 2000 kept at 0.25");
            // The decision is the trace id's: the same span is always decided alike.
            assert!(spans.iter().all(|s| quarter.keep(s) == quarter.keep(s)));
            assert!(!spans.iter().any(|s| lines(EventLog::Sample, 0.0).keep(s)));
            assert!(spans.iter().all(|s| lines(EventLog::Sample, 1.0).keep(s)));
        });
    }

    #[test]
    fn every_line_is_written_whole_and_in_order_before_flush_returns() {
        let sink = Sink::default();
        let logs = LogWriter::spawn(sink.clone());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let logs = logs.clone();
                std::thread::spawn(move || {
                    for i in 0..2000 {
                        let line = format!(
                            "{{\"t\":{t},\"i\":{i},\"pad\":\"{}\"}}\n",
                            "x".repeat(i % 300)
                        );
                        let _ = logs.make_writer().write_all(line.as_bytes());
                    }
                })
            })
            .collect();
        for w in writers {
            let _ = w.join();
        }
        logs.flush(Duration::from_secs(10));
        let text = sink.text();
        let mut next = [0_u64; 4];
        for line in text.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let t = v["t"].as_u64().unwrap_or(9) as usize;
            assert_eq!(v["i"].as_u64(), Some(next[t]), "{line}");
            next[t] += 1;
        }
        assert_eq!(next, [2000; 4]);
    }
}
