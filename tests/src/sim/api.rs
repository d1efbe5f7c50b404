//! A fake Smartcar V3 API over real HTTP, serving its own ground truth
//! ([`super::truth::ApiVehicle`]): the client-credentials token endpoint, `GET
//! /v3/vehicles/{id}/signals` (JSON:API, ISO-8601 timestamps, `sc-user-id` checked) and `GET
//! /v3/connections`. Faults are injected per vehicle (or for every vehicle with `*`) as one-shot
//! answers: 401, 429 with `retry-after` in either scope, 430, 5xx, a slow answer, a per-signal
//! error, a body that is not JSON, one of the wrong shape, and 404. Every signals request is
//! logged with its time and status, so tests assert what Smartcar would have seen.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::truth::ApiVehicle;

/// One injected answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 401 whatever the token.
    Unauthorized,
    /// 429; `vehicle_scope` answers `RATE_LIMIT:VEHICLE`, else `RATE_LIMIT:SMARTCAR_API`.
    RateLimited {
        vehicle_scope: bool,
        retry_after_secs: Option<u64>,
    },
    /// 430 `BILLING:VEHICLE_REQUEST_LIMIT`.
    Billing,
    /// A 5xx status.
    Server(u16),
    /// The normal answer, this much later.
    Slow(Duration),
    /// 200 with every signal but `code` normal; `code` answers ERROR (keeping a stale body).
    SignalError { code: String, error_type: String },
    /// 200 with an HTML body.
    NotJson,
    /// 200 with JSON of the wrong shape.
    WrongShape,
    /// 404 `VEHICLE_NOT_FOUND`.
    NotFound,
}

/// One signals request as the fake saw it.
#[derive(Debug, Clone)]
pub struct ApiCall {
    pub vehicle: String,
    pub at: Instant,
    pub status: u16,
}

#[derive(Default)]
struct State {
    client_id: String,
    client_secret: String,
    token_life_secs: u64,
    valid_tokens: HashMap<String, ()>,
    minted: u64,
    vehicles: BTreeMap<String, ApiVehicle>,
    faults: HashMap<String, VecDeque<Fault>>,
    calls: Vec<ApiCall>,
}

/// The running fake; stops when dropped.
pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: CancellationToken,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Answer = Response<Full<Bytes>>;

fn answer(status: u16, body: impl Into<Bytes>, headers: &[(&str, String)]) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(v),
        ) {
            r.headers_mut().insert(k, v);
        }
    }
    r
}

fn error_body(status: u16, error_type: &str, code: Option<&str>) -> String {
    json!({"errors": [{"status": status.to_string(), "type": error_type, "code": code,
        "detail": format!("{error_type} ({status})"), "meta": {"debug": {"requestId": uuid::Uuid::new_v4().to_string()}}}]})
    .to_string()
}

fn iso(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Decodes `application/x-www-form-urlencoded`.
fn form(body: &[u8]) -> HashMap<String, String> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

impl FakeApi {
    /// Serves on a loopback port; tokens live `token_life_secs`.
    pub async fn start(client_id: &str, client_secret: &str, token_life_secs: u64) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("fake api bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake api addr: {e}"));
        Self::serve(listener, addr, client_id, client_secret, token_life_secs)
    }

    /// Serves on `listener` (the `smartcar-sim api` command binds its own address).
    pub fn serve(
        listener: tokio::net::TcpListener,
        addr: SocketAddr,
        client_id: &str,
        client_secret: &str,
        token_life_secs: u64,
    ) -> Self {
        let state = Arc::new(Mutex::new(State {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            token_life_secs,
            ..State::default()
        }));
        let stop = CancellationToken::new();
        let (st, stop2) = (Arc::clone(&state), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else { continue };
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let st = Arc::clone(&st);
                        async move { Ok::<_, std::convert::Infallible>(handle(&st, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state, stop }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s)
    }

    /// `http://addr/oauth2/token`.
    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    /// `http://addr/v3`.
    pub fn vehicle_api_url(&self) -> String {
        format!("http://{}/v3", self.addr)
    }

    /// Sets (or replaces) what the API reports for `vehicle`.
    pub fn set_vehicle(&self, vehicle: &str, v: ApiVehicle) {
        self.with(|s| s.vehicles.insert(vehicle.to_string(), v));
    }

    /// Queues a one-shot answer for `vehicle` (`*`: the next request of any vehicle).
    pub fn fault(&self, vehicle: &str, f: Fault) {
        self.with(|s| {
            s.faults
                .entry(vehicle.to_string())
                .or_default()
                .push_back(f)
        });
    }

    /// Every token minted so far stops working (as if it expired).
    pub fn expire_tokens(&self) {
        self.with(|s| s.valid_tokens.clear());
    }

    /// Tokens minted.
    pub fn minted(&self) -> u64 {
        self.with(|s| s.minted)
    }

    /// Signals requests so far.
    pub fn calls(&self) -> Vec<ApiCall> {
        self.with(|s| s.calls.clone())
    }

    /// Signals requests for one vehicle.
    pub fn calls_for(&self, vehicle: &str) -> Vec<ApiCall> {
        self.calls()
            .into_iter()
            .filter(|c| c.vehicle == vehicle)
            .collect()
    }
}

async fn handle(st: &Mutex<State>, req: Request<hyper::body::Incoming>) -> Answer {
    let lock = || st.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let bearer = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let user = req
        .headers()
        .get("sc-user-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if method == hyper::Method::POST && path == "/oauth2/token" {
        let f = form(&body);
        let mut s = lock();
        if f.get("grant_type").map(String::as_str) != Some("client_credentials")
            || f.get("client_id") != Some(&s.client_id)
            || f.get("client_secret") != Some(&s.client_secret)
        {
            return answer(
                401,
                r#"{"error":"invalid_client","error_description":"bad client credentials"}"#,
                &[],
            );
        }
        s.minted += 1;
        let token = format!("fake-token-{}-{}", s.minted, uuid::Uuid::new_v4());
        s.valid_tokens.insert(token.clone(), ());
        let life = s.token_life_secs;
        return answer(
            200,
            json!({"access_token": token, "token_type": "Bearer", "expires_in": life}).to_string(),
            &[],
        );
    }
    if method == hyper::Method::GET && path == "/v3/connections" {
        let s = lock();
        let data: Vec<Value> = s
            .vehicles
            .iter()
            .map(|(id, v)| json!({"id": format!("conn-{id}"), "type": "connection",
                "attributes": {"user": {"id": v.user_id}},
                "relationships": {"vehicle": {"data": {"id": id}}, "user": {"data": {"id": v.user_id}}}}))
            .collect();
        let n = data.len();
        return answer(
            200,
            json!({"data": data, "meta": {"pageNumber": 1, "pageSize": n, "totalCount": n}, "links": {"next": null}}).to_string(),
            &[],
        );
    }
    let Some(vehicle) = path
        .strip_prefix("/v3/vehicles/")
        .and_then(|p| p.strip_suffix("/signals"))
        .map(str::to_owned)
    else {
        return answer(
            404,
            error_body(404, "RESOURCE_NOT_FOUND", Some("INVALID_PATH")),
            &[],
        );
    };
    let (out, slow) = {
        let mut s = lock();
        let fault = s
            .faults
            .get_mut(&vehicle)
            .and_then(VecDeque::pop_front)
            .or_else(|| s.faults.get_mut("*").and_then(VecDeque::pop_front));
        let authorised = bearer
            .as_ref()
            .is_some_and(|t| s.valid_tokens.contains_key(t));
        let (status, out, slow) = if !authorised || matches!(fault, Some(Fault::Unauthorized)) {
            (
                401,
                answer(401, error_body(401, "AUTHENTICATION", None), &[]),
                None,
            )
        } else {
            respond(&s, &vehicle, user.as_deref(), fault)
        };
        s.calls.push(ApiCall {
            vehicle: vehicle.clone(),
            at: Instant::now(),
            status,
        });
        (out, slow)
    };
    if let Some(d) = slow {
        tokio::time::sleep(d).await;
    }
    out
}

fn respond(
    s: &State,
    vehicle: &str,
    user: Option<&str>,
    fault: Option<Fault>,
) -> (u16, Answer, Option<Duration>) {
    let plain = |status: u16, body: String| (status, answer(status, body, &[]), None);
    let mut slow = None;
    let mut signal_error = None;
    match fault {
        Some(Fault::RateLimited {
            vehicle_scope,
            retry_after_secs,
        }) => {
            let code = if vehicle_scope {
                "VEHICLE"
            } else {
                "SMARTCAR_API"
            };
            let headers: Vec<(&str, String)> = retry_after_secs
                .map(|s| ("retry-after", s.to_string()))
                .into_iter()
                .collect();
            // The documented flat shape: its `code` names the scope.
            let body = json!({"type": "RATE_LIMIT", "code": code, "statusCode": 429, "description": "rate limited", "resolution": {"type": "RETRY_LATER"}});
            return (429, answer(429, body.to_string(), &headers), None);
        }
        Some(Fault::Billing) => {
            return plain(
                430,
                error_body(430, "BILLING", Some("VEHICLE_REQUEST_LIMIT")),
            )
        }
        Some(Fault::Server(status)) => {
            return plain(status, error_body(status, "SERVER", Some("INTERNAL")))
        }
        Some(Fault::NotJson) => {
            return (
                200,
                answer(200, "<html><body>502 Bad Gateway</body></html>", &[]),
                None,
            )
        }
        Some(Fault::WrongShape) => return plain(200, json!({"data": {"signals": 5}}).to_string()),
        Some(Fault::NotFound) => {
            return plain(
                404,
                error_body(404, "RESOURCE_NOT_FOUND", Some("VEHICLE_NOT_FOUND")),
            )
        }
        Some(Fault::Slow(d)) => slow = Some(d),
        Some(Fault::SignalError { code, error_type }) => signal_error = Some((code, error_type)),
        Some(Fault::Unauthorized) | None => {}
    }
    let Some(v) = s.vehicles.get(vehicle) else {
        return plain(
            404,
            error_body(404, "RESOURCE_NOT_FOUND", Some("VEHICLE_NOT_FOUND")),
        );
    };
    if user != Some(v.user_id.as_str()) {
        return plain(403, error_body(403, "PERMISSION", None));
    }
    let now = iso(shared::clock::EpochMillis::now().as_i64());
    let data: Vec<Value> = v
        .signals
        .iter()
        .map(|(code, (body, oem))| {
            let (group, name) = code.split_once('-').unwrap_or((code, code));
            let status = match &signal_error {
                Some((c, t)) if c == code => {
                    json!({"value": "ERROR", "error": {"type": t, "code": "INJECTED", "title": "Injected", "detail": "injected by smartcar-sim", "resolution": {"type": "RETRY_LATER"}}})
                }
                _ => json!({"value": "SUCCESS"}),
            };
            json!({"id": code, "type": "signal",
                "attributes": {"code": code, "name": name, "group": group, "status": status, "body": body},
                "meta": {"oemUpdatedAt": iso(*oem), "retrievedAt": now, "ingestedAt": now},
                "links": {"self": format!("/v3/vehicles/{vehicle}/signals/{code}")}})
        })
        .collect();
    let n = data.len();
    let body = json!({"data": data, "meta": {"totalCount": n, "pageSize": n, "pageNumber": 1},
        "links": {"self": format!("/v3/vehicles/{vehicle}/signals")},
        "included": {"vehicle": {"id": vehicle, "type": "vehicle", "attributes": {"make": "TESLA", "model": "Model 3", "year": 2021, "mode": "live"}}}});
    (200, answer(200, body.to_string(), &[]), slow)
}
