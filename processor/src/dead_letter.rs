//! Poison messages: records that can never be applied, set aside on the dead-letter topic with their
//! original key, value and headers plus provenance, so the partition moves on and an operator can
//! inspect and redrive them later.

use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use shared::clock::EpochMillis;
use shared::headers;

/// Why a record is poison.
#[derive(Debug, Clone, PartialEq)]
pub struct Poison {
    /// Bounded class (metric label and `carhook-dlq-error-class`), e.g. `not_json`, `missing_field`.
    pub class: &'static str,
    /// What is wrong, naming the field.
    pub message: String,
    pub attempts: u32,
    pub first_failure_at: EpochMillis,
}

/// Original headers plus provenance headers for the dead-letter copy of `msg`.
pub fn dead_letter_headers(msg: &OwnedMessage, poison: &Poison) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    if let Some(h) = msg.headers() {
        for i in 0..h.count() {
            let hdr = h.get(i);
            // Provenance of an earlier dead-lettering is replaced by this one's.
            if !hdr.key.starts_with("carhook-dlq-") {
                out = out.insert(Header {
                    key: hdr.key,
                    value: hdr.value,
                });
            }
        }
    }
    let partition = msg.partition().to_string();
    let offset = msg.offset().to_string();
    let attempts = poison.attempts.to_string();
    let first = poison.first_failure_at.as_i64().to_string();
    let message: String = poison.message.chars().take(1000).collect();
    for (key, value) in [
        (headers::DLQ_ORIGINAL_TOPIC, msg.topic()),
        (headers::DLQ_ORIGINAL_PARTITION, partition.as_str()),
        (headers::DLQ_ORIGINAL_OFFSET, offset.as_str()),
        (headers::DLQ_ERROR_CLASS, poison.class),
        (headers::DLQ_ERROR_MESSAGE, message.as_str()),
        (headers::DLQ_ATTEMPTS, attempts.as_str()),
        (headers::DLQ_FIRST_FAILURE_AT, first.as_str()),
    ] {
        out = out.insert(Header {
            key,
            value: Some(value),
        });
    }
    out
}

/// The value of header `name` as text, if present and UTF-8.
pub fn header_str<'a>(msg: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    let h = msg.headers()?;
    (0..h.count())
        .map(|i| h.get(i))
        .find(|hdr| hdr.key == name)
        .and_then(|hdr| hdr.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
