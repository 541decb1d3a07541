//! Placement benchmark: a mixed-size fleet under a mixed workload, placed by expected
//! completion time (the scheduler's default) against a random choice of slices with a free
//! slot (the original Sundara's choice), on the same workload and the same fleet.
//!
//! The fleet is simulated: GPUs of different sizes cannot exist on the benchmark machine, so
//! each slice is a device double. It is announced in Redis as a real worker announces one
//! (its own worker and operator, `lanes` inferences at once, `slots` = lanes ×
//! `--slots-per-lane`, every model loaded, re-announced every 500 ms as a heartbeat) and
//! consumes its own WORK subject as a real worker does. Its `service_us` per model is, as a
//! worker's, the moving average of what its tasks took (from the nominal time at start):
//! the true service time, timer overshoot included. An assignment waits for a free lane (a FIFO semaphore, like the worker's
//! executor queue) and then "computes" for base time / speed factor with a timer: the timer
//! is the device double's compute, not a stand-in for anything Sundara does. It then stores
//! an `Ok` outcome in OUTCOMES and acks. The scheduler is the real one, in process, with
//! only `placement` changed; it frees the slot when it sees the outcome. No verifier runs:
//! latency is measured from the task's scheduled submission to its outcome being stored.
//!
//! Arrivals are open loop (Poisson, seeded: both placements get the same sequence of
//! arrival times and models in a run) at `--load` × the fleet's ideal capacity (Σ lanes ×
//! speed / mean base service time). After a warm-up, tasks arriving in the measured window
//! are followed until their outcome is stored (arrivals go on meanwhile). The default
//! service times (20 and 400 ms at speed 1, so 5 to 400 ms on the fleet) keep the
//! scheduler's own cost per task (about a millisecond here) and the timer's millisecond
//! granularity small against the shortest service time.
//!
//! Per (load, placement, run), on a fresh NATS + Redis: completed tasks/s in the window,
//! latency (submission → outcome stored, and dispatch → outcome stored), lane-time
//! utilisation (busy lane-time / (lanes × window)) overall and per slice class, and capacity
//! utilisation (busy lane-time weighted by speed / (Σ lanes × speed × window)). One JSON
//! object per run is appended to `--out`; the summary gives medians per placement and
//! ExpectedCompletion / Random ratios.
//!
//! `cargo run --release -p sundara-bench --bin placement -- --runs 3 --out placement.jsonl`

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream;
use clap::Parser;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sundara::stack::{LocalStack, project_root};
use sundara_bench::stats::{Summary, median};
use sundara_bench::within;
use sundara_common::capacity::{Placement, SliceAnnounce, WorkerAnnounce};
use sundara_common::{Capacity, Shutdown, nats};
use sundara_schemas::{
    Assignment, ModelRef, Outcome, OutcomeResult, Priority, Task, Tensor, WIRE_VERSION, WorkTiming, encode, now_ms,
    now_us, subjects as subj,
};
use tokio::sync::Semaphore;

const SECRET: &[u8] = b"placement-secret";
/// As the real worker's defaults.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
const HEARTBEAT_TTL_MS: u64 = 2000;
/// Weight of the newest task in a slice's moving average of service time (as the worker's).
const SERVICE_EMA: f64 = 0.2;
const GIB: u64 = 1 << 30;

/// A class of identical slices: `name=COUNTxLANESxSPEED`.
#[derive(Clone, Debug)]
struct Class {
    name: String,
    count: usize,
    lanes: u32,
    speed: f64,
}

fn parse_class(s: &str) -> Result<Class, String> {
    let usage = || format!("{s:?}: expected NAME=COUNTxLANESxSPEED, e.g. big=2x8x4");
    let (name, spec) = s.split_once('=').ok_or_else(usage)?;
    let parts: Vec<&str> = spec.split('x').collect();
    let [count, lanes, speed] = parts[..] else { return Err(usage()) };
    let class = Class {
        name: name.to_string(),
        count: count.parse().map_err(|_| usage())?,
        lanes: lanes.parse().map_err(|_| usage())?,
        speed: speed.parse().map_err(|_| usage())?,
    };
    if !subj::is_token(&class.name) || class.count == 0 || class.lanes == 0 || !positive(class.speed) {
        return Err(usage());
    }
    Ok(class)
}

/// Greater than zero (NaN is not).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// A model of the workload: `name=BASE_MS:SHARE` (base service time at speed 1, share of tasks).
#[derive(Clone, Debug)]
struct Model {
    name: String,
    base_ms: f64,
    share: f64,
}

fn parse_model(s: &str) -> Result<Model, String> {
    let usage = || format!("{s:?}: expected NAME=BASE_MS:SHARE, e.g. large=400:0.2");
    let (name, spec) = s.split_once('=').ok_or_else(usage)?;
    let (base, share) = spec.split_once(':').ok_or_else(usage)?;
    let model = Model {
        name: name.to_string(),
        base_ms: base.parse().map_err(|_| usage())?,
        share: share.parse().map_err(|_| usage())?,
    };
    if !subj::is_token(&model.name) || !positive(model.base_ms) || !positive(model.share) {
        return Err(usage());
    }
    Ok(model)
}

#[derive(Parser, Debug, Clone)]
#[command(about = "Placement: expected completion time against random choice, on a simulated mixed-size fleet")]
struct Args {
    /// Slice classes, NAME=COUNTxLANESxSPEED (speed: how many times faster than speed 1).
    #[arg(long, value_delimiter = ',', value_parser = parse_class, default_value = "big=2x8x4,medium=4x2x2,small=8x1x1")]
    fleet: Vec<Class>,
    /// Slots per slice = lanes × this (room for assignments queued on the slice).
    #[arg(long, default_value_t = 2)]
    slots_per_lane: u32,
    /// Models, NAME=BASE_MS:SHARE (service time at speed 1; share of tasks by count).
    #[arg(long, value_delimiter = ',', value_parser = parse_model, default_value = "small=20:0.8,large=400:0.2")]
    models: Vec<Model>,
    /// Offered load(s) as a share of the fleet's ideal capacity.
    #[arg(long, value_delimiter = ',', default_value = "0.7")]
    load: Vec<f64>,
    /// Runs per placement and load, each on a fresh NATS and Redis.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds of arrivals before the measured window.
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    measure_s: f64,
    /// Seed of the arrivals (run r uses seed + r, the same for both placements).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Task publishes in flight at once (a full window shows as publish lag).
    #[arg(long, default_value_t = 512)]
    inflight: usize,
    /// Appends one JSON object per (load, placement, run) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Limit on starting a run and on waiting for its measured tasks after the window.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

impl Args {
    fn slots(&self, c: &Class) -> u32 {
        c.lanes * self.slots_per_lane
    }

    /// Mean base service time (µs) over the mix.
    fn mean_base_us(&self) -> f64 {
        let total: f64 = self.models.iter().map(|m| m.share).sum();
        self.models.iter().map(|m| m.share / total * m.base_ms * 1000.0).sum()
    }

    /// Tasks/s the fleet completes with every lane busy and nothing lost between tasks.
    fn ideal_per_s(&self) -> f64 {
        let units: f64 = self.fleet.iter().map(|c| c.count as f64 * c.lanes as f64 * c.speed).sum();
        units / (self.mean_base_us() / 1e6)
    }

    fn total_lanes(&self) -> u64 {
        self.fleet.iter().map(|c| c.count as u64 * c.lanes as u64).sum()
    }
}

fn placement_name(p: Placement) -> &'static str {
    match p {
        Placement::ExpectedCompletion => "expected-completion",
        Placement::Random => "random",
    }
}

/// One run's numbers.
#[derive(Debug, Default)]
struct RunResult {
    offered_per_s: f64,
    measured_tasks: usize,
    unfinished: usize,
    completed_per_s: f64,
    /// Scheduled submission → outcome stored.
    latency: Summary,
    /// Dispatch (the ticket's time) → outcome stored.
    after_dispatch: Summary,
    /// Scheduled submission → dispatch, mean ms.
    capacity_wait_ms: f64,
    /// Waiting for a lane on the slice, mean ms.
    slice_queue_ms: f64,
    lane_util: f64,
    capacity_util: f64,
    /// Per class: lane-time utilisation, and measured tasks per model placed there.
    class_util: Vec<f64>,
    class_tasks: Vec<Vec<usize>>,
    /// Per class and model: the compute time each task took (mean ms), against the
    /// announced service time (the timer oversleeps a little).
    class_compute_ms: Vec<Vec<f64>>,
    reassigned: usize,
    fleet_errors: u64,
    publish_errors: u64,
    max_publish_lag_ms: f64,
    /// Slices that ever held more assignments than their slots (should be none).
    over_slots: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    sundara_common::init_logging("warn", Default::default());
    let args = Args::parse();
    if args.runs == 0 || args.slots_per_lane == 0 || args.fleet.is_empty() || args.models.is_empty() {
        bail!("--runs, --slots-per-lane, --fleet and --models must be non-empty/positive");
    }
    if !args.load.iter().all(|&l| positive(l))
        || !positive(args.measure_s)
        || args.warmup_s.is_nan()
        || args.warmup_s < 0.0
    {
        bail!("--load and --measure-s must be positive, --warmup-s not negative");
    }
    let names: HashSet<&str> = args.fleet.iter().map(|c| c.name.as_str()).collect();
    let models: HashSet<&str> = args.models.iter().map(|m| m.name.as_str()).collect();
    if names.len() != args.fleet.len() || models.len() != args.models.len() {
        bail!("class and model names must be distinct");
    }
    let root = project_root();
    let mut out = sundara_bench::open_results(args.out.as_deref()).context("opening --out")?;
    println!(
        "fleet: {} ({} lanes, {} slots); models: {}; ideal capacity {:.0} tasks/s",
        args.fleet
            .iter()
            .map(|c| format!("{} {} ({} lanes, speed {})", c.count, c.name, c.lanes, c.speed))
            .collect::<Vec<_>>()
            .join(", "),
        args.total_lanes(),
        args.fleet.iter().map(|c| c.count as u32 * args.slots(c)).sum::<u32>(),
        args.models.iter().map(|m| format!("{} {} ms ({})", m.name, m.base_ms, m.share)).collect::<Vec<_>>().join(", "),
        args.ideal_per_s(),
    );
    let started = Instant::now();
    let placements = [Placement::ExpectedCompletion, Placement::Random];
    let mut results: Vec<(f64, Placement, RunResult)> = Vec::new();
    for &load in &args.load {
        for run in 1..=args.runs {
            // Alternate which placement goes first, so drift in the machine favours neither.
            let order: Vec<Placement> =
                if run % 2 == 1 { placements.to_vec() } else { placements.iter().rev().copied().collect() };
            for placement in order {
                let seed = args.seed + run as u64;
                let r = one_run(&args, &root, placement, load, seed)
                    .await
                    .with_context(|| format!("load {load}, {}, run {run}", placement_name(placement)))?;
                print_run(&args, load, placement, run, &r);
                if let Some(f) = out.as_mut() {
                    writeln!(f, "{}", record(&args, load, placement, run, seed, &r))?;
                    f.flush()?;
                }
                results.push((load, placement, r));
            }
        }
    }
    print_summary(&args, &results, started.elapsed());
    Ok(())
}

fn print_run(args: &Args, load: f64, placement: Placement, run: usize, r: &RunResult) {
    let classes: Vec<String> =
        args.fleet.iter().zip(&r.class_util).map(|(c, u)| format!("{} {:.0}%", c.name, u * 100.0)).collect();
    println!(
        "load={load} {:<19} run={run}  offered {:.0}/s  completed {:.0}/s  latency mean {:.1} p95 {:.1} ms  \
         lanes busy {:.0}% ({})  capacity busy {:.0}%  unfinished {}",
        placement_name(placement),
        r.offered_per_s,
        r.completed_per_s,
        r.latency.mean_ms,
        r.latency.p95_ms,
        r.lane_util * 100.0,
        classes.join(", "),
        r.capacity_util * 100.0,
        r.unfinished,
    );
    if r.unfinished > 0 || r.fleet_errors > 0 || r.publish_errors > 0 || r.over_slots > 0 || r.reassigned > 0 {
        eprintln!(
            "warning: {} unfinished, {} fleet errors, {} publish errors, {} slices over their slots, {} reassigned",
            r.unfinished, r.fleet_errors, r.publish_errors, r.over_slots, r.reassigned
        );
    }
}

fn record(args: &Args, load: f64, placement: Placement, run: usize, seed: u64, r: &RunResult) -> serde_json::Value {
    let classes: Vec<serde_json::Value> = args
        .fleet
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let by_model = |v: Vec<serde_json::Value>| -> serde_json::Map<String, serde_json::Value> {
                args.models.iter().map(|m| m.name.clone()).zip(v).collect()
            };
            let announced = args.models.iter().map(|m| json!(m.base_ms / c.speed)).collect();
            json!({
                "class": c.name, "slices": c.count, "lanes": c.lanes, "speed": c.speed, "slots": args.slots(c),
                "lane_util": r.class_util[i],
                "measured_tasks": by_model(r.class_tasks[i].iter().map(|n| json!(n)).collect()),
                "announced_service_ms": by_model(announced),
                "mean_compute_ms": by_model(r.class_compute_ms[i].iter().map(|ms| json!(ms)).collect()),
            })
        })
        .collect();
    let models: Vec<serde_json::Value> =
        args.models.iter().map(|m| json!({"model": m.name, "base_ms": m.base_ms, "share": m.share})).collect();
    json!({
        "bench": "placement",
        "placement": placement_name(placement),
        "run": run,
        "seed": seed,
        "load": load,
        "ideal_per_s": args.ideal_per_s(),
        "offered_per_s": r.offered_per_s,
        "completed_per_s": r.completed_per_s,
        "latency": r.latency,
        "after_dispatch": r.after_dispatch,
        "capacity_wait_mean_ms": r.capacity_wait_ms,
        "slice_queue_mean_ms": r.slice_queue_ms,
        "lane_util": r.lane_util,
        "capacity_util": r.capacity_util,
        "classes": classes,
        "models": models,
        "measured_tasks": r.measured_tasks,
        "unfinished": r.unfinished,
        "reassigned": r.reassigned,
        "fleet_errors": r.fleet_errors,
        "publish_errors": r.publish_errors,
        "max_publish_lag_ms": r.max_publish_lag_ms,
        "slices_over_slots": r.over_slots,
        "warmup_s": args.warmup_s,
        "measure_s": args.measure_s,
        "slots_per_lane": args.slots_per_lane,
    })
}

/// Medians over runs per (load, placement), and ExpectedCompletion / Random for each figure.
fn print_summary(args: &Args, results: &[(f64, Placement, RunResult)], took: Duration) {
    println!("\nmedian over {} runs ({:.0} s in all):", args.runs, took.as_secs_f64());
    let class_names: Vec<String> = args.fleet.iter().map(|c| format!("{} busy", c.name)).collect();
    println!(
        "{:>5} {:<19} {:>10} {:>11} {:>10} {:>10} {:>11} {:>13} {}",
        "load",
        "placement",
        "offered/s",
        "completed/s",
        "mean ms",
        "p95 ms",
        "lanes busy",
        "capacity busy",
        class_names.iter().map(|n| format!("{n:>12}")).collect::<String>(),
    );
    type Pick = fn(&RunResult) -> f64;
    let figures: [(&str, Pick, &str); 5] = [
        ("completed/s", |r| r.completed_per_s, "higher is better"),
        ("latency mean", |r| r.latency.mean_ms, "lower is better"),
        ("latency p95", |r| r.latency.p95_ms, "lower is better"),
        ("lane-time utilisation", |r| r.lane_util, "same work on faster lanes reads lower"),
        ("capacity utilisation", |r| r.capacity_util, "follows completed/s"),
    ];
    for &load in &args.load {
        let of = |p: Placement| -> Vec<&RunResult> {
            results.iter().filter(|(l, q, _)| *l == load && *q == p).map(|(_, _, r)| r).collect()
        };
        let med = |runs: &[&RunResult], f: Pick| median(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
        let ect: Vec<&RunResult> = of(Placement::ExpectedCompletion);
        let random: Vec<&RunResult> = of(Placement::Random);
        for (p, runs) in [(Placement::ExpectedCompletion, &ect), (Placement::Random, &random)] {
            let classes: String = (0..args.fleet.len())
                .map(|i| {
                    format!("{:>11.0}%", median(&runs.iter().map(|r| r.class_util[i] * 100.0).collect::<Vec<_>>()))
                })
                .collect();
            println!(
                "{load:>5} {:<19} {:>10.0} {:>11.0} {:>10.1} {:>10.1} {:>10.0}% {:>12.0}% {classes}",
                placement_name(p),
                med(runs, |r| r.offered_per_s),
                med(runs, figures[0].1),
                med(runs, figures[1].1),
                med(runs, figures[2].1),
                med(runs, figures[3].1) * 100.0,
                med(runs, figures[4].1) * 100.0,
            );
        }
        let ratios: Vec<String> = figures
            .iter()
            .map(|(name, f, note)| {
                let (a, b) = (med(&ect, *f), med(&random, *f));
                let ratio = if b > 0.0 { a / b } else { f64::NAN };
                format!("{name} {ratio:.2}x ({note})")
            })
            .collect();
        println!("{load:>5} expected-completion / random: {}", ratios.join("; "));
    }
}

/// One simulated slice (a worker with one slice).
struct SimSlice {
    class: usize,
    worker: String,
    slots: u32,
    lanes: Semaphore,
    /// Assignments received and not yet answered, and the most at once.
    held: AtomicU32,
    max_held: AtomicU32,
    /// µs per task of each model (by index) here: asked of the timer, and the moving
    /// average of what it took (announced, as a worker announces its measurements).
    nominal_us: Vec<u64>,
    measured_us: Mutex<Vec<f64>>,
}

/// One stored outcome, as the fleet saw it.
struct Done {
    index: usize,
    model: usize,
    slice: usize,
    attempt: u16,
    accepted_us: u64,
    dispatched_us: u64,
    received_us: u64,
    started_us: u64,
    finished_us: u64,
    stored_us: u64,
}

#[derive(Default)]
struct Record {
    done: Vec<Done>,
    /// Assignments answered (a redelivery of one is acked and not run again).
    answered: HashSet<String>,
    /// Tasks answered at least once.
    tasks: HashSet<usize>,
    measured_done: usize,
}

/// The simulated fleet's shared state.
struct Fleet {
    slices: Vec<SimSlice>,
    models: HashMap<String, usize>,
    record: Mutex<Record>,
    /// Task indices of the measured window.
    measured: std::ops::Range<usize>,
    errors: AtomicU64,
}

fn task_id(index: usize) -> String {
    format!("t{index:08}")
}

fn task_index(id: &str) -> Option<usize> {
    id.strip_prefix('t')?.parse().ok()
}

impl Fleet {
    /// The fleet `--fleet` describes, each slice's nominal service times from its class's
    /// speed; `measured` is the window's task indices.
    fn new(args: &Args, measured: std::ops::Range<usize>) -> Fleet {
        let mut slices = Vec::new();
        for (ci, c) in args.fleet.iter().enumerate() {
            let nominal: Vec<u64> =
                args.models.iter().map(|m| (m.base_ms * 1000.0 / c.speed).round().max(1.0) as u64).collect();
            for n in 0..c.count {
                slices.push(SimSlice {
                    class: ci,
                    worker: format!("{}-{n:03}", c.name),
                    slots: args.slots(c),
                    lanes: Semaphore::new(c.lanes as usize),
                    held: AtomicU32::new(0),
                    max_held: AtomicU32::new(0),
                    nominal_us: nominal.clone(),
                    measured_us: Mutex::new(nominal.iter().map(|&us| us as f64).collect()),
                });
            }
        }
        Fleet {
            slices,
            models: args.models.iter().enumerate().map(|(i, m)| (m.name.clone(), i)).collect(),
            record: Mutex::new(Record::default()),
            measured,
            errors: AtomicU64::new(0),
        }
    }

    fn announce(&self, args: &Args, i: usize) -> WorkerAnnounce {
        let s = &self.slices[i];
        let c = &args.fleet[s.class];
        WorkerAnnounce {
            worker: s.worker.clone(),
            operator: s.worker.clone(),
            slices: vec![SliceAnnounce {
                id: format!("{}-s0", s.worker),
                device: format!("sim-{}", c.name),
                slots: s.slots,
                models: args.models.iter().map(|m| m.name.clone()).collect(),
                memory_total: c.lanes as u64 * 8 * GIB,
                memory_free: c.lanes as u64 * 4 * GIB,
                loaded: args.models.iter().map(|m| (format!("{}@1", m.name), GIB)).collect(),
                lanes: c.lanes,
                // Every model is loaded everywhere, so no load time enters the estimate (it
                // is announced all the same, as a worker would).
                service_us: args
                    .models
                    .iter()
                    .zip(s.measured_us.lock().expect("service times").iter())
                    .map(|(m, us)| (m.name.clone(), us.round() as u64))
                    .collect(),
                load_us: args.models.iter().map(|m| (m.name.clone(), 1_000_000)).collect(),
                ..Default::default()
            }],
        }
    }

    /// Runs a WORK message's assignments on slice `i`, then acks it (or has it delivered
    /// again if an outcome could not be stored).
    async fn on_work(&self, i: usize, js: &jetstream::Context, msg: jetstream::Message) {
        let received_us = now_us();
        let Ok(work) = nats::work_of_message(&msg) else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            return;
        };
        let ran = futures::future::join_all(work.into_iter().map(|(a, _)| self.on_assignment(i, js, a, received_us)));
        if ran.await.into_iter().all(|stored| stored) {
            let _ = msg.ack().await;
        } else {
            let _ = msg.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(200)))).await;
        }
    }

    /// Runs one assignment on slice `i`: a lane, the device's compute time, then the
    /// outcome. False if the outcome could not be stored.
    async fn on_assignment(&self, i: usize, js: &jetstream::Context, a: Assignment, received_us: u64) -> bool {
        let s = &self.slices[i];
        let aid = a.ticket.assignment_id();
        let (Some(&model), Some(index)) = (self.models.get(&a.ticket.model.name), task_index(&a.ticket.task_id)) else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        if self.record.lock().expect("fleet record").answered.contains(&aid) {
            return true;
        }
        let held = s.held.fetch_add(1, Ordering::SeqCst) + 1;
        s.max_held.fetch_max(held, Ordering::SeqCst);
        let (started_us, finished_us) = {
            let _lane = s.lanes.acquire().await.expect("lanes are never closed");
            let started = now_us();
            tokio::time::sleep(Duration::from_micros(s.nominal_us[model])).await;
            (started, now_us())
        };
        {
            let took = (finished_us - started_us) as f64;
            let ema = &mut s.measured_us.lock().expect("service times")[model];
            *ema += SERVICE_EMA * (took - *ema);
        }
        s.held.fetch_sub(1, Ordering::SeqCst);
        let dispatched_us = a.ticket.dispatched_at_us;
        let attempt = a.ticket.attempt;
        let subject = subj::outcome(&a.ticket.task_id, &a.ticket.worker);
        let outcome = Outcome {
            v: WIRE_VERSION,
            ticket: a.ticket,
            result: OutcomeResult::Ok { outputs: vec![] },
            compute_us: finished_us - started_us,
            timing: WorkTiming { accepted_us: a.accepted_at_us, received_us, started_us, finished_us },
        };
        if nats::publish_durable(js, subject, &outcome.ticket.outcome_id(), encode(&outcome)).await.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let stored_us = now_us();
        {
            let mut r = self.record.lock().expect("fleet record");
            if r.answered.insert(aid) {
                r.done.push(Done {
                    index,
                    model,
                    slice: i,
                    attempt,
                    accepted_us: a.accepted_at_us,
                    dispatched_us,
                    received_us,
                    started_us,
                    finished_us,
                    stored_us,
                });
                if r.tasks.insert(index) && self.measured.contains(&index) {
                    r.measured_done += 1;
                }
            }
        }
        true
    }
}

/// When each task arrives (µs after the start) and its model.
fn schedule(args: &Args, rate: f64, seed: u64, horizon_s: f64) -> Vec<(u64, usize)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let total: f64 = args.models.iter().map(|m| m.share).sum();
    let mut at = 0.0f64;
    let mut out = Vec::new();
    loop {
        // Exponential gaps: Poisson arrivals.
        at += -(1.0 - rng.random::<f64>()).ln() / rate;
        if at >= horizon_s {
            return out;
        }
        let mut pick = rng.random::<f64>() * total;
        let model = args
            .models
            .iter()
            .position(|m| {
                pick -= m.share;
                pick < 0.0
            })
            .unwrap_or(args.models.len() - 1);
        out.push(((at * 1e6) as u64, model));
    }
}

/// What the load generator saw.
#[derive(Default)]
struct Generated {
    errors: AtomicU64,
    max_lag_us: AtomicU64,
}

/// Publishes the scheduled tasks into TASKS at their times until `stop`; the submission time
/// a task carries is its scheduled one, so a stalled publisher cannot hide queueing.
async fn generate(
    js: jetstream::Context,
    args: &Args,
    arrivals: &[(u64, usize)],
    (t0, t0_us): (Instant, u64),
    stop: Shutdown,
    seen: Arc<Generated>,
) {
    let window = Arc::new(Semaphore::new(args.inflight.max(1)));
    let inputs = vec![Tensor::from_values("x", vec![1, 4], &[0f32; 4])];
    let deadline_at_ms = now_ms() + 3_600_000;
    for (index, &(at_us, model)) in arrivals.iter().enumerate() {
        let due = t0 + Duration::from_micros(at_us);
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = async {
                tokio::time::sleep_until(due.into()).await;
                window.clone().acquire_owned().await
            } => permit.expect("the window is never closed"),
        };
        seen.max_lag_us.fetch_max(due.elapsed().as_micros() as u64, Ordering::Relaxed);
        let accepted_at_us = t0_us + at_us;
        let name = args.models[model].name.clone();
        let task = Task {
            v: WIRE_VERSION,
            task_id: task_id(index),
            tenant: "placement".into(),
            model: ModelRef { name: name.clone(), version: "1".into() },
            k: 1,
            inputs: inputs.clone(),
            seed: index as u64,
            submitted_at_ms: accepted_at_us / 1000,
            deadline_at_ms,
            accepted_at_us,
            priority: Priority::Normal,
        };
        let (js, seen) = (js.clone(), seen.clone());
        tokio::spawn(async move {
            let subject = subj::task(task.priority, &name);
            if nats::publish_durable(&js, subject, &task.task_id, encode(&task)).await.is_err() {
                seen.errors.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
}

async fn one_run(args: &Args, root: &std::path::Path, placement: Placement, load: f64, seed: u64) -> Result<RunResult> {
    let limit = Duration::from_secs(args.timeout_s);
    let root = root.to_path_buf();
    let stack = within(limit, "starting NATS and Redis", async {
        Ok(tokio::task::spawn_blocking(move || LocalStack::start(&root)).await??)
    })
    .await?;
    let ep = stack.endpoints();
    let js = jetstream::new(nats::connect(&ep.nats, "placement-fleet").await?);
    nats::provision(&js, &nats::Retention::default()).await?;
    let capacity = Capacity::connect(&ep.redis_url).await?;

    let rate = load * args.ideal_per_s();
    let (warm_us, measure_us) = ((args.warmup_s * 1e6) as u64, (args.measure_s * 1e6) as u64);
    let arrivals = schedule(args, rate, seed, args.warmup_s + args.measure_s + args.timeout_s as f64 + 1.0);
    let lo = arrivals.partition_point(|a| a.0 < warm_us);
    let hi = arrivals.partition_point(|a| a.0 < warm_us + measure_us);

    let fleet = Arc::new(Fleet::new(args, lo..hi));
    for i in 0..fleet.slices.len() {
        capacity.announce(&fleet.announce(args, i), true, HEARTBEAT_TTL_MS).await?;
    }
    let shutdown = Shutdown::new();
    let mut tasks = tokio::task::JoinSet::new();
    spawn_slices(&fleet, &js, &shutdown, &mut tasks).await?;
    tasks.spawn(heartbeat(fleet.clone(), args.clone(), capacity.clone(), shutdown.child_token()));
    let mut config = sundara_scheduler::Config::new(ep.clone(), sundara_common::validator_key::Secret::new(SECRET));
    config.placement = placement;
    let stop = shutdown.child_token();
    tasks.spawn(async move { sundara_scheduler::run(config, stop).await.context("scheduler") });

    let generated = Arc::new(Generated::default());
    let (t0, t0_us) = (Instant::now(), now_us());
    let generator = generate(js.clone(), args, &arrivals, (t0, t0_us), shutdown.child_token(), generated.clone());
    let window_end = t0 + Duration::from_micros(warm_us + measure_us);
    let waited = await_answers(generator, &fleet, &mut tasks, window_end, limit).await;
    shutdown.cancel();
    stop_tasks(tasks).await;
    if let Err(e) = &waited {
        eprintln!("warning: {e:#}");
    }
    drop(stack);

    let mut r = RunResult {
        offered_per_s: (hi - lo) as f64 / args.measure_s,
        measured_tasks: hi - lo,
        fleet_errors: fleet.errors.load(Ordering::Relaxed),
        publish_errors: generated.errors.load(Ordering::Relaxed),
        max_publish_lag_ms: generated.max_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        over_slots: fleet.slices.iter().filter(|s| s.max_held.load(Ordering::SeqCst) > s.slots).count(),
        ..Default::default()
    };
    summarise(args, &fleet, (t0_us + warm_us, t0_us + warm_us + measure_us), &mut r);
    Ok(r)
}

/// The spawned fleet, heartbeat and scheduler tasks of one run.
type RunTasks = tokio::task::JoinSet<Result<()>>;

/// Each slice consumes its own WORK subject, as a worker does (its consumer's limits too).
async fn spawn_slices(
    fleet: &Arc<Fleet>,
    js: &jetstream::Context,
    shutdown: &Shutdown,
    tasks: &mut RunTasks,
) -> Result<()> {
    for i in 0..fleet.slices.len() {
        let s = &fleet.slices[i];
        let consumer = nats::durable_consumer(
            js,
            subj::WORK_STREAM,
            &format!("worker-{}", s.worker),
            &subj::work_of(&s.worker),
            Duration::from_secs(30),
            (s.slots * 4) as i64,
        )
        .await?;
        let (fleet, js, stop) = (fleet.clone(), js.clone(), shutdown.child_token());
        let concurrency = s.slots as usize * 2;
        tasks.spawn(async move {
            let handled = nats::consume(&consumer, &stop, concurrency, |msg| fleet.on_work(i, &js, msg)).await;
            handled.with_context(|| format!("slice {i}"))
        });
    }
    Ok(())
}

/// Announces every slice again each [`HEARTBEAT_EVERY`] until `stop`, as a worker's heartbeat.
async fn heartbeat(fleet: Arc<Fleet>, args: Args, capacity: Capacity, stop: Shutdown) -> Result<()> {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        for i in 0..fleet.slices.len() {
            if let Err(e) = capacity.announce(&fleet.announce(&args, i), false, HEARTBEAT_TTL_MS).await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }
}

/// Runs `generator` (arrivals go on) until every task of the measured window is answered
/// after `window_end`; an error if `limit` passes after it or a spawned task stops early.
async fn await_answers(
    generator: impl Future<Output = ()>,
    fleet: &Fleet,
    tasks: &mut RunTasks,
    window_end: Instant,
    limit: Duration,
) -> Result<()> {
    let generator = async {
        generator.await;
        // The schedule outlasts the wait below.
        std::future::pending::<std::convert::Infallible>().await
    };
    let waited = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(done) = tasks.try_join_next() {
                return Err(anyhow!("a fleet, heartbeat or scheduler task stopped early: {done:?}"));
            }
            let all = fleet.record.lock().expect("fleet record").measured_done == fleet.measured.len();
            if Instant::now() >= window_end && all {
                return Ok(());
            }
            if Instant::now() >= window_end + limit {
                return Err(anyhow!("not every task of the window was answered within {} s", limit.as_secs()));
            }
        }
    };
    tokio::select! {
        w = waited => w,
        never = generator => match never {},
    }
}

/// Waits up to 5 s for the run's tasks to stop, then aborts the rest: tasks still waiting
/// for capacity in the scheduler do not stop on their own.
async fn stop_tasks(mut tasks: RunTasks) {
    if tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} }).await.is_err()
    {
        tasks.abort_all();
    }
}

/// Fills `r` from the fleet's record for the window `[w0, w1)` (Unix µs).
fn summarise(args: &Args, fleet: &Fleet, (w0, w1): (u64, u64), r: &mut RunResult) {
    let rec = fleet.record.lock().expect("fleet record");
    // The first answer of each task counts (k = 1; a reassigned task may be answered twice).
    let mut first: HashMap<usize, &Done> = HashMap::new();
    for d in &rec.done {
        first
            .entry(d.index)
            .and_modify(|f| {
                if d.stored_us < f.stored_us {
                    *f = d
                }
            })
            .or_insert(d);
    }
    r.reassigned = rec.done.iter().filter(|d| d.attempt > 0).count();
    r.completed_per_s =
        first.values().filter(|d| (w0..w1).contains(&d.stored_us)).count() as f64 / ((w1 - w0) as f64 / 1e6);
    let measured: Vec<&Done> = first.values().filter(|d| fleet.measured.contains(&d.index)).copied().collect();
    r.unfinished = r.measured_tasks - measured.len();
    let mut latency: Vec<u64> = measured.iter().map(|d| d.stored_us.saturating_sub(d.accepted_us)).collect();
    let mut after: Vec<u64> = measured.iter().map(|d| d.stored_us.saturating_sub(d.dispatched_us)).collect();
    r.latency = Summary::from_micros(&mut latency);
    r.after_dispatch = Summary::from_micros(&mut after);
    let mean_ms = |f: &dyn Fn(&Done) -> u64| {
        if measured.is_empty() {
            0.0
        } else {
            measured.iter().map(|d| f(d) as f64).sum::<f64>() / measured.len() as f64 / 1000.0
        }
    };
    r.capacity_wait_ms = mean_ms(&|d| d.dispatched_us.saturating_sub(d.accepted_us));
    r.slice_queue_ms = mean_ms(&|d| d.started_us.saturating_sub(d.received_us));

    // Busy lane-time inside the window, per class, from every execution (measured or not).
    let mut busy = vec![0u64; args.fleet.len()];
    for d in &rec.done {
        let (a, b) = (d.started_us.max(w0), d.finished_us.min(w1));
        if b > a {
            busy[fleet.slices[d.slice].class] += b - a;
        }
    }
    let window = (w1 - w0) as f64;
    let lanes = |c: &Class| c.count as f64 * c.lanes as f64;
    r.class_util = args.fleet.iter().zip(&busy).map(|(c, &b)| b as f64 / (lanes(c) * window)).collect();
    r.lane_util = busy.iter().sum::<u64>() as f64 / (args.total_lanes() as f64 * window);
    let weighted: f64 = args.fleet.iter().zip(&busy).map(|(c, &b)| b as f64 * c.speed).sum();
    r.capacity_util = weighted / (args.fleet.iter().map(|c| lanes(c) * c.speed).sum::<f64>() * window);
    r.class_tasks = vec![vec![0; args.models.len()]; args.fleet.len()];
    r.class_compute_ms = vec![vec![0.0; args.models.len()]; args.fleet.len()];
    for d in &measured {
        let (c, m) = (fleet.slices[d.slice].class, d.model);
        r.class_tasks[c][m] += 1;
        r.class_compute_ms[c][m] += (d.finished_us - d.started_us) as f64 / 1000.0;
    }
    for (sums, counts) in r.class_compute_ms.iter_mut().zip(&r.class_tasks) {
        for (sum, &n) in sums.iter_mut().zip(counts) {
            *sum = if n > 0 { *sum / n as f64 } else { 0.0 };
        }
    }
}
