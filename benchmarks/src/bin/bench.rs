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
use sundara_bench::cpu::CpuWindow;
use sundara_bench::fleet::{Fleet, WorkerSpec};
use sundara_bench::load::{Mode, RunStats, Window, closed_loop, open_loop};
use sundara_bench::{baseline, fleet};
use sundara_common::{Registry, nats};
use sundara_schemas::{CompareRule, Policy, Tensor, TensorSpec};
use sundara_worker::{ExecutorConfig, ModelRun};

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
    /// Serve the bare request/reply baseline on `bench.infer`.
    Responder {
        #[arg(long)]
        nats: String,
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
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Sundara { .. } => "sundara",
            System::OrtInProcess { .. } => "ort-in-process",
            System::NatsRequestReply { .. } => "nats-request-reply",
            System::WorkerExecutor { max_batch: 1, .. } => "worker-batch-1",
            System::WorkerExecutor { .. } => "worker-batch-32",
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
        per_task: Option<(f64, f64)>,
    ) -> anyhow::Result<()> {
        let (concurrency, rate) = match mode {
            Mode::Closed { concurrency } => (Some(concurrency), None),
            Mode::Open { rate } => (None, Some(rate)),
        };
        let k = match scenario.system {
            System::Sundara { k, .. } => Some(k),
            _ => None,
        };
        let loadgen = cpu.processes.iter().find(|(n, _)| n == "loadgen").map_or(0.0, |(_, c)| *c);
        let line = json!({
            "system": scenario.system.name(),
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
            "nats_msgs_per_task": per_task.map(|p| p.0),
            "redis_cmds_per_task": per_task.map(|p| p.1),
        });
        writeln!(self.out, "{line}")?;
        let what = match mode {
            Mode::Closed { concurrency } => format!("C={concurrency}"),
            Mode::Open { rate } => format!("R={rate}/s"),
        };
        println!(
            "{:<30} {:<9} run {run}: {:>9.0} tasks/s  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  errors {}  dropped {}  loadgen {:.2} of {:.2} cores",
            scenario.name,
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
}

async fn run_scenario(s: &Settings, scenario: &Scenario, rec: &mut Recorder) -> anyhow::Result<()> {
    let path = model_path(&s.root, scenario.model)?;
    let me = ("loadgen".to_string(), std::process::id());
    match &scenario.system {
        System::OrtInProcess { threads } => {
            let model = sundara_runtime::Model::load(&std::fs::read(&path)?, 1)?;
            let inputs = inputs_for(&model.inputs, s.rows);
            for run in 0..s.runs {
                let cpu = CpuWindow::start(std::slice::from_ref(&me));
                let stats = baseline::ort_in_process(&path, *threads, &inputs, s.window).map_err(anyhow::Error::msg)?;
                rec.record(scenario, Mode::Closed { concurrency: *threads }, s.rows, run, &stats, &cpu.finish(), None)?;
            }
        }
        System::WorkerExecutor { threads, max_batch } => {
            let model = sundara_runtime::Model::load(&std::fs::read(&path)?, 1)?;
            let inputs = Arc::new(inputs_for(&model.inputs, s.rows));
            let model_run = ModelRun::new("model", Arc::new(path.clone()));
            for &mode in &scenario.modes {
                let Mode::Closed { concurrency } = mode else { continue };
                let mut config = ExecutorConfig::cpu(*threads, sundara_worker::default_cpu_memory(1), concurrency);
                config.max_batch = *max_batch;
                let executor = sundara_worker::Executor::start("bench", config);
                for run in 0..s.runs {
                    let cpu = CpuWindow::start(std::slice::from_ref(&me));
                    let (executor, inputs, model_run) = (executor.clone(), inputs.clone(), model_run.clone());
                    let stats = closed_loop(concurrency, s.window, move |n| {
                        let (executor, inputs, model_run) = (executor.clone(), inputs.clone(), model_run.clone());
                        async move {
                            let x = inputs[n as usize % inputs.len()].clone();
                            executor.run(&model_run, x).await.map(|_| None).map_err(|e| e.to_string())
                        }
                    })
                    .await;
                    rec.record(scenario, mode, s.rows, run, &stats, &cpu.finish(), None)?;
                }
            }
        }
        System::NatsRequestReply { threads } => {
            let stack = LocalStack::start(&s.root)?;
            let url = stack.endpoints().nats_url;
            let mut responder = std::process::Command::new(std::env::current_exe()?)
                .args(["responder", "--nats", &url, "--model"])
                .arg(&path)
                .args(["--threads", &threads.to_string()])
                .spawn()?;
            let client = nats::connect(&url, "bench-client").await?;
            let model = sundara_runtime::Model::load(&std::fs::read(&path)?, 1)?;
            let rr = Arc::new(ResponderClient::new(client.clone(), inputs_for(&model.inputs, s.rows), timeout()));
            wait_for_responder(&rr).await?;
            let procs = vec![me.clone(), ("responder".to_string(), responder.id())];
            for &mode in &scenario.modes {
                for run in 0..s.runs {
                    let cpu = CpuWindow::start(&procs);
                    let rr = rr.clone();
                    let stats = drive(mode, s.window, move |n| {
                        let rr = rr.clone();
                        async move { rr.task(n).await }
                    })
                    .await;
                    rec.record(scenario, mode, s.rows, run, &stats, &cpu.finish(), None)?;
                }
            }
            let _ = responder.kill();
            let _ = responder.wait();
        }
        System::Sundara { k, workers, threads } => {
            let stack = LocalStack::start(&s.root)?;
            let endpoints = stack.endpoints();
            let client = nats::connect(&endpoints.nats_url, "bench-client").await?;
            let js = async_nats::jetstream::new(client.clone());
            nats::provision(&js, &nats::Retention::default()).await?;
            let registry = Registry::open(&js).await?;
            let policy = Policy { redundancy: *k, rule: CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 } };
            let meta = sundara::models::push(&registry, &path, scenario.model, "1", policy, Default::default()).await?;
            let scratch = tempfile::Builder::new().prefix("sundara-bench-").tempdir()?;
            let specs: Vec<WorkerSpec> =
                (1..=*workers).map(|i| WorkerSpec { id: format!("miner-{i}"), threads: *threads }).collect();
            let mut fleet = Fleet::start(&endpoints, &specs, &scratch.path().join("cache"), scratch.path())
                .map_err(anyhow::Error::msg)?;
            fleet.ready(&client, Duration::from_secs(30)).await.map_err(anyhow::Error::msg)?;
            let mut procs = fleet.pids();
            procs.push(me.clone());
            procs.push(("nats-server".into(), stack.nats.pid()));
            procs.push(("redis-server".into(), stack.redis.pid()));
            let inputs = inputs_for(&meta.inputs, s.rows);
            for &mode in &scenario.modes {
                for run in 0..s.runs {
                    // A tenant per run, so that no result of an earlier run is counted.
                    let tenant = format!("bench-{}-{run}", procs.len() + rand::random::<u16>() as usize);
                    let pc = PipelineClient::start(client.clone(), scenario.model, &tenant, inputs.clone(), timeout())
                        .await
                        .map_err(anyhow::Error::msg)?;
                    let pc = Arc::new(pc);
                    let counters = || async {
                        let nats = stack.nats.monitor_port.and_then(fleet::nats_message_counts);
                        let redis = fleet::redis_command_count(&endpoints.redis_url).await;
                        nats.zip(redis)
                    };
                    let before = counters().await;
                    let cpu = CpuWindow::start(&procs);
                    let stats = drive(mode, s.window, move |n| {
                        let pc = pc.clone();
                        async move { pc.task(n).await }
                    })
                    .await;
                    let cpu = cpu.finish();
                    // Server-side work per verified task (heartbeats and other background traffic included).
                    let per_task = before.zip(counters().await).filter(|_| stats.total_ok > 0).map(
                        |(((in0, out0), r0), ((in1, out1), r1))| {
                            let n = stats.total_ok as f64;
                            (((in1 - in0) + (out1 - out0)) as f64 / n, (r1 - r0) as f64 / n)
                        },
                    );
                    rec.record(scenario, mode, s.rows, run, &stats, &cpu, per_task)?;
                }
            }
            fleet.stop(Duration::from_secs(10));
        }
    }
    Ok(())
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
    sundara_common::init_logging("warn");
    match cli.command {
        Cmd::Responder { nats, model, threads } => {
            let root = project_root();
            sundara_runtime::init(&sundara_runtime::find_library(std::slice::from_ref(&root))?)?;
            baseline::serve_responder(&nats, model, threads).await.map_err(anyhow::Error::msg)
        }
        Cmd::Pipeline { out, runs, warmup_s, measure_s, only, rows } => {
            let root = project_root();
            sundara_runtime::init(&sundara_runtime::find_library(std::slice::from_ref(&root))?)?;
            fleet::sundara_binary().map_err(anyhow::Error::msg)?;
            let window = Window {
                warmup: Duration::from_secs_f64(warmup_s),
                measure: Duration::from_secs_f64(measure_s),
                drain: Duration::from_secs(10),
            };
            let settings = Settings { root, runs: runs.max(1), window, rows };
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
