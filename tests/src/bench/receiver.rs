//! Receiver figures for `carhook-bench`: the release `receiver` binary next to its limits, every
//! server its own process, all loaded by the same client (`wrk`, same connections, same signed body).
//!
//! - **bare hyper**: the receiver's hyper setup answering 200 once the body is read;
//! - **baseline**: the same hyper setup reading the body the receiver's way and awaiting an acks=all
//!   produce of it with the receiver's producer settings and key; no verification, no parse, no
//!   logging — what any receiver that acknowledges after Kafka must at least spend;
//! - **plain producer**: an rdkafka loop producing records of the same size, 64 in flight;
//! - **Go reference** (when `go` is on the PATH): `bench/go-receiver`, what a Go developer would
//!   write with net/http and franz-go for the same job (HMAC over the body, the vehicle id read
//!   with encoding/json, an acks=all LZ4 produce awaited), without logging, metrics or spans. It is
//!   a competitor, not a limit: it is not part of the ratio.
//!
//! Per size: a warm-up, then three rounds of (bare, baseline, receiver, Go reference) back to back
//! and the plain producer; the median of the three is reported, and the ratio is to min(bare,
//! baseline, producer).
//! CPU per acknowledged request is `utime + stime` of the server process (all its threads, librdkafka's
//! included) over the run, divided by the 2xx answers; RSS is the receiver's after the last run. The
//! receiver runs with production logging (JSON lines at `info`, to a file) and spans on. Latency at
//! half the maximum rate comes from the open-loop generator (`sim::load`, fixed rate).
//!
//! `BENCH_RECEIVER_BIN` measures another receiver binary (e.g. one built from an older commit).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use carhook_tests::bench::cpu_secs;
use carhook_tests::sim::load::{self, body_from, body_template, LoadSpec, Mode};
use carhook_tests::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

/// Connections (wrk) and records in flight (plain producer).
const CONCURRENCY: usize = 64;
/// Environment telling `carhook-bench` to serve instead of measuring: `bare` or `baseline`.
const SERVE_ENV: &str = "BENCH_SERVE";
const LISTEN_ENV: &str = "BENCH_LISTEN";

/// When started as one of the limit servers (`BENCH_SERVE`), serves forever; otherwise returns.
pub async fn serve_if_asked() {
    let Ok(which) = std::env::var(SERVE_ENV) else {
        return;
    };
    let addr: SocketAddr = std::env::var(LISTEN_ENV)
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("{LISTEN_ENV} must be an address"));
    let produce = match which.as_str() {
        "bare" => None,
        "baseline" => {
            let s = shared::config::Settings::load(None).unwrap_or_else(|e| panic!("{e}"));
            let p: FutureProducer = shared::kafka::producer_config(&s.kafka)
                .create()
                .unwrap_or_else(|e| panic!("{e}"));
            Some(Arc::new((p, s)))
        }
        other => panic!("{SERVE_ENV}={other}: expected bare or baseline"),
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let builder = Arc::new(carhook_receiver::server::http_builder());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (builder, produce) = (Arc::clone(&builder), produce.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let produce = produce.clone();
                async move {
                    let declared = req
                        .headers()
                        .get(http::header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    let body =
                        carhook_receiver::webhook::read_body(req.into_body(), declared, 1 << 20)
                            .await;
                    let ok = match (body, produce) {
                        (Ok(_), None) => true,
                        (Ok(body), Some(p)) => {
                            let (producer, s) = &*p;
                            // The receiver keys by vehicle; a fixed-width stand-in costs the same.
                            let key = format!("baseline-{}", body.len() % 1000);
                            producer
                                .send(
                                    FutureRecord::to(&s.kafka.events_topic)
                                        .key(&key)
                                        .payload(&body[..]),
                                    s.kafka.delivery_timeout(),
                                )
                                .await
                                .is_ok()
                        }
                        (Err(_), _) => false,
                    };
                    let mut resp = http::Response::new(Full::new(Bytes::from_static(
                        b"{\"status\":\"accepted\"}",
                    )));
                    if !ok {
                        *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// `VmRSS` and `VmHWM` of a process, in MB.
fn rss_mb(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// Builds `bench/go-receiver` into the target directory: the Go reference receiver's binary, or
/// why there is none (no `go` on the PATH, or the build failed; its modules come from the Go
/// module proxy).
pub fn build_go_reference() -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/go-receiver");
    let out = release_bin("bench-go-receiver");
    let built = Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(&src)
        .output()
        .map_err(|e| format!("go build in {}: {e}", src.display()))?;
    if built.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "go build in {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&built.stderr).trim()
        ))
    }
}

/// A server process under test, killed when dropped.
struct Server {
    name: &'static str,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn release_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    exe.parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| panic!("no target dir"))
}

async fn start(name: &'static str, cmd: &mut Command, addr: SocketAddr, log: &Path) -> Server {
    let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{e}"));
    let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let child = cmd
        .stdout(out)
        .stderr(err)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let server = Server { name, child, addr };
    // Ready when a signed request is acknowledged (the producer has its metadata).
    let body = body_from(&body_template(1024), 0);
    let sig = sign(TOKEN, &body);
    eventually(Duration::from_secs(60), || {
        let body = body.clone();
        let sig = sig.clone();
        async move { try_post(addr, "/webhooks/smartcar", body, &sig).await == Some(200) }
    })
    .await;
    server
}

/// What one wrk run measured on one server.
#[derive(Debug, Clone, Default)]
struct Run {
    acked_per_sec: f64,
    p99_ms: f64,
    non_2xx: u64,
    cpu_ms_per_req: f64,
}

fn wrk_ms(v: &str) -> f64 {
    let num = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
    if let Some(x) = v.strip_suffix("us") {
        num(x) / 1000.0
    } else if let Some(x) = v.strip_suffix("ms") {
        num(x)
    } else if let Some(x) = v.strip_suffix('s') {
        num(x) * 1000.0
    } else {
        f64::NAN
    }
}

/// Runs wrk against `server` for `secs`, measuring the server's CPU over the run.
fn wrk(server: &Server, body: &Path, sig: &str, secs: u64) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/signed_post.lua");
    let pid = server.child.id();
    let cpu0 = cpu_secs(pid);
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{CONCURRENCY}"), &format!("-d{secs}s")])
        .arg("--latency")
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{}/webhooks/smartcar", server.addr))
        .env("CARHOOK_BODY", body)
        .env("CARHOOK_SIG", sig)
        .output()
        .unwrap_or_else(|e| panic!("wrk (apt-get install wrk): {e}"));
    let cpu = cpu_secs(pid) - cpu0;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut total = 0u64;
    let mut took = secs as f64;
    let mut r = Run::default();
    for line in text.lines().map(str::trim) {
        let w: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("99%") {
            r.p99_ms = w.get(1).map_or(f64::NAN, |v| wrk_ms(v));
        } else if w.get(1) == Some(&"requests") && w.get(2) == Some(&"in") {
            total = w[0].parse().unwrap_or(0);
            took = w
                .get(3)
                .map(|v| wrk_ms(v.trim_end_matches(',')) / 1000.0)
                .unwrap_or(took);
        } else if line.starts_with("Non-2xx or 3xx responses:") {
            r.non_2xx = w.last().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let acked = total.saturating_sub(r.non_2xx);
    r.acked_per_sec = acked as f64 / took;
    r.cpu_ms_per_req = if acked > 0 {
        cpu * 1000.0 / acked as f64
    } else {
        f64::NAN
    };
    eprintln!(
        "bench:   {:<9} {:>8.0} acked/s  p99 {:>7.2} ms  cpu/req {:.3} ms  non-2xx {}",
        server.name, r.acked_per_sec, r.p99_ms, r.cpu_ms_per_req, r.non_2xx
    );
    r
}

/// The same record sizes through a plain idempotent acks=all producer, CONCURRENCY in flight.
async fn producer_loop(s: &shared::config::Settings, body_bytes: usize, duration: Duration) -> f64 {
    let producer: FutureProducer = shared::kafka::producer_config(&s.kafka)
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let template: Arc<str> = Arc::from(body_template(body_bytes));
    let topic = s.kafka.events_topic.clone();
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..CONCURRENCY {
        let (producer, template, topic) = (producer.clone(), Arc::clone(&template), topic.clone());
        workers.push(tokio::spawn(async move {
            let mut acked = 0u64;
            let mut n = w as u64 * 1_000_000;
            while Instant::now() < deadline {
                let body = body_from(&template, n);
                let key = format!("load-veh-{}", n % 1000);
                if producer
                    .send(
                        FutureRecord::to(&topic).key(&key).payload(&body),
                        Duration::from_secs(5),
                    )
                    .await
                    .is_ok()
                {
                    acked += 1;
                }
                n += 1;
            }
            acked
        }));
    }
    let mut all = 0;
    for w in workers {
        all += w.await.unwrap_or(0);
    }
    let rate = all as f64 / started.elapsed().as_secs_f64();
    eprintln!("bench:   producer  {rate:>8.0} acked/s");
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Open-loop latency at `rate` requests/s against `server`, and its CPU per 2xx answer at that
/// rate (the same rate for every server, so batching in the producer is alike). The generator's
/// own CPU per answer is reported too: it runs in this process, on the same two cores, and
/// nothing else runs in this process meanwhile.
async fn at_rate(server: &Server, rate: u32, body_bytes: usize, duration: Duration) -> Value {
    let addr = server.addr;
    let cpu0 = cpu_secs(server.child.id());
    let own0 = cpu_secs(std::process::id());
    let spec = LoadSpec {
        addr,
        path: "/webhooks/smartcar".into(),
        token: TOKEN.to_string(),
        mode: Mode::Rate(rate.max(1)),
        duration,
        body_bytes,
        max_inflight: 4096,
    };
    // The generator runs on one thread of its own: with two worker threads it used 15–20 % more
    // CPU at 7,000 4 KB requests/s (the kernel switching between them), taken from the two cores
    // the servers and the broker share.
    let r = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(load::run(spec, None)))
    })
    .await
    .unwrap_or_else(|e| panic!("load generator: {e}"))
    .unwrap_or_else(|e| panic!("load generator runtime: {e}"));
    let cpu = cpu_secs(server.child.id()) - cpu0;
    let own = cpu_secs(std::process::id()) - own0;
    let ok = r.statuses.get("200").copied().unwrap_or(0);
    let per_ok = |secs: f64| {
        if ok > 0 {
            secs * 1000.0 / ok as f64
        } else {
            f64::NAN
        }
    };
    let (cpu_ms_per_req, generator_cpu_ms_per_req) = (per_ok(cpu), per_ok(own));
    eprintln!(
        "bench:   {:<9} at {rate}/s: p99 {:.2} ms  cpu/req {cpu_ms_per_req:.3} ms  generator cpu/req {generator_cpu_ms_per_req:.3} ms",
        server.name,
        r.latency_ms.get("p99").copied().unwrap_or(f64::NAN)
    );
    json!({"rate_per_sec": rate, "achieved_per_sec": r.throughput_per_sec, "p50_ms": r.latency_ms.get("p50"),
        "p99_ms": r.latency_ms.get("p99"), "cpu_ms_per_req": cpu_ms_per_req,
        "generator_cpu_ms_per_req": generator_cpu_ms_per_req, "statuses": r.statuses, "skipped": r.skipped})
}

/// All figures for one body size; `go_reference` is the Go reference receiver's binary, or why
/// it is not measured.
async fn one_size(
    body_bytes: usize,
    secs: u64,
    rounds: usize,
    go_reference: &Result<PathBuf, String>,
) -> Value {
    let s = settings(&[]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("carhook-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let body = body_from(&body_template(body_bytes), 0);
    let body_file = dir.join(format!("body-{body_bytes}.json"));
    std::fs::write(&body_file, &body).unwrap_or_else(|e| panic!("{e}"));
    let sig = sign(TOKEN, &body);

    let env = child_env(&s, free_port(), "unused");
    let (bare_addr, base_addr, recv_addr) = (free_port(), free_port(), free_port());
    let me = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let serve = |which: &str, addr: SocketAddr| {
        let mut c = Command::new(&me);
        c.env_clear()
            .envs(env.iter().cloned())
            .env(SERVE_ENV, which)
            .env(LISTEN_ENV, addr.to_string());
        c
    };
    let bare = start(
        "bare",
        &mut serve("bare", bare_addr),
        bare_addr,
        &dir.join("bare.log"),
    )
    .await;
    let base = start(
        "baseline",
        &mut serve("baseline", base_addr),
        base_addr,
        &dir.join("baseline.log"),
    )
    .await;
    let receiver_bin = std::env::var("BENCH_RECEIVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| release_bin("receiver"));
    let recv_admin = free_port();
    let receiver = |name: &'static str, bin: PathBuf, addr: SocketAddr, admin: SocketAddr| {
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .envs(env.iter().cloned())
            .env("CARHOOK__RECEIVER__LISTEN", addr.to_string())
            .env("CARHOOK__RECEIVER__ADMIN_LISTEN", admin.to_string())
            .env("CARHOOK__TELEMETRY__LOG_LEVEL", "info")
            .env("CARHOOK__TELEMETRY__LOG_FORMAT", "json");
        async move { (start(name, &mut cmd, addr, &log).await, log) }
    };
    let (recv, recv_log) = receiver("receiver", receiver_bin, recv_addr, recv_admin).await;
    // `BENCH_RECEIVER_BEFORE_BIN`: another receiver build measured in the same rounds.
    let before = match std::env::var("BENCH_RECEIVER_BEFORE_BIN") {
        Ok(bin) => Some(
            receiver("before", PathBuf::from(bin), free_port(), free_port())
                .await
                .0,
        ),
        Err(_) => None,
    };
    let go = match go_reference {
        Ok(bin) => {
            let addr = free_port();
            let mut cmd = Command::new(bin);
            cmd.env_clear()
                .env("GO_RECEIVER_LISTEN", addr.to_string())
                .env("GO_RECEIVER_BROKERS", &s.kafka.brokers)
                .env("GO_RECEIVER_TOPIC", &s.kafka.events_topic)
                .env("GO_RECEIVER_TOKENS", format!("{TOKEN},{OLD_TOKEN}"));
            Some(start("go", &mut cmd, addr, &dir.join("go.log")).await)
        }
        Err(why) => {
            eprintln!("bench: Go reference receiver not measured: {why}");
            None
        }
    };
    let mut servers = vec![&bare, &base, &recv];
    servers.extend(before.as_ref());
    servers.extend(go.as_ref());
    // Where the optional servers' runs are in `runs`.
    let before_i = before.as_ref().map(|_| 3);
    let go_i = go.as_ref().map(|_| servers.len() - 1);

    eprintln!("bench: {} B bodies, warm-up", body.len());
    for srv in &servers {
        wrk(srv, &body_file, &sig, 3);
    }
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); servers.len()];
    let mut producer = Vec::new();
    for round in 0..rounds {
        eprintln!("bench: {} B bodies, round {}", body.len(), round + 1);
        for (i, srv) in servers.iter().enumerate() {
            runs[i].push(wrk(srv, &body_file, &sig, secs));
        }
        producer.push(producer_loop(&s, body_bytes, Duration::from_secs(secs)).await);
    }
    let (rss, hwm) = rss_mb(recv.child.id());
    let log_lines = std::fs::read_to_string(&recv_log)
        .map(|l| l.lines().count())
        .unwrap_or(0);
    // Every request the receiver answered (warm-up and readiness included) against every byte it
    // wrote to stdout and stderr: the log volume per webhook at production logging.
    let requests = metric_value(recv_admin, "carhook_receiver_requests_total").await;
    let log_bytes = std::fs::metadata(&recv_log).map_or(0, |m| m.len());
    let log_bytes_per_request = log_bytes as f64 / requests.max(1.0);
    let med = |i: usize, f: fn(&Run) -> f64| median(runs[i].iter().map(f).collect());
    let fig = |i: usize| {
        json!({"throughput_per_sec": med(i, |r| r.acked_per_sec), "p99_ms": med(i, |r| r.p99_ms),
            "cpu_ms_per_req": med(i, |r| r.cpu_ms_per_req),
            "runs": runs[i].iter().map(|r| json!({"acked_per_sec": r.acked_per_sec, "p99_ms": r.p99_ms, "cpu_ms_per_req": r.cpu_ms_per_req, "non_2xx": r.non_2xx})).collect::<Vec<_>>()})
    };
    let (bare_v, base_v, recv_v) = (fig(0), fig(1), fig(2));
    // Per-round CPU ratios of server `i` to server `to`, each pair measured back to back.
    let cpu_ratios = |i: usize, to: usize| -> Vec<f64> {
        (0..rounds)
            .map(|k| runs[i][k].cpu_ms_per_req / runs[to][k].cpu_ms_per_req)
            .collect()
    };
    let other = |srv: &Server, i: usize| {
        let (rss, hwm) = rss_mb(srv.child.id());
        let mut v = fig(i);
        v["ratio_to_limit"] = json!(
            med(i, |r| r.acked_per_sec)
                / med(0, |r| r.acked_per_sec).min(med(1, |r| r.acked_per_sec))
        );
        v["cpu_ratio_to_baseline"] = json!(median(cpu_ratios(i, 1)));
        v["rss_mb"] = json!(rss);
        v["peak_rss_mb"] = json!(hwm);
        v
    };
    let before_v = before.as_ref().zip(before_i).map(|(b, i)| other(b, i));
    let go_v = go.as_ref().zip(go_i).map(|(g, i)| {
        let mut v = other(g, i);
        v["receiver_cpu_ratio_to_go"] = json!(median(cpu_ratios(2, i)));
        v["receiver_throughput_ratio_to_go"] =
            json!(med(2, |r| r.acked_per_sec) / med(i, |r| r.acked_per_sec));
        v
    });
    let producer_rate = median(producer.clone());
    let limit = med(0, |r| r.acked_per_sec)
        .min(med(1, |r| r.acked_per_sec))
        .min(producer_rate);
    let recv_max = med(2, |r| r.acked_per_sec);
    let half = (recv_max / 2.0) as u32;
    eprintln!("bench: {} B bodies, latency at {half}/s", body.len());
    let recv_half = at_rate(&recv, half, body_bytes, Duration::from_secs(secs)).await;
    let before_half = match &before {
        Some(b) => Some(at_rate(b, half, body_bytes, Duration::from_secs(secs)).await),
        None => None,
    };
    let go_half = match &go {
        Some(g) => Some(at_rate(g, half, body_bytes, Duration::from_secs(secs)).await),
        None => None,
    };
    let base_half = at_rate(&base, half, body_bytes, Duration::from_secs(secs)).await;
    let per_round_cpu = cpu_ratios(2, 1);
    drop(servers);
    drop((bare, base, recv, before, go));
    json!({
        "receiver_before": before_v,
        "receiver_before_at_half_max": before_half,
        "go_reference": go_v,
        "go_reference_at_half_max": go_half,
        "go_reference_skipped": go_reference.as_ref().err(),
        "body_bytes": body.len(),
        "receiver": recv_v,
        "baseline": base_v,
        "bare_hyper": bare_v,
        "plain_producer": {"throughput_per_sec": producer_rate, "runs": producer},
        "limit_per_sec": limit,
        "ratio_to_limit": recv_max / limit,
        "cpu_ratio_to_baseline": median(per_round_cpu.clone()),
        "cpu_ratio_per_round": per_round_cpu,
        "receiver_rss_mb": rss,
        "receiver_peak_rss_mb": hwm,
        "receiver_log_lines": log_lines,
        "receiver_log_bytes_per_request": log_bytes_per_request,
        "receiver_at_half_max": recv_half,
        "baseline_at_half_max": base_half,
    })
}

/// Receiver figures at 4 KB and 50 KB, and their markdown table.
pub async fn figures(secs: u64) -> (Value, Value, String) {
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let go_reference = build_go_reference();
    let r4 = one_size(4096, secs, rounds, &go_reference).await;
    let r50 = one_size(50_000, secs, rounds, &go_reference).await;
    (r4.clone(), r50.clone(), table(&r4, &r50, secs, rounds))
}

fn f(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else if x >= 1.0 {
            format!("{x:.2}")
        } else {
            format!("{x:.3}")
        }
    })
}

fn table(r4: &Value, r50: &Value, secs: u64, rounds: usize) -> String {
    let mut md = format!(
        "Receiver: each server its own process, loaded by `wrk -t2 -c{CONCURRENCY} -d{secs}s` with the same signed \
         body, warm-up 3 s, median of {rounds} rounds (servers back to back in each round); receiver with 2 tokens, \
         JSON log line per request at `info`, spans on. CPU = utime+stime of the server process / 2xx answers.\n\n\
         | receiver figure | 4 KB | 50 KB | target |\n|---|---|---|---|\n"
    );
    let row = |md: &mut String, label: &str, a: &Value, b: &Value, target: &str| {
        md.push_str(&format!("| {label} | {} | {} | {target} |\n", f(a), f(b)));
    };
    for (label, key) in [
        ("receiver acknowledged req/s", "receiver"),
        ("baseline (hyper + acks=all produce) req/s", "baseline"),
        ("bare hyper 200 req/s", "bare_hyper"),
        ("plain rdkafka producer rec/s (acks=all)", "plain_producer"),
    ] {
        row(
            &mut md,
            label,
            &r4[key]["throughput_per_sec"],
            &r50[key]["throughput_per_sec"],
            "",
        );
    }
    row(
        &mut md,
        "receiver / min(bare, baseline, producer)",
        &r4["ratio_to_limit"],
        &r50["ratio_to_limit"],
        "≥ 0.8",
    );
    row(
        &mut md,
        "receiver CPU ms per acknowledged request",
        &r4["receiver"]["cpu_ms_per_req"],
        &r50["receiver"]["cpu_ms_per_req"],
        "",
    );
    row(
        &mut md,
        "baseline CPU ms per acknowledged request",
        &r4["baseline"]["cpu_ms_per_req"],
        &r50["baseline"]["cpu_ms_per_req"],
        "",
    );
    row(
        &mut md,
        "receiver CPU / baseline CPU (median of per-round ratios)",
        &r4["cpu_ratio_to_baseline"],
        &r50["cpu_ratio_to_baseline"],
        "≤ 1.3",
    );
    row(
        &mut md,
        "receiver p99 ms at max (wrk, closed loop)",
        &r4["receiver"]["p99_ms"],
        &r50["receiver"]["p99_ms"],
        "",
    );
    row(
        &mut md,
        "baseline p99 ms at max (wrk, closed loop)",
        &r4["baseline"]["p99_ms"],
        &r50["baseline"]["p99_ms"],
        "",
    );
    row(
        &mut md,
        "receiver p99 ms at half its max (open loop)",
        &r4["receiver_at_half_max"]["p99_ms"],
        &r50["receiver_at_half_max"]["p99_ms"],
        "< 25",
    );
    row(
        &mut md,
        "baseline p99 ms at the same rate (open loop)",
        &r4["baseline_at_half_max"]["p99_ms"],
        &r50["baseline_at_half_max"]["p99_ms"],
        "",
    );
    row(
        &mut md,
        "receiver CPU ms per request at half its max (open loop)",
        &r4["receiver_at_half_max"]["cpu_ms_per_req"],
        &r50["receiver_at_half_max"]["cpu_ms_per_req"],
        "",
    );
    row(
        &mut md,
        "baseline CPU ms per request at the same rate",
        &r4["baseline_at_half_max"]["cpu_ms_per_req"],
        &r50["baseline_at_half_max"]["cpu_ms_per_req"],
        "",
    );
    row(
        &mut md,
        "load generator CPU ms per request, receiver at half its max",
        &r4["receiver_at_half_max"]["generator_cpu_ms_per_req"],
        &r50["receiver_at_half_max"]["generator_cpu_ms_per_req"],
        "",
    );
    row(
        &mut md,
        "receiver RSS MB after the runs",
        &r4["receiver_rss_mb"],
        &r50["receiver_rss_mb"],
        "< 64",
    );
    row(
        &mut md,
        "receiver peak RSS MB (VmHWM)",
        &r4["receiver_peak_rss_mb"],
        &r50["receiver_peak_rss_mb"],
        "< 64",
    );
    row(
        &mut md,
        "receiver log bytes per request (stdout + stderr, `info`)",
        &r4["receiver_log_bytes_per_request"],
        &r50["receiver_log_bytes_per_request"],
        "",
    );
    if !r4["go_reference"].is_null() {
        let (g4, g50) = (&r4["go_reference"], &r50["go_reference"]);
        for (label, key) in [
            (
                "Go reference (net/http + franz-go, HMAC, encoding/json, no logging) req/s",
                "throughput_per_sec",
            ),
            (
                "receiver / Go reference req/s",
                "receiver_throughput_ratio_to_go",
            ),
            (
                "Go reference CPU ms per acknowledged request",
                "cpu_ms_per_req",
            ),
            (
                "receiver CPU / Go reference CPU (median of per-round ratios)",
                "receiver_cpu_ratio_to_go",
            ),
            ("Go reference p99 ms at max (wrk, closed loop)", "p99_ms"),
            ("Go reference peak RSS MB (VmHWM)", "peak_rss_mb"),
        ] {
            row(&mut md, label, &g4[key], &g50[key], "");
        }
        for (label, key) in [
            (
                "Go reference p99 ms at the receiver's half max (open loop)",
                "p99_ms",
            ),
            (
                "Go reference CPU ms per request at that rate",
                "cpu_ms_per_req",
            ),
        ] {
            row(
                &mut md,
                label,
                &r4["go_reference_at_half_max"][key],
                &r50["go_reference_at_half_max"][key],
                "",
            );
        }
    } else if let Some(why) = r4["go_reference_skipped"].as_str() {
        md.push_str(&format!("\nGo reference receiver not measured: {why}\n"));
    }
    if !r4["receiver_before"].is_null() {
        let (b4, b50) = (&r4["receiver_before"], &r50["receiver_before"]);
        row(
            &mut md,
            "before (`BENCH_RECEIVER_BEFORE_BIN`) acknowledged req/s",
            &b4["throughput_per_sec"],
            &b50["throughput_per_sec"],
            "",
        );
        row(
            &mut md,
            "before / min(bare, baseline)",
            &b4["ratio_to_limit"],
            &b50["ratio_to_limit"],
            "",
        );
        row(
            &mut md,
            "before CPU ms per acknowledged request",
            &b4["cpu_ms_per_req"],
            &b50["cpu_ms_per_req"],
            "",
        );
        row(
            &mut md,
            "before CPU / baseline CPU",
            &b4["cpu_ratio_to_baseline"],
            &b50["cpu_ratio_to_baseline"],
            "",
        );
        row(
            &mut md,
            "before p99 ms at the receiver's half max (open loop)",
            &r4["receiver_before_at_half_max"]["p99_ms"],
            &r50["receiver_before_at_half_max"]["p99_ms"],
            "",
        );
        row(
            &mut md,
            "before peak RSS MB",
            &b4["peak_rss_mb"],
            &b50["peak_rss_mb"],
            "",
        );
    }
    md
}
