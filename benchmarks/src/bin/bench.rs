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
use sundara_bench::load::{Mode, RunStats, Window, closed_loop, open_loop};
use sundara_bench::pipeline::{Pipeline, PipelineSpec};
use sundara_bench::{baseline, fleet, mib};
use sundara_common::nats;
use sundara_schemas::{Tensor, TensorSpec};
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
    /// One executor (no NATS) serving the four demo models in bursts, with memory for all
    /// of them (`fit`) or too little for its two largest at once (so that it must swap).
    WorkerDensity { threads: usize, fit: bool },
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Sundara { .. } => "sundara",
            System::OrtInProcess { .. } => "ort-in-process",
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
        let (concurrency, rate) = match mode {
            Mode::Closed { concurrency } => (Some(concurrency), None),
            Mode::Open { rate } => (None, Some(rate)),
        };
        let k = match scenario.system {
            System::Sundara { k, .. } => Some(k),
            _ => None,
        };
        let loadgen = cpu.processes.iter().find(|(n, _)| n == "loadgen").map_or(0.0, |(_, c)| *c);
        let mut line = json!({
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
    match &scenario.system {
        System::OrtInProcess { threads } => run_ort_in_process(s, scenario, &path, *threads, rec),
        System::WorkerDensity { .. } => unreachable!("run above"),
        System::WorkerExecutor { threads, max_batch } => {
            run_worker_executor(s, scenario, &path, (*threads, *max_batch), rec).await
        }
        System::NatsRequestReply { threads } => run_nats_request_reply(s, scenario, &path, *threads, rec).await,
        System::Sundara { k, workers, threads } => {
            let spec = PipelineSpec {
                model_path: &path,
                model: scenario.model,
                k: *k,
                workers: *workers,
                threads: *threads,
                retention: nats::Retention::default(),
                client_name: "bench-client",
                scratch_prefix: "sundara-bench-",
            };
            run_pipeline(s, scenario, spec, rec).await
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
            let pc =
                PipelineClient::start(p.client.clone(), scenario.model, &tenant, inputs.clone(), timeout()).await?;
            let (stats, cpu, extra) = measure_pipeline(&p, Arc::new(pc), mode, s.window, &procs).await;
            rec.record(scenario, mode, s.rows, run, &stats, &cpu, extra)?;
        }
    }
    p.fleet.stop(Duration::from_secs(10));
    Ok(())
}

/// One measured run through `pc`, with the servers' NATS messages and Redis commands per
/// verified task (heartbeats and other background traffic included).
async fn measure_pipeline(
    p: &Pipeline,
    pc: Arc<PipelineClient>,
    mode: Mode,
    window: Window,
    procs: &[(String, u32)],
) -> (RunStats, CpuUse, Extra) {
    let counters = || async {
        let nats = p.stack.nats.monitor_port.and_then(fleet::nats_message_counts);
        let redis = fleet::redis_command_count(&p.endpoints.redis_url).await;
        nats.zip(redis)
    };
    let before = counters().await;
    let cpu = CpuWindow::start(procs);
    let stats = drive(mode, window, move |n| {
        let pc = pc.clone();
        async move { pc.task(n).await }
    })
    .await;
    let cpu = cpu.finish();
    let mut extra = Extra::new();
    if let Some((((in0, out0), r0), ((in1, out1), r1))) = before.zip(counters().await).filter(|_| stats.total_ok > 0) {
        let n = stats.total_ok as f64;
        extra.insert("nats_msgs_per_task".into(), json!(((in1 - in0) + (out1 - out0)) as f64 / n));
        extra.insert("redis_cmds_per_task".into(), json!((r1 - r0) as f64 / n));
    }
    (stats, cpu, extra)
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
