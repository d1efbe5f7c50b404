//! The background broker check behind `/ready`.
//!
//! Every second while the breaker is not closed (every few seconds otherwise) the events topic's
//! metadata is fetched and each partition leader is asked for watermarks over the producer's own
//! connection to it ([`EventProducer::probe`]), in `spawn_blocking` (librdkafka's calls block).
//! Its result is the `kafka` readiness condition, and a success closes a half-open breaker or an
//! open one whose open period is over ([`crate::breaker::Breaker::broker_healthy`]). So readiness
//! comes back by itself once Kafka is healthy: behind a load balancer an unready pod gets no
//! requests, and a breaker that only requests could close would keep the whole fleet out of rotation.

use std::sync::Arc;
use std::time::Duration;

use shared::admin::Readiness;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::producer::EventProducer;

/// Check interval while the breaker is closed.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// Check interval while the breaker is open or half-open: recovery within about a second.
const CHECK_EVERY_OPEN: Duration = Duration::from_secs(1);

/// Runs the check until `stop`; then marks the receiver as draining (not ready).
pub async fn run(
    producer: Arc<EventProducer>,
    readiness: Readiness,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut was_ok = true;
    loop {
        let probe = producer.probe().await;
        let ok = probe.is_ok();
        match &probe {
            Err(e) if was_ok => tracing::warn!(error = %e, "kafka not ready"),
            Ok(()) if !was_ok => tracing::info!("kafka ready again"),
            _ => {}
        }
        was_ok = ok;
        if ok && producer.breaker().broker_healthy() {
            tracing::info!("kafka healthy again: circuit closed by the background check");
        }
        let open = producer.circuit_open();
        readiness.set("kafka", ok);
        readiness.set("circuit-closed", !open);
        // Also refreshed here so the gauge is right when no request arrives.
        metrics.circuit_open.set(i64::from(open));
        let every = if open { CHECK_EVERY_OPEN } else { CHECK_EVERY };
        tokio::select! {
            _ = stop.cancelled() => {
                readiness.set("draining", false);
                return;
            }
            _ = tokio::time::sleep(every) => {}
        }
    }
}
