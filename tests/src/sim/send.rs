//! Delivering events the way Smartcar does: one event per request, concurrently, retrying every
//! non-2xx answer (and every connection failure) after 25, 50 and 100 seconds — scaled down for tests
//! by `retry_scale` — and then giving up for good.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use secrecy::{ExposeSecret, SecretString};

use super::generate::{body, SimEvent, SimKind};
use super::target::Target;

/// Smartcar's retry schedule after the first attempt.
pub const RETRY_SCHEDULE_SECS: [f64; 3] = [25.0, 50.0, 100.0];

/// How one event's deliveries went.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    pub event_id: String,
    pub statuses: Vec<u16>,
    pub acknowledged: bool,
    /// The attempt (0 = first, 1–3 = retries) whose delivery was acknowledged: its `deliveredAt`
    /// is the one the event's claim stores.
    #[serde(default)]
    pub acked_attempt: Option<u32>,
    /// The key its records must carry on the events topic (None: VERIFY, never stored).
    #[serde(default)]
    pub key: Option<String>,
    /// SHA-256 (hex) of the bytes of every request, in the order of `statuses`.
    #[serde(default)]
    pub sent: Vec<String>,
    /// SHA-256 (hex) of the acknowledged request's bytes: they must be on the events topic.
    #[serde(default)]
    pub acked_sha256: Option<String>,
    /// VERIFY only: whether every 2xx answer carried the HMAC of the challenge.
    #[serde(default)]
    pub challenge_answered: Option<bool>,
}

/// SHA-256 (hex) of a request body: how `check` recognises the bytes it sent.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Totals of a send run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SendReport {
    pub events: usize,
    pub requests: usize,
    pub ok_2xx: usize,
    pub unauthorized_401: usize,
    pub unavailable_5xx: usize,
    pub other: usize,
    pub connection_errors: usize,
    pub duplicates_sent: usize,
    pub dropped_after_4_attempts: usize,
}

impl SendReport {
    /// Adds another report's counts to this one.
    pub fn absorb(&mut self, o: &SendReport) {
        self.events += o.events;
        self.requests += o.requests;
        self.ok_2xx += o.ok_2xx;
        self.unauthorized_401 += o.unauthorized_401;
        self.unavailable_5xx += o.unavailable_5xx;
        self.other += o.other;
        self.connection_errors += o.connection_errors;
        self.duplicates_sent += o.duplicates_sent;
        self.dropped_after_4_attempts += o.dropped_after_4_attempts;
    }
}

/// The `SC-Signature` a delivery of `e` carries (None: no header), as the fault asks.
fn signature(e: &SimEvent, key: &[u8], body: &[u8]) -> Option<String> {
    use super::generate::BadSignature;
    let mac = |b: &[u8]| super::hmac::sign_hex(key, b);
    match e.bad_signature_kind {
        // A wrong-token fault gets the wrong token as `key` (so does a run recorded without kinds).
        None | Some(BadSignature::WrongToken) => Some(mac(body)),
        Some(BadSignature::Missing) => None,
        Some(BadSignature::WrongLength) => Some(mac(body)[..40].to_string()),
        Some(BadSignature::UpperCase) => Some(mac(body).to_ascii_uppercase()),
        Some(BadSignature::OtherBody) => {
            let reserialised = serde_json::from_slice::<serde_json::Value>(body)
                .map(|v| serde_json::to_vec_pretty(&v).unwrap_or_default())
                .unwrap_or_default();
            Some(mac(&reserialised))
        }
    }
}

/// POSTs one delivery: the status (0 when no answer came) and the answer body.
async fn deliver(target: &Target, body: Vec<u8>, sig: Option<&str>) -> (u16, Bytes) {
    target.exchange(body, sig).await.unwrap_or_default()
}

/// Whether a VERIFY answer is `{"challenge": <hex HMAC-SHA256(token, challenge)>}`, computed
/// with the simulator's own HMAC.
fn answers_challenge(e: &SimEvent, token: &[u8], answer: &[u8]) -> bool {
    let want = super::hmac::sign_hex(token, super::generate::challenge(e).as_bytes());
    serde_json::from_slice::<serde_json::Value>(answer)
        .is_ok_and(|v| v["challenge"].as_str() == Some(want.as_str()))
}

/// [`send_to`] a plain-HTTP receiver at `addr` + `path`.
pub async fn send_all(
    addr: SocketAddr,
    path: &str,
    token: &str,
    events: &[SimEvent],
    concurrency: usize,
    retry_scale: f64,
    progress: Option<indicatif::ProgressBar>,
) -> (Vec<Delivery>, SendReport) {
    let target = Target::plain(addr, path);
    send_to(&target, token, events, concurrency, retry_scale, progress).await
}

/// Sends every event (and each duplicate) to `target`, returns per-event results and totals.
pub async fn send_to(
    target: &Target,
    token: &str,
    events: &[SimEvent],
    concurrency: usize,
    retry_scale: f64,
    progress: Option<indicatif::ProgressBar>,
) -> (Vec<Delivery>, SendReport) {
    let token = Arc::new(SecretString::from(token.to_string()));
    let wrong = Arc::new(SecretString::from(
        "not-this-applications-token".to_string(),
    ));
    let results: Vec<(Delivery, usize)> = stream::iter(events.iter().cloned())
        .map(|e| {
            let (token, wrong, progress) =
                (Arc::clone(&token), Arc::clone(&wrong), progress.clone());
            async move {
                // Only a wrong-token fault signs with another token; the other faults spoil the
                // header or the signed bytes of a signature made with the right one.
                let wrong_token = e.bad_signature
                    && matches!(
                        e.bad_signature_kind,
                        None | Some(super::generate::BadSignature::WrongToken)
                    );
                let key = if wrong_token { &wrong } else { &token };
                let verify = matches!(e.kind, SimKind::Verify { .. });
                let mut d = Delivery {
                    event_id: e.event_id.clone(),
                    key: e.key().map(str::to_string),
                    challenge_answered: verify.then_some(true),
                    ..Delivery::default()
                };
                let ok = |s: u16| (200..300).contains(&s);
                // Records one request's bytes and answer.
                let record = |d: &mut Delivery, bytes: &[u8], (status, answer): (u16, Bytes)| {
                    d.sent.push(digest(bytes));
                    d.statuses.push(status);
                    if verify
                        && ok(status)
                        && !answers_challenge(&e, token.expose_secret().as_bytes(), &answer)
                    {
                        d.challenge_answered = Some(false);
                    }
                    status
                };
                for attempt in 0..=RETRY_SCHEDULE_SECS.len() {
                    if attempt > 0 {
                        let wait = RETRY_SCHEDULE_SECS[attempt - 1] * retry_scale;
                        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                    }
                    let b = body(&e, attempt as u32);
                    let sig = signature(&e, key.expose_secret().as_bytes(), &b);
                    let status = if attempt == 0 && e.duplicate && e.concurrent_duplicate {
                        // The same delivery twice at once: both race for the claim.
                        let (a, a2) = tokio::join!(
                            deliver(target, b.clone(), sig.as_deref()),
                            deliver(target, b.clone(), sig.as_deref())
                        );
                        let second = record(&mut d, &b, a2);
                        let first = record(&mut d, &b, a);
                        if ok(first) {
                            first
                        } else {
                            second
                        }
                    } else {
                        let answer = deliver(target, b.clone(), sig.as_deref()).await;
                        record(&mut d, &b, answer)
                    };
                    if ok(status) {
                        d.acknowledged = true;
                        d.acked_attempt = Some(attempt as u32);
                        d.acked_sha256 = Some(digest(&b));
                        break;
                    }
                }
                let mut dups = usize::from(e.duplicate && e.concurrent_duplicate);
                if d.acknowledged && e.duplicate && !e.concurrent_duplicate {
                    // A second delivery of the same event: new deliveryId and deliveredAt.
                    let b = body(&e, 7);
                    let sig = signature(&e, key.expose_secret().as_bytes(), &b);
                    let answer = deliver(target, b.clone(), sig.as_deref()).await;
                    record(&mut d, &b, answer);
                    dups += 1;
                }
                if let Some(p) = progress {
                    p.inc(1);
                }
                (d, dups)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut report = SendReport {
        events: events.len(),
        ..SendReport::default()
    };
    let mut out = Vec::with_capacity(results.len());
    for (d, dups) in results {
        report.duplicates_sent += dups;
        for s in &d.statuses {
            report.requests += 1;
            match s {
                200..=299 => report.ok_2xx += 1,
                401 => report.unauthorized_401 += 1,
                500..=599 => report.unavailable_5xx += 1,
                0 => report.connection_errors += 1,
                _ => report.other += 1,
            }
        }
        out.push(d);
    }
    let bad: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.bad_signature)
        .map(|e| e.event_id.as_str())
        .collect();
    report.dropped_after_4_attempts = out
        .iter()
        .filter(|d| !d.acknowledged && !bad.contains(d.event_id.as_str()))
        .count();
    (out, report)
}
