//! Scheduler scale simulation.
//!
//! For each fleet size N (simulated slices: real Redis capacity entries, one slice of
//! `--slots` slots per worker, each worker its own operator) and each run, on a fresh
//! private NATS + Redis:
//! 1. decision latency: `Capacity::reserve` (k=1, then k=3) followed by `release`,
//!    sequentially; only the reserve call is timed (client side). A second pass brackets
//!    batches of reserves with `INFO commandstats` for the Redis-side cost per reserve and
//!    the candidates it examined (HMGETs per call). A probe then reserves k=1 without
//!    releasing until the store says "no capacity": the slots a reservation can reach;
//! 2. dispatch throughput: the real scheduler (`sundara_scheduler::run`, in process)
//!    against a simulated fleet that answers every assignment at once with an `Ok` outcome;
//!    `--tasks` tasks are put into TASKS first, and the rate is assignments received by the
//!    fleet per second, first to last.
//!
//! One JSON object per (N, run) is appended to `--out`; a readable line goes to stdout.
//!
//! `cargo run --release -p sundara-bench --bin scalesim -- --slices 10,100,1000,10000 --runs 3 --out scale.jsonl`

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream;
use clap::Parser;
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use serde_json::json;
use sundara::stack::{LocalStack, project_root};
use sundara_bench::stats::{Summary, median};
use sundara_bench::within;
use sundara_common::capacity::{Placement, ReserveTerms, SliceAnnounce, WorkerAnnounce};
use sundara_common::{Capacity, Endpoints, Shutdown, nats};
use sundara_scheduler::assignment_id;
use sundara_schemas::{
    ModelRef, Outcome, OutcomeResult, Priority, Task, Tensor, WIRE_VERSION, WorkTiming, encode, now_ms, now_us,
    subjects as subj,
};

const MODEL: &str = "sim";
/// Heartbeats never lapse during a run (nothing refreshes them and no autoscaler runs).
const HEARTBEAT_TTL_MS: u64 = 3_600_000;
/// Reservations made by the latency passes: far from due, gone within the run.
const RESERVATION_MS: u64 = 600_000;
/// The reachability probe stops after this many reservations (it only has to show the cap).
const PROBE_CAP: usize = 4096;
const SECRET: &[u8] = b"scalesim-secret-0";

#[derive(Parser, Debug)]
#[command(about = "Scheduler scale simulation: decision latency and dispatch throughput per fleet size")]
struct Args {
    /// Fleet sizes (simulated slices).
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    slices: Vec<usize>,
    /// Runs per fleet size, each on a fresh NATS and Redis.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Appends one JSON object per (fleet size, run) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Timed reserve+release iterations per k.
    #[arg(long, default_value_t = 2000)]
    reserves: usize,
    /// Tasks dispatched through the real scheduler per run (k=1).
    #[arg(long, default_value_t = 5000)]
    tasks: usize,
    /// Slots per slice.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Candidates examined per reservation (default: the scheduler's).
    #[arg(long)]
    scan: Option<usize>,
    /// Publishes and fleet answers in flight at once.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Limit on each phase of a run, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

/// One run's numbers.
#[derive(Debug, Default)]
struct RunResult {
    announce_s: f64,
    k1: Summary,
    k3: Summary,
    k1_distinct: usize,
    k3_distinct: usize,
    k1_redis_us: f64,
    k3_redis_us: f64,
    k1_examined: f64,
    k3_examined: f64,
    reachable_slots: usize,
    inject_per_s: f64,
    dispatched: usize,
    dispatch_per_s: f64,
    dispatch_distinct: usize,
    dispatch_max_per_slice: u32,
    dispatch_evalsha_per_task: f64,
    dispatch_evalsha_us: f64,
    inflight_left: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    sundara_common::init_logging("warn", Default::default());
    let args = Args::parse();
    if args.slices.is_empty() || args.slices.contains(&0) || args.runs == 0 || args.slots == 0 {
        bail!("--slices, --runs and --slots must be positive");
    }
    let root = project_root();
    let mut out = sundara_bench::open_results(args.out.as_deref()).context("opening --out")?;
    let started = Instant::now();
    let mut by_size: Vec<(usize, Vec<RunResult>)> = Vec::new();
    for &n in &args.slices {
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let r = one_run(&args, &root, n, run).await.with_context(|| format!("{n} slices, run {run}"))?;
            println!(
                "slices={n:>5} run={run}  reserve k1 p50/p99 {:.3}/{:.3} ms  k3 {:.3}/{:.3} ms  \
                 redis {:.0}/{:.0} us ({:.0}/{:.0} examined)  reachable {}/{} slots  \
                 dispatch {:.0}/s ({} tasks, {} slices used, max {}/slice, {:.2} evalsha/task)",
                r.k1.p50_ms,
                r.k1.p99_ms,
                r.k3.p50_ms,
                r.k3.p99_ms,
                r.k1_redis_us,
                r.k3_redis_us,
                r.k1_examined,
                r.k3_examined,
                r.reachable_slots,
                n * args.slots as usize,
                r.dispatch_per_s,
                r.dispatched,
                r.dispatch_distinct,
                r.dispatch_max_per_slice,
                r.dispatch_evalsha_per_task,
            );
            if let Some(f) = out.as_mut() {
                let record = json!({
                    "bench": "scale",
                    "slices": n,
                    "run": run,
                    "reserve_k1_p50_ms": r.k1.p50_ms,
                    "reserve_k1_p99_ms": r.k1.p99_ms,
                    "reserve_k3_p50_ms": r.k3.p50_ms,
                    "reserve_k3_p99_ms": r.k3.p99_ms,
                    "dispatch_per_s": r.dispatch_per_s,
                    "tasks": args.tasks,
                    "dispatched": r.dispatched,
                    "reserve_k1": r.k1,
                    "reserve_k3": r.k3,
                    "reserve_k1_distinct_slices": r.k1_distinct,
                    "reserve_k3_distinct_slices": r.k3_distinct,
                    "reserve_k1_redis_us": r.k1_redis_us,
                    "reserve_k3_redis_us": r.k3_redis_us,
                    "reserve_k1_examined": r.k1_examined,
                    "reserve_k3_examined": r.k3_examined,
                    "reachable_slots": r.reachable_slots,
                    "reachable_probe_cap": PROBE_CAP,
                    "fleet_slots": n * args.slots as usize,
                    "dispatch_distinct_slices": r.dispatch_distinct,
                    "dispatch_max_per_slice": r.dispatch_max_per_slice,
                    "dispatch_evalsha_per_task": r.dispatch_evalsha_per_task,
                    "dispatch_redis_evalsha_us": r.dispatch_evalsha_us,
                    "inject_per_s": r.inject_per_s,
                    "inflight_left": r.inflight_left,
                    "announce_s": r.announce_s,
                    "scan": scan_of(&args),
                    "slots_per_slice": args.slots,
                    "reserves": args.reserves,
                });
                writeln!(f, "{record}")?;
                f.flush()?;
            }
            runs.push(r);
        }
        by_size.push((n, runs));
    }
    print_summary(&by_size, started.elapsed());
    Ok(())
}

fn scan_of(args: &Args) -> usize {
    let defaults = sundara_scheduler::Config::new(
        Endpoints { nats: sundara_common::nats::NatsEndpoint::open(""), redis_url: String::new(), redis_ca: None },
        sundara_common::validator_key::Secret::new(SECRET),
    );
    args.scan.unwrap_or(defaults.scan)
}

/// Medians over runs per fleet size, and the target: k=1 p99 under 1 ms at the largest
/// fleet and at most twice its value at the smallest.
fn print_summary(by_size: &[(usize, Vec<RunResult>)], took: Duration) {
    println!("\nmedian over runs ({:.0} s in all):", took.as_secs_f64());
    println!(
        "{:>7}  {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "slices", "k1 p50", "k1 p99", "k3 p50", "k3 p99", "dispatch/s", "slices used"
    );
    let med = |runs: &[RunResult], f: fn(&RunResult) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let mut p99s = Vec::new();
    for (n, runs) in by_size {
        let p99 = med(runs, |r| r.k1.p99_ms);
        p99s.push(p99);
        println!(
            "{n:>7}  {:>7.3} ms {:>7.3} ms {:>7.3} ms {:>7.3} ms {:>12.0} {:>10.0}",
            med(runs, |r| r.k1.p50_ms),
            p99,
            med(runs, |r| r.k3.p50_ms),
            med(runs, |r| r.k3.p99_ms),
            med(runs, |r| r.dispatch_per_s),
            med(runs, |r| r.dispatch_distinct as f64),
        );
    }
    if let (Some(&first), Some(&last)) = (p99s.first(), p99s.last()) {
        let ratio = if first > 0.0 { last / first } else { f64::INFINITY };
        let ok = last < 1.0 && ratio <= 2.0;
        println!(
            "target (k1 p99 < 1 ms at {} slices, <= 2x the {}-slice value): {:.3} ms, {ratio:.2}x -> {}",
            by_size.last().map_or(0, |s| s.0),
            by_size.first().map_or(0, |s| s.0),
            last,
            if ok { "met" } else { "NOT met" }
        );
    }
}

async fn one_run(args: &Args, root: &std::path::Path, n: usize, run: usize) -> Result<RunResult> {
    let root = root.to_path_buf();
    let stack = tokio::task::spawn_blocking(move || LocalStack::start(&root)).await??;
    let ep = stack.endpoints();
    let limit = Duration::from_secs(args.timeout_s);
    let capacity = Capacity::connect(&ep.redis_url).await?;
    let client = redis::Client::open(ep.redis_url.as_str())?;
    let mut admin = tokio::time::timeout(Duration::from_secs(10), client.get_multiplexed_async_connection())
        .await
        .map_err(|_| anyhow!("timed out connecting to Redis"))??;
    let scan = scan_of(args);
    let mut r = RunResult::default();

    let t = Instant::now();
    within(limit, "announcing the fleet", announce_fleet(&capacity, n, args.slots, args.inflight)).await?;
    r.announce_s = t.elapsed().as_secs_f64();
    let listed: usize =
        redis::cmd("ZCARD").arg(sundara_common::capacity::cand_key(MODEL)).query_async(&mut admin).await?;
    if listed != n {
        bail!("{listed} candidate slices in Redis after announcing {n}");
    }

    let lat = Latency { capacity: &capacity, scan, tag: format!("r{run}") };
    (r.k1, r.k1_distinct) = within(limit, "timing k=1 reservations", lat.timed(1, args.reserves)).await?;
    (r.k3, r.k3_distinct) = within(limit, "timing k=3 reservations", lat.timed(3, args.reserves)).await?;
    let fleet_slots = n * args.slots as usize;
    (r.k1_redis_us, r.k1_examined) =
        within(limit, "Redis-side cost k=1", lat.redis_side(&mut admin, 1, fleet_slots)).await?;
    (r.k3_redis_us, r.k3_examined) =
        within(limit, "Redis-side cost k=3", lat.redis_side(&mut admin, 3, fleet_slots)).await?;
    r.reachable_slots = within(limit, "probing reachable slots", lat.reachable(fleet_slots.min(PROBE_CAP))).await?;
    let left = capacity.inflight().await?;
    if left != 0 {
        bail!("{left} reservations left after the latency passes");
    }

    dispatch(args, &ep, &capacity, &mut admin, &mut r).await?;
    drop(stack);
    Ok(r)
}

fn worker_name(i: usize) -> String {
    format!("w{i:05}")
}

/// Announces `n` workers of one slice each, `inflight` announces at a time.
async fn announce_fleet(capacity: &Capacity, n: usize, slots: u32, inflight: usize) -> Result<()> {
    let mut announces = futures::stream::iter(0..n)
        .map(|i| {
            let a = WorkerAnnounce {
                worker: worker_name(i),
                operator: format!("op{i:05}"),
                slices: vec![SliceAnnounce {
                    id: format!("{}-s0", worker_name(i)),
                    device: "sim".into(),
                    slots,
                    models: vec![MODEL.into()],
                    ..Default::default()
                }],
            };
            async move { capacity.announce(&a, true, HEARTBEAT_TTL_MS).await }
        })
        .buffer_unordered(inflight.max(1));
    while let Some(done) = announces.next().await {
        done?;
    }
    Ok(())
}

/// `(calls, usec)` per command from `INFO commandstats`.
async fn commandstats(con: &mut MultiplexedConnection) -> Result<HashMap<String, (u64, u64)>> {
    let text: String = redis::cmd("INFO").arg("commandstats").query_async(con).await?;
    let mut stats = HashMap::new();
    for line in text.lines() {
        let Some((name, fields)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        let field = |key: &str| {
            fields.split(',').find_map(|f| f.strip_prefix(key)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        stats.insert(name.to_string(), (field("calls="), field("usec=")));
    }
    Ok(stats)
}

fn delta(before: &HashMap<String, (u64, u64)>, after: &HashMap<String, (u64, u64)>, cmd: &str) -> (u64, u64) {
    let a = after.get(cmd).copied().unwrap_or_default();
    let b = before.get(cmd).copied().unwrap_or_default();
    (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1))
}

/// The reservation passes of one run.
struct Latency<'a> {
    capacity: &'a Capacity,
    scan: usize,
    tag: String,
}

impl Latency<'_> {
    async fn reserve(&self, task: &str, k: usize) -> Result<(Vec<String>, Option<Vec<(String, String)>>)> {
        let aids: Vec<String> = (0..k).map(|r| assignment_id(task, r as u8, 0)).collect();
        let timeout_at = now_ms() + RESERVATION_MS;
        let terms = ReserveTerms {
            timeout_at_ms: timeout_at,
            ttl_ms: RESERVATION_MS,
            scan: self.scan,
            placement: Placement::ExpectedCompletion,
        };
        let picks = self.capacity.reserve(MODEL, task, &aids, terms).await?;
        Ok((aids, picks.map(|picks| picks.into_iter().map(|p| (p.slice, p.worker)).collect())))
    }

    async fn release_all(&self, aids: &[String]) -> Result<()> {
        let mut releases = futures::stream::iter(aids).map(|aid| self.capacity.release(aid, None)).buffer_unordered(64);
        while let Some(done) = releases.next().await {
            done?;
        }
        Ok(())
    }

    /// `iters` sequential reserve(k) + release; returns the reserve latencies and how many
    /// distinct slices were picked.
    async fn timed(&self, k: usize, iters: usize) -> Result<(Summary, usize)> {
        // Warm-up: loads the scripts (EVALSHA → NOSCRIPT → EVAL) and the connection.
        for i in 0..50 {
            let (aids, _) = self.reserve(&format!("{}-warm{k}-{i}", self.tag), k).await?;
            self.release_all(&aids).await?;
        }
        let mut micros = Vec::with_capacity(iters);
        let mut slices = HashSet::new();
        for i in 0..iters {
            let task = format!("{}-k{k}-{i}", self.tag);
            let t = Instant::now();
            let (aids, picks) = self.reserve(&task, k).await?;
            micros.push(t.elapsed().as_micros() as u64);
            let picks = picks.with_context(|| format!("no capacity for k={k} on an idle fleet"))?;
            slices.extend(picks.into_iter().map(|(s, _)| s));
            for aid in &aids {
                self.capacity.release(aid, None).await?;
            }
        }
        Ok((Summary::from_micros(&mut micros), slices.len()))
    }

    /// Redis-side microseconds per reserve(k) and candidate slices examined per call (HMGETs
    /// less the k lookups of already-held ids), from `INFO commandstats` around batches of
    /// reserves only (each batch released outside the bracket).
    async fn redis_side(&self, admin: &mut MultiplexedConnection, k: usize, fleet_slots: usize) -> Result<(f64, f64)> {
        let batch = (fleet_slots / (2 * k)).clamp(1, 50);
        let (mut calls, mut usec, mut hmgets) = (0u64, 0u64, 0u64);
        for b in 0..20 {
            let before = commandstats(admin).await?;
            let mut held = Vec::new();
            for j in 0..batch {
                let (aids, picks) = self.reserve(&format!("{}-rs{k}-{b}-{j}", self.tag), k).await?;
                if picks.is_some() {
                    held.extend(aids);
                }
            }
            let after = commandstats(admin).await?;
            self.release_all(&held).await?;
            let (c, u) = delta(&before, &after, "evalsha");
            calls += c;
            usec += u;
            hmgets += delta(&before, &after, "hmget").0;
        }
        if calls == 0 {
            return Ok((0.0, 0.0));
        }
        let examined = hmgets as f64 / calls as f64 - k as f64;
        Ok((usec as f64 / calls as f64, examined))
    }

    /// Reserves k=1 without releasing until the store refuses (or `cap` succeed): how many
    /// of the fleet's slots a reservation can reach. Releases them all afterwards.
    async fn reachable(&self, cap: usize) -> Result<usize> {
        let mut held = Vec::new();
        for i in 0..cap {
            let (aids, picks) = self.reserve(&format!("{}-probe-{i}", self.tag), 1).await?;
            if picks.is_none() {
                break;
            }
            held.extend(aids);
        }
        self.release_all(&held).await?;
        Ok(held.len())
    }
}

/// What the simulated fleet saw.
#[derive(Default)]
struct Fleet {
    first: Option<Instant>,
    last: Option<Instant>,
    seen: HashSet<String>,
    per_slice: HashMap<String, u32>,
    errors: u64,
}

/// The simulated fleet: answers every assignment at once with an `Ok` outcome, then acks.
async fn fleet_loop(
    consumer: jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    js: jetstream::Context,
    shutdown: Shutdown,
    state: Arc<Mutex<Fleet>>,
    expected: usize,
    all_in: Arc<tokio::sync::Notify>,
    concurrency: usize,
) -> Result<()> {
    let handle = |msg: jetstream::Message| {
        let (js, state, all_in) = (js.clone(), state.clone(), all_in.clone());
        async move {
            let received = Instant::now();
            let received_us = now_us();
            let Ok(work) = nats::work_of_message(&msg) else {
                state.lock().expect("fleet state").errors += 1;
                let _ = msg.ack().await;
                return;
            };
            for (a, _) in work {
                let aid = a.ticket.assignment_id();
                {
                    let mut s = state.lock().expect("fleet state");
                    if s.seen.insert(aid.clone()) {
                        s.first.get_or_insert(received);
                        s.last = Some(received);
                        *s.per_slice.entry(a.ticket.slice.clone()).or_default() += 1;
                        if s.seen.len() == expected {
                            all_in.notify_one();
                        }
                    }
                }
                let subject = subj::outcome(&a.ticket.task_id, &a.ticket.worker);
                let outcome = Outcome {
                    v: WIRE_VERSION,
                    ticket: a.ticket,
                    result: OutcomeResult::Ok { outputs: vec![] },
                    compute_us: 0,
                    timing: WorkTiming {
                        accepted_us: a.accepted_at_us,
                        received_us,
                        started_us: received_us,
                        finished_us: received_us,
                    },
                };
                if nats::publish_durable(&js, subject, &outcome.ticket.outcome_id(), encode(&outcome)).await.is_err() {
                    state.lock().expect("fleet state").errors += 1;
                    let _ = msg.ack_with(jetstream::AckKind::Nak(None)).await;
                    return;
                }
            }
            let _ = msg.ack().await;
        }
    };
    nats::consume(&consumer, &shutdown, concurrency, handle).await?;
    Ok(())
}

/// Puts `args.tasks` tasks into TASKS, then runs the real scheduler against the simulated
/// fleet until every assignment arrived and every slot was released.
async fn dispatch(
    args: &Args,
    ep: &Endpoints,
    capacity: &Capacity,
    admin: &mut MultiplexedConnection,
    r: &mut RunResult,
) -> Result<()> {
    let limit = Duration::from_secs(args.timeout_s);
    let js = jetstream::new(nats::connect(&ep.nats, "scalesim-inject").await?);
    nats::provision(&js, &nats::Retention::default()).await?;
    let t = Instant::now();
    within(limit, "injecting tasks", inject(args, &js)).await?;
    r.inject_per_s = args.tasks as f64 / t.elapsed().as_secs_f64();

    let fleet_js = jetstream::new(nats::connect(&ep.nats, "scalesim-fleet").await?);
    let consumer = nats::durable_consumer(
        &fleet_js,
        subj::WORK_STREAM,
        "scalesim-fleet",
        subj::WORK_ALL,
        Duration::from_secs(30),
        (args.inflight * 4) as i64,
    )
    .await?;
    let shutdown = Shutdown::new();
    let state = Arc::new(Mutex::new(Fleet::default()));
    let all_in = Arc::new(tokio::sync::Notify::new());
    let fleet = tokio::spawn(fleet_loop(
        consumer,
        fleet_js,
        shutdown.child_token(),
        state.clone(),
        args.tasks,
        all_in.clone(),
        args.inflight,
    ));

    redis::cmd("CONFIG").arg("RESETSTAT").query_async::<()>(admin).await?;
    let mut config = sundara_scheduler::Config::new(ep.clone(), sundara_common::validator_key::Secret::new(SECRET));
    config.scan = scan_of(args);
    let scheduler = tokio::spawn(sundara_scheduler::run(config, shutdown.child_token()));
    let mut running = Running { scheduler, fleet, scheduler_done: false, fleet_done: false };

    if let Err(e) = running.until_all_in(&all_in, limit).await {
        eprintln!("warning: {e:#}");
    }
    r.inflight_left = await_released(capacity).await?;
    let stats = commandstats(admin).await?;
    shutdown.cancel();
    running.stop().await;
    record_dispatch(args, &state.lock().expect("fleet state"), &stats, r);
    Ok(())
}

/// Publishes `args.tasks` tasks of [`MODEL`] into TASKS, `args.inflight` publishes at a time.
async fn inject(args: &Args, js: &jetstream::Context) -> Result<()> {
    let deadline_at_ms = now_ms() + 3_600_000;
    let inputs = vec![Tensor::from_values("x", vec![1, 4], &[0f32; 4])];
    let mut publishes = futures::stream::iter(0..args.tasks)
        .map(|i| {
            let task = Task {
                v: WIRE_VERSION,
                task_id: format!("sim{i:07}"),
                tenant: "sim".into(),
                model: ModelRef { name: MODEL.into(), version: "1".into() },
                k: 1,
                inputs: inputs.clone(),
                seed: i as u64,
                submitted_at_ms: now_ms(),
                deadline_at_ms,
                accepted_at_us: now_us(),
                priority: Priority::Normal,
            };
            let js = js.clone();
            let subject = subj::task(task.priority, MODEL);
            async move { nats::publish_durable(&js, subject, &task.task_id, encode(&task)).await }
        })
        .buffer_unordered(args.inflight.max(1));
    while let Some(done) = publishes.next().await {
        done?;
    }
    Ok(())
}

/// The scheduler and the simulated fleet of a dispatch run, and whether each has been
/// awaited already (a finished task's handle cannot be awaited again).
struct Running {
    scheduler: tokio::task::JoinHandle<Result<(), sundara_scheduler::SchedulerError>>,
    fleet: tokio::task::JoinHandle<Result<()>>,
    scheduler_done: bool,
    fleet_done: bool,
}

impl Running {
    /// Waits until every assignment arrived; an error if `limit` passes first or either
    /// task stops early.
    async fn until_all_in(&mut self, all_in: &tokio::sync::Notify, limit: Duration) -> Result<()> {
        tokio::select! {
            _ = all_in.notified() => Ok(()),
            done = &mut self.scheduler => {
                self.scheduler_done = true;
                Err(anyhow!("the scheduler stopped early: {done:?}"))
            }
            done = &mut self.fleet => {
                self.fleet_done = true;
                Err(anyhow!("the fleet stopped early: {done:?}"))
            }
            _ = tokio::time::sleep(limit) => Err(anyhow!("not every assignment arrived within {} s", limit.as_secs())),
        }
    }

    /// Waits up to 10 s for both to stop (after the shutdown), reporting their failures;
    /// aborts them past that.
    async fn stop(mut self) {
        let stopped = tokio::time::timeout(Duration::from_secs(10), async {
            if !self.scheduler_done {
                match (&mut self.scheduler).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("warning: the scheduler failed: {e}"),
                    Err(e) => eprintln!("warning: the scheduler task: {e}"),
                }
            }
            if !self.fleet_done
                && let Ok(Err(e)) = (&mut self.fleet).await
            {
                eprintln!("warning: the fleet failed: {e:#}");
            }
        })
        .await;
        if stopped.is_err() {
            self.scheduler.abort();
            self.fleet.abort();
            eprintln!("warning: the scheduler or the fleet did not stop within 10 s");
        }
    }
}

/// Every outcome frees its slot through the scheduler's release loop: waits up to 10 s
/// for that, and returns the slots still held.
async fn await_released(capacity: &Capacity) -> Result<u64> {
    let drain = Instant::now();
    let mut left = capacity.inflight().await?;
    while left > 0 && drain.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = capacity.inflight().await?;
    }
    Ok(left)
}

/// Fills `r`'s dispatch figures from what the fleet saw and Redis' `commandstats`.
fn record_dispatch(args: &Args, s: &Fleet, stats: &HashMap<String, (u64, u64)>, r: &mut RunResult) {
    r.dispatched = s.seen.len();
    if let (Some(first), Some(last)) = (s.first, s.last) {
        let span = last.duration_since(first).as_secs_f64();
        r.dispatch_per_s = if span > 0.0 { (r.dispatched.saturating_sub(1)) as f64 / span } else { 0.0 };
    }
    r.dispatch_distinct = s.per_slice.len();
    r.dispatch_max_per_slice = s.per_slice.values().copied().max().unwrap_or(0);
    if s.errors > 0 {
        eprintln!("warning: the fleet failed to handle {} assignments", s.errors);
    }
    let (calls, usec) = stats.get("evalsha").copied().unwrap_or_default();
    r.dispatch_evalsha_per_task = calls as f64 / args.tasks.max(1) as f64;
    r.dispatch_evalsha_us = if calls > 0 { usec as f64 / calls as f64 } else { 0.0 };
}
