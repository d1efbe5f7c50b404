//! The receiver's Prometheus metrics, all `carhook_receiver_*`. Only [`crate::outcome`] and the
//! producer touch them, so every metric moves together with the log line that explains it.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Label sets are small fixed vectors of static strings: bounded by construction.
pub type Labels = Vec<(&'static str, &'static str)>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s: covers a fast ack and the whole 15 s Smartcar budget.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The `result` label values of `verify_challenges`: answered signed, answered unsigned, refused
/// for the challenge's shape, refused by the rate limit.
pub const VERIFY_RESULTS: [&str; 4] = ["signed", "unsigned", "refused_shape", "refused_rate"];

/// All receiver metrics.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<Labels, Counter>,
    pub request_duration: Family<Labels, Histogram>,
    pub signature_failures: Family<Labels, Counter>,
    pub produce_duration: Histogram,
    pub inflight: Gauge,
    pub body_reads: Gauge,
    pub circuit_open: Gauge,
    pub quarantined: Family<Labels, Counter>,
    pub verify_challenges: Family<Labels, Counter>,
    /// Size of each webhook body read (whatever its outcome).
    pub body_bytes: Histogram,
    /// Poll requests after an outage, by result (`requested`, `failed`), and vehicles forgotten
    /// because the outage memory was full (`forgotten`).
    pub outage_polls: Family<Labels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them under `carhook_receiver_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            signature_failures: Family::default(),
            produce_duration: latency_histogram(),
            inflight: Gauge::default(),
            body_reads: Gauge::default(),
            circuit_open: Gauge::default(),
            quarantined: Family::default(),
            verify_challenges: Family::default(),
            // 256 B .. 2 MiB: a VERIFY, Smartcar's 4–50 KB payloads, and anything near the limit.
            body_bytes: Histogram::new(exponential_buckets(256.0, 2.0, 14)),
            outage_polls: Family::default(),
        };
        for result in ["requested", "failed", "forgotten"] {
            let _ = m.outage_polls.get_or_create(&vec![("result", result)]);
        }
        // Every series with known label values exists from start-up at 0, so `rate()` and
        // `increase()` see the first occurrence instead of a series appearing from nothing.
        for outcome in crate::outcome::Outcome::LABELS {
            let _ = m.requests.get_or_create(&vec![("outcome", outcome)]);
        }
        for reason in shared::signature::SignatureError::REASONS
            .into_iter()
            .chain(["verify_refused"])
        {
            let _ = m
                .signature_failures
                .get_or_create(&vec![("reason", reason)]);
        }
        for result in ["queued", "dropped", "rate_limited"] {
            let _ = m.quarantined.get_or_create(&vec![("result", result)]);
        }
        for result in VERIFY_RESULTS {
            let _ = m.verify_challenges.get_or_create(&vec![("result", result)]);
        }
        shared::admin::register_build_info(registry, "receiver");
        let r = registry.sub_registry_with_prefix("carhook_receiver");
        r.register(
            "requests",
            "Webhook requests answered, by outcome",
            m.requests.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from request start to response, by outcome",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register(
            "signature_failures",
            "Deliveries rejected by SC-Signature check, by reason",
            m.signature_failures.clone(),
        );
        r.register_with_unit(
            "produce_duration",
            "Time from produce to broker acknowledgement (acks=all)",
            Unit::Seconds,
            m.produce_duration.clone(),
        );
        r.register(
            "inflight_requests",
            "Verified webhook requests being persisted now",
            m.inflight.clone(),
        );
        r.register(
            "body_reads",
            "Webhook request bodies being read now",
            m.body_reads.clone(),
        );
        r.register(
            "circuit_open",
            "1 while the Kafka circuit breaker is open",
            m.circuit_open.clone(),
        );
        r.register(
            "quarantined",
            "Rejected deliveries copied to the quarantine topic, by result",
            m.quarantined.clone(),
        );
        r.register(
            "verify_challenges",
            "VERIFY challenges, by result",
            m.verify_challenges.clone(),
        );
        r.register_with_unit(
            "request_body",
            "Size of each webhook request body read, whatever the outcome",
            Unit::Bytes,
            m.body_bytes.clone(),
        );
        r.register(
            "outage_polls",
            "Vehicles refused with 503 for longer than Smartcar's retry window, by result: poll requested (reason receiver_outage), request failed, or forgotten (memory full)",
            m.outage_polls.clone(),
        );
        m
    }
}
