//! One record, start to finish: parse, claim, plan, write. Returns what the consumer loop must
//! still do inside its Kafka transaction (emit actions, dead-letter) — or a transient error, after
//! which the loop retries the same record and never commits past it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use rdkafka::message::{Message, OwnedMessage};
use shared::clock::EpochMillis;
use shared::event::{Event, EventKind};
use shared::headers;
use tracing::Instrument;

use crate::dead_letter::{header_str, Poison};
use crate::effects::{self, Context, Plan};
use crate::metrics::Metrics;
use crate::store::{Claim, Position, Store, StoreError};

/// What became of a record.
#[derive(Debug)]
pub enum Disposition {
    /// Effects are durable; emit the plan's actions.
    Applied(Plan),
    /// Another record owns this event id: no effect.
    Duplicate,
    /// Nothing to apply (VERIFY, legacy v2, unknown type): counted.
    Ignored(&'static str),
    /// Can never be applied: dead-letter it.
    Poison(Poison),
}

impl Disposition {
    /// Bounded outcome label.
    pub fn label(&self) -> &'static str {
        match self {
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
}

/// Per-record processing, shared by all partitions.
pub struct Pipeline {
    pub store: Store,
    pub settings: PipelineSettings,
    pub metrics: Metrics,
    /// Deterministic failures so far, by (partition, offset): (attempts, first failure).
    failures: Mutex<HashMap<(i32, i64), (u32, EpochMillis)>>,
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
            failures: Mutex::new(HashMap::new()),
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
            EventKind::Legacy { .. } => return Ok(Disposition::Ignored("legacy_v2")),
            EventKind::Unknown => return Ok(Disposition::Ignored("unknown_type")),
            EventKind::VehicleState { .. } | EventKind::VehicleError { .. } => {}
        }
        let pos = Position {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let event_id = event.envelope.event_id.as_str();
        let vehicle = event.envelope.vehicle_id.as_ref().map(|v| v.as_str());
        let claim = self
            .store
            .claim(event_id, vehicle, &pos, &self.settings.instance_id)
            .instrument(tracing::info_span!(
                "claim",
                otel.name = "claim eventId",
                db.system = "cassandra",
                db.operation.name = "INSERT IF NOT EXISTS"
            ))
            .await
            .inspect_err(|e| self.count_store_error(e))?;
        if let Claim::Duplicate { owner } = claim {
            tracing::debug!(
                owner_partition = owner.partition,
                owner_offset = owner.offset,
                "duplicate event id"
            );
            return Ok(Disposition::Duplicate);
        }
        let plan = effects::plan(
            &event,
            Context {
                received_at: received_at(msg),
                logic_version: self.settings.logic_version,
                rate_limit_backoff_secs: self.settings.rate_limit_backoff_secs,
            },
        );
        let applied = self
            .store
            .apply(&plan)
            .instrument(tracing::info_span!(
                "write state",
                otel.name = "write vehicle state",
                db.system = "cassandra",
                signals = plan.values.len() + plan.availability.len()
            ))
            .await;
        match applied {
            Ok(()) => {
                self.forget(&pos);
                self.metrics
                    .signals_written
                    .inc_by((plan.values.len() + plan.availability.len()) as u64);
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
                self.metrics
                    .processing_duration
                    .observe(started.elapsed().as_secs_f64());
                Ok(Disposition::Applied(plan))
            }
            Err(e) if e.is_transient() => {
                self.count_store_error(&e);
                Err(e)
            }
            Err(e) => {
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
