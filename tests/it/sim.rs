//! End-to-end correctness: a seeded smartcar-sim round with every fault mix on, through the real
//! receiver and processor, compared with the simulator's ground truth.

use std::time::{Duration, Instant};

use carhook_tests::sim::{self, generate::Faults};
use carhook_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulated_traffic_with_every_fault_matches_ground_truth() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let faults = Faults::all();
    let events = sim::generate::generate(20_251_129, 12, 20, faults);
    let kinds: std::collections::BTreeSet<String> = events
        .iter()
        .filter_map(|e| e.bad_signature_kind.map(|k| format!("{k:?}")))
        .collect();
    assert_eq!(
        kinds.len(),
        5,
        "every bad-signature variant is in the seeded mix: {kinds:?}"
    );
    assert!(
        events.iter().any(|e| e.concurrent_duplicate)
            && events.iter().any(|e| matches!(&e.kind, sim::generate::SimKind::State(s) if s.iter().any(|x| x.body.is_some() && x.oem < e.t))),
        "concurrent duplicates and lagging car clocks are in the seeded mix"
    );
    let (deliveries, report) =
        sim::send::send_all(r.addr, &s.receiver.path, TOKEN, &events, 16, 0.002, None).await;
    assert_eq!(report.dropped_after_4_attempts, 0, "{report:?}");
    assert!(
        report.unauthorized_401 > 0 && report.duplicates_sent > 0,
        "faults were exercised: {report:?}"
    );
    let run = sim::Run::new(1, faults, &events, deliveries, report);
    assert!(!run.truth.actions.is_empty() && !run.truth.rejected.is_empty());
    assert!(
        !run.truth.verifies.is_empty()
            && run.truth.vehicles.values().any(|v| {
                v.signals.contains_key("v2-odometer") && v.signals.contains_key("v2-battery")
            }),
        "VERIFY challenges and legacy readings are in the truth"
    );
    assert!(
        run.deliveries
            .iter()
            .filter(|d| d.acked_sha256.is_some())
            .count()
            > 200,
        "the acknowledged bytes are known, so the events topic is compared"
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
        if diff.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "system differs from ground truth:\n{}",
            diff.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}

/// A stand-in for a broken deployment: answers every request 503 + `Retry-After`.
async fn always_503() -> std::net::SocketAddr {
    stub(b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await
}

/// A stand-in for a receiver that acknowledges without persisting: 200 to everything.
async fn always_200() -> std::net::SocketAddr {
    stub(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await
}

/// Answers every request, once read in full, with `answer`.
async fn stub(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                // Read the whole request (headers, then Content-Length bytes) before answering.
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Ok(n) = c.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text[..end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = c.write_all(answer).await;
            });
        }
    });
    addr
}

fn clean_events(seed: u64) -> Vec<sim::generate::SimEvent> {
    sim::generate::generate(seed, 3, 4, Faults::default())
}

/// `check` can fail: a receiver that never acknowledges anything must not pass (before, events
/// never acknowledged were simply left out of the truth and the check passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_the_receiver_answers_503_to_everything() {
    let s = settings(&[]);
    let addr = always_503().await;
    let events = clean_events(7);
    let (deliveries, report) =
        sim::send::send_all(addr, &s.receiver.path, TOKEN, &events, 4, 0.0001, None).await;
    assert_eq!(report.dropped_after_4_attempts, events.len(), "{report:?}");
    let run = sim::Run::new(7, Faults::default(), &events, deliveries, report);
    let diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
    assert!(
        diff.iter().any(|d| d.contains("never acknowledged")),
        "check passed a receiver that acknowledged nothing: {diff:?}"
    );
    // A campaign that intends the drops says so, and only then is the count accepted.
    let intended = sim::check::diff(&s, &run.truth, &run.deliveries, events.len()).await;
    assert!(
        !intended.iter().any(|d| d.contains("never acknowledged")),
        "{intended:?}"
    );
}

/// `check` can fail: a receiver that answers 200 without persisting anything. (The state check
/// would name it too; the bytes check names the cause: acknowledged bytes not on the topic.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_the_receiver_acknowledges_without_persisting() {
    let s = settings(&[]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = always_200().await;
    let events = clean_events(10);
    let (deliveries, report) =
        sim::send::send_all(addr, &s.receiver.path, TOKEN, &events, 4, 0.0001, None).await;
    assert_eq!(report.ok_2xx, events.len(), "{report:?}");
    let run = sim::Run::new(10, Faults::default(), &events, deliveries, report);
    let diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
    let unpersisted = diff
        .iter()
        .filter(|d| d.contains("acknowledged, but its bytes are not on the events topic"))
        .count();
    assert!(
        unpersisted >= events.len().min(10),
        "check missed acknowledged events that were never persisted: {diff:?}"
    );
}

/// `check` can fail: events acknowledged by the receiver but never applied (no processor).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_no_processor_applied_the_events() {
    let s = settings(&[]);
    carhook_processor::migrate(&s)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let r = spawn_receiver(&s).await;
    let events = clean_events(8);
    let (deliveries, report) =
        sim::send::send_all(r.addr, &s.receiver.path, TOKEN, &events, 4, 0.0001, None).await;
    assert_eq!(report.dropped_after_4_attempts, 0, "{report:?}");
    let run = sim::Run::new(8, Faults::default(), &events, deliveries, report);
    let diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
    assert!(
        diff.iter().any(|d| d.contains("no state in the store")),
        "check passed although nothing was applied: {diff:?}"
    );
    r.stop().await;
    drop_keyspace(&s).await;
}

/// `check` judges only its own run (foreign records on the topics pass), and can fail: a store row
/// changed by hand after a correct run is named as a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_when_a_store_row_is_changed_by_hand() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let events = clean_events(9);
    let (deliveries, report) =
        sim::send::send_all(r.addr, &s.receiver.path, TOKEN, &events, 4, 0.0001, None).await;
    let run = sim::Run::new(9, Faults::default(), &events, deliveries, report);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
        if diff.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "correct run never matched: {diff:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Other traffic on the same deployment (another vehicle's action and dead letter) is not this
    // run's to judge: the check still passes.
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.actions_topic,
        &[(
            Some("someone-elses-car"),
            br#"{"type":"RECONNECT_REQUIRED"}"#.as_slice(),
        )],
    )
    .await;
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.dlq_topic,
        &[(Some("someone-elses-car"), b"{not json".as_slice())],
    )
    .await;
    let foreign = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
    assert!(foreign.is_empty(), "foreign records judged: {foreign:?}");
    // Bytes keyed by one of this run's vehicles that were never sent (a re-serialised copy of a
    // real delivery) are named.
    let some = &events[0];
    let reserialised = serde_json::to_vec_pretty(
        &serde_json::from_slice::<serde_json::Value>(&sim::generate::body(some, 0))
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(some.vehicle.as_str()), reserialised.as_slice())],
    )
    .await;
    let diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
    assert!(
        diff.iter()
            .any(|d| d.contains("bytes differ from every delivery sent")
                && d.contains(some.vehicle.as_str())),
        "check missed bytes on the events topic that were never sent: {diff:?}"
    );
    let (vehicle, truth) = run
        .truth
        .vehicles
        .iter()
        .find(|(_, v)| v.signals.values().any(|s| s.body.is_some()))
        .unwrap_or_else(|| panic!("no vehicle with a value"));
    let code = truth
        .signals
        .iter()
        .find(|(_, s)| s.body.is_some())
        .map(|(c, _)| c.clone())
        .unwrap_or_default();
    let session = shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    session
        .query_unpaged(
            format!(
                "UPDATE {}.signal_state USING TIMESTAMP 9999999999999999 SET value = ? WHERE vehicle_id = ? AND code = ?",
                s.cql.keyspace
            ),
            (r#"{"body":{"value":-1},"eventId":"tampered"}"#, vehicle, &code),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
    assert!(
        diff.iter()
            .any(|d| d.contains(vehicle.as_str()) && d.contains(&code)),
        "check missed a value changed by hand: {diff:?}"
    );
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}

/// `smartcar-sim` against an address where nothing listens: a clear error and exit 2, never a
/// panic (before, `verify` panicked in the HTTP helper with "http: client error (Connect)").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smartcar_sim_answers_a_refused_connection_with_an_error_not_a_panic() {
    let closed = free_port();
    let url = format!("http://{closed}/webhooks/smartcar");
    let out = std::process::Command::new(workspace_bin("smartcar-sim"))
        .args(["verify", &url])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no answer") && stderr.contains(&closed.to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A TLS terminator in front of `to`, with the stack's node certificate (it names 127.0.0.1 and
/// is signed by the stack's CA): what a load balancer in front of the receiver looks like.
async fn tls_proxy(to: std::net::SocketAddr) -> std::net::SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = stack_dir().join("tls");
    let certs = CertificateDer::pem_file_iter(tls.join("node.pem"))
        .and_then(|c| c.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| panic!("node.pem: {e}"));
    let key = PrivateKeyDer::from_pem_file(tls.join("node.key"))
        .unwrap_or_else(|e| panic!("node.key: {e}"));
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    addr
}

/// `smartcar-sim` speaks https: through a TLS terminator in front of the real receiver, VERIFY
/// and a small send round pass when the CA is given, and an unknown CA is a clear error (exit
/// 2), not a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smartcar_sim_delivers_over_https_with_a_private_ca() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let proxy = tls_proxy(r.addr).await;
    let url = format!("https://127.0.0.1:{}{}", proxy.port(), s.receiver.path);
    let ca = stack_dir().join("tls/ca.pem");
    let sim = |args: &[&str]| {
        std::process::Command::new(workspace_bin("smartcar-sim"))
            .args(args)
            .env("SMARTCAR_SIM_TOKEN", TOKEN)
            .output()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let ca_arg = ca.to_string_lossy().into_owned();
    let ok = sim(&["verify", &url, "--ca-file", &ca_arg]);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("VERIFY passed"), "{}", text(&ok));

    let out = std::env::temp_dir().join(format!("{}.sim-https.json", s.cql.keyspace));
    let out_arg = out.to_string_lossy().into_owned();
    let sent = sim(&[
        "send",
        "--url",
        &url,
        "--ca-file",
        &ca_arg,
        "--vehicles",
        "2",
        "--events-per-vehicle",
        "3",
        "--retry-scale",
        "0.001",
        "--out",
        &out_arg,
    ]);
    assert_eq!(sent.status.code(), Some(0), "{}", text(&sent));
    let run: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap_or_default())
        .unwrap_or_else(|e| panic!("run file: {e}"));
    let deliveries = run["deliveries"].as_array().cloned().unwrap_or_default();
    assert!(!deliveries.is_empty(), "{run:#}");
    assert!(
        deliveries.iter().all(|d| d["statuses"]
            .as_array()
            .is_some_and(|s| s.iter().all(|x| x.as_u64().is_some_and(|c| c != 0)))),
        "every delivery got an HTTP answer over TLS: {run:#}"
    );

    let unknown_ca = sim(&["verify", &url]);
    assert_eq!(unknown_ca.status.code(), Some(2), "{}", text(&unknown_ca));
    assert!(
        text(&unknown_ca).contains("no answer") && !text(&unknown_ca).contains("panicked"),
        "{}",
        text(&unknown_ca)
    );
    r.stop().await;
}
