//! The Smartcar V3 REST client the poller reads signals with.
//!
//! Authentication is the V3 application token (OAuth2 client credentials, `client_secret_post`):
//! one token per process, minted single-flight (callers wait on one mint instead of racing),
//! minted again `token_refresh_margin_secs` before it expires, and re-minted once when the vehicle
//! API answers 401 to it (a second 401 with a fresh token is a credential problem, not a stale
//! token). Vehicle reads are `GET {vehicle_api_url}/vehicles/{id}/signals` with `sc-user-id`.
//!
//! Every failure is an [`ApiError`] naming the vehicle, the status and Smartcar's error type and
//! code, and saying what the poller must do with it ([`ApiError::class`] for metrics). The token
//! and the secret are never logged or shown in errors.

mod signals;

pub use signals::{
    normalise, poll_event, poll_event_id, PollMeta, PolledSignals, ResponseError,
    POLL_EVENT_ID_PREFIX, POLL_SOURCE,
};

use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::Instrument;

use crate::clock::EpochMillis;
use crate::config::{ConfigError, SmartcarSettings};
use crate::ids::VehicleId;

/// Who a 429 applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateScope {
    /// `RATE_LIMIT:VEHICLE`: only this vehicle waits.
    Vehicle,
    /// `RATE_LIMIT:SMARTCAR_API` (or a 429 that does not say): the whole application waits.
    Application,
}

impl RateScope {
    /// `vehicle` or `application`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vehicle => "vehicle",
            Self::Application => "application",
        }
    }
}

/// Smartcar's error type and code from an error body, V3 `errors[0]` or the v2 flat shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    pub error_type: Option<String>,
    pub code: Option<String>,
    pub detail: Option<String>,
    /// `errors[].meta.debug.requestId` or the flat `requestId`.
    pub request_id: Option<String>,
}

impl ErrorBody {
    /// Reads whichever shape the body has; anything unreadable gives an empty value.
    pub fn parse(body: &[u8]) -> Self {
        let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else {
            return Self::default();
        };
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        match root
            .get("errors")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            Some(e) => Self {
                error_type: s(e.get("type")),
                code: s(e.get("code")),
                detail: s(e.get("detail")).or_else(|| s(e.get("title"))),
                request_id: s(e.pointer("/meta/debug/requestId")),
            },
            None => Self {
                error_type: s(root.get("type")).or_else(|| s(root.get("error"))),
                code: s(root.get("code")),
                detail: s(root.get("description")).or_else(|| s(root.get("error_description"))),
                request_id: s(root.get("requestId")),
            },
        }
    }

    fn label(&self) -> String {
        match (&self.error_type, &self.code) {
            (Some(t), Some(c)) => format!("{t}:{c}"),
            (Some(t), None) => t.clone(),
            (None, Some(c)) => c.clone(),
            (None, None) => "no error body".into(),
        }
    }
}

/// Why a request to Smartcar failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("minting the application token at {url}: HTTP {status} {error} (check smartcar.client_id and smartcar.client_secret_file)")]
    TokenRefused {
        url: String,
        status: u16,
        error: String,
    },
    #[error("minting the application token at {url}: {problem}")]
    TokenUnusable { url: String, problem: String },
    #[error("minting the application token at {url}: {source}")]
    TokenTransport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("vehicle {vehicle}: HTTP 401 again with a freshly minted token ({error}): the credentials are refused")]
    Unauthorized { vehicle: String, error: String },
    #[error("vehicle {vehicle}: HTTP 429 {error}, {} scope, retry after {retry_after:?}", scope.as_str())]
    RateLimited {
        vehicle: String,
        scope: RateScope,
        retry_after: Option<Duration>,
        error: String,
    },
    #[error("vehicle {vehicle}: HTTP 430 {error}: the billing limit is reached; never retried")]
    Billing { vehicle: String, error: String },
    #[error("vehicle {vehicle}: HTTP 404 {error}: not connected to this application (or a wrong vehicle API URL)")]
    NotFound { vehicle: String, error: String },
    #[error("vehicle {vehicle}: HTTP {status} {error}: Smartcar or the OEM failed; retried with back-off")]
    Server {
        vehicle: String,
        status: u16,
        error: String,
    },
    #[error("vehicle {vehicle}: HTTP {status} {error}: refused; not retried")]
    Refused {
        vehicle: String,
        status: u16,
        error: String,
    },
    #[error("vehicle {vehicle}: request to {url}: {source}")]
    Transport {
        vehicle: String,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("vehicle {vehicle}: unusable 200 answer: {source}")]
    BadResponse {
        vehicle: String,
        #[source]
        source: ResponseError,
    },
}

impl ApiError {
    /// Every value [`ApiError::class`] can take.
    pub const CLASSES: [&'static str; 10] = [
        "token_failed",
        "unauthorized",
        "rate_limited",
        "billing",
        "not_found",
        "server_error",
        "refused",
        "transport",
        "bad_response",
        "not_json",
    ];

    /// Bounded label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::TokenRefused { .. }
            | Self::TokenUnusable { .. }
            | Self::TokenTransport { .. } => "token_failed",
            Self::Unauthorized { .. } => "unauthorized",
            Self::RateLimited { .. } => "rate_limited",
            Self::Billing { .. } => "billing",
            Self::NotFound { .. } => "not_found",
            Self::Server { .. } => "server_error",
            Self::Refused { .. } => "refused",
            Self::Transport { .. } => "transport",
            Self::BadResponse {
                source: ResponseError::NotJson(_),
                ..
            } => "not_json",
            Self::BadResponse { .. } => "bad_response",
        }
    }

    /// Whether trying the same request again later can succeed by itself (5xx, timeouts, a
    /// token endpoint that did not answer).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Server { .. } | Self::Transport { .. } | Self::TokenTransport { .. }
        ) || matches!(self, Self::TokenRefused { status, .. } if *status >= 500)
    }
}

/// Client settings, read from `smartcar.*`.
#[derive(Clone)]
pub struct ApiConfig {
    pub client_id: String,
    pub client_secret: SecretString,
    pub token_url: String,
    /// Without a trailing `/`.
    pub vehicle_api_url: String,
    pub timeout: Duration,
    pub refresh_margin: Duration,
}

impl ApiConfig {
    /// The poller's settings; a missing client id or secret names its key.
    pub fn from_settings(s: &SmartcarSettings) -> Result<Self, ConfigError> {
        let (client_id, client_secret) = s.client_credentials()?;
        Ok(Self {
            client_id,
            client_secret,
            token_url: s.token_url.clone(),
            vehicle_api_url: s.vehicle_api_url.trim_end_matches('/').to_string(),
            timeout: Duration::from_millis(s.api_timeout_ms),
            refresh_margin: Duration::from_secs(s.token_refresh_margin_secs),
        })
    }
}

/// A signals answer as received (status 200).
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The body bytes exactly as received (the poll event id hashes them).
    pub body: Bytes,
    /// When the answer arrived.
    pub fetched_at: EpochMillis,
    /// `sc-request-id`, when Smartcar sent one.
    pub request_id: Option<String>,
}

struct Token {
    secret: SecretString,
    /// Mint again from this instant on.
    refresh_at: Instant,
    /// Counts mints, so a 401 invalidates only the token it was answered for.
    generation: u64,
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

/// The process-wide client: one HTTP connection pool, one application token.
pub struct SmartcarApi {
    http: reqwest::Client,
    cfg: ApiConfig,
    token: Mutex<Option<Token>>,
    generation: std::sync::atomic::AtomicU64,
    minted: Counter,
    /// The vehicle API's host (`server.address` of request spans).
    host: String,
}

impl SmartcarApi {
    /// A client; `minted` counts the tokens minted (a metric of the caller's registry).
    pub fn new(cfg: ApiConfig, minted: Counter) -> Result<Self, ApiError> {
        crate::telemetry::install_crypto_provider();
        let http = reqwest::Client::builder()
            .tls_backend_rustls()
            .timeout(cfg.timeout)
            .connect_timeout(Duration::from_secs(10).min(cfg.timeout))
            .user_agent(concat!("carhook/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ApiError::TokenTransport {
                url: cfg.token_url.clone(),
                source,
            })?;
        let host = reqwest::Url::parse(&cfg.vehicle_api_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        Ok(Self {
            http,
            cfg,
            host,
            token: Mutex::new(None),
            generation: std::sync::atomic::AtomicU64::new(0),
            minted,
        })
    }

    /// Tokens minted since start.
    pub fn tokens_minted(&self) -> u64 {
        self.minted.get()
    }

    /// The current token and its generation, minting one if there is none or it is due. The lock
    /// is held across the mint: concurrent callers wait for that one mint (single-flight).
    async fn token(&self) -> Result<(SecretString, u64), ApiError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok((t.secret.clone(), t.generation));
            }
        }
        let minted = self.mint().await?;
        let out = (minted.secret.clone(), minted.generation);
        *slot = Some(minted);
        Ok(out)
    }

    /// Forgets the token of `generation` (answered 401), unless another caller already replaced it.
    async fn invalidate(&self, generation: u64) {
        let mut slot = self.token.lock().await;
        if slot.as_ref().is_some_and(|t| t.generation == generation) {
            *slot = None;
        }
    }

    async fn mint(&self) -> Result<Token, ApiError> {
        let url = &self.cfg.token_url;
        let answer = self
            .http
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.cfg.client_id.as_str()),
                ("client_secret", self.cfg.client_secret.expose_secret()),
            ])
            .send()
            .await
            .map_err(|source| ApiError::TokenTransport {
                url: url.clone(),
                source: source.without_url(),
            })?;
        let status = answer.status().as_u16();
        let body = answer
            .bytes()
            .await
            .map_err(|source| ApiError::TokenTransport {
                url: url.clone(),
                source: source.without_url(),
            })?;
        if status != 200 {
            return Err(ApiError::TokenRefused {
                url: url.clone(),
                status,
                error: ErrorBody::parse(&body).label(),
            });
        }
        let t: TokenAnswer =
            serde_json::from_slice(&body).map_err(|e| ApiError::TokenUnusable {
                url: url.clone(),
                problem: format!("the answer is not {{access_token, expires_in}}: {e}"),
            })?;
        if t.access_token.is_empty() {
            return Err(ApiError::TokenUnusable {
                url: url.clone(),
                problem: "`access_token` is empty".into(),
            });
        }
        // Smartcar documents one hour; a token that lives shorter than twice the margin is
        // refreshed at half its life instead.
        let life = Duration::from_secs(t.expires_in.unwrap_or(3_600));
        let margin = self.cfg.refresh_margin.min(life / 2);
        self.minted.inc();
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::info!(
            token_url = %url,
            expires_in_secs = life.as_secs(),
            generation,
            "application token minted"
        );
        Ok(Token {
            secret: SecretString::from(t.access_token),
            refresh_at: Instant::now() + (life - margin),
            generation,
        })
    }

    /// `GET /vehicles/{id}/signals` for `user`, or the page `next` (an answer's `links.next`) of
    /// it. A 401 invalidates the token and retries once with a fresh one; every other non-200 is
    /// an [`ApiError`] saying what to do. `admit` is awaited before every request to the vehicle
    /// API (the retry after a 401 too), so a caller's budget counts each one; when it answers
    /// `false` nothing is sent and the result is `Ok(None)`.
    ///
    /// A `next` link is resolved against the signals URL and followed only when it stays under
    /// `vehicle_api_url`: the bearer token is never sent to another host.
    pub async fn signals<F, Fut>(
        &self,
        vehicle: &VehicleId,
        user: &str,
        next: Option<&str>,
        mut admit: F,
    ) -> Result<Option<Fetched>, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let first = format!("{}/vehicles/{}/signals", self.cfg.vehicle_api_url, vehicle);
        let url = match next {
            None => first,
            Some(link) => self.page_url(vehicle, &first, link)?,
        };
        let mut reminted = false;
        loop {
            let (token, generation) = self.token().await?;
            if !admit().await {
                return Ok(None);
            }
            // One CLIENT span per request (HTTP semantic conventions), so a polled value's trace
            // shows the round trip to Smartcar, its status and its duration.
            let span = tracing::info_span!(
                "smartcar request",
                otel.name = "GET /vehicles/{id}/signals",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                otel.status_description = tracing::field::Empty,
                error.type = tracing::field::Empty,
                http.request.method = "GET",
                url.template = "/vehicles/{id}/signals",
                server.address = self.host.as_str(),
                http.response.status_code = tracing::field::Empty,
                http.request.resend_count = u8::from(reminted),
            );
            let answer = self
                .http
                .get(&url)
                .bearer_auth(token.expose_secret())
                .header("sc-user-id", user)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .instrument(span.clone())
                .await
                .map_err(|source| {
                    crate::telemetry::record_error(&span, "transport", &source.to_string());
                    ApiError::Transport {
                        vehicle: vehicle.to_string(),
                        url: url.clone(),
                        source: source.without_url(),
                    }
                })?;
            let status = answer.status().as_u16();
            span.record("http.response.status_code", status);
            if status >= 400 {
                crate::telemetry::record_error(&span, &status.to_string(), "HTTP error status");
            }
            let request_id = answer
                .headers()
                .get("sc-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let retry_after = answer
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = answer.bytes().await.map_err(|source| ApiError::Transport {
                vehicle: vehicle.to_string(),
                url: url.clone(),
                source: source.without_url(),
            })?;
            if status == 200 {
                return Ok(Some(Fetched {
                    body,
                    fetched_at: EpochMillis::now(),
                    request_id,
                }));
            }
            let err = ErrorBody::parse(&body);
            if status == 401 && !reminted {
                tracing::info!(vehicle_id = %vehicle, generation, "HTTP 401: minting a new token and retrying once");
                self.invalidate(generation).await;
                reminted = true;
                continue;
            }
            return Err(classify(vehicle, status, retry_after, &err));
        }
    }
}

impl SmartcarApi {
    /// The absolute URL of a `links.next` value, refused unless it lies under `vehicle_api_url`.
    fn page_url(&self, vehicle: &VehicleId, first: &str, link: &str) -> Result<String, ApiError> {
        let refused = || ApiError::BadResponse {
            vehicle: vehicle.to_string(),
            source: ResponseError::Shape {
                field: "links.next".into(),
                expected: "a link under the vehicle API URL",
            },
        };
        let url = reqwest::Url::parse(first)
            .and_then(|base| base.join(link))
            .map_err(|_| refused())?;
        let base = reqwest::Url::parse(&format!("{}/", self.cfg.vehicle_api_url))
            .map_err(|_| refused())?;
        if url.as_str().starts_with(base.as_str()) {
            Ok(url.into())
        } else {
            Err(refused())
        }
    }
}

fn classify(
    vehicle: &VehicleId,
    status: u16,
    retry_after: Option<Duration>,
    err: &ErrorBody,
) -> ApiError {
    let vehicle = vehicle.to_string();
    let error = err.label();
    match status {
        401 => ApiError::Unauthorized { vehicle, error },
        429 => {
            let scope = match err.code.as_deref() {
                Some("VEHICLE") => RateScope::Vehicle,
                _ => RateScope::Application,
            };
            ApiError::RateLimited {
                vehicle,
                scope,
                retry_after,
                error,
            }
        }
        430 => ApiError::Billing { vehicle, error },
        404 => ApiError::NotFound { vehicle, error },
        500..=599 => ApiError::Server {
            vehicle,
            status,
            error,
        },
        _ => ApiError::Refused {
            vehicle,
            status,
            error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rest-v3");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn car() -> VehicleId {
        VehicleId::parse("car-1").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn error_bodies_of_both_shapes_are_read() {
        let v3 = ErrorBody::parse(&fixture("signals.404.error-body.json"));
        assert_eq!(v3.error_type.as_deref(), Some("RESOURCE_NOT_FOUND"));
        assert_eq!(v3.code.as_deref(), Some("VEHICLE_NOT_FOUND"));
        assert_eq!(
            v3.request_id.as_deref(),
            Some("3c8e1f27-5b9d-4a60-9f14-d2e7b0a6c853")
        );
        let flat = ErrorBody::parse(&fixture("signals.429.v2-flat.json"));
        assert_eq!(flat.label(), "RATE_LIMIT:VEHICLE");
        assert_eq!(ErrorBody::parse(b"<html>").label(), "no error body");
    }

    #[test]
    fn a_429_is_scoped_by_its_code() {
        let flat = ErrorBody::parse(&fixture("signals.429.v2-flat.json"));
        let e = classify(&car(), 429, Some(Duration::from_secs(120)), &flat);
        assert!(matches!(
            e,
            ApiError::RateLimited {
                scope: RateScope::Vehicle,
                retry_after: Some(d),
                ..
            } if d == Duration::from_secs(120)
        ));
        let app = ErrorBody {
            error_type: Some("RATE_LIMIT".into()),
            code: Some("SMARTCAR_API".into()),
            ..ErrorBody::default()
        };
        assert!(matches!(
            classify(&car(), 429, None, &app),
            ApiError::RateLimited {
                scope: RateScope::Application,
                ..
            }
        ));
        // A 429 that does not say whose limit it is stops the whole application: the safe side.
        assert!(matches!(
            classify(&car(), 429, None, &ErrorBody::default()),
            ApiError::RateLimited {
                scope: RateScope::Application,
                ..
            }
        ));
    }

    #[test]
    fn a_next_page_link_is_followed_only_under_the_vehicle_api_url() {
        let api = SmartcarApi::new(
            ApiConfig {
                client_id: "client_x".into(),
                client_secret: SecretString::from("s"),
                token_url: "http://127.0.0.1:1/oauth2/token".into(),
                vehicle_api_url: "http://127.0.0.1:1/v3".into(),
                timeout: Duration::from_secs(1),
                refresh_margin: Duration::from_secs(1),
            },
            Counter::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let first = "http://127.0.0.1:1/v3/vehicles/car-1/signals";
        let page = |link: &str| api.page_url(&car(), first, link).map_err(|e| e.class());
        assert_eq!(
            page("/v3/vehicles/car-1/signals?page=2").as_deref(),
            Ok("http://127.0.0.1:1/v3/vehicles/car-1/signals?page=2")
        );
        assert_eq!(
            page("http://127.0.0.1:1/v3/vehicles/car-1/signals?page%5Bnumber%5D=3").as_deref(),
            Ok("http://127.0.0.1:1/v3/vehicles/car-1/signals?page%5Bnumber%5D=3")
        );
        assert_eq!(
            page("?page=2").as_deref(),
            Ok("http://127.0.0.1:1/v3/vehicles/car-1/signals?page=2")
        );
        // The bearer token never leaves for another host or another API root.
        assert_eq!(
            page("https://evil.example/v3/vehicles/car-1/signals"),
            Err("bad_response")
        );
        assert_eq!(page("/v2.0/vehicles/car-1"), Err("bad_response"));
    }

    #[test]
    fn statuses_map_to_what_the_poller_must_do() {
        let none = ErrorBody::default();
        let class = |s| classify(&car(), s, None, &none);
        assert_eq!(class(430).class(), "billing");
        assert!(!class(430).is_transient(), "430 is never retried");
        assert_eq!(class(404).class(), "not_found");
        assert!(class(502).is_transient());
        assert!(class(500).is_transient());
        assert_eq!(class(400).class(), "refused");
        assert!(!class(403).is_transient());
        let msg = classify(
            &car(),
            430,
            None,
            &ErrorBody {
                error_type: Some("BILLING".into()),
                code: Some("VEHICLE_REQUEST_LIMIT".into()),
                ..ErrorBody::default()
            },
        )
        .to_string();
        assert!(
            msg.contains("car-1") && msg.contains("BILLING:VEHICLE_REQUEST_LIMIT"),
            "{msg}"
        );
    }
}
