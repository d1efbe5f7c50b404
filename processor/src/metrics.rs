//! The processor's Prometheus metrics, all `carhook_processor_*`.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Bounded label sets.
pub type Labels = Vec<(&'static str, String)>;

/// All processor metrics.
#[derive(Clone)]
pub struct Metrics {
    pub events: Family<Labels, Counter>,
    pub stale_signals: Counter,
    pub signals_written: Counter,
    /// Records written to the state changelog (events that changed a vehicle's document).
    pub state_changes: Counter,
    pub processing_duration: Histogram,
    pub store_errors: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    pub actions: Family<Labels, Counter>,
    pub vehicle_errors: Family<Labels, Counter>,
    pub consumer_lag: Family<Labels, Gauge>,
    pub transactions: Family<Labels, Counter>,
    pub rebalances: Family<Labels, Counter>,
    /// Unix time of the last committed transaction (0 until the first).
    pub last_commit: Gauge<f64, AtomicU64>,
    /// Kafka clients rebuilt after a fatal or unusable producer state.
    pub client_rebuilds: Counter,
    /// Timestamps ahead of receive time by more than the allowed skew, by clock.
    pub untrusted_timestamps: Family<Labels, Counter>,
    /// Legacy v2 bodies applied, by form.
    pub legacy_events: Family<Labels, Counter>,
    /// Poll requests this processor made (dead letters, resolved errors), by reason.
    pub poll_requests: Family<Labels, Counter>,
}

impl Metrics {
    /// Creates and registers the metrics under `carhook_processor_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            events: Family::default(),
            stale_signals: Counter::default(),
            signals_written: Counter::default(),
            state_changes: Counter::default(),
            processing_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            store_errors: Family::default(),
            dead_letters: Family::default(),
            actions: Family::default(),
            vehicle_errors: Family::default(),
            consumer_lag: Family::default(),
            transactions: Family::default(),
            rebalances: Family::default(),
            last_commit: Gauge::default(),
            client_rebuilds: Counter::default(),
            untrusted_timestamps: Family::default(),
            legacy_events: Family::default(),
            poll_requests: Family::default(),
        };
        // Every series with known label values exists from start-up at 0, so `rate()` and
        // `increase()` see the first error instead of a series appearing from nothing.
        let zero = |family: &Family<Labels, Counter>, label: &'static str, values: &[&str]| {
            for v in values {
                let _ = family.get_or_create(&vec![(label, v.to_string())]);
            }
        };
        zero(&m.events, "outcome", &crate::pipeline::Disposition::LABELS);
        zero(&m.store_errors, "kind", &["transient", "refused"]);
        let mut reasons = shared::event::EventError::CLASSES.to_vec();
        reasons.push("store_refused");
        zero(&m.dead_letters, "reason", &reasons);
        zero(
            &m.actions,
            "type",
            &["RECONNECT_REQUIRED", "RECONNECT_RESOLVED"],
        );
        zero(
            &m.transactions,
            "result",
            &["committed", "aborted", "failed"],
        );
        for form in ["eventBased", "dynamic", "scheduled", "other"] {
            let _ = m
                .legacy_events
                .get_or_create(&vec![("form", form.to_string())]);
        }
        for clock in ["oem_updated_at", "fetched_at", "delivered_at"] {
            let _ = m
                .untrusted_timestamps
                .get_or_create(&vec![("clock", clock.to_string())]);
        }
        zero(
            &m.poll_requests,
            "reason",
            &["dead_letter", "error_resolved"],
        );
        let r = registry.sub_registry_with_prefix("carhook_processor");
        r.register(
            "build",
            "Always 1; the build's version as a label (carhook_processor_build_info)",
            build_info(),
        );
        r.register(
            "events",
            "Events handled, by outcome (applied, duplicate, dead_lettered, ignored)",
            m.events.clone(),
        );
        r.register(
            "stale_signals",
            "Signal values written with an older freshness than the stored one (kept out by write timestamps); counted on replay and dry runs",
            m.stale_signals.clone(),
        );
        r.register(
            "signals_written",
            "Signal cells written (value or availability)",
            m.signals_written.clone(),
        );
        r.register(
            "state_changes",
            "Records written to the state changelog: events that changed what processor state shows",
            m.state_changes.clone(),
        );
        r.register_with_unit(
            "processing_duration",
            "Time to process one event (claim + state writes)",
            Unit::Seconds,
            m.processing_duration.clone(),
        );
        r.register(
            "store_errors",
            "CQL store errors, by operation kind (transient, refused)",
            m.store_errors.clone(),
        );
        r.register(
            "dead_letters",
            "Records sent to the dead-letter topic, by reason",
            m.dead_letters.clone(),
        );
        r.register(
            "actions",
            "Action records emitted, by type",
            m.actions.clone(),
        );
        r.register(
            "vehicle_errors",
            "VEHICLE_ERROR items applied, by type and state",
            m.vehicle_errors.clone(),
        );
        r.register(
            "consumer_lag",
            "Records behind the high watermark, per partition",
            m.consumer_lag.clone(),
        );
        r.register(
            "transactions",
            "Kafka transactions (offsets + actions + dead letters), by result",
            m.transactions.clone(),
        );
        r.register(
            "rebalances",
            "Consumer group rebalances, by kind (assign, revoke)",
            m.rebalances.clone(),
        );
        r.register_with_unit(
            "last_commit_timestamp",
            "Unix time of the last committed transaction (0 until the first)",
            Unit::Seconds,
            m.last_commit.clone(),
        );
        r.register(
            "client_rebuilds",
            "Kafka consumer and producer rebuilt after a fatal or unusable transactional state",
            m.client_rebuilds.clone(),
        );
        r.register(
            "untrusted_timestamps",
            "Timestamps later than receive time plus the allowed skew, not trusted, by clock",
            m.untrusted_timestamps.clone(),
        );
        r.register(
            "legacy_events",
            "Legacy v2 bodies claimed and applied, by form (eventBased, dynamic, scheduled, other)",
            m.legacy_events.clone(),
        );
        r.register(
            "poll_requests",
            "Poll requests put on the poll-request topic with the batch, by reason (dead_letter, error_resolved)",
            m.poll_requests.clone(),
        );
        m
    }

    /// Counts one committed poll request.
    pub fn poll_requested(&self, reason: shared::poll_request::PollReason) {
        self.poll_requests
            .get_or_create(&vec![("reason", reason.as_str().to_string())])
            .inc();
    }

    /// Records a committed transaction.
    pub fn committed(&self) {
        self.transactions
            .get_or_create(&vec![("result", "committed".to_string())])
            .inc();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.last_commit.set(now);
    }

    /// Counts one event outcome.
    pub fn outcome(&self, outcome: &'static str) {
        self.events
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }
}

/// `…_build_info{version} 1`: which build runs where (joins onto any other series by instance).
pub fn build_info() -> prometheus_client::metrics::info::Info<Vec<(&'static str, String)>> {
    prometheus_client::metrics::info::Info::new(vec![(
        "version",
        env!("CARGO_PKG_VERSION").to_string(),
    )])
}
