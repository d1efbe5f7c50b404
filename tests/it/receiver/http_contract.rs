//! The receiver's HTTP contract with load balancers and slow peers, against the real broker: one
//! deadline per request, idle keep-alive connections kept, the in-flight permit taken only after the
//! body is read and verified, unsigned bodies too large for a VERIFY refused unparsed, and the admin
//! endpoints on their own listener.

use std::time::{Duration, Instant};

use carhook_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PATH: &str = "/webhooks/smartcar";

/// One HTTP/1.1 response as read off the socket.
struct RawReply {
    status: u16,
    head: String,
}

/// Reads one response (head and `Content-Length` body) from `s`; `None` when the connection closed
/// or nothing complete arrived within `within`.
async fn read_response(s: &mut TcpStream, within: Duration) -> Option<RawReply> {
    let deadline = Instant::now() + within;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.split(' ').nth(1)?.parse().ok()?;
                return Some(RawReply { status, head });
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// A signed keep-alive POST of a small event, as raw bytes: (head, body).
fn signed_request(event_id: &str) -> (Vec<u8>, Vec<u8>) {
    let body = state_event(
        event_id,
        "car-http",
        &[(
            "charge-ischarging",
            serde_json::json!({"value": true}),
            1_731_940_328_000,
        )],
    );
    let head = format!(
        "POST {PATH} HTTP/1.1\r\nHost: receiver\r\nContent-Type: application/json\r\nContent-Length: {}\r\nSC-Signature: {}\r\n\r\n",
        body.len(),
        sign(TOKEN, &body)
    );
    (head.into_bytes(), body)
}

async fn write_all(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes)
        .await
        .unwrap_or_else(|e| panic!("write: {e}"));
}

/// Bodies being read plus requests holding an in-flight permit: non-zero once the server has
/// started on a request.
async fn busy(admin: std::net::SocketAddr) -> f64 {
    metric_value(admin, "carhook_receiver_inflight_requests ").await
        + metric_value(admin, "carhook_receiver_body_reads ").await
}

/// Opens a connection that sends a signed head and part of its body, then stalls.
async fn stalled_sender(addr: std::net::SocketAddr) -> TcpStream {
    let (head, body) = signed_request("stalled");
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    write_all(&mut s, &head).await;
    write_all(&mut s, &body[..10]).await;
    s
}

#[tokio::test]
async fn idle_keep_alive_connection_outlives_the_header_timeout() {
    let s = settings(&[("CARHOOK__RECEIVER__HEADER_TIMEOUT_MS", "1000")]);
    let r = spawn_receiver(&s).await;
    let mut conn = TcpStream::connect(r.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..2 {
        let (head, body) = signed_request(&format!("keep-alive-{i}"));
        write_all(&mut conn, &head).await;
        write_all(&mut conn, &body).await;
        let reply = read_response(&mut conn, Duration::from_secs(10)).await;
        assert_eq!(
            reply.map(|r| r.status),
            Some(200),
            "request {i} on the reused connection"
        );
        // A load balancer keeps the connection idle far longer than a header timeout.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
    }
    r.stop().await;
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let s = settings(&[("CARHOOK__RECEIVER__IDLE_TIMEOUT_MS", "1500")]);
    let r = spawn_receiver(&s).await;
    let mut conn = TcpStream::connect(r.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (head, body) = signed_request("idle-close");
    write_all(&mut conn, &head).await;
    write_all(&mut conn, &body).await;
    let reply = read_response(&mut conn, Duration::from_secs(10)).await;
    assert_eq!(reply.map(|r| r.status), Some(200));
    let mut rest = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(6), conn.read(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection must be closed after the idle timeout, got {closed:?}"
    );
    r.stop().await;
}

#[tokio::test]
async fn admin_endpoints_live_only_on_the_admin_listener() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    assert_ne!(r.addr, r.admin);
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(r.admin, path).await.0, 200, "admin {path}");
        assert_eq!(get(r.addr, path).await.0, 404, "webhook listener {path}");
    }
    assert!(get(r.admin, "/metrics")
        .await
        .1
        .contains("carhook_receiver_requests"));
    // The admin listener serves nothing else, the webhook path included.
    let body = example("vehicle_error.v4.error.json");
    let reply = post(r.admin, PATH, body.clone(), Some(&sign(TOKEN, &body))).await;
    assert_eq!(reply.status, 404);
    assert_eq!(
        post(r.addr, PATH, body.clone(), Some(&sign(TOKEN, &body)))
            .await
            .status,
        200
    );
    r.stop().await;
}

#[tokio::test]
async fn one_deadline_bounds_header_body_and_produce_with_503_and_retry_after() {
    // Nothing listens on port 1: a produce waits for its whole 14 s delivery timeout.
    let s = settings(&[
        ("CARHOOK__KAFKA__BROKERS", "127.0.0.1:1"),
        ("CARHOOK__KAFKA__CREATE_TOPICS", "false"),
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "14000"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "100"),
        ("CARHOOK__RECEIVER__HEADER_TIMEOUT_MS", "1000"),
        ("CARHOOK__RECEIVER__REQUEST_TIMEOUT_MS", "3000"),
    ]);
    let r = spawn_receiver_unready(&s).await;
    let (head, body) = signed_request("deadline");
    let mut conn = TcpStream::connect(r.addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    // A slow sender: head and body each take most of a second.
    for part in [&head, &body] {
        for piece in part.chunks(part.len().div_ceil(8)) {
            write_all(&mut conn, piece).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let reply = read_response(&mut conn, Duration::from_secs(20)).await;
    let elapsed = started.elapsed();
    let reply = reply.unwrap_or_else(|| panic!("no answer after {elapsed:?}"));
    assert_eq!(reply.status, 503, "{}", reply.head);
    assert!(
        reply.head.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        reply.head
    );
    assert!(
        elapsed < Duration::from_millis(3_750),
        "answered after {elapsed:?}, past the 3 s request deadline"
    );
    r.stop().await;
}

#[tokio::test]
async fn slow_senders_do_not_hold_the_inflight_permits() {
    let s = settings(&[("CARHOOK__RECEIVER__MAX_INFLIGHT", "1")]);
    let r = spawn_receiver(&s).await;
    let stalled = stalled_sender(r.addr).await;
    eventually(Duration::from_secs(10), || async {
        busy(r.admin).await >= 1.0
    })
    .await;
    let body = example("vehicle_error.v4.error.json");
    let reply = post(r.addr, PATH, body.clone(), Some(&sign(TOKEN, &body))).await;
    assert_eq!(
        reply.status, 200,
        "a stalled body must not take the only in-flight permit: {:?}",
        reply.body
    );
    drop(stalled);
    r.stop().await;
}

#[tokio::test]
async fn slow_senders_are_bounded_by_max_body_reads() {
    let s = settings(&[("CARHOOK__RECEIVER__MAX_BODY_READS", "1")]);
    let r = spawn_receiver(&s).await;
    let stalled = stalled_sender(r.addr).await;
    eventually(Duration::from_secs(10), || async {
        busy(r.admin).await >= 1.0
    })
    .await;
    let body = example("vehicle_error.v4.error.json");
    let reply = post(r.addr, PATH, body.clone(), Some(&sign(TOKEN, &body))).await;
    assert_eq!(reply.status, 503);
    assert!(reply.headers.get("retry-after").is_some());
    drop(stalled);
    eventually(Duration::from_secs(10), || {
        let body = body.clone();
        async move {
            let sig = sign(TOKEN, &body);
            post(r.addr, PATH, body, Some(&sig)).await.status == 200
        }
    })
    .await;
    r.stop().await;
}

#[tokio::test]
async fn unsigned_body_larger_than_any_verify_gets_401_unparsed() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    // A well-formed unsigned VERIFY that a small body would have answered, padded past 4 KiB.
    let padded = serde_json::to_vec(&serde_json::json!({
        "eventId": "v-big", "eventType": "VERIFY", "data": {"challenge": "abc-123"},
        "pad": "x".repeat(5_000),
    }))
    .unwrap_or_default();
    let reply = post(r.addr, PATH, padded, None).await;
    assert_eq!(reply.status, 401, "{:?}", reply.body);
    assert!(!String::from_utf8_lossy(&reply.body).contains("challenge"));
    let (_, metrics) = get(r.admin, "/metrics").await;
    assert!(
        metrics.contains(r#"carhook_receiver_signature_failures_total{reason="missing"} 1"#),
        "{metrics}"
    );
    // Exported at 0 from start-up; still 0: nothing was answered.
    assert!(
        metrics.contains(r#"carhook_receiver_verify_challenges_total{result="unsigned"} 0"#),
        "{metrics}"
    );
    r.stop().await;
}
