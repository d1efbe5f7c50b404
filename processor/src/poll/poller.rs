//! One poll request, start to finish: check the vehicle's budgets and errors, read its signals
//! under the global bucket (waiting out a 429 for its scope, backing off 5xx with jitter, never
//! retrying a 430), and produce what was read to the events topic as a polled `VEHICLE_STATE`
//! event keyed by vehicle. The processor applies it like a webhook: same claim, same freshness
//! rule, same dead letters; the record's `traceparent` continues this poll's trace.

use std::time::Duration;

use backon::BackoffBuilder;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::clock::EpochMillis;
use shared::config::PollerSettings;
use shared::event::Signal;
use shared::headers;
use shared::ids::{EventId, VehicleId};
use shared::poll_request::PollRequest;
use shared::smartcar_api::{
    normalise, poll_event, poll_event_id, ApiError, PollMeta, PolledSignals, RateScope, SmartcarApi,
};
use tracing::Instrument;

use super::budget::GlobalBudget;
use super::metrics::PollMetrics;
use super::store::{next_month_start, PollStore};
use crate::store::StoreError;

/// Most pages of one signals answer followed (`links.next`); Smartcar has been seen answering
/// every signal in one page, so more than this is a broken answer, not a big vehicle.
pub const MAX_PAGES: usize = 10;

/// What became of one request.
#[derive(Debug)]
pub enum Outcome {
    /// Read and produced to the events topic.
    Polled(Polled),
    /// Not polled (or a retry not sent), by a budget or the vehicle's state: (result label, why).
    Skipped(&'static str, String),
    /// Polled (the budget is spent) but nothing usable came of it: (result label, why).
    Failed(&'static str, String),
}

impl Outcome {
    /// The bounded result label of [`super::metrics::RESULTS`].
    pub fn label(&self) -> &'static str {
        match self {
            Self::Polled(_) => "polled",
            Self::Skipped(l, _) | Self::Failed(l, _) => l,
        }
    }
}

/// A successful poll.
#[derive(Debug)]
pub struct Polled {
    pub event_id: EventId,
    pub signals: Vec<Signal>,
    pub fetched_at: EpochMillis,
    /// Where the event record landed on the events topic.
    pub partition: i32,
    pub offset: i64,
}

/// Per-call switches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// An operator's one-shot poll ignores the per-vehicle minimum interval (never the
    /// bucket, the monthly cap, a block or an open reconnect error).
    pub ignore_min_interval: bool,
}

/// Everything a poll needs.
pub struct Poller {
    pub api: SmartcarApi,
    pub store: PollStore,
    pub budget: GlobalBudget,
    pub producer: FutureProducer,
    pub metrics: PollMetrics,
    pub settings: PollerSettings,
    pub events_topic: String,
    pub delivery_timeout: Duration,
}

impl Poller {
    /// Handles one request. `Err` is a store failure: nothing was produced, try again later (a
    /// request already sent to Smartcar has set the minimum interval).
    #[tracing::instrument(name = "poll vehicle", skip_all, fields(vehicle_id = %vehicle, reason = req.reason.as_str(), event_id))]
    pub async fn handle(
        &self,
        req: &PollRequest,
        vehicle: &VehicleId,
        opts: Options,
    ) -> Result<Outcome, StoreError> {
        let s = &self.settings;
        let now = EpochMillis::now();
        let budget = self.store.budget(vehicle, now).await?;
        if let Some(until) = budget.blocked_until.filter(|u| *u > now.as_i64()) {
            return Ok(Outcome::Skipped(
                "skipped_blocked",
                format!(
                    "blocked by {} until {}",
                    budget
                        .blocked_reason
                        .as_deref()
                        .unwrap_or("a previous answer"),
                    EpochMillis::new(until).map_or(until.to_string(), EpochMillis::to_rfc3339)
                ),
            ));
        }
        let min_interval =
            i64::try_from(s.min_interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        if let Some(last) = budget.last_polled_at {
            if !opts.ignore_min_interval && now.as_i64() < last.saturating_add(min_interval) {
                return Ok(Outcome::Skipped(
                    "skipped_min_interval",
                    format!(
                        "polled {} s ago, less than poller.min_interval_secs ({})",
                        (now.as_i64() - last) / 1000,
                        s.min_interval_secs
                    ),
                ));
            }
        }
        if budget.requests_this_month >= i64::from(s.monthly_cap) {
            return Ok(Outcome::Skipped(
                "skipped_monthly_cap",
                format!(
                    "{} requests this month, poller.monthly_cap is {}",
                    budget.requests_this_month, s.monthly_cap
                ),
            ));
        }
        let open = self.store.reconnect_errors(vehicle).await?;
        if !open.is_empty() {
            return Ok(Outcome::Skipped(
                "skipped_reconnect",
                format!(
                    "open errors need the user to reconnect: {}",
                    open.join(", ")
                ),
            ));
        }
        let user = match &req.user_id {
            Some(u) => Some(u.clone()),
            None => self.store.user_of(vehicle).await?,
        };
        let Some(user) = user else {
            return Ok(Outcome::Skipped(
                "skipped_no_user",
                "no user id known: no webhook with data.user.id was applied for this vehicle (processor poll now takes --user-id)".into(),
            ));
        };
        let (body, fetched_at, polled) = match self.fetch_pages(vehicle, &user).await? {
            Ok(x) => x,
            Err(outcome) => return Ok(outcome),
        };
        let event_id = poll_event_id(vehicle, &body);
        tracing::Span::current().record("event_id", event_id.as_str());
        let body = poll_event(
            &PollMeta {
                vehicle,
                user_id: Some(&user),
                reason: req.reason.as_str(),
                fetched_at,
            },
            &event_id,
            &polled,
        );
        match self.produce(vehicle, &event_id, req, &body).await {
            Ok((partition, offset)) => {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.metrics
                    .last_success
                    .set(i64::try_from(secs).unwrap_or(i64::MAX));
                tracing::info!(
                    signals = polled.signals.len(),
                    partition,
                    offset,
                    "polled signals produced to the events topic"
                );
                Ok(Outcome::Polled(Polled {
                    event_id,
                    signals: polled.signals,
                    fetched_at,
                    partition,
                    offset,
                }))
            }
            Err(e) => {
                tracing::error!(error = %e, "polled signals could not be produced to the events topic; the next request for this vehicle polls again");
                Ok(Outcome::Failed("failed", e))
            }
        }
    }

    /// Reads every page of the vehicle's signals (`links.next` is followed, up to [`MAX_PAGES`]):
    /// the answers' bytes joined (what the event id hashes), when the last arrived, and the
    /// signals of all pages. `Ok(Err(outcome))` when the poll ended without a usable answer.
    async fn fetch_pages(
        &self,
        vehicle: &VehicleId,
        user: &str,
    ) -> Result<Result<(Vec<u8>, EpochMillis, PolledSignals), Outcome>, StoreError> {
        let mut body = Vec::new();
        let mut all: Option<PolledSignals> = None;
        let mut next: Option<String> = None;
        for page in 1..=MAX_PAGES {
            let fetched = match self.fetch(vehicle, user, next.as_deref()).await? {
                Ok(f) => f,
                Err(outcome) => return Ok(Err(outcome)),
            };
            let polled = match normalise(vehicle, &fetched.body) {
                Ok(p) => p,
                Err(e) => {
                    let e = ApiError::BadResponse {
                        vehicle: vehicle.to_string(),
                        source: e,
                    };
                    self.metrics.request(e.class());
                    let excerpt =
                        String::from_utf8_lossy(&fetched.body[..fetched.body.len().min(200)])
                            .into_owned();
                    tracing::warn!(error = %e, page, request_id = fetched.request_id.as_deref().unwrap_or(""), body_excerpt = %excerpt, "unusable signals answer; nothing written");
                    return Ok(Err(Outcome::Failed("bad_response", e.to_string())));
                }
            };
            self.metrics.request("ok");
            // One page hashes exactly as it did before pagination was followed.
            if page > 1 {
                body.push(b'\n');
            }
            body.extend_from_slice(&fetched.body);
            next.clone_from(&polled.next_page);
            match &mut all {
                None => all = Some(polled),
                Some(a) => a.signals.extend(polled.signals),
            }
            if next.is_none() {
                let mut all = all.unwrap_or_else(|| PolledSignals {
                    signals: Vec::new(),
                    mode: None,
                    next_page: None,
                });
                all.next_page = None;
                return Ok(Ok((body, fetched.fetched_at, all)));
            }
        }
        let why = format!("the signals answer has more than {MAX_PAGES} pages; nothing written");
        tracing::warn!(vehicle_id = %vehicle, "{why}");
        Ok(Err(Outcome::Failed("bad_response", why)))
    }

    /// Reads one page of the signals: each request waits for the global bucket and counts against
    /// the vehicle's month; the monthly cap is checked again before every request (retries
    /// included), so retries never take the vehicle past it. Every request sent sets the
    /// vehicle's last poll time, whatever its answer, so a failing vehicle is not asked again
    /// before the minimum interval. A 429 waits `retry-after` for its scope, 5xx and transport
    /// failures back off exponentially with jitter, at most `poller.max_tries` requests in all. A
    /// 430 blocks the vehicle until next month and is never retried. `Err` is a store failure
    /// reading the month's count: that request is not sent (an earlier try may have been; its
    /// time is recorded, so the request repeated later meets the minimum interval).
    async fn fetch(
        &self,
        vehicle: &VehicleId,
        user: &str,
        next: Option<&str>,
    ) -> Result<Result<shared::smartcar_api::Fetched, Outcome>, StoreError> {
        let s = &self.settings;
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(s.backoff_base_ms))
            .with_max_delay(Duration::from_millis(s.backoff_max_ms))
            .with_jitter()
            .without_max_times()
            .build();
        let mut tries = 0u32;
        // Why `admit` refused to send a request: the cap was reached, or the count is unreadable.
        let refused: std::sync::Mutex<Option<Result<String, StoreError>>> =
            std::sync::Mutex::new(None);
        let refuse = |why: Result<String, StoreError>| {
            if let Ok(mut r) = refused.lock() {
                *r = Some(why);
            }
            false
        };
        loop {
            tries += 1;
            let admit = || async {
                // Before taking a token from the bucket: a refused request should not spend one.
                match self
                    .store
                    .requests_this_month(vehicle, EpochMillis::now())
                    .await
                {
                    Ok(n) if n >= i64::from(s.monthly_cap) => {
                        return refuse(Ok(format!(
                            "{n} requests this month, poller.monthly_cap is {}",
                            s.monthly_cap
                        )));
                    }
                    Ok(_) => {}
                    Err(e) => return refuse(Err(e)),
                }
                let left = self.budget.admit().await;
                self.metrics.budget_left.set(i64::from(left));
                let at = EpochMillis::now();
                let (polled, counted) = tokio::join!(
                    self.store.polled(vehicle, at),
                    self.store.count_request(vehicle, at)
                );
                if let Err(e) = polled {
                    tracing::warn!(error = %e, "could not record the request time for the minimum interval");
                }
                if let Err(e) = counted {
                    tracing::warn!(error = %e, "could not count the request against the monthly cap");
                }
                true
            };
            let err = match self.api.signals(vehicle, user, next, admit).await {
                Ok(Some(f)) => return Ok(Ok(f)),
                Ok(None) => {
                    let why = refused.lock().ok().and_then(|mut r| r.take());
                    return match why {
                        Some(Err(e)) => Err(e),
                        Some(Ok(why)) => {
                            tracing::warn!(tries, why = %why, "monthly cap reached: no further request");
                            Ok(Err(Outcome::Skipped("skipped_monthly_cap", why)))
                        }
                        None => Ok(Err(Outcome::Skipped(
                            "skipped_monthly_cap",
                            "request not admitted".into(),
                        ))),
                    };
                }
                Err(e) => e,
            };
            self.metrics.request(err.class());
            self.metrics
                .paused_seconds
                .set(i64::try_from(self.budget.paused_for().as_secs()).unwrap_or(i64::MAX));
            let last = tries >= s.max_tries;
            match &err {
                ApiError::RateLimited {
                    scope, retry_after, ..
                } => {
                    let wait = retry_after
                        .unwrap_or(Duration::from_secs(s.default_retry_after_secs))
                        .min(Duration::from_secs(s.max_retry_after_secs));
                    tracing::warn!(error = %err, wait_secs = wait.as_secs(), "rate limited: waiting for its scope");
                    match scope {
                        RateScope::Application => self.budget.pause(wait),
                        RateScope::Vehicle => {
                            let until = EpochMillis::now().as_i64().saturating_add(
                                i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
                            );
                            if let Err(e) = self.store.block(vehicle, until, "rate_limited").await {
                                tracing::warn!(error = %e, "could not record the vehicle's retry-after");
                            }
                        }
                    }
                    if last {
                        return Ok(Err(Outcome::Failed("failed", err.to_string())));
                    }
                    if *scope == RateScope::Vehicle {
                        let _waiting = self.metrics.retry_after_wait();
                        tokio::time::sleep(wait).await;
                    }
                }
                ApiError::Billing { .. } => {
                    let until = next_month_start(EpochMillis::now());
                    if let Err(e) = self.store.block(vehicle, until, "billing").await {
                        tracing::warn!(error = %e, "could not record the billing block");
                    }
                    tracing::error!(error = %err, "billing limit: this vehicle is not polled again this month");
                    return Ok(Err(Outcome::Failed("failed", err.to_string())));
                }
                e if e.is_transient() && !last => {
                    let wait = backoff
                        .next()
                        .unwrap_or(Duration::from_millis(s.backoff_max_ms));
                    tracing::warn!(error = %err, tries, wait_ms = wait.as_millis() as u64, "transient failure: backing off");
                    tokio::time::sleep(wait).await;
                }
                ApiError::BadResponse { .. } => {
                    tracing::warn!(error = %err, "unusable answer; nothing written");
                    return Ok(Err(Outcome::Failed("bad_response", err.to_string())));
                }
                ApiError::NotFound { .. } => {
                    tracing::warn!(error = %err, tries, "vehicle not found; nothing written");
                    return Ok(Err(Outcome::Failed("not_found", err.to_string())));
                }
                _ => {
                    tracing::warn!(error = %err, tries, "poll failed; nothing written");
                    return Ok(Err(Outcome::Failed("failed", err.to_string())));
                }
            }
        }
    }

    /// Produces the polled event: key = vehicle, headers like the receiver's plus the source.
    async fn produce(
        &self,
        vehicle: &VehicleId,
        event_id: &EventId,
        req: &PollRequest,
        body: &[u8],
    ) -> Result<(i32, i64), String> {
        let received = EpochMillis::now().as_i64().to_string();
        let mut h = OwnedHeaders::new()
            .insert(Header {
                key: headers::EVENT_ID,
                value: Some(event_id.as_str()),
            })
            .insert(Header {
                key: headers::EVENT_TYPE,
                value: Some("VEHICLE_STATE"),
            })
            .insert(Header {
                key: headers::RECEIVED_AT,
                value: Some(received.as_str()),
            })
            .insert(Header {
                key: headers::SOURCE,
                value: Some(shared::smartcar_api::POLL_SOURCE),
            })
            .insert(Header {
                key: headers::POLL_REASON,
                value: Some(req.reason.as_str()),
            });
        // The PRODUCER span the processor's consumer span continues (as the receiver's does).
        let span = tracing::info_span!(
            "send",
            otel.name = format!("send {}", self.events_topic),
            otel.kind = "producer",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            error.type = tracing::field::Empty,
            messaging.system = "kafka",
            messaging.operation.name = "send",
            messaging.operation.type = "send",
            messaging.destination.name = self.events_topic.as_str(),
            messaging.kafka.message.key = vehicle.as_str(),
        );
        for (k, v) in shared::telemetry::inject(&span) {
            h = h.insert(Header {
                key: k.as_str(),
                value: Some(v.as_str()),
            });
        }
        let record = FutureRecord::to(&self.events_topic)
            .key(vehicle.as_str())
            .payload(body)
            .headers(h);
        self.producer
            .send(record, self.delivery_timeout)
            .instrument(span.clone())
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| {
                shared::telemetry::record_error(&span, "produce", &e.to_string());
                format!("producing to {}: {e}", self.events_topic)
            })
    }
}
