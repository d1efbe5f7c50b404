//! The carhook processor: turns the events topic into vehicle state applications can trust.
//!
//! - [`consumer`]: batches in lanes, one Kafka transaction per batch, overlapping the next batch.
//! - [`lanes`]: split by vehicle, resequence by offset.
//! - [`pipeline`]: one record — parse, claim, plan, write.
//! - [`effects`]: what an event means (pure): freshness-ordered writes and actions.
//! - [`store`]: the CQL claims and state tables.
//! - [`view`]: the vehicle state document and the cells it is rendered from.
//! - [`changelog`]: which events changed a document; the views that decide it without a read.
//! - [`txn`]: librdkafka's transactional calls, resumed without tripping its commit/abort bug.
//! - [`dead_letter`]: poison records and their provenance.
//! - [`state`]: the vehicle state view (`processor state`).
//! - [`poll`]: the REST polling fallback (`processor poll run|now|resync`).

pub mod changelog;
pub mod consumer;
pub mod dead_letter;
pub mod dlq;
pub mod effects;
pub mod lanes;
pub mod metrics;
pub mod pipeline;
pub mod poll;
pub mod replay;
pub mod state;
pub mod store;
pub mod tools;
pub mod txn;
pub mod view;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use shared::admin::{Admin, Readiness};
use shared::config::Settings;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::changelog::Changelog;
use crate::consumer::Worker;
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineSettings};
use crate::store::Store;

/// Why the processor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Cql(#[from] shared::cql::CqlError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Topics(#[from] shared::kafka::TopicError),
    #[error("kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// Connects to the store, retrying with back-off until it answers or `shutdown` fires.
pub async fn connect_store(
    settings: &Settings,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Option<Arc<scylla::client::session::Session>> {
    use backon::Retryable;
    // 200 ms doubling to at most 10 s, without end: the store coming back is the only way out
    // (besides shutdown); no jitter, one processor connecting is no herd.
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .without_max_times();
    let connect = (|| shared::cql::connect(&settings.cql))
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .notify(|e, wait| {
            readiness.set("store", false);
            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cql store not reachable");
        });
    tokio::select! {
        _ = shutdown.cancelled() => None,
        session = connect => session.ok().map(Arc::new),
    }
}

/// Applies CQL migrations and creates topics (what `processor migrate` and the Helm hook do).
pub async fn migrate(settings: &Settings) -> Result<Vec<i32>, StartError> {
    let session = shared::cql::connect(&settings.cql).await?;
    let applied = shared::cql::migrate(&session, &settings.cql).await?;
    shared::kafka::ensure_topics(&settings.kafka).await?;
    Ok(applied)
}

/// Runs the processor until `shutdown`: admin endpoints on `admin`, the consumer loop under a
/// supervisor that rebuilds the Kafka clients after a fatal error.
pub async fn run(
    settings: Settings,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
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
    let result = run_inner(&settings, &readiness, &metrics, &shutdown).await;
    admin_stop.cancel();
    let _ = admin_task.await;
    result
}

/// A start-up stage taking longer than this is logged at WARN.
const SLOW_STAGE: Duration = Duration::from_secs(10);

/// Logs each start-up stage with the time it took (`took_ms`), so a slow start names its stage:
/// at WARN when it took longer than [`SLOW_STAGE`] (a start-up is then on its way to failing a
/// readiness probe; the tests log at WARN), else at INFO.
pub(crate) struct StartUp {
    at: Instant,
}

impl StartUp {
    pub(crate) fn begin() -> Self {
        Self { at: Instant::now() }
    }

    /// `stage` is done: logs how long it took since the previous one (or the beginning).
    pub(crate) fn done(&mut self, stage: &'static str) {
        let took = self.at.elapsed();
        let took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        if took > SLOW_STAGE {
            tracing::warn!(stage, took_ms, "start-up stage slow");
        } else {
            tracing::info!(stage, took_ms, "start-up stage done");
        }
        self.at = Instant::now();
    }
}

async fn run_inner(
    settings: &Settings,
    readiness: &Readiness,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), StartError> {
    let mut stages = StartUp::begin();
    let mut stage = |stage: &'static str| stages.done(stage);
    let Some(session) = connect_store(settings, readiness, shutdown).await else {
        return Ok(());
    };
    stage("store connected");
    if settings.cql.migrate {
        shared::cql::migrate(&session, &settings.cql).await?;
        stage("schema migrated");
    }
    if settings.kafka.create_topics {
        shared::kafka::ensure_topics(&settings.kafka).await?;
        stage("topics ensured");
    }
    let store = Store::prepare(
        Arc::clone(&session),
        &settings.cql.keyspace,
        settings.cql.dedup_ttl_days,
    )
    .await?
    .with_latency(metrics.cql_duration.clone());
    readiness.set("store", true);
    stage("statements prepared");
    let p = &settings.processor;
    let mut pipeline = Pipeline::new(
        store,
        PipelineSettings {
            instance_id: p.instance_id.clone(),
            logic_version: p.logic_version,
            rate_limit_backoff_secs: p.rate_limit_backoff_secs,
            max_attempts: p.max_attempts,
            max_clock_skew_ms: i64::try_from(p.max_clock_skew_ms).unwrap_or(i64::MAX),
        },
        metrics.clone(),
    );
    if p.changelog {
        pipeline.changelog = Some(Changelog::new(
            settings.kafka.clone(),
            p.changelog_cache_bytes,
            metrics.clone(),
        ));
    }
    let pipeline = Arc::new(pipeline);
    tracing::info!(
        group = %settings.kafka.consumer_group,
        topic = %settings.kafka.events_topic,
        instance = %p.instance_id,
        keyspace = %settings.cql.keyspace,
        "processor started"
    );
    let mut restarts = 0u32;
    while !shutdown.is_cancelled() {
        let group = settings.kafka.consumer_group.clone();
        let consumer = Arc::new(consumer::consumer(settings, &group, metrics.clone())?);
        let producer =
            consumer::transactional_producer(settings, &format!("{group}-{}", p.instance_id))?;
        let lag_stop = shutdown.child_token();
        let lag = tokio::spawn(consumer::report_lag(
            Arc::clone(&consumer),
            settings.kafka.events_topic.clone(),
            metrics.clone(),
            lag_stop.clone(),
        ));
        let worker = Worker {
            consumer,
            producer,
            pipeline: Arc::clone(&pipeline),
            settings: settings.clone(),
            readiness: readiness.clone(),
            metrics: metrics.clone(),
            group,
            emit_actions: true,
        };
        let result = worker.run(shutdown.clone()).await;
        lag_stop.cancel();
        let _ = lag.await;
        match result {
            Ok(()) => break,
            Err(e) => {
                restarts += 1;
                metrics.client_rebuilds.inc();
                readiness.set("consumer", false);
                tracing::error!(error = %e, restarts, "consumer loop failed; rebuilding kafka clients");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(u64::from(restarts.min(30)))) => {}
                }
            }
        }
        // Dropping the worker closes the consumer: it leaves the group, handing partitions over.
    }
    tracing::info!("processor stopped");
    Ok(())
}
