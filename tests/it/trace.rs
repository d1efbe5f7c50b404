//! One trace from HTTP to state: a real OTLP/gRPC receiver inside the test decodes what the real
//! `receiver` and `processor` binaries export, and the spans must form one trace with the right
//! kinds, parentage and messaging attributes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use carhook_tests::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;

/// Spans received, with the `service.name` of the resource that sent them.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<(String, Span)>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self
            .0
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| match &v.value {
            Some(AnyValue::StringValue(s)) => Some(s.clone()),
            Some(AnyValue::IntValue(i)) => Some(i.to_string()),
            Some(AnyValue::BoolValue(b)) => Some(b.to_string()),
            _ => None,
        })
}

/// Starts a collector; returns it, its OTLP endpoint and its server task.
async fn collector() -> (
    Collector,
    String,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let otlp = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let collector = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    (collector, format!("http://{otlp}"), tokio::spawn(server))
}

impl Collector {
    /// Waits (30 s at most) until the spans received satisfy `done`, then returns them all and
    /// prints them, one line each, for the test's output.
    async fn spans_once(&self, done: impl Fn(&[(String, Span)]) -> bool) -> Vec<(String, Span)> {
        eventually(Duration::from_secs(30), || async {
            self.0.lock().map(|s| done(&s)).unwrap_or(false)
        })
        .await;
        let spans = self.0.lock().map(|s| s.clone()).unwrap_or_default();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        for (svc, sp) in &spans {
            println!(
                "{svc:<18} {:<34} kind={} trace={} span={} parent={}",
                sp.name,
                sp.kind,
                hex(&sp.trace_id),
                hex(&sp.span_id),
                hex(&sp.parent_span_id)
            );
        }
        spans
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_signed_delivery_yields_one_trace_from_http_to_state() {
    let (collector, endpoint, server) = collector().await;
    let s = settings(&[]);
    let extra = [("CARHOOK__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str())];
    let log = std::env::temp_dir().join(format!("{}.trace.log", s.cql.keyspace));
    let processor = ChildService::processor(&s, "traced", &log, &extra).await;
    let receiver = ChildService::receiver(&s, &log, &extra).await;
    let body = example("vehicle_state.v4.signal-change.json");
    let reply = post(
        receiver.addr,
        "/webhooks/smartcar",
        body.clone(),
        Some(&sign(TOKEN, &body)),
    )
    .await;
    assert_eq!(reply.status, 200);
    let vehicle = "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2";
    eventually(Duration::from_secs(60), || async {
        vehicle_state(&s, vehicle).await.is_some()
    })
    .await;
    // A record that can only be dead-lettered: its span carries the error.
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("poison"), b"not json".as_slice())],
    )
    .await;
    eventually(Duration::from_secs(60), || async {
        metric_value(processor.admin, "carhook_processor_dead_letters_total").await >= 1.0
    })
    .await;
    // A receiver whose broker is unreachable answers 503: its request and send spans are errors.
    let unreachable = {
        let (listen, admin) = (free_port(), free_port());
        let mut env = child_env(&s, free_port(), "unused");
        env.extend(
            [
                ("CARHOOK__RECEIVER__LISTEN", listen.to_string()),
                ("CARHOOK__RECEIVER__ADMIN_LISTEN", admin.to_string()),
                ("CARHOOK__KAFKA__BROKERS", "127.0.0.1:1".to_string()),
                ("CARHOOK__KAFKA__CREATE_TOPICS", "false".to_string()),
                ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "1000".to_string()),
                (
                    "CARHOOK__TELEMETRY__SERVICE_NAME",
                    "carhook-receiver-unreachable".to_string(),
                ),
                ("CARHOOK__TELEMETRY__OTLP_ENDPOINT", endpoint.clone()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        let mut child = ChildService::launch("receiver", &[], env, admin, &log);
        child.addr = listen;
        child
    };
    let failing = example("vehicle_error.v4.error.json");
    let sig = sign(TOKEN, &failing);
    eventually(Duration::from_secs(30), || {
        let (body, sig) = (failing.clone(), sig.clone());
        async move { try_post(unreachable.addr, "/webhooks/smartcar", body, &sig).await == Some(503) }
    })
    .await;
    // SIGTERM flushes the batch exporters.
    assert_eq!(receiver.terminate(), Some(0));
    assert_eq!(processor.terminate(), Some(0));
    assert_eq!(unreachable.terminate(), Some(0));
    let spans = collector
        .spans_once(|s| {
            s.iter()
                .any(|(svc, sp)| svc == "carhook-processor" && sp.name.starts_with("BATCH"))
                && s.iter()
                    .any(|(svc, _)| svc == "carhook-receiver-unreachable")
        })
        .await;
    let find = |service: &str, pred: &dyn Fn(&Span) -> bool| -> Span {
        spans
            .iter()
            .find(|(svc, sp)| svc == service && pred(sp))
            .map(|(_, sp)| sp.clone())
            .unwrap_or_else(|| {
                panic!(
                    "no matching {service} span in {:#?}",
                    spans
                        .iter()
                        .map(|(s, sp)| (s, &sp.name, sp.kind))
                        .collect::<Vec<_>>()
                )
            })
    };
    let server_span = find("carhook-receiver", &|sp| sp.kind == SpanKind::Server as i32);
    let producer = find("carhook-receiver", &|sp| {
        sp.kind == SpanKind::Producer as i32
    });
    let consumer = find("carhook-processor", &|sp| {
        sp.kind == SpanKind::Consumer as i32
    });
    let claim = find("carhook-processor", &|sp| {
        sp.name == "INSERT processed_events"
    });
    let write = find("carhook-processor", &|sp| {
        sp.name.starts_with("BATCH UPDATE")
    });

    assert_eq!(server_span.name, "POST /webhooks/smartcar");
    assert_eq!(producer.name, format!("send {}", s.kafka.events_topic));
    assert_eq!(consumer.name, format!("process {}", s.kafka.events_topic));
    for sp in [&producer, &consumer, &claim, &write] {
        assert_eq!(
            sp.trace_id, server_span.trace_id,
            "{} is in another trace",
            sp.name
        );
    }
    assert_eq!(
        producer.parent_span_id, server_span.span_id,
        "send is a child of the request"
    );
    assert_eq!(
        consumer.parent_span_id, producer.span_id,
        "process continues the record's traceparent"
    );
    assert_eq!(claim.parent_span_id, consumer.span_id);
    assert_eq!(write.parent_span_id, consumer.span_id);
    // One CLIENT span per CQL statement execution: the claim's LWT, then the state batch and, as
    // this is the vehicle's first event and the state changelog has no record of it, the two reads
    // that load its view once, run while the batch is written (in any order). The claim of the
    // event that wrote the cells is not read: it is this event.
    let mut cql_spans: Vec<String> = spans
        .iter()
        .filter(|(_, sp)| sp.parent_span_id == consumer.span_id)
        .map(|(_, sp)| sp.name.clone())
        .collect();
    assert_eq!(
        cql_spans.first().map(String::as_str),
        Some("INSERT processed_events"),
        "the claim comes first: {cql_spans:?}"
    );
    cql_spans[1..].sort();
    assert_eq!(
        cql_spans,
        [
            "INSERT processed_events".to_string(),
            format!("BATCH UPDATE {}", s.cql.keyspace),
            "SELECT signal_state".to_string(),
            "SELECT vehicle_errors".to_string(),
        ],
        "the record's CQL spans"
    );
    for sp in [&claim, &write] {
        assert_eq!(
            sp.kind,
            SpanKind::Client as i32,
            "{} is a CLIENT span",
            sp.name
        );
        assert_eq!(attr(sp, "db.system").as_deref(), Some("cassandra"));
        assert_eq!(
            attr(sp, "db.namespace").as_deref(),
            Some(s.cql.keyspace.as_str())
        );
        assert!(
            attr(sp, "server.address").is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok()),
            "{}: no server.address",
            sp.name
        );
        assert!(
            attr(sp, "server.port").is_some(),
            "{}: no server.port",
            sp.name
        );
    }
    assert_eq!(
        attr(&claim, "db.collection.name").as_deref(),
        Some("processed_events")
    );
    assert_eq!(attr(&claim, "db.operation.name").as_deref(), Some("INSERT"));
    assert_eq!(
        attr(&write, "db.operation.name").as_deref(),
        Some("BATCH UPDATE")
    );
    assert_eq!(
        attr(&server_span, "http.route").as_deref(),
        Some("/webhooks/smartcar")
    );
    let status = |sp: &Span| sp.status.as_ref().map_or(0, |st| st.code);
    const ERROR: i32 = 2; // opentelemetry-proto StatusCode::Error
    for sp in [&server_span, &producer, &consumer, &claim, &write] {
        assert_ne!(status(sp), ERROR, "{} succeeded", sp.name);
    }

    // Errors: the dead-lettered record, the 503 and the failed send carry status Error and
    // error.type.
    let poisoned = find("carhook-processor", &|sp| {
        sp.kind == SpanKind::Consumer as i32
            && attr(sp, "messaging.kafka.message.key").as_deref() == Some("poison")
    });
    assert_eq!(status(&poisoned), ERROR, "{poisoned:#?}");
    assert_eq!(attr(&poisoned, "error.type").as_deref(), Some("not_json"));
    let refused = find("carhook-receiver-unreachable", &|sp| {
        sp.kind == SpanKind::Server as i32
    });
    assert_eq!(status(&refused), ERROR, "{refused:#?}");
    assert_eq!(
        attr(&refused, "error.type").as_deref(),
        Some("kafka_unavailable")
    );
    assert_eq!(
        attr(&refused, "http.response.status_code").as_deref(),
        Some("503")
    );
    let failed_send = find("carhook-receiver-unreachable", &|sp| {
        sp.kind == SpanKind::Producer as i32
    });
    assert_eq!(status(&failed_send), ERROR, "{failed_send:#?}");
    assert!(
        attr(&failed_send, "error.type").is_some(),
        "{failed_send:#?}"
    );

    assert_eq!(
        attr(&producer, "messaging.system").as_deref(),
        Some("kafka")
    );
    assert_eq!(
        attr(&producer, "messaging.destination.name").as_deref(),
        Some(s.kafka.events_topic.as_str())
    );
    assert_eq!(
        attr(&producer, "messaging.kafka.message.key").as_deref(),
        Some(vehicle)
    );
    assert!(attr(&producer, "messaging.destination.partition.id").is_some());
    assert_eq!(
        attr(&consumer, "messaging.system").as_deref(),
        Some("kafka")
    );
    assert_eq!(
        attr(&consumer, "messaging.consumer.group.name").as_deref(),
        Some(s.kafka.consumer_group.as_str())
    );
    assert_eq!(
        attr(&consumer, "messaging.kafka.message.key").as_deref(),
        Some(vehicle)
    );
    assert!(attr(&consumer, "messaging.kafka.offset").is_some());
    assert_eq!(
        attr(&consumer, "event_id").as_deref(),
        Some("550e8400-e29b-41d4-a716-446655440000")
    );
    assert_eq!(
        attr(&consumer, "event_type").as_deref(),
        Some("VEHICLE_STATE")
    );
    assert_eq!(attr(&consumer, "vehicle_id").as_deref(), Some(vehicle));
    assert_eq!(
        attr(&server_span, "event_id").as_deref(),
        Some("550e8400-e29b-41d4-a716-446655440000")
    );

    // The JSON log lines of that request and record carry the same trace id.
    let trace_hex: String = server_span
        .trace_id
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let logs = std::fs::read_to_string(&log).unwrap_or_default();
    let with_trace: Vec<&str> = logs.lines().filter(|l| l.contains(&trace_hex)).collect();
    for target in ["carhook_receiver", "carhook_processor"] {
        assert!(
            with_trace.iter().any(|l| l.contains(target)),
            "expected a {target} log line with trace id {trace_hex}: {with_trace:#?}"
        );
    }
    // The management tokens appear in no log line, no span and no metric.
    for secret in [TOKEN, OLD_TOKEN] {
        assert!(!logs.contains(secret), "a token leaked into the logs");
        assert!(
            !spans.iter().any(|(_, sp)| sp
                .attributes
                .iter()
                .any(|kv| format!("{:?}", kv.value).contains(secret))),
            "a token leaked into a span"
        );
    }
    server.abort();
    drop_keyspace(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_polled_value_is_one_trace_from_the_smartcar_request_to_the_state_write() {
    use crate::poll::{fake, request_poll, soc, start_poller};
    let (collector, endpoint, _server) = collector().await;
    let s = settings(&[]);
    let api = fake().await;
    let car = "traced-poll-car";
    api.set_vehicle(
        car,
        carhook_tests::sim::truth::ApiVehicle::new(
            "u1",
            &[("tractionbattery-stateofcharge", soc(42), 1_731_930_000_000)],
        ),
    );
    let extra = [
        ("CARHOOK__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("CARHOOK__TELEMETRY__SERVICE_NAME", "carhook-poller"),
    ];
    let log = std::env::temp_dir().join(format!("{}.trace-poll.log", s.cql.keyspace));
    let processor = ChildService::processor(
        &s,
        "traced",
        &log,
        &[("CARHOOK__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str())],
    )
    .await;
    let poller = start_poller(&s, &api, &extra).await;
    request_poll(&s, car).await;
    state_where(&s, car, |v| {
        v["signals"]["tractionbattery-stateofcharge"]["source"] == "poll"
    })
    .await;
    // SIGTERM flushes the batch exporters.
    assert_eq!(poller.terminate(), Some(0));
    assert_eq!(processor.terminate(), Some(0));
    let spans = collector
        .spans_once(|s| {
            s.iter()
                .any(|(svc, sp)| svc == "carhook-processor" && sp.name.starts_with("BATCH"))
                && s.iter().any(|(svc, _)| svc == "carhook-poller")
        })
        .await;
    let find = |service: &str, name: &str| -> Span {
        spans
            .iter()
            .find(|(svc, sp)| svc == service && sp.name.starts_with(name))
            .map(|(_, sp)| sp.clone())
            .unwrap_or_else(|| panic!("no {service} span {name:?}"))
    };
    let poll = find("carhook-poller", "poll vehicle");
    let request = find("carhook-poller", "GET /vehicles/{id}/signals");
    let send = find("carhook-poller", &format!("send {}", s.kafka.events_topic));
    let consumer = find(
        "carhook-processor",
        &format!("process {}", s.kafka.events_topic),
    );
    let write = find("carhook-processor", "BATCH UPDATE");
    assert_eq!(request.kind, SpanKind::Client as i32);
    assert_eq!(
        attr(&request, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(&request, "url.template").as_deref(),
        Some("/vehicles/{id}/signals")
    );
    assert_eq!(send.kind, SpanKind::Producer as i32);
    assert_eq!(consumer.kind, SpanKind::Consumer as i32);
    for sp in [&request, &send, &consumer, &write] {
        assert_eq!(
            sp.trace_id, poll.trace_id,
            "{} is in the poll's trace",
            sp.name
        );
    }
    assert_eq!(request.parent_span_id, poll.span_id);
    assert_eq!(send.parent_span_id, poll.span_id);
    assert_eq!(
        consumer.parent_span_id, send.span_id,
        "the processor continues the poller's send"
    );
    assert_eq!(write.parent_span_id, consumer.span_id);
    // The poller's own store round trips (its budget) are CQL CLIENT spans of the poll, too.
    let budget = find("carhook-poller", "SELECT poll_vehicles");
    assert_eq!(budget.kind, SpanKind::Client as i32);
    assert_eq!(budget.parent_span_id, poll.span_id);
    assert_eq!(attr(&budget, "db.system").as_deref(), Some("cassandra"));
    assert_eq!(
        attr(&budget, "db.namespace").as_deref(),
        Some(s.cql.keyspace.as_str())
    );
    assert_eq!(
        attr(&budget, "db.collection.name").as_deref(),
        Some("poll_vehicles")
    );
    drop_keyspace(&s).await;
}
