//! One slice's inference: its threads, the models it keeps loaded within its memory
//! budget, and per-model queues from which batches are formed.
//!
//! Tasks queue per model. A thread takes the model whose oldest task has waited longest
//! among those with a free session, and runs up to the model's max batch of compatible
//! tasks as one inference. With `max_delay_us` > 0 a partial batch waits for more tasks
//! until its oldest task has waited that long; with 0 it runs at once, so batches form only
//! from what queued while the previous inference ran.
//!
//! A model with no session is loaded on first need: evicting idle models (never one with
//! work queued or running, and only as many as the room needs) when memory is short, then
//! running a warm-up, and only then reported as loaded. The first load of a model on the
//! slice measures, with no other inference running, whether batching it pays (one row
//! timed against the largest batch: convolutional models often run slower per row in
//! batches on CPU, with an arena many times larger) and its footprint at the batch it
//! will run. Reloads after an eviction reuse both and skip the warm-up, so they cost a
//! session's creation. Under backlog a second session of a busy model
//! is loaded from free memory, up to one per thread.
//!
//! A task that fails is re-checked with the model's known-good warm-up input: if that
//! fails too, the session (the device) is broken, the slice goes out of service and says
//! why, and its queued tasks are handed back.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use sundara_schemas::{Batching, Tensor, now_us};
use tokio::sync::{oneshot, watch};

use crate::batch;
use crate::residency::{Residency, Room};
use crate::{Device, Model};

/// What one inference produced and when it ran.
#[derive(Debug)]
pub struct Ran {
    pub outputs: Vec<Tensor>,
    /// Unix µs when inference started (after the wait in the queue).
    pub started_us: u64,
    /// Time of the inference that produced these outputs (the whole batch's).
    pub compute_us: u64,
    /// Tasks in that inference.
    pub batch: usize,
}

/// Why a task did not run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The task's own failure (its inputs); the slice is healthy.
    #[error("{0}")]
    Failed(String),
    /// The slice is out of service; the task should run elsewhere.
    #[error("slice out of service: {0}")]
    SliceFailed(String),
    /// The model needs more memory than the slice has at all.
    #[error("model needs {need} bytes, more than this slice's {budget}")]
    TooLarge { need: u64, budget: u64 },
}

pub type JobResult = Result<Ran, JobError>;

/// A model a task runs on.
#[derive(Clone, Debug)]
pub struct ModelRun {
    /// `name@version`: the session key.
    pub key: String,
    pub path: Arc<PathBuf>,
    pub batching: Batching,
}

impl ModelRun {
    pub fn new(key: impl Into<String>, path: Arc<PathBuf>) -> ModelRun {
        ModelRun { key: key.into(), path, batching: Batching::default() }
    }
}

#[derive(Clone, Debug)]
pub struct ExecutorConfig {
    /// Inference threads (each runs one inference at a time).
    pub threads: usize,
    /// ORT intra-op threads per session.
    pub intra_threads: usize,
    pub device: Device,
    /// Bytes the slice's loaded models may hold.
    pub memory: u64,
    /// Upper bound on any model's batch on this slice (1 turns batching off).
    pub max_batch: usize,
    /// Tasks queued at most; beyond it a task is refused at once.
    pub queue: usize,
    /// Fault injection, a stand-in for a device failure (a GPU lost, an ECC error), which
    /// cannot happen on CPU: after this many inferences every inference fails.
    pub fail_after_runs: Option<u64>,
}

impl ExecutorConfig {
    pub fn cpu(threads: usize, memory: u64, queue: usize) -> ExecutorConfig {
        ExecutorConfig {
            threads,
            intra_threads: 1,
            device: Device::Cpu,
            memory,
            max_batch: 32,
            queue,
            fail_after_runs: None,
        }
    }
}

/// What a slice holds, for Redis and operators.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SliceReport {
    /// `Some(why)` once the slice is out of service.
    pub failed: Option<String>,
    pub memory_total: u64,
    pub memory_used: u64,
    /// Loaded models (`name@version`) with the bytes each holds.
    pub loaded: Vec<(String, u64)>,
    /// Measured bytes of one session per model, for every model loaded so far.
    pub footprints: Vec<(String, u64)>,
    pub loads: u64,
    pub evictions: u64,
    /// Measured inference time per task (µs, a moving average over batches divided by
    /// their size), per `name@version` run here so far.
    pub service_us: Vec<(String, u64)>,
    /// Measured time to load and warm up one session (µs), per `name@version`.
    pub load_us: Vec<(String, u64)>,
}

/// Weight of the newest batch in the moving average of service time.
const SERVICE_EMA: f64 = 0.2;

struct Job {
    inputs: Vec<Tensor>,
    reply: oneshot::Sender<JobResult>,
    queued: Instant,
}

struct Session {
    model: Model,
    /// A known-good input (one row): the health check after a failed task.
    probe: Vec<Tensor>,
}

struct ModelQueue {
    run: ModelRun,
    jobs: VecDeque<Job>,
    idle: Vec<Session>,
    /// Sessions loaded (idle or running).
    copies: u32,
    loading: bool,
    batchable: bool,
}

impl ModelQueue {
    fn busy(&self) -> bool {
        !self.jobs.is_empty() || self.loading || (self.copies as usize) > self.idle.len()
    }
}

#[derive(Default)]
struct State {
    models: HashMap<String, ModelQueue>,
    residency: Option<Residency>,
    footprints: HashMap<String, u64>,
    queued: usize,
    /// Threads waiting for work: a new task wakes one only if there is one (a wake-up is a
    /// system call, which under load would cost more than the task's own bookkeeping).
    waiting: usize,
    failed: Option<String>,
    stopped: bool,
    runs: u64,
    loads: u64,
    evictions: u64,
    service_us: HashMap<String, f64>,
    load_us: HashMap<String, u64>,
    /// Models whose first measured footprint was over the budget, with it: measured again.
    over_budget_once: HashMap<String, u64>,
    /// Per model, a row's time in its largest batch over its time alone, measured by its
    /// first load here.
    batch_gain: HashMap<String, f64>,
    /// Inferences running now.
    running: usize,
    /// A first load is measuring a footprint: no inference starts until it is done, since
    /// another thread's allocations would count as the model's.
    measuring: bool,
}

impl State {
    fn residency(&mut self) -> &mut Residency {
        self.residency.as_mut().expect("set at start")
    }

    fn report(&self) -> SliceReport {
        let r = self.residency.as_ref().expect("set at start");
        let mut footprints: Vec<(String, u64)> = self.footprints.iter().map(|(m, b)| (m.clone(), *b)).collect();
        footprints.sort();
        SliceReport {
            failed: self.failed.clone(),
            memory_total: r.budget(),
            memory_used: r.used(),
            loaded: r.loaded(),
            footprints,
            loads: self.loads,
            evictions: self.evictions,
            service_us: sorted(self.service_us.iter().map(|(m, us)| (m.clone(), us.round() as u64))),
            load_us: sorted(self.load_us.iter().map(|(m, us)| (m.clone(), *us))),
        }
    }
}

fn sorted(pairs: impl Iterator<Item = (String, u64)>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = pairs.collect();
    v.sort();
    v
}

struct Shared {
    config: ExecutorConfig,
    state: Mutex<State>,
    wake: Condvar,
    report: watch::Sender<SliceReport>,
    /// Where the slice keeps each model's optimized graph for its reloads; removed with it.
    graphs: PathBuf,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.graphs);
    }
}

/// Distinguishes the optimized-graph folders of executors in one process.
static EXECUTORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, st: &State) {
        self.report.send_replace(st.report());
    }
}

/// Stops the threads once the last handle is gone (they finish what is queued first).
struct Stopper(Arc<Shared>);

impl Drop for Stopper {
    fn drop(&mut self) {
        self.0.lock().stopped = true;
        self.0.wake.notify_all();
    }
}

/// Handle on a slice's inference threads. Clones share them.
#[derive(Clone)]
pub struct Executor {
    shared: Arc<Shared>,
    _stopper: Arc<Stopper>,
}

impl Executor {
    pub fn start(name: &str, config: ExecutorConfig) -> Executor {
        let state = State { residency: Some(Residency::new(config.memory)), ..State::default() };
        let (report, _) = watch::channel(state.report());
        let threads = config.threads.max(1);
        let n = EXECUTORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let graphs = std::env::temp_dir().join(format!("sundara-graphs-{}-{n}", std::process::id()));
        let shared = Arc::new(Shared { config, state: Mutex::new(state), wake: Condvar::new(), report, graphs });
        for i in 0..threads {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-infer-{i}"))
                .spawn(move || infer_loop(&shared))
                .expect("inference thread can be spawned");
        }
        Executor { _stopper: Arc::new(Stopper(shared.clone())), shared }
    }

    /// Runs `inputs` through `model`, loading it on this slice first if needed.
    pub async fn run(&self, model: &ModelRun, inputs: Vec<Tensor>) -> JobResult {
        let (reply, result) = oneshot::channel();
        let wake = {
            let mut st = self.shared.lock();
            if let Some(why) = &st.failed {
                return Err(JobError::SliceFailed(why.clone()));
            }
            if st.queued >= self.shared.config.queue.max(1) {
                return Err(JobError::Failed("slice queue is full".into()));
            }
            st.queued += 1;
            if !st.models.contains_key(&model.key) {
                let q = ModelQueue {
                    run: model.clone(),
                    jobs: VecDeque::new(),
                    idle: Vec::new(),
                    copies: 0,
                    loading: false,
                    batchable: false,
                };
                st.models.insert(model.key.clone(), q);
            }
            let q = st.models.get_mut(&model.key).expect("inserted above");
            q.run.batching = model.batching;
            q.jobs.push_back(Job { inputs, reply, queued: Instant::now() });
            st.waiting > 0
        };
        if wake {
            self.shared.wake.notify_one();
        }
        result.await.map_err(|_| JobError::Failed("inference thread died".into()))?
    }

    /// The slice's state now and on every change (loads, evictions, failure).
    pub fn reports(&self) -> watch::Receiver<SliceReport> {
        self.shared.report.subscribe()
    }
}

/// What a thread does next.
enum Step {
    Run {
        key: String,
        session: Session,
        jobs: Vec<Job>,
    },
    Load {
        key: String,
        path: Arc<PathBuf>,
        evicted: Vec<Session>,
        warmup: Warmup,
    },
    /// Sessions evicted to bring the slice back within its memory (dropped outside the lock).
    Evict(Vec<Session>),
    Answer(Vec<Job>, JobError),
    Wait(Option<Instant>),
    Exit,
}

fn infer_loop(shared: &Shared) {
    let config = &shared.config;
    let mut st = shared.lock();
    loop {
        match next_step(&mut st, config) {
            Step::Run { key, mut session, jobs } => {
                let runs_before = st.runs;
                st.runs += 1;
                st.running += 1;
                drop(st);
                let fault = config.fail_after_runs.is_some_and(|n| runs_before >= n);
                let (tasks, started) = (jobs.len(), Instant::now());
                let broken = run_jobs(&mut session, jobs, fault);
                let per_task = started.elapsed().as_micros() as f64 / tasks.max(1) as f64;
                st = shared.lock();
                st.running -= 1;
                if st.measuring && st.running == 0 {
                    shared.wake.notify_all();
                }
                let ema = st.service_us.entry(key.clone()).or_insert(per_task);
                *ema += SERVICE_EMA * (per_task - *ema);
                let us = ema.round() as u64;
                // Changes with every batch: updated in the report without waking its
                // readers, so the next heartbeat carries it rather than an announce per batch.
                shared.report.send_if_modified(|r| {
                    match r.service_us.iter_mut().find(|(m, _)| *m == key) {
                        Some((_, v)) => *v = us,
                        None => {
                            r.service_us.push((key.clone(), us));
                            r.service_us.sort();
                        }
                    }
                    false
                });
                let q = st.models.get_mut(&key).expect("a model with a session stays known");
                // The finishing thread looks for work itself next, so a returned session
                // needs no wake-up; a failed slice needs every thread to drain and stop.
                if let Some(why) = broken {
                    q.copies -= 1;
                    drop(session);
                    fail_slice(&mut st, format!("model {key}: {why}"));
                    shared.publish(&st);
                    shared.wake.notify_all();
                } else {
                    q.idle.push(session);
                }
            }
            Step::Load { key, path, evicted, warmup } => {
                let evicted_any = !evicted.is_empty();
                let measuring = matches!(warmup, Warmup::Measure { .. });
                if measuring {
                    st.measuring = true;
                    while st.running > 0 {
                        st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                }
                drop(st);
                drop(evicted);
                let started = Instant::now();
                let graph = shared.graphs.join(format!("{:016x}.onnx", key_hash(&key, &path)));
                let loaded = load(&path, config, warmup, &graph);
                let load_us = started.elapsed().as_micros() as u64;
                st = shared.lock();
                st.measuring &= !measuring;
                if evicted_any {
                    shared.publish(&st);
                }
                finish_load(&mut st, &key, loaded, load_us);
                shared.publish(&st);
                shared.wake.notify_all();
            }
            Step::Evict(evicted) => {
                shared.publish(&st);
                drop(st);
                drop(evicted);
                st = shared.lock();
            }
            Step::Answer(jobs, error) => {
                st.queued -= jobs.len();
                drop(st);
                for job in jobs {
                    let _ = job.reply.send(Err(error.clone()));
                }
                st = shared.lock();
            }
            Step::Wait(until) => {
                st.waiting += 1;
                st = match until {
                    Some(until) => {
                        let wait = until.saturating_duration_since(Instant::now()).max(Duration::from_micros(50));
                        shared.wake.wait_timeout(st, wait).unwrap_or_else(|e| e.into_inner()).0
                    }
                    None => shared.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
                };
                st.waiting -= 1;
            }
            Step::Exit => return,
        }
    }
}

/// Picks the next thing to do. Runs under the slice's lock; does no inference or I/O.
fn next_step(st: &mut State, config: &ExecutorConfig) -> Step {
    if let Some(why) = st.failed.clone() {
        let jobs: Vec<Job> = st.models.values_mut().flat_map(|q| q.jobs.drain(..)).collect();
        if jobs.is_empty() {
            return Step::Exit;
        }
        return Step::Answer(jobs, JobError::SliceFailed(why));
    }
    if st.stopped && st.queued == 0 {
        return Step::Exit;
    }
    if st.measuring {
        return Step::Wait(None);
    }
    // A model's footprint is known only once it is loaded (before, its file size stands
    // in), so a load can overshoot the budget: idle models leave until it holds again.
    let over = st.residency().used().saturating_sub(st.residency().budget());
    if over > 0 {
        let models = &st.models;
        let room = st.residency.as_ref().expect("set").make_room(over, |m| models.get(m).is_some_and(|q| q.busy()));
        if let Room::Evict(victims) = room {
            return Step::Evict(evict(st, victims));
        }
    }
    let now = Instant::now();
    let mut order: Vec<(Instant, String)> =
        st.models.iter().filter_map(|(k, q)| Some((q.jobs.front()?.queued, k.clone()))).collect();
    order.sort();
    let mut wake_at: Option<Instant> = None;
    for (_, key) in order {
        let q = st.models.get_mut(&key).expect("listed above");
        if !q.idle.is_empty() {
            let max =
                if q.batchable { (q.run.batching.max_batch as usize).clamp(1, config.max_batch.max(1)) } else { 1 };
            let window = Duration::from_micros(q.run.batching.max_delay_us as u64);
            let due = q.jobs.front().expect("listed with a job").queued + window;
            if q.jobs.len() < max && due > now && !st.stopped {
                wake_at = Some(wake_at.map_or(due, |w| w.min(due)));
                continue;
            }
            let jobs = take_batch(&mut q.jobs, max);
            let session = q.idle.pop().expect("checked above");
            st.queued -= jobs.len();
            st.residency().touch(&key, now_us());
            return Step::Run { key, session, jobs };
        }
        if q.loading {
            continue;
        }
        let measured = st.footprints.get(&key).copied();
        // Before the first load only the file size is known: a lower bound.
        let need = measured.unwrap_or_else(|| std::fs::metadata(q.run.path.as_ref()).map_or(0, |m| m.len()));
        if q.copies == 0 {
            let models = &st.models;
            let room = st.residency.as_ref().expect("set").make_room(need, |m| models.get(m).is_some_and(|q| q.busy()));
            match room {
                Room::Fits => return begin_load(st, config, key, Vec::new()),
                Room::Evict(victims) => return begin_load(st, config, key, victims),
                Room::Busy => continue,
                Room::Never { need, budget } => {
                    // At least this much (the file size before any load): enough to stop offering it here.
                    let known = st.footprints.entry(key.clone()).or_insert(need);
                    *known = (*known).max(need);
                    let jobs: Vec<Job> = st.models.get_mut(&key).expect("listed").jobs.drain(..).collect();
                    return Step::Answer(jobs, JobError::TooLarge { need, budget });
                }
            }
        }
        // Backlog and every session busy: another session from free memory, up to one per thread.
        if measured.is_some() && (q.copies as usize) < config.threads && need <= st.residency().free() {
            return begin_load(st, config, key, Vec::new());
        }
    }
    Step::Wait(wake_at)
}

/// The first load of a model warms up at the largest batch it may run here (the slice's
/// and the model's own limit), so that its measured footprint covers the arena at its
/// working size. A reload (after an eviction, or another session) is charged that
/// footprint already and is not warmed up: the large warm-up was most of a load (0.3 of
/// magika's 0.35 s), and reloads are what a short budget repeats.
fn begin_load(st: &mut State, config: &ExecutorConfig, key: String, victims: Vec<String>) -> Step {
    let evicted = evict(st, victims);
    let known = st.footprints.contains_key(&key);
    let q = st.models.get_mut(&key).expect("listed");
    let max_rows = (q.run.batching.max_batch as usize).clamp(1, config.max_batch.max(1));
    let warmup = if known { Warmup::Reload } else { Warmup::Measure { max_rows } };
    q.loading = true;
    let path = q.run.path.clone();
    Step::Load { key, path, evicted, warmup }
}

/// Unloads idle models; returns their sessions.
fn evict(st: &mut State, victims: Vec<String>) -> Vec<Session> {
    let mut evicted = Vec::new();
    for v in victims {
        let q = st.models.get_mut(&v).expect("residents are known models");
        evicted.append(&mut q.idle);
        q.copies = 0;
        st.residency().remove(&v);
        st.evictions += 1;
        tracing::info!(model = %v, "evicted");
    }
    evicted
}

/// The oldest job and up to `max - 1` more that can share its batch, in queue order.
fn take_batch(jobs: &mut VecDeque<Job>, max: usize) -> Vec<Job> {
    let first = jobs.pop_front().expect("a queue with a job");
    let mut group = vec![first];
    let mut i = 0;
    while group.len() < max && i < jobs.len() {
        if batch::compatible(&group[0].inputs, &jobs[i].inputs) {
            group.push(jobs.remove(i).expect("in range"));
        } else {
            i += 1;
        }
    }
    group
}

/// How a load warms its session up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Warmup {
    /// The model's first load here: learn whether batching it pays, by timing one row
    /// against `max_rows`, and measure its footprint at the batch it will run.
    Measure { max_rows: usize },
    /// A reload: the slice already knows its footprint and batch; its first task warms it.
    Reload,
}

/// A loaded, warmed session.
struct LoadedSession {
    session: Session,
    /// Heap growth across the load and warm-up.
    footprint: u64,
    /// Whether the model's tensors can be stacked into batches at all.
    batchable: bool,
    /// Measured on a first load of a batchable model: a row's time in the largest batch
    /// over its time alone.
    batch_gain: Option<f64>,
}

/// A loaded session; or why the slice cannot load.
type Loaded = Result<LoadedSession, String>;

/// Loads run one at a time per process, so that the growth of the heap across a load and
/// its warm-up is that model's footprint (other threads' inferences add only noise).
static LOADING: Mutex<()> = Mutex::new(());

/// Batching pays when a batch's time per row is below this share of one row's time.
/// Stacking rows helps GEMM-bound models (mlp: 5 against 67 µs a row at 32) and hurts
/// convolutional ones on CPU (magika: 7.2 against 5.9 ms a row, with a 6× larger arena).
const BATCH_PAYS_BELOW: f64 = 0.9;

/// The bytes a load starts from.
enum Source {
    /// The graph a first load on this slice optimized and saved.
    Optimized(Vec<u8>),
    /// The model's own file.
    File(Vec<u8>),
}

/// A file name for a model's optimized graph.
fn key_hash(key: &str, path: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (key, path).hash(&mut h);
    h.finish()
}

/// Loads `path`. On CPU the first load saves the optimized graph to `graph` and later
/// loads start from it, skipping the optimization passes (a GPU provider's graph is tied
/// to its device and is always built anew).
fn load(path: &std::path::Path, config: &ExecutorConfig, warmup: Warmup, graph: &std::path::Path) -> Loaded {
    let read = || std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()));
    let _one_at_a_time = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    let cpu = matches!(config.device, Device::Cpu);
    // A reload reads only the saved graph; the model's own file is read when there is none.
    let saved = if cpu && graph.exists() { std::fs::read(graph).ok() } else { None };
    let source = match saved {
        Some(optimized) => Source::Optimized(optimized),
        None => Source::File(read()?),
    };
    let open = || {
        let (intra, device) = (config.intra_threads, &config.device);
        let plain = |bytes: &[u8]| Model::load_on(bytes, intra, device).map_err(|e| format!("loading: {e}"));
        // Saving or reading the graph is an optimization: when it fails, a plain load.
        match &source {
            Source::Optimized(optimized) => {
                Model::load_graph(optimized, intra, device, crate::Graph::Optimized).or_else(|_| plain(&read()?))
            }
            Source::File(bytes) if cpu => {
                if let Some(dir) = graph.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                Model::load_graph(bytes, intra, device, crate::Graph::OptimizeAndSave(graph)).or_else(|_| plain(bytes))
            }
            Source::File(bytes) => plain(bytes),
        }
    };
    let mut before = crate::heap_bytes();
    let mut model = open()?;
    let batchable = batch::batchable(&model.inputs, &model.outputs);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let one = crate::example_inputs(&model.inputs, 1, &mut rng);
    let probe = crate::example_inputs(&model.inputs, 1, &mut rng);
    let mut batch_gain = None;
    match warmup {
        Warmup::Measure { max_rows } if batchable && max_rows > 1 => {
            // One row untimed (the first run initialises), then timed; the large batch
            // once, timed: it is the warm-up that was always run, so a first load costs
            // little more than before. Its allocations count against it, which errs
            // towards running unbatched, the smaller footprint.
            let per_row_one = second_run_secs(&mut model, &one)?;
            let many = crate::example_inputs(&model.inputs, max_rows as u64, &mut rng);
            let started = Instant::now();
            model.run(&many).map_err(|e| format!("warm-up: {e}"))?;
            let per_row_many = started.elapsed().as_secs_f64() / max_rows as f64;
            let gain = per_row_many / per_row_one;
            let pays = gain < BATCH_PAYS_BELOW;
            tracing::info!(per_row_one, per_row_many, rows = max_rows, pays, "measured batching");
            if !pays {
                // The session's arena has grown to the large batch: a fresh one, run a row
                // at a time, holds a fraction of it.
                drop(model);
                before = crate::heap_bytes();
                model = open()?;
                model.run(&one).map_err(|e| format!("warm-up: {e}"))?;
            }
            batch_gain = Some(gain);
        }
        Warmup::Measure { .. } => {
            model.run(&one).map_err(|e| format!("warm-up: {e}"))?;
        }
        // Its first task warms it: a separate run would only delay that task.
        Warmup::Reload => {}
    }
    let file_len = std::fs::metadata(path).map_or(0, |m| m.len());
    let footprint = crate::heap_bytes().saturating_sub(before).max(file_len);
    Ok(LoadedSession { session: Session { model, probe }, footprint, batchable, batch_gain })
}

/// Seconds of a run of `inputs` after an untimed one (a session's first run initialises).
fn second_run_secs(model: &mut Model, inputs: &[Tensor]) -> Result<f64, String> {
    model.run(inputs).map_err(|e| format!("warm-up: {e}"))?;
    let started = Instant::now();
    model.run(inputs).map_err(|e| format!("warm-up: {e}"))?;
    Ok(started.elapsed().as_secs_f64())
}

fn finish_load(st: &mut State, key: &str, loaded: Loaded, load_us: u64) {
    let q = st.models.get_mut(key).expect("a loading model stays known");
    q.loading = false;
    let LoadedSession { session, footprint: bytes, batchable, batch_gain } = match loaded {
        Ok(l) => l,
        Err(why) => {
            fail_slice(st, format!("model {key}: {why}"));
            return;
        }
    };
    if let Some(gain) = batch_gain {
        st.batch_gain.insert(key.to_string(), gain);
    }
    let gain = st.batch_gain.get(key).copied();
    let q = st.models.get_mut(key).expect("known");
    q.batchable = batchable && gain.is_none_or(|g| g < BATCH_PAYS_BELOW);
    // Measured by the first load, alone: a reload is not warmed up, so its heap growth is
    // a lower bound and would only add noise.
    let budget = st.residency().budget();
    let footprint = match st.footprints.get(key) {
        Some(known) => *known,
        None => {
            // The heap is the whole process's: its network threads' allocations during a
            // load count too. One measure over the budget is taken again before the model
            // is refused, and the smaller of the two stands.
            let first = st.over_budget_once.remove(key);
            let footprint = first.map_or(bytes, |f| f.min(bytes));
            if footprint > budget && first.is_none() {
                st.over_budget_once.insert(key.to_string(), bytes);
                tracing::info!(model = key, footprint, budget, "measured over the budget; measuring again");
                drop(session);
                return;
            }
            st.footprints.insert(key.to_string(), footprint);
            footprint
        }
    };
    if footprint > budget {
        // Measured over the whole budget: it can never run here.
        let jobs: Vec<Job> = st.models.get_mut(key).expect("known").jobs.drain(..).collect();
        st.queued -= jobs.len();
        tracing::warn!(model = key, footprint, budget, "model does not fit this slice");
        for job in jobs {
            let _ = job.reply.send(Err(JobError::TooLarge { need: footprint, budget }));
        }
        return;
    }
    let q = st.models.get_mut(key).expect("known");
    q.copies += 1;
    q.idle.push(session);
    st.loads += 1;
    st.load_us.insert(key.to_string(), load_us);
    st.residency().add_copy(key, footprint, load_us, now_us());
    tracing::info!(model = key, footprint, load_us, "loaded and warmed up");
}

fn fail_slice(st: &mut State, why: String) {
    if st.failed.is_none() {
        tracing::error!(reason = %why, "slice out of service");
        st.failed = Some(why);
    }
    for q in st.models.values_mut() {
        q.idle.clear();
        q.copies = 0;
    }
    let keys: Vec<String> = st.residency().loaded().into_iter().map(|(k, _)| k).collect();
    for k in keys {
        st.residency().remove(&k);
    }
}

/// Runs `inputs` once, timed.
fn run_timed(model: &mut Model, inputs: &[Tensor], fault: bool) -> Result<(Vec<Tensor>, u64, u64), String> {
    if fault {
        return Err("injected device fault".into());
    }
    let started_us = now_us();
    let started = Instant::now();
    let outputs = model.run(inputs).map_err(|e| e.to_string())?;
    Ok((outputs, started_us, started.elapsed().as_micros() as u64))
}

/// Runs a group of jobs as one batch and answers each with its own rows. If the batch
/// fails (one task's inputs can spoil it), each job runs alone so that only its own
/// failure reaches it. Returns why the session is broken if a failed job's check with
/// the known-good probe input fails too; the jobs not yet answered then get
/// [`JobError::SliceFailed`].
fn run_jobs(session: &mut Session, group: Vec<Job>, fault: bool) -> Option<String> {
    if group.len() > 1 {
        let inputs: Vec<&[Tensor]> = group.iter().map(|j| j.inputs.as_slice()).collect();
        let rows: Option<Vec<u64>> = group.iter().map(|j| batch::rows(&j.inputs)).collect();
        let batched = rows.and_then(|rows| {
            let (outputs, started_us, compute_us) =
                run_timed(&mut session.model, &batch::stack(&inputs), fault).ok()?;
            Some((batch::split(outputs, &rows)?, started_us, compute_us))
        });
        if let Some((per_job, started_us, compute_us)) = batched {
            let n = group.len();
            for (job, outputs) in group.into_iter().zip(per_job) {
                let _ = job.reply.send(Ok(Ran { outputs, started_us, compute_us, batch: n }));
            }
            return None;
        }
    }
    let mut jobs = group.into_iter();
    while let Some(job) = jobs.next() {
        match run_timed(&mut session.model, &job.inputs, fault) {
            Ok((outputs, started_us, compute_us)) => {
                let _ = job.reply.send(Ok(Ran { outputs, started_us, compute_us, batch: 1 }));
            }
            Err(task_error) => {
                if let Err(device_error) = run_timed(&mut session.model, &session.probe, fault) {
                    let why = format!("health check failed after a task failed: {device_error}");
                    for job in std::iter::once(job).chain(jobs) {
                        let _ = job.reply.send(Err(JobError::SliceFailed(why.clone())));
                    }
                    return Some(why);
                }
                let _ = job.reply.send(Err(JobError::Failed(task_error)));
            }
        }
    }
    None
}
