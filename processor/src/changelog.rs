//! The vehicle-state changelog: decides, without reading the store per event, whether an event
//! changed a vehicle's state document, and produces the record that says so.
//!
//! A vehicle's events all go to one partition and run in one lane, one after the other, so the
//! owner of a partition can keep a [`View`] of each of its vehicles in memory. An event's plan is
//! applied to the view after the store write; when the rendered document differs from the last one
//! the changelog holds, a [`Change`] goes into the same Kafka transaction as the event's offset.
//!
//! Where a view comes from matters for exactly-once. The store can be *ahead* of the changelog: a
//! previous owner (killed, or losing the partition in a rebalance) may have written the effects of
//! records whose transaction never committed; they are processed again, and their change records
//! must be produced then. So a view is the state *as of the committed changelog*, never simply the
//! stored cells:
//! - on the first touch of a partition after assignment, its changelog partition is read to its
//!   end (read_committed: only committed records), keeping each vehicle's last record — the
//!   document and the cell times it was rendered from (the pattern Kafka Streams uses to restore a
//!   state store from its changelog). Changelog partition p holds the vehicles of events partition
//!   p (same count, same key, same partitioner);
//! - a vehicle with no record yet is read from the store, without the cells written by records of
//!   this partition at or past the offset the partition started from at assignment (the writer is
//!   found through the claim of the event id each cell names): those records are processed again;
//! - records processed but then not committed by this instance (past a failed record, in an aborted
//!   transaction) are undone in memory ([`Changelog::undo`]) before they are processed again;
//! - a revoked partition's views are dropped; the next owner restores them.
//!
//! Memory: one view per vehicle of the owned partitions (about the size of its document).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use shared::config::KafkaSettings;
use shared::headers;

use crate::effects::Plan;
use crate::store::{Store, StoreError};
use crate::view::{self, View};

/// How long restoring one changelog partition may take before the record is retried.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// Cell times the document was rendered from (JSON, see [`View::cell_times`]).
    pub cell_times: String,
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

/// What a record did to a vehicle's entry.
#[derive(Debug, Clone)]
enum Taken {
    /// An event's plan: the cells it replaced, and whether the vehicle had a record before.
    Cells {
        applied: view::Applied,
        recorded: bool,
    },
    /// A refresh replaced the whole entry (rare: replays and legacy multi-vehicle bodies).
    Entry(Box<Entry>),
}

/// A vehicle's view, and whether the changelog holds a record of it (the last record's document
/// is then the view's rendering).
#[derive(Debug, Clone)]
struct Entry {
    view: View,
    recorded: bool,
}

/// Each vehicle's last changelog record read at restore: (document, cell times).
type LastRecords = HashMap<String, (Vec<u8>, Vec<u8>)>;

/// The views of one owned partition.
struct PartitionViews {
    /// First offset processed since assignment: records at or past it may have been written to
    /// the store by a previous owner without their change records being committed.
    start_offset: i64,
    restored: tokio::sync::OnceCell<()>,
    /// Last record per vehicle read at restore, turned into a view on first touch.
    records: Mutex<LastRecords>,
    vehicles: Mutex<HashMap<String, Entry>>,
}

/// The owner's views of its vehicles.
pub struct Changelog {
    kafka: KafkaSettings,
    partitions: Mutex<HashMap<i32, Arc<PartitionViews>>>,
}

fn transient(message: impl std::fmt::Display) -> StoreError {
    StoreError::Transient {
        op: "state changelog",
        message: message.to_string(),
    }
}

impl Changelog {
    /// Views for the events topic and state topic of `kafka`.
    pub fn new(kafka: KafkaSettings) -> Self {
        Self {
            kafka,
            partitions: Mutex::new(HashMap::new()),
        }
    }

    /// Called before a partition's records are processed: a partition seen for the first time
    /// since assignment starts at `first_offset`.
    pub fn begin(&self, partition: i32, first_offset: i64) {
        if let Ok(mut p) = self.partitions.lock() {
            p.entry(partition).or_insert_with(|| {
                Arc::new(PartitionViews {
                    start_offset: first_offset,
                    restored: tokio::sync::OnceCell::new(),
                    records: Mutex::new(HashMap::new()),
                    vehicles: Mutex::new(HashMap::new()),
                })
            });
        }
    }

    /// Forgets every view (a new consumer joins the group: it starts from committed offsets).
    pub fn reset(&self) {
        if let Ok(mut p) = self.partitions.lock() {
            p.clear();
        }
    }

    /// Forgets revoked partitions: their next owner restores their views.
    pub fn drop_partitions(&self, partitions: &[i32]) {
        if let Ok(mut p) = self.partitions.lock() {
            for partition in partitions {
                p.remove(partition);
            }
        }
    }

    /// Takes back what records that will be processed again did to the views, latest first: each
    /// vehicle gets the view it had before the earliest of them. (A vehicle's records are processed
    /// in offset order, and every record past one processed again is processed again too.)
    pub fn undo(&self, mut undos: Vec<Undo>) {
        undos.sort_by_key(|u| std::cmp::Reverse(u.offset));
        let Ok(parts) = self.partitions.lock() else {
            return;
        };
        for u in undos {
            let Some(pv) = parts.get(&u.partition) else {
                continue;
            };
            let Ok(mut vehicles) = pv.vehicles.lock() else {
                continue;
            };
            match u.what {
                Taken::Entry(prior) => {
                    vehicles.insert(u.vehicle, *prior);
                }
                Taken::Cells { applied, recorded } => {
                    if let Some(e) = vehicles.get_mut(&u.vehicle) {
                        e.view.undo(applied);
                        e.recorded = recorded;
                    }
                }
            }
        }
    }

    /// Makes sure the view `plan`'s vehicle needs is in memory (restoring the partition, loading
    /// the vehicle on first touch), so [`Changelog::observe`] does not wait for it. Runs while the
    /// plan is written: a load leaves out the cells of the event being processed
    /// (`source.event_id`) whether or not it sees them, so it may overlap the write.
    pub async fn prepare(
        &self,
        store: &Store,
        source: Source<'_>,
        plan: &Plan,
    ) -> Result<(), StoreError> {
        if let Whose::Here(vehicle) = whose(source, plan) {
            self.views_with(store, source, vehicle).await?;
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
        let pv = self.views_with(store, source, vehicle).await?;
        let mut vehicles = pv.vehicles.lock().map_err(transient)?;
        let entry = vehicles
            .get_mut(vehicle)
            .ok_or_else(|| transient(format!("vehicle {vehicle} has no view")))?;
        // The cells the plan wrote decide whether the document changed; it is rendered whole
        // only for a change record.
        let applied = entry.view.apply_tracked(plan);
        let recorded = entry.recorded;
        let change = (!recorded || !applied.changed.is_empty()).then(|| {
            let document = entry.view.render(vehicle);
            Change {
                vehicle: vehicle.to_owned(),
                event_id: String::new(),
                event_type: String::new(),
                // A first record names everything it shows.
                changed: if recorded {
                    applied.changed.clone()
                } else {
                    view::changed(&Value::Null, &document)
                },
                document: document.to_string(),
                cell_times: entry.view.cell_times().to_string(),
            }
        });
        entry.recorded = true;
        Ok(Observed::Viewed {
            change: change.map(Box::new),
            undo: Box::new(Undo {
                partition,
                offset,
                vehicle: vehicle.to_owned(),
                what: Taken::Cells { applied, recorded },
            }),
        })
    }

    /// The views of `source`'s partition, with `vehicle`'s view among them: loaded on first touch,
    /// outside the lock (a vehicle's records run one at a time, so no other record of it can load it
    /// meanwhile). The record's own cells are left out like those of every record at or past the
    /// partition's start, without reading its claim.
    async fn views_with(
        &self,
        store: &Store,
        source: Source<'_>,
        vehicle: &str,
    ) -> Result<Arc<PartitionViews>, StoreError> {
        let pv = self
            .partition_views(source.partition, source.offset)
            .await?;
        let cached = pv.vehicles.lock().map_err(transient)?.contains_key(vehicle);
        if !cached {
            let entry = self
                .load(store, &pv, source.partition, vehicle, Some(source.event_id))
                .await?;
            pv.vehicles
                .lock()
                .map_err(transient)?
                .insert(vehicle.to_owned(), entry);
        }
        Ok(pv)
    }

    /// The views of `partition`, restored from its changelog partition on first use.
    async fn partition_views(
        &self,
        partition: i32,
        offset: i64,
    ) -> Result<Arc<PartitionViews>, StoreError> {
        self.begin(partition, offset);
        let pv = {
            let parts = self.partitions.lock().map_err(transient)?;
            parts
                .get(&partition)
                .cloned()
                .ok_or_else(|| transient(format!("partition {partition} has no views")))?
        };
        pv.restored
            .get_or_try_init(|| async {
                let kafka = self.kafka.clone();
                let records = tokio::task::spawn_blocking(move || restore(&kafka, partition))
                    .await
                    .map_err(transient)?
                    .map_err(transient)?;
                *pv.records.lock().map_err(transient)? = records;
                Ok::<(), StoreError>(())
            })
            .await?;
        Ok(pv)
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
        let pv = self.partition_views(partition, offset).await?;
        let cached = pv.vehicles.lock().map_err(transient)?.get(vehicle).cloned();
        let prior = match cached {
            Some(e) => e,
            None => self.load(store, &pv, partition, vehicle, None).await?,
        };
        let view = self
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
        let change = (document != before).then(|| Change {
            vehicle: vehicle.to_owned(),
            event_id: String::new(),
            event_type: String::new(),
            changed: view::changed(&before, &document),
            document: document.to_string(),
            cell_times: view.cell_times().to_string(),
        });
        pv.vehicles.lock().map_err(transient)?.insert(
            vehicle.to_owned(),
            Entry {
                view,
                recorded: true,
            },
        );
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

    /// A vehicle's view on first touch: its restored record, else the store without the cells of
    /// records that will be processed again (`processing`: the event being processed, one of them).
    async fn load(
        &self,
        store: &Store,
        pv: &PartitionViews,
        partition: i32,
        vehicle: &str,
        processing: Option<&str>,
    ) -> Result<Entry, StoreError> {
        let record = pv.records.lock().map_err(transient)?.remove(vehicle);
        if let Some((doc, times)) = record {
            let parsed = serde_json::from_slice::<Value>(&doc)
                .map_err(|e| e.to_string())
                .and_then(|d| {
                    let t = serde_json::from_slice::<Value>(&times).map_err(|e| e.to_string())?;
                    View::restore(vehicle, &d, &t).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(view) => {
                    return Ok(Entry {
                        view,
                        recorded: true,
                    })
                }
                Err(e) => tracing::warn!(
                    vehicle,
                    partition,
                    error = %e,
                    "state changelog record unreadable; the vehicle's view is read from the store and its next change record carries its whole state"
                ),
            }
        }
        let view = self
            .committed_cells(store, partition, pv.start_offset, vehicle, processing)
            .await?;
        Ok(Entry {
            view,
            recorded: false,
        })
    }

    /// The vehicle's stored cells, less those written by records of `partition` at or past
    /// `start` (they are processed again, and their change records produced then). The writer of
    /// each cell is found through the claim of the event id it names, read concurrently; `ahead`
    /// names an event known to be such a record (the one being processed), whose claim is not read.
    async fn committed_cells(
        &self,
        store: &Store,
        partition: i32,
        start: i64,
        vehicle: &str,
        ahead: Option<&str>,
    ) -> Result<View, StoreError> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let cells = store.cells(vehicle).await?;
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
        let mut view = View::default();
        for c in &cells {
            let skip = c
                .event_id
                .as_deref()
                .is_some_and(|id| Some(id) == ahead || later.contains(id));
            if !skip {
                view.put(c);
            }
        }
        Ok(view)
    }
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

/// Reads changelog partition `partition` to its end (committed records only): each vehicle's last
/// record, as (document, cell times).
fn restore(kafka: &KafkaSettings, partition: i32) -> Result<LastRecords, String> {
    let topic = &kafka.state_topic;
    let started = Instant::now();
    let consumer: BaseConsumer<RestoreContext> = shared::kafka::base_config(kafka)
        .set("group.id", "carhook-state-restore")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        // An empty fetch answer comes back at once instead of after the default 500 ms wait.
        .set("fetch.wait.max.ms", "10")
        .create_with_context(RestoreContext)
        .map_err(|e| format!("{topic}: restore consumer: {e}"))?;
    // An empty partition (a new topic, or all of it deleted) has nothing to read.
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(|e| format!("{topic}[{partition}]: watermarks: {e}"))?;
    let (last, read) = if high <= low {
        (LastRecords::new(), 0)
    } else {
        read_to_end(&consumer, topic, partition, started)?
    };
    tracing::info!(
        topic = topic.as_str(),
        partition,
        records = read,
        vehicles = last.len(),
        duration_ms = started.elapsed().as_millis() as u64,
        "vehicle views restored from the state changelog"
    );
    Ok(last)
}

/// Reads changelog partition `partition` from its beginning to its end: each vehicle's last
/// record, and how many records were read.
fn read_to_end(
    consumer: &BaseConsumer<RestoreContext>,
    topic: &str,
    partition: i32,
    started: Instant,
) -> Result<(LastRecords, u64), String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Beginning)
        .and_then(|()| consumer.assign(&tpl))
        .map_err(|e| format!("{topic}[{partition}]: assign: {e}"))?;
    let mut last = LastRecords::new();
    let mut read = 0u64;
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                read += 1;
                let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                    continue;
                };
                match m.payload() {
                    None => {
                        last.remove(key);
                    }
                    Some(doc) => {
                        let times = m
                            .headers()
                            .and_then(|h| {
                                h.iter()
                                    .find(|h| h.key == headers::CELL_TIMES)
                                    .and_then(|h| h.value)
                            })
                            .unwrap_or_default();
                        last.insert(key.to_owned(), (doc.to_vec(), times.to_vec()));
                    }
                }
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
    Ok((last, read))
}
