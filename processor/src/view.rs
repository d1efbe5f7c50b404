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
//! Memory: a view is held for many vehicles at once, and a large vehicle has hundreds of cells, so
//! a cell is kept small. A value cell's six shown fields are their JSON texts (serde_json's compact
//! form, the same bytes the store and the changelog hold) back to back in one allocation; an
//! available signal's availability cell allocates nothing. The document is written from those
//! texts ([`View::render_text`]) without building a tree of `Value`s.
//!
//! Bookkeeping (the last event seen, its delivery time) is not part of the document: it changes on
//! every event, so a changelog keyed on it would change on every event too.

use std::collections::{btree_map, BTreeMap, HashSet};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::effects::Plan;

/// The document schema's version (the `version` field); bumped on any incompatible change.
pub const DOCUMENT_VERSION: u32 = 1;

/// How an availability or error cell settles a tie at equal timestamps: a key that orders like the
/// stored document's bytes. A value cell's key comes from its part ([`value_tie`]).
#[derive(Debug, Clone, Default, PartialEq)]
struct Tie(Option<Box<str>>);

/// Sorts after every JSON text: an availability document without an `error` key.
const NO_ERROR_KEY: &str = "\u{7f}";

impl Tie {
    /// Not known: at equal timestamps the cell held is kept.
    const UNKNOWN: Tie = Tie(None);

    /// An availability document without an `error` key. Kept as the empty string, which is no
    /// JSON text and takes no allocation (most availability cells have no error key).
    fn no_error_key() -> Self {
        Tie(Some(Box::default()))
    }

    fn text(t: String) -> Self {
        Tie(Some(t.into_boxed_str()))
    }

    fn key(&self) -> Option<&str> {
        match self.0.as_deref() {
            Some("") => Some(NO_ERROR_KEY),
            other => other,
        }
    }
}

/// A cell's part, its write timestamp (µs), and for availability and error cells its tie key.
#[derive(Debug, Clone, PartialEq)]
struct Stamped<P> {
    ts: i64,
    part: P,
    tie: Tie,
}

/// The fields of a value cell the document shows, in the order [`ValuePart`] keeps them.
#[derive(Debug, Clone, Copy)]
enum Field {
    Body,
    OemUpdatedAt,
    FetchedAt,
    EventId,
    LogicVersion,
    /// `webhook` or `poll`.
    Source,
}

/// What the document shows of a value cell: the JSON texts of its body, `oemUpdatedAt`,
/// `fetchedAt`, `eventId`, `logicVersion` and `source` (`null` when absent), back to back in one
/// string, and where each of the first five ends. Two parts are equal exactly when each field's
/// text is: the texts are serde_json's compact form, one text per value.
#[derive(Debug, Clone, PartialEq)]
struct ValuePart {
    text: Box<str>,
    ends: [u32; 5],
}

/// A field present in the stored document, even as `null` (absent is `None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A stored value document's fields the document shows, as their texts (others are ignored).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredValue<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    oem_updated_at: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    fetched_at: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    event_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    logic_version: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    source: Option<&'a RawValue>,
}

const NULL_TEXT: &str = "null";

impl ValuePart {
    /// From the six fields' texts, in [`Field`] order.
    fn new(mut fields: [&str; 6]) -> Self {
        // Values stored before polling existed carry no source: they all came from webhooks.
        // Filled in here so a view read from the store and one restored from the changelog are
        // equal.
        if fields[Field::Source as usize] == NULL_TEXT {
            fields[Field::Source as usize] = "\"webhook\"";
        }
        let mut text = String::with_capacity(fields.iter().map(|f| f.len()).sum());
        let mut ends = [0; 5];
        for (i, f) in fields.iter().enumerate() {
            text.push_str(f);
            if let Some(end) = ends.get_mut(i) {
                // A Kafka record is far below 4 GiB; past it the field reads as null.
                *end = u32::try_from(text.len()).unwrap_or(u32::MAX);
            }
        }
        Self {
            text: text.into_boxed_str(),
            ends,
        }
    }

    /// A field's JSON text.
    fn get(&self, field: Field) -> &str {
        let i = field as usize;
        let start = i.checked_sub(1).map_or(0, |p| self.ends[p] as usize);
        let end = self.ends.get(i).map_or(self.text.len(), |&e| e as usize);
        self.text.get(start..end).unwrap_or(NULL_TEXT)
    }

    /// From a stored value document (JSON text); an unreadable one shows nothing.
    fn from_doc(doc: &str) -> Self {
        fn text(f: Option<&RawValue>) -> &str {
            f.map_or(NULL_TEXT, RawValue::get)
        }
        match serde_json::from_str::<StoredValue<'_>>(doc) {
            Ok(v) => Self::new([
                text(v.body),
                text(v.oem_updated_at),
                text(v.fetched_at),
                text(v.event_id),
                text(v.logic_version),
                text(v.source),
            ]),
            Err(_) => Self::new([NULL_TEXT; 6]),
        }
    }

    /// From a signal's entry in a document.
    fn from_entry(entry: &Value) -> Self {
        let texts = [
            "body",
            "oemUpdatedAt",
            "fetchedAt",
            "eventId",
            "logicVersion",
            "source",
        ]
        .map(|f| {
            entry
                .get(f)
                .map_or_else(|| NULL_TEXT.to_owned(), Value::to_string)
        });
        Self::new(texts.each_ref().map(String::as_str))
    }
}

/// A value document's bytes are `{"body":…,"eventId":…,…`: body, then event id, decide a tie.
fn value_tie(s: &Stamped<ValuePart>) -> Option<(&str, &str)> {
    Some((s.part.get(Field::Body), s.part.get(Field::EventId)))
}

fn stored_tie<P>(s: &Stamped<P>) -> Option<(&str, &str)> {
    s.tie.key().map(|k| (k, ""))
}

/// What the document shows of an availability cell: nothing beyond "available" (None), or for a
/// signal that is not available its status, error and since when. "Available since" is not shown:
/// every good value moves it.
#[derive(Debug, Clone, Default, PartialEq)]
struct AvailabilityPart(Option<Box<Away>>);

/// A signal that is not available.
#[derive(Debug, Clone, PartialEq)]
struct Away {
    status: Box<str>,
    error: Value,
    since: Value,
}

/// A stored availability document's fields the document shows, and its `error` key's text for
/// the tie.
#[derive(Deserialize)]
struct StoredAvailability<'a> {
    #[serde(borrow, default)]
    status: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    error: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
}

static NULL: Value = Value::Null;

/// A JSON text as a value (`null` if it is not one; the texts here were written by serde_json).
fn value_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

impl AvailabilityPart {
    fn away(status: &str, error: Value, since: Value) -> Self {
        if status == "available" {
            return Self(None);
        }
        Self(Some(Box::new(Away {
            status: status.into(),
            error,
            since,
        })))
    }

    /// From a stored availability document, with its tie key; an unreadable one shows
    /// "available" and keeps the cell at equal timestamps.
    fn from_doc(doc: &str) -> (Self, Tie) {
        let Ok(a) = serde_json::from_str::<StoredAvailability<'_>>(doc) else {
            return (Self(None), Tie::UNKNOWN);
        };
        // The bytes start with `{"error":…` when it has that key, else with `{"eventId"`
        // (greater): the error decides a tie; two without one render alike.
        let tie = a
            .error
            .map_or_else(Tie::no_error_key, |e| Tie::text(e.get().to_owned()));
        let status = a.status.as_deref().unwrap_or("available");
        let error = a.error.map_or(Value::Null, |e| value_of(e.get()));
        let since = a.since.map_or(Value::Null, |s| value_of(s.get()));
        (Self::away(status, error, since), tie)
    }

    /// From a signal's entry in a document.
    fn from_entry(entry: &Value) -> Self {
        let field = |f: &str| entry.get(f).cloned().unwrap_or(Value::Null);
        let status = entry
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("available");
        Self::away(status, field("error"), field("unavailableSince"))
    }

    fn status(&self) -> &str {
        self.0.as_ref().map_or("available", |a| &a.status)
    }

    fn error(&self) -> &Value {
        self.0.as_ref().map_or(&NULL, |a| &a.error)
    }

    fn since(&self) -> &Value {
        self.0.as_ref().map_or(&NULL, |a| &a.since)
    }
}

/// What a cell held before a write replaced it (None: nothing), kept until the write's record is
/// committed so it can be taken back. Boxed: an undo log holds one per cell a plan wrote, most of
/// them None on a vehicle's first event, and a 50 KB event writes some 250 cells.
type Prior<P> = Option<Box<Stamped<P>>>;

/// A write that won: the cell it replaced, whether the document shows the cell differently right
/// after it, and whether the signal had an entry just before it (errors: always).
struct Won<P> {
    prior: Prior<P>,
    differs: bool,
    existed: bool,
}

/// A cell's tie key: the texts that order like its stored bytes, None when not known.
type TieOf<P> = fn(&Stamped<P>) -> Option<(&str, &str)>;

/// Keeps the cell the store keeps: the higher write timestamp, at equal timestamps the greater
/// document (`tie`). When `new` wins, returns the cell it replaced.
fn newer<P>(slot: &mut Option<Stamped<P>>, new: Stamped<P>, tie: TieOf<P>) -> Option<Prior<P>> {
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
    signals: BTreeMap<Box<str>, SignalCells>,
    /// Error key → its state cell (the stored error document; shown while in `ERROR`).
    errors: BTreeMap<String, Stamped<Value>>,
}

/// Why a changelog record could not be turned back into a view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("state changelog record of vehicle {vehicle}: {message}")]
    Record { vehicle: String, message: String },
}

/// A cell a plan replaced (signal code or error key), and what it held before (None: nothing).
#[derive(Debug, Clone)]
enum Replaced {
    Value(Box<str>, Prior<ValuePart>),
    Availability(Box<str>, Prior<AvailabilityPart>),
    Error(Box<str>, Prior<Value>),
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

impl Replaced {
    /// Which cell it names: its kind and its signal code or error key.
    fn cell(&self) -> (u8, &str) {
        match self {
            Replaced::Value(c, _) => (0, c),
            Replaced::Availability(c, _) => (1, c),
            Replaced::Error(k, _) => (2, k),
        }
    }
}

impl Applied {
    /// True when some cell took the write (whether or not the document shows the difference).
    pub fn replaced_any(&self) -> bool {
        !self.replaced.is_empty()
    }

    /// About the memory the replaced cells hold until the record commits: a value's texts (an
    /// event that refreshes every signal holds about the previous document), a fixed share for an
    /// availability or error cell (small documents, held as values).
    pub fn held_bytes(&self) -> usize {
        const CELL: usize = 64;
        const VALUE_CELL: usize = 128;
        self.replaced
            .iter()
            .map(|r| match r {
                Replaced::Value(code, prior) => {
                    code.len() + prior.as_ref().map_or(0, |p| p.part.text.len())
                }
                Replaced::Availability(code, _) | Replaced::Error(code, _) => {
                    code.len() + VALUE_CELL
                }
            } + CELL)
            .sum()
    }
}

/// Whether a signal's entry shows availability `now` differently than `before` (`existed`: the
/// signal had an entry before).
fn availability_differs(
    before: Option<&Stamped<AvailabilityPart>>,
    now: Option<&AvailabilityPart>,
    existed: bool,
) -> bool {
    match before {
        // No availability cell renders as available: a first one changes the entry only if it
        // says something else, or if the signal is new.
        None => !existed || now.is_some_and(|p| p.0.is_some()),
        Some(b) => now != Some(&b.part),
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

/// Writes JSON into a byte buffer. Writing to a `Vec` cannot fail, nor can serializing a string
/// or a `Value`, so the results are ignored.
struct Out(Vec<u8>);

impl Out {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    fn str(&mut self, s: &str) {
        let _ = serde_json::to_writer(&mut self.0, s);
    }

    fn value(&mut self, v: &Value) {
        let _ = serde_json::to_writer(&mut self.0, v);
    }

    fn key(&mut self, first: &mut bool, k: &str) {
        if !std::mem::take(first) {
            self.raw(",");
        }
        self.str(k);
        self.raw(":");
    }
}

/// The active errors as the document shows them (each with its key), whether one asks to
/// reconnect, and the latest back-off among them.
struct ActiveErrors {
    list: Vec<Value>,
    needs_reconnect: bool,
    rate_limited_until: Option<i64>,
}

impl View {
    /// Adds a stored value cell (raw JSON document, write timestamp); when it wins, returns the
    /// cell it replaced and whether the document shows the cell differently now.
    fn put_value(&mut self, code: &str, doc: &str, ts: i64) -> Option<Won<ValuePart>> {
        let new = Stamped {
            ts,
            part: ValuePart::from_doc(doc),
            tie: Tie::UNKNOWN,
        };
        let (cells, existed) = self.cells_mut(code);
        let prior = newer(&mut cells.value, new, value_tie)?;
        let now = cells.value.as_ref().map(|s| &s.part);
        let differs = prior.as_deref().map(|s| &s.part) != now;
        Some(Won {
            prior,
            differs,
            existed,
        })
    }

    /// Adds a stored availability cell, as [`View::put_value`].
    fn put_availability(
        &mut self,
        code: &str,
        doc: &str,
        ts: i64,
    ) -> Option<Won<AvailabilityPart>> {
        let (part, tie) = AvailabilityPart::from_doc(doc);
        let new = Stamped { ts, part, tie };
        let (cells, existed) = self.cells_mut(code);
        let prior = newer(&mut cells.availability, new, stored_tie)?;
        let now = cells.availability.as_ref().map(|s| &s.part);
        let differs = availability_differs(prior.as_deref(), now, existed);
        Some(Won {
            prior,
            differs,
            existed,
        })
    }

    /// A signal's cells, created empty if it has none, and whether it had an entry.
    fn cells_mut(&mut self, code: &str) -> (&mut SignalCells, bool) {
        match self.signals.entry(code.into()) {
            btree_map::Entry::Occupied(o) => (o.into_mut(), true),
            btree_map::Entry::Vacant(v) => (v.insert(SignalCells::default()), false),
        }
    }

    /// Adds a stored vehicle-error cell, as [`View::put_value`].
    fn put_error(&mut self, key: &str, doc: &str, ts: i64) -> Option<Won<Value>> {
        let mut slot = self.errors.remove(key);
        let part = value_of(doc);
        let tie = Tie::text(part.to_string());
        let replaced = newer(&mut slot, Stamped { ts, part, tie }, stored_tie);
        let differs = replaced.as_ref().map(|prior| {
            let now = slot.as_ref().map(|s| &s.part);
            shown_error(prior.as_deref().map(|s| &s.part)) != shown_error(now)
        });
        if let Some(s) = slot {
            self.errors.insert(key.to_owned(), s);
        }
        Some(Won {
            prior: replaced?,
            differs: differs?,
            existed: true,
        })
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
                .get(code.as_str())
                .and_then(|c| c.value.as_ref())
                .map(|s| s.ts),
            CellKind::Availability(code) => self
                .signals
                .get(code.as_str())
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
        let won = match &cell.kind {
            CellKind::Value(code) => self
                .put_value(code, doc, ts)
                .map(|w| (w.differs, Replaced::Value(code.as_str().into(), w.prior))),
            CellKind::Availability(code) => self.put_availability(code, doc, ts).map(|w| {
                (
                    w.differs,
                    Replaced::Availability(code.as_str().into(), w.prior),
                )
            }),
            CellKind::Error(key) => self
                .put_error(key, doc, ts)
                .map(|w| (w.differs, Replaced::Error(key.as_str().into(), w.prior))),
        };
        match won {
            None => false,
            Some((false, _)) => true,
            Some((true, replaced)) => {
                self.take_back(replaced);
                false
            }
        }
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
                availability_differs(before.as_deref(), now, existed)
            }
            Replaced::Error(key, before) => {
                let now = self.errors.get(&**key).map(|s| &s.part);
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
                    self.errors.insert(key.into(), *p);
                }
                None => {
                    self.errors.remove(&*key);
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
        // Room for every write of the plan, then shrunk to what was replaced: grown by doubling,
        // the log of a large event was mostly unused capacity, held until its record commits.
        let writes = plan.values.len() + plan.availability.len() + plan.errors.len();
        let mut replaced = Vec::with_capacity(writes);
        // Per replacement: whether the document shows its cell differently right after the write,
        // and whether the signal had an entry just before it (used for availability only). Unless
        // the plan writes a cell twice, that is what the plan changed: no other write of the plan
        // touches the cell, and a signal given an entry earlier in the plan (by its value) is a
        // change anyway.
        let mut shown = Vec::with_capacity(writes);
        for w in &plan.values {
            let code = w.code.as_str();
            if let Some(won) = self.put_value(code, &w.value.doc, w.value.timestamp) {
                shown.push((won.differs, won.existed));
                replaced.push(Replaced::Value(code.into(), won.prior));
            }
        }
        for w in &plan.availability {
            let code = w.code.as_str();
            let ts = w.availability.timestamp;
            if let Some(won) = self.put_availability(code, &w.availability.doc, ts) {
                shown.push((won.differs, won.existed));
                replaced.push(Replaced::Availability(code.into(), won.prior));
            }
        }
        for w in &plan.errors {
            if let Some(won) = self.put_error(&w.key, &w.state.doc, w.state.timestamp) {
                shown.push((won.differs, won.existed));
                replaced.push(Replaced::Error(w.key.as_str().into(), won.prior));
            }
        }
        replaced.shrink_to_fit();
        // A cell the plan wrote twice (a code listed twice in one event): its state before the
        // plan is the prior of its first replacement, and what the document shows now is the
        // last write's, so the first replacement is compared with the view as it is now.
        let mut seen: HashSet<(u8, &str)> = HashSet::with_capacity(replaced.len());
        let twice = replaced.iter().any(|r| !seen.insert(r.cell()));
        if twice {
            seen.clear();
            for (r, s) in replaced.iter().zip(shown.iter_mut()) {
                if seen.insert(r.cell()) {
                    // The signal existed before the plan if it did before its first write.
                    s.0 = self.shows_differently(r, s.1);
                } else {
                    s.0 = false;
                }
            }
        }
        let mut signals: Vec<&str> = Vec::new();
        let mut errors: Vec<&str> = Vec::new();
        for (r, (differs, _)) in replaced.iter().zip(&shown) {
            if *differs {
                match r {
                    Replaced::Value(c, _) | Replaced::Availability(c, _) => signals.push(c),
                    Replaced::Error(k, _) => errors.push(k),
                }
            }
        }
        signals.sort_unstable();
        signals.dedup();
        errors.sort_unstable();
        errors.dedup();
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

    /// The active errors the document shows.
    fn active_errors(&self) -> ActiveErrors {
        let mut out = ActiveErrors {
            list: Vec::new(),
            needs_reconnect: false,
            rate_limited_until: None,
        };
        for (key, cell) in &self.errors {
            let Some(Value::Object(e)) = shown_error(Some(&cell.part)) else {
                continue;
            };
            out.needs_reconnect |= e
                .get("needsReconnect")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if let Some(b) = e.get("backoffUntil").and_then(Value::as_i64) {
                out.rate_limited_until = Some(out.rate_limited_until.map_or(b, |x| x.max(b)));
            }
            let mut e = e.clone();
            e.insert("key".into(), Value::from(key.clone()));
            out.list.push(Value::Object(e));
        }
        out
    }

    /// About the length of [`View::render_text`]'s document, counted from the cells' texts, so its
    /// buffer is allocated once at the document's size: a change record waits for its transaction
    /// in that buffer, and one grown by doubling holds up to twice the document. Exact for the
    /// fixed text and the values; an unavailable signal's error and an active error are estimated
    /// (rare; when larger the buffer grows once).
    fn text_capacity(&self, vehicle: &str, active: &ActiveErrors) -> usize {
        // `{"activeErrors":`, `,"needsReconnect":false`, `,"rateLimitedUntil":` + an i64,
        // `,"signals":{`, `},"unsupportedSignals":[`, `],"vehicleId":` + the quoted id,
        // `,"version":` + a small number, `}`.
        const DOCUMENT: usize = 160;
        // Per signal besides its code: the quotes, `:` and `,` around it; the nine keys with their
        // punctuation (`{"body":` … `,"unavailableSince":`, `}`: 114 bytes); the longest status
        // (`"unsupported"`); `null` for the error and the since of an available signal.
        const SIGNAL: usize = 4 + 114 + 13 + 8;
        // A signal without a value shows six `null`s; an unavailable one its error (estimated).
        const NO_VALUE: usize = 6 * NULL_TEXT.len();
        const AWAY: usize = 128;
        const ERROR: usize = 256;
        let signals: usize = self
            .signals
            .iter()
            .map(|(code, cells)| {
                let value = cells.value.as_ref().map_or(NO_VALUE, |v| v.part.text.len());
                let away = cells.availability.as_ref().map(|a| &a.part);
                let away = away.map_or(0, |a| match a.0 {
                    None => 0,
                    // Listed once more, quoted, among the unsupported signals.
                    Some(_) if a.status() == "unsupported" => AWAY + code.len() + 3,
                    Some(_) => AWAY,
                });
                code.len() + SIGNAL + value + away
            })
            .sum();
        DOCUMENT + vehicle.len() + signals + ERROR * active.list.len()
    }

    /// The state document's JSON text (schema in the README, "Vehicle state document"): the
    /// same bytes as [`View::render`]'s value written by serde_json (keys in sorted order),
    /// written straight from the cells' texts. This is what every change record carries.
    pub fn render_text(&self, vehicle: &str) -> String {
        let active = self.active_errors();
        let mut o = Out(Vec::with_capacity(self.text_capacity(vehicle, &active)));
        o.raw("{\"activeErrors\":");
        o.value(&Value::Array(active.list));
        o.raw(",\"needsReconnect\":");
        o.raw(if active.needs_reconnect {
            "true"
        } else {
            "false"
        });
        o.raw(",\"rateLimitedUntil\":");
        match active.rate_limited_until {
            Some(t) => o.raw(&t.to_string()),
            None => o.raw(NULL_TEXT),
        }
        o.raw(",\"signals\":{");
        let mut unsupported = Vec::new();
        let mut first = true;
        for (code, cells) in &self.signals {
            o.key(&mut first, code);
            let value = cells.value.as_ref().map(|s| &s.part);
            let field = |f: Field| value.map_or(NULL_TEXT, |v| v.get(f));
            let avail = cells.availability.as_ref().map(|s| &s.part);
            let status = avail.map_or("available", AvailabilityPart::status);
            if status == "unsupported" {
                unsupported.push(&**code);
            }
            o.raw("{\"body\":");
            o.raw(field(Field::Body));
            o.raw(",\"error\":");
            o.value(avail.map_or(&NULL, AvailabilityPart::error));
            o.raw(",\"eventId\":");
            o.raw(field(Field::EventId));
            o.raw(",\"fetchedAt\":");
            o.raw(field(Field::FetchedAt));
            o.raw(",\"logicVersion\":");
            o.raw(field(Field::LogicVersion));
            o.raw(",\"oemUpdatedAt\":");
            o.raw(field(Field::OemUpdatedAt));
            // `source` is null without a value.
            o.raw(",\"source\":");
            o.raw(field(Field::Source));
            o.raw(",\"status\":");
            o.str(status);
            o.raw(",\"unavailableSince\":");
            o.value(avail.map_or(&NULL, AvailabilityPart::since));
            o.raw("}");
        }
        o.raw("},\"unsupportedSignals\":[");
        let mut first = true;
        for code in unsupported {
            if !std::mem::take(&mut first) {
                o.raw(",");
            }
            o.str(code);
        }
        o.raw("],\"vehicleId\":");
        o.str(vehicle);
        o.raw(",\"version\":");
        o.raw(&DOCUMENT_VERSION.to_string());
        o.raw("}");
        // Every piece is UTF-8: the texts are `str`s and serde_json writes UTF-8.
        String::from_utf8(o.0).unwrap_or_default()
    }

    /// The state document as a JSON value, built as a tree from the cells (not by parsing
    /// [`View::render_text`], so each checks the other in the tests). For `processor state` and
    /// the rare whole-document comparisons; change records use the text.
    pub fn render(&self, vehicle: &str) -> Value {
        let active = self.active_errors();
        let mut signals = Map::new();
        let mut unsupported = Vec::new();
        for (code, cells) in &self.signals {
            let value = cells.value.as_ref().map(|s| &s.part);
            let field = |f: Field| value.map_or(Value::Null, |v| value_of(v.get(f)));
            let avail = cells.availability.as_ref().map(|s| &s.part);
            let status = avail.map_or("available", AvailabilityPart::status);
            if status == "unsupported" {
                unsupported.push(Value::from(&**code));
            }
            let entry = serde_json::json!({
                "body": field(Field::Body),
                "error": avail.map_or(&NULL, AvailabilityPart::error),
                "eventId": field(Field::EventId),
                "fetchedAt": field(Field::FetchedAt),
                "logicVersion": field(Field::LogicVersion),
                "oemUpdatedAt": field(Field::OemUpdatedAt),
                "source": field(Field::Source),
                "status": status,
                "unavailableSince": avail.map_or(&NULL, AvailabilityPart::since),
            });
            signals.insert(code.to_string(), entry);
        }
        serde_json::json!({
            "activeErrors": active.list,
            "needsReconnect": active.needs_reconnect,
            "rateLimitedUntil": active.rate_limited_until,
            "signals": signals,
            "unsupportedSignals": unsupported,
            "vehicleId": vehicle,
            "version": DOCUMENT_VERSION,
        })
    }

    /// What a first record names: every signal, and every active error.
    pub fn names(&self) -> Vec<String> {
        let errors = self
            .errors
            .iter()
            .filter(|(_, c)| shown_error(Some(&c.part)).is_some())
            .map(|(k, _)| format!("error:{k}"));
        self.signals
            .keys()
            .map(|k| k.to_string())
            .chain(errors)
            .collect()
    }

    /// [`View::cell_times_text`] as a value: the tests' reference for its bytes, and the input
    /// [`View::restore`] takes in them.
    #[cfg(test)]
    pub fn cell_times(&self) -> Value {
        let mut v = Map::new();
        let mut a = Map::new();
        for (code, cells) in &self.signals {
            if let Some(s) = &cells.value {
                v.insert(code.to_string(), Value::from(s.ts));
            }
            if let Some(s) = &cells.availability {
                a.insert(code.to_string(), Value::from(s.ts));
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
            .filter_map(|(code, c)| c.value.as_ref().map(|s| (&**code, s.ts)));
        let availability = self
            .signals
            .iter()
            .filter_map(|(code, c)| c.availability.as_ref().map(|s| (&**code, s.ts)));
        let errors = self.errors.iter().map(|(key, s)| (key.as_str(), s.ts));
        // Fields in the order serde_json's sorted map writes them.
        #[derive(Serialize)]
        struct Times<A, E, V> {
            a: A,
            e: E,
            v: V,
        }
        // Sized like the document (see `text_capacity`): per cell its quoted code, `:`, `,` and
        // an i64; the three keys and braces.
        let capacity = 32
            + self
                .signals
                .iter()
                .map(|(code, c)| {
                    (code.len() + 24)
                        * (usize::from(c.value.is_some()) + usize::from(c.availability.is_some()))
                })
                .sum::<usize>()
            + self.errors.keys().map(|k| k.len() + 24).sum::<usize>();
        let mut out = Vec::with_capacity(capacity);
        let _ = serde_json::to_writer(
            &mut out,
            &Times {
                a: TimesMap(availability),
                e: TimesMap(errors),
                v: TimesMap(values),
            },
        );
        // serde_json writes UTF-8.
        String::from_utf8(out).unwrap_or_default()
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
                    tie: Tie::UNKNOWN,
                });
            }
            if let Some(t) = ts("a", code)? {
                // An available cell's stored document may carry `"error":null` (a resolved
                // incompatibility) or no error key; the document does not say which.
                let part = AvailabilityPart::from_entry(entry);
                let tie = if part.error().is_null() {
                    Tie::no_error_key()
                } else {
                    Tie::text(part.error().to_string())
                };
                cells.availability = Some(Stamped { ts: t, part, tie });
            }
            view.signals.insert(code.as_str().into(), cells);
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
                        let tie = Tie::text(doc.to_string());
                        (doc, tie)
                    }
                    None => (Value::Null, Tie::UNKNOWN),
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

/// Plans of test events, for this module's tests and the crate's others.
#[cfg(test)]
pub(crate) mod testing {
    use crate::effects::{self, Context, Plan};
    use serde_json::{json, Value};
    use shared::clock::EpochMillis;
    use shared::event::Event;

    /// A pipeline context whose receive and delivery times are `received`.
    pub(crate) fn ctx(received: i64) -> Context {
        Context {
            received_at: EpochMillis::new(received).expect("a valid test time"),
            delivered_at: EpochMillis::new(received).expect("a valid test time"),
            logic_version: 1,
            rate_limit_backoff_secs: 900,
            max_skew_ms: 60_000,
        }
    }

    /// An event of `n` signals whose bodies each carry a string of `body_bytes`.
    pub(crate) fn many(id: &str, n: usize, body_bytes: usize, oem: i64) -> Plan {
        let signals: Vec<Value> = (0..n)
            .map(|i| {
                json!({"code": format!("group{}-signal{i}", i % 19), "name": format!("Signal{i}"),
                    "group": format!("Group{}", i % 19),
                    "body": {"unit": "text", "value": "x".repeat(body_bytes)},
                    "meta": {"oemUpdatedAt": oem + i as i64}})
            })
            .collect();
        let body = json!({"eventId": id, "eventType": "VEHICLE_STATE",
            "data": {"vehicle": {"id": "car"}, "user": {"id": "u"}, "signals": signals},
            "meta": {"webhookId": "w", "deliveryId": format!("d-{id}"), "deliveredAt": oem,
                "mode": "LIVE", "signalCount": n}});
        let body = serde_json::to_vec(&body).expect("a test event");
        let e = Event::parse(&body).expect("valid test event");
        effects::plan(&e, ctx(oem))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{ctx, many};
    use super::*;
    use crate::effects;
    use serde_json::json;
    use shared::event::Event;

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

    /// An event listing one signal twice: the document changes by what the last winning write
    /// shows against what the view showed before the event, not by the first write. Here the
    /// first listing reports the signal unavailable and the second (a stale value, so only its
    /// availability wins, at the same delivery time) available again: nothing changed.
    #[test]
    fn a_signal_listed_twice_changes_the_document_by_its_last_write() {
        // Epoch milliseconds (smaller numbers read as seconds).
        const T: i64 = 1_764_000_000_000;
        let soc = |extra: &str, soc: f64, oem: i64| {
            format!(
                r#"{{"code":"tractionbattery-stateofcharge","name":"StateOfCharge","group":"TractionBattery","body":{{"value":{soc},"unit":"percent"}},"meta":{{"oemUpdatedAt":{oem}}}{extra}}}"#
            )
        };
        let unavailable = r#"{"code":"tractionbattery-stateofcharge","name":"StateOfCharge","group":"TractionBattery","status":{"value":"ERROR","error":{"type":"VEHICLE_STATE","code":"UNKNOWN"}}}"#;
        let event = |id: &str, signals: &[String], at: i64| {
            let body = format!(
                r#"{{"eventId":"{id}","eventType":"VEHICLE_STATE","data":{{"vehicle":{{"id":"car"}},"user":{{"id":"u"}},"signals":[{}]}},"meta":{{"webhookId":"w","deliveryId":"d-{id}","deliveredAt":{at},"mode":"LIVE","signalCount":{}}}}}"#,
                signals.join(","),
                signals.len()
            );
            let e = Event::parse(body.as_bytes()).expect("valid test event");
            effects::plan(&e, ctx(at))
        };
        let mut v = View::default();
        v.apply(&event("e1", &[soc("", 50.0, T + 2_000)], T + 2_000));
        let cases = [
            // Unavailable, then available again with a stale value: no change.
            (
                "e2",
                vec![unavailable.to_owned(), soc("", 40.0, T + 1_000)],
                T + 3_000,
            ),
            // Available with a stale value, then unavailable at the same delivery time: the tie
            // keeps the available document (its bytes are greater), so again nothing.
            (
                "e3",
                vec![soc("", 40.0, T + 1_000), unavailable.to_owned()],
                T + 4_000,
            ),
            // A fresher value listed twice: a change.
            (
                "e4",
                vec![soc("", 55.0, T + 5_000), soc("", 56.0, T + 5_500)],
                T + 6_000,
            ),
        ];
        let mut saw_no_change = false;
        for (id, signals, at) in cases {
            let plan = event(id, &signals, at);
            assert!(
                plan.availability.len() >= 2,
                "{id}: the plan writes the signal's availability twice"
            );
            let before = v.render("car");
            let applied = v.apply_tracked(&plan);
            let after = v.render("car");
            let mut expected = changed(&before, &after);
            expected.sort();
            assert_eq!(applied.changed, expected, "{id}");
            saw_no_change |= expected.is_empty() && applied.replaced_any();
            let mut undone = v.clone();
            undone.undo(applied);
            assert_eq!(
                undone.render("car"),
                before,
                "{id}: undo restores the document"
            );
        }
        assert!(
            saw_no_change,
            "some event replaced cells without changing the document"
        );
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

    /// A change record waits for its transaction in the buffers its document and cell times were
    /// written to, and the bound on what waits counts those buffers: each is allocated once at
    /// about its text's size, not reserved at a guess and grown by doubling (which held up to
    /// twice the text), whatever the signals' size, with unavailable and unsupported signals and
    /// an active error.
    #[test]
    fn a_change_records_buffers_are_allocated_at_their_texts_size() {
        for (n, body_bytes) in [(1, 1), (40, 10), (200, 100), (200, 300), (50, 2_000)] {
            // Times as they are (2025, milliseconds; cells store microseconds).
            let at = 1_764_000_000_000;
            let mut v = View::default();
            v.apply(&state("e1", 50.0, at));
            v.apply(&error("e2", "ERROR", at + 1));
            v.apply(&many("e3", n, body_bytes, at + 2));
            for (what, text) in [
                ("document", v.render_text("car")),
                ("cell times", v.cell_times_text()),
            ] {
                let (len, cap) = (text.len(), text.capacity());
                assert!(
                    len <= cap && cap <= len + len / 8 + 64,
                    "{n} signals of {body_bytes} B: {what} of {len} B in a buffer of {cap} B"
                );
            }
        }
    }

    /// A record waiting for its transaction keeps the cells it replaced, to be undone: the bound
    /// on what waits counts them, about the previous values' texts (an event that refreshes every
    /// signal keeps about the previous document); a stale event replaces and keeps nothing.
    #[test]
    fn an_applied_plan_is_sized_with_the_cells_it_replaced() {
        let at = 1_764_000_000_000;
        let mut v = View::default();
        v.apply(&many("e1", 100, 200, at));
        let previous = v.render_text("car").len();
        let held = v
            .apply_tracked(&many("e2", 100, 200, at + 1_000))
            .held_bytes();
        assert!(
            100 * 200 < held && held < previous + 100 * 256,
            "refreshing 100 signals of 200 B (previous document {previous} B) keeps {held} B"
        );
        let stale = v.apply_tracked(&many("e0", 100, 200, at - 1_000));
        assert_eq!(stale.held_bytes(), 0, "a stale event keeps nothing");
    }

    /// A large vehicle has hundreds of cells and the cache holds many vehicles: a signal's two
    /// cells stay a few words (see the module's note on memory), the rest is one text per value.
    #[test]
    fn a_signals_cells_stay_small() {
        let word = std::mem::size_of::<usize>();
        assert!(std::mem::size_of::<Stamped<ValuePart>>() <= 8 * word);
        assert!(std::mem::size_of::<Stamped<AvailabilityPart>>() <= 4 * word);
        assert!(std::mem::size_of::<SignalCells>() <= 13 * word);
    }

    /// At equal timestamps the store keeps the greater availability document: one without an
    /// `error` key (its bytes go on `{"eventId"`) is greater than one with it (`{"error"`).
    #[test]
    fn at_equal_timestamps_an_availability_without_an_error_key_wins() {
        use crate::store::{CellKind, StoredCell};
        let cell = |doc: Value| StoredCell {
            kind: CellKind::Availability("s".into()),
            doc: doc.to_string(),
            timestamp: 5,
            event_id: None,
        };
        let with = json!({"status": "unsupported", "error": {"type": "COMPATIBILITY"}, "since": 1, "eventId": "a"});
        let without = json!({"status": "available", "since": 2, "eventId": "b"});
        let (with_text, without_text) = (with.to_string(), without.to_string());
        assert!(with_text < without_text, "the store's byte order");
        for order in [[&with, &without], [&without, &with]] {
            let mut v = View::default();
            for doc in order {
                v.put(&cell(doc.clone()));
            }
            assert_eq!(v.render("car")["signals"]["s"]["status"], "available");
            let mut r =
                View::restore("car", &v.render("car"), &v.cell_times()).expect("restorable");
            r.put(&cell(with.clone()));
            assert_eq!(
                r.render("car")["signals"]["s"]["status"],
                "available",
                "restored"
            );
        }
    }

    /// The document's text is written from the cells' texts, its value built as a tree: both
    /// must say the same for every shape a cell takes, and a view restored from them must too.
    #[test]
    fn text_and_value_agree_on_every_shape_and_survive_a_restore() {
        use crate::store::{CellKind, StoredCell};
        let cell = |kind: CellKind, doc: Value, timestamp: i64| StoredCell {
            kind,
            doc: doc.to_string(),
            timestamp,
            event_id: None,
        };
        let odd = "a\"b\\c/\u{e9}\u{1}\u{2028}";
        let mut v = View::default();
        // A value without a source (stored before polling), with escapes and extreme numbers.
        v.put(&cell(
            CellKind::Value(odd.into()),
            json!({"body": {"s": odd, "n": [1.5e300, -0.0, 12_345_678_901_234_567_890_u64, -7]},
                   "eventId": "e\"1", "oemUpdatedAt": "2026-01-01T00:00:00Z", "fetchedAt": 5,
                   "logicVersion": 2, "ignored": true}),
            10,
        ));
        v.put(&cell(
            CellKind::Value("polled".into()),
            json!({"body": null, "eventId": "p1", "oemUpdatedAt": 7, "source": "poll"}),
            11,
        ));
        v.put(&cell(
            CellKind::Availability(odd.into()),
            json!({"status": "unavailable", "error": {"type": "X", "code": "Y\u{0}"}, "since": 9, "eventId": "e1"}),
            12,
        ));
        v.put(&cell(
            CellKind::Availability("unsupported-only".into()),
            json!({"status": "unsupported", "error": {"type": "COMPATIBILITY"}, "since": 3}),
            13,
        ));
        v.put(&cell(
            CellKind::Availability("polled".into()),
            json!({"status": "available", "error": null, "since": 4, "eventId": "p1"}),
            14,
        ));
        v.put(&cell(
            CellKind::Value("unreadable".into()),
            Value::String("{not json".into()),
            15,
        ));
        v.put(&cell(
            CellKind::Error("RATE_LIMIT:VEHICLE".into()),
            json!({"state": "ERROR", "needsReconnect": false, "backoffUntil": 99, "eventId": "x"}),
            16,
        ));
        v.put(&cell(
            CellKind::Error("AUTH:\"k\"".into()),
            json!({"state": "ERROR", "needsReconnect": true, "backoffUntil": 42}),
            17,
        ));
        v.put(&cell(
            CellKind::Error("gone".into()),
            json!({"state": "RESOLVED", "needsReconnect": true}),
            18,
        ));
        let vehicle = "car\u{7f}\"";
        let doc = v.render(vehicle);
        let text = v.render_text(vehicle);
        assert_eq!(text, doc.to_string());
        assert_eq!(doc["needsReconnect"], true);
        assert_eq!(doc["rateLimitedUntil"], 99);
        assert_eq!(doc["unsupportedSignals"], json!(["unsupported-only"]));
        assert_eq!(doc["signals"][odd]["source"], "webhook");
        assert_eq!(
            doc["signals"][odd]["body"]["n"][2],
            12_345_678_901_234_567_890_u64
        );
        assert_eq!(doc["signals"][odd]["unavailableSince"], 9);
        assert_eq!(doc["signals"]["polled"]["error"], Value::Null);
        assert_eq!(doc["signals"]["unsupported-only"]["eventId"], Value::Null);
        assert_eq!(doc["signals"]["unreadable"]["source"], "webhook");
        assert_eq!(doc["activeErrors"].as_array().map(Vec::len), Some(2));
        let r = View::restore(vehicle, &doc, &v.cell_times()).expect("restorable");
        assert_eq!(r.render_text(vehicle), text);
        assert_eq!(r.cell_times_text(), v.cell_times_text());
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
