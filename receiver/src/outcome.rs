//! Every way a webhook request can end, as one typed value.
//!
//! [`Delivery::finish`] is the single place that maps an outcome to an HTTP status and body, writes
//! the one JSON log line per delivery and bumps the metrics, so the three never drift apart.
//! Bodies are short and stable; causes go to the log, never a token or an event body.

use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use shared::envelope::Routing;
use shared::signature::SignatureError;
use shared::telemetry::EventLines;

use crate::metrics::Metrics;

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    /// The exact bytes are durable in Kafka.
    Accepted {
        partition: i32,
        offset: i64,
        token_index: usize,
    },
    /// A VERIFY challenge was answered.
    Challenge {
        answer: String,
        signed: bool,
    },
    /// SC-Signature missing, malformed or wrong.
    Unauthorized(SignatureError),
    /// An unsigned VERIFY that does not look like Smartcar's, or over the rate limit.
    VerifyRefused(&'static str),
    /// A signed VERIFY without a challenge.
    BadRequest(&'static str),
    /// Body larger than the limit.
    TooLarge {
        limit: usize,
    },
    /// The body did not arrive in time.
    Timeout,
    MethodNotAllowed,
    NotFound,
    /// Too many requests in flight.
    Overloaded,
    /// The request deadline ran out while Kafka had not acknowledged.
    DeadlineExceeded(String),
    /// Kafka did not acknowledge (error or timeout), or the breaker is open.
    Unavailable {
        cause: String,
        breaker_open: bool,
    },
    /// Shutting down: not accepting new work.
    Draining,
}

impl Outcome {
    /// Every value [`Outcome::label`] can take (exported at 0 from start-up).
    pub const LABELS: [&'static str; 14] = [
        "accepted",
        "verify_answered",
        "unauthorized",
        "verify_refused",
        "bad_request",
        "too_large",
        "timeout",
        "method_not_allowed",
        "not_found",
        "overloaded",
        "deadline",
        "circuit_open",
        "kafka_unavailable",
        "draining",
    ];

    /// Bounded label for `requests_total{outcome}`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Accepted { .. } => "accepted",
            Self::Challenge { .. } => "verify_answered",
            Self::Unauthorized(_) => "unauthorized",
            Self::VerifyRefused(_) => "verify_refused",
            Self::BadRequest(_) => "bad_request",
            Self::TooLarge { .. } => "too_large",
            Self::Timeout => "timeout",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotFound => "not_found",
            Self::Overloaded => "overloaded",
            Self::DeadlineExceeded(_) => "deadline",
            Self::Unavailable {
                breaker_open: true, ..
            } => "circuit_open",
            Self::Unavailable { .. } => "kafka_unavailable",
            Self::Draining => "draining",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::Accepted { .. } | Self::Challenge { .. } => StatusCode::OK,
            Self::Unauthorized(_) | Self::VerifyRefused(_) => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Overloaded
            | Self::Unavailable { .. }
            | Self::DeadlineExceeded(_)
            | Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn body(&self) -> String {
        match self {
            Self::Accepted { .. } => r#"{"status":"accepted"}"#.to_string(),
            Self::Challenge { answer, .. } => {
                serde_json::json!({ "challenge": answer }).to_string()
            }
            Self::Unauthorized(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
            Self::VerifyRefused(why) => {
                serde_json::json!({ "error": format!("VERIFY refused: {why}") }).to_string()
            }
            Self::BadRequest(why) => serde_json::json!({ "error": why }).to_string(),
            Self::TooLarge { limit } => {
                serde_json::json!({ "error": format!("body exceeds {limit} bytes") }).to_string()
            }
            Self::Timeout => r#"{"error":"request body not received in time"}"#.to_string(),
            Self::MethodNotAllowed => r#"{"error":"only POST is accepted"}"#.to_string(),
            Self::NotFound => r#"{"error":"not found"}"#.to_string(),
            Self::Overloaded => {
                r#"{"error":"too many requests in flight, retry later"}"#.to_string()
            }
            Self::Unavailable { .. } | Self::DeadlineExceeded(_) => {
                r#"{"error":"event store unavailable, retry later"}"#.to_string()
            }
            Self::Draining => r#"{"error":"shutting down, retry later"}"#.to_string(),
        }
    }
}

/// One request's context, from arrival to answer.
pub struct Delivery {
    pub started: Instant,
    pub routing: Routing,
    pub body_len: usize,
}

impl Delivery {
    /// Starts timing a request.
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            routing: Routing::default(),
            body_len: 0,
        }
    }

    /// Answers: builds the response, writes the log line, bumps the metrics.
    ///
    /// The line is written inside the request span, which supplies `trace_id` and `event_id`. A
    /// request that went well (accepted, VERIFY answered) is logged as `lines` says; every other
    /// outcome always is.
    pub fn finish(
        self,
        outcome: Outcome,
        metrics: &Metrics,
        retry_after_secs: u64,
        lines: &EventLines,
    ) -> Response<Full<Bytes>> {
        let elapsed = self.started.elapsed();
        let label = outcome.label();
        let status = outcome.status();
        metrics
            .requests
            .get_or_create(&vec![("outcome", label)])
            .inc();
        metrics
            .request_duration
            .get_or_create(&vec![("outcome", label)])
            .observe(elapsed.as_secs_f64());
        if self.body_len > 0 {
            #[allow(clippy::cast_precision_loss)] // bounded by the body limit
            metrics.body_bytes.observe(self.body_len as f64);
        }
        let r = &self.routing;
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        macro_rules! log {
            ($lvl:ident, $($extra:tt)*) => {
                tracing::$lvl!(
                    delivery_id = r.delivery_id.as_deref().unwrap_or(""),
                    event_type = r.event_type.as_deref().unwrap_or(""),
                    vehicle_id = r.vehicle_id.as_deref().unwrap_or(""),
                    outcome = label,
                    status = status.as_u16(),
                    latency_ms,
                    body_bytes = self.body_len,
                    $($extra)*
                )
            };
        }
        if status.is_server_error() {
            // A 5xx is a failure of this service (semantic conventions: a 4xx is the client's).
            let cause = match &outcome {
                Outcome::Unavailable { cause, .. } | Outcome::DeadlineExceeded(cause) => cause,
                _ => label,
            };
            shared::telemetry::record_error(&tracing::Span::current(), label, cause);
        }
        let quiet = matches!(
            outcome,
            Outcome::Accepted { .. } | Outcome::Challenge { .. }
        ) && !lines.keep(&tracing::Span::current());
        match &outcome {
            _ if quiet => {}
            Outcome::Accepted {
                partition,
                offset,
                token_index,
            } => {
                log!(info, partition, offset, token_index, "delivery accepted")
            }
            Outcome::Challenge { signed, .. } => log!(info, signed, "verify challenge answered"),
            Outcome::Unauthorized(e) => {
                metrics
                    .signature_failures
                    .get_or_create(&vec![("reason", e.reason())])
                    .inc();
                log!(warn, reason = e.reason(), "delivery rejected: {e}")
            }
            Outcome::VerifyRefused(why) => {
                metrics
                    .signature_failures
                    .get_or_create(&vec![("reason", "verify_refused")])
                    .inc();
                log!(warn, reason = *why, "unsigned verify refused")
            }
            Outcome::Unavailable {
                cause,
                breaker_open,
            } => {
                log!(
                    warn,
                    breaker_open,
                    cause = cause.as_str(),
                    "delivery not acknowledged: kafka unavailable"
                )
            }
            Outcome::DeadlineExceeded(cause) => log!(
                warn,
                cause = cause.as_str(),
                "delivery not acknowledged within the request deadline"
            ),
            Outcome::Overloaded | Outcome::Draining => log!(warn, "delivery refused: {label}"),
            _ => log!(info, "delivery refused: {label}"),
        }
        let mut resp = shared::admin::text(status, "application/json", outcome.body());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        if matches!(outcome, Outcome::MethodNotAllowed) {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        resp
    }
}
