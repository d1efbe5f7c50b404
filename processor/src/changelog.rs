//! The vehicle-state changelog: decides, without reading the store per event, whether an event
//! changed a vehicle's state document, and produces the record that says so.
//!
//! A vehicle's events all go to one partition and run in one lane, one after the other, so the
//! owner of a partition can keep a [`View`] of each of its vehicles. An event's plan is applied to
//! the view after the store write; when the rendered document differs from the last one the
//! changelog holds, a [`Change`] goes into the same Kafka transaction as the event's offset.
//!
//! Where a view comes from matters for exactly-once. The store can be *ahead* of the changelog: a
//! previous owner (killed, or losing the partition in a rebalance) may have written the effects of
//! records whose transaction never committed; they are processed again, and their change records
//! must be produced then. So a view is the state *as of the committed changelog*, never simply the
//! stored cells:
//! - on the first touch of a partition after assignment, its changelog partition is read to its
//!   end (read_committed: only committed records): the offset of each vehicle's last record, and
//!   the record itself for the most recent ones, as many as the cache holds (the pattern Kafka
//!   Streams uses to restore a state store from its changelog); partitions restoring at the same
//!   time share that budget. Changelog partition p holds the vehicles of events partition p (same
//!   count, same key, same partitioner);
//! - a vehicle whose last record was not kept is read back from the changelog at that record's
//!   offset (a compacted topic keeps every key's last record);
//! - a vehicle with no record yet is read from the store, without the cells written by records of
//!   this partition at or past the offset the partition started from at assignment (the writer is
//!   found through the claim of the event id each cell names): those records are processed again;
//! - records processed but then not committed by this instance (past a failed record, in an aborted
//!   transaction) are undone in memory ([`Changelog::undo`]) before they are processed again;
//! - a revoked partition's views are dropped; the next owner restores them.
//!
//! Memory is bounded by `processor.changelog_cache_bytes`, estimated per view from its document
//! and cells ([`weight`]). Past it, the least recently used views are dropped, but only views that
//! equal their vehicle's last *committed* record: every record that touched the view is committed,
//! and so is the change record it produced, whose offset is then known. Such a view is rebuilt
//! from that record. A view's cell times can be ahead of its last record's (a write that won
//! without changing the document, such as an error resolved again): those times are kept with the
//! offset, so a rebuilt view settles later out-of-order writes exactly as the dropped one would
//! have. A view that cannot be dropped yet stays, past the budget if it must: at most the views
//! of the records not yet committed. What is always kept per vehicle of an owned partition: its
//! key and its last record's offset.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use shared::config::KafkaSettings;
use shared::headers;
use tokio::sync::OnceCell;

use crate::effects::Plan;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError, StoredCell};
use crate::view::{self, View};

/// How long restoring one changelog partition may take before the record is retried.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long reading one record back from the changelog may take before the record is retried.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Consumers reading records back at once (each reads one record at a time).
const FETCHERS: usize = 4;

/// One changelog record to produce: the vehicle's whole document after the event.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub vehicle: String,
    /// The event that made the change, and its type (record headers).
    pub event_id: String,
    pub event_type: String,
    /// The state document (JSON).
    pub document: String,
    /// Signal codes (and `error:<key>`) whose part of the document changed.
    pub changed: Vec<String>,
    /// Cell times the document was rendered from (JSON, see [`View::cell_times_text`]).
    pub cell_times: String,
}

/// A change record the broker acknowledged in a transaction: where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The events partition of the record that made the change (whose views hold the vehicle).
    pub events_partition: i32,
    pub vehicle: String,
    /// The changelog partition and offset the record was written to.
    pub partition: i32,
    pub offset: i64,
}

/// What applying a plan meant for the changelog.
#[derive(Debug)]
pub enum Observed {
    /// The plan concerns no vehicle.
    Nothing,
    /// The vehicle's view took the plan: its change record, if the document changed, and how to
    /// undo it.
    Viewed {
        change: Option<Box<Change>>,
        undo: Box<Undo>,
    },
    /// The vehicle belongs to another partition: ask its owner to refresh it (a control record on
    /// the events topic, keyed by the vehicle, in the same transaction).
    RefreshElsewhere(String),
}

/// The record a plan comes from: its event, where it sits, and its key.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub event_id: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
}

/// Whose view a plan concerns.
enum Whose<'p> {
    /// The plan concerns no vehicle.
    Nobody,
    /// The record's partition owns the vehicle: the record is keyed by it.
    Here(&'p str),
    /// A legacy body listing several vehicles is keyed by one of them: the others belong to other
    /// partitions (and possibly other owners), whose views must learn of this write. Their owner
    /// is asked to refresh them, in order with their own events.
    Elsewhere(&'p str),
}

fn whose<'p>(source: Source<'_>, plan: &'p Plan) -> Whose<'p> {
    match plan.vehicle.as_ref().map(|v| v.as_str()) {
        None => Whose::Nobody,
        Some(v) if source.key == Some(v.as_bytes()) => Whose::Here(v),
        Some(v) => Whose::Elsewhere(v),
    }
}

/// How to take back what a record did to a view, if the record is processed again.
#[derive(Debug, Clone)]
pub struct Undo {
    partition: i32,
    offset: i64,
    vehicle: String,
    what: Taken,
}

impl Undo {
    /// An undo of the cells `applied` replaced in `vehicle`'s view, for the crate's tests.
    #[cfg(test)]
    pub(crate) fn of_cells(vehicle: &str, applied: view::Applied) -> Self {
        Self {
            partition: 0,
            offset: 0,
            vehicle: vehicle.to_owned(),
            what: Taken::Cells {
                applied,
                recorded: true,
                ahead: false,
            },
        }
    }

    /// About the memory it holds until its record commits (the cells or the entry it replaced).
    pub fn held_bytes(&self) -> usize {
        match &self.what {
            Taken::Cells { applied, .. } => applied.held_bytes(),
            Taken::Entry(entry) => entry.weight,
        }
    }
}

/// What a record did to a vehicle's entry.
#[derive(Debug, Clone)]
enum Taken {
    /// An event's plan: the cells it replaced, and the entry's flags before it.
    Cells {
        applied: view::Applied,
        recorded: bool,
        ahead: bool,
    },
    /// A refresh replaced the whole entry (rare: replays and legacy multi-vehicle bodies).
    Entry(Box<Entry>),
}

/// A vehicle's view in memory.
#[derive(Debug, Clone)]
struct Entry {
    view: View,
    /// The changelog holds a record of it (committed, or in a transaction of this instance): the
    /// last record's document is the view's rendering.
    recorded: bool,
    /// Some cell time is ahead of the last record's: a write won without changing the document.
    ahead: bool,
    /// Highest offset of a record of the partition that changed this entry (`i64::MIN`: none since
    /// it was loaded). The entry can be dropped once it is committed.
    touched: i64,
    /// What it counts against the cache: about the memory it takes ([`weight`]).
    weight: usize,
    /// Its place in the least-recently-used order.
    tick: u64,
}

/// A view's share of the cache for a document of `document_bytes`: its parts hold about the
/// document's bytes, plus per cell the structure around them and per view a fixed part. Measured
/// with mimalloc (the RSS 1,000 bench-shaped views added, see `bench/latest.md`, session 13): 85 MB
/// for 56 MB of documents and 500 cells each at 50 KB, 46 MB for 21 MB of documents and 38 cells
/// each for 5,000 vehicles at 4 KB; this formula gives 88 and 42 MB.
fn weight(view: &View, document_bytes: usize) -> usize {
    const VIEW_BYTES: usize = 2048;
    const CELL_BYTES: usize = 64;
    VIEW_BYTES + document_bytes + CELL_BYTES * view.cells()
}

impl Entry {
    /// An entry for `view`, whose document takes `document_bytes`.
    fn new(view: View, recorded: bool, ahead: bool, document_bytes: usize) -> Self {
        let weight = weight(&view, document_bytes);
        Self {
            view,
            recorded,
            ahead,
            touched: i64::MIN,
            weight,
            tick: 0,
        }
    }
}

/// Where a vehicle's last committed changelog record is.
#[derive(Debug, Clone)]
struct LastRecord {
    partition: i32,
    offset: i64,
    /// The dropped view's cell times, when they were ahead of the record's.
    times: Option<Arc<str>>,
    /// The times above are known to be the view's: the record was written here, or its view
    /// dropped here. A record found at restore may be behind the store (see [`View::adopt`]).
    exact: bool,
}

/// A record read at restore and kept: (document, cell times).
type Kept = (Vec<u8>, Vec<u8>);

/// The views of one owned partition.
struct PartitionViews {
    /// First offset processed since assignment: records at or past it may have been written to
    /// the store by a previous owner without their change records being committed.
    start_offset: i64,
    restored: Arc<OnceCell<()>>,
    /// Records below this offset are committed (before assignment, or by this instance since).
    committed: i64,
    /// Each recorded vehicle's last committed record.
    last: HashMap<String, LastRecord>,
    /// Records read at restore and kept, turned into a view on first touch.
    kept: HashMap<String, Kept>,
    vehicles: HashMap<String, Entry>,
}

/// Every owned partition's views, and the cache's accounting across them.
#[derive(Default)]
struct Views {
    partitions: HashMap<i32, PartitionViews>,
    /// Views by last use, least recent first.
    order: BTreeMap<u64, (i32, String)>,
    tick: u64,
    /// Weights of the views and kept records in memory.
    bytes: usize,
}

fn kept_weight(k: &Kept) -> usize {
    k.0.len() + k.1.len()
}

impl Views {
    /// Puts `entry` as the most recently used view of `vehicle` (nothing if the partition is no
    /// longer owned).
    fn put(&mut self, partition: i32, vehicle: &str, mut entry: Entry) {
        let Some(pv) = self.partitions.get_mut(&partition) else {
            return;
        };
        self.tick += 1;
        entry.tick = self.tick;
        self.bytes += entry.weight;
        self.order
            .insert(entry.tick, (partition, vehicle.to_owned()));
        if let Some(old) = pv.vehicles.insert(vehicle.to_owned(), entry) {
            self.bytes -= old.weight;
            self.order.remove(&old.tick);
        }
    }

    fn take(&mut self, partition: i32, vehicle: &str) -> Option<Entry> {
        let e = self
            .partitions
            .get_mut(&partition)?
            .vehicles
            .remove(vehicle)?;
        self.bytes -= e.weight;
        self.order.remove(&e.tick);
        Some(e)
    }

    fn take_kept(&mut self, partition: i32, vehicle: &str) -> Option<Kept> {
        let k = self.partitions.get_mut(&partition)?.kept.remove(vehicle)?;
        self.bytes -= kept_weight(&k);
        Some(k)
    }

    fn drop_partition(&mut self, partition: i32) {
        if let Some(pv) = self.partitions.remove(&partition) {
            for e in pv.vehicles.values() {
                self.bytes -= e.weight;
                self.order.remove(&e.tick);
            }
            self.bytes -= pv.kept.values().map(kept_weight).sum::<usize>();
        }
    }

    /// While over `budget`: drops the least recently used views that equal their vehicle's last
    /// committed record (see the module comment), then records kept from restores.
    fn evict(&mut self, budget: usize) {
        if self.bytes <= budget {
            return;
        }
        let mut over = self.bytes - budget;
        let mut victims = Vec::new();
        for (p, v) in self.order.values() {
            let Some(pv) = self.partitions.get(p) else {
                continue;
            };
            let Some(e) = pv.vehicles.get(v) else {
                continue;
            };
            if e.recorded && e.touched < pv.committed && pv.last.contains_key(v) {
                victims.push((*p, v.clone()));
                over = over.saturating_sub(e.weight.max(1));
                if over == 0 {
                    break;
                }
            }
        }
        for (p, v) in victims {
            if let Some(e) = self.take(p, &v) {
                let times = e.ahead.then(|| Arc::from(e.view.cell_times_text()));
                if let Some(last) = self
                    .partitions
                    .get_mut(&p)
                    .and_then(|pv| pv.last.get_mut(&v))
                {
                    last.times = times;
                    last.exact = true;
                }
            }
        }
        if self.bytes > budget {
            for pv in self.partitions.values_mut() {
                let drop: Vec<String> = pv.kept.keys().cloned().collect();
                for v in drop {
                    if self.bytes <= budget {
                        return;
                    }
                    if let Some(k) = pv.kept.remove(&v) {
                        self.bytes -= kept_weight(&k);
                    }
                }
            }
        }
    }
}

/// The owner's views of its vehicles.
pub struct Changelog {
    kafka: KafkaSettings,
    /// `processor.changelog_cache_bytes`.
    budget: usize,
    views: Mutex<Views>,
    /// Bytes of records kept by the restores in progress, all partitions together: they share the
    /// budget, so a rebalance that assigns many partitions at once does not hold a budget per
    /// partition while they restore.
    restoring: Arc<AtomicUsize>,
    /// Read records back from the changelog, each one record at a time ([`FETCHERS`]).
    fetchers: Arc<[Mutex<Option<BaseConsumer<RestoreContext>>>]>,
    metrics: Metrics,
}

fn transient(message: impl std::fmt::Display) -> StoreError {
    StoreError::Transient {
        op: "state changelog",
        message: message.to_string(),
    }
}

/// Where a vehicle's view comes from when it is not in memory.
enum Origin {
    /// Its last record, read at restore.
    Kept(Kept),
    /// Its last record, to read back from the changelog.
    Record(LastRecord),
    /// No record: the store.
    Store,
}

impl Changelog {
    /// Views for the events topic and state topic of `kafka`, holding at most about
    /// `cache_bytes` of documents.
    pub fn new(kafka: KafkaSettings, cache_bytes: u64, metrics: Metrics) -> Self {
        Self {
            kafka,
            budget: usize::try_from(cache_bytes).unwrap_or(usize::MAX),
            views: Mutex::new(Views::default()),
            restoring: Arc::new(AtomicUsize::new(0)),
            fetchers: (0..FETCHERS).map(|_| Mutex::new(None)).collect(),
            metrics,
        }
    }

    /// Puts `entry` back as `vehicle`'s most recently used view, then keeps the cache within its
    /// budget.
    fn put(&self, partition: i32, vehicle: &str, entry: Entry) -> Result<(), StoreError> {
        let mut views = self.lock()?;
        views.put(partition, vehicle, entry);
        views.evict(self.budget);
        self.report(&views);
        Ok(())
    }

    /// Publishes the cache's size.
    fn report(&self, views: &Views) {
        self.metrics
            .changelog_cache_bytes
            .set(i64::try_from(views.bytes).unwrap_or(i64::MAX));
    }

    fn loaded(&self, from: &str) {
        self.metrics
            .changelog_view_loads
            .get_or_create(&vec![("from", from.to_string())])
            .inc();
    }

    fn lock(&self) -> Result<MutexGuard<'_, Views>, StoreError> {
        self.views.lock().map_err(transient)
    }

    /// Called before a partition's records are processed: a partition seen for the first time
    /// since assignment starts at `first_offset`.
    pub fn begin(&self, partition: i32, first_offset: i64) {
        if let Ok(mut v) = self.views.lock() {
            v.partitions
                .entry(partition)
                .or_insert_with(|| PartitionViews {
                    start_offset: first_offset,
                    restored: Arc::new(OnceCell::new()),
                    committed: first_offset,
                    last: HashMap::new(),
                    kept: HashMap::new(),
                    vehicles: HashMap::new(),
                });
        }
    }

    /// Forgets every view (a new consumer joins the group: it starts from committed offsets).
    pub fn reset(&self) {
        if let Ok(mut v) = self.views.lock() {
            *v = Views::default();
            self.metrics.changelog_cache_bytes.set(0);
        }
    }

    /// Forgets revoked partitions: their next owner restores their views.
    pub fn drop_partitions(&self, partitions: &[i32]) {
        if let Ok(mut v) = self.views.lock() {
            for partition in partitions {
                v.drop_partition(*partition);
            }
            self.report(&v);
        }
    }

    /// After a transaction committed: the next offset of each partition it committed, and where
    /// its change records were written. Views those records made are now droppable.
    pub fn committed(&self, offsets: &BTreeMap<i32, i64>, written: Vec<Written>) {
        let Ok(mut v) = self.views.lock() else {
            return;
        };
        for w in written {
            if let Some(pv) = v.partitions.get_mut(&w.events_partition) {
                pv.last.insert(
                    w.vehicle,
                    LastRecord {
                        partition: w.partition,
                        offset: w.offset,
                        times: None,
                        exact: true,
                    },
                );
            }
        }
        for (p, next) in offsets {
            if let Some(pv) = v.partitions.get_mut(p) {
                pv.committed = pv.committed.max(*next);
            }
        }
        v.evict(self.budget);
        self.report(&v);
    }

    /// Takes back what records that will be processed again did to the views, latest first: each
    /// vehicle gets the view it had before the earliest of them. (A vehicle's records are processed
    /// in offset order, and every record past one processed again is processed again too.) Their
    /// views stay in memory until those records are committed.
    pub fn undo(&self, mut undos: Vec<Undo>) {
        undos.sort_by_key(|u| std::cmp::Reverse(u.offset));
        let Ok(mut views) = self.views.lock() else {
            return;
        };
        for u in undos {
            match u.what {
                Taken::Entry(prior) => views.put(u.partition, &u.vehicle, *prior),
                Taken::Cells {
                    applied,
                    recorded,
                    ahead,
                } => {
                    if let Some(mut e) = views.take(u.partition, &u.vehicle) {
                        e.view.undo(applied);
                        e.recorded = recorded;
                        e.ahead = ahead;
                        views.put(u.partition, &u.vehicle, e);
                    }
                }
            }
        }
    }

    /// Makes sure the view `plan`'s vehicle needs is in memory (restoring the partition, loading
    /// the vehicle), so [`Changelog::observe`] most likely does not wait for it. Runs while the
    /// plan is written: a load leaves out the cells of the event being processed
    /// (`source.event_id`) whether or not it sees them, so it may overlap the write.
    pub async fn prepare(
        &self,
        store: &Store,
        source: Source<'_>,
        plan: &Plan,
    ) -> Result<(), StoreError> {
        if let Whose::Here(vehicle) = whose(source, plan) {
            let mut entry = self.entry(store, source, vehicle).await?;
            // The record is about to change it: kept until it commits (or is taken back), so
            // [`Changelog::observe`] finds it.
            entry.touched = entry.touched.max(source.offset);
            self.put(source.partition, vehicle, entry)?;
        }
        Ok(())
    }

    /// After `plan` (of the record `source`) is durable in the store: applies it to the vehicle's
    /// view; returns the change record if the document changed, and how to undo it.
    pub async fn observe(
        &self,
        store: &Store,
        source: Source<'_>,
        plan: &Plan,
    ) -> Result<Observed, StoreError> {
        let vehicle = match whose(source, plan) {
            Whose::Nobody => return Ok(Observed::Nothing),
            Whose::Elsewhere(vehicle) => return Ok(Observed::RefreshElsewhere(vehicle.to_owned())),
            Whose::Here(vehicle) => vehicle,
        };
        let Source {
            partition, offset, ..
        } = source;
        let mut entry = self.entry(store, source, vehicle).await?;
        // The cells the plan wrote decide whether the document changed; it is rendered whole
        // only for a change record.
        let applied = entry.view.apply_tracked(plan);
        let (recorded, ahead) = (entry.recorded, entry.ahead);
        let change = (!recorded || !applied.changed.is_empty()).then(|| {
            Change {
                vehicle: vehicle.to_owned(),
                event_id: String::new(),
                event_type: String::new(),
                // A first record names everything it shows.
                changed: if recorded {
                    applied.changed.clone()
                } else {
                    entry.view.names()
                },
                document: entry.view.render_text(vehicle),
                cell_times: entry.view.cell_times_text(),
            }
        });
        match &change {
            Some(c) => {
                entry.ahead = false;
                entry.weight = weight(&entry.view, c.document.len());
            }
            None => entry.ahead |= applied.replaced_any(),
        }
        entry.recorded = true;
        entry.touched = entry.touched.max(offset);
        self.put(partition, vehicle, entry)?;
        Ok(Observed::Viewed {
            change: change.map(Box::new),
            undo: Box::new(Undo {
                partition,
                offset,
                vehicle: vehicle.to_owned(),
                what: Taken::Cells {
                    applied,
                    recorded,
                    ahead,
                },
            }),
        })
    }

    /// `vehicle`'s entry, taken out of the cache (to be put back), or loaded: the partition is
    /// restored first if it must be. The record's own cells are left out of a load from the store
    /// like those of every record at or past the partition's start, without reading its claim. A
    /// vehicle's records run one at a time, so no other record of it can load it meanwhile.
    async fn entry(
        &self,
        store: &Store,
        source: Source<'_>,
        vehicle: &str,
    ) -> Result<Entry, StoreError> {
        self.restore_partition(source.partition, source.offset)
            .await?;
        if let Some(e) = self.lock()?.take(source.partition, vehicle) {
            return Ok(e);
        }
        self.load(store, source.partition, vehicle, Some(source.event_id))
            .await
    }

    /// Restores `partition`'s record offsets (and the most recent records) from its changelog
    /// partition, once per assignment.
    async fn restore_partition(&self, partition: i32, offset: i64) -> Result<(), StoreError> {
        self.begin(partition, offset);
        let cell = self
            .lock()?
            .partitions
            .get(&partition)
            .map(|pv| Arc::clone(&pv.restored))
            .ok_or_else(|| transient(format!("partition {partition} has no views")))?;
        cell.get_or_try_init(|| async {
            let kafka = self.kafka.clone();
            let budget = self.budget;
            let restoring = Arc::clone(&self.restoring);
            let restored = tokio::task::spawn_blocking(move || {
                restore(&kafka, partition, Keeping::new(budget, &restoring))
            })
            .await
            .map_err(transient)?
            .map_err(transient)?;
            let mut views = self.lock()?;
            let mut added = 0;
            if let Some(pv) = views
                .partitions
                .get_mut(&partition)
                .filter(|pv| Arc::ptr_eq(&pv.restored, &cell))
            {
                for (vehicle, offset) in restored.last {
                    pv.last.insert(
                        vehicle,
                        LastRecord {
                            partition,
                            offset,
                            times: None,
                            exact: false,
                        },
                    );
                }
                added = restored.kept.values().map(kept_weight).sum();
                pv.kept = restored.kept;
            }
            views.bytes += added;
            views.evict(self.budget);
            Ok::<(), StoreError>(())
        })
        .await?;
        Ok(())
    }

    /// A refresh request (control record at `partition`/`offset`, keyed by `vehicle`): the
    /// vehicle's state is read from the store — written there by something other than this
    /// partition's events, e.g. a replay — and recorded if its document differs from the last
    /// record. Every earlier record of the vehicle in this partition is applied by now; cells of
    /// later ones a previous owner may have written are left out, as on first touch.
    pub async fn refresh(
        &self,
        store: &Store,
        partition: i32,
        offset: i64,
        vehicle: &str,
    ) -> Result<(Option<Change>, Option<Undo>), StoreError> {
        self.restore_partition(partition, offset).await?;
        let cached = self
            .lock()?
            .partitions
            .get(&partition)
            .and_then(|pv| pv.vehicles.get(vehicle))
            .cloned();
        let prior = match cached {
            Some(e) => e,
            None => self.load(store, partition, vehicle, None).await?,
        };
        let (view, _) = self
            .committed_cells(store, partition, offset, vehicle, None)
            .await?;
        if view.is_empty() && !prior.recorded {
            return Ok((None, None));
        }
        let before = if prior.recorded {
            prior.view.render(vehicle)
        } else {
            Value::Null
        };
        let document = view.render(vehicle);
        let text = document.to_string();
        let times = view.cell_times_text();
        let document_bytes = text.len();
        let change = (document != before).then(|| Change {
            vehicle: vehicle.to_owned(),
            event_id: String::new(),
            event_type: String::new(),
            changed: view::changed(&before, &document),
            document: text,
            cell_times: times,
        });
        // Without a change the store's cell times may still be ahead of the last record's.
        let mut entry = Entry::new(view, true, change.is_none(), document_bytes);
        entry.touched = offset;
        self.put(partition, vehicle, entry)?;
        Ok((
            change,
            Some(Undo {
                partition,
                offset,
                vehicle: vehicle.to_owned(),
                what: Taken::Entry(Box::new(prior)),
            }),
        ))
    }

    /// A vehicle's view when it is not in memory: its record kept at restore, else its last
    /// record read back from the changelog, else (no record) the store without the cells of
    /// records that will be processed again (`processing`: the event being processed, one of them).
    async fn load(
        &self,
        store: &Store,
        partition: i32,
        vehicle: &str,
        processing: Option<&str>,
    ) -> Result<Entry, StoreError> {
        let (origin, start) = {
            let mut views = self.lock()?;
            let kept = views.take_kept(partition, vehicle);
            let pv = views
                .partitions
                .get(&partition)
                .ok_or_else(|| transient(format!("partition {partition} has no views")))?;
            let origin = match (kept, pv.last.get(vehicle)) {
                (Some(k), _) => Origin::Kept(k),
                (None, Some(last)) => Origin::Record(last.clone()),
                (None, None) => Origin::Store,
            };
            (origin, pv.start_offset)
        };
        let from = match origin {
            Origin::Kept(_) => "restore",
            Origin::Record(_) => "changelog",
            Origin::Store => "store",
        };
        // (document, cell times, whether those are ahead of the record's, whether they are exact)
        let record = match origin {
            Origin::Store => None,
            Origin::Kept((doc, times)) => Some((doc, times, false, false)),
            Origin::Record(last) => {
                let (ahead, exact) = (last.times.is_some(), last.exact);
                self.fetch(last.partition, last.offset, vehicle).await?.map(
                    |(doc, record_times)| {
                        let times = last.times.map_or(record_times, |t| t.as_bytes().to_vec());
                        (doc, times, ahead, exact)
                    },
                )
            }
        };
        if let Some((doc, times, ahead, exact)) = record {
            match rebuild(vehicle, &doc, &times) {
                Ok(mut view) => {
                    let ahead = ahead
                        || (!exact
                            && self
                                .catch_up(store, partition, start, vehicle, processing, &mut view)
                                .await?);
                    self.loaded(from);
                    return Ok(Entry::new(view, true, ahead, doc.len()));
                }
                Err(e) => tracing::warn!(
                    vehicle,
                    partition,
                    error = %e,
                    "state changelog record unreadable; the vehicle's view is read from the store and its next change record carries its whole state"
                ),
            }
        }
        let (view, document_bytes) = self
            .committed_cells(store, partition, start, vehicle, processing)
            .await?;
        self.loaded("store");
        Ok(Entry::new(view, false, false, document_bytes))
    }

    /// The record at `offset` of changelog partition `partition`, `vehicle`'s last: (document,
    /// cell times), or None when it is not there (it is then treated as unreadable).
    async fn fetch(
        &self,
        partition: i32,
        offset: i64,
        vehicle: &str,
    ) -> Result<Option<Kept>, StoreError> {
        let kafka = self.kafka.clone();
        let fetchers = Arc::clone(&self.fetchers);
        let vehicle = vehicle.to_owned();
        tokio::task::spawn_blocking(move || {
            // A free one, else the partition's (each waits for its current read).
            let i = (0..fetchers.len())
                .find(|i| fetchers[*i].try_lock().is_ok())
                .unwrap_or(usize::try_from(partition).unwrap_or(0) % fetchers.len());
            let mut slot = fetchers[i].lock().map_err(|e| e.to_string())?;
            if slot.is_none() {
                *slot = Some(changelog_consumer(&kafka, false)?);
            }
            let consumer = slot.as_ref().ok_or("no fetch consumer")?;
            let started = Instant::now();
            let read = fetch_record(consumer, &kafka.state_topic, partition, offset, &vehicle);
            tracing::debug!(
                partition,
                offset,
                vehicle,
                duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                "vehicle view read back from the state changelog"
            );
            read
        })
        .await
        .map_err(transient)?
        .map_err(transient)
    }

    /// The vehicle's stored cells, less those written by records of `partition` at or past
    /// `start` (they are processed again, and their change records produced then; see
    /// [`Changelog::written_before`], `ahead` is the one being processed), and the bytes of their
    /// documents.
    async fn committed_cells(
        &self,
        store: &Store,
        partition: i32,
        start: i64,
        vehicle: &str,
        ahead: Option<&str>,
    ) -> Result<(View, usize), StoreError> {
        let cells = store.cells(vehicle).await?;
        let mut view = View::default();
        let mut document_bytes = 0;
        for c in &self
            .written_before(store, partition, start, cells, ahead)
            .await?
        {
            view.put(c);
            document_bytes += c.doc.len();
        }
        Ok((view, document_bytes))
    }

    /// A view rebuilt from a record found at restore can be behind the store without being
    /// wrong: a write that won without changing the document (an error resolved again) wrote no
    /// record. Such committed writes are taken from the store ([`View::adopt`]), so the view
    /// settles later out-of-order writes as the store does. Cells written by records at or past
    /// `start` are left out as in [`Changelog::committed_cells`]. Returns whether any was taken.
    async fn catch_up(
        &self,
        store: &Store,
        partition: i32,
        start: i64,
        vehicle: &str,
        processing: Option<&str>,
        view: &mut View,
    ) -> Result<bool, StoreError> {
        let cells: Vec<StoredCell> = store
            .cells(vehicle)
            .await?
            .into_iter()
            .filter(|c| view.is_behind(c))
            .collect();
        if cells.is_empty() {
            return Ok(false);
        }
        let mut took = false;
        for c in &self
            .written_before(store, partition, start, cells, processing)
            .await?
        {
            took |= view.adopt(c);
        }
        Ok(took)
    }

    /// `cells` less those written by a record of `partition` at or past `start` (found through
    /// the claim of the event id each names, read concurrently) or by `ahead`, an event known to
    /// be such a record, whose claim is not read.
    async fn written_before(
        &self,
        store: &Store,
        partition: i32,
        start: i64,
        mut cells: Vec<StoredCell>,
        ahead: Option<&str>,
    ) -> Result<Vec<StoredCell>, StoreError> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let mut writers: Vec<String> = cells
            .iter()
            .filter_map(|c| c.event_id.clone())
            .filter(|id| Some(id.as_str()) != ahead)
            .collect();
        writers.sort_unstable();
        writers.dedup();
        let events_topic = self.kafka.events_topic.as_str();
        let later: HashSet<String> = stream::iter(writers)
            .map(|id| async move {
                let claim = store.read_decided_claim(&id).await?;
                let is_later = claim.is_some_and(|c| {
                    c.owner.topic == events_topic
                        && c.owner.partition == partition
                        && c.owner.offset >= start
                });
                Ok::<_, StoreError>(is_later.then_some(id))
            })
            .buffer_unordered(CLAIM_READS)
            .try_filter_map(|id| std::future::ready(Ok(id)))
            .try_collect()
            .await?;
        cells.retain(|c| {
            c.event_id
                .as_deref()
                .is_none_or(|id| Some(id) != ahead && !later.contains(id))
        });
        Ok(cells)
    }
}

/// A view from a changelog record's document and cell times.
fn rebuild(vehicle: &str, doc: &[u8], times: &[u8]) -> Result<View, String> {
    let d = serde_json::from_slice::<Value>(doc).map_err(|e| e.to_string())?;
    let t = serde_json::from_slice::<Value>(times).map_err(|e| e.to_string())?;
    View::restore(vehicle, &d, &t).map_err(|e| e.to_string())
}

/// Claims read at once when a vehicle's view is loaded from the store.
const CLAIM_READS: usize = 8;

/// The restore consumer's context: reaching the end of the partition is how a restore finishes,
/// not an error worth a log line (librdkafka also reports it through the error callback).
struct RestoreContext;

impl rdkafka::ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode;
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::warn!(error = %error, "state changelog restore: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RestoreContext {}

/// What a restore found in a changelog partition.
#[derive(Debug, Default)]
struct Restored {
    /// Each vehicle's last record's offset.
    last: HashMap<String, i64>,
    /// The most recent of those records, as many as fit in the budget the restores in progress
    /// share.
    kept: HashMap<String, Kept>,
}

/// A read_committed consumer outside any group, reading the changelog by position: to its end
/// (`restore`, which stops at the end of the partition), or one record at a time (`fetch`, which
/// prefetches little past the record it wants).
fn changelog_consumer(
    kafka: &KafkaSettings,
    restore: bool,
) -> Result<BaseConsumer<RestoreContext>, String> {
    let mut config = shared::kafka::base_config(kafka);
    config
        .set("group.id", "carhook-state-restore")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // An empty fetch answer comes back at once instead of after the default 500 ms wait.
        .set("fetch.wait.max.ms", "10");
    if restore {
        config.set("enable.partition.eof", "true");
    } else {
        config
            .set("fetch.message.max.bytes", "65536")
            .set("queued.max.messages.kbytes", "1024")
            // A batch larger than the queue (records of large documents) must not hold the next
            // read back for librdkafka's default second.
            .set("fetch.queue.backoff.ms", "1");
    }
    config
        .create_with_context(RestoreContext)
        .map_err(|e| format!("{}: changelog consumer: {e}", kafka.state_topic))
}

/// Reads the record at `offset` of `topic`'s `partition`. A record that commits only just now
/// becomes readable when its transaction marker is written, so a read waits for it (up to
/// [`FETCH_TIMEOUT`]). None when the partition holds another record there, or none past it.
fn fetch_record(
    consumer: &BaseConsumer<RestoreContext>,
    topic: &str,
    partition: i32,
    offset: i64,
    vehicle: &str,
) -> Result<Option<Kept>, String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| format!("{topic}[{partition}]: assign: {e}"))?;
    let started = Instant::now();
    let found = loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.partition() != partition || m.offset() < offset => {}
            Some(Ok(m)) if m.offset() == offset && m.key() == Some(vehicle.as_bytes()) => {
                let times = cell_times(&m);
                break m.payload().map(|doc| (doc.to_vec(), times.to_vec()));
            }
            Some(Ok(m)) => {
                tracing::warn!(
                    topic,
                    partition,
                    offset,
                    vehicle,
                    found_offset = m.offset(),
                    "state changelog: the vehicle's last record is not where it was written"
                );
                break None;
            }
            Some(Err(e)) => return Err(format!("{topic}[{partition}]@{offset}: {e}")),
            None if started.elapsed() > FETCH_TIMEOUT => {
                return Err(format!(
                    "{topic}[{partition}]@{offset}: not readable within {FETCH_TIMEOUT:?}"
                ))
            }
            None => {}
        }
    };
    consumer
        .unassign()
        .map_err(|e| format!("{topic}[{partition}]: unassign: {e}"))?;
    Ok(found)
}

fn cell_times<'m>(m: &'m rdkafka::message::BorrowedMessage<'_>) -> &'m [u8] {
    m.headers()
        .and_then(|h| {
            h.iter()
                .find(|h| h.key == headers::CELL_TIMES)
                .and_then(|h| h.value)
        })
        .unwrap_or_default()
}

/// Reads changelog partition `partition` to its end (committed records only): each vehicle's last
/// record's offset, and the most recent records `keeping` has room for.
fn restore(
    kafka: &KafkaSettings,
    partition: i32,
    keeping: Keeping<'_>,
) -> Result<Restored, String> {
    let topic = &kafka.state_topic;
    let started = Instant::now();
    let consumer = changelog_consumer(kafka, true)?;
    // An empty partition (a new topic, or all of it deleted) has nothing to read.
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(|e| format!("{topic}[{partition}]: watermarks: {e}"))?;
    let (restored, read) = if high <= low {
        (Restored::default(), 0)
    } else {
        read_to_end(&consumer, topic, partition, keeping, started)?
    };
    tracing::info!(
        topic = topic.as_str(),
        partition,
        records = read,
        vehicles = restored.last.len(),
        kept = restored.kept.len(),
        duration_ms = started.elapsed().as_millis() as u64,
        "vehicle views restored from the state changelog"
    );
    Ok(restored)
}

/// What a restore keeps: each vehicle's last record's offset, and the most recent records, within
/// the budget that all restores in progress share.
struct Keeping<'a> {
    out: Restored,
    /// Kept records by offset, oldest first: the oldest go when the restores are over the budget.
    order: BTreeMap<i64, String>,
    budget: usize,
    /// Bytes all restores in progress keep ([`Changelog::restoring`]).
    all: &'a AtomicUsize,
    /// This restore's part of `all`, given back when it ends: its records then count in the cache.
    mine: usize,
}

impl<'a> Keeping<'a> {
    fn new(budget: usize, all: &'a AtomicUsize) -> Self {
        Self {
            out: Restored::default(),
            order: BTreeMap::new(),
            budget,
            all,
            mine: 0,
        }
    }

    fn hold(&mut self, bytes: usize) {
        self.mine += bytes;
        self.all.fetch_add(bytes, Ordering::Relaxed);
    }

    fn release(&mut self, bytes: usize) {
        self.mine -= bytes;
        self.all.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Record `offset` of `vehicle`: its document and cell times, or `None` for a tombstone (the
    /// vehicle has no record). Replaces the vehicle's earlier record, then drops this restore's
    /// oldest records while all restores together keep more than the budget.
    fn record(&mut self, vehicle: &str, offset: i64, record: Option<Kept>) {
        if let Some(prev) = self.out.last.remove(vehicle) {
            self.order.remove(&prev);
            if let Some(k) = self.out.kept.remove(vehicle) {
                self.release(kept_weight(&k));
            }
        }
        let Some(k) = record else {
            return;
        };
        self.out.last.insert(vehicle.to_owned(), offset);
        self.hold(kept_weight(&k));
        self.out.kept.insert(vehicle.to_owned(), k);
        self.order.insert(offset, vehicle.to_owned());
        while self.all.load(Ordering::Relaxed) > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(k) = self.out.kept.remove(&oldest) {
                self.release(kept_weight(&k));
            }
        }
    }

    fn finish(mut self) -> Restored {
        std::mem::take(&mut self.out)
    }
}

impl Drop for Keeping<'_> {
    fn drop(&mut self) {
        self.all.fetch_sub(self.mine, Ordering::Relaxed);
    }
}

/// Reads changelog partition `partition` from its beginning to its end: each vehicle's last
/// record's offset, the most recent records `keeping` has room for, and how many records were
/// read.
fn read_to_end(
    consumer: &BaseConsumer<RestoreContext>,
    topic: &str,
    partition: i32,
    mut keeping: Keeping<'_>,
    started: Instant,
) -> Result<(Restored, u64), String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| format!("{topic}[{partition}]: assign: {e}"))?;
    let mut read = 0u64;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                read += 1;
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                let record = m
                    .payload()
                    .map(|doc| (doc.to_vec(), cell_times(&m).to_vec()));
                keeping.record(key, m.offset(), record);
            }
            Some(Err(KafkaError::PartitionEOF(_))) => break,
            Some(Err(e)) => return Err(format!("{topic}[{partition}]: {e}")),
            None if started.elapsed() > RESTORE_TIMEOUT => {
                return Err(format!(
                    "{topic}[{partition}]: end not reached within {RESTORE_TIMEOUT:?}"
                ))
            }
            None => {}
        }
    }
    Ok((keeping.finish(), read))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(bytes: usize) -> Option<Kept> {
        Some((vec![b'd'; bytes], Vec::new()))
    }

    /// Restores running at the same time share the budget: together they never keep more than it
    /// (before, each kept up to the whole budget, so a rebalance assigning n partitions held n
    /// budgets until the restores were done), each keeps its own most recent records, and what a
    /// restore held is given back when it ends.
    #[test]
    fn restores_in_progress_share_the_budget() {
        let all = AtomicUsize::new(0);
        let mut a = Keeping::new(1_000, &all);
        let mut b = Keeping::new(1_000, &all);
        for i in 0..20 {
            a.record(&format!("a{i}"), i, kept(100));
            b.record(&format!("b{i}"), i, kept(100));
            assert!(
                all.load(Ordering::Relaxed) <= 1_000,
                "{}",
                all.load(Ordering::Relaxed)
            );
        }
        let held: usize = a
            .out
            .kept
            .values()
            .chain(b.out.kept.values())
            .map(kept_weight)
            .sum();
        assert_eq!(held, all.load(Ordering::Relaxed));
        assert!(a.out.kept.contains_key("a19") && b.out.kept.contains_key("b19"));
        assert!(!a.out.kept.contains_key("a0") && !b.out.kept.contains_key("b0"));
        // Every vehicle's last offset is known, kept or not.
        assert_eq!((a.out.last.len(), b.out.last.len()), (20, 20));
        let restored = a.finish();
        assert_eq!(
            all.load(Ordering::Relaxed),
            held - restored.kept.values().map(kept_weight).sum::<usize>()
        );
        drop(b);
        assert_eq!(all.load(Ordering::Relaxed), 0);
    }

    /// A later record of a vehicle replaces its earlier one, a tombstone removes it, and the bytes
    /// held follow.
    #[test]
    fn a_restore_keeps_each_vehicles_last_record_only() {
        let all = AtomicUsize::new(0);
        let mut k = Keeping::new(10_000, &all);
        k.record("v", 1, kept(100));
        k.record("w", 2, kept(50));
        k.record("v", 3, kept(300));
        assert_eq!(all.load(Ordering::Relaxed), 350);
        k.record("w", 4, None);
        assert_eq!(all.load(Ordering::Relaxed), 300);
        let r = k.finish();
        assert_eq!(r.last.get("v"), Some(&3));
        assert_eq!(r.last.get("w"), None);
        assert_eq!(r.kept.get("v").map(kept_weight), Some(300));
        assert_eq!(all.load(Ordering::Relaxed), 0);
    }

    fn partition(committed: i64) -> PartitionViews {
        PartitionViews {
            start_offset: 0,
            restored: Arc::new(OnceCell::new()),
            committed,
            last: HashMap::new(),
            kept: HashMap::new(),
            vehicles: HashMap::new(),
        }
    }

    fn entry(recorded: bool, ahead: bool, touched: i64) -> Entry {
        let mut e = Entry::new(View::default(), recorded, ahead, 100);
        e.touched = touched;
        e
    }

    fn last(offset: i64) -> LastRecord {
        LastRecord {
            partition: 0,
            offset,
            times: None,
            exact: true,
        }
    }

    /// Only a view equal to its vehicle's last committed record may go: recorded, every record
    /// that touched it committed, and that record's offset known. Least recently used first;
    /// a view whose cell times are ahead of its record leaves them with the offset.
    #[test]
    fn eviction_drops_only_committed_views_least_recently_used_first_and_keeps_times_ahead() {
        let mut v = Views::default();
        let w = weight(&View::default(), 100);
        let mut p = partition(10);
        for (car, offset) in [("old", 1), ("ahead", 2), ("fresh", 3), ("pending", 4)] {
            p.last.insert(car.into(), last(offset));
        }
        v.partitions.insert(0, p);
        v.put(0, "old", entry(true, false, 5));
        v.put(0, "pending", entry(true, false, 12)); // touched by a record not yet committed
        v.put(0, "unrecorded", entry(false, false, i64::MIN)); // no record to rebuild it from
        v.put(0, "ahead", entry(true, true, 9));
        v.put(0, "fresh", entry(true, false, 3));
        assert_eq!(v.bytes, 5 * w);
        // Room for four: the least recently used droppable view goes.
        v.evict(4 * w);
        let held = |v: &Views, car: &str| v.partitions[&0].vehicles.contains_key(car);
        assert!(!held(&v, "old") && held(&v, "ahead") && held(&v, "fresh"));
        assert_eq!(v.bytes, 4 * w);
        // Room for none: every droppable view goes, the others stay whatever the budget.
        v.evict(0);
        assert!(held(&v, "pending") && held(&v, "unrecorded"));
        assert!(!held(&v, "ahead") && !held(&v, "fresh"));
        assert_eq!(v.bytes, 2 * w);
        assert_eq!(
            v.order.len(),
            2,
            "the order holds exactly the views in memory"
        );
        let times = |car: &str| v.partitions[&0].last[car].times.clone();
        assert_eq!(
            times("ahead").as_deref(),
            Some(View::default().cell_times_text().as_str())
        );
        assert_eq!(times("fresh"), None);
        // Once its record commits, the pending view can go too.
        if let Some(p) = v.partitions.get_mut(&0) {
            p.committed = 13;
        }
        v.evict(0);
        assert!(!held(&v, "pending") && held(&v, "unrecorded"));
        assert_eq!(v.bytes, w);
        v.drop_partition(0);
        assert_eq!((v.bytes, v.order.len()), (0, 0));
    }
}
