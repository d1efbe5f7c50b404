//! The consumer loop: batches of records, processed in lanes, committed in Kafka transactions
//! that run while the next batches are collected and processed.
//!
//! Each batch is split by partition and, inside a partition, into lanes by vehicle
//! ([`crate::lanes`]); up to `processor.concurrency` lanes run at once, records within a lane run in
//! offset order. Results are put back in offset order per partition. The CQL effects of every
//! record are durable before it is handed to a transaction. A transaction carries, atomically: the
//! action records and dead letters of exactly the records whose offsets it commits (each
//! partition's contiguous finished prefix), and those offsets (`send_offsets_to_transaction`).
//! One transaction is in flight at a time; while it commits, the loop goes on collecting and
//! processing, so a record that arrives during a commit is not held back until it ends (a commit's
//! tail is tens of milliseconds on a busy broker). A transaction is started only between batches,
//! and the records waiting for the next one are bounded like a batch (memory).
//!
//! Why exactly-once still holds:
//! - an offset is committed only with the actions and dead letters of the records below it, and
//!   only once every record below it is finished (the prefix rule), so a commit never skips an
//!   unfinished record, and nothing is emitted for a record whose offset is not committed with it;
//! - a crash or kill -9 anywhere before a commit aborts its transaction: no action or dead letter
//!   becomes visible to read_committed consumers, the offsets do not move, and the records are
//!   processed again — their state writes are idempotent (write timestamps), their claims name them
//!   as owners, and a flag change re-emits its action (the aborted one was never visible);
//! - records processed but not committed (past a failed one, in the batch behind an aborted
//!   transaction, or of a partition revoked while they waited) are processed again from the
//!   committed offset, by this instance or the new owner, with the same effects; they are dropped
//!   here, never committed late;
//! - a partition revoked while its records wait for a transaction is left out of it (its new owner
//!   starts from the old committed offset); one revoked
//!   while a transaction carrying its offsets is in flight stays in it, which is safe: the
//!   transaction was started between batches with the group generation of that moment, when this
//!   instance still owned the partition and no other member could (a revocation is acknowledged
//!   only when the loop polls the consumer). If the group has moved to a later generation when the
//!   broker gets the offsets, it refuses them and the transaction aborts; if it gets them first,
//!   the next owner's offset fetch waits for the transaction's outcome (librdkafka asks for stable
//!   offsets under read_committed) and starts after its records only if it committed;
//! - two copies of one event id carry the same key (the vehicle, else the event id) and so run in
//!   the same lane, one after the other; across partitions the claim's LWT decides the owner;
//! - a crash after a commit loses nothing: everything it covers was durable before it began.
//!
//! A transient failure (store down, timeout) stops that lane at the failed record and the other
//! lanes of its partition before records past it; the partition's prefix before it is committed,
//! the partition is rewound to it, the processor reports not ready and backs off with jitter, then
//! resumes by itself. A poison record is dead-lettered inside the transaction and the partition
//! moves on.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::stream::{self, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use shared::admin::Readiness;
use shared::config::Settings;
use shared::headers;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::changelog::{Undo, Written};
use crate::dead_letter::{dead_letter_headers, header_str};
use crate::lanes::{self, LaneResult};
use crate::metrics::Metrics;
use crate::pipeline::{Disposition, Pipeline};

/// Logs and counts rebalances, and remembers revoked partitions for the loop (see `collect`).
pub struct GroupContext {
    metrics: Metrics,
    revoked: std::sync::Mutex<Vec<i32>>,
}

impl GroupContext {
    /// Partitions revoked since the last call.
    fn take_revoked(&self) -> Vec<i32> {
        self.revoked
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let (kind, list) = match rebalance {
            Rebalance::Assign(l) => ("assign", Some(*l)),
            Rebalance::Revoke(l) => ("revoke", Some(*l)),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "rebalance error");
                ("error", None)
            }
        };
        let partitions: Vec<i32> = list
            .map(|l| l.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        if kind == "revoke" {
            if let Ok(mut r) = self.revoked.lock() {
                r.extend(&partitions);
            }
            for p in &partitions {
                self.metrics.lag_clock.revoked(*p);
            }
        }
        if kind == "assign" {
            let now = shared::clock::EpochMillis::now().as_i64();
            for p in &partitions {
                self.metrics.lag_clock.assigned(*p, now);
            }
        }
        self.metrics
            .rebalances
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
        tracing::info!(kind, ?partitions, "rebalance");
    }
}

/// The events consumer.
pub type EventConsumer = StreamConsumer<GroupContext>;

/// Why the loop stopped with an error (the supervisor restarts it).
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("kafka client setup: {0}")]
    Setup(KafkaError),
    #[error("kafka transaction failed fatally: {0}")]
    Fatal(KafkaError),
}

/// Builds the consumer: manual commits through the producer's transactions, read_committed,
/// cooperative-sticky assignment.
pub fn consumer(
    settings: &Settings,
    group: &str,
    metrics: Metrics,
) -> Result<EventConsumer, KafkaError> {
    let mut c: ClientConfig = shared::kafka::base_config(&settings.kafka);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        .set(
            "client.id",
            format!("carhook-processor-{}", settings.processor.instance_id),
        );
    bound_prefetch(&mut c);
    c.create_with_context(GroupContext {
        metrics,
        revoked: std::sync::Mutex::new(Vec::new()),
    })
}

/// Builds the transactional producer. The transactional id is stable per instance, so a restarted
/// instance fences (and aborts) whatever its predecessor left open.
pub fn transactional_producer(
    settings: &Settings,
    transactional_id: &str,
) -> Result<FutureProducer, KafkaError> {
    let mut c = shared::kafka::base_config(&settings.kafka);
    c.set("transactional.id", transactional_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random")
        .set(
            "transaction.timeout.ms",
            TRANSACTION_BUDGET.as_millis().to_string(),
        )
        .set("message.timeout.ms", "25000");
    c.create()
}

/// Bytes of records librdkafka may prefetch, bytes of payload one batch may hold, and the bytes
/// (payloads, the change records they will produce and the view cells kept to undo them,
/// [`held_bytes`]) at which waiting runs are handed to a transaction (or, with one in flight, at
/// which the loop waits for it): with librdkafka's queue, one batch processing, the runs
/// committing and the runs waiting (each just under this plus one batch), the processor holds at
/// most about six times this.
const PREFETCH_BYTES: usize = 4 << 20;

/// Bounds what librdkafka holds for a consumer of the events topic: the processor's and replay's.
pub fn bound_prefetch(c: &mut ClientConfig) -> &mut ClientConfig {
    // Prefetch bounded by memory, not by librdkafka's 64 MB default: with 50 KB events that
    // alone would exceed the processor's memory budget.
    c.set(
        "queued.max.messages.kbytes",
        (PREFETCH_BYTES / 1024).to_string(),
    )
    // When that queue is full, librdkafka postpones the partition's next fetch by this much
    // (default 1 s), however soon the loop empties it: with 50 KB events one batch takes the
    // whole queue, and the next one would wait out the second.
    .set("fetch.queue.backoff.ms", "20")
    // The prefetch bound above only decides whether another fetch is sent: one fetch answer
    // (up to 50 MB by default, 1 MB per partition, compressed) is decompressed and queued
    // whole. With lz4-compressed JSON that was tens of MB of decompressed record batches at
    // once, held until their last record is consumed (heaptrack: 49 MB of the 50 KB drain's
    // heap peak). 1 MiB of compressed batches per answer (librdkafka's minimum here: it must
    // be at least `message.max.bytes`) still brings hundreds of records per round trip.
    .set("fetch.max.bytes", "1048576")
}

/// How long one transaction may take from its first call to its end: librdkafka's
/// `transaction.timeout.ms` (set below), after which the broker aborts it anyway.
const TRANSACTION_BUDGET: Duration = Duration::from_secs(30);

/// Why a batch's transaction did not commit.
#[derive(Debug)]
enum TxnFailure {
    /// Aborted cleanly: the batch is processed again with the same clients.
    Aborted(KafkaError),
    /// The producer cannot go on (fenced, fatal, or an abort that never completed).
    Unusable(KafkaError),
}

/// A transaction's outcome: on success, where its state changelog records were written.
type Committed = Result<Vec<Written>, TxnFailure>;

/// A transaction in flight: it yields the runs it commits and its outcome.
type InFlight<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = (Vec<PartitionRun>, Committed)> + Send + 'a>,
>;

fn is_fatal(e: &KafkaError) -> bool {
    matches!(e, KafkaError::Transaction(t) if t.is_fatal())
}

/// A record to produce inside the transaction: topic, key, value, headers. The value borrows
/// what the finished records already hold (a change record's document, a dead letter's payload):
/// librdkafka copies it when it is sent, and one more copy of every document of a commit is what
/// the processor's memory can least afford with large vehicles.
type Outgoing<'a> = (String, Option<Vec<u8>>, Cow<'a, [u8]>, OwnedHeaders);

/// One finished record.
struct Done {
    msg: OwnedMessage,
    disposition: Disposition,
    elapsed: Duration,
    /// The record's consumer span: the end-of-processing log line is written inside it (trace id).
    span: tracing::Span,
}

/// One partition's share of a batch.
struct PartitionRun {
    partition: i32,
    first_offset: i64,
    done: Vec<Done>,
    /// The record that failed transiently, and why.
    failed: Option<(i64, String)>,
}

/// The loop's fixed parts.
pub struct Worker {
    pub consumer: Arc<EventConsumer>,
    pub producer: FutureProducer,
    pub pipeline: Arc<Pipeline>,
    pub settings: Settings,
    pub readiness: Readiness,
    pub metrics: Metrics,
    pub group: String,
    /// Replay and dry runs: skip action emission.
    pub emit_actions: bool,
}

impl Worker {
    /// Runs until `shutdown`; finishes and commits the batch in hand first. Returns
    /// `LoopError::Fatal` when the producer can no longer be used (fenced, fatal error, a
    /// transaction that could neither commit nor abort): the supervisor then rebuilds both Kafka
    /// clients and rejoins the group, instead of rewinding the same batch forever.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), LoopError> {
        let producer = self.producer.clone();
        let mut stages = crate::StartUp::begin();
        match tokio::task::spawn_blocking(move || {
            producer.init_transactions(Duration::from_secs(30))
        })
        .await
        {
            Ok(r) => r.map_err(LoopError::Setup)?,
            Err(_) => return Err(LoopError::Setup(KafkaError::Canceled)),
        }
        stages.done("transactions initialised");
        if let Some(c) = &self.pipeline.changelog {
            c.reset();
        }
        self.consumer
            .subscribe(&[&self.settings.kafka.events_topic])
            .map_err(LoopError::Setup)?;
        self.readiness.set("consumer", true);
        self.readiness.set("transactions", true);
        let mut failures: u32 = 0;
        // Processed, not yet committed, in processing order (several batches' runs of a partition
        // can wait for one transaction). They are handed to a transaction once the oldest has
        // waited `commit_interval_ms`, or they hold `batch_max` records or a batch's worth of
        // bytes (`held_bytes`: payloads, change records, undo cells), or at once when no record
        // arrives.
        let mut pending: Vec<PartitionRun> = Vec::new();
        let mut pending_since: Option<Instant> = None;
        // The transaction in flight, if any: it commits while the loop collects and processes the
        // next batches (so a record that arrives during a commit is not held back by it). At most
        // one at a time; it is started only between batches (see `start_commit`).
        let mut inflight: Option<InFlight<'_>> = None;
        let interval = Duration::from_millis(self.settings.processor.commit_interval_ms);
        let batch_max = self.settings.processor.batch_max;
        while !shutdown.is_cancelled() {
            let (waiting, bytes) = pending_size(&pending);
            let full = waiting >= batch_max || bytes >= PREFETCH_BYTES;
            if full && inflight.is_some() {
                // Memory stays bounded: no more records until the transaction in flight is done.
                if self
                    .end_in_flight(&mut inflight, &mut pending, &mut failures, &shutdown)
                    .await?
                {
                    pending_since = None;
                }
                continue;
            }
            let due = full || pending_since.is_some_and(|t| t.elapsed() >= interval);
            if due && inflight.is_none() {
                pending_since = None;
                inflight = self.start_commit(std::mem::take(&mut pending));
            }
            // One batch collected and processed while the transaction in flight (if any) goes on;
            // when it ends first, its outcome waits here until the batch is done.
            let short = !pending.is_empty() || inflight.is_some();
            let work = async {
                let (batch, revoked) = self.collect(&shutdown, short).await;
                let idle = batch.is_empty();
                (revoked, idle, self.process(batch).await)
            };
            tokio::pin!(work);
            let mut ended = None;
            let (revoked, idle, runs) = loop {
                let Some(c) = inflight.as_mut().filter(|_| ended.is_none()) else {
                    break (&mut work).await;
                };
                tokio::select! {
                    biased;
                    outcome = c => ended = Some(outcome),
                    out = &mut work => break out,
                }
            };
            if ended.is_some() {
                inflight = None;
            }
            // Revoked while collecting: the new owner (or this instance, from the committed offset)
            // processes these records again, so they must not be committed here. (A transaction
            // already in flight keeps them: see "Why exactly-once still holds".)
            pending.retain(|r| !revoked.contains(&r.partition));
            if let Some(c) = &self.pipeline.changelog {
                c.drop_partitions(&revoked);
            }
            if let Some((committing, result)) = ended {
                match result {
                    Ok(written) => self.committed(&committing, written),
                    Err(f) => {
                        // Neither those runs nor any processed since are committed: all are
                        // processed again from their earliest offsets.
                        self.settle(
                            committing,
                            Err(f),
                            &mut pending,
                            runs,
                            &mut failures,
                            &shutdown,
                        )
                        .await?;
                        pending_since = None;
                        continue;
                    }
                }
            }
            if idle {
                if !pending.is_empty() && inflight.is_none() {
                    // Nothing arrived: what waits is committed at once.
                    pending_since = None;
                    inflight = self.start_commit(std::mem::take(&mut pending));
                }
                continue;
            }
            let any_failed = runs.iter().any(|r| r.failed.is_some());
            if any_failed {
                // Before the next collect: the partition resumes at the failed record, and only
                // the prefix before it is committed (with the next transaction).
                self.rewind(
                    runs.iter()
                        .filter_map(|r| r.failed.as_ref().map(|(o, _)| (r.partition, *o))),
                );
            }
            if !runs.is_empty() && pending_since.is_none() {
                pending_since = Some(Instant::now());
            }
            pending.extend(runs);
            if any_failed {
                failures += 1;
                self.readiness.set("store", false);
                // The transaction in flight ends first: left unpolled through the backoff (up to
                // `max_backoff_ms`), it would stay open that long, holding its outputs back from
                // read_committed consumers, or outlive the transaction timeout.
                if self
                    .end_in_flight(&mut inflight, &mut pending, &mut failures, &shutdown)
                    .await?
                {
                    // Everything was rewound, and `settle` backed off.
                    pending_since = None;
                    continue;
                }
                self.backoff(failures, &shutdown).await;
            } else {
                failures = 0;
                self.readiness.set("store", true);
            }
        }
        if let Some(c) = inflight.take() {
            let (runs, result) = c.await;
            match result {
                Ok(written) => self.committed(&runs, written),
                Err(f) => {
                    // What waited behind it is not committed either.
                    pending.clear();
                    match f {
                        TxnFailure::Aborted(e) => {
                            tracing::warn!(error = %e, "last transaction aborted at shutdown; the next owner processes it again");
                        }
                        TxnFailure::Unusable(e) => return Err(LoopError::Fatal(e)),
                    }
                }
            }
        }
        if !pending.is_empty() {
            let group = self.consumer.group_metadata();
            match self.commit(&pending, group).await {
                Ok(written) => self.committed(&pending, written),
                Err(TxnFailure::Aborted(e)) => {
                    tracing::warn!(error = %e, "last transaction aborted at shutdown; the next owner processes it again");
                }
                Err(TxnFailure::Unusable(e)) => return Err(LoopError::Fatal(e)),
            }
        }
        self.readiness.set("consumer", false);
        Ok(())
    }

    /// Starts the transaction for `runs` (none when they commit nothing). Called only between
    /// batches, right after the partitions revoked so far were taken out of `runs`: the group
    /// metadata taken here is the generation in which this instance owns every partition of them.
    /// Until the next collect polls the consumer, no revocation can be acknowledged, so no other
    /// member can own any of them yet.
    fn start_commit(&self, runs: Vec<PartitionRun>) -> Option<InFlight<'_>> {
        if runs.is_empty() {
            return None;
        }
        let group = self.consumer.group_metadata();
        Some(Box::pin(async move {
            let result = self.commit(&runs, group).await;
            (runs, result)
        }))
    }

    /// Waits for the transaction in flight, if any, and settles it (nothing processed meanwhile).
    /// Returns whether it failed: then every waiting run was rewound and the loop backed off.
    async fn end_in_flight<'a>(
        &'a self,
        inflight: &mut Option<InFlight<'a>>,
        pending: &mut Vec<PartitionRun>,
        failures: &mut u32,
        shutdown: &CancellationToken,
    ) -> Result<bool, LoopError> {
        let Some(c) = inflight.take() else {
            return Ok(false);
        };
        let (runs, result) = c.await;
        let failed = result.is_err();
        self.settle(runs, result, pending, Vec::new(), failures, shutdown)
            .await?;
        Ok(failed)
    }

    /// After a transaction ended: on success its records are finished; otherwise they, the runs
    /// waiting behind them and `later` (processed meanwhile) are all processed again from their
    /// earliest offsets, and the loop backs off or gives the producer up.
    async fn settle(
        &self,
        committed: Vec<PartitionRun>,
        result: Committed,
        pending: &mut Vec<PartitionRun>,
        later: Vec<PartitionRun>,
        failures: &mut u32,
        shutdown: &CancellationToken,
    ) -> Result<(), LoopError> {
        match result {
            Ok(written) => {
                self.committed(&committed, written);
                pending.extend(later);
                Ok(())
            }
            Err(f) => {
                let all: Vec<PartitionRun> = committed
                    .into_iter()
                    .chain(std::mem::take(pending))
                    .chain(later)
                    .collect();
                self.rewind(earliest(&all).into_iter());
                self.undo(all.into_iter().flat_map(|r| r.done));
                self.failed_commit(f, failures, shutdown).await
            }
        }
    }

    /// Records that will be processed again: their changes are taken back out of the changelog's
    /// views, so processing them again produces the same change records.
    fn undo(&self, done: impl Iterator<Item = Done>) {
        let Some(c) = &self.pipeline.changelog else {
            return;
        };
        c.undo(
            done.filter_map(|d| match d.disposition {
                Disposition::Applied(a) => Some(a.undo),
                _ => None,
            })
            .flatten()
            .collect(),
        );
    }

    /// After a successful commit.
    fn committed(&self, runs: &[PartitionRun], written: Vec<Written>) {
        if runs.iter().any(|r| !r.done.is_empty()) {
            self.readiness.set("transactions", true);
        }
        if let Some(c) = &self.pipeline.changelog {
            c.committed(&commit_offsets(runs), written);
        }
        self.finish(runs);
    }

    /// After a transaction that did not commit: counts it, and either backs off (aborted) or gives
    /// the producer up (the supervisor rebuilds the clients).
    async fn failed_commit(
        &self,
        failure: TxnFailure,
        failures: &mut u32,
        shutdown: &CancellationToken,
    ) -> Result<(), LoopError> {
        match failure {
            TxnFailure::Aborted(e) => {
                self.metrics
                    .transactions
                    .get_or_create(&vec![("result", "aborted".to_string())])
                    .inc();
                self.readiness.set("transactions", false);
                tracing::warn!(error = %e, "transaction aborted; its records will be processed again");
                *failures += 1;
                self.backoff(*failures, shutdown).await;
                Ok(())
            }
            TxnFailure::Unusable(e) => {
                self.metrics
                    .transactions
                    .get_or_create(&vec![("result", "failed".to_string())])
                    .inc();
                self.readiness.set("transactions", false);
                Err(LoopError::Fatal(e))
            }
        }
    }

    /// Collects a batch; returns it with the partitions revoked meanwhile. Records of a revoked
    /// partition received before its revocation are dropped: if it comes back, librdkafka fetches
    /// it again from the committed offset (and drops what it had queued before), so what follows
    /// in this batch starts there. With `pending` (results waiting to commit) an idle wait is cut
    /// short, so they are committed promptly.
    async fn collect(
        &self,
        shutdown: &CancellationToken,
        pending: bool,
    ) -> (Vec<OwnedMessage>, Vec<i32>) {
        let p = &self.settings.processor;
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut revoked: Vec<i32> = Vec::new();
        let first_wait = if pending {
            Duration::from_millis(p.batch_wait_ms.max(1))
        } else {
            Duration::from_secs(1)
        };
        let first = tokio::select! {
            _ = shutdown.cancelled() => return (batch, revoked),
            m = tokio::time::timeout(first_wait, self.consumer.recv()) => m,
        };
        self.drop_revoked(&mut batch, &mut revoked);
        match first {
            Ok(Ok(m)) => batch.push(m.detach()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                return (batch, revoked);
            }
            Err(_) => return (batch, revoked),
        }
        let deadline = Instant::now() + Duration::from_millis(p.batch_wait_ms);
        let mut bytes: usize = batch
            .iter()
            .map(|m| m.payload().map_or(0, <[u8]>::len))
            .sum();
        while batch.len() < p.batch_max && bytes < PREFETCH_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.consumer.recv()).await;
            self.drop_revoked(&mut batch, &mut revoked);
            match m {
                Ok(Ok(m)) => {
                    bytes += m.payload().map_or(0, <[u8]>::len);
                    batch.push(m.detach());
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Err(_) => break,
            }
        }
        // Abandon records of partitions revoked while collecting: committing them is the new owner's job.
        let assigned: HashSet<i32> = self
            .consumer
            .assignment()
            .map(|l| l.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        batch.retain(|m| assigned.contains(&m.partition()));
        (batch, revoked)
    }

    fn drop_revoked(&self, batch: &mut Vec<OwnedMessage>, revoked: &mut Vec<i32>) {
        let r = self.consumer.context().take_revoked();
        if !r.is_empty() {
            batch.retain(|m| !r.contains(&m.partition()));
            revoked.extend(r);
        }
    }

    /// Processes a batch: each partition split into lanes by vehicle ([`crate::lanes`]), at most
    /// `processor.concurrency` lanes at a time, results resequenced per partition.
    async fn process(&self, batch: Vec<OwnedMessage>) -> Vec<PartitionRun> {
        let concurrency = self.settings.processor.concurrency.max(1);
        let mut first_offsets = BTreeMap::new();
        let mut lanes = Vec::new();
        for (partition, msgs) in by_partition(batch) {
            let first = msgs.first().map_or(0, Message::offset);
            if let Some(c) = &self.pipeline.changelog {
                c.begin(partition, first);
            }
            first_offsets.insert(partition, first);
            lanes.extend(lanes::split(partition, msgs, concurrency));
        }
        // The lowest offset that failed so far, per partition: lanes of that partition stop before
        // records past it, which could not be committed anyway.
        let stops: BTreeMap<i32, AtomicI64> = first_offsets
            .keys()
            .map(|p| (*p, AtomicI64::new(i64::MAX)))
            .collect();
        let results: Vec<(i32, LaneResult<Done>)> = stream::iter(lanes)
            .map(|lane| self.process_lane(lane, &stops))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut by_part: BTreeMap<i32, Vec<LaneResult<Done>>> = BTreeMap::new();
        for (p, r) in results {
            by_part.entry(p).or_default().push(r);
        }
        by_part
            .into_iter()
            .map(|(partition, results)| {
                let r = lanes::resequence(results);
                if !r.discarded.is_empty() {
                    tracing::debug!(
                        partition,
                        discarded = r.discarded.len(),
                        "records past a failed one are processed again after the rewind"
                    );
                    self.undo(r.discarded.into_iter().map(|(_, d)| d));
                }
                PartitionRun {
                    partition,
                    first_offset: first_offsets.get(&partition).copied().unwrap_or(0),
                    done: r.done.into_iter().map(|(_, d)| d).collect(),
                    failed: r.failed,
                }
            })
            .collect()
    }

    /// One lane, record after record in offset order; stops at the first transient failure, or
    /// before a record past another lane's failure in the same partition.
    async fn process_lane(
        &self,
        lane: lanes::Lane,
        stops: &BTreeMap<i32, AtomicI64>,
    ) -> (i32, LaneResult<Done>) {
        let partition = lane.partition;
        let stop = stops.get(&partition);
        let mut out = LaneResult {
            done: Vec::with_capacity(lane.records.len()),
            failed: None,
        };
        for msg in lane.records {
            if stop.is_some_and(|s| msg.offset() > s.load(Ordering::Acquire)) {
                break;
            }
            let started = Instant::now();
            let span = tracing::info_span!(
                "process",
                otel.name = format!("process {}", msg.topic()),
                otel.kind = "consumer",
                messaging.system = "kafka",
                messaging.operation.name = "process",
                messaging.operation.type = "process",
                messaging.destination.name = msg.topic(),
                messaging.destination.partition.id = msg.partition().to_string(),
                messaging.kafka.offset = msg.offset(),
                messaging.kafka.message.key = msg.key().and_then(|k| std::str::from_utf8(k).ok()).unwrap_or(""),
                messaging.consumer.group.name = self.group.as_str(),
                event_id = tracing::field::Empty,
                event_type = tracing::field::Empty,
                vehicle_id = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
                error.type = tracing::field::Empty,
            );
            shared::telemetry::continue_from(&span, &|k| header_str(&msg, k).map(str::to_owned));
            span.record("trace_id", shared::telemetry::trace_id(&span));
            let result = async {
                // DEBUG: the INFO line per record is the one written when it is finished.
                tracing::debug!(
                    partition = msg.partition(),
                    offset = msg.offset(),
                    "processing start"
                );
                self.pipeline.handle(&msg).await
            }
            .instrument(span.clone())
            .await;
            match result {
                Ok(disposition) => out.done.push((
                    msg.offset(),
                    Done {
                        msg,
                        disposition,
                        elapsed: started.elapsed(),
                        span,
                    },
                )),
                Err(e) => {
                    let _e = span.enter();
                    tracing::warn!(partition, offset = msg.offset(), error = %e, "transient failure; will retry this record");
                    shared::telemetry::record_error(&span, "store_transient", &e.to_string());
                    if let Some(s) = stop {
                        s.fetch_min(msg.offset(), Ordering::AcqRel);
                    }
                    out.failed = Some((msg.offset(), e.to_string()));
                    break;
                }
            }
        }
        (partition, out)
    }

    /// The transaction: actions, dead letters, offsets.
    ///
    /// Follows librdkafka's rules for the transactional API, each call made once with the whole
    /// transaction budget ([`crate::txn`] says why a call is never resumed): an error that requires
    /// an abort aborts, and the abort's outcome is checked; anything fatal, a call that ran out of
    /// the budget (its operation is still under way inside librdkafka), or an abort that cannot
    /// complete makes the producer unusable, and the clients are rebuilt.
    async fn commit(
        &self,
        runs: &[PartitionRun],
        group: Option<ConsumerGroupMetadata>,
    ) -> Committed {
        let mut offsets = TopicPartitionList::new();
        for (partition, next) in commit_offsets(runs) {
            offsets
                .add_partition_offset(
                    &self.settings.kafka.events_topic,
                    partition,
                    Offset::Offset(next),
                )
                .map_err(TxnFailure::Unusable)?;
        }
        if offsets.count() == 0 {
            return Ok(Vec::new());
        }
        // Refused only when the previous transaction is still open (a commit or abort that never
        // completed): nothing more can be done with this producer.
        self.producer
            .begin_transaction()
            .map_err(TxnFailure::Unusable)?;
        let started = Instant::now();
        match self.commit_inner(runs, &offsets, group).await {
            Ok(written) => {
                self.metrics
                    .transaction_duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.committed();
                Ok(written)
            }
            Err(e) if is_fatal(&e) || crate::txn::ran_out_of_time(&e) => {
                Err(TxnFailure::Unusable(e))
            }
            Err(e) => match self.abort().await {
                Ok(()) => Err(TxnFailure::Aborted(e)),
                Err(abort) => {
                    tracing::error!(error = %e, abort_error = %abort, "transaction could not be aborted");
                    Err(TxnFailure::Unusable(abort))
                }
            },
        }
    }

    async fn abort(&self) -> Result<(), KafkaError> {
        crate::txn::call(&self.producer, TRANSACTION_BUDGET, |p, t| {
            p.abort_transaction(t)
        })
        .await
    }

    async fn commit_inner(
        &self,
        runs: &[PartitionRun],
        offsets: &TopicPartitionList,
        group: Option<ConsumerGroupMetadata>,
    ) -> Result<Vec<Written>, KafkaError> {
        let kafka = &self.settings.kafka;
        let mut owned: Vec<Outgoing> = Vec::new();
        // Each change record: its index in `owned`, its events partition and vehicle.
        let mut changes: Vec<(usize, i32, &str)> = Vec::new();
        for d in runs.iter().flat_map(|r| &r.done) {
            if let Disposition::Applied(applied) = &d.disposition {
                for v in &applied.refresh_requests {
                    let h = OwnedHeaders::new().insert(Header {
                        key: headers::CONTROL,
                        value: Some(headers::CONTROL_REFRESH_STATE),
                    });
                    let body = serde_json::json!({
                        "vehicleId": v,
                        "requestedBy": "processor",
                        "cause": format!("{}:{}", d.msg.partition(), d.msg.offset()),
                    });
                    owned.push((
                        kafka.events_topic.clone(),
                        Some(v.as_bytes().to_vec()),
                        Cow::Owned(body.to_string().into_bytes()),
                        h,
                    ));
                }
                for c in &applied.changes {
                    let mut h = OwnedHeaders::new()
                        .insert(Header {
                            key: headers::EVENT_ID,
                            value: Some(c.event_id.as_str()),
                        })
                        .insert(Header {
                            key: headers::EVENT_TYPE,
                            value: Some(c.event_type.as_str()),
                        })
                        .insert(Header {
                            key: headers::CHANGED,
                            value: Some(c.changed.join(",").as_str()),
                        })
                        .insert(Header {
                            key: headers::CELL_TIMES,
                            value: Some(c.cell_times.as_str()),
                        });
                    if let Some(tp) = header_str(&d.msg, headers::TRACEPARENT) {
                        h = h.insert(Header {
                            key: headers::TRACEPARENT,
                            value: Some(tp),
                        });
                    }
                    changes.push((owned.len(), d.msg.partition(), c.vehicle.as_str()));
                    owned.push((
                        kafka.state_topic.clone(),
                        Some(c.vehicle.as_bytes().to_vec()),
                        Cow::Borrowed(c.document.as_bytes()),
                        h,
                    ));
                }
            }
            match &d.disposition {
                Disposition::Applied(applied) if self.emit_actions => {
                    for (plan, a) in applied
                        .emits
                        .iter()
                        .flat_map(|p| p.actions.iter().map(move |a| (p, a)))
                    {
                        let mut h = OwnedHeaders::new()
                            .insert(Header {
                                key: headers::ACTION_TYPE,
                                value: Some(a.kind),
                            })
                            .insert(Header {
                                key: "carhook-action-id",
                                value: Some(a.action_id.as_str()),
                            });
                        if let Some(tp) = header_str(&d.msg, headers::TRACEPARENT) {
                            h = h.insert(Header {
                                key: headers::TRACEPARENT,
                                value: Some(tp),
                            });
                        }
                        let key = plan
                            .vehicle
                            .as_ref()
                            .map(|v| v.as_str().as_bytes().to_vec());
                        owned.push((
                            kafka.actions_topic.clone(),
                            key,
                            Cow::Owned(a.body.to_string().into_bytes()),
                            h,
                        ));
                    }
                }
                Disposition::Poison(p) => {
                    owned.push((
                        kafka.dlq_topic.clone(),
                        d.msg.key().map(<[u8]>::to_vec),
                        Cow::Borrowed(d.msg.payload().unwrap_or_default()),
                        dead_letter_headers(&d.msg, p),
                    ));
                }
                _ => {}
            }
            if self.emit_actions {
                owned.extend(
                    crate::poll::triggers::records(&kafka.poll_topic, &d.msg, &d.disposition)
                        .into_iter()
                        .map(|(topic, key, value, h)| (topic, key, Cow::Owned(value), h)),
                );
            }
        }
        let mut sends = Vec::new();
        for (topic, key, payload, h) in &owned {
            let mut rec = FutureRecord::<[u8], [u8]>::to(topic)
                .payload(payload.as_ref())
                .headers(h.clone());
            if let Some(k) = key {
                rec = rec.key(k.as_slice());
            }
            sends.push(self.producer.send(rec, Duration::from_secs(20)));
        }
        let deliveries = join_all(sends)
            .await
            .into_iter()
            .map(|r| r.map_err(|(e, _)| e))
            .collect::<Result<Vec<_>, _>>()?;
        let written = changes
            .into_iter()
            .map(|(i, events_partition, vehicle)| Written {
                events_partition,
                vehicle: vehicle.to_owned(),
                partition: deliveries[i].partition,
                offset: deliveries[i].offset,
            })
            .collect();
        let group = group.ok_or(KafkaError::Canceled)?;
        let offsets = offsets.clone();
        crate::txn::call(&self.producer, TRANSACTION_BUDGET, move |p, t| {
            p.send_offsets_to_transaction(&offsets, &group, t)
        })
        .await?;
        crate::txn::call(&self.producer, TRANSACTION_BUDGET, |p, t| {
            p.commit_transaction(t)
        })
        .await?;
        Ok(written)
    }

    /// After a commit: the per-record log line (processing end) and outcome metrics.
    ///
    /// One line per record, inside its span, which supplies `trace_id`, `event_id`, `vehicle_id`
    /// and `event_type`; a dead letter is always logged, with its error, and successful records
    /// only as `telemetry.event_log` says.
    fn finish(&self, runs: &[PartitionRun]) {
        let lines = shared::telemetry::EventLines::new(&self.settings.telemetry);
        let now = shared::clock::EpochMillis::now().as_i64();
        for run in runs {
            if let Some(ms) = run.done.last().and_then(|d| d.msg.timestamp().to_millis()) {
                self.metrics.lag_clock.committed(run.partition, ms);
            }
        }
        for d in runs.iter().flat_map(|r| &r.done) {
            let _in_span = d.span.enter();
            let outcome = d.disposition.label();
            self.metrics.outcome(outcome);
            if self.emit_actions {
                for r in crate::poll::triggers::requests(&d.msg, &d.disposition) {
                    self.metrics.poll_requested(r.reason);
                }
            }
            let duration_ms = d.elapsed.as_secs_f64() * 1000.0;
            let (partition, offset) = (d.msg.partition(), d.msg.offset());
            let (actions, state_changes) = match &d.disposition {
                Disposition::Poison(p) => {
                    self.metrics
                        .dead_letters
                        .get_or_create(&vec![("reason", p.class.to_string())])
                        .inc();
                    let event_id = header_str(&d.msg, headers::EVENT_ID).unwrap_or("");
                    shared::telemetry::record_error(&d.span, p.class, &p.message);
                    tracing::warn!(event_id, partition, offset, outcome, reason = p.class, error = %p.message, duration_ms, "event dead-lettered");
                    continue;
                }
                Disposition::Applied(applied) => {
                    // Receive to commit: the receiver's (or poller's) receive time, when it is there.
                    if let Some(at) =
                        header_str(&d.msg, headers::RECEIVED_AT).and_then(|v| v.parse::<i64>().ok())
                    {
                        #[allow(clippy::cast_precision_loss)] // milliseconds
                        let secs = (now - at).max(0) as f64 / 1000.0;
                        self.metrics.freshness.observe(secs);
                    }
                    let actions: Vec<_> = applied.emits.iter().flat_map(|p| &p.actions).collect();
                    self.metrics
                        .state_changes
                        .inc_by(applied.changes.len() as u64);
                    if self.emit_actions {
                        for a in &actions {
                            self.metrics
                                .actions
                                .get_or_create(&vec![("type", a.kind.to_string())])
                                .inc();
                        }
                    }
                    (actions.len(), applied.changes.len())
                }
                Disposition::Ignored(_) | Disposition::Duplicate => (0, 0),
            };
            if !lines.keep(&d.span) {
                continue;
            }
            match &d.disposition {
                Disposition::Ignored(why) => tracing::info!(
                    partition,
                    offset,
                    outcome,
                    reason = *why,
                    duration_ms,
                    "event processed"
                ),
                _ => tracing::info!(
                    partition,
                    offset,
                    outcome,
                    actions,
                    state_changes,
                    duration_ms,
                    "event processed"
                ),
            }
        }
    }

    fn rewind(&self, to: impl Iterator<Item = (i32, i64)>) {
        for (partition, offset) in to {
            if let Err(e) = self.consumer.seek(
                &self.settings.kafka.events_topic,
                partition,
                Offset::Offset(offset),
                Duration::from_secs(5),
            ) {
                // Not assigned any more: the new owner starts from the committed offset anyway.
                tracing::debug!(partition, offset, error = %e, "rewind skipped");
            }
        }
    }

    /// Waits before the next attempt after `failures` failed ones in a row: between half and all of
    /// 100 ms × 2^failures, capped at `processor.max_backoff_ms` (backon's exponential backoff with
    /// jitter, which adds up to one more delay: hence half the delays and half the cap).
    async fn backoff(&self, failures: u32, shutdown: &CancellationToken) {
        let wait = backoff_delay(self.settings.processor.max_backoff_ms, failures);
        tracing::info!(wait_ms = wait.as_millis() as u64, failures, "backing off");
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Splits a batch by partition, keeping each partition's offsets strictly increasing. A partition
/// revoked and re-assigned within one collect window is fetched again from its committed offset,
/// so the batch can hold the same offsets twice; processing both copies would emit their actions
/// twice in one transaction. The first occurrence is kept, anything not past it is dropped.
fn by_partition(batch: Vec<OwnedMessage>) -> BTreeMap<i32, Vec<OwnedMessage>> {
    let mut out: BTreeMap<i32, Vec<OwnedMessage>> = BTreeMap::new();
    for m in batch {
        let lane = out.entry(m.partition()).or_default();
        if lane.last().is_none_or(|last| m.offset() > last.offset()) {
            lane.push(m);
        } else {
            tracing::debug!(
                partition = m.partition(),
                offset = m.offset(),
                "record fetched twice in one batch (re-assigned partition); dropped"
            );
        }
    }
    out
}

/// Records waiting in `runs`, and their payload bytes.
fn pending_size(runs: &[PartitionRun]) -> (usize, usize) {
    runs.iter()
        .flat_map(|r| &r.done)
        .fold((0, 0), |(n, bytes), d| (n + 1, bytes + held_bytes(d)))
}

/// What a processed record holds until its transaction: its payload, the buffers of the state
/// changelog records it will produce (each the vehicle's whole document and its cell times, often
/// larger than the event; librdkafka copies them again when they are sent), and the view cells it
/// replaced, kept to undo it (about the previous document for an event that refreshes every
/// signal). Its plans' cells are not held (see `pipeline::Emits`); its actions are small.
fn held_bytes(d: &Done) -> usize {
    let changes = match &d.disposition {
        Disposition::Applied(a) => {
            a.changes
                .iter()
                .map(|c| c.document.capacity() + c.cell_times.capacity())
                .sum::<usize>()
                + a.undo.iter().map(Undo::held_bytes).sum::<usize>()
        }
        _ => 0,
    };
    d.msg.payload().map_or(0, <[u8]>::len) + changes
}

/// The offset each partition commits to: one past the last record processed in `runs` (a
/// partition can have several runs waiting for one transaction).
fn commit_offsets(runs: &[PartitionRun]) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for r in runs {
        if let Some(last) = r.done.last() {
            let next = out.entry(r.partition).or_insert(last.msg.offset() + 1);
            *next = (*next).max(last.msg.offset() + 1);
        }
    }
    out
}

/// Where each partition of `runs` is processed again when they are not committed: its earliest
/// first offset.
fn earliest(runs: &[PartitionRun]) -> BTreeMap<i32, i64> {
    let mut out = BTreeMap::new();
    for r in runs {
        let first = out.entry(r.partition).or_insert(r.first_offset);
        *first = (*first).min(r.first_offset);
    }
    out
}

/// The wait after `failures` failed attempts in a row ([`Worker::backoff`]).
fn backoff_delay(max_backoff_ms: u64, failures: u32) -> Duration {
    use backon::BackoffBuilder;
    let cap = Duration::from_millis(max_backoff_ms.max(100));
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(cap / 2)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(failures.min(16) as usize)
        .unwrap_or(cap)
}

/// Keeps `consumer_lag{partition}` (high watermark minus position) and `consumer_lag_age_seconds`
/// ([`crate::metrics::LagClock`]) current for assigned partitions, every 5 s.
pub async fn report_lag(
    consumer: Arc<EventConsumer>,
    topic: String,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut reported: HashSet<i32> = HashSet::new();
    loop {
        let c = Arc::clone(&consumer);
        let t = topic.clone();
        let lags = tokio::task::spawn_blocking(move || {
            let Ok(pos) = c.position() else {
                return Vec::new();
            };
            // The group's committed offsets: records handed to the pipeline but not yet committed
            // count for the lag's age, not for the records behind the position.
            let committed = c.committed(Duration::from_secs(2)).ok();
            pos.elements()
                .iter()
                .filter(|e| e.topic() == t)
                .filter_map(|e| {
                    let (_, high) = c
                        .fetch_watermarks(&t, e.partition(), Duration::from_secs(2))
                        .ok()?;
                    let at = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => return None,
                    };
                    let done = committed
                        .as_ref()
                        .and_then(|l| l.find_partition(&t, e.partition()))
                        .and_then(|c| match c.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                        .unwrap_or(at);
                    Some((e.partition(), (high - at).max(0), (high - done).max(0)))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let now: HashSet<i32> = lags.iter().map(|(p, _, _)| *p).collect();
        // Partitions handed to another instance stop being reported here, instead of freezing.
        for gone in reported.difference(&now) {
            let labels = vec![("partition", gone.to_string())];
            metrics.consumer_lag.remove(&labels);
            metrics.lag_seconds.remove(&labels);
        }
        let at = shared::clock::EpochMillis::now().as_i64();
        for (p, lag, uncommitted) in lags {
            let labels = vec![("partition", p.to_string())];
            metrics.consumer_lag.get_or_create(&labels).set(lag);
            metrics
                .lag_seconds
                .get_or_create(&labels)
                .set(metrics.lag_clock.lag_seconds(p, uncommitted, at));
        }
        reported = now;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Timestamp;

    fn run(partition: i32, offsets: std::ops::Range<i64>) -> PartitionRun {
        PartitionRun {
            partition,
            first_offset: offsets.start,
            done: offsets
                .map(|o| Done {
                    msg: rec(partition, o),
                    disposition: Disposition::Duplicate,
                    elapsed: Duration::ZERO,
                    span: tracing::Span::none(),
                })
                .collect(),
            failed: None,
        }
    }

    #[test]
    fn runs_waiting_together_commit_past_each_partitions_last_and_rewind_to_its_first() {
        // Two batches wait for one transaction: partition 0 has two runs, partition 1 one, and
        // partition 2 a run that processed nothing (it failed on its first record).
        let mut empty = run(2, 40..40);
        empty.failed = Some((40, "store down".into()));
        let runs = vec![run(0, 10..15), run(1, 7..9), empty, run(0, 15..18)];
        assert_eq!(
            commit_offsets(&runs).into_iter().collect::<Vec<_>>(),
            vec![(0, 18), (1, 9)],
            "one offset per partition, one past its last record"
        );
        assert_eq!(
            earliest(&runs).into_iter().collect::<Vec<_>>(),
            vec![(0, 10), (1, 7), (2, 40)],
            "processed again from each partition's first record"
        );
        assert_eq!(pending_size(&runs), (10, 20), "ten records of two bytes");
    }

    /// The bound on what waits for a transaction counts the change records a run will produce,
    /// not only the events' payloads: with the changelog on, a 50 KB event's change record (the
    /// vehicle's whole document and its cell times) is as large again; and the view cells a
    /// record replaced, kept to undo it, are about the previous values.
    #[test]
    fn waiting_runs_are_sized_with_the_change_records_they_will_produce() {
        let change = |doc: usize, times: usize| crate::changelog::Change {
            vehicle: "v".into(),
            event_id: "e".into(),
            event_type: "VEHICLE_STATE".into(),
            document: "d".repeat(doc),
            changed: vec!["a-b".into()],
            cell_times: "t".repeat(times),
        };
        let mut r = run(0, 0..3);
        r.done[1].disposition = Disposition::Applied(crate::pipeline::Applied {
            emits: Vec::new(),
            changes: vec![change(1_000, 200), change(50, 5)],
            undo: Vec::new(),
            refresh: false,
            refresh_requests: Vec::new(),
        });
        assert_eq!(
            pending_size(std::slice::from_ref(&r)),
            (3, 3 * 2 + 1_200 + 55)
        );
        // A record that replaced a 5 000-byte value keeps it to undo the record.
        let at = 1_764_000_000_000;
        let mut view = crate::view::View::default();
        view.apply(&crate::view::testing::many("e1", 1, 5_000, at));
        let applied = view.apply_tracked(&crate::view::testing::many("e2", 1, 5_000, at + 1));
        let undo = crate::changelog::Undo::of_cells("car", applied);
        let kept = undo.held_bytes();
        assert!(kept > 5_000, "the replaced value's text is counted: {kept}");
        r.done[2].disposition = Disposition::Applied(crate::pipeline::Applied {
            undo: vec![undo],
            ..Default::default()
        });
        assert_eq!(pending_size(&[r]), (3, 3 * 2 + 1_200 + 55 + kept));
    }

    #[test]
    fn backoff_doubles_from_100_ms_with_jitter_down_to_half_and_stays_under_the_cap() {
        for _ in 0..200 {
            for (failures, full) in [(0u32, 100u64), (1, 200), (3, 800), (5, 3_200)] {
                let wait = backoff_delay(30_000, failures).as_millis() as u64;
                assert!(
                    (full / 2..=full).contains(&wait),
                    "{failures} failures: {wait} ms, not in [{}, {full}]",
                    full / 2
                );
            }
            for failures in [9, 16, 40, u32::MAX] {
                let wait = backoff_delay(30_000, failures).as_millis() as u64;
                assert!((15_000..=30_000).contains(&wait), "{failures}: {wait} ms");
            }
            assert!(
                backoff_delay(0, 20) <= Duration::from_millis(100),
                "cap at least 100 ms"
            );
        }
    }

    fn rec(partition: i32, offset: i64) -> OwnedMessage {
        OwnedMessage::new(
            Some(b"{}".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn offsets_fetched_twice_after_a_reassignment_are_processed_once() {
        // Partition 0 revoked after offsets 5,6 were fetched, re-assigned, fetched again from 5.
        let batch = vec![
            rec(0, 5),
            rec(1, 9),
            rec(0, 6),
            rec(0, 5),
            rec(0, 6),
            rec(0, 7),
            rec(1, 9),
        ];
        let lanes = by_partition(batch);
        let offsets = |p: i32| -> Vec<i64> { lanes[&p].iter().map(Message::offset).collect() };
        assert_eq!(offsets(0), vec![5, 6, 7]);
        assert_eq!(offsets(1), vec![9]);
    }
}
