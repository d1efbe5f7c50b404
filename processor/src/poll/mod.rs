//! The REST polling fallback (`processor poll …`): Smartcar drops a webhook for good after ~3
//! minutes of failed deliveries, so when carhook may have lost data it reads the vehicle's
//! signals from the V3 API instead — targeted and under budget, never a blanket cron.
//!
//! - [`requests`]: durable poll requests on `kafka.poll_topic` (keyed by vehicle), produced by
//!   the triggers and operators.
//! - [`poller`]: one request — budgets, the API call with its retry rules, the polled event.
//! - [`budget`]: the global token bucket and the application pause after a 429.
//! - [`store`]: user ids, open errors and per-vehicle budget state in CQL.
//! - [`triggers`]: the processor's own requests (dead letters, resolved errors).
//! - [`metrics`]: the `carhook_poller_*` metrics.
//!
//! `processor poll run` consumes the poll-request topic in its own consumer group, up to
//! `poller.concurrency` requests at once, each on its own (a vehicle waiting out its 429 holds up
//! no other). Offsets are stored only up to the oldest request still running, so a crash re-reads
//! what was not finished — and the per-vehicle minimum interval makes the repeat a skip instead
//! of a second billable request.

pub mod budget;
pub mod metrics;
pub mod poller;
pub mod requests;
pub mod store;
pub mod triggers;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use prometheus_client::registry::Registry;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
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
    /// `result` is the [`metrics::RESULTS`] label of the skip.
    #[error("vehicle {vehicle} was not polled: {why}")]
    NotPolled {
        vehicle: String,
        result: &'static str,
        why: String,
    },
    /// `result` is the [`metrics::RESULTS`] label of the failure.
    #[error("vehicle {vehicle}: {why}")]
    PollFailed {
        vehicle: String,
        result: &'static str,
        why: String,
    },
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
    let consumer = Arc::new(request_consumer(settings)?);
    consumer.subscribe(&[settings.kafka.poll_topic.as_str()])?;
    readiness.set("consumer", true);
    tracing::info!(
        topic = %settings.kafka.poll_topic,
        group = %settings.poller.consumer_group,
        bucket_capacity = settings.poller.bucket_capacity,
        bucket_refill_ms = settings.poller.bucket_refill_ms,
        "poller started"
    );
    let safety_net = tokio::spawn(safety_net(
        settings.clone(),
        poller.store.clone(),
        requests::RequestProducer::new(&settings.kafka)?,
        poller.metrics.clone(),
        shutdown.clone(),
    ));
    let queued = tokio::spawn(report_queued(
        Arc::clone(&consumer),
        settings.kafka.poll_topic.clone(),
        poller.metrics.clone(),
        shutdown.clone(),
    ));
    let concurrency = settings.poller.concurrency;
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let offsets = Arc::new(Mutex::new(Offsets::default()));
    let in_flight: Arc<Mutex<HashSet<VehicleId>>> = Arc::default();
    let topic = settings.kafka.poll_topic.clone();
    let mut stream = consumer.stream();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = stream.next() => m,
        };
        let Some(next) = next else { break };
        let m = match next {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!(error = %e, "poll-request consumer error");
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        lock(&offsets).started(m.partition(), m.offset());
        let (poller, offsets, in_flight, consumer, topic, shutdown) = (
            Arc::clone(&poller),
            Arc::clone(&offsets),
            Arc::clone(&in_flight),
            Arc::clone(&consumer),
            topic.clone(),
            shutdown.clone(),
        );
        // Each request runs on its own, so a vehicle waiting out its retry-after never holds up
        // another; offsets are stored only up to the oldest request still running.
        tokio::spawn(async move {
            handle_record(&poller, &m, &in_flight, &shutdown).await;
            let next = lock(&offsets).finished(m.partition(), m.offset());
            let mut list = rdkafka::TopicPartitionList::new();
            if list
                .add_partition_offset(&topic, m.partition(), rdkafka::Offset::Offset(next))
                .is_ok()
            {
                if let Err(e) = consumer.store_offsets(&list) {
                    tracing::debug!(error = %e, "offset not stored (partition revoked?)");
                }
            }
            drop(slot);
        });
    }
    // Let running requests finish (bounded), then commit what they stored.
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(30), slots.acquire_many(all)).await;
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    safety_net.abort();
    queued.abort();
    tracing::info!("poller stopped");
    Ok(())
}

/// The safety net: every `poller.safety_net_every_secs`, a vehicle with a webhook within
/// `safety_net_active_secs` whose configured `safety_net_signals` are older than
/// `safety_net_max_age_secs` (or missing) gets a poll request. Off while `safety_net_active_secs`
/// is 0 or no signal is configured. The requests go through the topic like any other, so the
/// budgets (minimum interval above all) bound what it costs.
async fn safety_net(
    settings: Settings,
    store: PollStore,
    producer: requests::RequestProducer,
    metrics: PollMetrics,
    shutdown: CancellationToken,
) {
    let p = &settings.poller;
    let codes = p.safety_net_codes();
    if p.safety_net_active_secs == 0 || codes.is_empty() {
        return;
    }
    let every = Duration::from_secs(p.safety_net_every_secs);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = EpochMillis::now().as_i64();
        let ago = |secs: u64| {
            EpochMillis::new(
                now.saturating_sub(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
            )
            .unwrap_or_else(EpochMillis::now)
        };
        let active = match store.active_since(ago(p.safety_net_active_secs)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "safety net: cannot list active vehicles; next round retries");
                continue;
            }
        };
        let mut requested = 0usize;
        for v in active {
            let stale = match store
                .stale_signals(&v, &codes, ago(p.safety_net_max_age_secs))
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(vehicle_id = %v, error = %e, "safety net: cannot read signals");
                    continue;
                }
            };
            if stale.is_empty() {
                continue;
            }
            match producer
                .request(&PollRequest::new(&v, None, PollReason::SafetyNet))
                .await
            {
                Ok(()) => {
                    requested += 1;
                    metrics.requested(PollReason::SafetyNet);
                    tracing::info!(vehicle_id = %v, stale = ?stale, "safety net: poll requested");
                }
                Err(e) => {
                    tracing::warn!(vehicle_id = %v, error = %e, "safety net: poll request not produced")
                }
            }
        }
        tracing::info!(requested, "safety net round done");
    }
}

/// Keeps `requests_queued` current: for the assigned partitions, the high watermark minus the
/// consumer's position (records not yet taken), every 5 s. With `requests_in_flight` it tells a
/// poller with work waiting from an idle one (the CarhookPollerStuck alert).
async fn report_queued(
    consumer: Arc<StreamConsumer>,
    topic: String,
    metrics: PollMetrics,
    stop: CancellationToken,
) {
    loop {
        let c = Arc::clone(&consumer);
        let t = topic.clone();
        let queued = tokio::task::spawn_blocking(move || {
            let Ok(pos) = c.position() else {
                return None;
            };
            let mut sum = 0i64;
            for e in pos.elements().iter().filter(|e| e.topic() == t) {
                let Ok((low, high)) = c.fetch_watermarks(&t, e.partition(), Duration::from_secs(2))
                else {
                    return None;
                };
                // No position yet (nothing fetched since the assignment): the committed offset,
                // else the start of the partition, is where reading resumes.
                let at = match e.offset() {
                    rdkafka::Offset::Offset(o) => o,
                    _ => committed(&c, &t, e.partition()).unwrap_or(low),
                };
                sum += (high - at).max(0);
            }
            Some(sum)
        })
        .await
        .ok()
        .flatten();
        if let Some(n) = queued {
            metrics.requests_queued.set(n);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// The group's committed offset of one partition, if any.
fn committed(c: &StreamConsumer, topic: &str, partition: i32) -> Option<i64> {
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(topic, partition);
    let got = c.committed_offsets(list, Duration::from_secs(2)).ok()?;
    got.elements().first().and_then(|e| match e.offset() {
        rdkafka::Offset::Offset(o) => Some(o),
        _ => None,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Per partition: offsets being handled and the highest seen, so the stored offset never passes
/// a request still running.
#[derive(Default)]
struct Offsets {
    running: HashMap<i32, BTreeSet<i64>>,
    highest: HashMap<i32, i64>,
}

impl Offsets {
    fn started(&mut self, partition: i32, offset: i64) {
        self.running.entry(partition).or_default().insert(offset);
        let h = self.highest.entry(partition).or_insert(offset);
        *h = (*h).max(offset);
    }

    /// Marks `offset` done; returns the offset to store (the next one to read after a restart).
    fn finished(&mut self, partition: i32, offset: i64) -> i64 {
        let running = self.running.entry(partition).or_default();
        running.remove(&offset);
        match running.first() {
            Some(oldest) => *oldest,
            None => self.highest.get(&partition).map_or(offset, |h| h + 1),
        }
    }
}

/// Handles one poll-request record. A second request for a vehicle already being polled is
/// counted as `skipped_in_flight` (the running poll answers it). A store failure is retried with
/// back-off until it works or `shutdown` fires: the request is not lost and nothing is polled
/// twice.
async fn handle_record(
    poller: &Poller,
    m: &rdkafka::message::OwnedMessage,
    in_flight: &Mutex<HashSet<VehicleId>>,
    shutdown: &CancellationToken,
) {
    let parsed = m
        .payload()
        .ok_or_else(|| "empty record".to_string())
        .and_then(|p| PollRequest::parse(p).map_err(|e| e.to_string()));
    let (req, vehicle) = match parsed {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e, partition = m.partition(), offset = m.offset(), "unusable poll request skipped");
            poller.metrics.poll(PollReason::Operator, "invalid_request");
            return;
        }
    };
    if !lock(in_flight).insert(vehicle.clone()) {
        // The running poll answers this request too (and sets the minimum interval).
        tracing::info!(vehicle_id = %vehicle, reason = req.reason.as_str(), "poll skipped: this vehicle is being polled already");
        poller.metrics.poll(req.reason, "skipped_in_flight");
        return;
    }
    let _in_flight = poller.metrics.in_flight();
    let mut wait = Duration::from_millis(200);
    loop {
        match poller.handle(&req, &vehicle, Options::default()).await {
            Ok(outcome) => {
                log_outcome(&vehicle, req.reason, &outcome);
                poller.metrics.poll(req.reason, outcome.label());
                break;
            }
            Err(e) => {
                tracing::warn!(vehicle_id = %vehicle, error = %e, retry_in_ms = wait.as_millis() as u64, "store unavailable; poll request retried");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
    lock(in_flight).remove(&vehicle);
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
/// to `wait` for the processor to claim the polled event and returns a JSON report (`applied`
/// false when no processor claimed it in time: the caller reports that as a failure).
///
/// It runs in its own process with its own global bucket, outside the running poller's: the
/// vehicle's monthly cap, blocks and open errors (in the store) still hold, and Smartcar's own
/// application bucket answers 429 if the two together overdraw it.
pub async fn poll_now(
    settings: &Settings,
    vehicle: &str,
    user_id: Option<String>,
    wait: Duration,
) -> Result<serde_json::Value, PollError> {
    let vehicle = VehicleId::parse(vehicle).map_err(|e| PollError::Vehicle(vehicle.into(), e))?;
    ApiConfig::from_settings(&settings.smartcar)?;
    let session = Arc::new(shared::cql::connect(&settings.cql).await?);
    if settings.cql.migrate {
        shared::cql::migrate(&session, &settings.cql).await?;
    }
    let mut registry = Registry::default();
    let metrics = PollMetrics::register(&mut registry, settings.poller.bucket_capacity);
    let poller = build(settings, Arc::clone(&session), metrics).await?;
    let req = PollRequest::new(&vehicle, user_id, PollReason::Operator);
    let opts = Options {
        ignore_min_interval: true,
    };
    let polled = match poller.handle(&req, &vehicle, opts).await? {
        Outcome::Polled(p) => p,
        Outcome::Skipped(result, why) => {
            return Err(PollError::NotPolled {
                vehicle: vehicle.to_string(),
                result,
                why,
            })
        }
        Outcome::Failed(result, why) => {
            return Err(PollError::PollFailed {
                vehicle: vehicle.to_string(),
                result,
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
            "produced to the events topic, but no processor claimed it in time: is `processor run` up? It is applied once one runs"
        },
        "waitedSecs": wait.as_secs(),
        "signals": fetched,
    }))
}

/// `processor poll resync --since`: a poll request for every vehicle whose last webhook was
/// delivered at or after `since` (see [`PollStore::active_since`]). Returns how many were
/// requested.
pub async fn resync(settings: &Settings, since: EpochMillis) -> Result<usize, PollError> {
    let session = Arc::new(shared::cql::connect(&settings.cql).await?);
    if settings.cql.migrate {
        shared::cql::migrate(&session, &settings.cql).await?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_offset_never_passes_a_running_request() {
        let mut o = Offsets::default();
        for off in [10, 11, 12] {
            o.started(0, off);
        }
        assert_eq!(o.finished(0, 11), 10, "10 still runs");
        assert_eq!(o.finished(0, 12), 10);
        assert_eq!(o.finished(0, 10), 13, "all done: resume after the highest");
        o.started(1, 5);
        assert_eq!(o.finished(1, 5), 6, "partitions are independent");
    }
}
