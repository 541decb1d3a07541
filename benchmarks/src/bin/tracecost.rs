//! What tracing costs per message, off and on, against the code without it.
//!
//! Each service does the same per message it handles: open its span (about ten fields),
//! continue the trace the message carries (`telemetry::follow`), and build the messages it
//! publishes inside that span (`nats::durable_message`, which injects the trace context).
//! This measures exactly that path, in three processes (a `tracing` subscriber is global to
//! a process), each with the services' log subscriber at `info`:
//! - `baseline`: no span; the message built as before tracing existed (payload and id);
//! - `off`: the instrumented path with no OTLP endpoint (the default);
//! - `on`: the instrumented path exporting to an in-process OTLP collector that discards.
//!
//! `cargo build --release -p sundara-bench --bin tracecost && target/release/tracecost --runs 5`
//! prints ns per message (median of the runs, modes interleaved) and each mode / baseline.

use std::time::Instant;

use async_nats::HeaderMap;
use bytes::Bytes;
use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use sundara_common::nats;
use sundara_common::telemetry::{self, LogFormat, TelemetryConfig};
use tracing::Instrument;

#[derive(Parser)]
struct Args {
    /// Run one mode in this process and print its ns per message (used by the driver).
    #[arg(long)]
    mode: Option<String>,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
}

struct Discard;

#[tonic::async_trait]
impl TraceService for Discard {
    async fn export(
        &self,
        _: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

async fn collector() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback");
    let addr = listener.local_addr().expect("bound");
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder().add_service(TraceServiceServer::new(Discard)).serve_with_incoming(incoming),
    );
    format!("http://{addr}")
}

/// One message handled the instrumented way: span, trace continued, message published inside it.
async fn instrumented(i: u64, incoming: Option<&HeaderMap>, payload: &[u8]) -> usize {
    let span = sundara_common::consumer_span!(
        "bench process",
        "sundara.task.normal.mlp",
        sundara.task_id = i,
        sundara.model = "mlp@1",
        sundara.miner = "miner-1",
        sundara.outcome = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::follow(&span, incoming);
    async {
        let msg = nats::durable_message(&i.to_string(), payload.to_vec());
        tracing::Span::current().record("sundara.outcome", "ok");
        std::hint::black_box(msg).outbound_message("sundara.x").payload.len()
    }
    .instrument(span)
    .await
}

/// The same message built as before tracing.
fn baseline(i: u64, payload: &[u8]) -> usize {
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(Bytes::from(payload.to_vec()))
        .message_id(i.to_string());
    std::hint::black_box(msg).outbound_message("sundara.x").payload.len()
}

async fn measure(mode: &str, messages: u64) -> f64 {
    let endpoint = if mode == "on" { Some(collector().await) } else { None };
    let telemetry = telemetry::init(&TelemetryConfig {
        service: "tracecost".into(),
        log_level: "info".into(),
        log_format: LogFormat::Text,
        otlp_endpoint: endpoint,
    })
    .expect("telemetry");
    // What a traced producer put on the message (nothing when tracing is off).
    let incoming = {
        let root = tracing::info_span!(target: sundara_common::telemetry::SPANS, "bench root");
        let _entered = root.enter();
        telemetry::context_headers()
    };
    let payload = vec![7u8; 256];
    let run = async |n: u64| {
        let mut sink = 0;
        for i in 0..n {
            sink += match mode {
                "baseline" => baseline(i, &payload),
                _ => instrumented(i, incoming.as_ref(), &payload).await,
            };
        }
        sink
    };
    run(messages / 10).await; // warm-up
    let started = Instant::now();
    std::hint::black_box(run(messages).await);
    let ns = started.elapsed().as_nanos() as f64 / messages as f64;
    telemetry.shutdown();
    ns
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(mode) = &args.mode {
        println!("{}", measure(mode, args.messages).await);
        return Ok(());
    }
    let modes = ["baseline", "off", "on"];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _ in 0..args.runs {
        for (m, mode) in modes.iter().enumerate() {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(["--mode", mode, "--messages", &args.messages.to_string()])
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .output()?;
            anyhow::ensure!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
            results[m].push(String::from_utf8(out.stdout)?.trim().parse()?);
        }
    }
    let base = median(results[0].clone());
    println!("mode      ns/message (median of {})   / baseline", args.runs);
    for (mode, r) in modes.iter().zip(results) {
        let ns = median(r);
        println!("{mode:<9} {ns:>10.0}                   {:>6.2}×", ns / base);
    }
    Ok(())
}
