//! `smartcar-sim load`: signed requests at a fixed rate or a fixed concurrency for a duration, with
//! latency percentiles from an HDR histogram.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

/// How to drive the load.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Requests per second (open loop; requests beyond `max_inflight` are counted as skipped).
    Rate(u32),
    /// Workers each sending back to back (closed loop).
    Concurrency(usize),
}

/// Results of a load run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub mode: String,
    pub body_bytes: usize,
    pub duration_secs: f64,
    pub requests: u64,
    pub throughput_per_sec: f64,
    pub statuses: BTreeMap<String, u64>,
    pub skipped: u64,
    pub latency_ms: BTreeMap<String, f64>,
}

impl LoadReport {
    /// A human table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "mode {}  body {} B  {:.1} s  requests {}  throughput {:.0}/s  skipped {}\nstatus:",
            self.mode,
            self.body_bytes,
            self.duration_secs,
            self.requests,
            self.throughput_per_sec,
            self.skipped
        );
        for (k, v) in &self.statuses {
            s.push_str(&format!(" {k}={v}"));
        }
        s.push_str("\nlatency ms:");
        for k in ["p50", "p90", "p99", "p99.9", "max"] {
            s.push_str(&format!(
                " {k}={:.2}",
                self.latency_ms.get(k).copied().unwrap_or(0.0)
            ));
        }
        s
    }
}

/// A VEHICLE_STATE body template of about `target` bytes; `@@N@@` marks where the request number
/// goes (event id, delivery id, vehicle), so per-request bodies cost a string replace.
pub fn body_template(target: usize) -> String {
    let mut signals = Vec::new();
    let mut size = 0;
    let mut i = 0;
    while size + 400 < target && i < 2000 {
        let sig = json!({"code": format!("group{}-signal{}", i % 19, i), "name": format!("Signal{i}"), "group": format!("Group{}", i % 19),
            "body": {"unit": "percent", "value": i as f64 * 1.5}, "status": {"value": "SUCCESS"},
            "meta": {"oemUpdatedAt": 1_764_000_000_000_i64 + i as i64, "retrievedAt": 1_764_000_001_000_i64}});
        size += sig.to_string().len() + 1;
        signals.push(sig);
        i += 1;
    }
    serde_json::to_string(&json!({"eventId": format!("load-{}-@@N@@", std::process::id()), "eventType": "VEHICLE_STATE", "vehicleId": "load-veh-@@N@@",
        "data": {"user": {"id": "u"}, "vehicle": {"id": "load-veh-@@N@@", "make": "TESLA", "model": "3", "year": 2020}, "signals": signals},
        "meta": {"version": "4.0", "deliveryId": "d-@@N@@", "deliveredAt": 1_764_000_002_000_i64, "mode": "TEST"}}))
    .unwrap_or_default()
}

/// The body of request `n` from a template.
pub fn body_from(template: &str, n: u64) -> Vec<u8> {
    template.replace("@@N@@", &n.to_string()).into_bytes()
}

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: SocketAddr,
    pub path: String,
    pub token: String,
    pub mode: Mode,
    pub duration: Duration,
    pub body_bytes: usize,
    pub max_inflight: usize,
}

/// Runs the load. `progress` ticks once per second.
pub async fn run(spec: LoadSpec, progress: Option<indicatif::ProgressBar>) -> LoadReport {
    let LoadSpec {
        addr,
        path,
        token,
        mode,
        duration,
        body_bytes,
        max_inflight,
    } = spec;
    let token = token.as_str();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http();
    let token = SecretString::from(token.to_string());
    let hist = Arc::new(Mutex::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .unwrap_or_else(|_| hdrhistogram::Histogram::new(3).unwrap_or_else(|e| panic!("{e}"))),
    ));
    let statuses: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let counter = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let url = format!("http://{addr}{path}");
    let template: Arc<str> = Arc::from(body_template(body_bytes));
    let one = {
        let (client, hist, statuses, counter, url, template) = (
            client.clone(),
            Arc::clone(&hist),
            Arc::clone(&statuses),
            Arc::clone(&counter),
            url.clone(),
            Arc::clone(&template),
        );
        move || {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let body = body_from(&template, n);
            let sig = super::hmac::sign_hex(token.expose_secret().as_bytes(), &body);
            let req = http::Request::post(&url)
                .header("content-type", "application/json")
                .header("SC-Signature", sig)
                .body(Full::new(Bytes::from(body)));
            let (client, hist, statuses) =
                (client.clone(), Arc::clone(&hist), Arc::clone(&statuses));
            async move {
                let started = Instant::now();
                let status = match req {
                    Ok(r) => match client.request(r).await {
                        Ok(resp) => resp.status().as_u16().to_string(),
                        Err(_) => "connection_error".to_string(),
                    },
                    Err(_) => "bad_request".to_string(),
                };
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut h) = hist.lock() {
                    let _ = h.record(us.max(1));
                }
                if let Ok(mut s) = statuses.lock() {
                    *s.entry(status).or_default() += 1;
                }
            }
        }
    };
    let started = Instant::now();
    let deadline = started + duration;
    let ticker = progress.clone().map(|p| {
        tokio::spawn(async move {
            while Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                p.inc(1);
            }
        })
    });
    match mode {
        Mode::Concurrency(c) => {
            let workers: Vec<_> = (0..c.max(1))
                .map(|_| {
                    let one = one.clone();
                    tokio::spawn(async move {
                        while Instant::now() < deadline {
                            one().await;
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
        }
        Mode::Rate(r) => {
            let inflight = Arc::new(tokio::sync::Semaphore::new(max_inflight.max(1)));
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(r.max(1))));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = Vec::new();
            while Instant::now() < deadline {
                tick.tick().await;
                match Arc::clone(&inflight).try_acquire_owned() {
                    Ok(permit) => {
                        let fut = one();
                        tasks.push(tokio::spawn(async move {
                            fut.await;
                            drop(permit);
                        }));
                    }
                    Err(_) => {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let secs = started.elapsed().as_secs_f64();
    let h = hist
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| hdrhistogram::Histogram::new(3).unwrap_or_else(|e| panic!("{e}")));
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let latency_ms = BTreeMap::from([
        ("p50".to_string(), ms(0.50)),
        ("p90".to_string(), ms(0.90)),
        ("p99".to_string(), ms(0.99)),
        ("p99.9".to_string(), ms(0.999)),
        ("max".to_string(), h.max() as f64 / 1000.0),
    ]);
    let requests = h.len();
    LoadReport {
        mode: match mode {
            Mode::Rate(r) => format!("rate {r}/s"),
            Mode::Concurrency(c) => format!("concurrency {c}"),
        },
        body_bytes: body_from(&template, 0).len(),
        duration_secs: secs,
        requests,
        throughput_per_sec: requests as f64 / secs,
        statuses: statuses.lock().map(|s| s.clone()).unwrap_or_default(),
        skipped: skipped.load(Ordering::Relaxed),
        latency_ms,
    }
}
