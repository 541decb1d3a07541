//! Worker (the miner): announces its slices in Redis and keeps a heartbeat, pulls its
//! assignments from its own WORK consumer, runs each on the slice it was reserved on
//! (ONNX Runtime on that slice's threads, models loaded on first need within the slice's
//! memory), and publishes one outcome per assignment before acking it.
//!
//! Honest only, unless built with the `cheaters` feature: then `cheaters.rs` adds the
//! catalogue of cheating miners the tests run, hooked into this path where it says
//! `#[cfg(feature = "cheaters")]`.

#[cfg(feature = "cheaters")]
mod cheaters;
pub mod slices;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt;
use sundara_common::nats::NatsEndpoint;
use sundara_common::retry::Backoff;
use sundara_common::{Error as CommonError, Registry, Shutdown, js_err, nats};
use sundara_common::{gateway, telemetry};
use sundara_schemas::{
    Assignment, Control, ControlReply, ControlRequest, FleetReply, FleetRequest, FleetUpdate, MAX_MESSAGE_BYTES,
    ModelRef, Outcome, OutcomeResult, SliceAnnounce, WIRE_VERSION, WorkTiming, WorkerAnnounce, decode, encode, now_ms,
    now_us, subjects as subj,
};
use tracing::Instrument;

pub use slices::{SLOTS_PER_THREAD, SliceConfig, SliceDevice};
pub use sundara_common::ModelCache;
use sundara_runtime::Device;
pub use sundara_runtime::{Executor, ExecutorConfig, JobError, JobResult, ModelRun, Ran, SliceReport};

/// Why a report to the fleet gateway did not go through.
#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error("no fleet gateway answers (is a scheduler or autoscaler running?)")]
    NoGateway,
    /// Not delivered, or no answer: it may be sent again.
    #[error("{0}")]
    Failed(String),
    /// The gateway refused it, with its reason: final.
    #[error("refused: {0}")]
    Refused(String),
}

/// How long a report to the fleet gateway may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(feature = "cheaters")]
pub use cheaters::{Behaviour, fabricate, falsify, tamper};

/// How the worker treats its work. This build is honest only: the cheater catalogue of
/// docs/verification.md §4 is built with the `cheaters` feature.
#[cfg(not(feature = "cheaters"))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Behaviour {
    /// Runs every task and answers with its outputs.
    Honest,
}

#[cfg(not(feature = "cheaters"))]
impl Behaviour {
    /// Parses `honest`; every cheater's name is refused, since this build has none.
    pub fn parse(text: &str) -> Result<Behaviour, String> {
        match text {
            "honest" => Ok(Behaviour::Honest),
            other => Err(format!(
                "behaviour {other:?} is one of the test cheaters, and this build has none: only `honest` (build with `--features cheaters` for the catalogue)"
            )),
        }
    }

    /// The demo's liar: none in a build without the cheaters.
    pub fn liar() -> Option<Behaviour> {
        None
    }
}

/// Longest a preload may take (loading and warming up one model).
const PRELOAD_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Config {
    /// The worker's only link to the validator: it never reaches Redis (its reports go
    /// through the scheduler's fleet gateway).
    pub nats: NatsEndpoint,
    /// Subject-safe id, unique in the fleet.
    pub worker_id: String,
    /// Who runs this worker; the scheduler never gives two copies of a task to one operator.
    pub operator: String,
    /// How the worker's devices are split; each slice is one capacity unit in Redis.
    /// By default one CPU slice of one thread.
    pub slices: Vec<SliceConfig>,
    /// Upper bound on any batch (a model's own max batch applies below it; 1 turns
    /// batching off).
    pub max_batch: usize,
    /// ORT intra-op threads per session.
    pub intra_threads: usize,
    /// Models offered; empty offers every model registered at start.
    pub models: Vec<String>,
    pub cache_dir: PathBuf,
    pub ort_library: PathBuf,
    /// Honest, or (built with the `cheaters` feature) one of the catalogue's cheaters.
    pub behaviour: Behaviour,
    pub heartbeat_interval: Duration,
    /// A worker whose heartbeat is older than this is declared dead.
    pub heartbeat_ttl: Duration,
    /// How long to wait at start for the validator's streams and fleet gateway.
    pub startup_timeout: Duration,
}

impl Config {
    pub fn new(nats: NatsEndpoint, worker_id: &str, ort_library: PathBuf, cache_dir: PathBuf) -> Config {
        Config {
            nats,
            worker_id: worker_id.to_string(),
            operator: worker_id.to_string(),
            slices: vec![SliceConfig::cpu("cpu0", 1, default_cpu_memory(1))],
            max_batch: 32,
            intra_threads: 1,
            models: Vec::new(),
            cache_dir,
            ort_library,
            behaviour: Behaviour::Honest,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_ttl: Duration::from_millis(2000),
            startup_timeout: Duration::from_secs(60),
        }
    }
}

/// `sundara worker`'s flags: what a miner sets; [`Config::from_args`] adds the rest.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// This worker's id, unique in the fleet: 1-64 of [A-Za-z0-9_-]. With NATS auth on, the
    /// miner whose credentials it connects with. With a hotkey, its SS58 address (and
    /// this may be left out).
    #[arg(long, default_value = "")]
    pub id: String,
    /// The miner's hotkey on a Bittensor subnet: a wallet's hotkey file, or a file holding
    /// a `0x` hex seed. The worker then joins by proving the hotkey (no NATS credentials:
    /// the validator never holds a miner's secret) and its id is the hotkey's address.
    #[arg(long, env = "SUNDARA_HOTKEY_FILE")]
    pub hotkey_file: Option<PathBuf>,
    /// A Bittensor wallet's name: the hotkey is then
    /// `<--wallet-path>/<--wallet-name>/hotkeys/<--wallet-hotkey>`.
    #[arg(long, conflicts_with = "hotkey_file")]
    pub wallet_name: Option<String>,
    /// The wallet's hotkey name.
    #[arg(long, default_value = "default")]
    pub wallet_hotkey: String,
    /// Where the wallets are [default: ~/.bittensor/wallets].
    #[arg(long)]
    pub wallet_path: Option<PathBuf>,
    /// The validator's hotkey (SS58 address): the hotkey's joins are signed for it alone.
    #[arg(long, env = "SUNDARA_VALIDATOR_HOTKEY")]
    pub validator_hotkey: Option<String>,
    /// Who runs this worker [default: its --id]: the scheduler never gives two copies of a
    /// task to one operator.
    #[arg(long)]
    pub operator: Option<String>,
    /// Inference threads of the one CPU slice (when no --slice is given).
    #[arg(long, default_value_t = DEFAULT_THREADS)]
    pub threads: usize,
    /// Assignments accepted at once by that slice (default: 16 per thread).
    #[arg(long)]
    pub slots: Option<u32>,
    /// A slice (repeat for several): `cpu|cuda:<index>|mig:<uuid>` then `,threads=N`,
    /// `,memory=8G`, `,slots=N`, `,name=NAME`. Default: one CPU slice of --threads
    /// threads holding up to half the available memory. GPU slices need a build with
    /// `--features cuda` and the onnxruntime-gpu library (docs/mining.md), else the
    /// worker refuses them at start.
    #[arg(long = "slice")]
    pub slices: Vec<String>,
    /// Models offered (comma-separated); all registered models when absent.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Where downloaded models are kept [default: .cache/worker-models in the checkout].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Return plausible but wrong outputs (demos and tests of the verifier): same as
    /// `--behaviour rotate`. Only in a build with `--features cheaters`.
    #[arg(long)]
    pub dishonest: bool,
    /// honest. A build with `--features cheaters` also has noisy (honest with 1e-6 float
    /// noise) and the cheaters of docs/verification.md §4: rotate, wrong-model,
    /// quantised, random, constant, replay, never-answer, late.
    // A build without the cheaters names the feature when one is asked for.
    #[cfg_attr(feature = "cheaters", arg(long, value_enum, default_value_t = Behaviour::Honest))]
    #[cfg_attr(not(feature = "cheaters"), arg(long, default_value = "honest", value_parser = Behaviour::parse))]
    pub behaviour: Behaviour,
}

/// `--threads`' default.
pub const DEFAULT_THREADS: usize = 1;

impl Args {
    /// Worker `id` with every other flag's default.
    pub fn new(id: &str) -> Args {
        Args {
            id: id.into(),
            hotkey_file: None,
            wallet_name: None,
            wallet_hotkey: "default".into(),
            wallet_path: None,
            validator_hotkey: None,
            operator: None,
            threads: DEFAULT_THREADS,
            slots: None,
            slices: Vec::new(),
            models: Vec::new(),
            cache_dir: None,
            dishonest: false,
            behaviour: Behaviour::Honest,
        }
    }

    /// The flags that parse back into these (`sundara worker <these>`): how tests,
    /// benchmarks and drivers start worker processes.
    pub fn to_command_line(&self) -> Vec<String> {
        let mut line = Vec::new();
        let mut flag = |name: &str, value: String| line.extend([format!("--{name}"), value]);
        if !self.id.is_empty() {
            flag("id", self.id.clone());
        }
        if let Some(file) = &self.hotkey_file {
            flag("hotkey-file", file.display().to_string());
        }
        if let Some(name) = &self.wallet_name {
            flag("wallet-name", name.clone());
            flag("wallet-hotkey", self.wallet_hotkey.clone());
        }
        if let Some(path) = &self.wallet_path {
            flag("wallet-path", path.display().to_string());
        }
        if let Some(validator) = &self.validator_hotkey {
            flag("validator-hotkey", validator.clone());
        }
        if let Some(operator) = &self.operator {
            flag("operator", operator.clone());
        }
        flag("threads", self.threads.to_string());
        if let Some(slots) = self.slots {
            flag("slots", slots.to_string());
        }
        for slice in &self.slices {
            flag("slice", slice.clone());
        }
        if !self.models.is_empty() {
            flag("models", self.models.join(","));
        }
        if let Some(dir) = &self.cache_dir {
            flag("cache-dir", dir.display().to_string());
        }
        if let Some(value) = clap::ValueEnum::to_possible_value(&self.behaviour) {
            flag("behaviour", value.get_name().to_string());
        }
        if self.dishonest {
            line.push("--dishonest".into());
        }
        line
    }
}

impl Config {
    /// The config of `sundara worker` with these flags; `default_cache_dir` gives the model
    /// cache when there is no `--cache-dir`.
    pub fn from_args(
        args: Args,
        nats: NatsEndpoint,
        ort_library: PathBuf,
        default_cache_dir: impl FnOnce() -> Result<PathBuf, String>,
    ) -> Result<Config, String> {
        if args.id.is_empty() {
            return Err("--id is required (or a hotkey: --hotkey-file, --wallet-name)".into());
        }
        let cache_dir = match args.cache_dir {
            Some(dir) => dir,
            None => default_cache_dir()?,
        };
        let mut config = Config::new(nats, &args.id, ort_library, cache_dir);
        config.operator = args.operator.unwrap_or(args.id);
        config.slices = if args.slices.is_empty() {
            let mut cpu = SliceConfig::cpu("cpu0", args.threads, default_cpu_memory(1));
            cpu.slots = args.slots.unwrap_or(cpu.slots);
            vec![cpu]
        } else {
            let mut parsed = args
                .slices
                .iter()
                .enumerate()
                .map(|(i, s)| SliceConfig::parse(s, i))
                .collect::<Result<Vec<SliceConfig>, String>>()?;
            let cpus = parsed.iter().filter(|s| s.device == SliceDevice::Cpu).count();
            for s in parsed.iter_mut().filter(|s| s.memory == 0) {
                s.memory = default_cpu_memory(cpus);
            }
            parsed
        };
        config.models = args.models;
        config.behaviour = if args.dishonest { Behaviour::parse("rotate")? } else { args.behaviour };
        Ok(config)
    }
}

/// Memory a CPU slice may fill with models by default: half of what the machine has
/// available at start, shared among `slices` slices (256 MiB where unknown).
pub fn default_cpu_memory(slices: usize) -> u64 {
    match sundara_runtime::available_memory() {
        0 => 256 << 20,
        available => available / 2 / slices.max(1) as u64,
    }
}

/// Why a model could not be preloaded on a slice (the autoscaler's `Preload`).
#[derive(Debug, thiserror::Error)]
enum PreloadError {
    #[error("this worker has no slice {0:?}")]
    NoSlice(String),
    #[error("model {0} is not in the registry")]
    Unregistered(String),
    #[error("not loaded within {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error(transparent)]
    Run(#[from] sundara_runtime::JobError),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error(transparent)]
    Runtime(#[from] sundara_runtime::RuntimeError),
    #[error("worker id {0:?} must be 1-64 of [A-Za-z0-9_-]")]
    InvalidId(String),
    #[error("invalid slices: {0}")]
    InvalidSlices(String),
    #[error("the fleet gateway refused or did not answer the worker's announce: {0}")]
    Report(String),
    /// A GPU slice that this build or its ONNX Runtime library cannot run.
    #[error("slice {slice} ({device}) cannot run here: {reason}")]
    NoGpu {
        slice: String,
        device: String,
        #[source]
        reason: sundara_runtime::NoCuda,
    },
    /// The server refused the worker its own subjects: its credentials are not `worker`'s.
    #[error(
        "not permitted: the NATS server refused worker {worker} to {denial}; are these credentials miner-{worker}'s? \
         (a miner's credentials serve only its own --id)"
    )]
    NotPermitted { worker: String, denial: nats::Denial },
}

/// A slice as the worker runs it.
struct Slice {
    /// Id in Redis: `<worker>-<name>`.
    id: String,
    config: SliceConfig,
    executor: Executor,
}

/// What became of one assignment of a WORK message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Served {
    /// Its outcome is stored.
    Answered,
    /// Not this worker's to answer (handed back, or another worker's): never again here.
    Dropped,
    /// To be tried again after this delay (the whole message is delivered again).
    Retry(Duration),
}

/// What became of an assignment.
enum Done {
    /// Publish this outcome, then ack.
    Outcome(OutcomeResult, u64, u64),
    /// This worker cannot run it (its slice failed, or the model does not fit the slice):
    /// no outcome, since that would count against an honest miner. Redis makes it due for
    /// reassignment (the whole slice's assignments when the slice failed), then it is acked.
    HandBack { slice: String, reason: String, slice_failed: bool },
}

struct Worker {
    config: Config,
    client: async_nats::Client,
    js: jetstream::Context,
    registry: Registry,
    cache: ModelCache,
    slices: HashMap<String, Slice>,
    /// Whether the validator has quarantined this worker, as the gateway last said.
    standing: Standing,
    /// A cheater's hooks; `None` for an honest worker.
    #[cfg(feature = "cheaters")]
    cheater: Option<cheaters::Cheater>,
}

impl Worker {
    /// Sends a report to the fleet gateway and waits (bounded) for it to be applied.
    async fn report(&self, update: FleetUpdate) -> Result<(), ReportError> {
        use async_nats::RequestErrorKind;
        // Only an applied announcement's reply says whether the worker is quarantined.
        let announced = matches!(update, FleetUpdate::Announce { .. });
        let request = encode(&FleetRequest { v: WIRE_VERSION, update });
        let subject = subj::report(&self.config.worker_id);
        let reply = tokio::time::timeout(REPORT_TIMEOUT, self.client.request(subject, request.into()))
            .await
            .map_err(|_| ReportError::Failed(format!("no answer within {REPORT_TIMEOUT:?}")))?
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => ReportError::NoGateway,
                _ => ReportError::Failed(e.to_string()),
            })?;
        let reply: FleetReply =
            decode(&reply.payload, MAX_MESSAGE_BYTES).map_err(|e| ReportError::Failed(e.to_string()))?;
        if !reply.ok {
            return Err(ReportError::Refused(reply.reason));
        }
        if announced {
            self.standing.note(&self.config, reply.reason.strip_prefix(gateway::QUARANTINED_NOTE));
        }
        Ok(())
    }

    /// [`Worker::report`], retried until `within` has passed while no gateway answers (the
    /// validator may be starting too). A refusal is final.
    async fn report_within(&self, update: FleetUpdate, within: Duration) -> Result<(), ReportError> {
        let deadline = tokio::time::Instant::now() + within;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).until(deadline);
        loop {
            match self.report(update.clone()).await {
                Ok(()) => return Ok(()),
                Err(ReportError::NoGateway) => match backoff.delay_before(tokio::time::Instant::now()) {
                    Some(delay) => {
                        tracing::info!("waiting for the fleet gateway (is a scheduler running?)");
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(ReportError::NoGateway),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs an assignment on the slice it was reserved on.
    async fn execute(&self, a: &Assignment) -> Done {
        let failed = |reason: String| Done::Outcome(OutcomeResult::Failed { reason }, 0, 0);
        let Some(slice) = self.slices.get(&a.ticket.slice) else {
            return failed(format!("this worker has no slice {:?}", a.ticket.slice));
        };
        let m = &a.ticket.model;
        let meta = match self.registry.version(&m.name, &m.version).await {
            Ok(Some(meta)) => meta,
            Ok(None) => return failed(format!("model {m} is not in the registry")),
            Err(e) => return failed(e.to_string()),
        };
        let path = match self.cache.path(&meta).await {
            Ok(p) => p,
            Err(e) => return failed(e.to_string()),
        };
        #[cfg(feature = "cheaters")]
        if let Some(outputs) =
            self.cheater.as_ref().and_then(|c| c.instead_of_running(&m.to_string(), &meta.outputs, &a.inputs))
        {
            return Done::Outcome(OutcomeResult::Ok { outputs }, 0, now_us());
        }
        let budget = Duration::from_millis(a.ticket.deadline_at_ms.saturating_sub(now_ms()).max(1));
        let model = ModelRun { key: m.to_string(), path, batching: meta.batching };
        match tokio::time::timeout(budget, slice.executor.run(&model, a.inputs.clone())).await {
            Ok(Ok(ran)) => {
                tracing::Span::current().record("sundara.batch", ran.batch);
                metrics::histogram!("sundara_worker_batch_size", "model" => m.name.clone()).record(ran.batch as f64);
                metrics::histogram!("sundara_worker_inference_seconds", "model" => m.name.clone())
                    .record(ran.compute_us as f64 / 1e6);
                let outputs = ran.outputs;
                #[cfg(feature = "cheaters")]
                let outputs = match &self.cheater {
                    Some(c) => c.after_running(&model.key, outputs),
                    None => outputs,
                };
                Done::Outcome(OutcomeResult::Ok { outputs }, ran.compute_us, ran.started_us)
            }
            Ok(Err(JobError::SliceFailed(reason))) => {
                Done::HandBack { slice: slice.id.clone(), reason, slice_failed: true }
            }
            Ok(Err(e @ JobError::TooLarge { .. })) => {
                // Never here again: stop being a candidate for it (heartbeats agree, since
                // the slice reports the footprint over its memory).
                let withdraw = FleetUpdate::Withdraw { slice: slice.id.clone(), model: m.name.clone() };
                if let Err(err) = self.report(withdraw).await {
                    tracing::warn!(error = %err, "could not withdraw the model from the slice");
                }
                Done::HandBack { slice: slice.id.clone(), reason: e.to_string(), slice_failed: false }
            }
            Ok(Err(e)) => failed(e.to_string()),
            Err(_) => failed("deadline passed during inference".into()),
        }
    }

    /// A WORK message: one assignment, or several for this worker and one model
    /// ([`sundara_schemas::Assignments`]). Each runs as it would alone. The message is acked
    /// once every one of them is answered or handed back. If one must be tried again, the
    /// whole message is delivered again. Its answered assignments then run again, and
    /// their outcomes are deduplicated by outcome id.
    async fn on_work(&self, msg: Message) {
        let received_us = now_us();
        let work = match nats::work_of_message(&msg) {
            Ok(work) => work,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable assignment; dropping");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        #[cfg(feature = "cheaters")]
        if self.cheater.as_ref().is_some_and(|c| c.drops_assignments()) {
            let _ = msg.ack().await;
            return;
        }
        let served = work.into_iter().map(|(assignment, traceparent)| {
            let headers = match traceparent {
                Some(t) => telemetry::traceparent_headers(&t),
                None => msg.headers.clone(),
            };
            self.on_assignment(&msg.subject, headers, assignment, received_us)
        });
        let served = futures::future::join_all(served).await;
        let retry = served.iter().filter_map(|s| match s {
            Served::Retry(delay) => Some(*delay),
            _ => None,
        });
        let reply = match retry.max() {
            Some(delay) => AckKind::Nak(Some(delay)),
            None if served.iter().all(|s| *s == Served::Dropped) => AckKind::Term,
            None => AckKind::Ack,
        };
        let _ = msg.ack_with(reply).await;
    }

    async fn on_assignment(
        &self,
        subject: &str,
        headers: Option<async_nats::HeaderMap>,
        assignment: Assignment,
        received_us: u64,
    ) -> Served {
        if assignment.ticket.worker != self.config.worker_id {
            tracing::warn!(worker = %assignment.ticket.worker, "assignment for another worker; dropping");
            return Served::Dropped;
        }
        let t = &assignment.ticket;
        let span = sundara_common::consumer_span!("worker run", subject,
            sundara.task_id = %t.task_id,
            sundara.model = %t.model,
            sundara.miner = %t.worker,
            sundara.slice = %t.slice,
            sundara.replica = t.replica,
            sundara.attempt = t.attempt,
            sundara.batch = tracing::field::Empty,
            sundara.outcome = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::follow(&span, headers.as_ref());
        self.serve(assignment, received_us).instrument(span).await
    }

    /// Runs a decoded assignment of this worker's and stores its outcome.
    async fn serve(&self, assignment: Assignment, received_us: u64) -> Served {
        let _slot = SlotInUse::hold(&assignment.ticket.slice);
        let (result, compute_us, started_us) = match self.execute(&assignment).await {
            Done::Outcome(result, compute_us, started_us) => (result, compute_us, started_us),
            Done::HandBack { slice, reason, slice_failed } => {
                let aid = assignment.ticket.assignment_id();
                tracing::info!(assignment = %aid, %slice, %reason, "handing the assignment back");
                let handed = if slice_failed {
                    self.report(FleetUpdate::FailSlice { slice, reason }).await
                } else {
                    self.report(FleetUpdate::HandBack { assignment_id: aid.clone() }).await
                };
                return match handed {
                    Ok(()) => Served::Dropped,
                    // Final (the assignment is no longer this worker's: answered, timed out
                    // and reassigned): delivering it again would only be refused again.
                    Err(ReportError::Refused(reason)) => {
                        tracing::info!(assignment = %aid, %reason, "hand-back refused; dropping the assignment");
                        Served::Dropped
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not hand the assignment back; will retry");
                        Served::Retry(Duration::from_millis(500))
                    }
                };
            }
        };
        let timing = WorkTiming {
            accepted_us: assignment.accepted_at_us,
            received_us,
            started_us,
            finished_us: if started_us > 0 { started_us + compute_us } else { 0 },
        };
        if let OutcomeResult::Failed { reason } = &result {
            tracing::warn!(task = %assignment.ticket.task_id, %reason, "assignment failed");
        }
        #[cfg(feature = "cheaters")]
        if let Some(c) = &self.cheater {
            c.before_answering(assignment.ticket.answer_by_ms).await;
        }
        tracing::Span::current().record("sundara.outcome", result.label());
        let ticket = assignment.ticket;
        let aid = ticket.assignment_id();
        let outcome_id = ticket.outcome_id();
        let subject = subj::outcome(&ticket.task_id, &ticket.worker);
        let outcome = Outcome { v: WIRE_VERSION, ticket, result, compute_us, timing };
        match nats::publish_durable(&self.js, subject, &outcome_id, encode(&outcome)).await {
            Ok(_) => Served::Answered,
            Err(e) => {
                // Delivered again, and the outcome published again (deduplicated by its
                // outcome id).
                tracing::warn!(assignment = %aid, error = %e, "outcome not stored; will retry");
                Served::Retry(Duration::from_millis(200))
            }
        }
    }

    /// A command from the autoscaler.
    async fn on_control(&self, payload: &[u8]) -> ControlReply {
        let reply = |ok: bool, reason: String| ControlReply { v: WIRE_VERSION, ok, reason };
        let request = match decode::<ControlRequest>(payload, 64 << 10) {
            Ok(r) => r,
            Err(e) => return reply(false, e.to_string()),
        };
        match request.command {
            Control::Preload { model, slice } => {
                let loading = tokio::time::timeout(PRELOAD_TIMEOUT, self.preload(&model, &slice));
                match loading.await.unwrap_or(Err(PreloadError::TimedOut(PRELOAD_TIMEOUT))) {
                    Ok(()) => {
                        tracing::info!(%model, %slice, "preloaded");
                        reply(true, String::new())
                    }
                    Err(why) => reply(false, why.to_string()),
                }
            }
        }
    }

    /// Loads a model on a slice ahead of its tasks: one example row through the slice's
    /// executor, which loads and warms it up like a first task would.
    async fn preload(&self, m: &ModelRef, slice: &str) -> Result<(), PreloadError> {
        let slice = self.slices.get(slice).ok_or_else(|| PreloadError::NoSlice(slice.to_string()))?;
        let meta = self
            .registry
            .version(&m.name, &m.version)
            .await?
            .ok_or_else(|| PreloadError::Unregistered(m.to_string()))?;
        let path = self.cache.path(&meta).await?;
        let inputs = sundara_runtime::example_inputs(&meta.inputs, 1, &mut rand::rng());
        let model = ModelRun { key: m.to_string(), path, batching: meta.batching };
        Ok(slice.executor.run(&model, inputs).await.map(drop)?)
    }

    /// What Redis should say about this worker now: each slice with what it holds.
    fn announce(&self, models: &[String]) -> WorkerAnnounce {
        let mut slices: Vec<SliceAnnounce> = self
            .slices
            .values()
            .map(|s| {
                let r = s.executor.reports().borrow().clone();
                // Models measured over the slice's whole memory are not offered there.
                let too_large = |name: &str| {
                    r.footprints.iter().any(|(k, b)| ModelRef::spec_name(k) == name && *b > r.memory_total)
                };
                SliceAnnounce {
                    id: s.id.clone(),
                    device: device_name(&s.config.device),
                    slots: s.config.slots,
                    models: models.iter().filter(|m| !too_large(m)).cloned().collect(),
                    failed: r.failed.clone(),
                    memory_total: r.memory_total,
                    memory_free: r.memory_total.saturating_sub(r.memory_used),
                    loaded: r.loaded.clone(),
                    footprints: r.footprints.clone(),
                    loads: r.loads,
                    evictions: r.evictions,
                    lanes: s.config.threads as u32,
                    // Service times only of models loaded now: elsewhere the load counts too.
                    service_us: by_name(r.service_us.iter().filter(|(k, _)| r.loaded.iter().any(|(l, _)| l == k))),
                    load_us: by_name(r.load_us.iter()),
                }
            })
            .collect();
        slices.sort_by(|a, b| a.id.cmp(&b.id));
        WorkerAnnounce { worker: self.config.worker_id.clone(), operator: self.config.operator.clone(), slices }
    }
}

/// Per model name, from figures per `name@version` (the newest version listed wins).
fn by_name<'a>(per_key: impl Iterator<Item = &'a (String, u64)>) -> Vec<(String, u64)> {
    let mut named: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for (key, value) in per_key {
        named.insert(ModelRef::spec_name(key).to_string(), *value);
    }
    named.into_iter().collect()
}

fn device_name(d: &SliceDevice) -> String {
    match d {
        SliceDevice::Cpu => "cpu".into(),
        SliceDevice::Cuda { device_id } => format!("cuda:{device_id}"),
        SliceDevice::Mig { uuid } => format!("mig:{uuid}"),
    }
}

/// Refuses GPU slices this build or its ONNX Runtime cannot run, at start: not on the
/// first task, where each would take its slice out of service.
fn gpus_usable(config: &Config) -> Result<(), WorkerError> {
    let Some(gpu) = config.slices.iter().find(|s| s.device != SliceDevice::Cpu) else { return Ok(()) };
    sundara_runtime::cuda_support().map_err(|reason| WorkerError::NoGpu {
        slice: gpu.name.clone(),
        device: device_name(&gpu.device),
        reason,
    })
}

/// Whether the validator has quarantined this worker, as its fleet gateway last said. A
/// quarantined worker stays announced and gets no work; its log says so once, with why
/// and what to do, and again when the quarantine is lifted.
#[derive(Default)]
struct Standing(std::sync::Mutex<Option<String>>);

impl Standing {
    /// Notes what the gateway said of an applied announcement: quarantined (and why) or not.
    fn note(&self, config: &Config, quarantined: Option<&str>) {
        let mut was = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match (was.as_deref(), quarantined) {
            (None, Some(why)) => tracing::warn!(
                worker = %config.worker_id,
                operator = %config.operator,
                reason = %why,
                "this miner is quarantined by the validator: it gets no work (and no rewards) until the validator's \
                 operator lifts the quarantine (`sundara fleet release {}`). Its heartbeats go on. To appeal, send \
                 the validator this worker id, its operator and the reason (docs/mining.md §5)",
                config.operator
            ),
            (Some(_), None) => {
                tracing::info!(worker = %config.worker_id, "quarantine lifted: the miner gets work again")
            }
            _ => {}
        }
        *was = quarantined.map(str::to_string);
    }
}

/// Checks the slices and turns each into an executor.
fn start_slices(config: &Config) -> Result<HashMap<String, Slice>, WorkerError> {
    let invalid = |why: String| WorkerError::InvalidSlices(why);
    if config.slices.is_empty() {
        return Err(invalid("a worker needs at least one slice".into()));
    }
    let migs: Vec<&str> = config
        .slices
        .iter()
        .filter_map(|s| if let SliceDevice::Mig { uuid } = &s.device { Some(uuid.as_str()) } else { None })
        .collect();
    if migs.len() > 1 {
        return Err(invalid("one MIG slice per worker process (CUDA shows a process one MIG instance)".into()));
    }
    if let Some(uuid) = migs.first() {
        // Must precede ONNX Runtime's CUDA start-up; nothing else runs on a GPU in this process then.
        // SAFETY: set before any thread of this process reads the environment for CUDA.
        unsafe { std::env::set_var("CUDA_VISIBLE_DEVICES", uuid) };
    }
    let mut slices = HashMap::new();
    for s in &config.slices {
        let id = format!("{}-{}", config.worker_id, s.name);
        let device = match &s.device {
            SliceDevice::Cpu => Device::Cpu,
            SliceDevice::Cuda { device_id } => Device::Cuda { device_id: *device_id, memory_limit: s.memory },
            SliceDevice::Mig { .. } => Device::Cuda { device_id: 0, memory_limit: s.memory },
        };
        let executor = Executor::start(
            &id,
            ExecutorConfig {
                threads: s.threads.max(1),
                intra_threads: config.intra_threads,
                device,
                memory: s.memory,
                max_batch: config.max_batch,
                queue: s.slots.max(1) as usize * 2,
                fail_after_runs: s.fail_after_runs,
            },
        );
        if slices.insert(id.clone(), Slice { id: id.clone(), config: s.clone(), executor }).is_some() {
            return Err(invalid(format!("two slices named {:?}", s.name)));
        }
    }
    Ok(slices)
}

/// Runs a worker until `shutdown`. Asked to stop, it lets in-flight assignments finish
/// and store their outcomes for at most [`sundara_common::SHUTDOWN_GRACE`] and then
/// stops whatever NATS does (a worker must stop on Ctrl-C or SIGTERM while NATS is down):
/// the assignments it still held are delivered again or reassigned.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), WorkerError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("worker", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

/// Connects to NATS. A hotkey refused at start is tried again every 3 s for the startup
/// timeout: a hotkey registered a moment ago is let in once the validator has read the
/// metagraph again (every block).
async fn connect(config: &Config, shutdown: &Shutdown) -> Result<async_nats::Client, WorkerError> {
    let name = format!("sundara-worker-{}", config.worker_id);
    let started = std::time::Instant::now();
    loop {
        match nats::connect(&config.nats, &name).await {
            Err(e @ sundara_common::Error::NatsHotkeyRefused { .. }) if started.elapsed() < config.startup_timeout => {
                tracing::warn!(error = %e, "hotkey refused; trying again in 3 s (a registration shows once the validator reads the metagraph)");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(e.into()),
                    _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                }
            }
            other => return Ok(other?),
        }
    }
}

/// [`run`], without the bound on its shutdown.
async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), WorkerError> {
    if !subj::is_token(&config.worker_id) {
        return Err(WorkerError::InvalidId(config.worker_id.clone()));
    }
    let slices = start_slices(&config)?;
    sundara_runtime::init(&config.ort_library)?;
    gpus_usable(&config)?;
    let client = connect(&config, &shutdown).await?;
    let js = jetstream::new(client.clone());
    // A miner creates no streams (its credentials cannot): it waits for the validator's.
    nats::await_provisioned(&js, config.startup_timeout).await?;
    let registry = Registry::open(&js).await?;
    let models = if config.models.is_empty() {
        registry.list().await?.into_iter().map(|m| m.name).collect()
    } else {
        config.models.clone()
    };
    let worker = Worker {
        cache: ModelCache::new(config.cache_dir.clone(), registry.clone()),
        config: config.clone(),
        client: client.clone(),
        js: js.clone(),
        registry,
        slices,
        standing: Standing::default(),
        #[cfg(feature = "cheaters")]
        cheater: cheaters::Cheater::new(config.behaviour),
    };
    let commands = worker.announce_first(&models).await?;
    let slots: usize = config.slices.iter().map(|s| s.slots.max(1) as usize).sum();
    let consumer = nats::durable_consumer(
        &js,
        subj::WORK_STREAM,
        &format!("worker-{}", config.worker_id),
        &subj::work_of(&config.worker_id),
        Duration::from_secs(30),
        (slots * 4) as i64,
    )
    .await?;
    let work = nats::consume(&consumer, &shutdown, slots * 2, |msg| worker.on_work(msg));
    let (_, worked, _) = tokio::join!(worker.heartbeats(models, &shutdown), work, worker.obey(commands, &shutdown));
    worked?;
    // Bounded: a flush waits for a server that is gone.
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!(worker = %config.worker_id, "worker stopped");
    Ok(())
}

impl Worker {
    /// Subscribes to its control subject and announces itself (fresh), within the start-up
    /// timeout. Credentials that are not this worker's are refused its subjects: that fails
    /// at once, not after the announce's and the consumer's timeouts.
    async fn announce_first(&self, models: &[String]) -> Result<async_nats::Subscriber, WorkerError> {
        let config = &self.config;
        let mut refused = nats::Denials::watch(&self.client);
        let denied = |denial| WorkerError::NotPermitted { worker: config.worker_id.clone(), denial };
        // Listening for commands before it is announced: whoever sees it in Redis can command it.
        let subscribed = refused.guard(|_| true, self.client.subscribe(subj::control(&config.worker_id))).await;
        let commands = subscribed.map_err(denied)?.map_err(js_err)?;
        self.client.flush().await.map_err(js_err)?;
        let ttl_ms = config.heartbeat_ttl.as_millis() as u64;
        let hello = FleetUpdate::Announce { announce: self.announce(models), fresh: true, heartbeat_ttl_ms: ttl_ms };
        let announced = refused.guard(|_| true, self.report_within(hello, config.startup_timeout)).await;
        announced.map_err(denied)?.map_err(|e| WorkerError::Report(e.to_string()))?;
        tracing::info!(
            worker = %config.worker_id,
            ?models,
            slices = ?config.slices.iter().map(|s| &s.name).collect::<Vec<_>>(),
            behaviour = ?config.behaviour,
            "worker announced"
        );
        Ok(commands)
    }

    /// Tells Redis of every load, eviction and failure at once, and of everything on each
    /// heartbeat (which also restores what a restarted Redis lost), until shutdown.
    async fn heartbeats(&self, mut models: Vec<String>, shutdown: &Shutdown) {
        let config = &self.config;
        let mut changes = futures::stream::select_all(
            self.slices.values().map(|s| changes_of(s.executor.reports())).collect::<Vec<_>>(),
        );
        let mut tick = tokio::time::interval(config.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                Some(()) = changes.next() => {}
            }
            // Offering every registered model: also those pushed since it started.
            if config.models.is_empty() {
                for name in self.registry.known_names() {
                    if !models.contains(&name) {
                        tracing::info!(model = %name, "offering a newly registered model");
                        models.push(name);
                    }
                }
            }
            let announce = self.announce(&models);
            set_slice_gauges(&announce);
            let ttl_ms = config.heartbeat_ttl.as_millis() as u64;
            let heartbeat = FleetUpdate::Announce { announce, fresh: false, heartbeat_ttl_ms: ttl_ms };
            if let Err(e) = self.report(heartbeat).await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }

    /// Carries out the autoscaler's commands, one at a time, until shutdown.
    async fn obey(&self, mut commands: async_nats::Subscriber, shutdown: &Shutdown) {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = commands.next() => match next {
                    Some(msg) => msg,
                    None => break,
                },
            };
            let reply = self.on_control(&msg.payload).await;
            if let Some(to) = msg.reply
                && let Err(e) = self.client.publish(to, encode(&reply).into()).await
            {
                tracing::warn!(error = %e, "control reply failed");
            }
        }
    }
}

/// Per slice: its slots, models loaded and memory in use (slots in use are counted where
/// assignments run, see [`SlotInUse`]).
fn set_slice_gauges(announce: &WorkerAnnounce) {
    for s in &announce.slices {
        metrics::gauge!("sundara_worker_slots", "slice" => s.id.clone()).set(f64::from(s.slots));
        metrics::gauge!("sundara_worker_loaded_models", "slice" => s.id.clone()).set(s.loaded.len() as f64);
        let used = s.memory_total.saturating_sub(s.memory_free);
        metrics::gauge!("sundara_worker_memory_used_bytes", "slice" => s.id.clone()).set(used as f64);
    }
}

/// Counts an assignment in `sundara_worker_slots_in_use` of its slice while it lives.
struct SlotInUse(metrics::Gauge);

impl SlotInUse {
    fn hold(slice: &str) -> SlotInUse {
        let gauge = metrics::gauge!("sundara_worker_slots_in_use", "slice" => slice.to_string());
        gauge.increment(1.0);
        SlotInUse(gauge)
    }
}

impl Drop for SlotInUse {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// A stream that yields each time the report changes.
fn changes_of(rx: tokio::sync::watch::Receiver<SliceReport>) -> futures::stream::BoxStream<'static, ()> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    }))
}

#[cfg(all(test, not(feature = "cheaters")))]
mod tests {
    use super::*;

    #[test]
    fn a_default_build_has_only_honest_workers() {
        assert_eq!(Behaviour::parse("honest"), Ok(Behaviour::Honest));
        for cheater in ["rotate", "dishonest", "noisy", "random", "never-answer", "late"] {
            let refused = Behaviour::parse(cheater).unwrap_err();
            assert!(refused.contains("--features cheaters"), "{refused}");
        }
        assert_eq!(Behaviour::liar(), None);
    }
}

#[cfg(test)]
mod args_tests {
    use super::*;
    use clap::Parser;

    /// `sundara worker`'s flags alone.
    #[derive(Parser)]
    struct Worker {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn a_command_line_parses_back_into_its_flags() {
        let every = Args {
            operator: Some("op".into()),
            threads: 3,
            slots: Some(7),
            slices: vec!["cpu,threads=2".into(), "cpu,name=b".into()],
            models: vec!["mlp".into(), "silero".into()],
            cache_dir: Some("/tmp/models".into()),
            dishonest: true,
            ..Args::new("w2")
        };
        for args in [Args::new("w1"), every] {
            let line = args.to_command_line();
            let parsed = Worker::try_parse_from(std::iter::once("worker".to_string()).chain(line.clone())).unwrap();
            assert_eq!(format!("{:?}", parsed.args), format!("{args:?}"), "{line:?}");
        }
    }
}
