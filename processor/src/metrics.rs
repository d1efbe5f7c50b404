//! The processor's Prometheus metrics, all `carhook_processor_*`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

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
    /// State changelog views loaded into memory, by where from (restore, changelog, store).
    pub changelog_view_loads: Family<Labels, Counter>,
    /// Memory the state changelog's views take, estimated (bytes).
    pub changelog_cache_bytes: Gauge,
    pub processing_duration: Histogram,
    pub store_errors: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    pub actions: Family<Labels, Counter>,
    pub vehicle_errors: Family<Labels, Counter>,
    pub consumer_lag: Family<Labels, Gauge>,
    pub transactions: Family<Labels, Counter>,
    /// Outputs produced, offsets sent and the commit acknowledged, per committed transaction.
    pub transaction_duration: Histogram,
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
    /// Receive (the receiver's `carhook-received-at`) to committed, per applied event.
    pub freshness: Histogram,
    /// Age of the oldest record not yet committed, per assigned partition (see [`LagClock`]).
    pub lag_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    /// What `lag_seconds` is computed from.
    pub lag_clock: LagClock,
    /// Each CQL statement execution, by operation, table and result.
    pub cql_duration: Family<CqlLabels, Histogram>,
}

/// Labels of `cql_duration`: operation (`INSERT`, `SELECT`, `BATCH UPDATE` …), table (the
/// keyspace's table, or `batch`) and result (`ok`, or the error class). All bounded.
pub type CqlLabels = [(&'static str, &'static str); 3];

/// The Kafka timestamp of the last committed record per partition.
///
/// The lag in seconds of a partition that is behind is `now − that timestamp`: the record after
/// it, the oldest one not yet committed, entered the topic at that time or later, so this is an
/// upper bound of its age that grows while nothing commits and is exact for a partition stuck on
/// one record. A partition with no record behind has lag 0. Before the first commit since it was
/// assigned, a partition that is behind counts from its assignment.
#[derive(Clone, Default)]
pub struct LagClock(Arc<Mutex<HashMap<i32, i64>>>);

impl LagClock {
    /// Records that `partition` committed up to a record with Kafka timestamp `ms`. A partition
    /// not assigned here (revoked while its transaction was in flight) is left out: if it comes
    /// back, its clock starts at that assignment, not at this old commit.
    pub fn committed(&self, partition: i32, ms: i64) {
        if let Ok(mut m) = self.0.lock() {
            if let Some(t) = m.get_mut(&partition) {
                *t = (*t).max(ms);
            }
        }
    }

    /// Starts the clock of a newly assigned partition at `now_ms` (if it has none).
    pub fn assigned(&self, partition: i32, now_ms: i64) {
        if let Ok(mut m) = self.0.lock() {
            m.entry(partition).or_insert(now_ms);
        }
    }

    /// Forgets a partition that is no longer assigned here.
    pub fn revoked(&self, partition: i32) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&partition);
        }
    }

    /// Seconds `partition` is behind at `now_ms`, given the records behind its position.
    pub fn lag_seconds(&self, partition: i32, records_behind: i64, now_ms: i64) -> f64 {
        if records_behind <= 0 {
            return 0.0;
        }
        let since = self
            .0
            .lock()
            .ok()
            .and_then(|m| m.get(&partition).copied())
            .unwrap_or(now_ms);
        #[allow(clippy::cast_precision_loss)] // milliseconds: exact far beyond any real lag
        let secs = (now_ms - since).max(0) as f64 / 1000.0;
        secs
    }
}

impl Metrics {
    /// Creates and registers the metrics under `carhook_processor_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            events: Family::default(),
            stale_signals: Counter::default(),
            signals_written: Counter::default(),
            state_changes: Counter::default(),
            changelog_view_loads: Family::default(),
            changelog_cache_bytes: Gauge::default(),
            processing_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            store_errors: Family::default(),
            dead_letters: Family::default(),
            actions: Family::default(),
            vehicle_errors: Family::default(),
            consumer_lag: Family::default(),
            transactions: Family::default(),
            // 1 ms .. ~33 s: a quick commit to one that runs into the 30 s transaction budget.
            transaction_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            rebalances: Family::default(),
            last_commit: Gauge::default(),
            client_rebuilds: Counter::default(),
            untrusted_timestamps: Family::default(),
            legacy_events: Family::default(),
            poll_requests: Family::default(),
            // 10 ms .. ~5.5 min: a fast pipeline to a backlog that needs attention.
            freshness: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            lag_seconds: Family::default(),
            lag_clock: LagClock::default(),
            cql_duration: Family::new_with_constructor(|| {
                // 0.25 ms .. ~8 s.
                Histogram::new(exponential_buckets(0.00025, 2.0, 16))
            }),
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
        zero(&m.rebalances, "kind", &["assign", "revoke"]);
        for t in crate::effects::ERROR_TYPE_LABELS {
            for state in ["error", "resolved"] {
                let _ = m.vehicle_errors.get_or_create(&vec![
                    ("type", (*t).to_string()),
                    ("state", state.to_string()),
                ]);
            }
        }
        shared::admin::register_build_info(registry, "processor");
        let r = registry.sub_registry_with_prefix("carhook_processor");
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
        r.register(
            "changelog_view_loads",
            "State changelog views loaded into memory, by origin: restore (kept from the partition's restore), changelog (the vehicle's last record read back after its view was dropped), store (no record yet)",
            m.changelog_view_loads.clone(),
        );
        r.register_with_unit(
            "changelog_cache",
            "Memory the state changelog's views take, estimated from their documents and cells (bounded by processor.changelog_cache_bytes, past which committed views are dropped)",
            Unit::Bytes,
            m.changelog_cache_bytes.clone(),
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
        r.register_with_unit(
            "transaction_duration",
            "Per committed transaction: outputs produced, offsets sent and the commit acknowledged",
            Unit::Seconds,
            m.transaction_duration.clone(),
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
        r.register_with_unit(
            "event_freshness",
            "Time from the receiver's acknowledgement to the processor's commit, per applied event",
            Unit::Seconds,
            m.freshness.clone(),
        );
        r.register_with_unit(
            "consumer_lag_age",
            "Age of the oldest record not yet committed, per assigned partition (0 when caught up; an upper bound: now minus the last committed record's Kafka timestamp)",
            Unit::Seconds,
            m.lag_seconds.clone(),
        );
        r.register_with_unit(
            "cql_duration",
            "Each CQL statement execution, by operation, table and result (ok or the error class)",
            Unit::Seconds,
            m.cql_duration.clone(),
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

#[cfg(test)]
mod tests {
    use super::LagClock;

    #[test]
    fn lag_age_counts_from_the_last_committed_record_and_is_zero_when_caught_up() {
        let clock = LagClock::default();
        clock.assigned(3, 1_000);
        assert_eq!(clock.lag_seconds(3, 0, 9_000), 0.0, "nothing behind");
        assert_eq!(
            clock.lag_seconds(3, 5, 9_000),
            8.0,
            "behind since assignment"
        );
        clock.committed(3, 7_500);
        assert_eq!(clock.lag_seconds(3, 5, 9_000), 1.5);
        clock.committed(3, 2_000);
        assert_eq!(
            clock.lag_seconds(3, 5, 9_000),
            1.5,
            "a commit never moves it back"
        );
        clock.assigned(3, 8_900);
        assert_eq!(
            clock.lag_seconds(3, 5, 9_000),
            1.5,
            "a repeated assign keeps it"
        );
        clock.revoked(3);
        assert_eq!(
            clock.lag_seconds(3, 5, 9_000),
            0.0,
            "unknown partition: from now"
        );
        clock.committed(3, 8_000);
        clock.assigned(3, 8_800);
        assert_eq!(
            clock.lag_seconds(3, 5, 9_000),
            0.2,
            "a commit that ends after the revoke does not outlive it"
        );
    }
}
