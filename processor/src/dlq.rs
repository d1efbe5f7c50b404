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

/// Reads every letter currently on the dead-letter topic (a snapshot up to the high watermarks).
pub fn read_letters(settings: &Settings) -> Result<Vec<Letter>, DlqError> {
    let topic = &settings.kafka.dlq_topic;
    let c: BaseConsumer = shared::kafka::base_config(&settings.kafka)
        .set("group.id", "carhook-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = std::collections::HashMap::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        if high > low {
            tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
            ends.insert(p.id(), high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut done = std::collections::HashSet::new();
    while done.len() < ends.len() && std::time::Instant::now() < deadline {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let m = m.detach();
                let end = ends.get(&m.partition()).copied().unwrap_or(0);
                if m.offset() + 1 >= end {
                    done.insert(m.partition());
                }
                if m.offset() < end {
                    out.push(Letter {
                        pos: LetterPos {
                            partition: m.partition(),
                            offset: m.offset(),
                        },
                        msg: m,
                    });
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                // Transaction markers occupy offsets: a partition whose position reached the end is done.
                if let Ok(pos) = c.position() {
                    for e in pos.elements() {
                        if let (Offset::Offset(o), Some(end)) =
                            (e.offset(), ends.get(&e.partition()))
                        {
                            if o >= *end {
                                done.insert(e.partition());
                            }
                        }
                    }
                }
            }
        }
    }
    out.sort_by_key(|l| l.pos);
    Ok(out)
}

/// Prints letters as a table (or JSON lines).
pub fn print_list(letters: &[Letter], json_out: bool) {
    if json_out {
        let all: Vec<Value> = letters.iter().map(|l| l.to_json(false)).collect();
        println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        return;
    }
    println!(
        "{:<10} {:<18} {:<32} {:<38} {:<24} {:>8} {:>7}",
        "POSITION", "REASON", "ORIGINAL", "EVENT ID", "VEHICLE", "AGE", "REDRIVE"
    );
    for l in letters {
        let v = l.to_json(false);
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        let age = v["ageSeconds"].as_i64().map_or("-".to_string(), human_age);
        println!(
            "{:<10} {:<18} {:<32} {:<38} {:<24} {:>8} {:>7}",
            s("position"),
            s("reason"),
            s("original"),
            s("eventId"),
            s("vehicle"),
            age,
            l.redrive_count()
        );
    }
    println!("{} letter(s)", letters.len());
}

fn human_age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
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

/// Re-publishes the selected letters to the events topic.
pub async fn redrive(
    settings: &Settings,
    session: &Session,
    selection: &Selection,
    dry_run: bool,
    max_redrives: u32,
) -> Result<RedriveSummary, DlqError> {
    let letters = read_letters(settings)?;
    let chosen: Vec<&Letter> = letters
        .iter()
        .filter(|l| match selection {
            Selection::All => true,
            Selection::Positions(ps) => ps.contains(&l.pos),
            Selection::Reason(r) => l.reason() == r,
        })
        .collect();
    if let Selection::Positions(ps) = selection {
        if let Some(missing) = ps.iter().find(|p| !chosen.iter().any(|l| l.pos == **p)) {
            return Err(DlqError::NotFound(missing.to_string()));
        }
    }
    let producer: FutureProducer = shared::kafka::producer_config(&settings.kafka).create()?;
    let mut sum = RedriveSummary {
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
            println!(
                "would redrive {} ({}) event {}",
                l.pos,
                l.reason(),
                header_str(&l.msg, headers::EVENT_ID).unwrap_or("-")
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
