//! The CQL store: idempotency claims (LWT) and vehicle state (timestamp-ordered writes).
//!
//! Why two mechanisms: a claim must be decided once across processors, which needs Paxos
//! (`INSERT … IF NOT EXISTS`); vehicle state must be ordered by the car's clock whatever the arrival
//! order, which client write timestamps give without Paxos. CQL refuses `USING TIMESTAMP` on a
//! conditional write, so the two live in different tables. One LWT per event (the claim) plus one
//! plain batch keeps the per-event cost at roughly a single LWT.

use std::sync::Arc;
use std::time::Duration;

use scylla::client::session::Session;
use scylla::errors::ExecutionError;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::writers::RowWriter;
use scylla::serialize::SerializationError;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::SerialConsistency;
use scylla::value::{CqlValue, Row};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use shared::clock::EpochMillis;

use crate::effects::Plan;
use crate::metrics::CqlLabels;

/// A store failure. Everything the driver reports is treated as transient except statements the
/// server refuses as invalid, which are deterministic and count towards dead-lettering.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cql {op}: {message}")]
    Transient { op: &'static str, message: String },
    #[error("cql {op} refused: {message}")]
    Refused { op: &'static str, message: String },
}

impl StoreError {
    pub(crate) fn from_exec(op: &'static str, e: impl std::fmt::Display + std::fmt::Debug) -> Self {
        let message = e.to_string();
        let dbg = format!("{e:?}");
        if dbg.contains("DbError(Invalid") || dbg.contains("DbError(SyntaxError") {
            Self::Refused { op, message }
        } else {
            Self::Transient { op, message }
        }
    }

    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }

    /// `transient` or `refused`: the `error.type` of a failed statement's span.
    pub fn kind(&self) -> &'static str {
        if self.is_transient() {
            "transient"
        } else {
            "refused"
        }
    }
}

/// The Kafka position of a record: the owner of a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The result of claiming an event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This record owns the event: apply it (again, if a crash interrupted a previous attempt).
    /// `delivered_at` is the delivery time stored with the claim (the first persisted copy's):
    /// every write ordered by delivery time uses it, whichever copy applies.
    Owner { delivered_at: EpochMillis },
    /// Another record owns it: this one is a duplicate and has no effect.
    Duplicate { owner: Position },
}

/// A claim as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClaim {
    pub status: Option<String>,
    pub owner: Position,
    pub delivered_at: Option<EpochMillis>,
}

/// Which cell a [`StoredCell`] is.
#[derive(Debug, Clone)]
pub enum CellKind {
    Value(String),
    Availability(String),
    Error(String),
}

/// One stored state cell: its document, write timestamp and the event id the document names.
#[derive(Debug, Clone)]
pub struct StoredCell {
    pub kind: CellKind,
    pub doc: String,
    pub timestamp: i64,
    pub event_id: Option<String>,
}

/// The columns [`cells_from`] reads, per table (`signal_state`, `vehicle_errors`).
pub const SIGNAL_CELL_COLUMNS: &str =
    "code, value, WRITETIME(value), availability, WRITETIME(availability)";
pub const ERROR_CELL_COLUMNS: &str = "error_key, state, WRITETIME(state)";

/// A vehicle's cells from the answers to `SELECT {SIGNAL_CELL_COLUMNS} FROM signal_state` and
/// `SELECT {ERROR_CELL_COLUMNS} FROM vehicle_errors` for it.
pub fn cells_from(signals: QueryResult, errors: QueryResult) -> Result<Vec<StoredCell>, String> {
    let writer = |doc: &str| {
        serde_json::from_str::<serde_json::Value>(doc)
            .ok()
            .and_then(|d| d.get("eventId")?.as_str().map(str::to_owned))
    };
    let cell = |kind, doc: String, timestamp| StoredCell {
        kind,
        event_id: writer(&doc),
        doc,
        timestamp,
    };
    let mut out = Vec::new();
    let rows = signals.into_rows_result().map_err(|e| e.to_string())?;
    for row in rows
        .rows::<(
            String,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<i64>,
        )>()
        .map_err(|e| e.to_string())?
    {
        let (code, value, vt, availability, at) = row.map_err(|e| e.to_string())?;
        if let (Some(doc), Some(t)) = (value, vt) {
            out.push(cell(CellKind::Value(code.clone()), doc, t));
        }
        if let (Some(doc), Some(t)) = (availability, at) {
            out.push(cell(CellKind::Availability(code), doc, t));
        }
    }
    let rows = errors.into_rows_result().map_err(|e| e.to_string())?;
    for row in rows
        .rows::<(String, Option<String>, Option<i64>)>()
        .map_err(|e| e.to_string())?
    {
        let (key, state, t) = row.map_err(|e| e.to_string())?;
        if let (Some(doc), Some(t)) = (state, t) {
            out.push(cell(CellKind::Error(key), doc, t));
        }
    }
    Ok(out)
}

/// Prepared statements against one keyspace.
#[derive(Clone)]
pub struct Store {
    session: Arc<Session>,
    keyspace: String,
    claim: PreparedStatement,
    read_claim: PreparedStatement,
    read_settled_claim: PreparedStatement,
    take_over: PreparedStatement,
    reset_claim: PreparedStatement,
    mark_dead: PreparedStatement,
    read_flag: PreparedStatement,
    insert_flag: PreparedStatement,
    update_flag: PreparedStatement,
    put_value: PreparedStatement,
    put_availability: PreparedStatement,
    put_error: PreparedStatement,
    put_vehicle: PreparedStatement,
    put_last_webhook: PreparedStatement,
    put_user: PreparedStatement,
    signal_times: PreparedStatement,
    error_times: PreparedStatement,
    signal_cells: PreparedStatement,
    error_cells: PreparedStatement,
    dedup_ttl_secs: i32,
    /// Where each execution's duration is observed (none for tools and tests).
    cql_duration: Option<Family<CqlLabels, Histogram>>,
}

/// Whether a lightweight transaction applied. Read generically: Cassandra returns only `[applied]`
/// when applied, ScyllaDB adds the row's columns, and a not-applied answer carries the existing row.
pub fn lwt_applied(res: QueryResult) -> Result<bool, String> {
    let rows = res.into_rows_result().map_err(|e| e.to_string())?;
    let first = rows
        .rows::<Row>()
        .map_err(|e| e.to_string())?
        .next()
        .transpose()
        .map_err(|e| e.to_string())?;
    Ok(matches!(
        first.and_then(|r| r.columns.into_iter().next().flatten()),
        Some(CqlValue::Boolean(true))
    ))
}

/// Reads a claim's LWT result: whether it applied and, when it did not, the existing claim if the
/// server returned its columns (Cassandra and ScyllaDB do for `IF NOT EXISTS`), found by name.
fn claim_result(res: QueryResult) -> Result<(bool, Option<StoredClaim>), String> {
    let rows = res.into_rows_result().map_err(|e| e.to_string())?;
    let specs = rows.column_specs();
    let index = |name: &str| specs.get_by_name(name).map(|(i, _)| i);
    let (applied_at, status_at, topic_at, partition_at, offset_at, delivered_at) = (
        index("[applied]").unwrap_or(0),
        index("status"),
        index("topic"),
        index("partition"),
        index("offset"),
        index("delivered_at"),
    );
    let Some(row) = rows
        .rows::<Row>()
        .map_err(|e| e.to_string())?
        .next()
        .transpose()
        .map_err(|e| e.to_string())?
    else {
        return Ok((false, None));
    };
    let cols = row.columns;
    let cell = |i: Option<usize>| i.and_then(|i| cols.get(i).cloned().flatten());
    if matches!(cell(Some(applied_at)), Some(CqlValue::Boolean(true))) {
        return Ok((true, None));
    }
    let (
        Some(CqlValue::Text(topic)),
        Some(CqlValue::Int(partition)),
        Some(CqlValue::BigInt(offset)),
    ) = (cell(topic_at), cell(partition_at), cell(offset_at))
    else {
        return Ok((false, None));
    };
    let status = match cell(status_at) {
        Some(CqlValue::Text(s)) => Some(s),
        _ => None,
    };
    let delivered_at = match cell(delivered_at) {
        Some(CqlValue::BigInt(t)) => EpochMillis::new(t),
        _ => None,
    };
    Ok((
        false,
        Some(StoredClaim {
            status,
            owner: Position {
                topic,
                partition,
                offset,
            },
            delivered_at,
        }),
    ))
}

impl Store {
    /// Prepares every statement. Fails if the schema is missing (run the migrations first).
    pub async fn prepare(
        session: Arc<Session>,
        keyspace: &str,
        dedup_ttl_days: u32,
    ) -> Result<Self, StoreError> {
        let ks = keyspace;
        let p = |q: String| {
            let session = Arc::clone(&session);
            async move {
                session
                    .prepare(q)
                    .await
                    .map_err(|e| StoreError::from_exec("prepare", e))
            }
        };
        let mut claim = p(format!(
            "INSERT INTO {ks}.processed_events (event_id, status, topic, partition, \"offset\", vehicle_id, claimed_by, claimed_at, delivered_at) \
             VALUES (?, 'claimed', ?, ?, ?, ?, ?, toTimestamp(now()), ?) IF NOT EXISTS USING TTL ?"
        ))
        .await?;
        claim.set_serial_consistency(Some(SerialConsistency::LocalSerial));
        let mut read_claim = p(format!(
            "SELECT status, topic, partition, \"offset\", delivered_at FROM {ks}.processed_events WHERE event_id = ?"
        ))
        .await?;
        // A linearizable read: sees any claim a concurrent LWT has committed.
        read_claim.set_consistency(scylla::statement::Consistency::LocalSerial);
        // The same row at LOCAL_QUORUM: sees every claim whose Paxos round has committed.
        let mut read_settled_claim = p(format!(
            "SELECT status, topic, partition, \"offset\", delivered_at FROM {ks}.processed_events WHERE event_id = ?"
        ))
        .await?;
        read_settled_claim.set_consistency(scylla::statement::Consistency::LocalQuorum);
        let take_over = p(format!(
            "UPDATE {ks}.processed_events USING TTL ? SET status = 'claimed', topic = ?, partition = ?, \"offset\" = ?, claimed_by = ? \
             WHERE event_id = ? IF status = 'dead_lettered'"
        ))
        .await?;
        // Every status is written with the same TTL as the claim, so no cell outlives its row.
        let reset_claim = p(format!(
            "UPDATE {ks}.processed_events USING TTL ? SET status = 'claimed' \
             WHERE event_id = ? IF topic = ? AND partition = ? AND \"offset\" = ?"
        ))
        .await?;
        let mark_dead = p(format!(
            "UPDATE {ks}.processed_events USING TTL ? SET status = 'dead_lettered' WHERE event_id = ? IF topic = ? AND partition = ? AND \"offset\" = ?"
        ))
        .await?;
        let mut read_flag = p(format!(
            "SELECT state, at, event_id, changed_by FROM {ks}.reconnect_flags WHERE vehicle_id = ? AND error_key = ?"
        ))
        .await?;
        read_flag.set_consistency(scylla::statement::Consistency::LocalSerial);
        let insert_flag = p(format!(
            "INSERT INTO {ks}.reconnect_flags (vehicle_id, error_key, state, at, event_id, changed_by) \
             VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS"
        ))
        .await?;
        let update_flag = p(format!(
            "UPDATE {ks}.reconnect_flags SET state = ?, at = ?, event_id = ?, changed_by = ? \
             WHERE vehicle_id = ? AND error_key = ? IF at = ? AND event_id = ?"
        ))
        .await?;
        let put_value = p(format!(
            "UPDATE {ks}.signal_state USING TIMESTAMP ? SET value = ? WHERE vehicle_id = ? AND code = ?"
        ))
        .await?;
        let put_availability = p(format!(
            "UPDATE {ks}.signal_state USING TIMESTAMP ? SET availability = ? WHERE vehicle_id = ? AND code = ?"
        ))
        .await?;
        let put_error = p(format!(
            "UPDATE {ks}.vehicle_errors USING TIMESTAMP ? SET state = ? WHERE vehicle_id = ? AND error_key = ?"
        ))
        .await?;
        let put_vehicle = p(format!(
            "UPDATE {ks}.vehicles USING TIMESTAMP ? SET info = ? WHERE vehicle_id = ?"
        ))
        .await?;
        let put_last_webhook = p(format!(
            "UPDATE {ks}.vehicles USING TIMESTAMP ? SET last_webhook_at = ? WHERE vehicle_id = ?"
        ))
        .await?;
        let put_user = p(format!(
            "UPDATE {ks}.vehicle_users USING TIMESTAMP ? SET user_id = ? WHERE vehicle_id = ?"
        ))
        .await?;
        let signal_times = p(format!(
            "SELECT code, WRITETIME(value), WRITETIME(availability) FROM {ks}.signal_state WHERE vehicle_id = ?"
        ))
        .await?;
        let error_times = p(format!(
            "SELECT error_key, WRITETIME(state) FROM {ks}.vehicle_errors WHERE vehicle_id = ?"
        ))
        .await?;
        let signal_cells = p(format!(
            "SELECT {SIGNAL_CELL_COLUMNS} FROM {ks}.signal_state WHERE vehicle_id = ?"
        ))
        .await?;
        let error_cells = p(format!(
            "SELECT {ERROR_CELL_COLUMNS} FROM {ks}.vehicle_errors WHERE vehicle_id = ?"
        ))
        .await?;
        Ok(Self {
            session,
            keyspace: ks.to_string(),
            claim,
            read_claim,
            read_settled_claim,
            take_over,
            reset_claim,
            mark_dead,
            read_flag,
            insert_flag,
            update_flag,
            put_value,
            put_availability,
            put_error,
            put_vehicle,
            put_last_webhook,
            put_user,
            signal_times,
            error_times,
            signal_cells,
            error_cells,
            dedup_ttl_secs: i32::try_from(u64::from(dedup_ttl_days) * 86_400).unwrap_or(i32::MAX),
            cql_duration: None,
        })
    }

    /// The session (for the state view and tests).
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The keyspace.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Observes every statement execution's duration in `histogram`
    /// (`carhook_processor_cql_duration_seconds{operation, table, result}`).
    #[must_use]
    pub fn with_latency(mut self, histogram: Family<CqlLabels, Histogram>) -> Self {
        self.cql_duration = Some(histogram);
        self
    }

    /// Claims `event_id` for the record at `pos`, delivered (by Smartcar's clock, or received when
    /// that is unknown or untrusted) at `delivered_at`.
    ///
    /// Why this is crash-safe: the claim names the record that owns the event. Offsets are
    /// committed only after the owner's effects are durable, so if a processor dies anywhere between
    /// claim and commit, the owner record is delivered again, finds its own position in the claim,
    /// and applies the (idempotent) effects again. Any *other* record with the same event id — a
    /// Smartcar retry, a second delivery — is a duplicate whatever the claim's progress, because the
    /// owner will certainly be (re)applied. An LWT timeout is retried the same way: if the insert
    /// did land, the retry reads our own position back and we are still the owner.
    ///
    /// The owner finding its claim marked `dead_lettered` (its dead letter was in a transaction that
    /// aborted, and this attempt succeeds) resets it to `claimed`, so no later copy can take the
    /// event over and apply it a second time.
    pub async fn claim(
        &self,
        event_id: &str,
        vehicle: Option<&str>,
        pos: &Position,
        instance: &str,
        delivered_at: EpochMillis,
    ) -> Result<Claim, StoreError> {
        let res = self
            .traced(
                "claim",
                ("INSERT", "processed_events"),
                self.session.execute_unpaged(
                    &self.claim,
                    (
                        event_id,
                        &pos.topic,
                        pos.partition,
                        pos.offset,
                        vehicle,
                        instance,
                        delivered_at.as_i64(),
                        self.dedup_ttl_secs,
                    ),
                ),
            )
            .await?;
        let (applied, existing) =
            claim_result(res).map_err(|e| StoreError::from_exec("claim", e))?;
        if applied {
            return Ok(Claim::Owner { delivered_at });
        }
        // A claim that did not apply carries the row that stopped it (read by Paxos, so as
        // current as a serial read); a server that leaves it out costs one serial read.
        let stored = match existing {
            Some(c) => c,
            None => self
                .read_claim(event_id)
                .await?
                .ok_or_else(|| StoreError::Transient {
                    op: "read claim",
                    message: format!("claim for {event_id} vanished; retrying"),
                })?,
        };
        // Rows claimed before delivery times were stored have none: this copy's is the best known.
        let owned_at = stored.delivered_at.unwrap_or(delivered_at);
        if stored.owner == *pos {
            if stored.status.as_deref() == Some("dead_lettered") {
                self.reset_claim(event_id, pos).await?;
            }
            return Ok(Claim::Owner {
                delivered_at: owned_at,
            });
        }
        if stored.status.as_deref() == Some("dead_lettered")
            && self.take_over(event_id, pos, instance).await?
        {
            return Ok(Claim::Owner {
                delivered_at: owned_at,
            });
        }
        Ok(Claim::Duplicate {
            owner: stored.owner,
        })
    }

    /// The claim of `event_id` for replay, where claims are long decided: a plain LOCAL_QUORUM
    /// read, which sees every committed claim (a Paxos commit is a quorum write); only when it
    /// finds none — the one case where a claim could still be in flight — is it read again
    /// linearizably. So it answers what [`Store::read_claim`] would, without a Paxos round per
    /// event.
    pub async fn read_decided_claim(
        &self,
        event_id: &str,
    ) -> Result<Option<StoredClaim>, StoreError> {
        match self
            .read_claim_with(&self.read_settled_claim, event_id)
            .await?
        {
            Some(c) => Ok(Some(c)),
            None => self.read_claim(event_id).await,
        }
    }

    /// The claim of `event_id`, read linearizably (None when there is none).
    pub async fn read_claim(&self, event_id: &str) -> Result<Option<StoredClaim>, StoreError> {
        self.read_claim_with(&self.read_claim, event_id).await
    }

    async fn read_claim_with(
        &self,
        statement: &PreparedStatement,
        event_id: &str,
    ) -> Result<Option<StoredClaim>, StoreError> {
        let res = self
            .traced(
                "read claim",
                ("SELECT", "processed_events"),
                self.session.execute_unpaged(statement, (event_id,)),
            )
            .await?;
        let row = res
            .into_rows_result()
            .map_err(|e| StoreError::from_exec("read claim", e))?
            .maybe_first_row::<(
                Option<String>,
                Option<String>,
                Option<i32>,
                Option<i64>,
                Option<i64>,
            )>()
            .map_err(|e| StoreError::from_exec("read claim", e))?;
        Ok(row.map(
            |(status, topic, partition, offset, delivered_at)| StoredClaim {
                status,
                owner: Position {
                    topic: topic.unwrap_or_default(),
                    partition: partition.unwrap_or(-1),
                    offset: offset.unwrap_or(-1),
                },
                delivered_at: delivered_at.and_then(EpochMillis::new),
            },
        ))
    }

    async fn reset_claim(&self, event_id: &str, pos: &Position) -> Result<(), StoreError> {
        self.set_owned_status(&self.reset_claim, "reset claim", event_id, pos)
            .await
    }

    /// Runs a status update (`reset_claim`, `mark_dead`) guarded by `pos` still owning the claim;
    /// both bind (TTL, event id, topic, partition, offset).
    async fn set_owned_status(
        &self,
        statement: &PreparedStatement,
        op: &'static str,
        event_id: &str,
        pos: &Position,
    ) -> Result<(), StoreError> {
        self.traced(
            op,
            ("UPDATE", "processed_events"),
            self.session.execute_unpaged(
                statement,
                (
                    self.dedup_ttl_secs,
                    event_id,
                    &pos.topic,
                    pos.partition,
                    pos.offset,
                ),
            ),
        )
        .await?;
        Ok(())
    }

    async fn take_over(
        &self,
        event_id: &str,
        pos: &Position,
        instance: &str,
    ) -> Result<bool, StoreError> {
        let res = self
            .traced(
                "take over claim",
                ("UPDATE", "processed_events"),
                self.session.execute_unpaged(
                    &self.take_over,
                    (
                        self.dedup_ttl_secs,
                        &pos.topic,
                        pos.partition,
                        pos.offset,
                        instance,
                        event_id,
                    ),
                ),
            )
            .await?;
        lwt_applied(res).map_err(|e| StoreError::from_exec("take over claim", e))
    }

    /// Marks a claim dead-lettered (only if `pos` still owns it), so a redriven copy may take it over.
    pub async fn mark_dead_lettered(
        &self,
        event_id: &str,
        pos: &Position,
    ) -> Result<(), StoreError> {
        self.set_owned_status(&self.mark_dead, "mark dead-lettered", event_id, pos)
            .await
    }

    /// Moves the reconnect flag of (`vehicle`, `key`) to `state` as of delivery time `at` for event
    /// `event_id`; true when this event is the one that changed the flag's state (so its action
    /// must be emitted — again, if an earlier attempt's transaction aborted).
    ///
    /// Compare-and-set with lightweight transactions: an older or equal `at` never moves the flag,
    /// a newer one with the same state only advances `at`, a newer one with the other state flips
    /// it. No flag yet counts as "clear": a first RESOLVED records itself without an action.
    pub async fn move_reconnect_flag(
        &self,
        vehicle: &str,
        key: &str,
        state: &str,
        at: i64,
        event_id: &str,
    ) -> Result<bool, StoreError> {
        const OP: &str = "reconnect flag";
        let err = |e: &dyn std::fmt::Display| StoreError::Transient {
            op: OP,
            message: e.to_string(),
        };
        for _ in 0..8 {
            let row = self
                .traced(
                    OP,
                    ("SELECT", "reconnect_flags"),
                    self.session
                        .execute_unpaged(&self.read_flag, (vehicle, key)),
                )
                .await?
                .into_rows_result()
                .map_err(|e| err(&e))?
                .maybe_first_row::<(Option<String>, Option<i64>, Option<String>, Option<String>)>()
                .map_err(|e| err(&e))?;
            let Some((cur_state, cur_at, cur_event, changed_by)) = row else {
                let sets = state == "ERROR";
                let res = self
                    .traced(
                        OP,
                        ("INSERT", "reconnect_flags"),
                        self.session.execute_unpaged(
                            &self.insert_flag,
                            (vehicle, key, state, at, event_id, sets.then_some(event_id)),
                        ),
                    )
                    .await?;
                if lwt_applied(res).map_err(|e| err(&e))? {
                    return Ok(sets);
                }
                continue;
            };
            if changed_by.as_deref() == Some(event_id) {
                return Ok(true);
            }
            let cur_at = cur_at.unwrap_or(i64::MIN);
            if cur_event.as_deref() == Some(event_id) || at <= cur_at {
                return Ok(false);
            }
            let changes = cur_state.as_deref() != Some(state);
            let new_changed_by = if changes {
                Some(event_id)
            } else {
                changed_by.as_deref()
            };
            let res = self
                .traced(
                    OP,
                    ("UPDATE", "reconnect_flags"),
                    self.session.execute_unpaged(
                        &self.update_flag,
                        (
                            state,
                            at,
                            event_id,
                            new_changed_by,
                            vehicle,
                            key,
                            cur_at,
                            cur_event.as_deref().unwrap_or(""),
                        ),
                    ),
                )
                .await?;
            if lwt_applied(res).map_err(|e| err(&e))? {
                return Ok(changes);
            }
        }
        Err(StoreError::Transient {
            op: OP,
            message: format!("flag {vehicle}/{key} kept changing under contention; retrying"),
        })
    }

    /// Every stored state cell of a vehicle, with its write timestamp and the event that wrote it.
    pub async fn cells(&self, vehicle: &str) -> Result<Vec<StoredCell>, StoreError> {
        const OP: &str = "read vehicle cells";
        // The two tables are read at once.
        let (signals, errors) = tokio::try_join!(
            self.traced(
                OP,
                ("SELECT", "signal_state"),
                self.session.execute_unpaged(&self.signal_cells, (vehicle,)),
            ),
            self.traced(
                OP,
                ("SELECT", "vehicle_errors"),
                self.session.execute_unpaged(&self.error_cells, (vehicle,)),
            ),
        )?;
        cells_from(signals, errors).map_err(|e| StoreError::from_exec(OP, e))
    }

    /// Compares a plan with the stored write times: (cells the plan would change, cells that lose
    /// to a fresher stored value). Used by replay accounting and dry runs; live processing never
    /// reads before writing.
    pub async fn compare(&self, plan: &Plan) -> Result<(u64, u64), StoreError> {
        let Some(vehicle) = plan.vehicle.as_ref().map(|v| v.as_str()) else {
            return Ok((0, 0));
        };
        let rows = self
            .traced(
                "read signal write times",
                ("SELECT", "signal_state"),
                self.session.execute_unpaged(&self.signal_times, (vehicle,)),
            )
            .await?
            .into_rows_result()
            .map_err(|e| StoreError::from_exec("read signal write times", e))?;
        let mut signals = std::collections::HashMap::new();
        for row in rows
            .rows::<(String, Option<i64>, Option<i64>)>()
            .map_err(|e| StoreError::from_exec("read signal write times", e))?
        {
            let (code, v, a) =
                row.map_err(|e| StoreError::from_exec("read signal write times", e))?;
            signals.insert(code, (v, a));
        }
        let rows = self
            .traced(
                "read error write times",
                ("SELECT", "vehicle_errors"),
                self.session.execute_unpaged(&self.error_times, (vehicle,)),
            )
            .await?
            .into_rows_result()
            .map_err(|e| StoreError::from_exec("read error write times", e))?;
        let mut errors = std::collections::HashMap::new();
        for row in rows
            .rows::<(String, Option<i64>)>()
            .map_err(|e| StoreError::from_exec("read error write times", e))?
        {
            let (key, t) = row.map_err(|e| StoreError::from_exec("read error write times", e))?;
            errors.insert(key, t);
        }
        let newer = |planned: i64, stored: Option<i64>| stored.is_none_or(|s| planned > s);
        let mut counts = (0u64, 0u64);
        let mut tally = |is_newer: bool| {
            if is_newer {
                counts.0 += 1
            } else {
                counts.1 += 1
            }
        };
        for w in &plan.values {
            tally(newer(
                w.value.timestamp,
                signals.get(w.code.as_str()).and_then(|s| s.0),
            ));
        }
        for w in &plan.availability {
            tally(newer(
                w.availability.timestamp,
                signals.get(w.code.as_str()).and_then(|s| s.1),
            ));
        }
        for w in &plan.errors {
            tally(newer(
                w.state.timestamp,
                errors.get(&w.key).copied().flatten(),
            ));
        }
        Ok(counts)
    }

    /// Executes a plan in one round trip: an unlogged batch of every write, all keyed by the one
    /// vehicle (a single partition of each table). Each statement keeps its own write timestamp:
    /// values by the car's clock, availability and errors by delivery time. Idempotent.
    pub async fn apply(&self, plan: &Plan) -> Result<(), StoreError> {
        let Some(vehicle) = plan.vehicle.as_ref().map(|v| v.as_str()) else {
            return Ok(());
        };
        let mut batch = Batch::new(BatchType::Unlogged);
        let mut rows: Vec<StateRow<'_>> = Vec::new();
        for w in &plan.values {
            batch.append_statement(self.put_value.clone());
            rows.push(StateRow::Keyed(
                w.value.timestamp,
                &w.value.doc,
                vehicle,
                w.code.as_str(),
            ));
        }
        for w in &plan.availability {
            batch.append_statement(self.put_availability.clone());
            rows.push(StateRow::Keyed(
                w.availability.timestamp,
                &w.availability.doc,
                vehicle,
                w.code.as_str(),
            ));
        }
        for w in &plan.errors {
            batch.append_statement(self.put_error.clone());
            rows.push(StateRow::Keyed(
                w.state.timestamp,
                &w.state.doc,
                vehicle,
                &w.key,
            ));
        }
        if let Some(info) = &plan.vehicle_info {
            batch.append_statement(self.put_vehicle.clone());
            rows.push(StateRow::Vehicle(info.timestamp, &info.doc, vehicle));
        }
        if let Some(w) = &plan.last_webhook {
            batch.append_statement(self.put_last_webhook.clone());
            rows.push(StateRow::Time(w.timestamp, w.value, vehicle));
        }
        if let Some(user) = &plan.user {
            batch.append_statement(self.put_user.clone());
            rows.push(StateRow::Vehicle(user.timestamp, &user.doc, vehicle));
        }
        if rows.is_empty() {
            return Ok(());
        }
        // One span for the batch: several tables of one vehicle, no single collection name.
        let op = "write vehicle state";
        let res = shared::cql_trace::run(
            &self.keyspace,
            ("BATCH UPDATE", None),
            self.session.batch(&batch, rows),
            |e| StoreError::from_exec(op, e).kind(),
            |result, took| self.observe(("BATCH UPDATE", "batch"), result, took),
        )
        .await;
        res.map_err(|e| StoreError::from_exec("write vehicle state", e))?;
        Ok(())
    }

    /// Runs one statement execution inside its CQL CLIENT span ([`shared::cql_trace`]); `op`
    /// names it in errors, `(operation, table)` in the trace.
    async fn traced(
        &self,
        op: &'static str,
        (operation, table): (&'static str, &'static str),
        exec: impl std::future::Future<Output = Result<QueryResult, ExecutionError>>,
    ) -> Result<QueryResult, StoreError> {
        traced(
            &self.keyspace,
            op,
            (operation, table),
            exec,
            |result, took| {
                self.observe((operation, table), result, took);
            },
        )
        .await
    }

    /// One execution's duration by operation, table and result, when a histogram is attached.
    fn observe(
        &self,
        (operation, table): (&'static str, &'static str),
        result: &'static str,
        took: Duration,
    ) {
        if let Some(h) = &self.cql_duration {
            h.get_or_create(&[
                ("operation", operation),
                ("table", table),
                ("result", result),
            ])
            .observe(took.as_secs_f64());
        }
    }
}

/// Runs one statement execution on `table` of `keyspace` inside its CQL CLIENT span
/// ([`shared::cql_trace`]), for the processor's and the poller's stores: `op` names it in errors,
/// `(operation, table)` in the trace, and `observe` gets its result class and duration.
pub(crate) async fn traced(
    keyspace: &str,
    op: &'static str,
    (operation, table): (&'static str, &'static str),
    exec: impl std::future::Future<Output = Result<QueryResult, ExecutionError>>,
    observe: impl FnOnce(&'static str, Duration),
) -> Result<QueryResult, StoreError> {
    shared::cql_trace::run(
        keyspace,
        (operation, Some(table)),
        exec,
        |e| StoreError::from_exec(op, e).kind(),
        observe,
    )
    .await
    .map_err(|e| StoreError::from_exec(op, e))
}

/// The bound values of one state write: (write timestamp, document, vehicle, code or error key),
/// or (write timestamp, document, vehicle) for the vehicle row.
enum StateRow<'a> {
    Keyed(i64, &'a str, &'a str, &'a str),
    Vehicle(i64, &'a str, &'a str),
    Time(i64, i64, &'a str),
}

impl SerializeRow for StateRow<'_> {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter,
    ) -> Result<(), SerializationError> {
        match self {
            Self::Keyed(t, doc, v, k) => (t, doc, v, k).serialize(ctx, writer),
            Self::Vehicle(t, doc, v) => (t, doc, v).serialize(ctx, writer),
            Self::Time(t, at, v) => (t, at, v).serialize(ctx, writer),
        }
    }

    fn is_empty(&self) -> bool {
        false
    }
}
