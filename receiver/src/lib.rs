//! The Smartcar webhook receiver.
//!
//! A 200 means the exact bytes Smartcar sent are durable in Kafka (acks=all); anything else makes
//! Smartcar retry. Stateless: any instance serves any request.
//!
//! - [`webhook`]: the request path (limits, signature, VERIFY, persist).
//! - [`producer`]: Kafka writes, behind the [`breaker`]; quarantine of rejected bodies.
//! - [`outcome`]: every way a request ends, mapped once to status, log line and metrics.
//! - [`server`]: connections, timeouts, graceful drain.
//! - [`readiness`]: the background broker check that also closes the breaker without traffic.
//! - [`outage`]: vehicles answered 503, polled through the REST API after a long outage.
//!
//! Two listeners: the webhook listener serves only the webhook path; `/health`, `/ready` and
//! `/metrics` are on the admin listener, never on the public port.

pub mod breaker;
pub mod metrics;
pub mod outage;
pub mod outcome;
pub mod producer;
pub mod rate;
pub mod readiness;
pub mod server;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use shared::admin::{Admin, Readiness};
use shared::config::{ConfigError, Settings};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::producer::EventProducer;
use crate::rate::RateLimit;
use crate::webhook::App;

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    #[error("provisioning topics: {0}")]
    Topics(#[from] shared::kafka::TopicError),
}

/// Runs the receiver — webhooks on `listener`, admin endpoints on `admin_listener` — until
/// `shutdown` fires, then drains and flushes.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let tokens = settings.smartcar.tokens()?;
    if settings.kafka.create_topics {
        shared::kafka::ensure_topics(&settings.kafka).await?;
    }
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let r = &settings.receiver;
    let breaker = Breaker::new(r.breaker_failures, Duration::from_millis(r.breaker_open_ms));
    let producer = Arc::new(EventProducer::new(
        &settings.kafka,
        breaker,
        r.quarantine_per_sec,
        metrics.clone(),
    )?);
    let readiness = Readiness::default();
    readiness.set("kafka", false);
    let admin = Admin {
        readiness: readiness.clone(),
        registry: Arc::new(registry),
    };
    let app = Arc::new(App {
        settings: r.clone(),
        tokens,
        producer: Arc::clone(&producer),
        metrics,
        inflight: Arc::new(Semaphore::new(r.max_inflight)),
        body_reads: Arc::new(Semaphore::new(r.max_body_reads)),
        verify_rate: RateLimit::per_second(r.verify_per_sec),
        event_lines: shared::telemetry::EventLines::new(&settings.telemetry),
        outages: crate::outage::Outages::new(
            Duration::from_secs(settings.poller.outage_window_secs),
            settings.poller.outage_max_vehicles,
        ),
    });
    let probe_stop = shutdown.child_token();
    let probe = tokio::spawn(crate::readiness::run(
        Arc::clone(&producer),
        readiness,
        app.metrics.clone(),
        probe_stop.clone(),
    ));
    let admin_addr = admin_listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // The admin listener outlives the webhook drain: probes and scrapes keep answering.
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin.serve(admin_listener, admin_stop.clone()));
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        admin = %admin_addr,
        path = %r.path,
        topic = %settings.kafka.events_topic,
        tokens = app.tokens.len(),
        "receiver started"
    );
    let grace = Duration::from_millis(r.shutdown_grace_ms);
    let drained = server::serve(listener, Arc::clone(&app), shutdown, grace).await;
    probe_stop.cancel();
    let _ = probe.await;
    admin_stop.cancel();
    let _ = admin_task.await;
    let flush = producer.clone();
    let _ = tokio::task::spawn_blocking(move || flush.flush(Duration::from_secs(5))).await;
    tracing::info!(drained, "receiver stopped");
    Ok(())
}
