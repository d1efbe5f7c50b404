//! One record, start to finish: parse, claim, plan, write. Returns what the consumer loop must
//! still do inside its Kafka transaction (emit actions, dead-letter) — or a transient error, after
//! which the loop retries the same record and never commits past it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use rdkafka::message::{Message, OwnedMessage};
use shared::clock::EpochMillis;
use shared::event::{Event, EventKind};
use shared::headers;
use shared::ids::VehicleId;

use crate::changelog::{Change, Changelog, Observed, Undo};
use crate::dead_letter::{header_str, Poison};
use crate::effects::{self, Action, Context, Plan};
use crate::metrics::Metrics;
use crate::store::{Claim, Position, Store, StoreError};

/// A record whose effects are durable.
#[derive(Debug, Default)]
pub struct Applied {
    /// Per vehicle concerned, what its plan leaves for the transaction: actions to emit, a
    /// refresh poll to ask for.
    pub emits: Vec<Emits>,
    /// State changelog records (none when nothing a reader sees changed, or the changelog is off).
    pub changes: Vec<Change>,
    /// How to take the record back out of the changelog's views if it is processed again.
    pub undo: Vec<Undo>,
    /// A state refresh request (control record), not a Smartcar event.
    pub refresh: bool,
    /// Vehicles of other partitions this record wrote (a legacy body listing several): their
    /// owners are asked to refresh them (control records produced in the same transaction).
    pub refresh_requests: Vec<String>,
}

/// What a vehicle's plan leaves for its transaction once its writes are durable: the actions to
/// emit and whether a refresh poll is asked for. A record waits for its transaction with this, not
/// with the plan, whose cells hold the event's signal texts again (about the payload's size); they
/// are not needed once written.
#[derive(Debug, Clone, PartialEq)]
pub struct Emits {
    pub vehicle: Option<VehicleId>,
    /// Actions whose flag really changed (the pipeline dropped the others).
    pub actions: Vec<Action>,
    /// A vehicle error was RESOLVED: one refresh poll is requested.
    pub refresh_poll: bool,
}

impl From<Plan> for Emits {
    fn from(plan: Plan) -> Self {
        Self {
            vehicle: plan.vehicle,
            actions: plan.actions,
            refresh_poll: plan.refresh_poll,
        }
    }
}

/// What became of a record.
#[derive(Debug)]
pub enum Disposition {
    /// Effects are durable; emit the actions and change records.
    Applied(Applied),
    /// Another record owns this event id: no effect.
    Duplicate,
    /// Nothing to apply (VERIFY, unknown type): counted.
    Ignored(&'static str),
    /// Can never be applied: dead-letter it.
    Poison(Poison),
}

impl Disposition {
    /// Every value [`Disposition::label`] can take.
    pub const LABELS: [&'static str; 5] = [
        "applied",
        "refreshed",
        "duplicate",
        "ignored",
        "dead_lettered",
    ];

    /// Bounded outcome label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Applied(a) if a.refresh => "refreshed",
            Self::Applied(_) => "applied",
            Self::Duplicate => "duplicate",
            Self::Ignored(_) => "ignored",
            Self::Poison(_) => "dead_lettered",
        }
    }
}

/// Settings the pipeline needs.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub instance_id: String,
    pub logic_version: u16,
    pub rate_limit_backoff_secs: u64,
    pub max_attempts: u32,
    pub max_clock_skew_ms: i64,
}

/// Per-record processing, shared by all partitions.
pub struct Pipeline {
    pub store: Store,
    pub settings: PipelineSettings,
    pub metrics: Metrics,
    /// The state changelog's views (None: `processor.changelog` off, or replay).
    pub changelog: Option<Changelog>,
    /// Deterministic failures so far, by (partition, offset): (attempts, first failure).
    failures: Mutex<HashMap<(i32, i64), (u32, EpochMillis)>>,
    /// Clocks already logged as untrusted (each is logged once per process, counted always).
    untrusted_logged: Mutex<HashSet<&'static str>>,
}

fn received_at(msg: &OwnedMessage) -> EpochMillis {
    header_str(msg, headers::RECEIVED_AT)
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(EpochMillis::new)
        .or_else(|| msg.timestamp().to_millis().and_then(EpochMillis::new))
        .unwrap_or_else(EpochMillis::now)
}

impl Pipeline {
    /// A pipeline over a prepared store.
    pub fn new(store: Store, settings: PipelineSettings, metrics: Metrics) -> Self {
        Self {
            store,
            settings,
            metrics,
            changelog: None,
            failures: Mutex::new(HashMap::new()),
            untrusted_logged: Mutex::new(HashSet::new()),
        }
    }

    fn poison(class: &'static str, message: String) -> Disposition {
        Disposition::Poison(Poison {
            class,
            message,
            attempts: 1,
            first_failure_at: EpochMillis::now(),
        })
    }

    /// Processes one record. `Err` means transient: retry later, do not commit past it.
    pub async fn handle(&self, msg: &OwnedMessage) -> Result<Disposition, StoreError> {
        if let Some(kind) = header_str(msg, headers::CONTROL) {
            return self.control(msg, kind).await;
        }
        let started = Instant::now();
        let body = msg.payload().unwrap_or_default();
        let event = match Event::parse(body) {
            Ok(e) => e,
            Err(e) => return Ok(Self::poison(e.class(), e.to_string())),
        };
        let span = tracing::Span::current();
        span.record("event_id", event.envelope.event_id.as_str());
        span.record("event_type", event.envelope.event_type.as_str());
        if let Some(v) = &event.envelope.vehicle_id {
            span.record("vehicle_id", v.as_str());
        }
        match &event.kind {
            EventKind::Verify => return Ok(Disposition::Ignored("verify")),
            EventKind::Unknown => return Ok(Disposition::Ignored("unknown_type")),
            EventKind::Legacy(l) => {
                let form = match l.event_name.as_str() {
                    "eventBased" | "dynamic" | "scheduled" => l.event_name.clone(),
                    _ => "other".to_string(),
                };
                self.metrics
                    .legacy_events
                    .get_or_create(&vec![("form", form)])
                    .inc();
            }
            EventKind::VehicleState { .. } | EventKind::VehicleError { .. } => {}
        }
        let pos = Position {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let event_id = event.envelope.event_id.as_str();
        let vehicle = event.envelope.vehicle_id.as_ref().map(|v| v.as_str());
        let received_at = received_at(msg);
        let max_skew_ms = self.settings.max_clock_skew_ms;
        let (delivered_at, untrusted_delivery) =
            effects::delivery_time(event.envelope.delivered_at, received_at, max_skew_ms);
        let claim = self
            .store
            .claim(
                event_id,
                vehicle,
                &pos,
                &self.settings.instance_id,
                delivered_at,
            )
            .await
            .inspect_err(|e| self.count_store_error(e))?;
        let delivered_at = match claim {
            Claim::Owner { delivered_at } => delivered_at,
            Claim::Duplicate { owner } => {
                tracing::debug!(
                    owner_partition = owner.partition,
                    owner_offset = owner.offset,
                    "duplicate event id"
                );
                return Ok(Disposition::Duplicate);
            }
        };
        let mut plans = effects::plans(
            &event,
            Context {
                received_at,
                delivered_at,
                logic_version: self.settings.logic_version,
                rate_limit_backoff_secs: self.settings.rate_limit_backoff_secs,
                max_skew_ms,
            },
        );
        let untrusted = untrusted_delivery
            .into_iter()
            .chain(plans.iter().flat_map(|p| p.untrusted.iter().copied()));
        for clock in untrusted {
            self.note_untrusted(clock, event_id);
        }
        let cells: usize = plans
            .iter()
            .map(|p| p.values.len() + p.availability.len())
            .sum();
        let mut changes = Vec::new();
        let mut undo = Vec::new();
        let mut refresh_requests = Vec::new();
        // Each statement is its own CQL CLIENT span under the record's span (see `Store`).
        let applied = async {
            let source = crate::changelog::Source {
                event_id,
                partition: pos.partition,
                offset: pos.offset,
                key: msg.key(),
            };
            for plan in &mut plans {
                match &self.changelog {
                    // The vehicle's view is loaded, if it must be, while the plan is written.
                    Some(changelog) => {
                        tokio::try_join!(
                            self.store.apply(plan),
                            changelog.prepare(&self.store, source, plan),
                        )?;
                    }
                    None => self.store.apply(plan).await?,
                }
                self.keep_flag_changes(plan, event_id).await?;
                if let Some(changelog) = &self.changelog {
                    let observed = changelog.observe(&self.store, source, plan).await?;
                    match observed {
                        Observed::Nothing => {}
                        Observed::Viewed { change, undo: u } => {
                            undo.push(*u);
                            changes.extend(change.map(|c| Change {
                                event_id: event_id.to_owned(),
                                event_type: event.envelope.event_type.clone(),
                                ..*c
                            }));
                        }
                        Observed::RefreshElsewhere(v) => refresh_requests.push(v),
                    }
                }
            }
            Ok::<(), StoreError>(())
        }
        .await;
        match applied {
            Ok(()) => {
                self.forget(&pos);
                self.metrics.signals_written.inc_by(cells as u64);
                for plan in &plans {
                    for (t, e) in plan.error_types.iter().zip(&plan.errors) {
                        let state = if e.state.doc.contains(r#""state":"RESOLVED""#) {
                            "resolved"
                        } else {
                            "error"
                        };
                        self.metrics
                            .vehicle_errors
                            .get_or_create(&vec![
                                ("type", (*t).to_string()),
                                ("state", state.to_string()),
                            ])
                            .inc();
                    }
                }
                self.metrics
                    .processing_duration
                    .observe(started.elapsed().as_secs_f64());
                Ok(Disposition::Applied(Applied {
                    emits: plans.into_iter().map(Emits::from).collect(),
                    changes,
                    undo,
                    refresh: false,
                    refresh_requests,
                }))
            }
            Err(e) if e.is_transient() => {
                // A view updated before a later plan of the record failed is taken back: the
                // record is processed again.
                if let Some(changelog) = &self.changelog {
                    changelog.undo(undo);
                }
                self.count_store_error(&e);
                Err(e)
            }
            Err(e) => {
                if let Some(changelog) = &self.changelog {
                    changelog.undo(undo);
                }
                self.count_store_error(&e);
                let (attempts, first) = self.note_failure(&pos);
                if attempts < self.settings.max_attempts {
                    return Err(e);
                }
                self.forget(&pos);
                self.store.mark_dead_lettered(event_id, &pos).await?;
                Ok(Disposition::Poison(Poison {
                    class: "store_refused",
                    message: e.to_string(),
                    attempts,
                    first_failure_at: first,
                }))
            }
        }
    }

    /// A carhook control record: a state refresh for its key's vehicle (see
    /// [`Changelog::refresh`]). Anything else is ignored and counted.
    async fn control(&self, msg: &OwnedMessage, kind: &str) -> Result<Disposition, StoreError> {
        if kind != headers::CONTROL_REFRESH_STATE {
            return Ok(Disposition::Ignored("unknown_control"));
        }
        let (Some(changelog), Some(vehicle)) = (
            &self.changelog,
            msg.key().and_then(|k| std::str::from_utf8(k).ok()),
        ) else {
            return Ok(Disposition::Ignored("refresh_without_changelog"));
        };
        tracing::Span::current().record("vehicle_id", vehicle);
        let (change, undo) = changelog
            .refresh(&self.store, msg.partition(), msg.offset(), vehicle)
            .await
            .inspect_err(|e| self.count_store_error(e))?;
        let event_id = format!("refresh:{}:{}", msg.partition(), msg.offset());
        Ok(Disposition::Applied(Applied {
            emits: Vec::new(),
            changes: change
                .map(|mut c| {
                    c.event_id = event_id;
                    c.event_type = "CARHOOK_STATE_REFRESH".into();
                    c
                })
                .into_iter()
                .collect(),
            undo: undo.into_iter().collect(),
            refresh: true,
            refresh_requests: Vec::new(),
        }))
    }

    /// Keeps only the plan's actions whose reconnect flag this event really changed, so the
    /// actions topic follows state: the last action for a vehicle agrees with its flags.
    async fn keep_flag_changes(&self, plan: &mut Plan, event_id: &str) -> Result<(), StoreError> {
        let Some(vehicle) = plan.vehicle.as_ref().map(|v| v.as_str().to_owned()) else {
            return Ok(());
        };
        let mut kept = Vec::with_capacity(plan.actions.len());
        for a in plan.actions.drain(..) {
            if self
                .store
                .move_reconnect_flag(&vehicle, &a.error_key, a.flag_state, a.at, event_id)
                .await?
            {
                kept.push(a);
            }
        }
        plan.actions = kept;
        Ok(())
    }

    /// Counts a timestamp that was too far ahead to trust; logs the first of each clock.
    fn note_untrusted(&self, clock: &'static str, event_id: &str) {
        self.metrics
            .untrusted_timestamps
            .get_or_create(&vec![("clock", clock.to_string())])
            .inc();
        let first = self
            .untrusted_logged
            .lock()
            .map(|mut seen| seen.insert(clock))
            .unwrap_or(false);
        if first {
            tracing::warn!(
                clock,
                event_id,
                max_skew_ms = self.settings.max_clock_skew_ms,
                "timestamp later than receive time plus the allowed skew: not trusted, next clock used (logged once per clock; see carhook_processor_untrusted_timestamps_total)"
            );
        }
    }

    fn count_store_error(&self, e: &StoreError) {
        let kind = if e.is_transient() {
            "transient"
        } else {
            "refused"
        };
        self.metrics
            .store_errors
            .get_or_create(&vec![("kind", kind.to_string())])
            .inc();
    }

    fn note_failure(&self, pos: &Position) -> (u32, EpochMillis) {
        let Ok(mut f) = self.failures.lock() else {
            return (u32::MAX, EpochMillis::now());
        };
        let entry = f
            .entry((pos.partition, pos.offset))
            .or_insert((0, EpochMillis::now()));
        entry.0 += 1;
        *entry
    }

    fn forget(&self, pos: &Position) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&(pos.partition, pos.offset));
        }
    }
}
