//! The end-to-end figure for `carhook-bench`: latency from the receiver's 200 to the state being
//! visible in the store, at half the maximum rate the whole pipeline sustains on this machine.
//!
//! How it is measured, so the figure is the shipped pipeline's and steady from run to run:
//! - the receiver and the processor run as shipped: the release binaries, each its own OS process
//!   with production logging, so neither shares a runtime or an allocator with the load generator;
//! - the maximum is measured over a fixed window (`MAX_WINDOW`) whatever the probe phase's length:
//!   the flood builds a backlog, and the longer it runs the slower the store gets under it;
//! - probes are events for vehicles never seen before, sent open loop at `PROBES_PER_SEC` (part of
//!   the rate, not on top of it) after `WARM_UP` of load; one poller asks the store for every
//!   outstanding probe at once every 2 ms, so a 30 s phase gives about 1,500 samples and its p99
//!   is not a handful of probes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shared::config::Settings;

use super::processor::{release_bin, start_processor, Child};
use crate::sim::load::{self, LoadSpec, Mode};
use crate::{
    child_env, drop_keyspace, free_port, get, metric_value, post, settings, sign, state_event,
    TOKEN,
};

/// The window over which the sustained maximum is measured.
const MAX_WINDOW: Duration = Duration::from_secs(20);
/// Load before the probes start: the first records after the services start wait for start-up
/// work (first fetches, the first conditional writes on new tables), up to half a second here;
/// that is start-up, not the steady latency this figure is about.
const WARM_UP: Duration = Duration::from_secs(5);
/// Probes per second, taken out of the load rate.
const PROBES_PER_SEC: u32 = 50;
/// A probe not visible after this long counts as this long (and the run reports it as lost).
const PROBE_GIVE_UP: Duration = Duration::from_secs(30);
/// At most this many probes per store query.
const PROBES_PER_QUERY: usize = 100;

/// Starts the release receiver (`BENCH_RECEIVER_BIN` overrides it) as its own process with the
/// same settings as the processor; returns it with its webhook address once `/ready` says 200.
async fn start_receiver(s: &Settings, log: &std::path::Path) -> (Child, SocketAddr) {
    let listen = free_port();
    let admin = free_port();
    let mut env = child_env(s, free_port(), "bench-receiver");
    env.push(("CARHOOK__RECEIVER__LISTEN".into(), listen.to_string()));
    env.push(("CARHOOK__RECEIVER__ADMIN_LISTEN".into(), admin.to_string()));
    let bin = release_bin("receiver", "BENCH_RECEIVER_BIN");
    (Child::start(&bin, &[], env, admin, log).await, listen)
}

/// Both services, as shipped (the state changelog off; the test harness turns it on).
async fn pipeline(s: &Settings, name: &str) -> (Child, Child, SocketAddr) {
    let dir = std::env::temp_dir();
    let p = start_processor(
        s,
        "bench-e2e",
        &dir.join(format!("carhook-bench-{name}-processor.log")),
    )
    .await;
    let (r, addr) =
        start_receiver(s, &dir.join(format!("carhook-bench-{name}-receiver.log"))).await;
    (p, r, addr)
}

const APPLIED: &str = r#"carhook_processor_events_total{outcome="applied"}"#;

/// The most events per second the whole pipeline sustains on this machine: receiver, processor,
/// broker, store and the signing load generator together. 32 closed-loop senders post 4 KB bodies
/// for `MAX_WINDOW`; the figure is the smaller of what the receiver accepted and what the processor
/// applied per second over the same window (a processor falling behind does not count as
/// sustained).
pub async fn end_to_end_max() -> Value {
    let mut s = settings(&[]);
    s.processor.changelog = false;
    let (p, r, addr) = pipeline(&s, "e2e-max").await;
    let before = metric_value(p.admin, APPLIED).await;
    let started = Instant::now();
    let report = load::run(
        LoadSpec {
            addr,
            path: s.receiver.path.clone(),
            token: TOKEN.to_string(),
            mode: Mode::Concurrency(32),
            duration: MAX_WINDOW,
            body_bytes: 4096,
            max_inflight: 4096,
        },
        None,
    )
    .await;
    let window = started.elapsed().as_secs_f64();
    let applied_per_sec = (metric_value(p.admin, APPLIED).await - before) / window;
    let accepted = report.statuses.get("200").copied().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    let accepted_per_sec = accepted as f64 / window;
    drop((r, p));
    drop_keyspace(&s).await;
    json!({"window_secs": MAX_WINDOW.as_secs(), "accepted_per_sec": accepted_per_sec,
        "applied_per_sec": applied_per_sec, "max_per_sec": accepted_per_sec.min(applied_per_sec)})
}

/// Probes acknowledged by the receiver and not yet seen in the store, by vehicle: when acked.
type Outstanding = Arc<Mutex<HashMap<String, Instant>>>;

/// Latency from 200 to visible at `rate` events/s in all (load plus probes), probed for
/// `duration` after `WARM_UP`.
pub async fn end_to_end(rate: u32, duration: Duration) -> Value {
    let mut s = settings(&[]);
    s.processor.changelog = false;
    let (p, r, addr) = pipeline(&s, "e2e").await;
    let store = visibility(&s).await;
    let background = rate.saturating_sub(PROBES_PER_SEC).max(1);
    let bg = tokio::spawn(load::run(
        LoadSpec {
            addr,
            path: s.receiver.path.clone(),
            token: TOKEN.to_string(),
            mode: Mode::Rate(background),
            duration: WARM_UP + duration,
            body_bytes: 4096,
            max_inflight: 4096,
        },
        None,
    ));
    tokio::time::sleep(WARM_UP).await;
    let outstanding: Outstanding = Arc::default();
    let sending = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicU64::new(0));
    let sender = tokio::spawn(send_probes(
        addr,
        s.receiver.path.clone(),
        duration,
        outstanding.clone(),
        sending.clone(),
        refused.clone(),
    ));
    let (hist, lost, slowest) = poll_probes(&store, &outstanding, &sending).await;
    let _ = sender.await;
    let bg = bg.await.ok();
    // Where the time goes, from the processor's own histograms over the whole run (every event,
    // not only the probes): processing (claim + writes) and each transaction's commit.
    let (_, text) = get(p.admin, "/metrics").await;
    let q = |name: &str, q: f64| histogram_quantile(&text, name, q).map(|s| s * 1000.0);
    let inside = json!({
        "processing_p50_ms": q("carhook_processor_processing_duration_seconds", 0.5),
        "processing_p99_ms": q("carhook_processor_processing_duration_seconds", 0.99),
        "transaction_p50_ms": q("carhook_processor_transaction_duration_seconds", 0.5),
        "transaction_p99_ms": q("carhook_processor_transaction_duration_seconds", 0.99),
        "received_to_committed_p50_ms": q("carhook_processor_event_freshness_seconds", 0.5),
        "received_to_committed_p99_ms": q("carhook_processor_event_freshness_seconds", 0.99),
    });
    drop((r, p));
    drop_keyspace(&s).await;
    let ms = |us: u64| us as f64 / 1000.0;
    json!({"load_rate_per_sec": rate, "probes_per_sec": PROBES_PER_SEC,
        "achieved_per_sec": bg.map(|b| b.throughput_per_sec), "samples": hist.len(),
        "refused": refused.load(Ordering::Relaxed), "lost": lost,
        "p50_ms": ms(hist.value_at_quantile(0.5)), "p99_ms": ms(hist.value_at_quantile(0.99)),
        "max_ms": ms(hist.max()), "slowest": slowest, "processor": inside})
}

/// Sends one probe every `1 / PROBES_PER_SEC` s for `duration`, each on its own task (open loop:
/// a slow answer does not delay the next probe); an acknowledged probe joins `outstanding`.
async fn send_probes(
    addr: SocketAddr,
    path: String,
    duration: Duration,
    outstanding: Outstanding,
    sending: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(PROBES_PER_SEC)));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        let vehicle = format!("e2e-probe-{i}");
        let body = state_event(
            &format!("e2e-{i}"),
            &vehicle,
            &[(
                "charge-ischarging",
                json!({"value": true}),
                1_764_000_000_000,
            )],
        );
        let (path, outstanding, refused) = (path.clone(), outstanding.clone(), refused.clone());
        tasks.push(tokio::spawn(async move {
            let sig = sign(TOKEN, &body);
            let reply = post(addr, &path, body, Some(&sig)).await;
            if reply.status == 200 {
                let acked = Instant::now();
                outstanding
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(vehicle, acked);
            } else {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }));
        i += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    sending.store(false, Ordering::Release);
}

/// The store session and the query that tells which probes are visible.
type Visibility = (
    scylla::client::session::Session,
    scylla::statement::prepared::PreparedStatement,
);

/// Connects to the store and prepares the visibility query (before any probe is sent: set-up is
/// not latency).
async fn visibility(s: &Settings) -> Visibility {
    let session = shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let query = session
        .prepare(format!(
            "SELECT vehicle_id FROM {}.signal_state WHERE vehicle_id IN ? PER PARTITION LIMIT 1",
            s.cql.keyspace
        ))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (session, query)
}

/// Polls the store every 2 ms for the outstanding probes until the sender is done and none is
/// left; returns the latency histogram (µs), how many probes were given up on, and the slowest
/// probes (as many as lie beyond the p99) with the wall-clock time of their 200, to line them up
/// with the services' and the stack's logs (`.stack/logs/*-gc.log`).
async fn poll_probes(
    (session, query): &Visibility,
    outstanding: &Outstanding,
    sending: &AtomicBool,
) -> (hdrhistogram::Histogram<u64>, u64, Vec<Value>) {
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap_or_else(|e| panic!("{e}"));
    // (latency, when acknowledged) of every probe.
    let mut seen_all: Vec<(Duration, Instant)> = Vec::new();
    let mut lost = 0;
    let lock = || {
        outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let record = |hist: &mut hdrhistogram::Histogram<u64>, d: Duration| {
        let _ = hist.record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
    };
    loop {
        // Read before the map: once the sender is done, an empty map means every probe is in.
        let done_sending = !sending.load(Ordering::Acquire);
        let keys: Vec<String> = lock().keys().take(PROBES_PER_QUERY).cloned().collect();
        if keys.is_empty() {
            if done_sending {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        let seen: Vec<String> = session
            .execute_unpaged(query, (keys,))
            .await
            .ok()
            .and_then(|r| r.into_rows_result().ok())
            .and_then(|r| {
                r.rows::<(String,)>()
                    .ok()
                    .map(|rows| rows.filter_map(Result::ok).map(|(v,)| v).collect())
            })
            .unwrap_or_default();
        let now = Instant::now();
        {
            let mut map = lock();
            for v in seen {
                if let Some(acked) = map.remove(&v) {
                    record(&mut hist, now - acked);
                    seen_all.push((now - acked, acked));
                }
            }
            map.retain(|_, acked| {
                let late = now - *acked > PROBE_GIVE_UP;
                if late {
                    lost += 1;
                    record(&mut hist, PROBE_GIVE_UP);
                }
                !late
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    seen_all.sort_by_key(|s| std::cmp::Reverse(s.0));
    let (wall, mono) = (std::time::SystemTime::now(), Instant::now());
    let slowest = seen_all
        .iter()
        .take(seen_all.len() / 100)
        .map(|(took, acked)| {
            let at = time::OffsetDateTime::from(wall - (mono - *acked));
            json!({"acked_at": format!("{:02}:{:02}:{:02}.{:03}", at.hour(), at.minute(), at.second(), at.millisecond()),
                "ms": took.as_secs_f64() * 1000.0})
        })
        .collect();
    (hist, lost, slowest)
}

/// The `q` quantile of a Prometheus histogram in exposition `text`, as `histogram_quantile` computes
/// it: linear within the bucket that holds it (the upper bound of the last finite bucket beyond).
fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let width = count - below;
            return Some(if width > 0.0 {
                lower + (le - lower) * (rank - below) / width
            } else {
                le
            });
        }
        (lower, below) = (le, count);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::histogram_quantile;

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let text = "x_bucket{le=\"0.1\"} 50\nx_bucket{le=\"0.2\"} 90\nx_bucket{le=\"+Inf\"} 100\nx_sum 12\nx_count 100\n";
        assert_eq!(histogram_quantile(text, "x", 0.5), Some(0.1));
        let p70 = histogram_quantile(text, "x", 0.7).unwrap_or_default();
        assert!((p70 - 0.15).abs() < 1e-9, "{p70}");
        assert_eq!(
            histogram_quantile(text, "x", 0.99),
            Some(0.2),
            "beyond the last bound"
        );
        assert_eq!(histogram_quantile("x_count 0\n", "x", 0.5), None);
    }
}
