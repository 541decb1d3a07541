//! `bench`: the pipeline's load generator and its baselines, measured side by side.
//!
//! `bench pipeline` runs every scenario (each at least `--runs` times) and appends one JSON
//! object per run to `--out`; `bench responder` is the bare NATS responder baseline (a
//! child process of `bench pipeline`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rand::SeedableRng;
use serde_json::json;
use sundara::stack::{LocalStack, project_root};
use sundara_bench::client::{PipelineClient, ResponderClient};
use sundara_bench::cpu::{CpuUse, CpuWindow};
use sundara_bench::http::HttpClient;
use sundara_bench::load::{Mode, RunStats, Window, closed_loop, open_loop};
use sundara_bench::pipeline::GATEWAY_KEY;
use sundara_bench::pipeline::{Pipeline, PipelineSpec};
use sundara_bench::{baseline, embeddings, fleet, mib};
use sundara_common::nats;
use sundara_schemas::{CompareRule, Tensor, TensorSpec};
use sundara_worker::{ExecutorConfig, ModelRun, SliceReport};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the scenarios and append one JSON line per run to --out.
    Pipeline {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value_t = 1.0)]
        warmup_s: f64,
        #[arg(long, default_value_t = 5.0)]
        measure_s: f64,
        /// Only scenarios whose name contains this.
        #[arg(long)]
        only: Option<String>,
        /// Rows per task.
        #[arg(long, default_value_t = 1)]
        rows: u64,
    },
    /// Write the embeddings workload (each request's texts and tokens) as JSON, for the peers.
    Corpus {
        #[arg(long)]
        out: PathBuf,
    },
    /// Serve the bare request/reply baseline on `bench.infer`.
    Responder {
        #[arg(long)]
        nats: String,
        /// The CA that signed the server's certificate (the stacks here run TLS).
        #[arg(long)]
        nats_ca: Option<PathBuf>,
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

/// What one scenario measures.
#[derive(Clone, Debug)]
enum System {
    /// The whole pipeline with k-fold redundancy on `workers` workers of `threads` inference threads.
    Sundara { k: u8, workers: usize, threads: usize },
    /// `ort` in-process on `threads` threads.
    OrtInProcess { threads: usize },
    /// A bare NATS request/reply responder with `threads` inference threads.
    NatsRequestReply { threads: usize },
    /// The worker's executor alone (no NATS), batching up to `max_batch` tasks.
    WorkerExecutor { threads: usize, max_batch: usize },
    /// The same pipeline (k=1) through the HTTP gateway (KServe v2, JSON and binary
    /// tensors) and through the NATS client path, run after run in turn.
    Gateway { threads: usize },
    /// `/v1/embeddings` through the gateway and the whole pipeline.
    Embeddings { k: u8, workers: usize, threads: usize },
    /// The embedding model's ceiling: tokenizer and `ort` in-process on `threads` threads.
    EmbeddingsInProcess { threads: usize },
    /// One executor (no NATS) serving the four demo models in bursts, with memory for all
    /// of them (`fit`) or too little for its two largest at once (so that it must swap).
    WorkerDensity { threads: usize, fit: bool },
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Sundara { .. } => "sundara",
            System::OrtInProcess { .. } | System::EmbeddingsInProcess { .. } => "ort-in-process",
            System::Gateway { .. } => "gateway",
            System::Embeddings { .. } => "sundara-http",
            System::NatsRequestReply { .. } => "nats-request-reply",
            System::WorkerExecutor { max_batch: 1, .. } => "worker-batch-1",
            System::WorkerExecutor { .. } => "worker-batch-32",
            System::WorkerDensity { fit: true, .. } => "worker-density-fit",
            System::WorkerDensity { fit: false, .. } => "worker-density-tight",
        }
    }
}

struct Scenario {
    name: String,
    system: System,
    model: &'static str,
    modes: Vec<Mode>,
}

/// The thread budget every system gets: the machine's two cores.
const THREADS: usize = 2;

/// Embedding requests in flight (16 texts each): enough to keep every inference thread busy.
const EMBEDDING_CONCURRENCY: usize = 16;
/// How long the embeddings load runs before its measured runs (see `run_embeddings`).
const EMBEDDING_PRIMING: Duration = Duration::from_secs(25);

/// The density scenarios' models (the demo's four) and the name of their mix.
const DENSITY_MODELS: [&str; 4] = ["mlp", "silero_vad", "magika", "ppocr_cls"];
const DENSITY_MIX: &str = "mixed4";
/// Consecutive tasks sent to one model before the next model's burst.
const DENSITY_BURST: u64 = 8;

fn scenarios() -> Vec<Scenario> {
    let closed = |cs: &[usize]| cs.iter().map(|&c| Mode::Closed { concurrency: c }).collect::<Vec<_>>();
    let sundara = |k: u8, workers: usize| System::Sundara { k, workers, threads: THREADS };
    vec![
        Scenario {
            name: "ort-in-process/mlp".into(),
            system: System::OrtInProcess { threads: THREADS },
            model: "mlp",
            modes: closed(&[THREADS]),
        },
        Scenario {
            name: "ort-in-process/mlp_heavy".into(),
            system: System::OrtInProcess { threads: THREADS },
            model: "mlp_heavy",
            modes: closed(&[THREADS]),
        },
        Scenario {
            name: "worker-batch-1/mlp".into(),
            system: System::WorkerExecutor { threads: THREADS, max_batch: 1 },
            model: "mlp",
            modes: closed(&[64]),
        },
        Scenario {
            name: "worker-batch-32/mlp".into(),
            system: System::WorkerExecutor { threads: THREADS, max_batch: 32 },
            model: "mlp",
            modes: closed(&[64]),
        },
        Scenario {
            name: "worker-density-fit/mixed4".into(),
            system: System::WorkerDensity { threads: THREADS, fit: true },
            model: DENSITY_MIX,
            modes: closed(&[16]),
        },
        Scenario {
            name: "worker-density-tight/mixed4".into(),
            system: System::WorkerDensity { threads: THREADS, fit: false },
            model: DENSITY_MIX,
            modes: closed(&[16]),
        },
        Scenario {
            name: "nats-request-reply/mlp".into(),
            system: System::NatsRequestReply { threads: THREADS },
            model: "mlp",
            modes: closed(&[1, 16, 64]),
        },
        Scenario {
            name: "nats-request-reply/mlp_heavy".into(),
            system: System::NatsRequestReply { threads: THREADS },
            model: "mlp_heavy",
            modes: closed(&[16]),
        },
        Scenario {
            name: "sundara-k1/mlp".into(),
            system: sundara(1, 1),
            model: "mlp",
            modes: [closed(&[1, 16, 64]), vec![Mode::Open { rate: 500.0 }, Mode::Open { rate: 1000.0 }]].concat(),
        },
        Scenario { name: "sundara-k2/mlp".into(), system: sundara(2, 2), model: "mlp", modes: closed(&[16, 64]) },
        Scenario {
            name: "sundara-k1/mlp_heavy".into(),
            system: sundara(1, 1),
            model: "mlp_heavy",
            modes: closed(&[16]),
        },
        Scenario {
            name: "gateway/mlp".into(),
            system: System::Gateway { threads: THREADS },
            model: "mlp",
            modes: closed(&[1, 64]),
        },
        Scenario {
            name: "ort-in-process/minilm".into(),
            system: System::EmbeddingsInProcess { threads: THREADS },
            model: embeddings::MODEL,
            modes: closed(&[THREADS]),
        },
        Scenario {
            name: "sundara-http-k1/minilm".into(),
            system: System::Embeddings { k: 1, workers: 1, threads: THREADS },
            model: embeddings::MODEL,
            modes: closed(&[EMBEDDING_CONCURRENCY]),
        },
        Scenario {
            name: "sundara-http-k2/minilm".into(),
            system: System::Embeddings { k: 2, workers: 2, threads: THREADS },
            model: embeddings::MODEL,
            modes: closed(&[EMBEDDING_CONCURRENCY]),
        },
    ]
}

fn model_path(root: &Path, model: &str) -> anyhow::Result<PathBuf> {
    let path = root.join(".cache/models").join(format!("{model}.onnx"));
    if !path.exists() {
        bail!("{} is missing: run scripts/setup", path.display());
    }
    Ok(path)
}

/// 64 distinct input sets of `rows` rows each (fixed seed, so every system gets the same).
fn inputs_for(specs: &[TensorSpec], rows: u64) -> Vec<Vec<Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..64).map(|_| sundara::models::sample_inputs(specs, rows, &mut rng)).collect()
}

/// A system's own figures for one run, added to its record as top-level fields.
type Extra = serde_json::Map<String, serde_json::Value>;

struct Recorder {
    out: std::fs::File,
}

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        scenario: &Scenario,
        mode: Mode,
        rows: u64,
        run: usize,
        stats: &RunStats,
        cpu: &sundara_bench::cpu::CpuUse,
        extra: Extra,
    ) -> anyhow::Result<()> {
        let k = match scenario.system {
            System::Sundara { k, .. } | System::Embeddings { k, .. } => Some(k),
            _ => None,
        };
        self.record_as(scenario.system.name(), k, scenario, mode, rows, run, stats, cpu, extra)
    }

    /// [`Recorder::record`] under another system's name and k (a scenario that measures
    /// several paths in turn).
    #[allow(clippy::too_many_arguments)]
    fn record_as(
        &mut self,
        system: &str,
        k: Option<u8>,
        scenario: &Scenario,
        mode: Mode,
        rows: u64,
        run: usize,
        stats: &RunStats,
        cpu: &sundara_bench::cpu::CpuUse,
        extra: Extra,
    ) -> anyhow::Result<()> {
        let (concurrency, rate) = match mode {
            Mode::Closed { concurrency } => (Some(concurrency), None),
            Mode::Open { rate } => (None, Some(rate)),
        };
        let loadgen = cpu.processes.iter().find(|(n, _)| n == "loadgen").map_or(0.0, |(_, c)| *c);
        let mut line = json!({
            "system": system,
            "scenario": scenario.name,
            "model": scenario.model,
            "k": k,
            "mode": match mode { Mode::Closed { .. } => "closed", Mode::Open { .. } => "open" },
            "concurrency": concurrency,
            "rate": rate,
            "rows": rows,
            "run": run,
            "duration_s": stats.duration_s,
            "completed": stats.completed,
            "errors": stats.errors,
            "dropped": stats.dropped,
            "tasks_per_s": stats.tasks_per_s,
            "p50_ms": stats.latency.p50_ms,
            "p90_ms": stats.latency.p90_ms,
            "p95_ms": stats.latency.p95_ms,
            "p99_ms": stats.latency.p99_ms,
            "loadgen_cpu_cores": loadgen,
            "machine_cpu_cores": cpu.machine_cores,
            "cpu_cores": cpu.processes.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "stages_p50_ms": stats.stages_p50_ms.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "stages_mean_ms": stats.stages_mean_ms.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "first_error": stats.first_error,
            "nats_msgs_per_task": null,
            "redis_cmds_per_task": null,
        });
        if let Some(obj) = line.as_object_mut() {
            obj.extend(extra);
        }
        writeln!(self.out, "{line}")?;
        let what = match mode {
            Mode::Closed { concurrency } => format!("C={concurrency}"),
            Mode::Open { rate } => format!("R={rate}/s"),
        };
        println!(
            "{:<30} {:<20} {:<9} run {run}: {:>9.0} tasks/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  errors {}  dropped {}  loadgen {:.2} of {:.2} cores",
            scenario.name,
            system,
            what,
            stats.tasks_per_s,
            stats.latency.p50_ms,
            stats.latency.p90_ms,
            stats.latency.p99_ms,
            stats.errors,
            stats.dropped,
            loadgen,
            cpu.machine_cores
        );
        if let Some(e) = &stats.first_error {
            println!("    first error: {e}");
        }
        Ok(())
    }
}

struct Settings {
    root: PathBuf,
    runs: usize,
    window: Window,
    rows: u64,
    /// Each density model's footprint, measured once per invocation so that both density
    /// scenarios size their budgets from the same figures.
    footprints: tokio::sync::OnceCell<Vec<(String, u64)>>,
}

/// This process, as CPU accounting names it.
fn loadgen() -> (String, u32) {
    ("loadgen".to_string(), std::process::id())
}

async fn run_scenario(s: &Settings, scenario: &Scenario, rec: &mut Recorder) -> anyhow::Result<()> {
    if let System::WorkerDensity { threads, fit } = scenario.system {
        return run_density(s, scenario, threads, fit, rec).await;
    }
    let path = model_path(&s.root, scenario.model)?;
    let spec = |k: u8, workers: usize, threads: usize, rule: CompareRule| PipelineSpec {
        model_path: &path,
        model: scenario.model,
        k,
        rule,
        // The embedding model as `sundara up` registers it; tensor models batch.
        batching: if scenario.model == embeddings::MODEL {
            sundara::up::EMBEDDING_BATCHING
        } else {
            sundara_schemas::Batching::default()
        },
        workers,
        threads,
        retention: nats::Retention::default(),
        client_name: "bench-client",
        scratch_prefix: "sundara-bench-",
    };
    match &scenario.system {
        System::Gateway { threads } => run_gateway(s, scenario, spec(1, 1, *threads, tensor_rule()), rec).await,
        System::EmbeddingsInProcess { threads } => run_embeddings_in_process(s, scenario, &path, *threads, rec),
        System::Embeddings { k, workers, threads } => {
            run_embeddings(s, scenario, spec(*k, *workers, *threads, CompareRule::Cosine { min: 0.999 }), rec).await
        }
        System::OrtInProcess { threads } => run_ort_in_process(s, scenario, &path, *threads, rec),
        System::WorkerDensity { .. } => unreachable!("run above"),
        System::WorkerExecutor { threads, max_batch } => {
            run_worker_executor(s, scenario, &path, (*threads, *max_batch), rec).await
        }
        System::NatsRequestReply { threads } => run_nats_request_reply(s, scenario, &path, *threads, rec).await,
        System::Sundara { k, workers, threads } => {
            run_pipeline(s, scenario, spec(*k, *workers, *threads, tensor_rule()), rec).await
        }
    }
}

/// `ort` in-process on `threads` threads, `--runs` times.
fn run_ort_in_process(
    s: &Settings,
    scenario: &Scenario,
    path: &Path,
    threads: usize,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let model = sundara_runtime::Model::load(&std::fs::read(path)?, 1)?;
    let inputs = inputs_for(&model.inputs, s.rows);
    for run in 0..s.runs {
        let cpu = CpuWindow::start(&[loadgen()]);
        let stats = baseline::ort_in_process(path, threads, &inputs, s.window)?;
        rec.record(scenario, Mode::Closed { concurrency: threads }, s.rows, run, &stats, &cpu.finish(), Extra::new())?;
    }
    Ok(())
}

/// The worker's executor alone (`threads` threads, batches of up to `max_batch`), a fresh
/// one per closed-loop mode, each mode `--runs` times.
async fn run_worker_executor(
    s: &Settings,
    scenario: &Scenario,
    path: &Path,
    (threads, max_batch): (usize, usize),
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let model = sundara_runtime::Model::load(&std::fs::read(path)?, 1)?;
    let inputs = Arc::new(inputs_for(&model.inputs, s.rows));
    let model_run = ModelRun::new("model", Arc::new(path.to_path_buf()));
    for &mode in &scenario.modes {
        let Mode::Closed { concurrency } = mode else { continue };
        let mut config = ExecutorConfig::cpu(threads, sundara_worker::default_cpu_memory(1), concurrency);
        config.max_batch = max_batch;
        let executor = sundara_worker::Executor::start("bench", config);
        for run in 0..s.runs {
            let cpu = CpuWindow::start(&[loadgen()]);
            let (executor, inputs, model_run) = (executor.clone(), inputs.clone(), model_run.clone());
            let stats = closed_loop(concurrency, s.window, move |n| {
                let (executor, inputs, model_run) = (executor.clone(), inputs.clone(), model_run.clone());
                async move {
                    let x = inputs[n as usize % inputs.len()].clone();
                    executor.run(&model_run, x).await.map(|_| None).map_err(|e| e.to_string())
                }
            })
            .await;
            rec.record(scenario, mode, s.rows, run, &stats, &cpu.finish(), Extra::new())?;
        }
        shut_down(executor).await;
    }
    Ok(())
}

/// The bare NATS request/reply baseline: a private NATS and a `bench responder` child of
/// `threads` inference threads, each mode `--runs` times.
async fn run_nats_request_reply(
    s: &Settings,
    scenario: &Scenario,
    path: &Path,
    threads: usize,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let stack = LocalStack::start(&s.root)?;
    let nats_endpoint = stack.endpoints().nats;
    let url = nats_endpoint.url.clone();
    let mut responder = std::process::Command::new(std::env::current_exe()?)
        .args(["responder", "--nats", &url, "--model"])
        .arg(path)
        .args(nats_endpoint.tls.iter().flat_map(|t| [std::ffi::OsString::from("--nats-ca"), t.ca.clone().into()]))
        .args(["--threads", &threads.to_string()])
        .spawn()?;
    let client = nats::connect(&nats_endpoint, "bench-client").await?;
    let model = sundara_runtime::Model::load(&std::fs::read(path)?, 1)?;
    let rr = Arc::new(ResponderClient::new(client.clone(), inputs_for(&model.inputs, s.rows), timeout()));
    wait_for_responder(&rr).await?;
    let procs = vec![loadgen(), ("responder".to_string(), responder.id())];
    for &mode in &scenario.modes {
        for run in 0..s.runs {
            let cpu = CpuWindow::start(&procs);
            let rr = rr.clone();
            let stats = drive(mode, s.window, move |n| {
                let rr = rr.clone();
                async move { rr.task(n).await }
            })
            .await;
            rec.record(scenario, mode, s.rows, run, &stats, &cpu.finish(), Extra::new())?;
        }
    }
    let _ = responder.kill();
    let _ = responder.wait();
    Ok(())
}

/// The whole pipeline (stack, model and fleet as `spec` says), each mode `--runs` times.
async fn run_pipeline(
    s: &Settings,
    scenario: &Scenario,
    spec: PipelineSpec<'_>,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let p = Pipeline::start(&s.root, spec).await?;
    let mut procs = p.fleet.pids();
    procs.push(loadgen());
    procs.push(("nats-server".into(), p.stack.nats.pid()));
    procs.push(("redis-server".into(), p.stack.redis.pid()));
    let inputs = inputs_for(&p.meta.inputs, s.rows);
    for &mode in &scenario.modes {
        for run in 0..s.runs {
            // A tenant per run, so that no result of an earlier run is counted.
            let tenant = format!("bench-{}-{run}", procs.len() + rand::random::<u16>() as usize);
            let pc = Arc::new(
                PipelineClient::start(p.client.clone(), scenario.model, &tenant, inputs.clone(), timeout()).await?,
            );
            let (stats, cpu, extra) = measure_pipeline(&p, mode, s.window, &procs, move |n| {
                let pc = pc.clone();
                async move { pc.task(n).await }
            })
            .await;
            rec.record(scenario, mode, s.rows, run, &stats, &cpu, extra)?;
        }
    }
    p.fleet.stop(Duration::from_secs(10));
    Ok(())
}

/// One measured run of `op` (one request to the pipeline), with the servers' NATS messages
/// and Redis commands per verified request (heartbeats and other background traffic included).
async fn measure_pipeline<F, Fut>(
    p: &Pipeline,
    mode: Mode,
    window: Window,
    procs: &[(String, u32)],
    op: F,
) -> (RunStats, CpuUse, Extra)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<sundara_bench::load::Stages, String>> + Send + 'static,
{
    let counters = || async {
        let nats = p.stack.nats.monitor_port.and_then(fleet::nats_message_counts);
        let redis = fleet::redis_command_count(&p.endpoints.redis_url).await;
        nats.zip(redis)
    };
    let by_client = || p.stack.nats.monitor_port.and_then(fleet::nats_messages_by_client);
    let before = counters().await;
    let clients_before = by_client();
    let cpu = CpuWindow::start(procs);
    let stats = drive(mode, window, op).await;
    let cpu = cpu.finish();
    let mut extra = Extra::new();
    if let (Some(b), Some(a), true) = (clients_before, by_client(), stats.total_ok > 0) {
        let n = stats.total_ok as f64;
        let per_task: serde_json::Map<String, serde_json::Value> = a
            .iter()
            .map(|(name, m)| (name.clone(), json!((m - b.get(name).copied().unwrap_or(0).min(*m)) as f64 / n)))
            .collect();
        extra.insert("nats_msgs_per_task_by_client".into(), serde_json::Value::Object(per_task));
    }
    if let Some((((in0, out0), r0), ((in1, out1), r1))) = before.zip(counters().await).filter(|_| stats.total_ok > 0) {
        let n = stats.total_ok as f64;
        extra.insert("nats_msgs_per_task".into(), json!(((in1 - in0) + (out1 - out0)) as f64 / n));
        extra.insert("redis_cmds_per_task".into(), json!((r1 - r0) as f64 / n));
    }
    (stats, cpu, extra)
}

/// How the tensor workloads' outputs are compared at k > 1.
fn tensor_rule() -> CompareRule {
    CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 }
}

/// The gateway's paths, each a system of its own in the records.
#[derive(Clone, Copy, Debug)]
enum GatewayPath {
    /// The NATS client path (as `run_pipeline` measures it), on the same pipeline.
    Nats,
    /// `POST /v2/models/{model}/infer` with JSON tensors in and out.
    KserveJson,
    /// The same with the binary tensor data extension in and out.
    KserveBinary,
}

impl GatewayPath {
    const ALL: [GatewayPath; 3] = [GatewayPath::Nats, GatewayPath::KserveJson, GatewayPath::KserveBinary];

    fn system(self) -> &'static str {
        match self {
            GatewayPath::Nats => "gateway-baseline-nats",
            GatewayPath::KserveJson => "gateway-kserve-json",
            GatewayPath::KserveBinary => "gateway-kserve-binary",
        }
    }
}

/// A KServe v2 infer request for `inputs`: its headers (after the request line) and body.
fn kserve_request(model: &str, inputs: &[Tensor], binary: bool) -> (String, Vec<u8>) {
    use sundara_gateway::kserve::{JsonTensor, Parameters};
    let line = format!("POST /v2/models/{model}/infer HTTP/1.1\r\nAuthorization: Bearer {GATEWAY_KEY}\r\n");
    if !binary {
        let tensors: Vec<JsonTensor> = inputs.iter().map(JsonTensor::from_tensor).collect();
        let body = json!({ "inputs": tensors }).to_string().into_bytes();
        return (format!("{line}Content-Type: application/json\r\n"), body);
    }
    let tensors: Vec<JsonTensor> = inputs
        .iter()
        .map(|t| JsonTensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            datatype: sundara_gateway::kserve::datatype(t.dtype).to_string(),
            data: serde_json::Value::Null,
            parameters: Parameters { binary_data_size: Some(t.data.len() as u64), ..Default::default() },
        })
        .collect();
    let mut body = json!({ "inputs": tensors, "parameters": { "binary_data_output": true } }).to_string().into_bytes();
    let header = body.len();
    for t in inputs {
        body.extend_from_slice(&t.data);
    }
    (format!("{line}Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header}\r\n"), body)
}

/// Whether a KServe answer is a verified result (and, in JSON, has outputs).
fn check_kserve(answer: &sundara_bench::http::Answer, binary: bool) -> Result<(), String> {
    if answer.status != 200 {
        return Err(format!("status {}: {}", answer.status, String::from_utf8_lossy(&answer.body)));
    }
    if answer.verified.is_none() {
        return Err("no sundara-verified header".into());
    }
    if binary {
        match answer.json_length {
            Some(n) if answer.body.len() > n => Ok(()),
            _ => Err("no binary outputs".into()),
        }
    } else {
        let v: serde_json::Value = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
        if v["outputs"].as_array().is_some_and(|o| !o.is_empty()) { Ok(()) } else { Err("no outputs".into()) }
    }
}

/// Gateway overhead: one pipeline (k=1) and its gateway; for each mode and run, the NATS
/// client path, then KServe JSON, then KServe binary, so that the paths share the fleet
/// and the machine's state as closely as runs in turn can.
async fn run_gateway(
    s: &Settings,
    scenario: &Scenario,
    spec: PipelineSpec<'_>,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let mut p = Pipeline::start(&s.root, spec).await?;
    let gateway = p.start_gateway(&[]).await?;
    let mut procs = p.fleet.pids();
    procs.push(loadgen());
    procs.push(("nats-server".into(), p.stack.nats.pid()));
    procs.push(("redis-server".into(), p.stack.redis.pid()));
    let inputs = inputs_for(&p.meta.inputs, s.rows);
    let requests = |binary: bool| -> Arc<Vec<(String, Vec<u8>)>> {
        Arc::new(inputs.iter().map(|i| kserve_request(scenario.model, i, binary)).collect())
    };
    let (json_requests, binary_requests) = (requests(false), requests(true));
    for &mode in &scenario.modes {
        let Mode::Closed { concurrency } = mode else { continue };
        for run in 0..s.runs {
            for path in GatewayPath::ALL {
                let (stats, cpu, extra) = match path {
                    GatewayPath::Nats => {
                        let tenant = format!("bench-gw-{}-{run}", rand::random::<u32>());
                        let pc = Arc::new(
                            PipelineClient::start(p.client.clone(), scenario.model, &tenant, inputs.clone(), timeout())
                                .await?,
                        );
                        measure_pipeline(&p, mode, s.window, &procs, move |n| {
                            let pc = pc.clone();
                            // The HTTP paths report no stages: neither does this one, so that
                            // the three cost the load generator alike.
                            async move { pc.task(n).await.map(|_| None) }
                        })
                        .await
                    }
                    GatewayPath::KserveJson | GatewayPath::KserveBinary => {
                        let binary = matches!(path, GatewayPath::KserveBinary);
                        let requests = if binary { binary_requests.clone() } else { json_requests.clone() };
                        let client = Arc::new(HttpClient::new(gateway.addr, concurrency, timeout()));
                        measure_pipeline(&p, mode, s.window, &procs, move |n| {
                            let (client, requests) = (client.clone(), requests.clone());
                            async move {
                                let (head, body) = &requests[n as usize % requests.len()];
                                let answer = client.request(n as usize, head, body).await?;
                                check_kserve(&answer, binary).map(|()| None)
                            }
                        })
                        .await
                    }
                };
                rec.record_as(path.system(), Some(1), scenario, mode, s.rows, run, &stats, &cpu, extra)?;
            }
        }
    }
    p.fleet.stop(Duration::from_secs(10));
    Ok(())
}

/// The embeddings workload: each request's body and its tokens (special tokens included,
/// as `usage` counts them).
struct EmbeddingRequests {
    texts: Vec<Vec<String>>,
    bodies: Vec<Vec<u8>>,
    tokens: Vec<usize>,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl EmbeddingRequests {
    fn load(root: &Path) -> anyhow::Result<EmbeddingRequests> {
        let tokenizer = embeddings::load_tokenizer(&root.join(".cache/models").join(embeddings::TOKENIZER_FILE))?;
        let texts = embeddings::requests();
        let bodies = texts.iter().map(|t| embeddings::request_body(t)).collect();
        let tokens = texts
            .iter()
            .map(|t| embeddings::token_rows(&tokenizer, t).map(|rows| rows.iter().map(Vec::len).sum()))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?;
        Ok(EmbeddingRequests { texts, bodies, tokens, tokenizer: Arc::new(tokenizer) })
    }

    /// A run's texts/s and tokens/s (requests are sent in turn, so each counts alike: tokens
    /// per request is the corpus' mean).
    fn extra(&self, stats: &RunStats) -> Extra {
        let per_request = self.tokens.iter().sum::<usize>() as f64 / self.tokens.len() as f64;
        let mut extra = Extra::new();
        extra.insert("workload".into(), json!("embeddings"));
        extra.insert("texts_per_request".into(), json!(embeddings::TEXTS_PER_REQUEST));
        extra.insert("tokens_per_request".into(), json!(per_request));
        extra.insert("texts_per_s".into(), json!(stats.tasks_per_s * embeddings::TEXTS_PER_REQUEST as f64));
        extra.insert("tokens_per_s".into(), json!(stats.tasks_per_s * per_request));
        extra
    }
}

/// The embeddings' ceiling: `threads` threads, each with its own session of the model (one
/// intra-op thread), tokenizing each request's texts and running them as the gateway and
/// worker do (one tensor of the request's texts padded to its longest).
fn run_embeddings_in_process(
    s: &Settings,
    scenario: &Scenario,
    path: &Path,
    threads: usize,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let work = Arc::new(EmbeddingRequests::load(&s.root)?);
    for run in 0..s.runs {
        let cpu = CpuWindow::start(&[loadgen()]);
        let w = work.clone();
        let stats = baseline::ort_in_process_with(path, threads, s.window, move |session, n| {
            let inputs = embeddings::task_inputs(&w.tokenizer, &w.texts[n % w.texts.len()])
                .map_err(baseline::BaselineError::Request)?;
            session.run(&inputs)?;
            Ok(())
        })?;
        let extra = work.extra(&stats);
        rec.record(scenario, Mode::Closed { concurrency: threads }, s.rows, run, &stats, &cpu.finish(), extra)?;
    }
    Ok(())
}

/// `/v1/embeddings` through the gateway and the pipeline (the model registered with the
/// cosine rule, as `sundara up` registers it), requests sent in turn from every client.
async fn run_embeddings(
    s: &Settings,
    scenario: &Scenario,
    spec: PipelineSpec<'_>,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let work = Arc::new(EmbeddingRequests::load(&s.root)?);
    let mut p = Pipeline::start(&s.root, spec).await?;
    p.preload().await?;
    let tokenizer = s.root.join(".cache/models").join(embeddings::TOKENIZER_FILE);
    let gateway = p.start_gateway(&[(scenario.model.to_string(), tokenizer)]).await?;
    let mut procs = p.fleet.pids();
    procs.push(loadgen());
    procs.push(("nats-server".into(), p.stack.nats.pid()));
    procs.push(("redis-server".into(), p.stack.redis.pid()));
    let head = format!(
        "POST /v1/embeddings HTTP/1.1\r\nAuthorization: Bearer {GATEWAY_KEY}\r\nContent-Type: application/json\r\n"
    );
    let head = Arc::new(head);
    for &mode in &scenario.modes {
        let Mode::Closed { concurrency } = mode else { continue };
        // Priming, unrecorded: a worker loads a session per thread only as the backlog asks,
        // each warmed up at its largest batch (32 rows of 512 tokens: seconds for this model).
        let client = Arc::new(HttpClient::new(gateway.addr, concurrency, timeout()));
        let prime = Window { warmup: Duration::ZERO, measure: EMBEDDING_PRIMING, drain: s.window.drain };
        let primed = drive(mode, prime, embeddings_op(client, work.clone(), head.clone())).await;
        println!(
            "    primed for {:?}: {:.1} requests/s, {} errors{}",
            EMBEDDING_PRIMING,
            primed.tasks_per_s,
            primed.errors,
            primed.first_error.map(|e| format!(" (first: {e})")).unwrap_or_default()
        );
        for run in 0..s.runs {
            let client = Arc::new(HttpClient::new(gateway.addr, concurrency, timeout()));
            let op = embeddings_op(client, work.clone(), head.clone());
            let (stats, cpu, mut extra) = measure_pipeline(&p, mode, s.window, &procs, op).await;
            extra.extend(work.extra(&stats));
            rec.record(scenario, mode, s.rows, run, &stats, &cpu, extra)?;
        }
    }
    p.fleet.stop(Duration::from_secs(10));
    Ok(())
}

/// One `/v1/embeddings` request per call, on lane `n` of `client`; the requests go out in
/// turn (whatever the lane), so that every one is sent as often.
fn embeddings_op(
    client: Arc<HttpClient>,
    w: Arc<EmbeddingRequests>,
    head: Arc<String>,
) -> impl Fn(u64) -> futures::future::BoxFuture<'static, Result<sundara_bench::load::Stages, String>> + Send + Sync + 'static
{
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    move |lane| {
        let (client, w, head) = (client.clone(), w.clone(), head.clone());
        let i = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize % w.bodies.len();
        Box::pin(async move {
            let answer = client.request(lane as usize, &head, &w.bodies[i]).await?;
            check_embeddings(&answer, w.texts[i].len(), w.tokens[i]).map(|()| None)
        })
    }
}

/// Whether an embeddings answer is verified and has `texts` embeddings and `tokens` of usage.
fn check_embeddings(answer: &sundara_bench::http::Answer, texts: usize, tokens: usize) -> Result<(), String> {
    if answer.status != 200 {
        return Err(format!("status {}: {}", answer.status, String::from_utf8_lossy(&answer.body)));
    }
    if answer.verified.is_none() {
        return Err("no sundara-verified header".into());
    }
    let v: serde_json::Value = serde_json::from_slice(&answer.body).map_err(|e| e.to_string())?;
    let got = (v["data"].as_array().map_or(0, Vec::len), v["usage"]["prompt_tokens"].as_u64());
    if got != (texts, Some(tokens as u64)) {
        return Err(format!("{got:?} embeddings and tokens, expected {texts} and {tokens}"));
    }
    Ok(())
}

/// One of the density scenarios' models: what the executor runs and its inputs.
struct DensityModel {
    name: &'static str,
    run: ModelRun,
    inputs: Vec<Vec<Tensor>>,
}

/// Each model's footprint as the worker measures it (heap growth across load and
/// warm-up), on an executor roomy enough that nothing is evicted.
async fn measure_footprints(models: &[DensityModel], threads: usize) -> anyhow::Result<Vec<(String, u64)>> {
    let roomy = sundara_worker::Executor::start("bench-probe", ExecutorConfig::cpu(threads, 1 << 34, 16));
    for m in models {
        roomy.run(&m.run, m.inputs[0].clone()).await.with_context(|| format!("probing {}", m.name))?;
    }
    let report = roomy.reports().borrow().clone();
    shut_down(roomy).await;
    if report.footprints.len() != models.len() {
        bail!("expected {} footprints, the executor reported {:?}", models.len(), report.footprints);
    }
    Ok(report.footprints)
}

/// The slice budget of a density scenario: room for every model twice over (`fit`: one
/// session per thread, nothing evicted after warm-up), or the largest model plus half of
/// the second largest (`tight`: those two are never loaded together, so bursts swap them).
fn density_budget(footprints: &[(String, u64)], fit: bool) -> u64 {
    let mut sizes: Vec<u64> = footprints.iter().map(|(_, b)| *b).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    if fit { 2 * sizes.iter().sum::<u64>() } else { sizes[0] + sizes.get(1).copied().unwrap_or(0) / 2 }
}

/// `bench pipeline`'s density scenarios: one executor serving the four demo models at once.
/// Task n (in the order sent) goes to model (n / DENSITY_BURST) % 4, so that the models
/// take turns in bursts and a budget short of all four must evict and reload.
async fn run_density(
    s: &Settings,
    scenario: &Scenario,
    threads: usize,
    fit: bool,
    rec: &mut Recorder,
) -> anyhow::Result<()> {
    let mut models = Vec::new();
    for name in DENSITY_MODELS {
        let path = model_path(&s.root, name)?;
        let model = sundara_runtime::Model::load(&std::fs::read(&path)?, 1)?;
        let inputs = inputs_for(&model.inputs, s.rows);
        models.push(DensityModel { name, run: ModelRun::new(name, Arc::new(path)), inputs });
    }
    let footprints = s.footprints.get_or_try_init(|| measure_footprints(&models, threads)).await?.clone();
    let budget = density_budget(&footprints, fit);
    let models = Arc::new(models);
    for &mode in &scenario.modes {
        let Mode::Closed { concurrency } = mode else { continue };
        let executor = sundara_worker::Executor::start("bench", ExecutorConfig::cpu(threads, budget, concurrency));
        for run in 0..s.runs {
            // The slice's counters at the start and the end of the measured window.
            let reports = executor.reports();
            let window = s.window;
            let sampler = tokio::spawn(async move {
                tokio::time::sleep(window.warmup).await;
                let start = reports.borrow().clone();
                tokio::time::sleep(window.measure).await;
                (start, reports.borrow().clone())
            });
            let cpu = CpuWindow::start(&[loadgen()]);
            let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let (executor, models) = (executor.clone(), models.clone());
            let stats = closed_loop(concurrency, s.window, move |_| {
                let (executor, models) = (executor.clone(), models.clone());
                let n = sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    let m = &models[(n / DENSITY_BURST) as usize % models.len()];
                    let x = m.inputs[n as usize % m.inputs.len()].clone();
                    executor.run(&m.run, x).await.map(|_| None).map_err(|e| format!("{}: {e}", m.name))
                }
            })
            .await;
            let cpu = cpu.finish();
            let (start, end) = sampler.await?;
            let extra = density_extra(&footprints, budget, &start, &end);
            rec.record(scenario, mode, s.rows, run, &stats, &cpu, extra)?;
            println!(
                "    budget {:.1} MiB for {:.1} MiB of models; {} resident; {} loads, {} evictions in the window",
                mib(budget),
                mib(footprints.iter().map(|(_, b)| b).sum()),
                end.loaded.len(),
                end.loads - start.loads,
                end.evictions - start.evictions
            );
        }
        shut_down(executor).await;
    }
    Ok(())
}

/// A density run's extra figures: the models' footprints, the slice's budget and use, and
/// its loads and evictions between `start` and `end` of the measured window.
fn density_extra(footprints: &[(String, u64)], budget: u64, start: &SliceReport, end: &SliceReport) -> Extra {
    let mut extra = Extra::new();
    extra.insert("models_served".into(), json!(DENSITY_MODELS.len()));
    extra.insert("models_bytes".into(), json!(footprints.iter().map(|(_, b)| b).sum::<u64>()));
    extra.insert(
        "footprints".into(),
        json!(footprints.iter().map(|(m, b)| (m.clone(), json!(b))).collect::<serde_json::Map<_, _>>()),
    );
    // The slice's own measurements (the largest of its loads of each model) next to the probe's.
    extra.insert(
        "slice_footprints".into(),
        json!(end.footprints.iter().map(|(m, b)| (m.clone(), json!(b))).collect::<serde_json::Map<_, _>>()),
    );
    extra.insert("memory_budget".into(), json!(budget));
    extra.insert("memory_used".into(), json!(end.memory_used));
    extra.insert("resident_models".into(), json!(end.loaded.len()));
    extra.insert("resident".into(), json!(end.loaded.iter().map(|(m, _)| m).collect::<Vec<_>>()));
    extra.insert("loads".into(), json!(end.loads - start.loads));
    extra.insert("evictions".into(), json!(end.evictions - start.evictions));
    extra.insert("burst".into(), json!(DENSITY_BURST));
    if let Some(why) = &end.failed {
        extra.insert("slice_failed".into(), json!(why));
    }
    extra
}

/// Drops `executor` and waits until its threads have exited and its sessions are freed.
/// The worker measures a footprint as heap growth, so memory another executor frees
/// during a load would make that load look smaller than it is.
async fn shut_down(executor: sundara_worker::Executor) {
    let mut reports = executor.reports();
    drop(executor);
    // The report channel closes when the executor's shared state (sessions included) is dropped.
    let closed = async { while reports.changed().await.is_ok() {} };
    if tokio::time::timeout(Duration::from_secs(30), closed).await.is_err() {
        eprintln!("bench: an executor did not shut down within 30 s; later footprints may be off");
    }
}

fn timeout() -> Duration {
    Duration::from_secs(30)
}

async fn wait_for_responder(rr: &ResponderClient) -> anyhow::Result<()> {
    for _ in 0..500 {
        if rr.task(0).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the responder did not answer within 10 s")
}

async fn drive<F, Fut>(mode: Mode, window: Window, op: F) -> RunStats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<sundara_bench::load::Stages, String>> + Send + 'static,
{
    match mode {
        Mode::Closed { concurrency } => closed_loop(concurrency, window, op).await,
        Mode::Open { rate } => open_loop(rate, 20_000, window, op).await,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    sundara_common::init_logging("warn", Default::default());
    match cli.command {
        Cmd::Responder { nats, nats_ca, model, threads } => {
            let root = project_root();
            sundara_runtime::init(&sundara_runtime::find_library(std::slice::from_ref(&root))?)?;
            let mut endpoint = sundara_common::nats::NatsEndpoint::open(nats);
            endpoint.tls = nats_ca.map(sundara_common::tls::NatsTls::pinned);
            Ok(baseline::serve_responder(&endpoint, model, threads).await?)
        }
        Cmd::Corpus { out } => {
            let tokenizer =
                embeddings::load_tokenizer(&project_root().join(".cache/models").join(embeddings::TOKENIZER_FILE))?;
            std::fs::write(&out, embeddings::corpus_document(&tokenizer)?.to_string()).context("writing --out")?;
            Ok(())
        }
        Cmd::Pipeline { out, runs, warmup_s, measure_s, only, rows } => {
            let root = project_root();
            sundara_runtime::init(&sundara_runtime::find_library(std::slice::from_ref(&root))?)?;
            fleet::sundara_binary()?;
            let window = Window {
                warmup: Duration::from_secs_f64(warmup_s),
                measure: Duration::from_secs_f64(measure_s),
                drain: Duration::from_secs(10),
            };
            let settings = Settings { root, runs: runs.max(1), window, rows, footprints: Default::default() };
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&out).context("opening --out")?;
            let mut rec = Recorder { out: file };
            for scenario in scenarios() {
                if only.as_deref().is_some_and(|o| !scenario.name.contains(o)) {
                    continue;
                }
                run_scenario(&settings, &scenario, &mut rec).await.with_context(|| scenario.name.clone())?;
            }
            Ok(())
        }
    }
}
