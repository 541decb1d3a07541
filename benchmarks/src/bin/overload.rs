//! `overload`: what the pipeline does when offered more than it can verify, and whether
//! its memory stays flat over a long run below capacity.
//!
//! One run: start a private NATS + Redis and the fleet (each service its own `sundara`
//! process), measure the capacity in a closed loop at saturation, restart ingress with a
//! fleet bound on tasks in flight (`--max-in-flight`, by default 2 s of that capacity),
//! then offer `--load` × capacity in an open loop for `--secs` seconds while sampling every
//! process's resident memory once a second. Writes `benchmarks/results/overload-<load>.json`
//! and `.md`.
//!
//! ```sh
//! cargo build --release -p sundara -p sundara-bench
//! target/release/overload --load 3.0 --secs 60    # overload: typed rejections, goodput
//! target/release/overload --load 0.7 --secs 600   # soak: memory flat
//! ```

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use rand::SeedableRng;
use serde_json::{Value, json};
use sundara::stack::project_root;
use sundara_bench::client::PipelineClient;
use sundara_bench::cpu::{CpuUse, CpuWindow};
use sundara_bench::fleet::{self, ServiceOptions};
use sundara_bench::load::{RunStats, Window, closed_loop};
use sundara_bench::pipeline::{Pipeline, PipelineSpec};
use sundara_bench::{Summary, mib};
use sundara_common::nats;
use sundara_schemas::{
    FailureCode, MAX_MESSAGE_BYTES, ResultStatus, SubmitOutcome, SubmitReply, SubmitRequest, Tensor, decode, encode,
    subjects as subj,
};
use tokio::sync::Semaphore;

#[derive(Parser, Debug)]
struct Cli {
    /// Offered load, as a multiple of the capacity measured in the same run.
    #[arg(long, default_value_t = 3.0)]
    load: f64,
    /// Length of the offered-load window (s).
    #[arg(long, default_value_t = 60.0)]
    secs: f64,
    /// The fleet's bound on tasks in flight (ingress `--max-in-flight`), in seconds of the
    /// measured capacity.
    #[arg(long, default_value_t = 2.0)]
    bound_s: f64,
    /// A fixed bound on tasks in flight instead of `--bound-s`.
    #[arg(long)]
    max_in_flight: Option<u64>,
    /// Messages kept in each per-task history stream (`Retention::history_max_msgs`; -1:
    /// their age limits alone). A soak needs a cap to show the broker's memory level off.
    #[arg(long, default_value_t = -1)]
    history_max_msgs: i64,
    /// Seconds the history streams (OUTCOMES, RESULTS, VERDICTS, REWARDS, DEAD) keep each
    /// message (their `Retention` ages; default: a day for outcomes and results, 30 days
    /// for the records). A soak shorter than the defaults sets a shorter one to show the
    /// broker level off.
    #[arg(long)]
    history_max_age_s: Option<u64>,
    /// Seconds a task stays in TASKS after its deadline (ingress `--task-linger-secs`).
    #[arg(long)]
    task_linger_s: Option<u64>,
    /// Requests in flight while measuring capacity (closed loop).
    #[arg(long, default_value_t = 64)]
    capacity_concurrency: usize,
    /// Measured window of the capacity run (s), after `--warmup-s`.
    #[arg(long, default_value_t = 10.0)]
    capacity_secs: f64,
    #[arg(long, default_value_t = 3.0)]
    warmup_s: f64,
    /// Redundancy: miners per task.
    #[arg(long, default_value_t = 2)]
    k: u8,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Inference threads per worker.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value = "mlp")]
    model: String,
    /// Submissions awaiting ingress' reply at most; a send due while this many are
    /// outstanding is skipped and counted as generator lag.
    #[arg(long, default_value_t = 4096)]
    max_outstanding: usize,
    /// Each task's deadline (its `timeout_ms`).
    #[arg(long, default_value_t = 30.0)]
    task_timeout_s: f64,
    /// Longest wait after the window for the results of accepted tasks.
    #[arg(long, default_value_t = 45.0)]
    straggler_s: f64,
    /// A process's memory counts as flat if it grows by less than this over the second
    /// half of the window (least-squares slope, MiB per minute).
    #[arg(long, default_value_t = 1.0)]
    flat_mib_per_min: f64,
    /// Where `overload-<load>.json` and `.md` go (default: benchmarks/results).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// How long ingress has to answer one submission before it counts as a transport error.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// A send this late against its schedule counts as generator lag (it is still sent, and
/// its latency still counts from the schedule).
const LATE: Duration = Duration::from_millis(10);

/// One accepted task (or a result whose acceptance was never seen), keyed by task id.
#[derive(Clone, Copy, Default)]
struct TaskState {
    /// µs since the window's start when the submission was scheduled, once ingress has
    /// answered `Accepted` for it.
    scheduled_us: Option<u64>,
    results: u32,
    /// µs since the window's start when the first result arrived.
    first_result_us: u64,
    first: Option<Outcome>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Verified,
    Failed(FailureCode),
}

/// What the submissions got back from ingress.
#[derive(Default)]
struct Replies {
    /// Latency (scheduled send → reply, µs) per reject code.
    rejected: BTreeMap<&'static str, Vec<u64>>,
    /// Latency of `Accepted` replies (µs).
    accepted: Vec<u64>,
    /// Accepted replies that said `duplicate` (none expected: no request ids are sent).
    duplicate_accepts: u64,
    transport_errors: BTreeMap<String, u64>,
    first_transport_error: Option<String>,
    /// Replies per second of the window, by kind (index = second).
    accepted_per_s: Vec<u64>,
    rejected_per_s: Vec<u64>,
}

fn bump(v: &mut Vec<u64>, i: usize) {
    if v.len() <= i {
        v.resize(i + 1, 0);
    }
    v[i] += 1;
}

/// Task ids are 32 hex digits; anything else is hashed (never expected).
fn key(task_id: &str) -> u128 {
    u128::from_str_radix(task_id, 16).unwrap_or_else(|_| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        task_id.hash(&mut h);
        h.finish() as u128 | (1 << 127)
    })
}

/// One sample of every process's memory.
struct Sample {
    t_s: f64,
    rss: Vec<Option<u64>>,
    /// Tasks counted in flight by admission (`ZCARD sundara:inflight:tasks`).
    in_flight: Option<u64>,
    /// Keys in Redis.
    keys: Option<u64>,
    /// Bytes JetStream stores on disk, all streams together (`/jsz`'s `storage`).
    store: Option<u64>,
}

/// What the servers hold: JetStream streams and Redis' keys and memory.
#[derive(serde::Serialize)]
struct ServerState {
    streams: Option<Vec<fleet::StreamState>>,
    redis_keys: Option<u64>,
    redis_used_memory_mib: Option<f64>,
}

/// Redis' keys counted by prefix (up to the second `:`, so `sundara:taskw:<id>` counts
/// under `sundara:taskw`), to see what grows with tasks.
async fn redis_key_prefixes(redis_url: &str) -> Option<BTreeMap<String, u64>> {
    let mut con = redis::Client::open(redis_url).ok()?.get_multiplexed_async_connection().await.ok()?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("COUNT").arg(1000).query_async(&mut con).await.ok()?;
        for k in keys {
            let prefix = k.splitn(3, ':').take(2).collect::<Vec<_>>().join(":");
            *counts.entry(prefix).or_default() += 1;
        }
        if next == 0 {
            return Some(counts);
        }
        cursor = next;
    }
}

async fn server_state(monitor_port: Option<u16>, redis_url: &str) -> ServerState {
    let redis = fleet::redis_memory(redis_url).await;
    ServerState {
        streams: monitor_port.and_then(fleet::nats_streams),
        redis_keys: redis.map(|r| r.0),
        redis_used_memory_mib: redis.map(|r| mib(r.1)),
    }
}

struct RssStats {
    process: String,
    start: f64,
    max: f64,
    end: f64,
    after: f64,
    slope: f64,
}

/// Least-squares slope of `ys` against `xs`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

fn rss_stats(names: &[String], samples: &[Sample], secs: f64) -> Vec<RssStats> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let series: Vec<(f64, f64)> = samples.iter().filter_map(|s| s.rss[i].map(|b| (s.t_s, mib(b)))).collect();
            series_stats(name, &series, secs)
        })
        .collect()
}

/// What JetStream stores on disk over the run, as a process's memory is summed up.
fn store_stats(samples: &[Sample], secs: f64) -> Option<RssStats> {
    let series: Vec<(f64, f64)> = samples.iter().filter_map(|s| s.store.map(|b| (s.t_s, mib(b)))).collect();
    (!series.is_empty()).then(|| series_stats(STORE, &series, secs))
}

/// The memory table's row name of JetStream's store on disk.
const STORE: &str = "JetStream store (disk)";

/// `series` (seconds, MiB) of a window of `secs`, summed up: first, largest, last in the
/// window and last of all, and the slope (MiB/min) over the window's second half.
fn series_stats(name: &str, series: &[(f64, f64)], secs: f64) -> RssStats {
    let in_window: Vec<(f64, f64)> = series.iter().copied().filter(|p| p.0 <= secs + 0.5).collect();
    let second_half: Vec<(f64, f64)> =
        in_window.iter().filter(|p| p.0 >= secs / 2.0).map(|&(t, m)| (t / 60.0, m)).collect();
    RssStats {
        process: name.to_string(),
        start: series.first().map_or(0.0, |p| p.1),
        max: series.iter().map(|p| p.1).fold(0.0, f64::max),
        end: in_window.last().map_or(0.0, |p| p.1),
        after: series.last().map_or(0.0, |p| p.1),
        slope: slope(&second_half),
    }
}

fn summary_json(s: &Summary) -> Value {
    json!({"count": s.count, "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms, "max_ms": s.max_ms, "mean_ms": s.mean_ms})
}

/// Three significant figures, as the README's tables print them.
fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn load_label(load: f64) -> String {
    if (load * 10.0).fract().abs() < 1e-9 { format!("{load:.1}") } else { format!("{load}") }
}

impl Cli {
    /// Each task's deadline.
    fn task_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.task_timeout_s)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !(cli.load > 0.0 && cli.secs > 0.0) {
        bail!("--load and --secs must be positive");
    }
    sundara_common::init_logging("warn", Default::default());
    let root = project_root();
    sundara_runtime::init(&sundara_runtime::find_library(std::slice::from_ref(&root))?)?;
    fleet::sundara_binary()?;
    let model_path = root.join(".cache/models").join(format!("{}.onnx", cli.model));
    if !model_path.exists() {
        bail!("{} is missing: run scripts/setup", model_path.display());
    }
    let out_dir = cli.out_dir.clone().unwrap_or_else(|| root.join("benchmarks/results"));

    // The stack and the fleet, as `bench pipeline` runs them.
    let spec = PipelineSpec {
        model_path: &model_path,
        model: &cli.model,
        k: cli.k,
        rule: sundara_schemas::CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 },
        batching: sundara_schemas::Batching::default(),
        workers: cli.workers,
        threads: cli.threads,
        retention: retention_of(&cli),
        client_name: "overload-client",
        scratch_prefix: "sundara-overload-",
    };
    let mut pipeline = Pipeline::start(&root, spec).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let inputs: Vec<_> = (0..64).map(|_| sundara::models::sample_inputs(&pipeline.meta.inputs, 1, &mut rng)).collect();

    let cap = measure_capacity(&cli, &pipeline, &inputs).await?;
    let offer = bound_ingress(&cli, &mut pipeline, cap.tasks_per_s).await?;
    let offered = offer_load(&cli, &pipeline, &inputs, offer.rate).await?;
    pipeline.fleet.stop(Duration::from_secs(10));

    // 4. Figures.
    let figures = Figures::new(&cli, &cap, &offered);
    let record = record_json(&cli, &cap, &offer, &offered, &figures);

    // 5. Summary, JSON and Markdown.
    let label = load_label(cli.load);
    let md = summary_table(&cli, &cap, &offer, &offered, &figures)
        + &memory_table(&cli, &offered, &figures)
        + &servers_table(&offered);
    println!("\n{md}");
    write_report(&out_dir, &label, &record, md)
}

/// The capacity measured in this run, and what the servers spent on it.
struct CapacityRun {
    stats: RunStats,
    tasks_per_s: f64,
    /// CPU of the servers (cores) over the whole capacity run, warm-up included.
    server_cores: f64,
    machine_cores: f64,
}

/// 1. Capacity: closed loop at saturation, in this run.
async fn measure_capacity(cli: &Cli, p: &Pipeline, inputs: &[Vec<Tensor>]) -> anyhow::Result<CapacityRun> {
    println!(
        "capacity: closed loop C={} for {} s after {} s of warm-up (k={}, {} workers × {} threads, model {})",
        cli.capacity_concurrency, cli.capacity_secs, cli.warmup_s, cli.k, cli.workers, cli.threads, cli.model
    );
    let tenant = format!("capacity-{}", rand::random::<u32>());
    let pc = PipelineClient::start(p.client.clone(), &cli.model, &tenant, inputs.to_vec(), cli.task_timeout()).await?;
    let pc = Arc::new(pc);
    let window = Window {
        warmup: Duration::from_secs_f64(cli.warmup_s),
        measure: Duration::from_secs_f64(cli.capacity_secs),
        drain: Duration::from_secs(10),
    };
    let mut servers = p.fleet.pids();
    servers.push(("nats-server".into(), p.stack.nats.pid()));
    servers.push(("redis-server".into(), p.stack.redis.pid()));
    // CPU of the whole capacity run (warm-up included): the servers' cost per verified task.
    let cpu = CpuWindow::start(&servers);
    let stats = closed_loop(cli.capacity_concurrency, window, move |n| {
        let pc = pc.clone();
        async move { pc.task(n).await }
    })
    .await;
    let cpu = cpu.finish();
    let capacity = stats.tasks_per_s;
    println!(
        "  {:.0} verified tasks/s, p50 {:.1} ms, p99 {:.1} ms, {} errors",
        capacity, stats.latency.p50_ms, stats.latency.p99_ms, stats.errors
    );
    if capacity < 1.0 {
        bail!("no capacity measured: {:?}", stats.first_error);
    }
    Ok(CapacityRun {
        tasks_per_s: capacity,
        server_cores: cpu.processes.iter().map(|(_, c)| c).sum(),
        machine_cores: cpu.machine_cores,
        stats,
    })
}

/// The fleet's bound on tasks in flight and the load offered against it.
struct Offer {
    bound: u64,
    /// Submissions per second.
    rate: f64,
}

/// The streams' bounds the run provisions them with.
fn retention_of(cli: &Cli) -> nats::Retention {
    let r = nats::Retention { history_max_msgs: cli.history_max_msgs, ..Default::default() };
    let age = cli.history_max_age_s;
    nats::HistoryArgs { outcomes_max_age_secs: age, results_max_age_secs: age, records_max_age_secs: age }.apply(r)
}

/// 2. Ingress again, with the fleet's bound on tasks in flight.
async fn bound_ingress(cli: &Cli, p: &mut Pipeline, capacity: f64) -> anyhow::Result<Offer> {
    let bound = cli.max_in_flight.unwrap_or_else(|| (capacity * cli.bound_s).ceil() as u64).max(1);
    let mut args = vec!["--max-in-flight".to_string(), bound.to_string()];
    if let Some(linger) = cli.task_linger_s {
        args.extend(["--task-linger-secs".to_string(), linger.to_string()]);
    }
    let ingress = ServiceOptions { args, env: vec![] };
    p.fleet.restart("ingress", &ingress, Duration::from_secs(10))?;
    p.fleet.ready(&p.client, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = cli.load * capacity;
    println!(
        "bound: ingress --max-in-flight {bound} ({:.2} s of capacity); offering {:.0}/s ({}× capacity) for {} s",
        bound as f64 / capacity,
        rate,
        load_label(cli.load),
        cli.secs
    );
    Ok(Offer { bound, rate })
}

/// Where the offered-load window's submissions and results are tallied, shared by the
/// submissions' tasks and the results router.
struct Tally {
    /// The window's start, which every `_us` figure counts from.
    t0: Instant,
    tasks: Mutex<HashMap<u128, TaskState>>,
    replies: Mutex<Replies>,
    result_errors: AtomicU64,
}

impl Tally {
    /// µs from the window's start to `at` (0 before it).
    fn us_since(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.t0).as_micros() as u64
    }

    /// Files ingress' answer to a submission scheduled at `sched_us`, answered `latency` µs
    /// after its schedule, in the window's `second`.
    fn on_reply(&self, outcome: Result<SubmitOutcome, String>, sched_us: u64, latency: u64, second: usize) {
        match outcome {
            Ok(SubmitOutcome::Accepted { task_id, duplicate }) => {
                self.tasks.lock().expect("tasks lock").entry(key(&task_id)).or_default().scheduled_us = Some(sched_us);
                let mut r = self.replies.lock().expect("replies lock");
                r.accepted.push(latency);
                r.duplicate_accepts += duplicate as u64;
                bump(&mut r.accepted_per_s, second);
            }
            Ok(SubmitOutcome::Rejected { code, .. }) => {
                let mut r = self.replies.lock().expect("replies lock");
                r.rejected.entry(code.as_str()).or_default().push(latency);
                bump(&mut r.rejected_per_s, second);
            }
            Err(e) => {
                let mut r = self.replies.lock().expect("replies lock");
                *r.transport_errors.entry(e.clone()).or_default() += 1;
                r.first_transport_error.get_or_insert(e);
            }
        }
    }

    /// Accepted tasks with no result yet.
    fn pending(&self) -> usize {
        self.tasks.lock().expect("tasks lock").values().filter(|t| t.scheduled_us.is_some() && t.results == 0).count()
    }
}

/// Counts the tenant's results into `tally`: each task's results, and its first outcome and when.
async fn spawn_router(
    client: &async_nats::Client,
    tenant: &str,
    tally: Arc<Tally>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut results = sundara::client::Client::new(client.clone(), tenant).results().await?;
    Ok(tokio::spawn(async move {
        while let Some(r) = results.next().await {
            let at = tally.us_since(Instant::now());
            let Ok(r) = r else {
                tally.result_errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let outcome = match r.status {
                ResultStatus::Verified { .. } => Outcome::Verified,
                ResultStatus::Failed { code, .. } => Outcome::Failed(code),
            };
            let mut tasks = tally.tasks.lock().expect("tasks lock");
            let t = tasks.entry(key(&r.task_id)).or_default();
            t.results += 1;
            if t.first.is_none() {
                t.first = Some(outcome);
                t.first_result_us = at;
            }
        }
    }))
}

/// Samples `pids`' memory, admission's and Redis' key counts, and JetStream's store (from
/// the monitoring port) once a second from `t0` until `stop`.
async fn spawn_sampler(
    redis_url: &str,
    monitor_port: Option<u16>,
    pids: Vec<u32>,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<Vec<Sample>>> {
    let mut redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
    Ok(tokio::spawn(async move {
        let mut samples = Vec::new();
        let mut tick = tokio::time::interval_at(t0.into(), Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let t_s = Instant::now().saturating_duration_since(t0).as_secs_f64();
            let rss = pids.iter().map(|&p| fleet::rss_bytes(p)).collect();
            let in_flight = redis::cmd("ZCARD").arg("sundara:inflight:tasks").query_async::<u64>(&mut redis).await.ok();
            let keys = redis::cmd("DBSIZE").query_async::<u64>(&mut redis).await.ok();
            let store = match monitor_port {
                Some(port) => tokio::task::spawn_blocking(move || fleet::nats_store_bytes(port)).await.ok().flatten(),
                None => None,
            };
            samples.push(Sample { t_s, rss, in_flight, keys, store });
        }
        samples
    }))
}

/// What the sender saw of its own schedule.
#[derive(Default)]
struct Sent {
    scheduled: u64,
    /// Sends skipped for want of a permit, and sends more than [`LATE`] behind schedule.
    skipped: u64,
    late: u64,
    lateness_us: Vec<u64>,
}

/// How submissions go out: to whom, with what, bounded by how many outstanding.
struct Sender {
    nats: async_nats::Client,
    subject: String,
    payloads: Vec<bytes::Bytes>,
    permits: Arc<Semaphore>,
    tally: Arc<Tally>,
}

impl Sender {
    /// Sends `rate` submissions per second from the tally's `t0` for `secs`, open loop; a
    /// send due while every permit is out is skipped.
    async fn run(&self, rate: f64, secs: f64) -> Sent {
        let (window, interval, t0) = (Duration::from_secs_f64(secs), 1.0 / rate, self.tally.t0);
        let mut sent = Sent::default();
        loop {
            let offset = Duration::from_secs_f64(sent.scheduled as f64 * interval);
            if offset >= window {
                break;
            }
            let scheduled = t0 + offset;
            let n = sent.scheduled;
            sent.scheduled += 1;
            tokio::time::sleep_until(scheduled.into()).await;
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                sent.skipped += 1;
                continue;
            };
            let behind = Instant::now().saturating_duration_since(scheduled);
            sent.lateness_us.push(behind.as_micros() as u64);
            if behind > LATE {
                sent.late += 1;
            }
            let payload = self.payloads[n as usize % self.payloads.len()].clone();
            let (nats, subject, tally) = (self.nats.clone(), self.subject.clone(), self.tally.clone());
            tokio::spawn(async move {
                submit(nats, subject, payload, scheduled, &tally).await;
                drop(permit);
            });
        }
        sent
    }
}

/// Sends one submission and tallies ingress' reply, its latency counted from `scheduled`.
async fn submit(nats: async_nats::Client, subject: String, payload: bytes::Bytes, scheduled: Instant, tally: &Tally) {
    let sched_us = tally.us_since(scheduled);
    let reply = tokio::time::timeout(REPLY_TIMEOUT, nats.request(subject, payload)).await;
    let done = Instant::now();
    let latency = done.saturating_duration_since(scheduled).as_micros() as u64;
    let second = tally.us_since(done) as usize / 1_000_000;
    let outcome = match reply {
        Err(_) => Err("timed out".to_string()),
        Ok(Err(e)) => Err(format!("{:?}", e.kind())),
        Ok(Ok(msg)) => decode::<SubmitReply>(&msg.payload, MAX_MESSAGE_BYTES)
            .map(|r| r.outcome)
            .map_err(|e| format!("bad reply: {e}")),
    };
    tally.on_reply(outcome, sched_us, latency, second);
}

/// The encoded submissions, one per input, each with the task deadline.
fn payloads(cli: &Cli, inputs: &[Vec<Tensor>]) -> Vec<bytes::Bytes> {
    inputs
        .iter()
        .map(|i| {
            let req = SubmitRequest {
                timeout_ms: Some(cli.task_timeout().as_millis() as u64),
                ..SubmitRequest::new(&cli.model, i.clone())
            };
            bytes::Bytes::from(encode(&req))
        })
        .collect()
}

/// Every process the window measures, by name: the fleet's, the servers' and this one.
fn window_processes(p: &Pipeline) -> (Vec<String>, Vec<u32>) {
    let mut names: Vec<String> = Vec::new();
    let mut pids: Vec<u32> = Vec::new();
    for (n, pid) in p.fleet.pids() {
        names.push(n);
        pids.push(pid);
    }
    for (n, pid) in
        [("nats-server", p.stack.nats.pid()), ("redis-server", p.stack.redis.pid()), ("loadgen", std::process::id())]
    {
        names.push(n.to_string());
        pids.push(pid);
    }
    (names, pids)
}

/// What the offered-load window saw, before any figure is worked out.
struct Offered {
    /// The sampled processes, in the order of each sample's `rss`.
    names: Vec<String>,
    sent: Sent,
    cpu: CpuUse,
    samples: Vec<Sample>,
    /// At the window's start, at its end, and after the drain.
    state_start: ServerState,
    state_end: ServerState,
    state_after: ServerState,
    key_prefixes: Option<BTreeMap<String, u64>>,
    /// From the window's end to the last result waited for (s).
    waited_s: f64,
    tally: Arc<Tally>,
}

/// 3. Offered load, open loop, with memory sampled every second.
async fn offer_load(cli: &Cli, p: &Pipeline, inputs: &[Vec<Tensor>], rate: f64) -> anyhow::Result<Offered> {
    let (names, pids) = window_processes(p);
    let cpu_procs: Vec<(String, u32)> = names.iter().cloned().zip(pids.iter().copied()).collect();
    let tenant = format!("overload-{}", rand::random::<u32>());
    let t0 = Instant::now() + Duration::from_millis(200);
    let tally = Arc::new(Tally {
        t0,
        tasks: Default::default(),
        replies: Default::default(),
        result_errors: AtomicU64::new(0),
    });
    let router = spawn_router(&p.client, &tenant, tally.clone()).await?;
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let monitor = p.stack.nats.monitor_port;
    let sampler = spawn_sampler(p.endpoints.redis_url.as_str(), monitor, pids, t0, stop_sampling.clone()).await?;
    let sender = Sender {
        nats: p.client.clone(),
        payloads: payloads(cli, inputs),
        subject: subj::submit(&tenant),
        permits: Arc::new(Semaphore::new(cli.max_outstanding)),
        tally: tally.clone(),
    };
    let (monitor_port, redis_url) = (p.stack.nats.monitor_port, &p.endpoints.redis_url);
    let state_start = server_state(monitor_port, redis_url).await;
    tokio::time::sleep_until(t0.into()).await;
    let cpu = CpuWindow::start(&cpu_procs);
    let sent = sender.run(rate, cli.secs).await;
    let window_end = Instant::now();
    let cpu = cpu.finish();
    let state_end = server_state(monitor_port, redis_url).await;
    println!(
        "  offered window done ({:.1} s); waiting for replies and for the results of accepted tasks (≤ {} s)",
        window_end.saturating_duration_since(t0).as_secs_f64(),
        cli.straggler_s
    );
    await_stragglers(cli, &sender.permits, &tally).await;
    let waited_s = window_end.elapsed().as_secs_f64();
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.await?;
    let state_after = server_state(monitor_port, redis_url).await;
    let key_prefixes = redis_key_prefixes(redis_url).await;
    router.abort();
    Ok(Offered { names, sent, cpu, samples, state_start, state_end, state_after, key_prefixes, waited_s, tally })
}

/// Every submission answered (or timed out), then stragglers' results, bounded.
async fn await_stragglers(cli: &Cli, permits: &Semaphore, tally: &Tally) {
    let all = u32::try_from(cli.max_outstanding).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(REPLY_TIMEOUT + Duration::from_secs(2), permits.acquire_many(all)).await;
    let straggler_deadline = Instant::now() + Duration::from_secs_f64(cli.straggler_s);
    while tally.pending() > 0 && Instant::now() < straggler_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer, so that a duplicate delivered just after its first copy is seen.
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// The accepted tasks' outcomes, counted.
#[derive(Default)]
struct Results {
    verified: u64,
    /// Verified within the steady part of the window (after the settling).
    verified_steady: u64,
    lost: u64,
    duplicated: u64,
    /// Results whose acceptance was never seen.
    unmatched: u64,
    failed: BTreeMap<String, u64>,
    e2e_us: Vec<u64>,
    verified_per_s: Vec<u64>,
}

/// Counts each task's first outcome; `steady` (µs since the window's start) is the part
/// of the window the goodput counts.
fn count_results(tasks: &HashMap<u128, TaskState>, steady: std::ops::RangeInclusive<u64>) -> Results {
    let mut r = Results::default();
    for t in tasks.values() {
        let Some(sched) = t.scheduled_us else {
            r.unmatched += 1;
            continue;
        };
        match t.first {
            None => r.lost += 1,
            Some(Outcome::Verified) => {
                r.verified += 1;
                r.e2e_us.push(t.first_result_us.saturating_sub(sched));
                bump(&mut r.verified_per_s, t.first_result_us as usize / 1_000_000);
                if steady.contains(&t.first_result_us) {
                    r.verified_steady += 1;
                }
            }
            Some(Outcome::Failed(code)) => *r.failed.entry(format!("{code:?}").to_lowercase()).or_default() += 1,
        }
        if t.results > 1 {
            r.duplicated += 1;
        }
    }
    r
}

/// `a / b`, or 0 when `b` is not positive.
fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Everything the report prints, worked out from the run.
struct Figures {
    settle_s: f64,
    results: Results,
    replies: Replies,
    accepted: u64,
    rejected_total: u64,
    transport_total: u64,
    rejection: Summary,
    by_code: BTreeMap<&'static str, Summary>,
    accept_reply: Summary,
    e2e: Summary,
    lateness: Summary,
    goodput: f64,
    goodput_ratio: f64,
    rss: Vec<RssStats>,
    /// JetStream's store on disk.
    store: Option<RssStats>,
    in_flight_max: Option<u64>,
    /// Submissions sent (scheduled less skipped).
    sent: u64,
    date: String,
    cores: usize,
    /// CPU (cores) of processes outside this run, and of this run's servers.
    other_cores: f64,
    server_cores: f64,
    cpu_per_task_us: f64,
    cpu_per_rejection_us: Option<f64>,
}

impl Figures {
    /// 4. Figures, from the capacity run and the offered-load window.
    fn new(cli: &Cli, cap: &CapacityRun, off: &Offered) -> Figures {
        let tasks = std::mem::take(&mut *off.tally.tasks.lock().expect("tasks lock"));
        let mut replies = std::mem::take(&mut *off.tally.replies.lock().expect("replies lock"));
        let settle_s = (cli.secs / 4.0).min(5.0);
        let mut results = count_results(&tasks, (settle_s * 1e6) as u64..=(cli.secs * 1e6) as u64);
        let accepted = replies.accepted.len() as u64;
        let rejected_total: u64 = replies.rejected.values().map(|v| v.len() as u64).sum();
        let transport_total: u64 = replies.transport_errors.values().sum();
        let mut all_rejections: Vec<u64> = replies.rejected.values().flatten().copied().collect();
        let rejection = Summary::from_micros(&mut all_rejections);
        let by_code = replies.rejected.iter_mut().map(|(c, v)| (*c, Summary::from_micros(v))).collect();
        let accept_reply = Summary::from_micros(&mut replies.accepted);
        let e2e = Summary::from_micros(&mut results.e2e_us);
        let mut lateness_us = off.sent.lateness_us.clone();
        let lateness = Summary::from_micros(&mut lateness_us);
        let goodput = results.verified_steady as f64 / (cli.secs - settle_s);
        let rss = rss_stats(&off.names, &off.samples, cli.secs);
        let store = store_stats(&off.samples, cli.secs);
        let in_flight_max = off.samples.iter().filter(|s| s.t_s <= cli.secs + 0.5).filter_map(|s| s.in_flight).max();
        let cpu = &off.cpu;
        // CPU used by processes outside this run (the machine is shared): contention to read the figures by.
        let other_cores = (cpu.machine_cores - cpu.processes.iter().map(|(_, c)| c).sum::<f64>()).max(0.0);
        // The servers' CPU (load generator left out), and an estimate of what one rejection
        // costs: the window's CPU less the verified tasks at the capacity run's CPU per task.
        let server_cores: f64 = cpu.processes.iter().filter(|(n, _)| n != "loadgen").map(|(_, c)| c).sum();
        let cpu_per_task_us = cap.server_cores / cap.tasks_per_s * 1e6;
        let rejections_per_s = rejected_total as f64 / cli.secs;
        let verified_rate = results.verified as f64 / cli.secs;
        let cpu_per_rejection_us = (rejections_per_s > 0.0)
            .then(|| (server_cores - verified_rate * cpu_per_task_us / 1e6) / rejections_per_s * 1e6);
        Figures {
            settle_s,
            results,
            replies,
            accepted,
            rejected_total,
            transport_total,
            rejection,
            by_code,
            accept_reply,
            e2e,
            lateness,
            goodput,
            goodput_ratio: goodput / cap.tasks_per_s,
            rss,
            store,
            in_flight_max,
            sent: off.sent.scheduled - off.sent.skipped,
            date: today(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            other_cores,
            server_cores,
            cpu_per_task_us,
            cpu_per_rejection_us,
        }
    }

    /// Growth over the window per task accepted in it: what a task costs a process's memory.
    fn per_task(&self, r: &RssStats) -> f64 {
        ratio((r.end - r.start) * 1024.0, self.accepted as f64)
    }
}

/// Today's date (UTC), as `date -u +%F` prints it; empty if that fails.
fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The run's JSON record.
fn record_json(cli: &Cli, cap: &CapacityRun, offer: &Offer, off: &Offered, f: &Figures) -> Value {
    let (capacity, bound, r, replies, cpu, samples) =
        (cap.tasks_per_s, offer.bound, &f.results, &f.replies, &off.cpu, &off.samples);
    json!({
        "benchmark": "overload",
        "date": f.date,
        "cores": f.cores,
        "load": cli.load,
        "secs": cli.secs,
        "config": {"model": cli.model, "k": cli.k, "workers": cli.workers, "threads_per_worker": cli.threads,
                   "task_timeout_s": cli.task_timeout_s, "max_outstanding_submissions": cli.max_outstanding,
                   "settle_s": f.settle_s},
        "capacity": {"tasks_per_s": capacity, "concurrency": cli.capacity_concurrency, "measure_s": cli.capacity_secs,
                     "latency": summary_json(&cap.stats.latency), "errors": cap.stats.errors},
        "bound": {"max_in_flight": bound, "seconds_of_capacity": bound as f64 / capacity,
                  "in_flight_max_observed": f.in_flight_max},
        "offered": {"rate_per_s": offer.rate, "scheduled": off.sent.scheduled, "sent": f.sent,
                    "generator_lag": {"skipped_no_permit": off.sent.skipped, "late_over_10ms": off.sent.late,
                                      "lateness": summary_json(&f.lateness)}},
        "replies": {"accepted": f.accepted, "duplicate_accepts": replies.duplicate_accepts,
                    "rejected": replies.rejected.iter().map(|(c, v)| (c.to_string(), json!(v.len()))).collect::<serde_json::Map<_, _>>(),
                    "rejected_total": f.rejected_total,
                    "transport_errors": replies.transport_errors, "first_transport_error": replies.first_transport_error},
        "latency": {"rejection": summary_json(&f.rejection),
                    "rejection_by_code": f.by_code.iter().map(|(c, s)| (c.to_string(), summary_json(s))).collect::<serde_json::Map<_, _>>(),
                    "accept_reply": summary_json(&f.accept_reply),
                    "accepted_end_to_end": summary_json(&f.e2e),
                    "rejection_p50_over_accepted_p50": ratio(f.rejection.p50_ms, f.e2e.p50_ms),
                    "rejection_p99_over_accepted_p99": ratio(f.rejection.p99_ms, f.e2e.p99_ms)},
        "results": {"verified": r.verified, "failed": r.failed, "lost": r.lost, "duplicated": r.duplicated,
                    "unmatched": r.unmatched, "result_stream_errors": off.tally.result_errors.load(Ordering::Relaxed),
                    "waited_after_window_s": off.waited_s},
        "goodput": {"verified_per_s": f.goodput, "window_s": [f.settle_s, cli.secs], "over_capacity": f.goodput_ratio},
        "cpu": {"machine_cores": cpu.machine_cores, "other_processes_cores": f.other_cores,
                "servers_cores": f.server_cores, "capacity_run_servers_cores": cap.server_cores,
                "capacity_run_machine_cores": cap.machine_cores,
                "servers_us_per_verified_task_at_capacity": f.cpu_per_task_us,
                "servers_us_per_rejection_estimate": f.cpu_per_rejection_us, "processes": cpu.processes.iter().map(|(n, c)| (n.clone(), json!(c))).collect::<serde_json::Map<_, _>>()},
        "memory": {"flat_threshold_mib_per_min": cli.flat_mib_per_min,
                   "processes": f.rss.iter().map(|r| json!({"process": r.process, "start_mib": r.start, "max_mib": r.max,
                       "end_mib": r.end, "after_drain_mib": r.after, "slope_mib_per_min_second_half": r.slope,
                       "growth_kib_per_accepted_task": f.per_task(r),
                       "flat": r.slope.abs() < cli.flat_mib_per_min})).collect::<Vec<_>>()},
        "disk": f.store.as_ref().map(|r| json!({"what": "JetStream store, all streams", "start_mib": r.start,
                       "max_mib": r.max, "end_mib": r.end, "after_drain_mib": r.after,
                       "slope_mib_per_min_second_half": r.slope, "flat": r.slope.abs() < cli.flat_mib_per_min})),
        "servers": {"start": off.state_start, "end_of_window": off.state_end, "after_drain": off.state_after,
                    "redis_keys_by_prefix_after_drain": off.key_prefixes},
        "series": {"processes": off.names,
                   "t_s": samples.iter().map(|s| (s.t_s * 10.0).round() / 10.0).collect::<Vec<_>>(),
                   "rss_mib": samples.iter().map(|s| s.rss.iter().map(|b| b.map(|b| (mib(b) * 10.0).round() / 10.0)).collect::<Vec<_>>()).collect::<Vec<_>>(),
                   "in_flight": samples.iter().map(|s| s.in_flight).collect::<Vec<_>>(),
                   "redis_keys": samples.iter().map(|s| s.keys).collect::<Vec<_>>(),
                   "store_mib": samples.iter().map(|s| s.store.map(|b| (mib(b) * 10.0).round() / 10.0)).collect::<Vec<_>>(),
                   "accepted_per_s": replies.accepted_per_s, "rejected_per_s": replies.rejected_per_s,
                   "verified_per_s": r.verified_per_s},
    })
}

/// The Markdown report's heading and its table of headline figures (the run, offered
/// load and replies here; latency and outcome rows appended).
fn summary_table(cli: &Cli, cap: &CapacityRun, offer: &Offer, off: &Offered, f: &Figures) -> String {
    let (capacity, bound, rate, sent) = (cap.tasks_per_s, offer.bound, offer.rate, &off.sent);
    let mut md = format!(
        "# Overload at {}× capacity for {} s\n\n{}, {} cores; model {}, k={}, {} workers × {} threads.\n\n",
        load_label(cli.load),
        cli.secs,
        f.date,
        f.cores,
        cli.model,
        cli.k,
        cli.workers,
        cli.threads
    );
    md.push_str("| figure | value |\n|---|---|\n");
    let mut row = |k: &str, v: String| md.push_str(&format!("| {k} | {v} |\n"));
    row("capacity (closed loop, C=64, verified tasks/s)", format!("{capacity:.0}"));
    let most = f.in_flight_max.map_or("–".into(), |m| m.to_string());
    row(
        "bound on tasks in flight (ingress --max-in-flight)",
        format!("{bound} ({:.2} s of capacity); most seen {most}", bound as f64 / capacity),
    );
    row("offered", format!("{rate:.0}/s for {} s: {} scheduled, {} sent", cli.secs, sent.scheduled, f.sent));
    row(
        "generator lag",
        format!(
            "{} skipped (no permit), {} sent > 10 ms late; send lateness p99 {} ms",
            sent.skipped,
            sent.late,
            fmt(f.lateness.p99_ms)
        ),
    );
    row("accepted", format!("{}", f.accepted));
    let codes: Vec<String> = f.replies.rejected.iter().map(|(c, v)| format!("{c} {}", v.len())).collect();
    row("rejected", if codes.is_empty() { "0".into() } else { codes.join(", ") });
    row("transport errors", format!("{}", f.transport_total));
    md + &latency_rows(f) + &outcome_rows(cli, off, f)
}

/// The headline table's latency rows: rejections, acceptances and accepted tasks.
fn latency_rows(f: &Figures) -> String {
    let mut md = String::new();
    let mut row = |k: &str, v: String| md.push_str(&format!("| {k} | {v} |\n"));
    let (rejection, e2e) = (&f.rejection, &f.e2e);
    if rejection.count > 0 {
        row(
            "rejection reply p50 / p99 / max ms",
            format!("{} / {} / {}", fmt(rejection.p50_ms), fmt(rejection.p99_ms), fmt(rejection.max_ms)),
        );
    }
    row("accept reply p50 / p99 ms", format!("{} / {}", fmt(f.accept_reply.p50_ms), fmt(f.accept_reply.p99_ms)));
    row("accepted task end to end p50 / p99 ms", format!("{} / {}", fmt(e2e.p50_ms), fmt(e2e.p99_ms)));
    if rejection.count > 0 {
        row(
            "rejection reply / accepted end to end (p50, p99)",
            format!(
                "{:.4}, {:.4} ({:.0}× and {:.0}× faster)",
                ratio(rejection.p50_ms, e2e.p50_ms),
                ratio(rejection.p99_ms, e2e.p99_ms),
                ratio(e2e.p50_ms, rejection.p50_ms),
                ratio(e2e.p99_ms, rejection.p99_ms)
            ),
        );
    }
    md
}

/// The headline table's outcome rows: goodput, the tasks' results, and CPU.
fn outcome_rows(cli: &Cli, off: &Offered, f: &Figures) -> String {
    let mut md = String::new();
    let mut row = |k: &str, v: String| md.push_str(&format!("| {k} | {v} |\n"));
    let r = &f.results;
    row(
        &format!("goodput (verified/s, {:.0}-{} s)", f.settle_s, cli.secs),
        format!("{:.0} = {:.2}× capacity", f.goodput, f.goodput_ratio),
    );
    let failed_s: Vec<String> = r.failed.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let failed = if failed_s.is_empty() { "0".into() } else { failed_s.join(", ") };
    row(
        "results",
        format!(
            "{} verified, failed: {failed}; lost {}, duplicated {}, unmatched {}",
            r.verified, r.lost, r.duplicated, r.unmatched
        ),
    );
    if let Some(us) = f.cpu_per_rejection_us {
        row(
            "servers' CPU per rejection (estimate) vs per verified task",
            format!("{us:.0} µs vs {:.0} µs", f.cpu_per_task_us),
        );
    }
    let machine = off.cpu.machine_cores;
    row(
        "CPU (cores): machine, this run's processes, others",
        format!("{machine:.2}, {:.2}, {:.2}", machine - f.other_cores, f.other_cores),
    );
    md
}

/// The Markdown table of each process's resident memory and CPU.
fn memory_table(cli: &Cli, off: &Offered, f: &Figures) -> String {
    let mut md = format!(
        "\n**Resident memory (MiB)**, sampled every second; flat = |slope| < {} MiB/min over the second half of the window\n\n",
        cli.flat_mib_per_min
    );
    md.push_str("| process | start | max | end of window | after drain | slope MiB/min | flat | KiB per accepted task | CPU cores |\n|---|---|---|---|---|---|---|---|---|\n");
    let row = |r: &RssStats, cores: &str| {
        format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.2} | {} | {:.2} | {cores} |\n",
            r.process,
            r.start,
            r.max,
            r.end,
            r.after,
            r.slope,
            if r.slope.abs() < cli.flat_mib_per_min { "yes" } else { "**no**" },
            f.per_task(r),
        )
    };
    for r in &f.rss {
        let cores = off.cpu.processes.iter().find(|(n, _)| *n == r.process).map_or(0.0, |(_, c)| *c);
        md.push_str(&row(r, &format!("{cores:.2}")));
    }
    // The store on disk: no CPU of its own.
    if let Some(r) = &f.store {
        md.push_str(&row(r, "–"));
    }
    md
}

/// The Markdown table of what the servers hold (streams and Redis), start of the window
/// to its end, and Redis' most common key prefixes after the drain.
fn servers_table(off: &Offered) -> String {
    let (state_start, state_end) = (&off.state_start, &off.state_end);
    let mut md = String::from("\n**What the servers hold** (start of the window → end of it)\n\n");
    md.push_str("| store | messages or keys | MiB | subjects |\n|---|---|---|---|\n");
    let streams = |st: &ServerState| st.streams.clone().unwrap_or_default();
    let mut ends = streams(state_end);
    ends.sort_by(|a, b| a.name.cmp(&b.name));
    for end in ends {
        let start = streams(state_start).into_iter().find(|s| s.name == end.name);
        let (m0, b0, s0) = start.map_or((0, 0, 0), |s| (s.messages, s.bytes, s.subjects));
        md.push_str(&format!(
            "| stream {} | {m0} → {} | {:.1} → {:.1} | {s0} → {} |\n",
            end.name,
            end.messages,
            mib(b0),
            mib(end.bytes),
            end.subjects
        ));
    }
    let opt = |v: Option<u64>| v.map_or("–".to_string(), |v| v.to_string());
    let optf = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    md.push_str(&format!(
        "| redis | {} → {} | {} → {} | – |\n",
        opt(state_start.redis_keys),
        opt(state_end.redis_keys),
        optf(state_start.redis_used_memory_mib),
        optf(state_end.redis_used_memory_mib)
    ));
    if let Some(p) = &off.key_prefixes {
        let mut p: Vec<_> = p.iter().collect();
        p.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = p.iter().take(4).map(|(k, n)| format!("`{k}` {n}")).collect();
        md.push_str(&format!("\nRedis keys after the drain, most common prefixes: {}.\n", top.join(", ")));
    }
    md
}

/// Writes `overload-<label>.json` and `.md` into `out_dir`.
fn write_report(out_dir: &Path, label: &str, record: &Value, md: String) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let json_path = out_dir.join(format!("overload-{label}.json"));
    let md_path = out_dir.join(format!("overload-{label}.md"));
    std::fs::write(&json_path, serde_json::to_string_pretty(record)? + "\n")
        .with_context(|| json_path.display().to_string())?;
    std::fs::write(&md_path, md).with_context(|| md_path.display().to_string())?;
    println!("wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_least_squares() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), 2.0);
        assert_eq!(slope(&[(0.0, 4.0), (1.0, 4.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 4.0)]), 0.0);
    }

    #[test]
    fn task_ids_key_by_their_bits() {
        assert_eq!(key("0000000000000000000000000000000a"), 10);
        assert_ne!(key("not-hex"), key("also-not-hex"));
        assert_eq!(load_label(3.0), "3.0");
        assert_eq!(load_label(0.7), "0.7");
        assert_eq!(load_label(0.75), "0.75");
    }

    #[test]
    fn memory_figures_per_process() {
        let s = |t_s: f64, m: u64| Sample {
            t_s,
            rss: vec![Some(m << 20)],
            in_flight: None,
            keys: None,
            store: Some(m << 20),
        };
        // 60 s window: grows 10 → 40 MiB over the first half, then 1 MiB per minute; 50 after the drain.
        let samples = [s(0.0, 10), s(30.0, 40), s(60.0, 41), s(70.0, 50)];
        let r = &rss_stats(&["p".to_string()], &samples, 60.0)[0];
        assert_eq!((r.start, r.max, r.end, r.after), (10.0, 50.0, 41.0, 50.0));
        assert!((r.slope - 2.0).abs() < 1e-9, "30 s → 60 s: +1 MiB in half a minute: {}", r.slope);
        let disk = store_stats(&samples, 60.0).unwrap();
        assert_eq!((disk.process.as_str(), disk.end, disk.slope), (STORE, r.end, r.slope));
    }
}
