//! Time as Smartcar sends it, and the freshness clock that orders vehicle state.
//!
//! `oemUpdatedAt` (epoch ms) is when the car recorded a value; it is the only clock that may order
//! two values of one signal. `deliveredAt` arrives as epoch ms, epoch seconds or an ISO-8601 string.

use serde_json::Value;
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

/// Milliseconds since the Unix epoch. Always > 0: zero means "unknown" on the wire and is never built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EpochMillis(i64);

/// Epoch-ms values below this are read as epoch seconds (10^11 ms is March 1973; 10^11 s is year 5138).
const SECONDS_CUTOFF: i64 = 100_000_000_000;
/// Latest accepted instant (year 2200): a timestamp beyond it is a broken clock, not freshness.
const MAX_MILLIS: i64 = 7_258_118_400_000;

impl EpochMillis {
    /// A positive, plausible epoch-ms value, or `None` for 0, negatives and the far future.
    pub fn new(ms: i64) -> Option<Self> {
        (ms > 0 && ms <= MAX_MILLIS).then_some(Self(ms))
    }

    /// The current wall-clock time.
    pub fn now() -> Self {
        let ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        Self(i64::try_from(ms).unwrap_or(MAX_MILLIS).clamp(1, MAX_MILLIS))
    }

    /// The raw value.
    pub fn as_i64(self) -> i64 {
        self.0
    }

    /// Reads a JSON timestamp: epoch ms (integer or float), epoch seconds, or an RFC 3339 string.
    /// Anything else, zero included, is `None`.
    pub fn from_json(v: &Value) -> Option<Self> {
        match v {
            Value::Number(n) => {
                let raw = n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?;
                if raw > 0 && raw < SECONDS_CUTOFF {
                    Self::new(raw.checked_mul(1000)?)
                } else {
                    Self::new(raw)
                }
            }
            Value::String(s) => Self::parse_str(s),
            _ => None,
        }
    }

    /// Parses a string timestamp: RFC 3339, or digits read as in [`EpochMillis::from_json`].
    pub fn parse_str(s: &str) -> Option<Self> {
        if let Ok(n) = s.parse::<i64>() {
            return Self::from_json(&Value::from(n));
        }
        let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        Self::new(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()?)
    }

    /// RFC 3339 rendering for humans and JSON output.
    pub fn to_rfc3339(self) -> String {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| self.0.to_string())
    }
}

/// Where a freshness time came from, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum FreshnessSource {
    /// `meta.oemUpdatedAt`: the car's own clock.
    OemUpdatedAt,
    /// `meta.fetchedAt` / `meta.retrievedAt`: when Smartcar fetched it.
    FetchedAt,
    /// `meta.deliveredAt`: when Smartcar delivered the event.
    DeliveredAt,
    /// The time the receiver accepted the record.
    ReceivedAt,
    /// A legacy v2 reading's `sc-data-age` header: when the car produced it.
    ScDataAge,
}

/// The time that orders one signal value against another, with where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// The instant.
    pub at: EpochMillis,
    /// Which clock supplied it.
    pub source: FreshnessSource,
}

impl Freshness {
    /// The first known of oemUpdatedAt, fetch time, delivery time, receive time.
    pub fn pick(
        oem: Option<EpochMillis>,
        fetched: Option<EpochMillis>,
        delivered: Option<EpochMillis>,
        received: EpochMillis,
    ) -> Self {
        let (at, source) = match (oem, fetched, delivered) {
            (Some(t), _, _) => (t, FreshnessSource::OemUpdatedAt),
            (None, Some(t), _) => (t, FreshnessSource::FetchedAt),
            (None, None, Some(t)) => (t, FreshnessSource::DeliveredAt),
            (None, None, None) => (received, FreshnessSource::ReceivedAt),
        };
        Self { at, source }
    }

    /// The CQL write timestamp (microseconds) for this freshness under a logic version.
    ///
    /// Order is (time, logic version): the version fills the sub-millisecond digits, so a replay under
    /// newer logic wins over a value with the same `oemUpdatedAt`, yet never over a newer one.
    pub fn write_timestamp(self, logic_version: u16) -> i64 {
        self.at.as_i64() * 1000 + i64::from(logic_version.min(999))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn delivered_at_forms() {
        let ms = EpochMillis::from_json(&json!(1761896351529_i64)).map(EpochMillis::as_i64);
        assert_eq!(ms, Some(1761896351529));
        let s = EpochMillis::from_json(&json!(1761896351_i64)).map(EpochMillis::as_i64);
        assert_eq!(s, Some(1761896351000));
        let iso =
            EpochMillis::from_json(&json!("2025-10-31T07:39:11.529Z")).map(EpochMillis::as_i64);
        assert_eq!(iso, Some(1761896351529));
        assert_eq!(EpochMillis::from_json(&json!(0)), None);
        assert_eq!(EpochMillis::from_json(&json!(-5)), None);
        assert_eq!(EpochMillis::from_json(&json!("soon")), None);
        assert_eq!(EpochMillis::from_json(&json!(i64::MAX)), None);
    }

    #[test]
    fn freshness_falls_back_in_order() {
        let t = |v| EpochMillis::new(v);
        let recv = EpochMillis::new(9).unwrap_or_else(EpochMillis::now);
        assert_eq!(
            Freshness::pick(t(1), t(2), t(3), recv).source,
            FreshnessSource::OemUpdatedAt
        );
        assert_eq!(
            Freshness::pick(None, t(2), t(3), recv).source,
            FreshnessSource::FetchedAt
        );
        assert_eq!(
            Freshness::pick(None, None, t(3), recv).source,
            FreshnessSource::DeliveredAt
        );
        assert_eq!(Freshness::pick(None, None, None, recv).at, recv);
    }

    #[test]
    fn newer_logic_wins_only_at_equal_time() {
        let f = |ms| Freshness {
            at: EpochMillis::new(ms).unwrap_or_else(EpochMillis::now),
            source: FreshnessSource::OemUpdatedAt,
        };
        assert!(f(1000).write_timestamp(2) > f(1000).write_timestamp(1));
        assert!(f(1001).write_timestamp(1) > f(1000).write_timestamp(999));
    }
}
