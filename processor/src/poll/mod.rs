//! The REST polling fallback (`processor poll …`): Smartcar drops a webhook for good after ~3
//! minutes of failed deliveries, so when carhook may have lost data it reads the vehicle's
//! signals from the V3 API instead — targeted and under budget, never a blanket cron.
//!
//! - [`requests`]: durable poll requests on `kafka.poll_topic` (keyed by vehicle), produced by
//!   the triggers and operators.
//! - [`poller`]: one request — budgets, the API call with its retry rules, the polled event.
//! - [`budget`]: the global token bucket and the application pause after a 429.
//! - [`store`]: user ids, open errors and per-vehicle budget state in CQL.
//! - [`metrics`]: the `carhook_poller_*` metrics.
//!
//! `processor poll run` consumes the poll-request topic in its own consumer group; offsets are
//! stored only after a request was handled (or found unusable), so a crash re-reads it — and the
//! per-vehicle minimum interval makes the repeat a skip instead of a second billable request.

pub mod budget;
pub mod metrics;
pub mod poller;
pub mod requests;
pub mod store;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use serde_json::json;
use shared::admin::{Admin, Readiness};
use shared::clock::EpochMillis;
use shared::config::Settings;
use shared::ids::VehicleId;
use shared::poll_request::{PollReason, PollRequest};
use shared::smartcar_api::{ApiConfig, SmartcarApi};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::budget::GlobalBudget;
use self::metrics::PollMetrics;
use self::poller::{Options, Outcome, Poller};
use self::store::PollStore;

/// Why the poller (or a `poll` subcommand) could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Config(#[from] shared::config::ConfigError),
    #[error(transparent)]
    Api(#[from] shared::smartcar_api::ApiError),
    #[error(transparent)]
    Cql(#[from] shared::cql::CqlError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Topics(#[from] shared::kafka::TopicError),
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("vehicle id {0:?}: {1}")]
    Vehicle(String, shared::ids::IdError),
    #[error("vehicle {vehicle} was not polled: {why}")]
    NotPolled { vehicle: String, why: String },
    #[error("vehicle {vehicle}: {why}")]
    PollFailed { vehicle: String, why: String },
    #[error("{0}")]
    Produce(String),
}

/// Builds the poller's parts from settings: the API client (client credentials are required
/// here), the CQL statements, the bucket and an idempotent producer for the events topic.
pub async fn build(
    settings: &Settings,
    session: Arc<scylla::client::session::Session>,
    metrics: PollMetrics,
) -> Result<Poller, PollError> {
    let api = SmartcarApi::new(
        ApiConfig::from_settings(&settings.smartcar)?,
        metrics.tokens_minted.clone(),
    )?;
    let store = PollStore::prepare(session, &settings.cql.keyspace).await?;
    let p = &settings.poller;
    let producer: FutureProducer = shared::kafka::producer_config(&settings.kafka)
        .set("client.id", "carhook-poller")
        .create()?;
    Ok(Poller {
        api,
        store,
        budget: GlobalBudget::new(p.bucket_capacity, Duration::from_millis(p.bucket_refill_ms)),
        producer,
        metrics,
        settings: p.clone(),
        events_topic: settings.kafka.events_topic.clone(),
        delivery_timeout: settings.kafka.delivery_timeout(),
    })
}

/// `processor poll run`: consumes poll requests until `shutdown`, admin endpoints on `admin`.
pub async fn run(
    settings: Settings,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), PollError> {
    let mut registry = Registry::default();
    let metrics = PollMetrics::register(&mut registry, settings.poller.bucket_capacity);
    let readiness = Readiness::default();
    readiness.set("store", false);
    readiness.set("consumer", false);
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(
        Admin {
            readiness: readiness.clone(),
            registry: Arc::new(registry),
        }
        .serve(admin, admin_stop.clone()),
    );
    let result = run_inner(&settings, &readiness, metrics, &shutdown).await;
    admin_stop.cancel();
    let _ = admin_task.await;
    result
}

async fn run_inner(
    settings: &Settings,
    readiness: &Readiness,
    metrics: PollMetrics,
    shutdown: &CancellationToken,
) -> Result<(), PollError> {
    // Refuse to start without credentials before touching the network.
    ApiConfig::from_settings(&settings.smartcar)?;
    let Some(session) = crate::connect_store(settings, readiness, shutdown).await else {
        return Ok(());
    };
    if settings.cql.migrate {
        shared::cql::migrate(&session, &settings.cql).await?;
    }
    if settings.kafka.create_topics {
        shared::kafka::ensure_topics(&settings.kafka).await?;
    }
    let poller = Arc::new(build(settings, session, metrics).await?);
    readiness.set("store", true);
    let consumer = request_consumer(settings)?;
    consumer.subscribe(&[settings.kafka.poll_topic.as_str()])?;
    readiness.set("consumer", true);
    tracing::info!(
        topic = %settings.kafka.poll_topic,
        group = %settings.poller.consumer_group,
        bucket_capacity = settings.poller.bucket_capacity,
        bucket_refill_ms = settings.poller.bucket_refill_ms,
        "poller started"
    );
    let mut stream = consumer.stream();
    let batch_max = settings.poller.concurrency;
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = stream.next() => m,
        };
        let Some(first) = first else { break };
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(batch_max);
        match first {
            Ok(m) => batch.push(m),
            Err(e) => {
                tracing::warn!(error = %e, "poll-request consumer error");
                continue;
            }
        }
        // Fill the batch with what is already there, without waiting for more.
        while batch.len() < batch_max {
            match tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
                Ok(Some(Ok(m))) => batch.push(m),
                Ok(Some(Err(e))) => tracing::warn!(error = %e, "poll-request consumer error"),
                Ok(None) | Err(_) => break,
            }
        }
        handle_batch(&poller, &batch, shutdown).await;
        for m in &batch {
            if let Err(e) = consumer.store_offset_from_message(m) {
                tracing::debug!(error = %e, "offset not stored (partition revoked?)");
            }
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    tracing::info!("poller stopped");
    Ok(())
}

/// Handles one batch concurrently. Several requests for one vehicle in a batch are polled once
/// (the rest would only meet the minimum interval). A store failure is retried with back-off
/// until it works or `shutdown` fires: the request is not lost and nothing is polled twice.
async fn handle_batch(
    poller: &Poller,
    batch: &[BorrowedMessage<'_>],
    shutdown: &CancellationToken,
) {
    let mut seen = HashSet::new();
    let mut work = Vec::new();
    for m in batch {
        let parsed = m
            .payload()
            .ok_or_else(|| "empty record".to_string())
            .and_then(|p| PollRequest::parse(p).map_err(|e| e.to_string()));
        match parsed {
            Ok((req, vehicle)) => {
                if seen.insert(vehicle.clone()) {
                    work.push((req, vehicle));
                } else {
                    poller.metrics.poll(req.reason, "skipped_min_interval");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, partition = m.partition(), offset = m.offset(), "unusable poll request skipped");
                poller.metrics.poll(PollReason::Operator, "invalid_request");
            }
        }
    }
    let tasks = work.iter().map(|(req, vehicle)| async move {
        let mut wait = Duration::from_millis(200);
        loop {
            match poller.handle(req, vehicle, Options::default()).await {
                Ok(outcome) => {
                    log_outcome(vehicle, req.reason, &outcome);
                    poller.metrics.poll(req.reason, outcome.label());
                    return;
                }
                Err(e) => {
                    tracing::warn!(vehicle_id = %vehicle, error = %e, retry_in_ms = wait.as_millis() as u64, "store unavailable; poll request retried");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
    futures::future::join_all(tasks).await;
}

fn log_outcome(vehicle: &VehicleId, reason: PollReason, outcome: &Outcome) {
    match outcome {
        Outcome::Polled(p) => {
            tracing::info!(vehicle_id = %vehicle, reason = reason.as_str(), event_id = %p.event_id, signals = p.signals.len(), "polled")
        }
        Outcome::Skipped(label, why) => {
            tracing::info!(vehicle_id = %vehicle, reason = reason.as_str(), result = label, why = %why, "poll skipped")
        }
        Outcome::Failed(label, why) => {
            tracing::warn!(vehicle_id = %vehicle, reason = reason.as_str(), result = label, why = %why, "poll failed")
        }
    }
}

/// The poll-request consumer: its own group, offsets stored after handling, auto-committed.
fn request_consumer(settings: &Settings) -> Result<StreamConsumer, rdkafka::error::KafkaError> {
    let mut c: ClientConfig = shared::kafka::base_config(&settings.kafka);
    c.set("group.id", &settings.poller.consumer_group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        // A batch may wait out a 429 of up to poller.max_retry_after_secs.
        .set(
            "max.poll.interval.ms",
            (settings.poller.max_retry_after_secs.saturating_mul(1000) * 2 + 300_000)
                .min(i32::MAX as u64)
                .to_string(),
        )
        .set("client.id", "carhook-poller");
    c.create()
}

/// `processor poll now`: one poll of one vehicle, ignoring only the minimum interval; waits up
/// to `wait` for the processor to claim the polled event and returns a JSON report.
pub async fn poll_now(
    settings: &Settings,
    vehicle: &str,
    user_id: Option<String>,
    wait: Duration,
) -> Result<serde_json::Value, PollError> {
    let vehicle = VehicleId::parse(vehicle).map_err(|e| PollError::Vehicle(vehicle.into(), e))?;
    ApiConfig::from_settings(&settings.smartcar)?;
    let session = Arc::new(shared::cql::connect(&settings.cql).await?);
    let mut registry = Registry::default();
    let metrics = PollMetrics::register(&mut registry, settings.poller.bucket_capacity);
    let poller = build(settings, Arc::clone(&session), metrics).await?;
    let req = PollRequest::new(&vehicle, user_id, PollReason::Operator);
    let opts = Options {
        ignore_min_interval: true,
    };
    let polled = match poller.handle(&req, &vehicle, opts).await? {
        Outcome::Polled(p) => p,
        Outcome::Skipped(_, why) => {
            return Err(PollError::NotPolled {
                vehicle: vehicle.to_string(),
                why,
            })
        }
        Outcome::Failed(_, why) => {
            return Err(PollError::PollFailed {
                vehicle: vehicle.to_string(),
                why,
            })
        }
    };
    let store = crate::store::Store::prepare(
        Arc::clone(&session),
        &settings.cql.keyspace,
        settings.cql.dedup_ttl_days,
    )
    .await?;
    let deadline = tokio::time::Instant::now() + wait;
    let claim = loop {
        if let Some(c) = store.read_claim(polled.event_id.as_str()).await? {
            break Some(c);
        }
        if tokio::time::Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let state = crate::state::vehicle_state(&session, &settings.cql.keyspace, vehicle.as_str())
        .await
        .ok();
    let fetched: Vec<_> = polled
        .signals
        .iter()
        .map(|s| {
            let stored = state
                .as_ref()
                .and_then(|st| st.pointer(&format!("/signals/{}", s.code)));
            json!({
                "code": s.code.as_str(),
                "status": match &s.status {
                    shared::event::SignalStatus::Success => json!("SUCCESS"),
                    shared::event::SignalStatus::Error { error_type, code } => json!({ "error": { "type": error_type, "code": code } }),
                },
                "body": s.body,
                "oemUpdatedAt": s.oem_updated_at.map(EpochMillis::to_rfc3339),
                // Whether the stored value is now this poll's (a fresher webhook value wins).
                "storedSource": stored.and_then(|v| v.get("source")).cloned(),
                "storedEventId": stored.and_then(|v| v.get("eventId")).cloned(),
            })
        })
        .collect();
    let applied = claim.is_some();
    Ok(json!({
        "vehicleId": vehicle.as_str(),
        "eventId": polled.event_id.as_str(),
        "fetchedAt": polled.fetched_at.to_rfc3339(),
        "eventsTopicPosition": format!("{}:{}", polled.partition, polled.offset),
        "applied": applied,
        "note": if applied {
            "the processor claimed the polled event; each signal shows whether its stored value is now the poll's"
        } else {
            "produced to the events topic, but no processor claimed it in time: is `processor run` up?"
        },
        "signals": fetched,
    }))
}

/// `processor poll resync --since`: a poll request for every vehicle whose last event was
/// delivered at or after `since`. Returns how many were requested.
pub async fn resync(settings: &Settings, since: EpochMillis) -> Result<usize, PollError> {
    let session = Arc::new(shared::cql::connect(&settings.cql).await?);
    let store = PollStore::prepare(session, &settings.cql.keyspace).await?;
    let vehicles = store.active_since(since).await?;
    let producer = requests::RequestProducer::new(&settings.kafka)?;
    for v in &vehicles {
        let user = store.user_of(v).await?;
        producer
            .request(&PollRequest::new(v, user, PollReason::Resync))
            .await
            .map_err(PollError::Produce)?;
    }
    Ok(vehicles.len())
}
