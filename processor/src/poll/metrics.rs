//! The poller's Prometheus metrics, all `carhook_poller_*`. Every series with known label values
//! exists from start-up at 0, so alerts on `increase()` see the first failure.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use shared::poll_request::PollReason;
use shared::smartcar_api::ApiError;

use crate::metrics::Labels;

/// What became of one poll request (bounded label).
pub const RESULTS: [&str; 11] = [
    "polled",
    "skipped_min_interval",
    "skipped_in_flight",
    "skipped_monthly_cap",
    "skipped_blocked",
    "skipped_reconnect",
    "skipped_no_user",
    "failed",
    "not_found",
    "bad_response",
    "invalid_request",
];

/// All poller metrics.
#[derive(Clone)]
pub struct PollMetrics {
    /// HTTP requests to the vehicle API, by outcome (`ok` or an [`ApiError::class`]).
    pub requests: Family<Labels, Counter>,
    /// Poll requests handled, by reason and result.
    pub polls: Family<Labels, Counter>,
    /// Poll requests the poller itself made (the safety net), by reason.
    pub requested: Family<Labels, Counter>,
    /// Requests left in the global bucket after the last admission.
    pub budget_left: Gauge,
    /// Application tokens minted.
    pub tokens_minted: Counter,
    /// Seconds the application is paused by a 429 (0 when not).
    pub paused_seconds: Gauge,
    /// Unix time of the last successful poll (0 until the first).
    pub last_success: Gauge,
    /// Poll-request records on the assigned partitions not yet taken by the poller.
    pub requests_queued: Gauge,
    /// Poll requests being handled.
    pub requests_in_flight: Gauge,
    /// Requests of those sleeping out a vehicle-scoped `retry-after` (waiting, not stuck).
    pub retry_after_waits: Gauge,
}

/// Holds a gauge one higher while alive.
pub struct Raised(Gauge);

impl Drop for Raised {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl PollMetrics {
    /// Creates and registers the metrics under `carhook_poller_`.
    pub fn register(registry: &mut Registry, capacity: u32) -> Self {
        let m = Self {
            requests: Family::default(),
            polls: Family::default(),
            requested: Family::default(),
            budget_left: Gauge::default(),
            tokens_minted: Counter::default(),
            paused_seconds: Gauge::default(),
            last_success: Gauge::default(),
            requests_queued: Gauge::default(),
            requests_in_flight: Gauge::default(),
            retry_after_waits: Gauge::default(),
        };
        m.budget_left.set(i64::from(capacity));
        for outcome in std::iter::once("ok").chain(ApiError::CLASSES) {
            let _ = m
                .requests
                .get_or_create(&vec![("outcome", outcome.to_string())]);
        }
        for reason in PollReason::ALL {
            for result in RESULTS {
                let _ = m.polls.get_or_create(&vec![
                    ("reason", reason.as_str().to_string()),
                    ("result", result.to_string()),
                ]);
            }
        }
        let _ = m.requested.get_or_create(&vec![(
            "reason",
            PollReason::SafetyNet.as_str().to_string(),
        )]);
        shared::admin::register_build_info(registry, "poller");
        let r = registry.sub_registry_with_prefix("carhook_poller");
        r.register(
            "requests",
            "HTTP requests to Smartcar's vehicle API, by outcome (ok, rate_limited, billing, not_found, server_error, bad_response, not_json, …)",
            m.requests.clone(),
        );
        r.register(
            "polls",
            "Poll requests handled, by reason and result (polled, skipped_*, failed, not_found, bad_response, invalid_request)",
            m.polls.clone(),
        );
        r.register(
            "requested",
            "Poll requests the poller made itself, by reason (safety_net)",
            m.requested.clone(),
        );
        r.register(
            "budget_left",
            "Requests left in the global token bucket after the last admission",
            m.budget_left.clone(),
        );
        r.register(
            "tokens_minted",
            "Application access tokens minted (client credentials)",
            m.tokens_minted.clone(),
        );
        r.register_with_unit(
            "paused",
            "Seconds left of an application-wide pause after a 429 (0 when not paused)",
            Unit::Seconds,
            m.paused_seconds.clone(),
        );
        r.register_with_unit(
            "last_success_timestamp",
            "Unix time of the last successful poll (0 until the first)",
            Unit::Seconds,
            m.last_success.clone(),
        );
        r.register(
            "requests_queued",
            "Poll-request records on the poller's partitions not yet taken (lag of its consumer group)",
            m.requests_queued.clone(),
        );
        r.register(
            "requests_in_flight",
            "Poll requests being handled (bucket waits, retries and retry-after sleeps included)",
            m.requests_in_flight.clone(),
        );
        r.register(
            "retry_after_waits",
            "Poll requests sleeping out a vehicle-scoped retry-after (part of requests_in_flight)",
            m.retry_after_waits.clone(),
        );
        m
    }

    /// One more request in flight until the returned guard is dropped.
    pub fn in_flight(&self) -> Raised {
        self.requests_in_flight.inc();
        Raised(self.requests_in_flight.clone())
    }

    /// One more request sleeping out a retry-after until the returned guard is dropped.
    pub fn retry_after_wait(&self) -> Raised {
        self.retry_after_waits.inc();
        Raised(self.retry_after_waits.clone())
    }

    /// Counts one HTTP request's outcome.
    pub fn request(&self, outcome: &str) {
        self.requests
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }

    /// Counts one request the poller made.
    pub fn requested(&self, reason: PollReason) {
        self.requested
            .get_or_create(&vec![("reason", reason.as_str().to_string())])
            .inc();
    }

    /// Counts one handled poll request.
    pub fn poll(&self, reason: PollReason, result: &'static str) {
        self.polls
            .get_or_create(&vec![
                ("reason", reason.as_str().to_string()),
                ("result", result.to_string()),
            ])
            .inc();
    }
}
