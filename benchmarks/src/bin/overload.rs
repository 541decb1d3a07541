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
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use rand::SeedableRng;
use serde_json::{Value, json};
use sundara::stack::{LocalStack, project_root};
use sundara_bench::Summary;
use sundara_bench::client::PipelineClient;
use sundara_bench::cpu::CpuWindow;
use sundara_bench::fleet::{self, Fleet, ServiceOptions, WorkerSpec};
use sundara_bench::load::{Window, closed_loop};
use sundara_common::{Registry, nats};
use sundara_schemas::{
    CompareRule, FailureCode, MAX_MESSAGE_BYTES, Policy, ResultStatus, SubmitOutcome, SubmitReply, SubmitRequest,
    decode, encode, subjects as subj,
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

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
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
            let in_window: Vec<(f64, f64)> = series.iter().copied().filter(|p| p.0 <= secs + 0.5).collect();
            let second_half: Vec<(f64, f64)> =
                in_window.iter().filter(|p| p.0 >= secs / 2.0).map(|&(t, m)| (t / 60.0, m)).collect();
            RssStats {
                process: name.clone(),
                start: series.first().map_or(0.0, |p| p.1),
                max: series.iter().map(|p| p.1).fold(0.0, f64::max),
                end: in_window.last().map_or(0.0, |p| p.1),
                after: series.last().map_or(0.0, |p| p.1),
                slope: slope(&second_half),
            }
        })
        .collect()
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
    let stack = LocalStack::start(&root)?;
    let endpoints = stack.endpoints();
    let client = nats::connect(&endpoints.nats, "overload-client").await?;
    let js = async_nats::jetstream::new(client.clone());
    let retention = nats::Retention { history_max_msgs: cli.history_max_msgs, ..Default::default() };
    nats::provision(&js, &retention).await?;
    let registry = Registry::open(&js).await?;
    let policy = Policy { redundancy: cli.k, rule: CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 }, audit_rate: 0.0 };
    let meta = sundara::models::push(&registry, &model_path, &cli.model, "1", policy, Default::default()).await?;
    let scratch = tempfile::Builder::new().prefix("sundara-overload-").tempdir()?;
    let specs: Vec<WorkerSpec> =
        (1..=cli.workers).map(|i| WorkerSpec { id: format!("miner-{i}"), threads: cli.threads }).collect();
    let mut fleet = Fleet::start(&endpoints, &specs, &scratch.path().join("cache"), scratch.path())?;
    fleet.ready(&client, Duration::from_secs(30)).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let inputs: Vec<_> = (0..64).map(|_| sundara::models::sample_inputs(&meta.inputs, 1, &mut rng)).collect();
    let task_timeout = Duration::from_secs_f64(cli.task_timeout_s);

    // 1. Capacity: closed loop at saturation, in this run.
    println!(
        "capacity: closed loop C={} for {} s after {} s of warm-up (k={}, {} workers × {} threads, model {})",
        cli.capacity_concurrency, cli.capacity_secs, cli.warmup_s, cli.k, cli.workers, cli.threads, cli.model
    );
    let tenant = format!("capacity-{}", rand::random::<u32>());
    let pc = Arc::new(PipelineClient::start(client.clone(), &cli.model, &tenant, inputs.clone(), task_timeout).await?);
    let window = Window {
        warmup: Duration::from_secs_f64(cli.warmup_s),
        measure: Duration::from_secs_f64(cli.capacity_secs),
        drain: Duration::from_secs(10),
    };
    let servers = |fleet: &Fleet| {
        let mut p = fleet.pids();
        p.push(("nats-server".into(), stack.nats.pid()));
        p.push(("redis-server".into(), stack.redis.pid()));
        p
    };
    // CPU of the whole capacity run (warm-up included): the servers' cost per verified task.
    let cap_cpu = CpuWindow::start(&servers(&fleet));
    let cap = closed_loop(cli.capacity_concurrency, window, move |n| {
        let pc = pc.clone();
        async move { pc.task(n).await }
    })
    .await;
    let cap_cpu = cap_cpu.finish();
    let cap_server_cores: f64 = cap_cpu.processes.iter().map(|(_, c)| c).sum();
    let capacity = cap.tasks_per_s;
    println!(
        "  {:.0} verified tasks/s, p50 {:.1} ms, p99 {:.1} ms, {} errors",
        capacity, cap.latency.p50_ms, cap.latency.p99_ms, cap.errors
    );
    if capacity < 1.0 {
        bail!("no capacity measured: {:?}", cap.first_error);
    }

    // 2. Ingress again, with the fleet's bound on tasks in flight.
    let bound = cli.max_in_flight.unwrap_or_else(|| (capacity * cli.bound_s).ceil() as u64).max(1);
    let ingress = ServiceOptions { args: vec!["--max-in-flight".into(), bound.to_string()], env: vec![] };
    fleet.restart("ingress", &ingress, Duration::from_secs(10))?;
    fleet.ready(&client, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rate = cli.load * capacity;
    println!(
        "bound: ingress --max-in-flight {bound} ({:.2} s of capacity); offering {:.0}/s ({}× capacity) for {} s",
        bound as f64 / capacity,
        rate,
        load_label(cli.load),
        cli.secs
    );

    // 3. Offered load, open loop, with memory sampled every second.
    let mut names: Vec<String> = Vec::new();
    let mut pids: Vec<u32> = Vec::new();
    for (n, p) in fleet.pids() {
        names.push(n);
        pids.push(p);
    }
    for (n, p) in
        [("nats-server", stack.nats.pid()), ("redis-server", stack.redis.pid()), ("loadgen", std::process::id())]
    {
        names.push(n.to_string());
        pids.push(p);
    }
    let cpu_procs: Vec<(String, u32)> = names.iter().cloned().zip(pids.iter().copied()).collect();

    let tenant = format!("overload-{}", rand::random::<u32>());
    let tasks: Arc<Mutex<HashMap<u128, TaskState>>> = Default::default();
    let replies: Arc<Mutex<Replies>> = Default::default();
    let result_errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t0 = Instant::now() + Duration::from_millis(200);
    let us_since = move |at: Instant| at.saturating_duration_since(t0).as_micros() as u64;

    let mut results = sundara::client::Client::new(client.clone(), &tenant).results().await?;
    let router = tokio::spawn({
        let (tasks, result_errors) = (tasks.clone(), result_errors.clone());
        async move {
            while let Some(r) = results.next().await {
                let at = us_since(Instant::now());
                let Ok(r) = r else {
                    result_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let outcome = match r.status {
                    ResultStatus::Verified { .. } => Outcome::Verified,
                    ResultStatus::Failed { code, .. } => Outcome::Failed(code),
                };
                let mut tasks = tasks.lock().expect("tasks lock");
                let t = tasks.entry(key(&r.task_id)).or_default();
                t.results += 1;
                if t.first.is_none() {
                    t.first = Some(outcome);
                    t.first_result_us = at;
                }
            }
        }
    });

    let stop_sampling = Arc::new(AtomicBool::new(false));
    let mut redis = redis::Client::open(endpoints.redis_url.as_str())?.get_multiplexed_async_connection().await?;
    let sampler = tokio::spawn({
        let (stop, pids) = (stop_sampling.clone(), pids.clone());
        async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval_at(t0.into(), Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t_s = Instant::now().saturating_duration_since(t0).as_secs_f64();
                let rss = pids.iter().map(|&p| fleet::rss_bytes(p)).collect();
                let in_flight =
                    redis::cmd("ZCARD").arg("sundara:inflight:tasks").query_async::<u64>(&mut redis).await.ok();
                let keys = redis::cmd("DBSIZE").query_async::<u64>(&mut redis).await.ok();
                samples.push(Sample { t_s, rss, in_flight, keys });
            }
            samples
        }
    });

    let payloads: Vec<bytes::Bytes> = inputs
        .iter()
        .map(|i| {
            let req = SubmitRequest {
                timeout_ms: Some(task_timeout.as_millis() as u64),
                ..SubmitRequest::new(&cli.model, i.clone())
            };
            bytes::Bytes::from(encode(&req))
        })
        .collect();
    let subject = subj::submit(&tenant);
    let permits = Arc::new(Semaphore::new(cli.max_outstanding));
    let window = Duration::from_secs_f64(cli.secs);
    let interval = 1.0 / rate;
    let (mut scheduled_n, mut skipped, mut late) = (0u64, 0u64, 0u64);
    let mut lateness_us: Vec<u64> = Vec::new();
    let monitor_port = stack.nats.monitor_port;
    let state_start = server_state(monitor_port, &endpoints.redis_url).await;
    tokio::time::sleep_until(t0.into()).await;
    let cpu = CpuWindow::start(&cpu_procs);
    loop {
        let offset = Duration::from_secs_f64(scheduled_n as f64 * interval);
        if offset >= window {
            break;
        }
        let scheduled = t0 + offset;
        let n = scheduled_n;
        scheduled_n += 1;
        tokio::time::sleep_until(scheduled.into()).await;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let behind = Instant::now().saturating_duration_since(scheduled);
        lateness_us.push(behind.as_micros() as u64);
        if behind > LATE {
            late += 1;
        }
        let (nats, subject, payload) = (client.clone(), subject.clone(), payloads[n as usize % payloads.len()].clone());
        let (tasks, replies) = (tasks.clone(), replies.clone());
        tokio::spawn(async move {
            let sched_us = us_since(scheduled);
            let reply = tokio::time::timeout(REPLY_TIMEOUT, nats.request(subject, payload)).await;
            let done = Instant::now();
            let latency = done.saturating_duration_since(scheduled).as_micros() as u64;
            let second = us_since(done) as usize / 1_000_000;
            let outcome = match reply {
                Err(_) => Err("timed out".to_string()),
                Ok(Err(e)) => Err(format!("{:?}", e.kind())),
                Ok(Ok(msg)) => decode::<SubmitReply>(&msg.payload, MAX_MESSAGE_BYTES)
                    .map(|r| r.outcome)
                    .map_err(|e| format!("bad reply: {e}")),
            };
            match outcome {
                Ok(SubmitOutcome::Accepted { task_id, duplicate }) => {
                    tasks.lock().expect("tasks lock").entry(key(&task_id)).or_default().scheduled_us = Some(sched_us);
                    let mut r = replies.lock().expect("replies lock");
                    r.accepted.push(latency);
                    r.duplicate_accepts += duplicate as u64;
                    bump(&mut r.accepted_per_s, second);
                }
                Ok(SubmitOutcome::Rejected { code, .. }) => {
                    let mut r = replies.lock().expect("replies lock");
                    r.rejected.entry(code.as_str()).or_default().push(latency);
                    bump(&mut r.rejected_per_s, second);
                }
                Err(e) => {
                    let mut r = replies.lock().expect("replies lock");
                    *r.transport_errors.entry(e.clone()).or_default() += 1;
                    r.first_transport_error.get_or_insert(e);
                }
            }
            drop(permit);
        });
    }
    let window_end = Instant::now();
    let cpu = cpu.finish();
    let state_end = server_state(monitor_port, &endpoints.redis_url).await;
    println!(
        "  offered window done ({:.1} s); waiting for replies and for the results of accepted tasks (≤ {} s)",
        window_end.saturating_duration_since(t0).as_secs_f64(),
        cli.straggler_s
    );

    // Every submission answered (or timed out), then stragglers' results, bounded.
    let all = u32::try_from(cli.max_outstanding).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(REPLY_TIMEOUT + Duration::from_secs(2), permits.acquire_many(all)).await;
    let straggler_deadline = Instant::now() + Duration::from_secs_f64(cli.straggler_s);
    let pending =
        || tasks.lock().expect("tasks lock").values().filter(|t| t.scheduled_us.is_some() && t.results == 0).count();
    while pending() > 0 && Instant::now() < straggler_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer, so that a duplicate delivered just after its first copy is seen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waited_s = window_end.elapsed().as_secs_f64();
    stop_sampling.store(true, Ordering::Relaxed);
    let samples = sampler.await?;
    let state_after = server_state(monitor_port, &endpoints.redis_url).await;
    let key_prefixes = redis_key_prefixes(&endpoints.redis_url).await;
    router.abort();
    fleet.stop(Duration::from_secs(10));

    // 4. Figures.
    let tasks = std::mem::take(&mut *tasks.lock().expect("tasks lock"));
    let mut replies = std::mem::take(&mut *replies.lock().expect("replies lock"));
    let settle_s = (cli.secs / 4.0).min(5.0);
    let steady = (settle_s * 1e6) as u64..=(cli.secs * 1e6) as u64;
    let (mut verified, mut verified_steady, mut lost, mut duplicated, mut unmatched) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut e2e_us: Vec<u64> = Vec::new();
    let mut verified_per_s: Vec<u64> = Vec::new();
    for t in tasks.values() {
        let Some(sched) = t.scheduled_us else {
            unmatched += 1;
            continue;
        };
        match t.first {
            None => lost += 1,
            Some(Outcome::Verified) => {
                verified += 1;
                e2e_us.push(t.first_result_us.saturating_sub(sched));
                bump(&mut verified_per_s, t.first_result_us as usize / 1_000_000);
                if steady.contains(&t.first_result_us) {
                    verified_steady += 1;
                }
            }
            Some(Outcome::Failed(code)) => *failed.entry(format!("{code:?}").to_lowercase()).or_default() += 1,
        }
        if t.results > 1 {
            duplicated += 1;
        }
    }
    let accepted = replies.accepted.len() as u64;
    let rejected_total: u64 = replies.rejected.values().map(|v| v.len() as u64).sum();
    let transport_total: u64 = replies.transport_errors.values().sum();
    let mut all_rejections: Vec<u64> = replies.rejected.values().flatten().copied().collect();
    let rejection = Summary::from_micros(&mut all_rejections);
    let by_code: BTreeMap<&str, Summary> =
        replies.rejected.iter_mut().map(|(c, v)| (*c, Summary::from_micros(v))).collect();
    let accept_reply = Summary::from_micros(&mut replies.accepted);
    let e2e = Summary::from_micros(&mut e2e_us);
    let lateness = Summary::from_micros(&mut lateness_us);
    let goodput = verified_steady as f64 / (cli.secs - settle_s);
    let goodput_ratio = goodput / capacity;
    let rss = rss_stats(&names, &samples, cli.secs);
    let in_flight_max = samples.iter().filter(|s| s.t_s <= cli.secs + 0.5).filter_map(|s| s.in_flight).max();
    let sent = scheduled_n - skipped;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    // Growth over the window per task accepted in it: what a task costs a process's memory.
    let per_task = |r: &RssStats| ratio((r.end - r.start) * 1024.0, accepted as f64);
    let date = std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // CPU used by processes outside this run (the machine is shared): contention to read the figures by.
    let other_cores = (cpu.machine_cores - cpu.processes.iter().map(|(_, c)| c).sum::<f64>()).max(0.0);
    // The servers' CPU (load generator left out), and an estimate of what one rejection
    // costs: the window's CPU less the verified tasks at the capacity run's CPU per task.
    let server_cores: f64 = cpu.processes.iter().filter(|(n, _)| n != "loadgen").map(|(_, c)| c).sum();
    let cpu_per_task_us = cap_server_cores / capacity * 1e6;
    let rejections_per_s = rejected_total as f64 / cli.secs;
    let verified_rate = verified as f64 / cli.secs;
    let cpu_per_rejection_us = (rejections_per_s > 0.0)
        .then(|| (server_cores - verified_rate * cpu_per_task_us / 1e6) / rejections_per_s * 1e6);

    let record = json!({
        "benchmark": "overload",
        "date": date,
        "cores": cores,
        "load": cli.load,
        "secs": cli.secs,
        "config": {"model": cli.model, "k": cli.k, "workers": cli.workers, "threads_per_worker": cli.threads,
                   "task_timeout_s": cli.task_timeout_s, "max_outstanding_submissions": cli.max_outstanding,
                   "settle_s": settle_s},
        "capacity": {"tasks_per_s": capacity, "concurrency": cli.capacity_concurrency, "measure_s": cli.capacity_secs,
                     "latency": summary_json(&cap.latency), "errors": cap.errors},
        "bound": {"max_in_flight": bound, "seconds_of_capacity": bound as f64 / capacity,
                  "in_flight_max_observed": in_flight_max},
        "offered": {"rate_per_s": rate, "scheduled": scheduled_n, "sent": sent,
                    "generator_lag": {"skipped_no_permit": skipped, "late_over_10ms": late,
                                      "lateness": summary_json(&lateness)}},
        "replies": {"accepted": accepted, "duplicate_accepts": replies.duplicate_accepts,
                    "rejected": replies.rejected.iter().map(|(c, v)| (c.to_string(), json!(v.len()))).collect::<serde_json::Map<_, _>>(),
                    "rejected_total": rejected_total,
                    "transport_errors": replies.transport_errors, "first_transport_error": replies.first_transport_error},
        "latency": {"rejection": summary_json(&rejection),
                    "rejection_by_code": by_code.iter().map(|(c, s)| (c.to_string(), summary_json(s))).collect::<serde_json::Map<_, _>>(),
                    "accept_reply": summary_json(&accept_reply),
                    "accepted_end_to_end": summary_json(&e2e),
                    "rejection_p50_over_accepted_p50": ratio(rejection.p50_ms, e2e.p50_ms),
                    "rejection_p99_over_accepted_p99": ratio(rejection.p99_ms, e2e.p99_ms)},
        "results": {"verified": verified, "failed": failed, "lost": lost, "duplicated": duplicated,
                    "unmatched": unmatched, "result_stream_errors": result_errors.load(Ordering::Relaxed),
                    "waited_after_window_s": waited_s},
        "goodput": {"verified_per_s": goodput, "window_s": [settle_s, cli.secs], "over_capacity": goodput_ratio},
        "cpu": {"machine_cores": cpu.machine_cores, "other_processes_cores": other_cores,
                "servers_cores": server_cores, "capacity_run_servers_cores": cap_server_cores,
                "capacity_run_machine_cores": cap_cpu.machine_cores,
                "servers_us_per_verified_task_at_capacity": cpu_per_task_us,
                "servers_us_per_rejection_estimate": cpu_per_rejection_us, "processes": cpu.processes.iter().map(|(n, c)| (n.clone(), json!(c))).collect::<serde_json::Map<_, _>>()},
        "memory": {"flat_threshold_mib_per_min": cli.flat_mib_per_min,
                   "processes": rss.iter().map(|r| json!({"process": r.process, "start_mib": r.start, "max_mib": r.max,
                       "end_mib": r.end, "after_drain_mib": r.after, "slope_mib_per_min_second_half": r.slope,
                       "growth_kib_per_accepted_task": per_task(r),
                       "flat": r.slope.abs() < cli.flat_mib_per_min})).collect::<Vec<_>>()},
        "servers": {"start": state_start, "end_of_window": state_end, "after_drain": state_after,
                    "redis_keys_by_prefix_after_drain": key_prefixes},
        "series": {"processes": names,
                   "t_s": samples.iter().map(|s| (s.t_s * 10.0).round() / 10.0).collect::<Vec<_>>(),
                   "rss_mib": samples.iter().map(|s| s.rss.iter().map(|b| b.map(|b| (mib(b) * 10.0).round() / 10.0)).collect::<Vec<_>>()).collect::<Vec<_>>(),
                   "in_flight": samples.iter().map(|s| s.in_flight).collect::<Vec<_>>(),
                   "redis_keys": samples.iter().map(|s| s.keys).collect::<Vec<_>>(),
                   "accepted_per_s": replies.accepted_per_s, "rejected_per_s": replies.rejected_per_s,
                   "verified_per_s": verified_per_s},
    });

    // 5. Summary, JSON and Markdown.
    let label = load_label(cli.load);
    let mut md = String::new();
    md.push_str(&format!(
        "# Overload at {label}× capacity for {} s\n\n{date}, {cores} cores; model {}, k={}, {} workers × {} threads.\n\n",
        cli.secs, cli.model, cli.k, cli.workers, cli.threads
    ));
    md.push_str("| figure | value |\n|---|---|\n");
    let mut row = |k: &str, v: String| md.push_str(&format!("| {k} | {v} |\n"));
    row("capacity (closed loop, C=64, verified tasks/s)", format!("{capacity:.0}"));
    row(
        "bound on tasks in flight (ingress --max-in-flight)",
        format!(
            "{bound} ({:.2} s of capacity); most seen {}",
            bound as f64 / capacity,
            in_flight_max.map_or("–".into(), |m| m.to_string())
        ),
    );
    row("offered", format!("{rate:.0}/s for {} s: {scheduled_n} scheduled, {sent} sent", cli.secs));
    row(
        "generator lag",
        format!(
            "{skipped} skipped (no permit), {late} sent > 10 ms late; send lateness p99 {} ms",
            fmt(lateness.p99_ms)
        ),
    );
    row("accepted", format!("{accepted}"));
    let codes: Vec<String> = replies.rejected.iter().map(|(c, v)| format!("{c} {}", v.len())).collect();
    row("rejected", if codes.is_empty() { "0".into() } else { codes.join(", ") });
    row("transport errors", format!("{transport_total}"));
    if rejection.count > 0 {
        row(
            "rejection reply p50 / p99 / max ms",
            format!("{} / {} / {}", fmt(rejection.p50_ms), fmt(rejection.p99_ms), fmt(rejection.max_ms)),
        );
    }
    row("accept reply p50 / p99 ms", format!("{} / {}", fmt(accept_reply.p50_ms), fmt(accept_reply.p99_ms)));
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
    row(
        &format!("goodput (verified/s, {settle_s:.0}-{} s)", cli.secs),
        format!("{goodput:.0} = {goodput_ratio:.2}× capacity"),
    );
    let failed_s: Vec<String> = failed.iter().map(|(c, n)| format!("{c} {n}")).collect();
    row(
        "results",
        format!(
            "{verified} verified, failed: {}; lost {lost}, duplicated {duplicated}, unmatched {unmatched}",
            if failed_s.is_empty() { "0".into() } else { failed_s.join(", ") }
        ),
    );
    if let Some(us) = cpu_per_rejection_us {
        row(
            "servers' CPU per rejection (estimate) vs per verified task",
            format!("{us:.0} µs vs {cpu_per_task_us:.0} µs"),
        );
    }
    row(
        "CPU (cores): machine, this run's processes, others",
        format!("{:.2}, {:.2}, {:.2}", cpu.machine_cores, cpu.machine_cores - other_cores, other_cores),
    );
    md.push_str(&format!(
        "\n**Resident memory (MiB)**, sampled every second; flat = |slope| < {} MiB/min over the second half of the window\n\n",
        cli.flat_mib_per_min
    ));
    md.push_str("| process | start | max | end of window | after drain | slope MiB/min | flat | KiB per accepted task | CPU cores |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in &rss {
        let cores = cpu.processes.iter().find(|(n, _)| *n == r.process).map_or(0.0, |(_, c)| *c);
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.2} | {} | {:.2} | {:.2} |\n",
            r.process,
            r.start,
            r.max,
            r.end,
            r.after,
            r.slope,
            if r.slope.abs() < cli.flat_mib_per_min { "yes" } else { "**no**" },
            per_task(r),
            cores
        ));
    }
    md.push_str("\n**What the servers hold** (start of the window → end of it)\n\n");
    md.push_str("| store | messages or keys | MiB | subjects |\n|---|---|---|---|\n");
    let streams = |st: &ServerState| st.streams.clone().unwrap_or_default();
    let mut ends = streams(&state_end);
    ends.sort_by(|a, b| a.name.cmp(&b.name));
    for end in ends {
        let start = streams(&state_start).into_iter().find(|s| s.name == end.name);
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
    if let Some(p) = &key_prefixes {
        let mut p: Vec<_> = p.iter().collect();
        p.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = p.iter().take(4).map(|(k, n)| format!("`{k}` {n}")).collect();
        md.push_str(&format!("\nRedis keys after the drain, most common prefixes: {}.\n", top.join(", ")));
    }
    println!("\n{md}");
    std::fs::create_dir_all(&out_dir)?;
    let json_path = out_dir.join(format!("overload-{label}.json"));
    let md_path = out_dir.join(format!("overload-{label}.md"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&record)? + "\n")
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
        let s = |t_s: f64, m: u64| Sample { t_s, rss: vec![Some(m << 20)], in_flight: None, keys: None };
        // 60 s window: grows 10 → 40 MiB over the first half, then 1 MiB per minute; 50 after the drain.
        let samples = [s(0.0, 10), s(30.0, 40), s(60.0, 41), s(70.0, 50)];
        let r = &rss_stats(&["p".to_string()], &samples, 60.0)[0];
        assert_eq!((r.start, r.max, r.end, r.after), (10.0, 50.0, 41.0, 50.0));
        assert!((r.slope - 2.0).abs() < 1e-9, "30 s → 60 s: +1 MiB in half a minute: {}", r.slope);
    }
}
