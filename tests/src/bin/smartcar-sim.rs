//! `smartcar-sim`: send realistic signed Smartcar traffic, check the system against ground truth,
//! perform the VERIFY handshake, and drive load. Reads the same `CARHOOK__*` configuration as the
//! services for `check` (CQL store, topics).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use carhook_tests::sim::{self, generate::Faults, load::Mode, target::Target};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Realistic Smartcar webhook traffic with ground truth"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate and deliver events; write the run (with ground truth) for `check`.
    Send(Box<SendArgs>),
    /// Compare the system with a run's ground truth; non-zero exit on any difference.
    Check {
        #[arg(long, default_value = ".stack/sim/last-run.json")]
        run: PathBuf,
        /// Keep re-checking until this deadline (processing is asynchronous).
        #[arg(long, default_value = "60s", value_parser = humantime_secs)]
        wait: Duration,
        /// Events the campaign intends to be dropped (never acknowledged after every attempt);
        /// any other number of unacknowledged events fails the check.
        #[arg(long, default_value_t = 0)]
        expect_dropped: usize,
    },
    /// Perform the VERIFY handshake like Smartcar's dashboard.
    Verify {
        /// Webhook URL, `http://` or `https://`.
        url: String,
        /// PEM CA bundle to trust for an `https://` URL, besides the system's roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        #[arg(
            long,
            env = "SMARTCAR_SIM_TOKEN",
            default_value = "carhook-dev-token-NOT-FOR-PRODUCTION"
        )]
        token: String,
        /// Also sign the VERIFY body (it is not documented whether Smartcar does).
        #[arg(long)]
        signed: bool,
    },
    /// Serve a fake Smartcar V3 REST API (token, signals, connections) until Ctrl-C: vehicles
    /// `car-0…` of user `u1`, each with an odometer and a battery reading. `--fault` makes it
    /// misbehave so the poller can be exercised by hand.
    Api {
        /// Inject a fault into signals requests (repeatable): KIND[=ARG][:COUNT|@RATE], KIND one
        /// of 401, 429-vehicle[=RETRY_AFTER_SECS], 429-app[=RETRY_AFTER_SECS], 430,
        /// 5xx[=STATUS], slow[=DURATION], signal-error[=CODE], not-json, wrong-shape, 404;
        /// `:COUNT` the next COUNT requests (default 1), `@RATE` that share of all requests.
        /// E.g. `--fault 5xx:2 --fault 429-vehicle=60@0.1 --fault slow=40s:1`.
        #[arg(long = "fault", value_name = "SPEC")]
        faults: Vec<sim::api::FaultSpec>,
        /// Signals per page (the rest via `links.next`); default: all in one page.
        #[arg(long)]
        page_size: Option<usize>,
        #[arg(long, default_value = "127.0.0.1:8099")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 10)]
        vehicles: usize,
        #[arg(long, default_value = "client_carhook-dev")]
        client_id: String,
        /// The client secret the token endpoint accepts.
        #[arg(
            long,
            env = "SMARTCAR_SIM_CLIENT_SECRET",
            default_value = "carhook-dev-secret-NOT-FOR-PRODUCTION"
        )]
        client_secret: String,
        /// Lifetime of minted tokens.
        #[arg(long, default_value_t = 3600)]
        token_life_secs: u64,
    },
    /// Fixed-rate or fixed-concurrency load for a duration.
    Load {
        #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/smartcar")]
        url: String,
        #[arg(
            long,
            env = "SMARTCAR_SIM_TOKEN",
            default_value = "carhook-dev-token-NOT-FOR-PRODUCTION"
        )]
        token: String,
        #[arg(long, conflicts_with = "concurrency")]
        rate: Option<u32>,
        #[arg(long)]
        concurrency: Option<usize>,
        #[arg(long, default_value = "10s", value_parser = humantime_secs)]
        duration: Duration,
        /// Body size in bytes (4 KB typical, 50 KB maximum).
        #[arg(long, default_value_t = 4096)]
        body_bytes: usize,
        #[arg(long, default_value_t = 2048)]
        max_inflight: usize,
        /// Also write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct SendArgs {
    /// Webhook URL, `http://` or `https://`.
    #[arg(long, default_value = "http://127.0.0.1:8080/webhooks/smartcar")]
    url: String,
    /// PEM CA bundle to trust for an `https://` URL, besides the system's roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Management token to sign with.
    #[arg(
        long,
        env = "SMARTCAR_SIM_TOKEN",
        default_value = "carhook-dev-token-NOT-FOR-PRODUCTION"
    )]
    token: String,
    #[arg(long, default_value_t = 20)]
    vehicles: usize,
    #[arg(long, default_value_t = 25)]
    events_per_vehicle: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Multiply Smartcar's 25/50/100 s retry schedule (e.g. 0.01 for tests).
    #[arg(long, default_value_t = 1.0)]
    retry_scale: f64,
    /// Turn every fault mix on at its default ratio.
    #[arg(long)]
    all_faults: bool,
    #[arg(long)]
    duplicates: Option<f64>,
    #[arg(long)]
    out_of_order: Option<f64>,
    #[arg(long)]
    invalid_signatures: Option<f64>,
    #[arg(long)]
    partial_failures: Option<f64>,
    #[arg(long)]
    large_bodies: Option<f64>,
    #[arg(long)]
    missing_optional: Option<f64>,
    #[arg(long)]
    unknown_types: Option<f64>,
    #[arg(long)]
    errors: Option<f64>,
    /// Share of values whose car clock lags delivery by 1–90 s.
    #[arg(long)]
    clock_lag: Option<f64>,
    /// Share of events whose retries carry a refreshed `deliveredAt` (Smartcar: all).
    #[arg(long)]
    retry_refresh: Option<f64>,
    /// Share of duplicates sent concurrently with the first delivery.
    #[arg(long)]
    concurrent_duplicates: Option<f64>,
    /// Share of top-level triggers naming their signal as a "Group.Name" string.
    #[arg(long)]
    string_triggers: Option<f64>,
    /// Share of VEHICLE_ERROR events listing signals as "Group.Name" strings.
    #[arg(long)]
    string_error_signals: Option<f64>,
    /// Share of values sent with `oemUpdatedAt: 0`.
    #[arg(long)]
    zero_time: Option<f64>,
    /// Share of events with `deliveredAt` in epoch seconds or ISO-8601.
    #[arg(long)]
    delivered_formats: Option<f64>,
    /// Share of VEHICLE_ERROR events with several items.
    #[arg(long)]
    multi_errors: Option<f64>,
    /// Share of legacy v2 bodies (eventBased, dynamic, scheduled in turn).
    #[arg(long)]
    legacy: Option<f64>,
    /// Share of VERIFY challenges (current and legacy form in turn).
    #[arg(long)]
    verify: Option<f64>,
    /// Where to write the run.
    #[arg(long, default_value = ".stack/sim/last-run.json")]
    out: PathBuf,
}

/// A duration as humantime writes it (`30s`, `2m`, `500ms`, `1h 30m`); a bare number is seconds.
fn humantime_secs(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Some(secs) = s.parse::<f64>().ok().filter(|n| n.is_finite() && *n >= 0.0) {
        return Ok(Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30s, 2m, 500ms)"))
}

fn split_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| {
            format!("{url}: load takes only http:// URLs (it measures a receiver directly; send and verify take https://)")
        })?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr = host
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    Ok((addr, path))
}

fn bar(len: u64, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(len);
        if let Ok(s) = indicatif::ProgressStyle::with_template(&format!(
            "{what} [{{bar:40}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}}"
        )) {
            b.set_style(s.progress_chars("=> "));
        }
        b
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("smartcar-sim: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<ExitCode, String> {
    match args.command {
        Command::Api {
            faults,
            page_size,
            listen,
            vehicles,
            client_id,
            client_secret,
            token_life_secs,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| format!("--listen {listen}: {e}"))?;
            let api = sim::api::FakeApi::serve(
                listener,
                listen,
                &client_id,
                &client_secret,
                token_life_secs,
            );
            let now = shared::clock::EpochMillis::now().as_i64();
            for i in 0..vehicles {
                api.set_vehicle(
                    &format!("car-{i}"),
                    sim::truth::ApiVehicle::new(
                        "u1",
                        &[
                            (
                                "odometer-traveleddistance",
                                serde_json::json!({"unit": "km", "value": 1000 + i}),
                                now - 60_000,
                            ),
                            (
                                "tractionbattery-stateofcharge",
                                serde_json::json!({"unit": "percent", "value": 50 + i % 50}),
                                now - 60_000,
                            ),
                        ],
                    ),
                );
            }
            if let Some(n) = page_size {
                api.set_page_size(n);
            }
            for f in &faults {
                api.inject(f);
            }
            eprintln!(
                "fake Smartcar API: token URL {}, vehicle API URL {} ({vehicles} vehicles of user u1)",
                api.token_url(),
                api.vehicle_api_url()
            );
            for f in &faults {
                eprintln!("  fault: {:?}, {:?}", f.fault, f.amount);
            }
            let _ = tokio::signal::ctrl_c().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Send(send) => {
            let SendArgs {
                url,
                token,
                vehicles,
                events_per_vehicle,
                seed,
                concurrency,
                retry_scale,
                all_faults,
                duplicates,
                out_of_order,
                invalid_signatures,
                partial_failures,
                large_bodies,
                missing_optional,
                unknown_types,
                errors,
                clock_lag,
                retry_refresh,
                concurrent_duplicates,
                string_triggers,
                string_error_signals,
                zero_time,
                delivered_formats,
                multi_errors,
                legacy,
                verify,
                out,
                ca_file,
            } = *send;
            let target = Target::new(&url, ca_file.as_deref())?;
            let mut f = if all_faults {
                Faults::all()
            } else {
                Faults::default()
            };
            for (flag, slot, v) in [
                ("--duplicates", &mut f.duplicates, duplicates),
                ("--out-of-order", &mut f.out_of_order, out_of_order),
                (
                    "--invalid-signatures",
                    &mut f.invalid_signatures,
                    invalid_signatures,
                ),
                (
                    "--partial-failures",
                    &mut f.partial_failures,
                    partial_failures,
                ),
                ("--large-bodies", &mut f.large_bodies, large_bodies),
                (
                    "--missing-optional",
                    &mut f.missing_optional,
                    missing_optional,
                ),
                ("--unknown-types", &mut f.unknown_types, unknown_types),
                ("--errors", &mut f.errors, errors),
                ("--clock-lag", &mut f.clock_lag, clock_lag),
                ("--retry-refresh", &mut f.retry_refresh, retry_refresh),
                (
                    "--concurrent-duplicates",
                    &mut f.concurrent_duplicates,
                    concurrent_duplicates,
                ),
                ("--string-triggers", &mut f.string_triggers, string_triggers),
                (
                    "--string-error-signals",
                    &mut f.string_error_signals,
                    string_error_signals,
                ),
                ("--zero-time", &mut f.zero_time, zero_time),
                (
                    "--delivered-formats",
                    &mut f.delivered_formats,
                    delivered_formats,
                ),
                ("--multi-errors", &mut f.multi_errors, multi_errors),
                ("--legacy", &mut f.legacy, legacy),
                ("--verify", &mut f.verify, verify),
            ] {
                if let Some(v) = v {
                    if !(0.0..=1.0).contains(&v) {
                        return Err(format!("{flag}: a share between 0 and 1, got {v}"));
                    }
                    *slot = v;
                }
            }
            let events = sim::generate::generate(seed, vehicles, events_per_vehicle, f);
            let started = Instant::now();
            let (deliveries, report) = sim::send::send_to(
                &target,
                &token,
                &events,
                concurrency,
                retry_scale,
                bar(events.len() as u64, "send"),
            )
            .await;
            let run = sim::Run::new(seed, f, &events, deliveries, report);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            }
            std::fs::write(&out, serde_json::to_vec(&run).unwrap_or_default())
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&run.report).unwrap_or_default()
            );
            println!(
                "sent {} events in {:.1} s; run written to {}",
                events.len(),
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            run,
            wait,
            expect_dropped,
        } => {
            let raw = std::fs::read(&run).map_err(|e| format!("{}: {e}", run.display()))?;
            let run: sim::Run =
                serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", run.display()))?;
            let settings = shared::config::Settings::load(None).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + wait;
            loop {
                let diff =
                    sim::check::diff(&settings, &run.truth, &run.deliveries, expect_dropped).await;
                if diff.is_empty() {
                    println!(
                        "check passed: {} vehicles, {} actions, {} rejected deliveries, {} VERIFY answered, {} dropped events",
                        run.truth.vehicles.len(),
                        run.truth.actions.len(),
                        run.truth.rejected.len(),
                        run.truth.verifies.len(),
                        run.truth.dropped.len()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                if Instant::now() >= deadline {
                    println!("check FAILED: {} difference(s)", diff.len());
                    for d in diff.iter().take(200) {
                        println!("  - {d}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Command::Verify {
            url,
            ca_file,
            token,
            signed,
        } => {
            let target = Target::new(&url, ca_file.as_deref())?;
            let challenge = format!("sim-{}", std::process::id());
            let body = serde_json::to_vec(&serde_json::json!({"eventId": format!("verify-{challenge}"), "eventType": "VERIFY",
                "data": {"challenge": challenge}, "meta": {"version": "4.0", "deliveryId": "sim", "deliveredAt": 1_764_000_000_000_i64}}))
            .unwrap_or_default();
            let expected = sim::hmac::sign_hex(token.as_bytes(), challenge.as_bytes());
            let sig = signed.then(|| sim::hmac::sign_hex(token.as_bytes(), &body));
            // A refused or cut connection is an answer for the operator, not a panic.
            let (status, reply) = target
                .exchange_or_cause(body, sig.as_deref())
                .await
                .map_err(|cause| format!("{url}: no answer ({cause})"))?;
            let answer: serde_json::Value = serde_json::from_slice(&reply).unwrap_or_default();
            if status == 200 && answer["challenge"] == expected.as_str() {
                println!("VERIFY passed: {url} answered the challenge correctly");
                Ok(ExitCode::SUCCESS)
            } else {
                println!(
                    "VERIFY FAILED: status {status}, body {}",
                    String::from_utf8_lossy(&reply)
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Load {
            url,
            token,
            rate,
            concurrency,
            duration,
            body_bytes,
            max_inflight,
            json,
        } => {
            let (addr, path) = split_url(&url)?;
            let mode = match (rate, concurrency) {
                (Some(r), _) => Mode::Rate(r),
                (None, Some(c)) => Mode::Concurrency(c),
                (None, None) => Mode::Concurrency(64),
            };
            let spec = sim::load::LoadSpec {
                addr,
                path,
                token,
                mode,
                duration,
                body_bytes,
                max_inflight,
            };
            let report = sim::load::run(spec, bar(duration.as_secs().max(1), "load")).await;
            println!("{}", report.table());
            let text = serde_json::to_string_pretty(&report).unwrap_or_default();
            if let Some(p) = json {
                std::fs::write(&p, &text).map_err(|e| format!("{}: {e}", p.display()))?;
            } else {
                println!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
