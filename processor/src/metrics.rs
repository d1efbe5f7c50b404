//! The processor's Prometheus metrics, all `carhook_processor_*`.

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
    pub processing_duration: Histogram,
    pub store_errors: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    pub actions: Family<Labels, Counter>,
    pub vehicle_errors: Family<Labels, Counter>,
    pub consumer_lag: Family<Labels, Gauge>,
    pub transactions: Family<Labels, Counter>,
    pub rebalances: Family<Labels, Counter>,
}

impl Metrics {
    /// Creates and registers the metrics under `carhook_processor_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            events: Family::default(),
            stale_signals: Counter::default(),
            signals_written: Counter::default(),
            processing_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            store_errors: Family::default(),
            dead_letters: Family::default(),
            actions: Family::default(),
            vehicle_errors: Family::default(),
            consumer_lag: Family::default(),
            transactions: Family::default(),
            rebalances: Family::default(),
        };
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
        m
    }

    /// Counts one event outcome.
    pub fn outcome(&self, outcome: &'static str) {
        self.events
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc();
    }
}
