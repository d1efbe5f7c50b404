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
//! under different event ids. Each part has a tie key that orders like the stored bytes (the
//! documents are serde_json objects, keys in sorted order: a value document starts with its body,
//! then its event id), so a view settles ties as the store does.
//!
//! Memory: a view is held for many vehicles at once, so a value's body is kept as its JSON text
//! (serde_json's compact form, the same bytes the store and the changelog hold), not as a tree of
//! `Value`s, and the document is written from the parts without building one.
//!
//! Bookkeeping (the last event seen, its delivery time) is not part of the document: it changes on
//! every event, so a changelog keyed on it would change on every event too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::effects::Plan;

/// The document schema's version (the `version` field); bumped on any incompatible change.
pub const DOCUMENT_VERSION: u32 = 1;

/// A cell's part, its write timestamp (µs), and for availability and error cells a key that
/// orders like the stored document at equal timestamps (None: not known, the cell is kept). A value
/// cell's key is its body and event id ([`value_tie`]).
#[derive(Debug, Clone, PartialEq)]
struct Stamped<P> {
    ts: i64,
    part: P,
    tie: Option<Vec<String>>,
}

/// What the document shows of a value cell.
#[derive(Debug, Clone)]
struct ValuePart {
    /// The body's JSON text (`null` without one).
    body: Box<RawValue>,
    oem_updated_at: Value,
    fetched_at: Value,
    event_id: Value,
    logic_version: Value,
    /// `webhook` or `poll`.
    source: Value,
}

impl PartialEq for ValuePart {
    fn eq(&self, other: &Self) -> bool {
        self.body.get() == other.body.get()
            && self.oem_updated_at == other.oem_updated_at
            && self.fetched_at == other.fetched_at
            && self.event_id == other.event_id
            && self.logic_version == other.logic_version
            && self.source == other.source
    }
}

/// A stored value document's fields the document shows (others are ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredValue<'a> {
    #[serde(borrow, default)]
    body: Option<&'a RawValue>,
    #[serde(default)]
    oem_updated_at: Value,
    #[serde(default)]
    fetched_at: Value,
    #[serde(default)]
    event_id: Value,
    #[serde(default)]
    logic_version: Value,
    #[serde(default)]
    source: Value,
}

impl ValuePart {
    fn new(body: Box<RawValue>, fields: [Value; 5]) -> Self {
        let [oem_updated_at, fetched_at, event_id, logic_version, source] = fields;
        // Values stored before polling existed carry no source: they all came from webhooks.
        // Filled in here so a view read from the store and one restored from the changelog are
        // equal.
        let source = if source.is_null() {
            Value::from("webhook")
        } else {
            source
        };
        Self {
            body,
            oem_updated_at,
            fetched_at,
            event_id,
            logic_version,
            source,
        }
    }

    /// From a stored value document (JSON text); an unreadable one shows nothing.
    fn from_doc(doc: &str) -> Self {
        match serde_json::from_str::<StoredValue<'_>>(doc) {
            Ok(v) => Self::new(
                v.body.unwrap_or(RawValue::NULL).to_owned(),
                [
                    v.oem_updated_at,
                    v.fetched_at,
                    v.event_id,
                    v.logic_version,
                    v.source,
                ],
            ),
            Err(_) => Self::new(RawValue::NULL.to_owned(), Default::default()),
        }
    }

    /// From a signal's entry in a document.
    fn from_entry(entry: &Value) -> Self {
        let field = |f: &str| entry.get(f).cloned().unwrap_or(Value::Null);
        let body = entry
            .get("body")
            .and_then(|b| RawValue::from_string(b.to_string()).ok())
            .unwrap_or_else(|| RawValue::NULL.to_owned());
        Self::new(
            body,
            [
                field("oemUpdatedAt"),
                field("fetchedAt"),
                field("eventId"),
                field("logicVersion"),
                field("source"),
            ],
        )
    }
}

/// A value document's bytes are `{"body":…,"eventId":…,…`: body, then event id, decide a tie.
fn value_tie(s: &Stamped<ValuePart>) -> Option<Vec<String>> {
    Some(vec![
        s.part.body.get().to_owned(),
        s.part.event_id.to_string(),
    ])
}

fn stored_tie<P>(s: &Stamped<P>) -> Option<Vec<String>> {
    s.tie.clone()
}

/// What the document shows of an availability cell: the status, and while the signal is not
/// available, the error and since when. "Available since" is not shown: every good value moves it.
#[derive(Debug, Clone, PartialEq)]
struct AvailabilityPart {
    status: Box<str>,
    error: Value,
    since: Value,
}

impl AvailabilityPart {
    fn from_raw(raw: &Value) -> Self {
        let status = raw
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("available");
        let away = status != "available";
        Self {
            status: status.into(),
            error: raw
                .get("error")
                .filter(|e| away && !e.is_null())
                .cloned()
                .unwrap_or(Value::Null),
            since: raw
                .get("since")
                .filter(|_| away)
                .cloned()
                .unwrap_or(Value::Null),
        }
    }
}

/// What the document shows for a signal without an availability cell.
static AVAILABLE: LazyLock<AvailabilityPart> = LazyLock::new(|| AvailabilityPart {
    status: "available".into(),
    error: Value::Null,
    since: Value::Null,
});

/// Sorts after every JSON text: an availability document without an `error` key.
const NO_ERROR_KEY: &str = "\u{7f}";

fn parse(doc: &str) -> Value {
    serde_json::from_str(doc).unwrap_or(Value::Null)
}

/// An availability document's bytes start with `{"error":…` when it has that key, else with
/// `{"eventId"` (greater): the error decides a tie; two without one render alike.
fn availability_tie(raw: &Value) -> Option<Vec<String>> {
    Some(vec![raw
        .get("error")
        .map_or_else(|| NO_ERROR_KEY.to_owned(), Value::to_string)])
}

/// What a cell held before a write replaced it (None: nothing), kept until the write's record is
/// committed so it can be taken back. Boxed: an undo log holds one per cell a plan wrote, most of
/// them None on a vehicle's first event, and a 50 KB event writes some 250 cells.
type Prior<P> = Option<Box<Stamped<P>>>;

/// Keeps the cell the store keeps: the higher write timestamp, at equal timestamps the greater
/// document (`tie`). When `new` wins, returns the cell it replaced.
fn newer<P>(
    slot: &mut Option<Stamped<P>>,
    new: Stamped<P>,
    tie: fn(&Stamped<P>) -> Option<Vec<String>>,
) -> Option<Prior<P>> {
    let wins = match slot {
        None => true,
        Some(cur) if new.ts != cur.ts => new.ts > cur.ts,
        Some(cur) => matches!((tie(cur), tie(&new)), (Some(a), Some(b)) if b > a),
    };
    wins.then(|| slot.replace(new).map(Box::new))
}

/// Cell times as a JSON object, in the iterator's (sorted) order.
struct TimesMap<I>(I);

impl<'k, I: Iterator<Item = (&'k str, i64)> + Clone> Serialize for TimesMap<I> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.clone())
    }
}

/// A signal's two cells.
#[derive(Debug, Clone, Default, PartialEq)]
struct SignalCells {
    value: Option<Stamped<ValuePart>>,
    availability: Option<Stamped<AvailabilityPart>>,
}

/// A vehicle's cells, as far as the document is concerned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    signals: BTreeMap<String, SignalCells>,
    /// Error key → its state cell (the stored error document; shown while in `ERROR`).
    errors: BTreeMap<String, Stamped<Value>>,
}

/// Why a changelog record could not be turned back into a view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("state changelog record of vehicle {vehicle}: {message}")]
    Record { vehicle: String, message: String },
}

/// A cell a plan replaced, and what it held before (None: nothing).
#[derive(Debug, Clone)]
enum Replaced {
    Value(String, Prior<ValuePart>),
    Availability(String, Prior<AvailabilityPart>),
    Error(String, Prior<Value>),
}

/// What applying one plan did to a view: the cells it replaced, so it can be taken back
/// ([`View::undo`]), and the parts of the document it changed.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    replaced: Vec<Replaced>,
    /// Signal codes whose entry changed, and `error:<key>` for each active error set, changed or
    /// cleared, sorted (the same names [`changed`] gives for two whole documents).
    pub changed: Vec<String>,
}

impl Applied {
    /// True when some cell took the write (whether or not the document shows the difference).
    pub fn replaced_any(&self) -> bool {
        !self.replaced.is_empty()
    }
}

/// A signal's entry in the document (fields in the order serde_json writes a `Value` object).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SignalEntry<'a> {
    body: &'a RawValue,
    error: &'a Value,
    event_id: &'a Value,
    fetched_at: &'a Value,
    logic_version: &'a Value,
    oem_updated_at: &'a Value,
    /// `webhook` or `poll`; null without a value.
    source: &'a Value,
    status: &'a str,
    unavailable_since: &'a Value,
}

/// The state document (fields in the order serde_json writes a `Value` object).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    active_errors: Vec<Value>,
    needs_reconnect: bool,
    rate_limited_until: Option<i64>,
    signals: BTreeMap<&'a str, SignalEntry<'a>>,
    unsupported_signals: Vec<&'a str>,
    vehicle_id: &'a str,
    version: u32,
}

static NULL: Value = Value::Null;

fn signal_entry(cells: &SignalCells) -> SignalEntry<'_> {
    let value = cells.value.as_ref().map(|s| &s.part);
    let avail = cells.availability.as_ref().map(|s| &s.part);
    SignalEntry {
        body: value.map_or(RawValue::NULL, |v| &v.body),
        error: avail.map_or(&NULL, |a| &a.error),
        event_id: value.map_or(&NULL, |v| &v.event_id),
        fetched_at: value.map_or(&NULL, |v| &v.fetched_at),
        logic_version: value.map_or(&NULL, |v| &v.logic_version),
        oem_updated_at: value.map_or(&NULL, |v| &v.oem_updated_at),
        source: value.map_or(&NULL, |v| &v.source),
        status: avail.map_or("available", |a| &a.status),
        unavailable_since: avail.map_or(&NULL, |a| &a.since),
    }
}

/// An error cell's part as the document shows it: only while active.
fn shown_error(part: Option<&Value>) -> Option<&Value> {
    part.filter(|p| p.is_object() && is_active(p))
}

/// True for an error document in state `ERROR` (an active error).
fn is_active(part: &Value) -> bool {
    part.get("state").and_then(Value::as_str) == Some("ERROR")
}

impl View {
    /// Adds a stored value cell (raw JSON document, write timestamp); returns the cell it
    /// replaced when it won.
    fn put_value(&mut self, code: &str, doc: &str, ts: i64) -> Option<Prior<ValuePart>> {
        let s = self.signals.entry(code.to_owned()).or_default();
        let new = Stamped {
            ts,
            part: ValuePart::from_doc(doc),
            tie: None,
        };
        newer(&mut s.value, new, value_tie)
    }

    /// Adds a stored availability cell.
    fn put_availability(
        &mut self,
        code: &str,
        doc: &str,
        ts: i64,
    ) -> Option<Prior<AvailabilityPart>> {
        let s = self.signals.entry(code.to_owned()).or_default();
        let raw = parse(doc);
        let new = Stamped {
            ts,
            part: AvailabilityPart::from_raw(&raw),
            tie: availability_tie(&raw),
        };
        newer(&mut s.availability, new, stored_tie)
    }

    /// Adds a stored vehicle-error cell.
    fn put_error(&mut self, key: &str, doc: &str, ts: i64) -> Option<Prior<Value>> {
        let mut slot = self.errors.remove(key);
        let part = parse(doc);
        let tie = Some(vec![part.to_string()]);
        let replaced = newer(&mut slot, Stamped { ts, part, tie }, stored_tie);
        if let Some(s) = slot {
            self.errors.insert(key.to_owned(), s);
        }
        replaced
    }

    /// Adds a stored cell of any kind.
    pub fn put(&mut self, cell: &crate::store::StoredCell) {
        use crate::store::CellKind;
        match &cell.kind {
            CellKind::Value(code) => {
                self.put_value(code, &cell.doc, cell.timestamp);
            }
            CellKind::Availability(code) => {
                self.put_availability(code, &cell.doc, cell.timestamp);
            }
            CellKind::Error(key) => {
                self.put_error(key, &cell.doc, cell.timestamp);
            }
        }
    }

    /// True when `cell` would replace what the view holds for it (a later write time, or a cell
    /// the view does not have).
    pub fn is_behind(&self, cell: &crate::store::StoredCell) -> bool {
        use crate::store::CellKind;
        let held = match &cell.kind {
            CellKind::Value(code) => self
                .signals
                .get(code)
                .and_then(|c| c.value.as_ref())
                .map(|s| s.ts),
            CellKind::Availability(code) => self
                .signals
                .get(code)
                .and_then(|c| c.availability.as_ref())
                .map(|s| s.ts),
            CellKind::Error(key) => self.errors.get(key).map(|s| s.ts),
        };
        held.is_none_or(|ts| cell.timestamp > ts)
    }

    /// Takes a stored cell that wins over the view's only if the document does not show the
    /// difference: a write the changelog holds no record of because it changed nothing a reader
    /// sees (an error resolved again, a signal reported available again). Its write time then
    /// settles later writes as the store does. Returns whether it took it.
    pub fn adopt(&mut self, cell: &crate::store::StoredCell) -> bool {
        use crate::store::CellKind;
        let (doc, ts) = (cell.doc.as_str(), cell.timestamp);
        let existed = match &cell.kind {
            CellKind::Value(code) | CellKind::Availability(code) => self.signals.contains_key(code),
            CellKind::Error(_) => true,
        };
        let replaced = match &cell.kind {
            CellKind::Value(code) => self
                .put_value(code, doc, ts)
                .map(|prior| Replaced::Value(code.clone(), prior)),
            CellKind::Availability(code) => self
                .put_availability(code, doc, ts)
                .map(|prior| Replaced::Availability(code.clone(), prior)),
            CellKind::Error(key) => self
                .put_error(key, doc, ts)
                .map(|prior| Replaced::Error(key.clone(), prior)),
        };
        let Some(replaced) = replaced else {
            return false;
        };
        let same = !self.shows_differently(&replaced, existed);
        if !same {
            self.take_back(replaced);
        }
        same
    }

    /// Whether the document shows the cell `replaced` names differently now than with what it
    /// held before (`existed`: the signal had an entry before).
    fn shows_differently(&self, replaced: &Replaced, existed: bool) -> bool {
        match replaced {
            Replaced::Value(code, before) => {
                let now = self.signals.get(code).and_then(|c| c.value.as_ref());
                before.as_deref().map(|s| &s.part) != now.map(|s| &s.part)
            }
            Replaced::Availability(code, before) => {
                let now = self
                    .signals
                    .get(code)
                    .and_then(|c| c.availability.as_ref())
                    .map(|s| &s.part);
                match before {
                    // No availability cell renders as available: a first one changes the entry
                    // only if it says something else, or if the signal is new.
                    None => !existed || now.is_some_and(|p| *p != *AVAILABLE),
                    Some(b) => now != Some(&b.part),
                }
            }
            Replaced::Error(key, before) => {
                let now = self.errors.get(key).map(|s| &s.part);
                shown_error(before.as_deref().map(|s| &s.part)) != shown_error(now)
            }
        }
    }

    /// Puts back what a cell held before it was replaced.
    fn take_back(&mut self, replaced: Replaced) {
        match replaced {
            Replaced::Value(code, prior) => {
                self.signals.entry(code.clone()).or_default().value = prior.map(|p| *p);
                self.drop_if_empty(&code);
            }
            Replaced::Availability(code, prior) => {
                self.signals.entry(code.clone()).or_default().availability = prior.map(|p| *p);
                self.drop_if_empty(&code);
            }
            Replaced::Error(key, prior) => match prior {
                Some(p) => {
                    self.errors.insert(key, *p);
                }
                None => {
                    self.errors.remove(&key);
                }
            },
        }
    }

    /// Applies a plan's writes as the store does (a higher timestamp wins per cell).
    pub fn apply(&mut self, plan: &Plan) {
        self.apply_tracked(plan);
    }

    /// Applies a plan's writes as the store does, and says what that changed, with work
    /// proportional to the plan, not to the vehicle's whole state, and without rendering: only
    /// the entries of the signals and errors the plan writes can change, and an entry changed
    /// exactly when one of its cells shows something else than before the plan. Every other part
    /// of the document is derived from them (`unsupportedSignals` from statuses, `needsReconnect`
    /// and `rateLimitedUntil` from active errors).
    pub fn apply_tracked(&mut self, plan: &Plan) -> Applied {
        // Whether each signal the plan writes had an entry before it.
        let mut existed: BTreeMap<&str, bool> = BTreeMap::new();
        for code in plan
            .values
            .iter()
            .map(|w| w.code.as_str())
            .chain(plan.availability.iter().map(|w| w.code.as_str()))
        {
            existed
                .entry(code)
                .or_insert_with(|| self.signals.contains_key(code));
        }
        // Room for every write of the plan, then shrunk to what was replaced: grown by doubling,
        // the log of a large event was mostly unused capacity, held until its record commits.
        let mut replaced =
            Vec::with_capacity(plan.values.len() + plan.availability.len() + plan.errors.len());
        for w in &plan.values {
            let code = w.code.as_str();
            if let Some(prior) = self.put_value(code, &w.value.doc, w.value.timestamp) {
                replaced.push(Replaced::Value(code.to_owned(), prior));
            }
        }
        for w in &plan.availability {
            let code = w.code.as_str();
            let ts = w.availability.timestamp;
            if let Some(prior) = self.put_availability(code, &w.availability.doc, ts) {
                replaced.push(Replaced::Availability(code.to_owned(), prior));
            }
        }
        for w in &plan.errors {
            if let Some(prior) = self.put_error(&w.key, &w.state.doc, w.state.timestamp) {
                replaced.push(Replaced::Error(w.key.clone(), prior));
            }
        }
        replaced.shrink_to_fit();
        // Each cell's state before the plan is the prior of its first replacement.
        let mut signals: BTreeSet<&str> = BTreeSet::new();
        let mut errors: BTreeSet<&str> = BTreeSet::new();
        let mut seen: BTreeSet<(u8, &str)> = BTreeSet::new();
        for r in &replaced {
            let (kind, name) = match r {
                Replaced::Value(c, _) => (0, c.as_str()),
                Replaced::Availability(c, _) => (1, c.as_str()),
                Replaced::Error(k, _) => (2, k.as_str()),
            };
            if !seen.insert((kind, name)) {
                continue;
            }
            let existed = existed.get(name).copied().unwrap_or(false);
            if self.shows_differently(r, existed) {
                if kind == 2 {
                    errors.insert(name);
                } else {
                    signals.insert(name);
                }
            }
        }
        let changed = signals
            .into_iter()
            .map(str::to_owned)
            .chain(errors.into_iter().map(|k| format!("error:{k}")))
            .collect();
        Applied { replaced, changed }
    }

    /// Takes back what [`View::apply_tracked`] did. Undos of several plans are taken back latest
    /// first.
    pub fn undo(&mut self, applied: Applied) {
        for r in applied.replaced.into_iter().rev() {
            self.take_back(r);
        }
    }

    fn drop_if_empty(&mut self, code: &str) {
        if self
            .signals
            .get(code)
            .is_some_and(|c| c.value.is_none() && c.availability.is_none())
        {
            self.signals.remove(code);
        }
    }

    /// How many cells it holds.
    pub fn cells(&self) -> usize {
        let signal_cells: usize = self
            .signals
            .values()
            .map(|c| usize::from(c.value.is_some()) + usize::from(c.availability.is_some()))
            .sum();
        signal_cells + self.errors.len()
    }

    /// True when no cell is known.
    pub fn is_empty(&self) -> bool {
        self.signals.is_empty() && self.errors.is_empty()
    }

    /// The document, borrowing the view's parts.
    fn document<'a>(&'a self, vehicle: &'a str) -> Document<'a> {
        let mut signals = BTreeMap::new();
        let mut unsupported = Vec::new();
        for (code, cells) in &self.signals {
            let entry = signal_entry(cells);
            if entry.status == "unsupported" {
                unsupported.push(code.as_str());
            }
            signals.insert(code.as_str(), entry);
        }
        let mut active = Vec::new();
        let mut needs_reconnect = false;
        let mut backoff_until: Option<i64> = None;
        for (key, cell) in &self.errors {
            let Some(Value::Object(e)) = shown_error(Some(&cell.part)) else {
                continue;
            };
            needs_reconnect |= e
                .get("needsReconnect")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if let Some(b) = e.get("backoffUntil").and_then(Value::as_i64) {
                backoff_until = Some(backoff_until.map_or(b, |x| x.max(b)));
            }
            let mut e = e.clone();
            e.insert("key".into(), Value::from(key.clone()));
            active.push(Value::Object(e));
        }
        Document {
            active_errors: active,
            needs_reconnect,
            rate_limited_until: backoff_until,
            signals,
            unsupported_signals: unsupported,
            vehicle_id: vehicle,
            version: DOCUMENT_VERSION,
        }
    }

    /// The state document's JSON text (schema in the README, "Vehicle state document"): the
    /// same bytes as [`View::render`]'s value written by serde_json.
    pub fn render_text(&self, vehicle: &str) -> String {
        serde_json::to_string(&self.document(vehicle)).unwrap_or_default()
    }

    /// The state document as a JSON value.
    pub fn render(&self, vehicle: &str) -> Value {
        serde_json::to_value(self.document(vehicle)).unwrap_or(Value::Null)
    }

    /// What a first record names: every signal, and every active error.
    pub fn names(&self) -> Vec<String> {
        let errors = self
            .errors
            .iter()
            .filter(|(_, c)| shown_error(Some(&c.part)).is_some())
            .map(|(k, _)| format!("error:{k}"));
        self.signals.keys().cloned().chain(errors).collect()
    }

    /// [`View::cell_times_text`] as a value: the tests' reference for its bytes, and the input
    /// [`View::restore`] takes in them.
    #[cfg(test)]
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
        serde_json::json!({ "v": v, "a": a, "e": e })
    }

    /// Every cell's write timestamp as JSON text, `{"a":{code:ts},"e":{key:ts},"v":{code:ts}}`
    /// (availability, error and value cells). With the rendered document it is enough to rebuild the
    /// view ([`View::restore`]). Written straight from the cells rather than through a serde_json
    /// tree, which a `perf` profile of a 50 KB drain put at about 8 % of the processor's samples (the
    /// bench showed no gain beyond run-to-run spread); the bytes equal that tree's text.
    pub fn cell_times_text(&self) -> String {
        let values = self
            .signals
            .iter()
            .filter_map(|(code, c)| c.value.as_ref().map(|s| (code.as_str(), s.ts)));
        let availability = self
            .signals
            .iter()
            .filter_map(|(code, c)| c.availability.as_ref().map(|s| (code.as_str(), s.ts)));
        let errors = self.errors.iter().map(|(key, s)| (key.as_str(), s.ts));
        // Fields in the order serde_json's sorted map writes them.
        #[derive(Serialize)]
        struct Times<A, E, V> {
            a: A,
            e: E,
            v: V,
        }
        serde_json::to_string(&Times {
            a: TimesMap(availability),
            e: TimesMap(errors),
            v: TimesMap(values),
        })
        .unwrap_or_default()
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
                cells.value = Some(Stamped {
                    ts: t,
                    part: ValuePart::from_entry(entry),
                    tie: None,
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
                let part = AvailabilityPart::from_raw(&raw);
                let tie = if part.error.is_null() {
                    Some(vec![NO_ERROR_KEY.to_owned()])
                } else {
                    Some(vec![part.error.to_string()])
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
    use serde_json::json;
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

    /// The changelog decides "changed" from the cells a plan wrote, not from two whole documents:
    /// both must name the same entries at every step, and undoing the steps latest first must give
    /// back each earlier document exactly (signals that first appeared included).
    #[test]
    fn tracked_changes_equal_the_document_diff_and_undo_restores_each_document() {
        let plans = [
            state("e2", 60.0, 2_000_000),
            state("e1", 50.0, 1_000_000),
            state("e2", 60.0, 2_000_000),
            error("x1", "ERROR", 1_500_000),
            state("e3", 61.0, 3_000_000),
            state("e3", 61.0, 3_000_000),
            error("x0", "RESOLVED", 1_000_000),
            error("x2", "RESOLVED", 2_500_000),
            state("e4", 61.0, 3_000_000),
        ];
        let mut v = View::default();
        let mut history = vec![v.render("car")];
        let mut undos = Vec::new();
        for (i, p) in plans.iter().enumerate() {
            let before = v.render("car");
            let applied = v.apply_tracked(p);
            let after = v.render("car");
            assert_eq!(
                v.render_text("car"),
                after.to_string(),
                "step {i}: the text is the value's serde_json text"
            );
            assert_eq!(
                v.cell_times_text(),
                v.cell_times().to_string(),
                "step {i}: the cell times text is the value's serde_json text"
            );
            let mut expected = changed(&before, &after);
            expected.sort();
            assert_eq!(applied.changed, expected, "step {i}");
            undos.push(applied);
            history.push(after);
        }
        assert!(
            undos.iter().any(|a| a.changed.is_empty()),
            "some step changed nothing"
        );
        let times = v.cell_times();
        for kind in ["a", "e", "v"] {
            assert!(
                times[kind].as_object().is_some_and(|m| !m.is_empty()),
                "the steps write {kind} cells, so the cell times text is checked with them"
            );
        }
        while let Some(applied) = undos.pop() {
            v.undo(applied);
            history.pop();
            assert_eq!(
                Some(&v.render("car")),
                history.last(),
                "after undoing step {}",
                undos.len()
            );
        }
        assert!(v.is_empty(), "every cell undone");
    }

    /// The stored cell a plan's write of `kind` makes.
    fn written(plan: &Plan, name: &str) -> crate::store::StoredCell {
        use crate::store::CellKind;
        let (kind, w) = if let Some(w) = plan.errors.iter().find(|w| w.key == name) {
            (CellKind::Error(w.key.clone()), &w.state)
        } else if let Some(w) = plan.availability.iter().find(|w| w.code.as_str() == name) {
            (
                CellKind::Availability(w.code.as_str().to_owned()),
                &w.availability,
            )
        } else {
            panic!("the plan writes no cell {name}")
        };
        crate::store::StoredCell {
            kind,
            doc: w.doc.clone(),
            timestamp: w.timestamp,
            event_id: None,
        }
    }

    /// A store cell newer than the view is taken only when the document shows no difference.
    #[test]
    fn adopt_takes_a_later_write_only_when_the_document_does_not_show_it() {
        let mut v = View::default();
        v.apply(&error("x1", "ERROR", 1_000_000));
        v.apply(&error("x2", "RESOLVED", 2_000_000));
        let doc = v.render("car");
        let key = v.errors.keys().next().cloned().unwrap_or_default();
        let later = written(&error("x4", "RESOLVED", 4_000_000), &key);
        assert!(v.is_behind(&later));
        assert!(v.adopt(&later), "resolved again: not shown, taken");
        assert_eq!(v.render("car"), doc);
        assert!(!v.is_behind(&later));
        // A late ERROR between the resolutions now loses, as in the store.
        v.apply(&error("x3", "ERROR", 3_000_000));
        assert_eq!(v.render("car"), doc);
        // A later write the document shows is not taken.
        let shown = written(&error("x5", "ERROR", 5_000_000), &key);
        assert!(v.is_behind(&shown));
        assert!(!v.adopt(&shown));
        assert_eq!(v.render("car"), doc);
        // A later "available" for a signal shown as available is not shown either.
        v.apply(&state("e1", 50.0, 1_000_000));
        let doc = v.render("car");
        let code = "tractionbattery-stateofcharge";
        let avail = written(&state("e9", 50.0, 9_000_000), code);
        let mut restored = View::restore("car", &doc, &v.cell_times()).expect("restorable");
        assert!(restored.is_behind(&avail));
        assert!(restored.adopt(&avail));
        assert_eq!(restored.render("car"), doc);
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
