//! `processor dlq`: inspect and redrive dead letters.
//!
//! Redrive re-publishes a letter to the events topic with its original key and headers plus
//! `carhook-redrive-count`. Safety:
//! - a loop guard refuses letters already redriven `max_redrives` times (the count travels with the
//!   record, so a letter that fails again comes back to the dead-letter topic still carrying it);
//! - each letter is redriven at most once: `redriven_letters` records (topic, partition, offset) with
//!   an LWT after the broker acknowledged the copy; a second redrive of the same letter is skipped;
//! - the redriven copy is a new record, so the processor's claim logic lets it take over an event
//!   whose claim was marked dead-lettered, and treats it as a duplicate if the event was applied.
//!
//! Reads never act on a silently truncated view: [`scan`] reads each partition up to the high
//! watermark it had when the read started and reports a [`Coverage`]; [`read_letters`] and
//! redrive by reason or `--all` fail when any partition could not be read to its end. `show`
//! and redrive by position fetch each letter directly at its offset ([`fetch`]) instead of
//! scanning.

use std::io::IsTerminal;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use scylla::client::session::Session;
use serde_json::{json, Value};
use shared::clock::EpochMillis;
use shared::config::Settings;
use shared::headers;

use crate::dead_letter::header_str;

/// Failures of the dlq commands.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cql: {0}")]
    Cql(String),
    #[error("no dead letter at {0}")]
    NotFound(String),
    #[error("{0:?} is not an offset or partition:offset")]
    BadPosition(String),
    #[error("unknown reason {given:?}; the error classes are: {}", KNOWN_REASONS.join(", "))]
    BadReason { given: String },
    #[error("the dead-letter topic could not be read to its end: {0}")]
    Incomplete(Coverage),
}

/// Every error class a dead letter can carry (`carhook-dlq-error-class`): the event parser's
/// classes and `store_refused` (a statement the store refused `processor.max_attempts` times).
pub const KNOWN_REASONS: [&str; 7] = [
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "invalid_id",
    "too_many_signals",
    "store_refused",
];

/// Checks `--reason` against [`KNOWN_REASONS`].
pub fn parse_reason(s: &str) -> Result<String, DlqError> {
    if KNOWN_REASONS.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(DlqError::BadReason {
            given: s.to_string(),
        })
    }
}

/// How much of the dead-letter topic a read covered.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Coverage {
    /// Letters read.
    pub read: u64,
    /// Offsets between the low and high watermarks of every partition when the read started: the
    /// letters present, plus the transaction markers of the processor's transactions.
    pub offsets: u64,
    /// Partitions holding letters.
    pub partitions: u64,
    /// Of those, partitions read up to their high watermark.
    pub partitions_read_to_end: u64,
    /// Every partition read to its end (false also when `--limit` stopped the read).
    pub complete: bool,
    /// The read stopped early because `--limit` letters matched.
    pub limit_reached: bool,
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "read {} letter(s) of {} offset(s) present; {} of {} partition(s) read to the end{}",
            self.read,
            self.offsets,
            self.partitions_read_to_end,
            self.partitions,
            if self.limit_reached {
                " (stopped at --limit)"
            } else {
                ""
            }
        )
    }
}

/// A dead letter's position on the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LetterPos {
    pub partition: i32,
    pub offset: i64,
}

impl std::str::FromStr for LetterPos {
    type Err = DlqError;

    /// `P:O`, or a bare offset meaning partition 0.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DlqError::BadPosition(s.to_string());
        let (p, o) = s.split_once(':').unwrap_or(("0", s));
        Ok(Self {
            partition: p.trim().parse().map_err(|_| bad())?,
            offset: o.trim().parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for LetterPos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

/// One dead letter as the commands show it.
#[derive(Debug, Clone)]
pub struct Letter {
    pub pos: LetterPos,
    pub msg: OwnedMessage,
}

impl Letter {
    /// The error class (`carhook-dlq-error-class`).
    pub fn reason(&self) -> &str {
        header_str(&self.msg, headers::DLQ_ERROR_CLASS).unwrap_or("unknown")
    }

    /// Times an operator redrove it before.
    pub fn redrive_count(&self) -> u32 {
        header_str(&self.msg, headers::REDRIVE_COUNT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A JSON view: position, reason, original position, ids, age, headers, body.
    pub fn to_json(&self, with_body: bool) -> Value {
        let h = |k| header_str(&self.msg, k);
        let first = h(headers::DLQ_FIRST_FAILURE_AT).and_then(|v| v.parse::<i64>().ok());
        let age_secs = first.map(|f| (EpochMillis::now().as_i64() - f) / 1000);
        let mut v = json!({
            "position": self.pos.to_string(),
            "reason": self.reason(),
            "error": h(headers::DLQ_ERROR_MESSAGE),
            "original": format!("{}/{}:{}", h(headers::DLQ_ORIGINAL_TOPIC).unwrap_or("?"), h(headers::DLQ_ORIGINAL_PARTITION).unwrap_or("?"), h(headers::DLQ_ORIGINAL_OFFSET).unwrap_or("?")),
            "eventId": h(headers::EVENT_ID),
            "vehicle": self.msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            "ageSeconds": age_secs,
            "attempts": h(headers::DLQ_ATTEMPTS),
            "redriveCount": self.redrive_count(),
        });
        if with_body {
            let hs: serde_json::Map<String, Value> = self
                .msg
                .headers()
                .map(|hs| {
                    (0..hs.count())
                        .map(|i| hs.get(i))
                        .map(|x| {
                            (
                                x.key.to_string(),
                                Value::from(
                                    x.value.map(|b| String::from_utf8_lossy(b).into_owned()),
                                ),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            v["headers"] = Value::Object(hs);
            let body = self.msg.payload().unwrap_or_default();
            v["body"] = serde_json::from_slice(body)
                .unwrap_or_else(|_| Value::from(String::from_utf8_lossy(body).into_owned()));
        }
        v
    }
}

/// How long a partition may go without any progress before its read is given up as incomplete.
const STALL: Duration = Duration::from_secs(15);

fn reader(settings: &Settings) -> Result<BaseConsumer, DlqError> {
    Ok(shared::kafka::base_config(&settings.kafka)
        .set("group.id", "carhook-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .create()?)
}

/// Reads the dead-letter topic partition by partition, in position order, each up to the high
/// watermark it had when the read started, handing every letter to `on_letter`, which returns
/// false to stop (e.g. `--limit` reached). Returns what the read covered.
pub fn scan(
    settings: &Settings,
    mut on_letter: impl FnMut(Letter) -> bool,
) -> Result<Coverage, DlqError> {
    let topic = &settings.kafka.dlq_topic;
    let c = reader(settings)?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut parts: Vec<(i32, i64, i64)> = Vec::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        if high > low {
            parts.push((p.id(), low, high));
        }
    }
    parts.sort_unstable();
    let mut cov = Coverage {
        offsets: parts.iter().map(|(_, l, h)| (h - l) as u64).sum(),
        partitions: parts.len() as u64,
        ..Coverage::default()
    };
    for (partition, low, high) in parts {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
        c.assign(&tpl)?;
        let mut last_progress = std::time::Instant::now();
        let mut at = low;
        while at < high {
            if last_progress.elapsed() > STALL {
                return Ok(cov); // incomplete: `complete` stays false
            }
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let m = m.detach();
                    at = m.offset() + 1;
                    last_progress = std::time::Instant::now();
                    if m.offset() >= high {
                        break;
                    }
                    cov.read += 1;
                    let pos = LetterPos {
                        partition,
                        offset: m.offset(),
                    };
                    if !on_letter(Letter { pos, msg: m }) {
                        cov.limit_reached = true;
                        return Ok(cov);
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    // Transaction markers and aborted letters occupy offsets: the consumer's
                    // position passing them is progress too.
                    let position = c.position()?;
                    if let Some(Offset::Offset(o)) = position
                        .find_partition(topic, partition)
                        .map(|e| e.offset())
                    {
                        if o > at {
                            at = o;
                            last_progress = std::time::Instant::now();
                        }
                    }
                }
            }
        }
        cov.partitions_read_to_end += 1;
    }
    cov.complete = cov.partitions_read_to_end == cov.partitions;
    Ok(cov)
}

/// Reads every letter currently on the dead-letter topic (a snapshot up to the high watermarks);
/// fails rather than return part of them.
pub fn read_letters(settings: &Settings) -> Result<Vec<Letter>, DlqError> {
    let mut out = Vec::new();
    let cov = scan(settings, |l| {
        out.push(l);
        true
    })?;
    if !cov.complete {
        return Err(DlqError::Incomplete(cov));
    }
    Ok(out)
}

/// The letter at `pos`, read directly at its offset (no scan). `NotFound` when the partition or
/// offset holds no letter (out of range, expired, a transaction marker, an aborted write).
pub fn fetch(settings: &Settings, pos: LetterPos) -> Result<Letter, DlqError> {
    let topic = &settings.kafka.dlq_topic;
    let c = reader(settings)?;
    let not_found = || DlqError::NotFound(pos.to_string());
    let (low, high) = match c.fetch_watermarks(topic, pos.partition, Duration::from_secs(10)) {
        Ok(w) => w,
        Err(e)
            if e.rdkafka_error_code()
                == Some(rdkafka::types::RDKafkaErrorCode::UnknownPartition) =>
        {
            return Err(not_found())
        }
        Err(e) => return Err(e.into()),
    };
    if pos.offset < low || pos.offset >= high {
        return Err(not_found());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, pos.partition, Offset::Offset(pos.offset))?;
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + STALL;
    while std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() == pos.offset => {
                return Ok(Letter {
                    pos,
                    msg: m.detach(),
                })
            }
            Some(Ok(_)) => return Err(not_found()),
            Some(Err(e)) => return Err(e.into()),
            None => {
                let past = c
                    .position()?
                    .find_partition(topic, pos.partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o > pos.offset),
                        _ => None,
                    });
                if past == Some(true) {
                    return Err(not_found());
                }
            }
        }
    }
    Err(DlqError::Incomplete(Coverage {
        offsets: 1,
        partitions: 1,
        ..Coverage::default()
    }))
}

/// Letters as a table: position, reason, original position, event id, vehicle, age, redrives.
pub fn table(letters: &[Letter]) -> comfy_table::Table {
    let mut t = crate::tools::table([
        "POSITION", "REASON", "ORIGINAL", "EVENT ID", "VEHICLE", "AGE", "REDRIVES",
    ]);
    for l in letters {
        let v = l.to_json(false);
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        let age = v["ageSeconds"].as_i64().map_or("-".to_string(), |secs| {
            humantime::format_duration(Duration::from_secs(secs.max(0).unsigned_abs())).to_string()
        });
        t.add_row(vec![
            s("position"),
            s("reason"),
            s("original"),
            s("eventId"),
            s("vehicle"),
            age,
            l.redrive_count().to_string(),
        ]);
    }
    t
}

/// Which letters to redrive.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Positions(Vec<LetterPos>),
    Reason(String),
}

/// Redrive results.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedriveSummary {
    /// What the read of the dead-letter topic covered (None when letters were fetched by position).
    pub coverage: Option<Coverage>,
    pub selected: u64,
    pub redriven: u64,
    pub already_redriven: u64,
    pub refused_loop_guard: u64,
}

async fn mark_redriven(
    session: &Session,
    keyspace: &str,
    topic: &str,
    pos: LetterPos,
) -> Result<bool, DlqError> {
    let q = format!("INSERT INTO {keyspace}.redriven_letters (topic, partition, \"offset\", redriven_at) VALUES (?, ?, ?, toTimestamp(now())) IF NOT EXISTS");
    let res = session
        .query_unpaged(q, (topic, pos.partition, pos.offset))
        .await
        .map_err(|e| DlqError::Cql(e.to_string()))?;
    crate::store::lwt_applied(res).map_err(DlqError::Cql)
}

async fn was_redriven(
    session: &Session,
    keyspace: &str,
    topic: &str,
    pos: LetterPos,
) -> Result<bool, DlqError> {
    let q = format!("SELECT \"offset\" FROM {keyspace}.redriven_letters WHERE topic = ? AND partition = ? AND \"offset\" = ?");
    let res = session
        .query_unpaged(q, (topic, pos.partition, pos.offset))
        .await
        .map_err(|e| DlqError::Cql(e.to_string()))?;
    let rows = res
        .into_rows_result()
        .map_err(|e| DlqError::Cql(e.to_string()))?;
    Ok(rows.rows_num() > 0)
}

/// The letters `selection` names: fetched directly by position, else from a complete read of the
/// topic (an incomplete one is an error: acting on part of the letters would be silent).
pub fn select(
    settings: &Settings,
    selection: &Selection,
) -> Result<(Vec<Letter>, Option<Coverage>), DlqError> {
    if let Selection::Positions(ps) = selection {
        let letters = ps
            .iter()
            .map(|p| fetch(settings, *p))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((letters, None));
    }
    let mut out = Vec::new();
    let cov = scan(settings, |l| {
        if matches!(selection, Selection::Reason(r) if l.reason() != r) {
            return true;
        }
        out.push(l);
        true
    })?;
    if !cov.complete {
        return Err(DlqError::Incomplete(cov));
    }
    Ok((out, Some(cov)))
}

/// Re-publishes the selected letters to the events topic.
pub async fn redrive(
    settings: &Settings,
    session: &Session,
    selection: &Selection,
    dry_run: bool,
    max_redrives: u32,
) -> Result<RedriveSummary, DlqError> {
    let (letters, coverage) = select(settings, selection)?;
    redrive_letters(settings, session, &letters, coverage, dry_run, max_redrives).await
}

/// Re-publishes `letters` (chosen with [`select`], whose `coverage` the summary carries).
pub async fn redrive_letters(
    settings: &Settings,
    session: &Session,
    letters: &[Letter],
    coverage: Option<Coverage>,
    dry_run: bool,
    max_redrives: u32,
) -> Result<RedriveSummary, DlqError> {
    let chosen: Vec<&Letter> = letters.iter().collect();
    let producer: FutureProducer = shared::kafka::producer_config(&settings.kafka).create()?;
    let mut sum = RedriveSummary {
        coverage,
        selected: chosen.len() as u64,
        ..Default::default()
    };
    let bar = (std::io::stderr().is_terminal() && !dry_run)
        .then(|| indicatif::ProgressBar::new(chosen.len() as u64));
    let ks = &settings.cql.keyspace;
    let dlq = &settings.kafka.dlq_topic;
    for l in chosen {
        if let Some(b) = &bar {
            b.inc(1);
        }
        if l.redrive_count() >= max_redrives {
            sum.refused_loop_guard += 1;
            tracing::warn!(position = %l.pos, count = l.redrive_count(), "refused: redriven too often (loop guard)");
            continue;
        }
        if was_redriven(session, ks, dlq, l.pos).await? {
            sum.already_redriven += 1;
            continue;
        }
        if dry_run {
            tracing::info!(
                position = %l.pos,
                reason = l.reason(),
                event_id = header_str(&l.msg, headers::EVENT_ID).unwrap_or("-"),
                "would redrive"
            );
            sum.redriven += 1;
            continue;
        }
        let count = (l.redrive_count() + 1).to_string();
        let mut h = OwnedHeaders::new();
        if let Some(orig) = l.msg.headers() {
            for i in 0..orig.count() {
                let x = orig.get(i);
                if !x.key.starts_with("carhook-dlq-") && x.key != headers::REDRIVE_COUNT {
                    h = h.insert(Header {
                        key: x.key,
                        value: x.value,
                    });
                }
            }
        }
        h = h.insert(Header {
            key: headers::REDRIVE_COUNT,
            value: Some(count.as_str()),
        });
        let payload = l.msg.payload().unwrap_or_default();
        let mut rec = FutureRecord::<[u8], [u8]>::to(&settings.kafka.events_topic)
            .payload(payload)
            .headers(h);
        if let Some(k) = l.msg.key() {
            rec = rec.key(k);
        }
        producer
            .send(rec, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| DlqError::Kafka(e))?;
        // Marked after the broker acknowledged: a crash in between may re-send the letter once, and
        // the event-id claim absorbs that copy; marking first could lose it.
        if mark_redriven(session, ks, dlq, l.pos).await? {
            sum.redriven += 1;
        } else {
            sum.already_redriven += 1;
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_reasons_are_the_parser_classes_and_store_refused() {
        let mut want = shared::event::EventError::CLASSES.to_vec();
        want.push("store_refused");
        assert_eq!(KNOWN_REASONS.to_vec(), want);
        assert!(parse_reason("not_json").is_ok());
        let e = parse_reason("not-json").err().map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|m| m.contains("store_refused")),
            "{e:?}"
        );
    }
}
