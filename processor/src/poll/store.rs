//! What the poller reads and writes in the CQL store: the vehicle's user id (kept by the
//! processor from webhooks), its open errors (a vehicle waiting for its user to reconnect is not
//! polled), its budget state (last poll, a block after a vehicle-scoped 429 or a 430) and the
//! monthly request count, plus the vehicles with a webhook since a time (resync, safety net).

use std::sync::Arc;

use futures::TryStreamExt;
use scylla::client::session::Session;
use scylla::errors::ExecutionError;
use scylla::response::query_result::QueryResult;
use scylla::statement::prepared::PreparedStatement;
use serde_json::Value;
use shared::clock::EpochMillis;
use shared::ids::VehicleId;

use crate::store::StoreError;

/// A vehicle's budget state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VehicleBudget {
    /// When the last request to the vehicle API was sent (answered or not), epoch ms.
    pub last_polled_at: Option<i64>,
    pub blocked_until: Option<i64>,
    pub blocked_reason: Option<String>,
    /// Requests made this calendar month.
    pub requests_this_month: i64,
}

/// Error types that need the user to act before the vehicle can be read
/// (`SMARTCAR-REST.md` §6: don't poll these).
fn blocks_polling(state: &Value) -> bool {
    let s = |k: &str| state.get(k).and_then(Value::as_str);
    s("state") == Some("ERROR")
        && (matches!(s("type"), Some("PERMISSION" | "CONNECTED_SERVICES_ACCOUNT"))
            || s("resolution") == Some("REAUTHENTICATE")
            || state.get("needsReconnect").and_then(Value::as_bool) == Some(true))
}

/// `YYYY-MM` (UTC) of an instant: the monthly cap's period.
pub fn month_of(t: EpochMillis) -> String {
    let d = time::OffsetDateTime::from_unix_timestamp(t.as_i64() / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}", d.year(), u8::from(d.month()))
}

/// The first instant of the month after `t` (UTC), epoch ms: when a 430 block ends.
pub fn next_month_start(t: EpochMillis) -> i64 {
    let d = time::OffsetDateTime::from_unix_timestamp(t.as_i64() / 1000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (y, m) = match d.month() {
        time::Month::December => (d.year() + 1, time::Month::January),
        m => (d.year(), m.next()),
    };
    time::Date::from_calendar_date(y, m, 1)
        .map(|date| date.midnight().assume_utc().unix_timestamp() * 1000)
        .unwrap_or(i64::MAX)
}

/// Prepared statements of the poller.
#[derive(Clone)]
pub struct PollStore {
    session: Arc<Session>,
    keyspace: String,
    user: PreparedStatement,
    errors: PreparedStatement,
    budget: PreparedStatement,
    count: PreparedStatement,
    count_request: PreparedStatement,
    polled: PreparedStatement,
    block: PreparedStatement,
}

impl PollStore {
    /// Prepares every statement (the migrations must have run).
    pub async fn prepare(session: Arc<Session>, keyspace: &str) -> Result<Self, StoreError> {
        let ks = keyspace;
        let p = |q: String| {
            let session = Arc::clone(&session);
            async move {
                session
                    .prepare(q)
                    .await
                    .map_err(|e| StoreError::from_exec("prepare poller statement", e))
            }
        };
        Ok(Self {
            user: p(format!(
                "SELECT user_id FROM {ks}.vehicle_users WHERE vehicle_id = ?"
            ))
            .await?,
            errors: p(format!(
                "SELECT state FROM {ks}.vehicle_errors WHERE vehicle_id = ?"
            ))
            .await?,
            budget: p(format!(
                "SELECT last_polled_at, blocked_until, blocked_reason FROM {ks}.poll_vehicles WHERE vehicle_id = ?"
            ))
            .await?,
            count: p(format!(
                "SELECT requests FROM {ks}.poll_counts WHERE vehicle_id = ? AND month = ?"
            ))
            .await?,
            count_request: p(format!(
                "UPDATE {ks}.poll_counts SET requests = requests + 1 WHERE vehicle_id = ? AND month = ?"
            ))
            .await?,
            polled: p(format!(
                "UPDATE {ks}.poll_vehicles SET last_polled_at = ? WHERE vehicle_id = ?"
            ))
            .await?,
            block: p(format!(
                "UPDATE {ks}.poll_vehicles SET blocked_until = ?, blocked_reason = ? WHERE vehicle_id = ?"
            ))
            .await?,
            session,
            keyspace: keyspace.to_string(),
        })
    }

    /// Runs one statement execution inside its CQL CLIENT span, as the processor's store does: a
    /// polled value's trace shows each round trip to the store.
    async fn traced(
        &self,
        op: &'static str,
        (operation, table): (&'static str, &'static str),
        exec: impl std::future::Future<Output = Result<QueryResult, ExecutionError>>,
    ) -> Result<QueryResult, StoreError> {
        crate::store::traced(&self.keyspace, op, (operation, table), exec, |_, _| {}).await
    }

    /// The vehicle's Smartcar user id, as the last event that carried one said.
    pub async fn user_of(&self, vehicle: &VehicleId) -> Result<Option<String>, StoreError> {
        let op = "read vehicle user";
        let row = self
            .traced(
                op,
                ("SELECT", "vehicle_users"),
                self.session
                    .execute_unpaged(&self.user, (vehicle.as_str(),)),
            )
            .await?
            .into_rows_result()
            .map_err(|e| StoreError::from_exec(op, e))?
            .maybe_first_row::<(Option<String>,)>()
            .map_err(|e| StoreError::from_exec(op, e))?;
        Ok(row.and_then(|(u,)| u))
    }

    /// The keys of the vehicle's open errors that need the user to reconnect (PERMISSION,
    /// CONNECTED_SERVICES_ACCOUNT, or a REAUTHENTICATE resolution).
    pub async fn reconnect_errors(&self, vehicle: &VehicleId) -> Result<Vec<String>, StoreError> {
        let op = "read vehicle errors";
        let rows = self
            .traced(
                op,
                ("SELECT", "vehicle_errors"),
                self.session
                    .execute_unpaged(&self.errors, (vehicle.as_str(),)),
            )
            .await?
            .into_rows_result()
            .map_err(|e| StoreError::from_exec(op, e))?;
        let mut open = Vec::new();
        for row in rows
            .rows::<(Option<String>,)>()
            .map_err(|e| StoreError::from_exec(op, e))?
        {
            let (state,) = row.map_err(|e| StoreError::from_exec(op, e))?;
            let state: Value = state
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or(Value::Null);
            if blocks_polling(&state) {
                let t = state.get("type").and_then(Value::as_str).unwrap_or("?");
                open.push(match state.get("code").and_then(Value::as_str) {
                    Some(c) => format!("{t}:{c}"),
                    None => t.to_string(),
                });
            }
        }
        Ok(open)
    }

    /// The vehicle's budget state at `now`.
    pub async fn budget(
        &self,
        vehicle: &VehicleId,
        now: EpochMillis,
    ) -> Result<VehicleBudget, StoreError> {
        let op = "read poll budget";
        let row = self
            .traced(
                op,
                ("SELECT", "poll_vehicles"),
                self.session
                    .execute_unpaged(&self.budget, (vehicle.as_str(),)),
            )
            .await?
            .into_rows_result()
            .map_err(|e| StoreError::from_exec(op, e))?
            .maybe_first_row::<(Option<i64>, Option<i64>, Option<String>)>()
            .map_err(|e| StoreError::from_exec(op, e))?;
        let (last_polled_at, blocked_until, blocked_reason) = row.unwrap_or_default();
        Ok(VehicleBudget {
            last_polled_at,
            blocked_until,
            blocked_reason,
            requests_this_month: self.requests_this_month(vehicle, now).await?,
        })
    }

    /// Requests made to the vehicle API for `vehicle` in the month of `now`.
    pub async fn requests_this_month(
        &self,
        vehicle: &VehicleId,
        now: EpochMillis,
    ) -> Result<i64, StoreError> {
        let op = "read poll request count";
        let count = self
            .traced(
                op,
                ("SELECT", "poll_counts"),
                self.session
                    .execute_unpaged(&self.count, (vehicle.as_str(), month_of(now))),
            )
            .await?
            .into_rows_result()
            .map_err(|e| StoreError::from_exec(op, e))?
            .maybe_first_row::<(Option<scylla::value::Counter>,)>()
            .map_err(|e| StoreError::from_exec(op, e))?;
        Ok(count.and_then(|(c,)| c).map_or(0, |c| c.0))
    }

    /// Counts one request to the vehicle API against the vehicle's month.
    pub async fn count_request(
        &self,
        vehicle: &VehicleId,
        now: EpochMillis,
    ) -> Result<(), StoreError> {
        self.traced(
            "count poll request",
            ("UPDATE", "poll_counts"),
            self.session
                .execute_unpaged(&self.count_request, (vehicle.as_str(), month_of(now))),
        )
        .await?;
        Ok(())
    }

    /// Records that a request for the vehicle was sent at `at`, whatever its answer (the minimum
    /// interval counts from here).
    pub async fn polled(&self, vehicle: &VehicleId, at: EpochMillis) -> Result<(), StoreError> {
        self.traced(
            "record poll",
            ("UPDATE", "poll_vehicles"),
            self.session
                .execute_unpaged(&self.polled, (at.as_i64(), vehicle.as_str())),
        )
        .await?;
        Ok(())
    }

    /// Blocks polling the vehicle until `until` (epoch ms), saying why.
    pub async fn block(
        &self,
        vehicle: &VehicleId,
        until: i64,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.traced(
            "block vehicle polling",
            ("UPDATE", "poll_vehicles"),
            self.session
                .execute_unpaged(&self.block, (until, reason, vehicle.as_str())),
        )
        .await?;
        Ok(())
    }

    /// Vehicles whose last webhook was delivered at or after `since` (a full scan of the vehicles
    /// table, paged: for operator resyncs and the periodic safety net, not the record path).
    /// Polled events do not count: the safety net would otherwise keep polling a parked vehicle
    /// because of its own polls. A row last written before `last_webhook_at` existed falls back
    /// to `info.lastDeliveredAt`, unless its last event was a poll.
    pub async fn active_since(&self, since: EpochMillis) -> Result<Vec<VehicleId>, StoreError> {
        let op = "scan vehicles";
        let pager = self
            .session
            .query_iter(
                format!(
                    "SELECT vehicle_id, last_webhook_at, info FROM {}.vehicles",
                    self.keyspace
                ),
                (),
            )
            .await
            .map_err(|e| StoreError::from_exec(op, e))?;
        let mut rows = pager
            .rows_stream::<(String, Option<i64>, Option<String>)>()
            .map_err(|e| StoreError::from_exec(op, e))?;
        let mut out = Vec::new();
        while let Some((vehicle, webhook_at, info)) = rows
            .try_next()
            .await
            .map_err(|e| StoreError::from_exec(op, e))?
        {
            let last = webhook_at.or_else(|| {
                let info = serde_json::from_str::<Value>(info.as_deref()?).ok()?;
                let polled = info
                    .get("lastEventId")
                    .and_then(Value::as_str)
                    .is_some_and(|id| id.starts_with(shared::smartcar_api::POLL_EVENT_ID_PREFIX));
                (!polled)
                    .then(|| info.get("lastDeliveredAt").and_then(Value::as_i64))
                    .flatten()
            });
            if last.is_some_and(|t| t >= since.as_i64()) {
                if let Ok(v) = VehicleId::parse(vehicle) {
                    out.push(v);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The codes among `codes` whose stored value is older than `older_than` (or missing).
    pub async fn stale_signals(
        &self,
        vehicle: &VehicleId,
        codes: &[String],
        older_than: EpochMillis,
    ) -> Result<Vec<String>, StoreError> {
        let op = "read signal freshness";
        let rows = self
            .traced(
                op,
                ("SELECT", "signal_state"),
                self.session.query_unpaged(
                    format!(
                        "SELECT code, value FROM {}.signal_state WHERE vehicle_id = ?",
                        self.keyspace
                    ),
                    (vehicle.as_str(),),
                ),
            )
            .await?
            .into_rows_result()
            .map_err(|e| StoreError::from_exec(op, e))?;
        let mut fresh = std::collections::HashSet::new();
        for row in rows
            .rows::<(String, Option<String>)>()
            .map_err(|e| StoreError::from_exec(op, e))?
        {
            let (code, value) = row.map_err(|e| StoreError::from_exec(op, e))?;
            let at = value
                .and_then(|v| serde_json::from_str::<Value>(&v).ok())
                .and_then(|v| v.get("freshness").and_then(Value::as_i64));
            if at.is_some_and(|t| t >= older_than.as_i64()) {
                fresh.insert(code);
            }
        }
        Ok(codes
            .iter()
            .filter(|c| !fresh.contains(*c))
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reconnect_errors_block_polling_others_do_not() {
        assert!(blocks_polling(
            &json!({"state":"ERROR","type":"PERMISSION"})
        ));
        assert!(blocks_polling(
            &json!({"state":"ERROR","type":"CONNECTED_SERVICES_ACCOUNT","code":"ACCOUNT_ISSUE"})
        ));
        assert!(blocks_polling(
            &json!({"state":"ERROR","type":"VEHICLE_STATE","resolution":"REAUTHENTICATE"})
        ));
        assert!(!blocks_polling(
            &json!({"state":"RESOLVED","type":"PERMISSION"})
        ));
        assert!(!blocks_polling(&json!({"state":"ERROR","type":"UPSTREAM"})));
    }

    #[test]
    fn months_roll_over_in_utc() {
        let t = |ms| EpochMillis::new(ms).unwrap_or_else(EpochMillis::now);
        // 2026-12-31T23:59:59Z
        assert_eq!(month_of(t(1_798_761_599_000)), "2026-12");
        assert_eq!(next_month_start(t(1_798_761_599_000)), 1_798_761_600_000);
        // 2026-11-30T05:00:00Z
        assert_eq!(month_of(t(1_796_014_800_000)), "2026-11");
        assert_eq!(month_of(t(1_798_761_600_000)), "2027-01");
    }
}
