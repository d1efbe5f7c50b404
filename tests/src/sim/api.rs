//! A fake Smartcar V3 API over real HTTP, serving its own ground truth
//! ([`super::truth::ApiVehicle`]): the client-credentials token endpoint, `GET
//! /v3/vehicles/{id}/signals` (JSON:API, ISO-8601 timestamps, `sc-user-id` checked, paged with
//! `links.next` when a page size is set) and `GET /v3/connections`. Faults are injected per
//! vehicle (or for every vehicle with `*`) as one-shot answers, or for a share of all requests
//! ([`FakeApi::fault_rate`]): 401, 429 with `retry-after` in either scope, 430, 5xx, a slow
//! answer, a per-signal error, a body that is not JSON, one of the wrong shape, and 404.
//! [`FaultSpec`] reads them from text (`smartcar-sim api --fault`). Every signals request is
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
#[derive(Debug, Clone, PartialEq)]
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

/// How often an injected fault answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// The next this many signals requests (of any vehicle).
    Count(u32),
    /// Each signals request with this probability (0..=1).
    Rate(f64),
}

/// A fault as `smartcar-sim api --fault` takes it: `KIND[=ARG][:COUNT|@RATE]`.
///
/// Kinds: `401`, `429-vehicle[=RETRY_AFTER_SECS]`, `429-app[=RETRY_AFTER_SECS]`, `430`,
/// `5xx[=STATUS]` (503 unless given), `slow[=DURATION]` (the normal answer that much later,
/// default 30s), `signal-error[=CODE]` (that signal answers ERROR with its stale body, default
/// `tractionbattery-stateofcharge`), `not-json`, `wrong-shape`, `404`. `:COUNT` answers the next
/// COUNT requests so (default 1); `@RATE` answers that share of all requests.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    pub fault: Fault,
    pub amount: Amount,
}

impl std::str::FromStr for FaultSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: String| format!("--fault {text:?}: {why}");
        let (head, amount) = if let Some((h, n)) = text.rsplit_once(':') {
            let n = n
                .parse::<u32>()
                .map_err(|_| bad(format!("{n:?} is not a count")))?;
            (h, Amount::Count(n))
        } else if let Some((h, r)) = text.rsplit_once('@') {
            let r = r
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| bad(format!("{r:?} is not a rate between 0 and 1")))?;
            (h, Amount::Rate(r))
        } else {
            (text, Amount::Count(1))
        };
        let (kind, arg) = match head.split_once('=') {
            Some((k, a)) => (k, Some(a)),
            None => (head, None),
        };
        let secs = |a: Option<&str>| -> Result<Option<u64>, String> {
            a.map(|a| {
                a.parse::<u64>()
                    .map_err(|_| bad(format!("{a:?} is not seconds")))
            })
            .transpose()
        };
        let fault = match kind {
            "401" => Fault::Unauthorized,
            "429-vehicle" | "429-app" => Fault::RateLimited {
                vehicle_scope: kind == "429-vehicle",
                retry_after_secs: secs(arg)?,
            },
            "430" => Fault::Billing,
            "5xx" => {
                let status = arg.map_or(Ok(503), |a| {
                    a.parse::<u16>()
                        .ok()
                        .filter(|s| (500..600).contains(s))
                        .ok_or_else(|| bad(format!("{a:?} is not a 5xx status")))
                })?;
                Fault::Server(status)
            }
            "slow" => Fault::Slow(match arg {
                None => Duration::from_secs(30),
                Some(a) => humantime::parse_duration(a)
                    .or_else(|_| a.parse::<u64>().map(Duration::from_secs))
                    .map_err(|_| bad(format!("{a:?} is not a duration (e.g. 20s)")))?,
            }),
            "signal-error" => Fault::SignalError {
                code: arg.unwrap_or("tractionbattery-stateofcharge").to_string(),
                error_type: "VEHICLE_STATE".into(),
            },
            "not-json" => Fault::NotJson,
            "wrong-shape" => Fault::WrongShape,
            "404" => Fault::NotFound,
            other => {
                return Err(bad(format!(
                    "unknown kind {other:?} (401, 429-vehicle, 429-app, 430, 5xx, slow, signal-error, not-json, wrong-shape, 404)"
                )))
            }
        };
        Ok(Self { fault, amount })
    }
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
    /// Faults answering a share of every request: (fault, probability).
    rates: Vec<(Fault, f64)>,
    /// Signals per page (`links.next` to the rest); `None`: one page.
    page_size: Option<usize>,
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

    /// Answers each signals request with `f` with probability `rate` (after one-shot faults).
    pub fn fault_rate(&self, f: Fault, rate: f64) {
        self.with(|s| s.rates.push((f, rate)));
    }

    /// Injects a fault as [`FaultSpec`] describes it, for every vehicle.
    pub fn inject(&self, spec: &FaultSpec) {
        match spec.amount {
            Amount::Count(n) => (0..n).for_each(|_| self.fault("*", spec.fault.clone())),
            Amount::Rate(r) => self.fault_rate(spec.fault.clone(), r),
        }
    }

    /// Serves at most `n` signals per page, linking the next page in `links.next`.
    pub fn set_page_size(&self, n: usize) {
        self.with(|s| s.page_size = Some(n.max(1)));
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
    let page = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("page=")))
        .and_then(|p| p.parse::<usize>().ok())
        .unwrap_or(1);
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
            .or_else(|| s.faults.get_mut("*").and_then(VecDeque::pop_front))
            .or_else(|| {
                s.rates
                    .iter()
                    .find(|(_, rate)| rand::random::<f64>() < *rate)
                    .map(|(f, _)| f.clone())
            });
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
            respond(&s, &vehicle, user.as_deref(), fault, page)
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
    page: usize,
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
    let total = data.len();
    let size = s.page_size.unwrap_or(total.max(1));
    let data: Vec<Value> = data
        .into_iter()
        .skip(size * (page.max(1) - 1))
        .take(size)
        .collect();
    let next =
        (page * size < total).then(|| format!("/v3/vehicles/{vehicle}/signals?page={}", page + 1));
    let body = json!({"data": data, "meta": {"totalCount": total, "pageSize": size, "pageNumber": page},
        "links": {"self": format!("/v3/vehicles/{vehicle}/signals?page={page}"), "next": next},
        "included": {"vehicle": {"id": vehicle, "type": "vehicle", "attributes": {"make": "TESLA", "model": "Model 3", "year": 2021, "mode": "live"}}}});
    (200, answer(200, body.to_string(), &[]), slow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_read_kind_argument_and_amount() {
        let f = |t: &str| t.parse::<FaultSpec>();
        assert_eq!(
            f("5xx"),
            Ok(FaultSpec {
                fault: Fault::Server(503),
                amount: Amount::Count(1)
            })
        );
        assert_eq!(
            f("5xx=502:3").map(|s| (s.fault, s.amount)),
            Ok((Fault::Server(502), Amount::Count(3)))
        );
        assert_eq!(
            f("429-vehicle=120@0.25").map(|s| (s.fault, s.amount)),
            Ok((
                Fault::RateLimited {
                    vehicle_scope: true,
                    retry_after_secs: Some(120)
                },
                Amount::Rate(0.25)
            ))
        );
        assert_eq!(
            f("slow=2s").map(|s| s.fault),
            Ok(Fault::Slow(Duration::from_secs(2)))
        );
        assert!(matches!(
            f("signal-error=odometer-traveleddistance").map(|s| s.fault),
            Ok(Fault::SignalError { code, .. }) if code == "odometer-traveleddistance"
        ));
        for bad in ["teapot", "5xx=418", "430@2", "401:x", "slow=soon"] {
            assert!(f(bad).is_err_and(|e| e.contains(bad)), "{bad}");
        }
    }
}
