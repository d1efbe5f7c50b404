//! A vehicle's state document — what `processor state <id>` prints and what every record of the
//! state changelog carries — and the cells it is rendered from.
//!
//! The store keeps state as cells, each with a CQL write timestamp (see [`crate::effects`]): per
//! signal a value and an availability, per vehicle error its state. A [`View`] holds the part of
//! each cell the document shows, with that timestamp, and applies a [`Plan`] the way the store
//! does: a cell is replaced only by a write with a higher timestamp. So the processor can tell
//! whether an event changed the document without reading the store, and `processor state` renders
//! the same document from the stored cells through the same code.
//!
//! At *equal* timestamps Cassandra and ScyllaDB keep the cell with the greater value (byte order).
//! Equal timestamps are common: a webhook and a poll, or two deliveries, carrying the same reading
//! under different event ids. Each part keeps a tie key that orders like the stored bytes (the
//! documents are serde_json objects, keys in sorted order: a value document starts with its body,
//! then its event id), so a view settles ties as the store does.
//!
//! Bookkeeping (the last event seen, its delivery time) is not part of the document: it changes on
//! every event, so a changelog keyed on it would change on every event too.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::effects::Plan;

/// The document schema's version (the `version` field); bumped on any incompatible change.
pub const DOCUMENT_VERSION: u32 = 1;

/// The part of one cell the document shows, the cell's write timestamp (µs), and a key that
/// orders like the stored document at equal timestamps (None: not known, the cell is kept).
#[derive(Debug, Clone, PartialEq)]
struct Stamped {
    ts: i64,
    part: Value,
    tie: Option<Vec<String>>,
}

/// Sorts after every JSON text: an availability document without an `error` key.
const NO_ERROR_KEY: &str = "\u{7f}";

/// A signal's two cells.
#[derive(Debug, Clone, Default, PartialEq)]
struct SignalCells {
    value: Option<Stamped>,
    availability: Option<Stamped>,
}

/// A vehicle's cells, as far as the document is concerned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    signals: BTreeMap<String, SignalCells>,
    /// Error key → its state cell (the stored error document; shown while in `ERROR`).
    errors: BTreeMap<String, Stamped>,
}

/// Why a changelog record could not be turned back into a view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("state changelog record of vehicle {vehicle}: {message}")]
    Record { vehicle: String, message: String },
}

/// Fields of a value cell the document shows.
const VALUE_FIELDS: [&str; 6] = [
    "body",
    "oemUpdatedAt",
    "fetchedAt",
    "eventId",
    "logicVersion",
    "source",
];

fn parse(doc: &str) -> Value {
    serde_json::from_str(doc).unwrap_or(Value::Null)
}

fn value_part(raw: &Value) -> Value {
    let mut m = Map::new();
    for f in VALUE_FIELDS {
        m.insert(f.into(), raw.get(f).cloned().unwrap_or(Value::Null));
    }
    // Values stored before polling existed carry no source: they all came from webhooks. Filled in
    // here so a view read from the store and one restored from the changelog are equal.
    if m.get("source").is_none_or(Value::is_null) {
        m.insert("source".into(), Value::from("webhook"));
    }
    Value::Object(m)
}

/// A value document's bytes are `{"body":…,"eventId":…,…`: body, then event id, decide a tie.
fn value_tie(part: &Value) -> Option<Vec<String>> {
    let text = |f: &str| {
        part.get(f)
            .map(Value::to_string)
            .unwrap_or_else(|| "null".into())
    };
    Some(vec![text("body"), text("eventId")])
}

/// An availability document's bytes start with `{"error":…` when it has that key, else with
/// `{"eventId"` (greater): the error decides a tie; two without one render alike.
fn availability_tie(raw: &Value) -> Option<Vec<String>> {
    Some(vec![raw
        .get("error")
        .map_or_else(|| NO_ERROR_KEY.to_owned(), Value::to_string)])
}

/// What the document shows of an availability cell: the status, and while the signal is not
/// available, the error and since when. "Available since" is not shown: every good value moves it.
fn availability_part(raw: &Value) -> Value {
    let status = raw
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("available");
    let away = status != "available";
    json!({
        "status": status,
        "error": raw.get("error").filter(|e| away && !e.is_null()).cloned(),
        "since": raw.get("since").filter(|_| away).cloned(),
    })
}

/// Keeps the cell the store keeps: the higher write timestamp, at equal timestamps the greater
/// document; true when `new` won.
fn newer(slot: &mut Option<Stamped>, new: Stamped) -> bool {
    let wins = match slot {
        None => true,
        Some(cur) if new.ts != cur.ts => new.ts > cur.ts,
        Some(cur) => matches!((&cur.tie, &new.tie), (Some(a), Some(b)) if b > a),
    };
    if wins {
        *slot = Some(new);
    }
    wins
}

/// True for an error document in state `ERROR` (an active error).
fn is_active(part: &Value) -> bool {
    part.get("state").and_then(Value::as_str) == Some("ERROR")
}

impl View {
    /// Adds a stored value cell (raw JSON document, write timestamp).
    pub fn put_value(&mut self, code: &str, doc: &str, ts: i64) {
        let s = self.signals.entry(code.to_owned()).or_default();
        let part = value_part(&parse(doc));
        let tie = value_tie(&part);
        newer(&mut s.value, Stamped { ts, part, tie });
    }

    /// Adds a stored availability cell.
    pub fn put_availability(&mut self, code: &str, doc: &str, ts: i64) {
        let s = self.signals.entry(code.to_owned()).or_default();
        let raw = parse(doc);
        newer(
            &mut s.availability,
            Stamped {
                ts,
                part: availability_part(&raw),
                tie: availability_tie(&raw),
            },
        );
    }

    /// Adds a stored vehicle-error cell.
    pub fn put_error(&mut self, key: &str, doc: &str, ts: i64) {
        let mut slot = self.errors.remove(key);
        let part = parse(doc);
        let tie = Some(vec![part.to_string()]);
        newer(&mut slot, Stamped { ts, part, tie });
        if let Some(s) = slot {
            self.errors.insert(key.to_owned(), s);
        }
    }

    /// Adds a stored cell of any kind.
    pub fn put(&mut self, cell: &crate::store::StoredCell) {
        use crate::store::CellKind;
        match &cell.kind {
            CellKind::Value(code) => self.put_value(code, &cell.doc, cell.timestamp),
            CellKind::Availability(code) => self.put_availability(code, &cell.doc, cell.timestamp),
            CellKind::Error(key) => self.put_error(key, &cell.doc, cell.timestamp),
        }
    }

    /// Applies a plan's writes as the store does (a higher timestamp wins per cell).
    pub fn apply(&mut self, plan: &Plan) {
        for w in &plan.values {
            self.put_value(w.code.as_str(), &w.value.doc, w.value.timestamp);
        }
        for w in &plan.availability {
            self.put_availability(
                w.code.as_str(),
                &w.availability.doc,
                w.availability.timestamp,
            );
        }
        for w in &plan.errors {
            self.put_error(&w.key, &w.state.doc, w.state.timestamp);
        }
    }

    /// True when no cell is known.
    pub fn is_empty(&self) -> bool {
        self.signals.is_empty() && self.errors.is_empty()
    }

    /// The state document (schema in the README, "Vehicle state document").
    pub fn render(&self, vehicle: &str) -> Value {
        let mut signals = Map::new();
        let mut unsupported = Vec::new();
        for (code, cells) in &self.signals {
            let value = cells.value.as_ref().map(|s| &s.part);
            let avail = cells.availability.as_ref().map(|s| &s.part);
            let status = avail
                .and_then(|a| a.get("status"))
                .and_then(Value::as_str)
                .unwrap_or("available");
            if status == "unsupported" {
                unsupported.push(Value::from(code.clone()));
            }
            let field = |f: &str| value.and_then(|v| v.get(f)).cloned().unwrap_or(Value::Null);
            let from_avail = |f: &str| avail.and_then(|a| a.get(f)).cloned().unwrap_or(Value::Null);
            signals.insert(
                code.clone(),
                json!({
                    "body": field("body"),
                    "status": status,
                    "oemUpdatedAt": field("oemUpdatedAt"),
                    "fetchedAt": field("fetchedAt"),
                    "eventId": field("eventId"),
                    "logicVersion": field("logicVersion"),
                    // `webhook` or `poll` (see `value_part`); null without a value.
                    "source": field("source"),
                    "error": from_avail("error"),
                    "unavailableSince": from_avail("since"),
                }),
            );
        }
        let mut active = Vec::new();
        let mut needs_reconnect = false;
        let mut backoff_until: Option<i64> = None;
        for (key, cell) in &self.errors {
            let Value::Object(doc) = &cell.part else {
                continue;
            };
            if !is_active(&cell.part) {
                continue;
            }
            needs_reconnect |= doc
                .get("needsReconnect")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if let Some(b) = doc.get("backoffUntil").and_then(Value::as_i64) {
                backoff_until = Some(backoff_until.map_or(b, |x| x.max(b)));
            }
            let mut e = doc.clone();
            e.insert("key".into(), Value::from(key.clone()));
            active.push(Value::Object(e));
        }
        json!({
            "version": DOCUMENT_VERSION,
            "vehicleId": vehicle,
            "signals": signals,
            "needsReconnect": needs_reconnect,
            "unsupportedSignals": unsupported,
            "activeErrors": active,
            "rateLimitedUntil": backoff_until,
        })
    }

    /// Every cell's write timestamp: `{"v":{code:ts},"a":{code:ts},"e":{key:ts}}`. With the
    /// rendered document it is enough to rebuild the view ([`View::restore`]).
    pub fn cell_times(&self) -> Value {
        let mut v = Map::new();
        let mut a = Map::new();
        for (code, cells) in &self.signals {
            if let Some(s) = &cells.value {
                v.insert(code.clone(), Value::from(s.ts));
            }
            if let Some(s) = &cells.availability {
                a.insert(code.clone(), Value::from(s.ts));
            }
        }
        let e: Map<String, Value> = self
            .errors
            .iter()
            .map(|(k, s)| (k.clone(), Value::from(s.ts)))
            .collect();
        json!({ "v": v, "a": a, "e": e })
    }

    /// Rebuilds a view from a changelog record: its document and its cell times header.
    pub fn restore(vehicle: &str, doc: &Value, times: &Value) -> Result<View, ViewError> {
        let bad = |message: String| ViewError::Record {
            vehicle: vehicle.to_owned(),
            message,
        };
        if doc.get("version").and_then(Value::as_u64) != Some(u64::from(DOCUMENT_VERSION)) {
            return Err(bad(format!(
                "document version {} is not {DOCUMENT_VERSION}",
                doc.get("version").unwrap_or(&Value::Null)
            )));
        }
        let ts = |kind: &str, name: &str| -> Result<Option<i64>, ViewError> {
            match times.get(kind).and_then(|m| m.get(name)) {
                None => Ok(None),
                Some(t) => t
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("cell time {kind}.{name} is not an integer"))),
            }
        };
        let mut view = View::default();
        let empty = Map::new();
        let signals = doc
            .get("signals")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for (code, entry) in signals {
            let mut cells = SignalCells::default();
            if let Some(t) = ts("v", code)? {
                let part = value_part(entry);
                cells.value = Some(Stamped {
                    ts: t,
                    tie: value_tie(&part),
                    part,
                });
            }
            if let Some(t) = ts("a", code)? {
                let mut raw = entry.clone();
                if let Some(m) = raw.as_object_mut() {
                    let since = m.remove("unavailableSince").unwrap_or(Value::Null);
                    m.insert("since".into(), since);
                }
                // An available cell's stored document may carry `"error":null` (a resolved
                // incompatibility) or no error key; the document does not say which.
                let part = availability_part(&raw);
                let tie = match part.get("error") {
                    Some(e) if !e.is_null() => Some(vec![e.to_string()]),
                    _ => Some(vec![NO_ERROR_KEY.to_owned()]),
                };
                cells.availability = Some(Stamped { ts: t, part, tie });
            }
            view.signals.insert(code.clone(), cells);
        }
        let mut active: BTreeMap<String, Value> = BTreeMap::new();
        for e in doc
            .get("activeErrors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut e = e.as_object().cloned().unwrap_or_default();
            let Some(Value::String(key)) = e.remove("key") else {
                return Err(bad("an active error has no key".into()));
            };
            active.insert(key, Value::Object(e));
        }
        if let Some(Value::Object(keys)) = times.get("e") {
            for key in keys.keys() {
                let t = ts("e", key)?.unwrap_or(i64::MIN);
                // An active error's stored document is the entry without its key; a cleared one's
                // is not in the document (its tie is unknown).
                let (part, tie) = match active.remove(key) {
                    Some(doc) => {
                        let tie = Some(vec![doc.to_string()]);
                        (doc, tie)
                    }
                    None => (Value::Null, None),
                };
                view.errors
                    .insert(key.clone(), Stamped { ts: t, part, tie });
            }
        }
        if let Some(key) = active.keys().next() {
            return Err(bad(format!("active error {key} has no cell time")));
        }
        Ok(view)
    }
}

/// What differs between two documents of one vehicle: signal codes whose entry changed, and
/// `error:<key>` for each active error set, changed or cleared.
pub fn changed(before: &Value, after: &Value) -> Vec<String> {
    let empty = Map::new();
    let sig = |d: &Value| {
        d.get("signals")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let (b, a) = (sig(before), sig(after));
    let mut out: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(b.keys().filter(|k| !a.contains_key(*k)).cloned())
        .collect();
    let errs = |d: &Value| -> BTreeMap<String, Value> {
        d.get("activeErrors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.get("key")?.as_str()?.to_owned(), e.clone())))
            .collect()
    };
    let (eb, ea) = (errs(before), errs(after));
    for (k, v) in &ea {
        if eb.get(k) != Some(v) {
            out.push(format!("error:{k}"));
        }
    }
    for k in eb.keys().filter(|k| !ea.contains_key(*k)) {
        out.push(format!("error:{k}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effects::{self, Context};
    use shared::clock::EpochMillis;
    use shared::event::Event;

    fn ctx(received: i64) -> Context {
        Context {
            received_at: EpochMillis::new(received).expect("a valid test time"),
            delivered_at: EpochMillis::new(received).expect("a valid test time"),
            logic_version: 1,
            rate_limit_backoff_secs: 900,
            max_skew_ms: 60_000,
        }
    }

    fn state(id: &str, soc: f64, oem: i64) -> Plan {
        let body = format!(
            r#"{{"eventId":"{id}","eventType":"VEHICLE_STATE","data":{{"vehicle":{{"id":"car"}},"user":{{"id":"u"}},"signals":[{{"code":"tractionbattery-stateofcharge","name":"StateOfCharge","group":"TractionBattery","body":{{"value":{soc},"unit":"percent"}},"meta":{{"oemUpdatedAt":{oem}}}}},{{"code":"location-preciselocation","name":"PreciseLocation","group":"Location","status":{{"value":"ERROR","error":{{"type":"COMPATIBILITY","code":"VEHICLE_NOT_CAPABLE"}}}}}}]}},"meta":{{"webhookId":"w","deliveryId":"d-{id}","deliveredAt":{oem},"mode":"LIVE","signalCount":2}}}}"#
        );
        let e = Event::parse(body.as_bytes()).expect("valid test event");
        effects::plan(&e, ctx(oem))
    }

    fn error(id: &str, state: &str, at: i64) -> Plan {
        let body = format!(
            r#"{{"eventId":"{id}","eventType":"VEHICLE_ERROR","data":{{"vehicle":{{"id":"car"}},"user":{{"id":"u"}},"errors":[{{"type":"CONNECTED_SERVICES_ACCOUNT","code":"SUBSCRIPTION","state":"{state}","description":"d","suggestedUserMessage":"m","resolution":{{"type":"REAUTHENTICATE"}},"signals":[]}}]}},"meta":{{"webhookId":"w","deliveryId":"d-{id}","deliveredAt":{at},"mode":"LIVE"}}}}"#
        );
        let e = Event::parse(body.as_bytes()).expect("valid test error event");
        effects::plan(&e, ctx(at))
    }

    #[test]
    fn a_stale_value_or_a_replayed_event_changes_nothing() {
        let mut v = View::default();
        v.apply(&state("e2", 60.0, 2_000_000));
        let doc = v.render("car");
        v.apply(&state("e1", 50.0, 1_000_000));
        assert_eq!(v.render("car"), doc, "an older oemUpdatedAt lost");
        v.apply(&state("e2", 60.0, 2_000_000));
        assert_eq!(v.render("car"), doc, "the same event again is a no-op");
        v.apply(&state("e3", 60.0, 3_000_000));
        let after = v.render("car");
        assert_ne!(after, doc, "a fresher value is a change");
        // The location error is reported again by a later delivery: its `unavailableSince` moves.
        assert_eq!(
            changed(&doc, &after),
            vec!["location-preciselocation", "tractionbattery-stateofcharge"]
        );
        assert_eq!(
            after["unsupportedSignals"],
            json!(["location-preciselocation"])
        );
    }

    #[test]
    fn at_equal_timestamps_the_greater_document_wins_as_in_the_store() {
        // The same reading under two event ids: the store keeps the greater document, whose
        // bytes differ first at the event id.
        let mut a = View::default();
        a.apply(&state("ev-b", 60.0, 2_000_000));
        a.apply(&state("ev-a", 60.0, 2_000_000));
        let mut b = View::default();
        b.apply(&state("ev-a", 60.0, 2_000_000));
        b.apply(&state("ev-b", 60.0, 2_000_000));
        assert_eq!(
            a.render("car"),
            b.render("car"),
            "arrival order does not matter"
        );
        let soc = &a.render("car")["signals"]["tractionbattery-stateofcharge"];
        assert_eq!(soc["eventId"], "ev-b");
        // A restored view settles the tie the same way.
        let mut r = View::restore("car", &b.render("car"), &b.cell_times()).expect("restorable");
        r.apply(&state("ev-c", 60.0, 2_000_000));
        b.apply(&state("ev-c", 60.0, 2_000_000));
        assert_eq!(r.render("car"), b.render("car"));
        assert_eq!(
            r.render("car")["signals"]["tractionbattery-stateofcharge"]["eventId"],
            "ev-c"
        );
        // Different readings at one time: the greater body wins whichever came first.
        let mut c = View::default();
        c.apply(&state("ev-z", 7.0, 2_000_000));
        c.apply(&state("ev-y", 61.0, 2_000_000));
        let stored_order = [
            json!({"body": {"unit": "percent", "value": 7.0}}).to_string(),
            json!({"body": {"unit": "percent", "value": 61.0}}).to_string(),
        ];
        let greater = if stored_order[1] > stored_order[0] {
            61.0
        } else {
            7.0
        };
        assert_eq!(
            c.render("car")["signals"]["tractionbattery-stateofcharge"]["body"]["value"],
            greater
        );
    }

    #[test]
    fn error_set_and_cleared_are_changes_and_name_the_error() {
        let mut v = View::default();
        let before = v.render("car");
        v.apply(&error("x1", "ERROR", 1_000_000));
        let set = v.render("car");
        assert_eq!(set["needsReconnect"], true);
        let keys = changed(&before, &set);
        assert_eq!(keys.len(), 1);
        assert!(keys[0].starts_with("error:"), "{keys:?}");
        v.apply(&error("x0", "RESOLVED", 500_000));
        assert_eq!(
            v.render("car"),
            set,
            "an older resolution does not clear it"
        );
        v.apply(&error("x2", "RESOLVED", 2_000_000));
        let cleared = v.render("car");
        assert_eq!(cleared["activeErrors"], json!([]));
        assert_eq!(changed(&set, &cleared), keys);
        v.apply(&error("x1", "ERROR", 1_000_000));
        assert_eq!(
            v.render("car"),
            cleared,
            "the older error does not come back"
        );
    }

    #[test]
    fn a_view_restored_from_its_record_behaves_like_the_original() {
        let mut v = View::default();
        v.apply(&state("e2", 60.0, 2_000_000));
        v.apply(&error("x1", "ERROR", 1_500_000));
        v.apply(&error("x2", "RESOLVED", 1_600_000));
        v.apply(&error("x3", "ERROR", 1_700_000));
        let doc = v.render("car");
        let mut r = View::restore("car", &doc, &v.cell_times()).expect("restorable");
        assert_eq!(r.render("car"), doc);
        for p in [
            state("e1", 50.0, 1_000_000),
            error("x0", "ERROR", 1_000_000),
            state("e3", 70.0, 3_000_000),
            error("x4", "RESOLVED", 4_000_000),
        ] {
            v.apply(&p);
            r.apply(&p);
            assert_eq!(r.render("car"), v.render("car"));
        }
    }

    #[test]
    fn a_record_of_another_version_or_without_times_is_refused_by_name() {
        let mut v = View::default();
        v.apply(&error("x1", "ERROR", 1_000_000));
        let mut doc = v.render("car");
        let e = View::restore("car", &doc, &json!({}))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("car") && e.contains("no cell time"), "{e}");
        doc["version"] = json!(99);
        let e = View::restore("car", &doc, &v.cell_times())
            .expect_err("refused")
            .to_string();
        assert!(e.contains("version 99"), "{e}");
    }
}
