//! `processor replay`: re-derive state from a range of the events topic with the current logic.
//!
//! Semantics (each pinned by an integration test):
//! - It reads with its own consumer group and commits only there, so live consumers' offsets are
//!   untouched; running it again with the same range resumes where it stopped.
//! - It applies each event once, as live processing did: only the record that owns the event's
//!   claim is applied (copies live processing dropped as duplicates are skipped), with the delivery
//!   time stored in the claim and the record's own receive time, so it writes exactly the
//!   timestamps live processing wrote. An event whose claim has expired is applied by its record.
//!   It emits no actions: the live pipeline already emitted each action exactly once.
//! - Writes carry the same (freshness, logic version) timestamps as live processing. A replay under
//!   a newer `processor.logic_version` therefore replaces values with equal `oemUpdatedAt`, while an
//!   older event still never overwrites newer state.
//! - A dry run reads the stored write times and reports what would change, writing nothing. A
//!   real replay does not read before writing (the write timestamps decide), so its summary counts
//!   events written, not cells changed.
//! - It runs at the store's speed: partitions and, inside each, vehicles run concurrently in lanes
//!   ([`crate::lanes`]), each vehicle's events in offset order, at most `processor.concurrency` at a
//!   time; `max_rate` caps it so it can run beside live traffic. Offsets are committed per batch,
//!   after every record of the batch is done.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use shared::clock::EpochMillis;
use shared::config::Settings;
use shared::event::{Event, EventKind};
use tokio_util::sync::CancellationToken;

use crate::effects::{self, Context};
use crate::store::{Store, StoreError, StoredClaim};

/// Where a replay starts or stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bound {
    /// The first record at or after this time (broker timestamps).
    Time(EpochMillis),
    /// Explicit `partition:offset` positions; partitions not listed use the topic's start or end.
    Offsets(BTreeMap<i32, i64>),
}

/// Why a bound could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is neither an RFC 3339 time nor a partition:offset list (e.g. 0:120,1:98)")]
pub struct BoundError(String);

impl std::str::FromStr for Bound {
    type Err = BoundError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(t) = EpochMillis::parse_str(s).filter(|_| s.contains('T') || s.contains('-')) {
            return Ok(Self::Time(t));
        }
        let mut map = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (p, o) = part
                .split_once(':')
                .ok_or_else(|| BoundError(s.to_string()))?;
            let p: i32 = p.parse().map_err(|_| BoundError(s.to_string()))?;
            let o: i64 = o.parse().map_err(|_| BoundError(s.to_string()))?;
            if p < 0 || o < 0 {
                return Err(BoundError(s.to_string()));
            }
            map.insert(p, o);
        }
        if map.is_empty() {
            return Err(BoundError(s.to_string()));
        }
        Ok(Self::Offsets(map))
    }
}

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    pub from: Bound,
    /// Exclusive end; default: the end of each partition when the replay starts.
    pub to: Option<Bound>,
    pub vehicle: Option<String>,
    pub dry_run: bool,
    /// Consumer group holding the replay's progress; default derived from the range, so the same
    /// command resumes.
    pub group: Option<String>,
    /// Stop after this many records (resume later by running the same command).
    pub max_records: Option<u64>,
    /// At most this many records per second (so a replay leaves the store room for live traffic).
    pub max_rate: Option<u32>,
    /// After writing, ask the live processors to record the corrected state of every vehicle the
    /// replay wrote in the state changelog: one refresh control record per vehicle on the events
    /// topic, applied in order with the vehicle's events (see `Changelog::refresh`).
    pub emit_changes: bool,
}

/// The end-of-run summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub read: u64,
    /// Events written (a dry run: events that would change at least one stored cell).
    pub applied: u64,
    /// Dry run only: events whose every cell is already as fresh or fresher.
    pub unchanged: u64,
    /// Other vehicles, VERIFY, unknown types, carhook control records, and copies that do not own
    /// their event's claim.
    pub skipped: u64,
    /// Poison records (dead-lettered by live processing; not re-sent).
    pub dead_lettered: u64,
    /// Dry run only: signal cells that would lose to a fresher stored value.
    pub stale_cells: u64,
    /// `--emit-changes`: vehicles whose state refresh was requested from the live processors.
    pub refresh_requested: u64,
    pub group: String,
    pub complete: bool,
}

/// Replay failures an operator must act on.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} has no partitions (does it exist?)")]
    NoTopic(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("requesting state refreshes on {topic}: {source}")]
    Refresh {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
}

impl Bound {
    /// A canonical text form (for the default group name): fixed across builds and versions.
    fn canonical(&self) -> String {
        match self {
            Self::Time(t) => format!("t{}", t.as_i64()),
            Self::Offsets(map) => map
                .iter()
                .map(|(p, o)| format!("{p}:{o}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// The default replay group: derived from the range and vehicle with a fixed hash (FNV-1a), so the
/// same command resumes the same group whichever build of the processor runs it.
fn default_group(base: &str, req: &ReplayRequest) -> String {
    let key = format!(
        "from={}|to={}|vehicle={}",
        req.from.canonical(),
        req.to.as_ref().map(Bound::canonical).unwrap_or_default(),
        req.vehicle.as_deref().unwrap_or_default()
    );
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{base}-replay-{:012x}", h & 0xffff_ffff_ffff)
}

/// Resolves a bound to one offset per partition.
fn resolve(
    consumer: &StreamConsumer,
    topic: &str,
    partitions: &[i32],
    bound: &Bound,
    default_end: bool,
) -> Result<HashMap<i32, i64>, ReplayError> {
    let mut out = HashMap::new();
    match bound {
        Bound::Offsets(map) => {
            for &p in partitions {
                let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
                let o = map
                    .get(&p)
                    .copied()
                    .unwrap_or(if default_end { high } else { low });
                out.insert(p, o.clamp(low, high));
            }
        }
        Bound::Time(t) => {
            let mut tpl = TopicPartitionList::new();
            for &p in partitions {
                tpl.add_partition_offset(topic, p, Offset::Offset(t.as_i64()))?;
            }
            let found = consumer.offsets_for_times(tpl, Duration::from_secs(10))?;
            for e in found.elements() {
                let (_, high) =
                    consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(10))?;
                let o = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => high,
                };
                out.insert(e.partition(), o);
            }
        }
    }
    Ok(out)
}

/// Runs a replay until the range is done, `max_records` is reached or `shutdown` fires.
pub async fn replay(
    settings: &Settings,
    store: &Store,
    req: &ReplayRequest,
    shutdown: CancellationToken,
) -> Result<Summary, ReplayError> {
    let topic = settings.kafka.events_topic.clone();
    let group = req
        .group
        .clone()
        .unwrap_or_else(|| default_group(&settings.kafka.consumer_group, req));
    let consumer: StreamConsumer = crate::consumer::bound_prefetch(
        shared::kafka::base_config(&settings.kafka)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed"),
    )
    .create()?;
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .map(|p| p.id())
        .collect();
    if partitions.is_empty() {
        return Err(ReplayError::NoTopic(topic));
    }
    let start = resolve(&consumer, &topic, &partitions, &req.from, false)?;
    let end = match &req.to {
        Some(b) => resolve(&consumer, &topic, &partitions, b, true)?,
        None => resolve(
            &consumer,
            &topic,
            &partitions,
            &Bound::Offsets(BTreeMap::new()),
            true,
        )?,
    };
    // Resume: a committed position of this group inside the range wins over the start.
    let mut committed = TopicPartitionList::new();
    for &p in &partitions {
        committed.add_partition(&topic, p);
    }
    let committed = consumer.committed_offsets(committed, Duration::from_secs(10))?;
    let mut assign = TopicPartitionList::new();
    let mut remaining: HashMap<i32, i64> = HashMap::new();
    for &p in &partitions {
        let s = start.get(&p).copied().unwrap_or(0);
        let e = end.get(&p).copied().unwrap_or(0);
        let resumed = committed
            .find_partition(&topic, p)
            .and_then(|el| match el.offset() {
                Offset::Offset(o) if o >= s => Some(o),
                _ => None,
            })
            .unwrap_or(s);
        if resumed < e {
            assign.add_partition_offset(&topic, p, Offset::Offset(resumed))?;
            remaining.insert(p, e);
        }
    }
    let total: u64 = partitions
        .iter()
        .map(|p| {
            let from = assign
                .find_partition(&topic, *p)
                .and_then(|el| el.offset().to_raw())
                .unwrap_or(0);
            u64::try_from(remaining.get(p).copied().unwrap_or(from) - from).unwrap_or(0)
        })
        .sum();
    let mut summary = Summary {
        group: group.clone(),
        ..Summary::default()
    };
    tracing::info!(group, total, dry_run = req.dry_run, "replay starting");
    if remaining.is_empty() {
        summary.complete = true;
        return Ok(summary);
    }
    consumer.assign(&assign)?;
    let progress = Progress::new(total);
    let consumer = Arc::new(consumer);
    let ctx = Context {
        received_at: EpochMillis::now(),
        delivered_at: EpochMillis::now(),
        logic_version: settings.processor.logic_version,
        rate_limit_backoff_secs: settings.processor.rate_limit_backoff_secs,
        max_skew_ms: i64::try_from(settings.processor.max_clock_skew_ms).unwrap_or(i64::MAX),
    };
    let concurrency = settings.processor.concurrency.max(1);
    let batch_max = settings.processor.batch_max.max(1);
    let pacer = req.max_rate.and_then(NonZeroU32::new).map(Pacer::new);
    // The next offset of each partition whose records before it are all replayed.
    let mut done_upto: BTreeMap<i32, i64> = BTreeMap::new();
    let mut touched: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    while !remaining.is_empty() && !shutdown.is_cancelled() {
        let budget = req
            .max_records
            .map_or(u64::MAX, |m| m.saturating_sub(summary.read));
        if budget == 0 {
            break;
        }
        let want = usize::try_from(budget).unwrap_or(usize::MAX).min(batch_max);
        let batch = tokio::select! {
            _ = shutdown.cancelled() => break,
            b = collect(&consumer, want) => b,
        };
        // A partition's range can end in offsets the application never receives: transaction
        // markers (the processor writes refresh requests to this topic inside its transactions)
        // and aborted records. Waiting for a record at `end - 1` would never finish; the
        // consumer's position, which librdkafka moves past them, says when the range is read.
        let mut ended = Vec::new();
        if let Ok(pos) = consumer.position() {
            for e in pos.elements_for_topic(&topic) {
                let p = e.partition();
                if let (Offset::Offset(at), Some(&end_p)) = (e.offset(), remaining.get(&p)) {
                    if at >= end_p {
                        ended.push((p, end_p));
                    }
                }
            }
        }
        let mut by_partition: BTreeMap<i32, Vec<OwnedMessage>> = BTreeMap::new();
        for msg in batch {
            let p = msg.partition();
            let Some(&end_p) = remaining.get(&p) else {
                continue;
            };
            if msg.offset() >= end_p {
                remaining.remove(&p);
                continue;
            }
            let lane = by_partition.entry(p).or_default();
            if lane.last().is_none_or(|last| msg.offset() > last.offset()) {
                lane.push(msg);
            }
        }
        for (p, _) in &ended {
            remaining.remove(p);
        }
        if by_partition.is_empty() {
            done_upto.extend(ended);
            continue;
        }
        let n: usize = by_partition.values().map(Vec::len).sum();
        if let Some(pacer) = &pacer {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = pacer.admit(n) => {}
            }
        }
        let mut next = TopicPartitionList::new();
        let mut batch_upto = Vec::new();
        let mut lanes = Vec::new();
        for (p, msgs) in by_partition {
            if let Some(last) = msgs.last() {
                next.add_partition_offset(&topic, p, Offset::Offset(last.offset() + 1))?;
                batch_upto.push((p, last.offset() + 1));
                if last.offset() + 1 >= remaining.get(&p).copied().unwrap_or(0) {
                    remaining.remove(&p);
                }
            }
            lanes.extend(crate::lanes::split(p, msgs, concurrency));
        }
        let results: Vec<Result<Vec<One>, ReplayError>> = stream::iter(lanes)
            .map(|lane| replay_lane(store, lane, req, ctx, &shutdown))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        for r in results {
            for o in r? {
                o.count(&mut summary);
                if let One::Applied { vehicles, .. } = o {
                    touched.extend(vehicles);
                }
            }
        }
        summary.read += n as u64;
        if shutdown.is_cancelled() {
            // A lane may have stopped early: commit nothing of this batch; it is replayed again.
            break;
        }
        done_upto.extend(batch_upto);
        done_upto.extend(ended);
        consumer.commit(&next, CommitMode::Async)?;
        progress.tick(&summary);
    }
    // Everything replayed, committed once more synchronously (the per-batch commits are async).
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &done_upto {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*o))?;
    }
    if tpl.count() > 0 {
        consumer.commit(&tpl, CommitMode::Sync)?;
    }
    summary.complete = remaining.is_empty() && !shutdown.is_cancelled();
    if req.emit_changes && !req.dry_run {
        summary.refresh_requested = request_refresh(settings, &group, &touched).await?;
    }
    progress.finish(&summary);
    Ok(summary)
}

/// Produces one refresh control record per vehicle to the events topic, keyed by the vehicle (so
/// it lands in the vehicle's partition, behind its events); returns how many were acknowledged.
async fn request_refresh(
    settings: &Settings,
    group: &str,
    vehicles: &std::collections::BTreeSet<String>,
) -> Result<u64, ReplayError> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let topic = &settings.kafka.events_topic;
    let failed = |source| ReplayError::Refresh {
        topic: topic.clone(),
        source,
    };
    let producer: FutureProducer = shared::kafka::producer_config(&settings.kafka)
        .create()
        .map_err(failed)?;
    let sends = vehicles.iter().map(|v| {
        let body = serde_json::json!({ "vehicleId": v, "requestedBy": "replay", "group": group })
            .to_string();
        let producer = &producer;
        async move {
            let headers = OwnedHeaders::new().insert(Header {
                key: shared::headers::CONTROL,
                value: Some(shared::headers::CONTROL_REFRESH_STATE),
            });
            producer
                .send(
                    FutureRecord::to(topic)
                        .key(v.as_str())
                        .payload(&body)
                        .headers(headers),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
        }
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(failed)?;
    }
    tracing::info!(
        vehicles = vehicles.len(),
        "state refresh requested for the vehicles the replay wrote"
    );
    Ok(vehicles.len() as u64)
}

/// `--max-rate`: admits records at most `rate` per second (governor's GCRA, bursts of up to one
/// second's worth), so a replay beside live traffic takes a bounded share of the store.
struct Pacer {
    limiter: governor::DefaultDirectRateLimiter,
    burst: NonZeroU32,
}

impl Pacer {
    fn new(rate: NonZeroU32) -> Self {
        Self {
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
            burst: rate,
        }
    }

    /// Waits until `n` more records fit the rate.
    async fn admit(&self, n: usize) {
        let mut left = u32::try_from(n).unwrap_or(u32::MAX);
        while let Some(k) = NonZeroU32::new(left.min(self.burst.get())) {
            // `k` never exceeds the burst, the only case in which this is refused.
            if self.limiter.until_n_ready(k).await.is_err() {
                return;
            }
            left -= k.get();
        }
    }
}

/// Up to `want` records or about 4 MB of payload: waits up to 5 s for the first, then takes what
/// arrives within 20 ms.
async fn collect(consumer: &StreamConsumer, want: usize) -> Vec<OwnedMessage> {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut wait = Duration::from_secs(5);
    while out.len() < want && bytes < 4 << 20 {
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                bytes += m.payload().map_or(0, <[u8]>::len);
                out.push(m.detach());
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "replay consumer error");
                break;
            }
            Err(_) => break,
        }
        wait = Duration::from_millis(20);
    }
    out
}

/// One lane (one partition's records for a set of vehicles), record after record in offset order;
/// a transient store error is retried with back-off until it succeeds or `shutdown` fires.
///
/// The lane's records are parsed first, and each record's claim is read while the records before
/// it are written, up to [`CLAIM_LOOKAHEAD`] ahead: claims were decided by live processing long
/// before and a replay never writes them, so reading them early changes no result, and a lane no
/// longer waits for a read before each write. The writes stay in offset order.
async fn replay_lane(
    store: &Store,
    lane: crate::lanes::Lane,
    req: &ReplayRequest,
    ctx: Context,
    shutdown: &CancellationToken,
) -> Result<Vec<One>, ReplayError> {
    let parsed: Vec<Parsed> = lane.records.iter().map(|m| parse(m, req)).collect();
    let mut claims = stream::iter(&parsed)
        .map(|p| async move {
            match p {
                // A failed read is simply read again, with retries, when the record is applied.
                Parsed::Event(e) => store
                    .read_decided_claim(e.envelope.event_id.as_str())
                    .await
                    .ok(),
                Parsed::Done(_) => None,
            }
        })
        .buffered(CLAIM_LOOKAHEAD);
    let mut out = Vec::with_capacity(lane.records.len());
    for (msg, parsed) in lane.records.iter().zip(&parsed) {
        let mut claim = claims.next().await.flatten();
        let event = match parsed {
            Parsed::Done(o) => {
                out.push(o.clone());
                continue;
            }
            Parsed::Event(e) => e,
        };
        let ctx = Context {
            received_at: received_at(msg).unwrap_or(ctx.received_at),
            ..ctx
        };
        let mut wait = Duration::from_millis(200);
        loop {
            match replay_one(store, msg, event, claim.take(), req, ctx).await {
                Ok(o) => {
                    out.push(o);
                    break;
                }
                Err(e) if e.is_transient() && !shutdown.is_cancelled() => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "replay store error; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(out),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(out)
}

/// How many claims a replay lane reads ahead of its writes.
const CLAIM_LOOKAHEAD: usize = 4;

/// When the receiver accepted the record: its header, else the record's own timestamp (never the
/// replay's clock, which would reorder every fallback write).
fn received_at(msg: &OwnedMessage) -> Option<EpochMillis> {
    crate::dead_letter::header_str(msg, shared::headers::RECEIVED_AT)
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(EpochMillis::new)
        .or_else(|| msg.timestamp().to_millis().and_then(EpochMillis::new))
}

#[derive(Clone)]
enum One {
    /// Written (or, in a dry run, would change), for these vehicles.
    Applied {
        stale: u64,
        vehicles: Vec<String>,
    },
    Unchanged {
        stale: u64,
    },
    Skipped,
    Poison,
}

impl One {
    fn count(&self, s: &mut Summary) {
        match self {
            Self::Applied { stale, .. } => {
                s.applied += 1;
                s.stale_cells += stale;
            }
            Self::Unchanged { stale } => {
                s.unchanged += 1;
                s.stale_cells += stale;
            }
            Self::Skipped => s.skipped += 1,
            Self::Poison => s.dead_lettered += 1,
        }
    }
}

/// A record read for replay: an event to apply, or already an outcome.
enum Parsed {
    Event(Box<Event>),
    Done(One),
}

fn parse(msg: &OwnedMessage, req: &ReplayRequest) -> Parsed {
    if crate::dead_letter::header_str(msg, shared::headers::CONTROL).is_some() {
        // A carhook control record (e.g. a state refresh a previous replay requested): no event.
        return Parsed::Done(One::Skipped);
    }
    let Ok(event) = Event::parse(msg.payload().unwrap_or_default()) else {
        return Parsed::Done(One::Poison);
    };
    if !matches!(
        event.kind,
        EventKind::VehicleState { .. } | EventKind::VehicleError { .. } | EventKind::Legacy(_)
    ) {
        return Parsed::Done(One::Skipped);
    }
    if let Some(v) = &req.vehicle {
        let concerns = match &event.kind {
            EventKind::Legacy(l) => l.vehicles.iter().any(|x| x.vehicle.as_str() == v.as_str()),
            _ => event.envelope.vehicle_id.as_ref().map(|x| x.as_str()) == Some(v.as_str()),
        };
        if !concerns {
            return Parsed::Done(One::Skipped);
        }
    }
    Parsed::Event(Box::new(event))
}

/// Applies one parsed event; `claim` is its claim if already read.
async fn replay_one(
    store: &Store,
    msg: &OwnedMessage,
    event: &Event,
    claim: Option<Option<StoredClaim>>,
    req: &ReplayRequest,
    ctx: Context,
) -> Result<One, StoreError> {
    let (own_delivery, _) = effects::delivery_time(
        event.envelope.delivered_at,
        ctx.received_at,
        ctx.max_skew_ms,
    );
    let claim = match claim {
        Some(c) => c,
        None => {
            store
                .read_decided_claim(event.envelope.event_id.as_str())
                .await?
        }
    };
    let delivered_at = match claim {
        Some(c)
            if c.owner.topic == msg.topic()
                && c.owner.partition == msg.partition()
                && c.owner.offset == msg.offset() =>
        {
            c.delivered_at.unwrap_or(own_delivery)
        }
        // Another record owns the event: live processing dropped this copy as a duplicate.
        Some(_) => return Ok(One::Skipped),
        None => own_delivery,
    };
    let ctx = Context {
        delivered_at,
        ..ctx
    };
    let mut newer = 0;
    let mut stale = 0;
    let mut vehicles = Vec::new();
    for plan in effects::plans(event, ctx) {
        if let Some(v) = &req.vehicle {
            if plan.vehicle.as_ref().map(|x| x.as_str()) != Some(v.as_str()) {
                continue;
            }
        }
        if req.dry_run {
            let (n, st) = store.compare(&plan).await?;
            newer += n;
            stale += st;
        } else {
            // No read before writing: the write timestamps keep fresher stored values.
            store.apply(&plan).await?;
            newer += 1;
            vehicles.extend(plan.vehicle.as_ref().map(|v| v.as_str().to_owned()));
        }
    }
    Ok(if newer > 0 {
        One::Applied { stale, vehicles }
    } else {
        One::Unchanged { stale }
    })
}

/// A progress bar on a terminal, periodic log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{spinner} replay [{bar:40}] {pos}/{len} {per_sec} eta {eta} {msg}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b
        });
        Self {
            bar,
            started: Instant::now(),
            last_log: std::sync::Mutex::new(Instant::now()),
            total,
        }
    }

    fn tick(&self, s: &Summary) {
        if let Some(b) = &self.bar {
            b.set_position(s.read);
            b.set_message(format!("applied {} unchanged {}", s.applied, s.unchanged));
            return;
        }
        let Ok(mut last) = self.last_log.lock() else {
            return;
        };
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            let rate = s.read as f64 / self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                read = s.read,
                total = self.total,
                applied = s.applied,
                unchanged = s.unchanged,
                rate_per_sec = rate,
                "replay progress"
            );
        }
    }

    fn finish(&self, s: &Summary) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        tracing::info!(
            read = s.read,
            applied = s.applied,
            unchanged = s.unchanged,
            skipped = s.skipped,
            dead_lettered = s.dead_lettered,
            rate_per_sec = s.read as f64 / secs,
            complete = s.complete,
            "replay finished"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn max_rate_admits_a_second_of_records_at_once_and_the_rest_at_the_rate() {
        // 50/s: the first 50 records at once (the burst), 100 more take about 2 s.
        let pacer = Pacer::new(NonZeroU32::new(50).expect("non-zero"));
        let started = Instant::now();
        pacer.admit(50).await;
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "the burst waits"
        );
        pacer.admit(100).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
            "150 records at 50/s took {took:?}"
        );
    }

    #[test]
    fn default_group_is_fixed_across_builds() {
        let req = ReplayRequest {
            from: Bound::Offsets(BTreeMap::from([(0, 120), (1, 98)])),
            to: EpochMillis::new(1_761_896_351_000).map(Bound::Time),
            vehicle: Some("car-1".into()),
            dry_run: false,
            group: None,
            max_records: None,
            max_rate: None,
            emit_changes: false,
        };
        // Pinned: FNV-1a of "from=0:120,1:98|to=t1761896351000|vehicle=car-1". A change here
        // silently restarts every interrupted replay from its start.
        assert_eq!(
            default_group("carhook", &req),
            "carhook-replay-a6db86003063"
        );
        let other = ReplayRequest {
            vehicle: None,
            ..req.clone()
        };
        assert_ne!(
            default_group("carhook", &other),
            default_group("carhook", &req)
        );
    }

    #[test]
    fn bounds_parse_times_and_offset_lists() {
        assert_eq!(
            "2025-10-31T07:39:11Z".parse::<Bound>().ok(),
            EpochMillis::new(1_761_896_351_000).map(Bound::Time)
        );
        let offs: Bound = "0:10, 2:30"
            .parse()
            .unwrap_or(Bound::Offsets(BTreeMap::new()));
        assert_eq!(offs, Bound::Offsets(BTreeMap::from([(0, 10), (2, 30)])));
        assert!("yesterday".parse::<Bound>().is_err());
        assert!("0:-1".parse::<Bound>().is_err());
    }
}
