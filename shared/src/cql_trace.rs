//! Every CQL statement execution as one OpenTelemetry CLIENT span, named and attributed by the
//! database semantic conventions (`db.system` = `cassandra`, `db.namespace` = keyspace,
//! `db.collection.name` = table, `db.operation.name`, `server.address`/`server.port` of the
//! coordinator that answered), so a trace shows each round trip to the store and which node served
//! it. A failed execution marks its span as an error with an `error.type`.

use std::future::Future;
use std::time::{Duration, Instant};

use scylla::errors::ExecutionError;
use scylla::response::query_result::QueryResult;
use tracing::Instrument;

/// The span for one execution of `operation` (`INSERT`, `SELECT`, `UPDATE`, `BATCH UPDATE` …) on
/// `table` of `keyspace` (None for a batch over several tables). Enter it around the execution;
/// then [`finish`] it.
pub fn span(keyspace: &str, operation: &'static str, table: Option<&'static str>) -> tracing::Span {
    let name = match table {
        Some(t) => format!("{operation} {t}"),
        None => format!("{operation} {keyspace}"),
    };
    tracing::info_span!(
        "cql",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        error.type = tracing::field::Empty,
        db.system = "cassandra",
        db.system.name = "cassandra",
        db.namespace = keyspace,
        db.collection.name = table,
        db.operation.name = operation,
        server.address = tracing::field::Empty,
        server.port = tracing::field::Empty,
    )
}

/// Records the outcome of the execution on its span: the answering coordinator, or the error as
/// span status with `error_type` (a short, bounded class such as `transient` or `refused`).
pub fn finish<E: std::fmt::Display>(
    span: &tracing::Span,
    result: &Result<QueryResult, E>,
    error_type: impl FnOnce(&E) -> &'static str,
) {
    match result {
        Ok(r) => {
            let at = r.request_coordinator().connection_address();
            span.record("server.address", at.ip().to_string());
            span.record("server.port", i64::from(at.port()));
        }
        Err(e) => crate::telemetry::record_error(span, error_type(e), &e.to_string()),
    }
}

/// Runs one statement execution inside its span and finishes it: `error_type` classifies a failure
/// for the span, and `observe` gets the result (`ok` or that class) and how long the execution took
/// (a latency metric, or nothing).
pub async fn run(
    keyspace: &str,
    (operation, table): (&'static str, Option<&'static str>),
    exec: impl Future<Output = Result<QueryResult, ExecutionError>>,
    error_type: impl Fn(&ExecutionError) -> &'static str,
    observe: impl FnOnce(&'static str, Duration),
) -> Result<QueryResult, ExecutionError> {
    let span = span(keyspace, operation, table);
    let started = Instant::now();
    let res = exec.instrument(span.clone()).await;
    observe(
        res.as_ref().map_or_else(&error_type, |_| "ok"),
        started.elapsed(),
    );
    finish(&span, &res, error_type);
    res
}
