//! The bad-input matrix: every case has an asserted status and an asserted effect — nothing on the
//! events topic, or persisted and then dead-lettered (or applied/ignored) when validly signed.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use carhook_tests::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::Message;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PATH: &str = "/webhooks/smartcar";

type Chunk = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
type Chunked = StreamBody<futures::stream::Iter<std::vec::IntoIter<Chunk>>>;

/// What must happen to a validly signed body after its 200.
#[derive(Debug, Clone, Copy, PartialEq)]
enum After {
    DeadLettered(&'static str),
    Processed,
}

fn nested(depth: usize) -> Vec<u8> {
    let mut v = "[".repeat(depth);
    v.push_str(&"]".repeat(depth));
    v.into_bytes()
}

async fn raw_http(
    addr: std::net::SocketAddr,
    request: &[u8],
    trickle: Option<(&[u8], Duration)>,
) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _ = s.write_all(request).await;
    if let Some((body, gap)) = trickle {
        for b in body {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(gap).await;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_matrix() {
    let s = settings(&[
        ("CARHOOK__KAFKA__PARTITIONS", "2"),
        ("CARHOOK__RECEIVER__BODY_TIMEOUT_MS", "1000"),
        ("CARHOOK__RECEIVER__HEADER_TIMEOUT_MS", "1000"),
        ("CARHOOK__RECEIVER__IDLE_TIMEOUT_MS", "1000"),
        ("CARHOOK__RECEIVER__VERIFY_PER_SEC", "2"),
    ]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let a = r.addr;
    let good = example("vehicle_state.v4.signal-change.json");
    let good_sig = sign(TOKEN, &good);
    let mut accepted = 0;
    let mut must: BTreeMap<Vec<u8>, After> = BTreeMap::new();

    // --- signature (401, nothing stored) ---
    let unsigned: Vec<(&str, Option<String>)> = vec![
        ("no signature", None),
        ("empty header", Some(String::new())),
        ("upper-case hex", Some(good_sig.to_uppercase())),
        ("63 chars", Some(good_sig[..63].to_string())),
        ("65 chars", Some(format!("{good_sig}0"))),
        ("sha256= prefix", Some(format!("sha256={good_sig}"))),
        (
            "valid signature of another body",
            Some(sign(TOKEN, b"{\"eventId\":\"x\"}")),
        ),
        (
            "another application's token",
            Some(sign("some-other-app-token", &good)),
        ),
        ("non-ASCII header", Some("é".repeat(32))),
    ];
    for (case, sig) in &unsigned {
        assert_eq!(
            post(a, PATH, good.clone(), sig.as_deref()).await.status,
            401,
            "{case}"
        );
    }

    // --- size, time, method, path, protocol ---
    let big = vec![b'{'; 70_000];
    assert_eq!(
        post(a, PATH, big.clone(), Some(&sign(TOKEN, &big)))
            .await
            .status,
        413,
        "over the limit with Content-Length"
    );
    let chunks: Vec<Chunk> = (0..20)
        .map(|_| Ok(hyper::body::Frame::data(Bytes::from(vec![b' '; 4096]))))
        .collect();
    let client: Client<_, Chunked> = Client::builder(TokioExecutor::new()).build_http();
    let chunked = http::Request::post(format!("http://{a}{PATH}"))
        .header("SC-Signature", &good_sig)
        .body(StreamBody::new(futures::stream::iter(chunks)))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = client
        .request(chunked)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        resp.status(),
        413,
        "over the limit, chunked without Content-Length"
    );
    let many_signals: Vec<serde_json::Value> = (0..10_000)
        .map(|i| json!({"code": format!("g-s{i}")}))
        .collect();
    let ten_k = serde_json::to_vec(&json!({"eventId": "10k", "eventType": "VEHICLE_STATE", "vehicleId": "v", "data": {"signals": many_signals}})).unwrap_or_default();
    assert_eq!(
        post(a, PATH, ten_k.clone(), Some(&sign(TOKEN, &ten_k)))
            .await
            .status,
        413,
        "10 000 signals exceed 64 KiB"
    );
    let head = format!("POST {PATH} HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\nsc-signature: {good_sig}\r\n\r\n");
    let trickled = raw_http(
        a,
        head.as_bytes(),
        Some((&[b' '; 30], Duration::from_millis(100))),
    )
    .await;
    assert!(
        trickled.starts_with("HTTP/1.1 408"),
        "a body that trickles in: {trickled:?}"
    );
    let huge_header = format!(
        "POST {PATH} HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\ncontent-length: 2\r\n\r\n{{}}",
        "a".repeat(20_000)
    );
    let answer = raw_http(a, huge_header.as_bytes(), None).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "headers too large: {answer:?}"
    );
    assert_eq!(
        request(a, http::Method::GET, PATH, vec![], None)
            .await
            .status,
        405,
        "GET"
    );
    assert_eq!(
        request(a, http::Method::PUT, PATH, good.clone(), Some(&good_sig))
            .await
            .status,
        405,
        "PUT"
    );
    assert_eq!(
        post(a, "/webhooks/other", good.clone(), Some(&good_sig))
            .await
            .status,
        404,
        "wrong path"
    );
    assert_eq!(
        post(a, "/", good.clone(), Some(&good_sig)).await.status,
        404,
        "root"
    );
    // HTTP/2 with prior knowledge is served like HTTP/1.1.
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let h2_body = state_event(
        "h2-event",
        "h2-car",
        &[(
            "charge-ischarging",
            json!({"value": true}),
            1_764_000_000_000,
        )],
    );
    let req = http::Request::post(format!("http://{a}{PATH}"))
        .header("SC-Signature", sign(TOKEN, &h2_body))
        .body(Full::new(Bytes::from(h2_body.clone())))
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = h2.request(req).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (resp.status().as_u16(), resp.version()),
        (200, http::Version::HTTP_2),
        "HTTP/2 prior knowledge"
    );
    let _ = resp.into_body().collect().await;
    accepted += 1;
    must.insert(h2_body, After::Processed);
    // Many idle keep-alive connections: the server keeps serving, and closes idle ones by itself.
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(c) = tokio::net::TcpStream::connect(a).await {
            idle.push(c);
        }
    }
    assert_eq!(
        post(a, PATH, good.clone(), Some(&good_sig)).await.status,
        200,
        "served beside 200 idle connections"
    );
    accepted += 1;
    must.insert(good.clone(), After::Processed);
    let waits = idle.iter_mut().map(|c| async move {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    });
    let closed = futures::future::join_all(waits)
        .await
        .into_iter()
        .filter(|c| *c)
        .count();
    assert_eq!(
        closed,
        idle.len(),
        "idle connections are closed after the idle timeout"
    );

    // --- VERIFY as a signing oracle ---
    for (case, challenge) in [
        ("JSON challenge", r#"{"eventId":"forged"}"#),
        ("spaces", "sign this please"),
        ("too long", &"a".repeat(200)),
    ] {
        let probe =
            serde_json::to_vec(&json!({"eventType": "VERIFY", "data": {"challenge": challenge}}))
                .unwrap_or_default();
        let reply = post(a, PATH, probe, None).await;
        assert_eq!(reply.status, 401, "unsigned VERIFY with {case}");
    }
    let mut limited = 0;
    for i in 0..8 {
        let v = serde_json::to_vec(
            &json!({"eventType": "VERIFY", "data": {"challenge": format!("c-{i}")}}),
        )
        .unwrap_or_default();
        if post(a, PATH, v, None).await.status == 401 {
            limited += 1;
        }
    }
    assert!(
        limited >= 4,
        "unsigned VERIFY is rate-limited ({limited} of 8 refused)"
    );

    // --- validly signed bodies: 200, persisted unchanged, then dead-lettered or processed ---
    let signed: Vec<(&str, Vec<u8>, After)> = vec![
        ("invalid UTF-8", vec![0xff, 0xfe, 0xfd], After::DeadLettered("not_json")),
        ("not JSON", b"eventId=1&vehicle=2".to_vec(), After::DeadLettered("not_json")),
        ("empty body", Vec::new(), After::DeadLettered("not_json")),
        ("JSON array", b"[{\"eventId\":\"a\"}]".to_vec(), After::DeadLettered("not_object")),
        ("deeply nested JSON", nested(5000), After::DeadLettered("not_json")),
        ("missing event id", br#"{"eventType":"VEHICLE_STATE","vehicleId":"v","data":{"signals":[]}}"#.to_vec(), After::DeadLettered("missing_field")),
        ("missing vehicle", br#"{"eventId":"no-vehicle","eventType":"VEHICLE_STATE","data":{"signals":[]}}"#.to_vec(), After::DeadLettered("missing_field")),
        ("eventId is a number", br#"{"eventId":12,"eventType":"VEHICLE_STATE"}"#.to_vec(), After::DeadLettered("wrong_type")),
        ("eventType is an object", br#"{"eventId":"t1","eventType":{"x":1}}"#.to_vec(), After::DeadLettered("wrong_type")),
        ("vehicleId is a list", br#"{"eventId":"t2","eventType":"VEHICLE_STATE","vehicleId":[1],"data":{"signals":[]}}"#.to_vec(), After::DeadLettered("wrong_type")),
        ("data.signals is an object", br#"{"eventId":"t3","eventType":"VEHICLE_STATE","vehicleId":"v","data":{"signals":{}}}"#.to_vec(), After::DeadLettered("wrong_type")),
        ("a signal is a string", br#"{"eventId":"t4","eventType":"VEHICLE_STATE","vehicleId":"v","data":{"signals":["x"]}}"#.to_vec(), After::DeadLettered("wrong_type")),
        ("data.errors is a string", br#"{"eventId":"t5","eventType":"VEHICLE_ERROR","vehicleId":"v","data":{"errors":"boom"}}"#.to_vec(), After::DeadLettered("wrong_type")),
        ("error without type", br#"{"eventId":"t6","eventType":"VEHICLE_ERROR","vehicleId":"v","data":{"errors":[{"code":"X"}]}}"#.to_vec(), After::DeadLettered("missing_field")),
        ("empty event id", br#"{"eventId":"","eventType":"VEHICLE_STATE","vehicleId":"v","data":{"signals":[]}}"#.to_vec(), After::DeadLettered("invalid_id")),
        ("unknown event type", br#"{"eventId":"u1","eventType":"VEHICLE_TELEPORTED","vehicleId":"v"}"#.to_vec(), After::Processed),
        ("numbers out of range", br#"{"eventId":"n1","eventType":"VEHICLE_STATE","vehicleId":"range-car","data":{"signals":[{"code":"a-b","body":{"value":1e308},"meta":{"oemUpdatedAt":1e300}}]},"meta":{"deliveredAt":-5}}"#.to_vec(), After::Processed),
        ("deliveredAt garbage", br#"{"eventId":"g1","eventType":"VEHICLE_STATE","vehicleId":"g-car","data":{"signals":[]},"meta":{"deliveredAt":"soon"}}"#.to_vec(), After::Processed),
        ("duplicate JSON keys", br#"{"eventId":"dup-a","eventId":"dup-b","eventType":"VEHICLE_STATE","vehicleId":"dupkey-car","data":{"signals":[]}}"#.to_vec(), After::Processed),
    ];
    for (case, body, after) in &signed {
        let reply = post(a, PATH, body.clone(), Some(&sign(TOKEN, body))).await;
        assert_eq!(
            reply.status, 200,
            "{case}: a validly signed body is persisted whatever it holds"
        );
        accepted += 1;
        must.insert(body.clone(), *after);
    }

    // Effect: exactly the accepted bodies are on the events topic, byte for byte (besides the
    // processor's own control records: the duplicate-keys body is keyed differently from the vehicle
    // its body names, so that vehicle's partition owner is asked to refresh it).
    let mut events = Vec::new();
    eventually(Duration::from_secs(30), || {
        events = read_to_end(
            &s.kafka.brokers,
            &s.kafka.events_topic,
            Duration::from_secs(30),
        )
        .unwrap_or_default()
        .into_iter()
        .filter(|m| header(m, shared::headers::CONTROL).is_none())
        .collect();
        let n = events.len();
        async move { n >= accepted }
    })
    .await;
    assert_eq!(
        events.len(),
        accepted,
        "only accepted deliveries reach the events topic"
    );
    for e in &events {
        let body = e.payload().unwrap_or_default().to_vec();
        assert!(
            must.contains_key(&body),
            "unexpected record on the events topic"
        );
    }
    // Effect: poison is dead-lettered with its class; everything else is processed, not dead-lettered.
    let expected_dead = must
        .values()
        .filter(|a| matches!(a, After::DeadLettered(_)))
        .count();
    let mut dead = Vec::new();
    eventually(Duration::from_secs(60), || {
        dead = carhook_processor::dlq::read_letters(&s).unwrap_or_default();
        let n = dead.len();
        async move { n >= expected_dead }
    })
    .await;
    assert_eq!(dead.len(), expected_dead);
    for l in &dead {
        let body = l.msg.payload().unwrap_or_default().to_vec();
        match must.get(&body) {
            Some(After::DeadLettered(class)) => {
                assert_eq!(l.reason(), *class, "{:?}", String::from_utf8_lossy(&body))
            }
            other => panic!(
                "{:?} dead-lettered, expected {other:?}",
                String::from_utf8_lossy(&body)
            ),
        }
    }
    eventually(Duration::from_secs(60), || async {
        metric_value(p.addr, "carhook_processor_events_total").await >= accepted as f64
    })
    .await;
    assert!(
        vehicle_state(&s, "range-car").await.is_some(),
        "out-of-range numbers are tolerated"
    );
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}
