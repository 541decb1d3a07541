//! One task is one trace: an in-process OTLP/gRPC collector receives the spans of every
//! service (the pipeline in this process, and a worker in its own process exporting on its
//! own), and each task's span tree is checked: client → ingress → scheduler → each miner's
//! run → verifier → rewarder, linked through the `traceparent` header of each NATS message.
//!
//! The same run checks the metrics every stage counts, and that a task submitted through the
//! HTTP gateway has its trace start at the request (continuing the client's `traceparent`).
//!
//! Its own test binary: the tracing subscriber and the metrics recorder are global to a process.

use sundara_testkit as support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
use sundara_common::metrics;
use sundara_common::telemetry::{self, LogFormat, TelemetryConfig};
use sundara_schemas::{RejectCode, SubmitOutcome};
use support::{Harness, honest, wait};

/// A span as the collector received it.
#[derive(Clone, Debug)]
struct Collected {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    kind: i32,
    attributes: HashMap<String, String>,
    links: Vec<Vec<u8>>,
}

impl Collected {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map(String::as_str).unwrap_or("")
    }
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Collected>>>,
    arrived: Arc<tokio::sync::Notify>,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let resource = attributes(rs.resource.map(|r| r.attributes).as_deref().unwrap_or_default());
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Collected {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent: span.parent_span_id,
                    kind: span.kind,
                    attributes: attributes(&span.attributes),
                    links: span.links.into_iter().map(|l| l.span_id).collect(),
                });
            }
        }
        self.spans.lock().unwrap().extend(got);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// Serves OTLP/gRPC on a free loopback port; returns the endpoint URL.
async fn start_collector(collector: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector))
            .serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

const PIPELINE_SERVICE: &str = "sundara-test-pipeline";
const WORKER_PROCESS: &str = "w-process";

/// The spans of one task's trace, if all of them have arrived.
fn task_trace(spans: &[Collected], task_id: &str) -> Option<Vec<Collected>> {
    let ingress = spans.iter().find(|s| s.name == "ingress submit" && s.attr("sundara.task_id") == task_id)?;
    let trace: Vec<Collected> = spans.iter().filter(|s| s.trace_id == ingress.trace_id).cloned().collect();
    let count = |name: &str| trace.iter().filter(|s| s.name == name).count();
    let complete = count("client submit") == 1
        && count("scheduler dispatch") == 1
        && count("scheduler assign") == 2
        && count("worker run") == 2
        && count("verifier decide") == 1
        && count("rewarder score") == 1;
    complete.then_some(trace)
}

/// Polls the rendered metrics until `holds` (bounded): gauges are set on their services'
/// own intervals, with no event to wait on.
async fn eventually(render: impl Fn() -> String, what: &str, holds: impl Fn(&str) -> bool) {
    wait::until(what, Duration::from_secs(20), || async {
        let text = render();
        if holds(&text) { Ok(()) } else { Err(text) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_task_is_one_trace_across_every_service_and_process_and_every_stage_is_counted() {
    let recorder = metrics::install(None).unwrap();
    let collector = Collector::default();
    let endpoint = start_collector(collector.clone()).await;
    let telemetry = telemetry::init(&TelemetryConfig {
        service: PIPELINE_SERVICE.into(),
        log_level: "warn".into(),
        log_format: LogFormat::Text,
        otlp_endpoint: Some(endpoint.clone()),
    })
    .unwrap();
    let telemetry = Arc::new(telemetry);

    // k = 2 over two workers: one in this process, one in its own (its spans travel over
    // NATS headers and its own exporter).
    let mut h = Harness::start(vec![honest("w-inproc", 1)], 2, Duration::from_secs(30)).await;
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100")];
    h.spawn_worker_process_with(WORKER_PROCESS, 1, &env).await;
    let requests = h.sample_requests(3, "traced", 7, |i| if i % 2 == 0 { "mlp" } else { "silero" });
    let garbage = h.client.submit_raw(b"\xc1 not msgpack".to_vec()).await.unwrap();
    assert!(matches!(garbage, SubmitOutcome::Rejected { code: RejectCode::Malformed, .. }), "{garbage:?}");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    let task_ids: Vec<String> = results.keys().cloned().collect();

    // Export is batched: flush this process's spans and wait (bounded) for the worker's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let traces = loop {
        let arrived = collector.arrived.notified();
        let t = telemetry.clone();
        tokio::task::spawn_blocking(move || t.flush()).await.unwrap();
        let spans = collector.spans.lock().unwrap().clone();
        let traces: Option<Vec<_>> = task_ids.iter().map(|id| task_trace(&spans, id)).collect();
        if let Some(traces) = traces {
            break traces;
        }
        let have: Vec<String> = spans.iter().map(|s| format!("{} ({})", s.name, s.service)).collect();
        assert!(tokio::time::Instant::now() < deadline, "incomplete traces; spans received: {have:?}");
        let _ = tokio::time::timeout(Duration::from_millis(250), arrived).await;
    };

    for (task_id, trace) in task_ids.iter().zip(&traces) {
        let one = |name: &str| trace.iter().find(|s| s.name == name).unwrap();
        let by_id = |id: &[u8]| trace.iter().find(|s| s.span_id == id);
        let parent_name = |s: &Collected| by_id(&s.parent).map(|p| p.name.clone()).unwrap_or_default();

        let client = one("client submit");
        assert!(client.parent.is_empty(), "the client's submission is the root");
        assert_eq!(client.attr("sundara.task_id"), task_id);
        let ingress = one("ingress submit");
        assert_eq!(ingress.parent, client.span_id, "ingress is a child of the submission");
        assert_eq!(ingress.attr("sundara.outcome"), "accepted");
        let dispatch = one("scheduler dispatch");
        assert_eq!(dispatch.parent, ingress.span_id, "the TASKS message carried the context");
        assert_eq!(dispatch.attr("sundara.dispatch"), "sent");
        assert_eq!(dispatch.attr("messaging.system"), "nats");
        assert_eq!(dispatch.attr("messaging.operation.type"), "process");

        let runs: Vec<&Collected> = trace.iter().filter(|s| s.name == "worker run").collect();
        let mut miners: Vec<&str> = runs.iter().map(|r| r.attr("sundara.miner")).collect();
        miners.sort();
        assert_eq!(miners, ["w-inproc", WORKER_PROCESS]);
        for run in &runs {
            let assign = by_id(&run.parent).expect("a run's parent is in the trace");
            assert_eq!(assign.name, "scheduler assign");
            assert_eq!(assign.parent, dispatch.span_id);
            assert_eq!(assign.attr("sundara.miner"), run.attr("sundara.miner"), "each miner runs its own assignment");
            assert_eq!(run.attr("sundara.task_id"), task_id);
            assert_eq!(run.attr("sundara.outcome"), "ok");
            let expected_service =
                if run.attr("sundara.miner") == WORKER_PROCESS { "sundara-worker" } else { PIPELINE_SERVICE };
            assert_eq!(run.service, expected_service, "spans come from the process that ran them");
        }

        let decide = one("verifier decide");
        assert_eq!(parent_name(decide), "worker run", "decided in the trace of its first outcome");
        let other_run = runs.iter().find(|r| r.span_id != decide.parent).unwrap();
        assert_eq!(decide.links, vec![other_run.span_id.clone()], "linked to the other outcome");
        assert_eq!(decide.attr("sundara.task_id"), task_id);
        assert_eq!(decide.attr("sundara.outcome"), "verified");
        assert_eq!(decide.attr("sundara.agreeing"), "2");
        for miner in ["w-inproc", WORKER_PROCESS] {
            assert!(decide.attr("sundara.miners").contains(&format!("{miner}=agreed")), "{decide:?}");
        }
        let score = one("rewarder score");
        assert_eq!(score.parent, decide.span_id, "the VERDICTS message carried the context");
        assert_eq!(score.attr("sundara.task_id"), task_id);
        assert!(score.attr("sundara.scores").contains(WORKER_PROCESS), "{score:?}");
        // Consumer spans are consumers; the submission is a client.
        const CLIENT: i32 = 3;
        const CONSUMER: i32 = 5;
        assert_eq!(client.kind, CLIENT);
        for s in [dispatch, decide, score] {
            assert_eq!(s.kind, CONSUMER, "{}", s.name);
        }
    }

    // Every stage counted: submissions by outcome, each miner's standing, the stages of
    // each task, and the fleet, slice and queue gauges.
    let text = recorder.render();
    assert!(
        text.contains("# HELP sundara_ingress_accepted_total Tasks accepted"),
        "metrics carry their help lines:\n{text}"
    );
    assert_eq!(metrics::sum(&text, "sundara_ingress_accepted_total", &[("priority", "normal")]), 3.0);
    assert_eq!(metrics::sum(&text, "sundara_ingress_rejected_total", &[("reason", "malformed")]), 1.0);
    assert_eq!(metrics::sum(&text, "sundara_rewarder_outcomes_total", &[("standing", "agreed")]), 6.0);
    assert_eq!(metrics::sum(&text, "sundara_rewarder_outcomes_total", &[]), 6.0);
    assert_eq!(metrics::sum(&text, "sundara_verifier_verdicts_total", &[("accepted", "true")]), 3.0);
    assert_eq!(metrics::sum(&text, "sundara_task_stage_seconds_count", &[("stage", "total")]), 3.0);
    let slice = [("slice", "w-inproc-cpu0")];
    let slots = f64::from(sundara_worker::SLOTS_PER_THREAD);
    eventually(
        || recorder.render(),
        "slice gauges",
        |t| {
            metrics::sum(t, "sundara_worker_slots", &slice) == slots
                && metrics::sum(t, "sundara_worker_loaded_models", &slice) >= 1.0
                && metrics::sum(t, "sundara_worker_memory_used_bytes", &slice) > 0.0
                && metrics::sum(t, "sundara_worker_slots_in_use", &slice) == 0.0
        },
    )
    .await;
    // Fleet gauges come from Redis: both workers (one in its own process) with all their slots free.
    eventually(
        || recorder.render(),
        "fleet gauges",
        |t| {
            metrics::sum(t, "sundara_fleet_workers", &[("state", "alive")]) == 2.0
                && metrics::sum(t, "sundara_fleet_slots", &[]) == 2.0 * slots
                && metrics::sum(t, "sundara_fleet_slots_in_use", &[]) == 0.0
                && t.contains("sundara_queue_depth{queue=\"work\"} 0")
                && t.contains("sundara_queue_depth{queue=\"tasks_normal\"} 0")
        },
    )
    .await;

    gateway_request_starts_its_tasks_trace(&h, &collector, &telemetry, || recorder.render()).await;
    h.stop().await;
    if let Ok(t) = Arc::try_unwrap(telemetry) {
        t.shutdown();
    }
}

/// Through the HTTP gateway, a task's trace starts at the request, continuing the client's
/// `traceparent`: the gateway's server span is its child, and ingress the gateway span's.
async fn gateway_request_starts_its_tasks_trace(
    h: &Harness,
    collector: &Collector,
    telemetry: &Arc<telemetry::Telemetry>,
    metrics_text: impl Fn() -> String,
) {
    let (addr, shutdown) = support::http::start_gateway(h.stack.endpoints(), |_| {}).await;
    let key = support::http::TEST_KEY;
    let (trace_id, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace_id}-{parent}-01");
    let request = &h.sample_requests(1, "http-traced", 9, |_| "mlp")[0];
    let inputs: Vec<_> = request.inputs.iter().map(sundara_gateway::kserve::JsonTensor::from_tensor).collect();
    let body = serde_json::json!({ "inputs": inputs }).to_string();
    let auth = format!("Bearer {key}");
    let headers = [("Authorization", auth.as_str()), ("traceparent", traceparent.as_str())];
    let answer = support::http::http(addr, "POST", "/v2/models/mlp/infer", &headers, body.as_bytes()).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let task_id = answer.headers["sundara-task-id"].clone();

    let trace_id = hex::decode(trace_id).unwrap();
    let names = ["http infer", "ingress submit", "scheduler dispatch", "verifier decide", "rewarder score"];
    let trace = wait::until("the gateway task's trace", Duration::from_secs(30), || async {
        let t = telemetry.clone();
        tokio::task::spawn_blocking(move || t.flush()).await.unwrap();
        let spans = collector.spans.lock().unwrap().clone();
        let trace: Vec<Collected> = spans.into_iter().filter(|s| s.trace_id == trace_id).collect();
        let have: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
        if names.iter().all(|n| have.contains(n)) { Ok(trace) } else { Err(format!("spans so far: {have:?}")) }
    })
    .await;
    let one = |name: &str| trace.iter().find(|s| s.name == name).unwrap();
    let http = one("http infer");
    assert_eq!(http.parent, hex::decode(parent).unwrap(), "continues the client's traceparent");
    const SERVER: i32 = 2;
    assert_eq!(http.kind, SERVER);
    assert_eq!((http.attr("sundara.task_id"), http.attr("sundara.tenant")), (task_id.as_str(), "test"));
    assert_eq!(http.attr("http.response.status_code"), "200");
    assert_eq!(one("ingress submit").parent, http.span_id, "ingress is a child of the HTTP request");
    assert_eq!(one("ingress submit").attr("sundara.task_id"), task_id);
    let text = metrics_text();
    assert_eq!(metrics::sum(&text, "sundara_http_requests_total", &[("status", "200")]), 1.0);
    shutdown.cancel();
}
