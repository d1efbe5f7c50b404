//! The webhook request path: route, bound the body, verify, answer VERIFY or persist.
//!
//! Order matters: the body is read under a byte limit, a time limit and a bound on concurrent body
//! reads; the signature is checked on the exact bytes before any parsing decides anything, and only a
//! [`Verified`] body can be handed to the producer. The in-flight permit is taken only then, so slow
//! senders cannot exhaust it. A VERIFY is answered only when signed, or — when unsigned — when its
//! challenge looks like Smartcar's and the rate limit allows (the signing-oracle guard, SMARTCAR.md §3);
//! an unsigned body larger than any VERIFY is refused without being parsed at all.
//!
//! One deadline covers the request: the header allowance plus what is left after it
//! ([`ReceiverSettings::after_headers`]) for body, verification and produce.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use shared::config::ReceiverSettings;
use shared::envelope::Routing;
use shared::signature::{ManagementTokens, SignatureError, Verified, SIGNATURE_HEADER};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::outcome::{Delivery, Outcome};
use crate::producer::{EventProducer, PersistError};
use crate::rate::RateLimit;

/// Longest challenge an unsigned VERIFY may carry.
const MAX_CHALLENGE_LEN: usize = 128;

/// Largest unsigned body worth parsing: a VERIFY (the only thing answered unsigned) is a few hundred
/// bytes; anything larger gets its 401 without a routing parse.
pub const MAX_UNSIGNED_BYTES: usize = 4 * 1024;

/// Everything a request needs, shared by all connections.
pub struct App {
    pub settings: ReceiverSettings,
    pub tokens: ManagementTokens,
    pub producer: Arc<EventProducer>,
    pub metrics: Metrics,
    /// Verified requests being persisted.
    pub inflight: Arc<Semaphore>,
    /// Bodies being read: bounds slow senders apart from `inflight`.
    pub body_reads: Arc<Semaphore>,
    pub verify_rate: RateLimit,
    /// Which successful deliveries get their log line.
    pub event_lines: shared::telemetry::EventLines,
    /// Vehicles answered 503, for a poll after recovery.
    pub outages: crate::outage::Outages,
}

/// Holds a permit and counts it in a gauge for as long as it lives.
struct Held<'a> {
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<'a> Held<'a> {
    /// Takes a permit from `sem` now, or `None` when all are taken.
    fn try_take(
        sem: &Arc<Semaphore>,
        gauge: &'a prometheus_client::metrics::gauge::Gauge,
    ) -> Option<Self> {
        let permit = Arc::clone(sem).try_acquire_owned().ok()?;
        gauge.inc();
        Some(Self {
            gauge,
            _permit: permit,
        })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Whether an unsigned challenge looks like Smartcar's: short, `[A-Za-z0-9-]`, so never JSON and
/// never a payload an attacker would want signed.
pub fn plausible_challenge(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= MAX_CHALLENGE_LEN
        && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// More than the limit arrived.
    TooLarge,
    /// The connection failed while the body was arriving.
    Broken,
}

/// Reads a body of at most `limit` bytes into one contiguous buffer. A body that arrives as one
/// frame is kept as it is (no copy); otherwise one buffer is allocated once, sized from
/// `Content-Length` (`declared`, capped at `limit`), and each frame is copied into it as it arrives
/// and released, so hyper can reuse its read buffer. The result is the record payload as it is.
pub async fn read_body<B>(
    mut body: B,
    declared: Option<u64>,
    limit: usize,
) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Broken)?.into_data() else {
            continue; // trailers
        };
        let have = first.as_ref().map_or(buf.len(), Bytes::len);
        if data.len() > limit - have {
            return Err(BodyError::TooLarge);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            None => buf.extend_from_slice(&data),
            Some(head) => {
                let expected = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit));
                buf.reserve(expected.min(limit).max(head.len() + data.len()));
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}

/// A body that passed the size and time limits, with the signature header as sent.
struct Received {
    body: Bytes,
    signature: Option<Bytes>,
}

impl App {
    /// Handles one HTTP request on the webhook listener (its headers are in).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        // `http.route` only when the request matched the webhook route (semantic conventions).
        let route = (req.uri().path() == self.settings.path).then_some(self.settings.path.as_str());
        let span = tracing::info_span!(
            "request",
            otel.name = format!("{} {}", req.method(), self.settings.path),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            error.type = tracing::field::Empty,
            http.request.method = %req.method(),
            http.route = route,
            url.path = req.uri().path(),
            http.response.status_code = tracing::field::Empty,
            event_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        span.record("trace_id", shared::telemetry::trace_id(&span));
        let resp = self.route(req).instrument(span.clone()).await;
        span.record("http.response.status_code", resp.status().as_u16());
        resp
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let mut delivery = Delivery::start();
        let deadline = delivery.started + self.settings.after_headers();
        let retry_after = self.settings.retry_after_secs;
        let outcome = if req.uri().path() != self.settings.path {
            Outcome::NotFound
        } else if req.method() != Method::POST {
            Outcome::MethodNotAllowed
        } else {
            self.webhook(req, &mut delivery, deadline).await
        };
        tracing::Span::current().record(
            "event_id",
            delivery.routing.event_id.as_deref().unwrap_or(""),
        );
        delivery.finish(outcome, &self.metrics, retry_after, &self.event_lines)
    }

    async fn webhook(
        &self,
        req: Request<Incoming>,
        delivery: &mut Delivery,
        deadline: Instant,
    ) -> Outcome {
        let received = match self.receive(req, deadline).await {
            Ok(r) => r,
            Err(outcome) => return outcome,
        };
        let body = received.body;
        delivery.body_len = body.len();
        match received.signature {
            Some(sig) => match self.tokens.verify(Some(&sig), body.clone()) {
                Ok(verified) => {
                    delivery.routing = Routing::sniff(verified.body());
                    self.verified(verified, delivery, deadline).await
                }
                Err(e) => self.reject(&body, delivery, e),
            },
            None if body.len() > MAX_UNSIGNED_BYTES => {
                // Too large to be a VERIFY: no parse, kept raw (rate-limited) for diagnosis.
                self.producer
                    .quarantine(&body, &delivery.routing, &SignatureError::Missing);
                Outcome::Unauthorized(SignatureError::Missing)
            }
            None => {
                delivery.routing = Routing::sniff(&body);
                if delivery.routing.is_verify() {
                    self.unsigned_verify(&delivery.routing)
                } else {
                    self.reject(&body, delivery, SignatureError::Missing)
                }
            }
        }
    }

    /// Reads the body under the byte limit, the body timeout and the request deadline, holding a
    /// body-read permit only while reading.
    async fn receive(
        &self,
        req: Request<Incoming>,
        deadline: Instant,
    ) -> Result<Received, Outcome> {
        let limit = self.settings.max_body_bytes;
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(Outcome::TooLarge { limit });
        }
        let signature = req
            .headers()
            .get(SIGNATURE_HEADER)
            .map(|v| Bytes::copy_from_slice(v.as_bytes()));
        if signature.is_none() && declared.is_some_and(|n| n > MAX_UNSIGNED_BYTES as u64) {
            // Not worth reading: nothing this large is answered without a signature.
            return Err(Outcome::Unauthorized(SignatureError::Missing));
        }
        let Some(_reading) = Held::try_take(&self.body_reads, &self.metrics.body_reads) else {
            return Err(Outcome::Overloaded);
        };
        let until =
            deadline.min(Instant::now() + Duration::from_millis(self.settings.body_timeout_ms));
        let read = read_body(req.into_body(), declared, limit);
        match tokio::time::timeout_at(until.into(), read).await {
            Err(_) => Err(Outcome::Timeout),
            Ok(Err(BodyError::TooLarge)) => Err(Outcome::TooLarge { limit }),
            Ok(Err(BodyError::Broken)) => {
                Err(Outcome::BadRequest("request body could not be read"))
            }
            Ok(Ok(body)) => Ok(Received { body, signature }),
        }
    }

    fn reject(&self, body: &Bytes, delivery: &mut Delivery, e: SignatureError) -> Outcome {
        if delivery.routing == Routing::default() {
            delivery.routing = Routing::sniff(body);
        }
        self.producer.quarantine(body, &delivery.routing, &e);
        Outcome::Unauthorized(e)
    }

    async fn verified(
        &self,
        verified: Verified,
        delivery: &Delivery,
        deadline: Instant,
    ) -> Outcome {
        let routing = &delivery.routing;
        if routing.is_verify() {
            self.metrics
                .verify_challenges
                .get_or_create(&vec![("result", "signed")])
                .inc();
            return match &routing.challenge {
                Some(c) => Outcome::Challenge {
                    answer: self.tokens.answer_challenge(c),
                    signed: true,
                },
                None => Outcome::BadRequest("VERIFY without data.challenge"),
            };
        }
        let Some(_inflight) = Held::try_take(&self.inflight, &self.metrics.inflight) else {
            self.refused(routing);
            return Outcome::Overloaded;
        };
        let token_index = verified.token_index();
        let persisted = self.producer.persist(verified, routing, deadline).await;
        match &persisted {
            Ok(_) => {
                if let Some(r) = self.outages.accepted(Instant::now()) {
                    self.request_polls(r);
                }
            }
            Err(_) => self.refused(routing),
        }
        match persisted {
            Ok(acked) => Outcome::Accepted {
                partition: acked.partition,
                offset: acked.offset,
                token_index,
            },
            Err(PersistError::CircuitOpen) => Outcome::Unavailable {
                cause: "circuit open".into(),
                breaker_open: true,
            },
            Err(e @ PersistError::Deadline { .. }) => Outcome::DeadlineExceeded(e.to_string()),
            Err(e) => Outcome::Unavailable {
                cause: e.to_string(),
                breaker_open: false,
            },
        }
    }

    /// Remembers the vehicle of a request answered 503.
    fn refused(&self, routing: &Routing) {
        if let Some(v) = routing.vehicle_id.as_deref() {
            if self.outages.refused(v, Instant::now()) {
                self.metrics
                    .outage_polls
                    .get_or_create(&vec![("result", "forgotten")])
                    .inc();
            }
        }
    }

    /// After recovery: one poll request per vehicle refused for longer than Smartcar retries,
    /// produced in the background (the request that noticed recovery is not held up).
    fn request_polls(&self, r: crate::outage::Recovered) {
        tracing::info!(
            to_poll = r.to_poll.len(),
            covered_by_retries = r.covered,
            "events are accepted again after 503s"
        );
        if r.to_poll.is_empty() {
            return;
        }
        let producer = Arc::clone(&self.producer);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            for v in r.to_poll {
                let result = match producer.request_poll(&v).await {
                    Ok(()) => "requested",
                    Err(e) => {
                        tracing::error!(vehicle_id = %v, error = %e, "poll request after an outage not produced: run `processor poll now` for it");
                        "failed"
                    }
                };
                metrics
                    .outage_polls
                    .get_or_create(&vec![("result", result)])
                    .inc();
            }
        });
    }

    fn unsigned_verify(&self, routing: &Routing) -> Outcome {
        let Some(challenge) = routing.challenge.as_deref() else {
            return Outcome::VerifyRefused("no challenge");
        };
        if !plausible_challenge(challenge) {
            self.metrics
                .verify_challenges
                .get_or_create(&vec![("result", "refused_shape")])
                .inc();
            return Outcome::VerifyRefused("challenge is not a short [A-Za-z0-9-] token");
        }
        if !self.verify_rate.try_take() {
            self.metrics
                .verify_challenges
                .get_or_create(&vec![("result", "refused_rate")])
                .inc();
            return Outcome::VerifyRefused("rate limit");
        }
        self.metrics
            .verify_challenges
            .get_or_create(&vec![("result", "unsigned")])
            .inc();
        Outcome::Challenge {
            answer: self.tokens.answer_challenge(challenge),
            signed: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Frames = http_body_util::StreamBody<
        futures::stream::Iter<
            std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, std::io::Error>>,
        >,
    >;

    fn frames(parts: &[&'static [u8]]) -> Frames {
        let v: Vec<_> = parts
            .iter()
            .map(|p| Ok(hyper::body::Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(v))
    }

    fn read(
        parts: &[&'static [u8]],
        declared: Option<u64>,
        limit: usize,
    ) -> Result<Bytes, BodyError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(read_body(frames(parts), declared, limit))
    }

    #[test]
    fn body_is_read_whole_into_one_buffer_sized_from_content_length() {
        let one = read(&[b"{\"a\":1}"], Some(7), 64);
        assert_eq!(one.as_deref(), Ok(&b"{\"a\":1}"[..]));
        let many = read(&[b"{\"a\"", b":", b"", b"12}"], Some(8), 64);
        assert_eq!(many.as_deref(), Ok(&b"{\"a\":12}"[..]));
        // Sized once from Content-Length: the record payload has no spare capacity to copy around.
        let parts: &[&'static [u8]] = &[&[b'x'; 1000], &[b'y'; 1000], &[b'z'; 500]];
        let body = read(parts, Some(2500), 4096).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(body.len(), 2500);
        assert_eq!(&body[995..1005], b"xxxxxyyyyy");
        // A declared length above the limit never sizes the buffer beyond it.
        assert_eq!(read(parts, Some(u64::MAX), 4096).map(|b| b.len()), Ok(2500));
        assert_eq!(read(&[], None, 64).map(|b| b.len()), Ok(0));
    }

    #[test]
    fn body_over_the_limit_is_refused() {
        assert_eq!(read(&[b"12345678"], None, 8).map(|b| b.len()), Ok(8));
        assert_eq!(read(&[b"123456789"], None, 8), Err(BodyError::TooLarge));
        assert_eq!(
            read(&[b"12345", b"6789"], Some(9), 8),
            Err(BodyError::TooLarge)
        );
        assert_eq!(
            read(&[b"12345", b"67", b"89"], None, 8),
            Err(BodyError::TooLarge)
        );
    }

    #[test]
    fn challenge_guard() {
        assert!(plausible_challenge("3a5c8f72-e6d9-4b1a-9f2e-8c7d6a5b4e3f"));
        assert!(!plausible_challenge(r#"{"eventId":"x"}"#));
        assert!(!plausible_challenge(""));
        assert!(!plausible_challenge(&"a".repeat(129)));
        assert!(!plausible_challenge("abc def"));
    }
}
