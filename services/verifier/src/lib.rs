//! Verifier: gathers the k outcomes of each task, compares them under the model's rule,
//! and publishes the accepted result to the client, a verdict for the rewarder, and a
//! dead letter with all evidence when nothing can be accepted.
//!
//! With a reference runtime configured, the verifier also runs tasks itself: a sampled
//! fraction (the model's audit rate, at any k), and every task whose miners reached no
//! majority. Miners are then judged against the reference, not by their vote.
//!
//! Outcomes stay un-acked until the task's result and verdict are stored, so a verifier
//! that dies loses nothing: JetStream redelivers the outcomes and the task is decided
//! again (results and verdicts are deduplicated by task id).

pub mod compare;
pub mod detect;
pub mod gate;
pub mod gather;
pub mod judgement;
pub mod quorum;
pub mod refused;
pub mod trust;

pub use gather::{Gathering, Offer, Received, is_late};
pub use judgement::{ShortfallBudget, Unanimity, Why};

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message, message::Acker};
use futures::StreamExt;
use rand::Rng;
use sundara_common::{
    Endpoints, Error as CommonError, ModelCache, Registry, Shutdown, js_err, nats, telemetry, validator_key,
};
use sundara_runtime::{Executor, ExecutorConfig, ModelRun};
use sundara_schemas::{
    ClientResult, CompareRule, DeadLetter, FailureCode, MAX_MESSAGE_BYTES, MinerVerdict, Outcome, OutcomeResult,
    Policy, ReferenceCheck, ResultStatus, Standing, Task, TaskTiming, Tensor, Ticket, Verdict, WIRE_VERSION, decode,
    encode, now_ms, now_us, subjects as subj,
};
use tokio::sync::Semaphore;
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    /// Validator secret that the scheduler signs tickets with (at least 16 bytes).
    pub secret: validator_key::Secret,
    /// During a rotation, the secret being retired: tickets that name its key id (signed
    /// before the schedulers moved to `secret`) still verify.
    pub previous_secret: Option<validator_key::Secret>,
    /// Whether to check the secret's key id against the stack's at start (and refuse to
    /// start on a mismatch), or replace it (`--rotate-secret`): see [`validator_key`].
    pub secret_claim: validator_key::Claim,
    /// Outcomes held un-acked at most (JetStream max_ack_pending of the consumer).
    pub max_held: usize,
    /// How long after a task's deadline a partial set of outcomes is decided as it is.
    pub grace: Duration,
    /// Decisions being published at once.
    pub concurrency: usize,
    pub retention: nats::Retention,
    /// The verifier's own runtime for audits and escalations; without it the miners' vote
    /// is final and a task with no majority is dead-lettered.
    pub reference: Option<ReferenceConfig>,
    /// Reference runs one worker's failures or abandoned replicas may cause at once, and
    /// per minute after that (see [`judgement`]): failing on purpose must not make the
    /// validator do the work.
    pub shortfall_burst: u32,
    pub shortfall_per_minute: u32,
}

/// Where and how the verifier runs tasks itself (CPU ONNX Runtime).
#[derive(Clone, Debug)]
pub struct ReferenceConfig {
    pub ort_library: PathBuf,
    pub cache_dir: PathBuf,
    /// Inference threads for reference runs.
    pub threads: usize,
    /// Memory its loaded models may hold.
    pub memory: u64,
    /// Longest a reference run may take before the vote stands alone.
    pub timeout: Duration,
}

impl ReferenceConfig {
    pub fn new(ort_library: PathBuf, cache_dir: PathBuf) -> ReferenceConfig {
        ReferenceConfig {
            ort_library,
            cache_dir,
            threads: DEFAULT_REFERENCE_THREADS,
            memory: 1 << 30,
            timeout: Duration::from_secs(30),
        }
    }
}

/// `sundara verifier`'s flags: what an operator sets; [`Config::from_args`] adds the rest.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub secret: validator_key::SecretArgs,
    /// During a rotation of the validator secret: a file holding the secret being retired
    /// (else the environment variable SUNDARA_PREVIOUS_SECRET, if set). Tickets signed with
    /// it still verify, so tasks in flight when the schedulers move to the new secret end
    /// normally. Drop it once those tasks have ended (their deadline has passed).
    #[arg(long, env = "SUNDARA_PREVIOUS_SECRET_FILE")]
    pub previous_secret_file: Option<PathBuf>,
    /// Do not run tasks on the verifier's own runtime: no audits, and a task without a
    /// majority is dead-lettered.
    #[arg(long)]
    pub no_reference: bool,
    /// Inference threads of the reference runtime.
    #[arg(long, default_value_t = DEFAULT_REFERENCE_THREADS)]
    pub reference_threads: usize,
}

/// `--reference-threads`' default.
pub const DEFAULT_REFERENCE_THREADS: usize = 1;

impl Args {
    /// The defaults of every flag, with this secret.
    pub fn new(secret: impl Into<String>) -> Args {
        let secret = validator_key::SecretArgs::given(secret.into());
        Args { secret, previous_secret_file: None, no_reference: false, reference_threads: DEFAULT_REFERENCE_THREADS }
    }
}

impl Config {
    /// The config of `sundara verifier` with these flags. `reference` gives ONNX Runtime's
    /// library and the reference's model cache; it is called only when the verifier runs
    /// tasks itself (no `--no-reference`).
    pub fn from_args<E: From<validator_key::SecretError>>(
        args: Args,
        endpoints: Endpoints,
        reference: impl FnOnce() -> Result<(PathBuf, PathBuf), E>,
    ) -> Result<Config, E> {
        let mut config = Config::new(endpoints, args.secret.secret()?);
        config.secret_claim = args.secret.claim();
        config.previous_secret = validator_key::previous_secret(args.previous_secret_file.as_deref())?;
        if !args.no_reference {
            let (ort_library, cache_dir) = reference()?;
            let mut reference = ReferenceConfig::new(ort_library, cache_dir);
            reference.threads = args.reference_threads.max(1);
            config.reference = Some(reference);
        }
        Ok(config)
    }

    /// The defaults, as `sundara verifier --no-reference` with no other flag but the secret.
    pub fn new(endpoints: Endpoints, secret: validator_key::Secret) -> Config {
        Config {
            endpoints,
            secret,
            previous_secret: None,
            secret_claim: validator_key::Claim::Check,
            max_held: 20_000,
            grace: Duration::from_secs(30),
            concurrency: 256,
            retention: nats::Retention::default(),
            reference: None,
            shortfall_burst: 10,
            shortfall_per_minute: 6,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error(transparent)]
    Common(#[from] CommonError),
    /// The validator secret is too short, or not the one the rest of the stack uses.
    #[error(transparent)]
    Secret(#[from] validator_key::SecretError),
    #[error(transparent)]
    Runtime(#[from] sundara_runtime::RuntimeError),
}

/// The verifier's own run of a task, and why it ran.
#[derive(Clone, Debug)]
pub struct ReferenceRun {
    pub why: Why,
    pub outputs: Result<Vec<Tensor>, String>,
}

/// The miners' vote on a task (see [`quorum::decide`]).
pub fn vote(rule: &CompareRule, g: &Gathering) -> quorum::Decision {
    let results: Vec<&OutcomeResult> = g.replicas.values().map(|r| &r.outcome.result).collect();
    quorum::decide(rule, g.k(), &results)
}

/// Builds what a decision publishes: the client's result, the verdict, and (when nothing
/// can be accepted) the dead letter, from the miners' [`vote`] and, when the verifier ran
/// the task itself, its reference run: miners are then judged against it and the client
/// gets outputs that match it. Pure.
pub fn conclude(
    rule: CompareRule,
    g: &Gathering,
    voted: quorum::Decision,
    reference: Option<&ReferenceRun>,
) -> (ClientResult, Verdict, Option<DeadLetter>) {
    let first = g.first_ticket().expect("a gathering has at least one outcome");
    let received: Vec<&Received> = g.replicas.values().collect();
    let results: Vec<&OutcomeResult> = received.iter().map(|r| &r.outcome.result).collect();
    let (decision, check, reference_outputs) = judge_with_reference(&rule, voted, reference, &results);
    // A late answer helps decide the client's result but earns nothing: agreeing, it is
    // `Late`; wrong, it stays wrong.
    let standings: Vec<Standing> = received
        .iter()
        .zip(&decision.standings)
        .map(|(r, &s)| if r.late && s == Standing::Agreed { Standing::Late } else { s })
        .collect();
    let miners = miner_verdicts(&received, &standings, &g.late);
    let agreeing = decision.standings.iter().filter(|s| **s == Standing::Agreed).count() as u8;
    let now = now_ms();
    let (status, dead, timing) = match decision.winner {
        Some(i) => {
            let OutcomeResult::Ok { outputs } = &received[i].outcome.result else {
                unreachable!("winners have outputs")
            };
            let timing = fastest_timing(&received, &standings, i);
            (ResultStatus::Verified { outputs: outputs.clone(), agreeing, k: first.k }, None, Some(timing))
        }
        // No miner matched the reference: the client gets the reference's own outputs.
        None if reference_outputs.is_some() => {
            let outputs = reference_outputs.expect("checked").clone();
            (ResultStatus::Verified { outputs, agreeing: 0, k: first.k }, None, None)
        }
        None => {
            let reason = no_consensus_reason(rule, first.k, &decision, check.as_ref(), &miners, received.len());
            let dead = DeadLetter {
                v: WIRE_VERSION,
                task_id: first.task_id.clone(),
                tenant: first.tenant.clone(),
                model: first.model.clone(),
                reason: reason.clone(),
                evidence: received.iter().copied().chain(&g.late).map(|r| r.outcome.clone()).collect(),
                dead_at_ms: now,
                task_seq: first.task_seq,
            };
            (ResultStatus::Failed { code: FailureCode::NoConsensus, reason }, Some(dead), None)
        }
    };
    let result = ClientResult {
        v: WIRE_VERSION,
        task_id: first.task_id.clone(),
        model: first.model.clone(),
        status,
        completed_at_ms: now,
        timing,
    };
    let verdict = Verdict {
        v: WIRE_VERSION,
        task_id: first.task_id.clone(),
        tenant: first.tenant.clone(),
        model: first.model.clone(),
        k: first.k,
        rule,
        accepted: dead.is_none(),
        miners,
        decided_at_ms: now,
        reference: check,
    };
    (result, verdict, dead)
}

/// The decision that stands once the reference run (if any) is taken into account, what the
/// reference showed, and its outputs when it ran.
fn judge_with_reference<'a>(
    rule: &CompareRule,
    voted: quorum::Decision,
    reference: Option<&'a ReferenceRun>,
    results: &[&OutcomeResult],
) -> (quorum::Decision, Option<ReferenceCheck>, Option<&'a Vec<Tensor>>) {
    match reference {
        None => (voted, None, None),
        // A split vote is never accepted on the vote alone: without the reference nothing is.
        Some(ReferenceRun { why: Why::Split, outputs: Err(reason) }) => {
            let unaccepted = quorum::Decision { winner: None, ..voted };
            (unaccepted, Some(ReferenceCheck::Unavailable { reason: reason.clone() }), None)
        }
        Some(ReferenceRun { outputs: Err(reason), .. }) => {
            (voted, Some(ReferenceCheck::Unavailable { reason: reason.clone() }), None)
        }
        Some(ReferenceRun { why, outputs: Ok(outputs) }) => {
            let judged = quorum::judge(rule, outputs, results);
            let check = match voted.winner {
                _ if *why != Why::Audit => ReferenceCheck::Escalated,
                Some(w) if judged.standings[w] == Standing::Agreed => ReferenceCheck::AuditPassed,
                _ => ReferenceCheck::AuditFailed,
            };
            (judged, Some(check), Some(outputs))
        }
    }
}

/// One line per miner of the verdict: each replica's standing, then the answers that came
/// after the deadline (late, never counted).
fn miner_verdicts(received: &[&Received], standings: &[Standing], late: &[Received]) -> Vec<MinerVerdict> {
    let verdict = |r: &Received, standing: Standing, latency_us: Option<u64>| MinerVerdict {
        worker: r.outcome.ticket.worker.clone(),
        operator: r.outcome.ticket.operator.clone(),
        replica: r.outcome.ticket.replica,
        attempt: r.outcome.ticket.attempt,
        standing,
        latency_us,
    };
    received
        .iter()
        .zip(standings)
        .map(|(r, &standing)| {
            let latency = (!matches!(standing, Standing::Missing | Standing::Late)).then_some(r.latency_us);
            verdict(r, standing, latency)
        })
        .chain(late.iter().map(|r| verdict(r, Standing::Late, None)))
        .collect()
}

/// The stages of a verified task, from the fastest agreeing miner's timings (the winner's
/// when none agreed on time).
fn fastest_timing(received: &[&Received], standings: &[Standing], winner: usize) -> TaskTiming {
    let fastest = received
        .iter()
        .zip(standings)
        .filter(|(_, s)| **s == Standing::Agreed)
        .map(|(r, _)| *r)
        .min_by_key(|r| r.latency_us)
        .unwrap_or(received[winner]);
    let w = fastest.outcome.timing;
    TaskTiming {
        accepted_us: w.accepted_us,
        dispatched_us: fastest.outcome.ticket.dispatched_at_us,
        received_us: w.received_us,
        started_us: w.started_us,
        finished_us: w.finished_us,
        outcome_stored_us: fastest.stored_at_us,
        decided_us: now_us(),
    }
}

/// Why no result could be accepted, for the client and the dead letter.
fn no_consensus_reason(
    rule: CompareRule,
    k: u8,
    decision: &quorum::Decision,
    check: Option<&ReferenceCheck>,
    miners: &[MinerVerdict],
    received: usize,
) -> String {
    let unavailable = match check {
        Some(ReferenceCheck::Unavailable { reason }) => format!(" and the reference could not judge it ({reason})"),
        _ => String::new(),
    };
    format!(
        "no unanimous vote of {k} under {rule}{unavailable}: agreeing groups {:?}, {} failed, {} missing",
        decision.group_sizes,
        decision.standings.iter().filter(|s| **s == Standing::Failed).count(),
        // Abandoned replicas, and replicas that never reported before the deadline.
        miners.iter().filter(|m| m.standing == Standing::Missing).count() + k as usize - received,
    )
}

/// Task ids decided recently, so late outcomes (a slow replica that was reassigned) are
/// recognised and dropped. Bounded: the oldest are forgotten first.
struct Decided {
    order: VecDeque<String>,
    set: HashSet<String>,
    cap: usize,
}

impl Decided {
    fn insert(&mut self, task: String) {
        if self.set.insert(task.clone()) {
            self.order.push_back(task);
            if self.order.len() > self.cap
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }

    /// Forgets a task whose decision could not be stored, so that its outcomes, when they
    /// come back, are gathered and decided again instead of dropped as late.
    fn forget(&mut self, task: &str) {
        self.set.remove(task);
    }
}

/// The verifier's own runtime.
struct Reference {
    executor: Executor,
    cache: ModelCache,
    tasks: jetstream::stream::Stream,
    timeout: Duration,
    /// Reference runs at once (a few per thread, so the runtime stays busy). Split votes
    /// are served first: nothing else can accept them. Audits and shortfall checks wait
    /// behind them in a bounded queue, and are skipped when it is full.
    slots: gate::Gate,
}

impl Reference {
    /// A slot for a run of this kind, or `None` when the run is to be skipped.
    async fn slot(&self, why: Why) -> Option<gate::Slot> {
        let class = if why == Why::Split { gate::Class::Urgent } else { gate::Class::Optional };
        self.slots.acquire(class).await
    }
}

impl Reference {
    /// Runs the task of `ticket` (read back from TASKS) on the reference runtime.
    async fn run(&self, registry: &Registry, ticket: &Ticket) -> Result<Vec<Tensor>, String> {
        let work = async {
            let raw =
                self.tasks.get_raw_message(ticket.task_seq).await.map_err(|e| format!("task not readable: {e}"))?;
            let task = decode::<Task>(&raw.payload, MAX_MESSAGE_BYTES).map_err(|e| e.to_string())?;
            let m = &ticket.model;
            let meta = registry
                .version(&m.name, &m.version)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("model {m} is not in the registry"))?;
            let path = self.cache.path(&meta).await.map_err(|e| e.to_string())?;
            let model = ModelRun { key: m.to_string(), path, batching: meta.batching };
            let ran = self.executor.run(&model, task.inputs).await.map_err(|e| e.to_string())?;
            Ok(ran.outputs)
        };
        tokio::time::timeout(self.timeout, work).await.unwrap_or_else(|_| Err("reference run timed out".into()))
    }
}

/// The decision as attributes of the `verifier decide` span.
fn record_decision(span: &tracing::Span, result: &ClientResult, verdict: &Verdict) {
    match &result.status {
        ResultStatus::Verified { agreeing, .. } => {
            span.record("sundara.outcome", "verified");
            span.record("sundara.agreeing", agreeing);
        }
        ResultStatus::Failed { code, .. } => {
            span.record("sundara.outcome", tracing::field::debug(code));
            span.record("otel.status_code", "error");
        }
    }
    let miners: Vec<String> = verdict.miners.iter().map(|m| format!("{}={}", m.worker, m.standing.as_str())).collect();
    span.record("sundara.miners", miners.join(","));
    if let Some(check) = &verdict.reference {
        span.record("sundara.reference", check.label());
    }
}

struct Publisher {
    js: jetstream::Context,
    verdicts: jetstream::stream::Stream,
    /// RESULTS: a task whose outcomes were refused is ended only if it has no result.
    results: jetstream::stream::Stream,
    /// TASKS: a dead task's message is copied to DEAD beside its letter.
    tasks: jetstream::stream::Stream,
    registry: Registry,
    reference: Option<Reference>,
    /// Passed audits per miner: lowers their audit rate (see [`trust`]).
    trust: std::sync::Mutex<trust::Trust>,
    /// Recently accepted results, to recognise replayed ones (see [`detect`]).
    recent: std::sync::Mutex<detect::Recent>,
    /// Reference runs each worker's failures may still cause (see [`judgement`]).
    shortfalls: std::sync::Mutex<ShortfallBudget>,
    /// Tasks whose decision could not be stored (to be forgotten by the gathering loop).
    undecided: tokio::sync::mpsc::UnboundedSender<String>,
}

/// A task's gathering and the acks of the OUTCOMES messages behind it, acked once it is
/// decided. Only the ack handle and the headers (trace context) are kept, not the payload:
/// the decoded outcome in the gathering is all the verifier holds of a miner's bytes.
#[derive(Default)]
struct Pending {
    gathering: Gathering,
    held: Vec<Held>,
}

/// One held OUTCOMES message.
struct Held {
    acker: Acker,
    headers: Option<async_nats::HeaderMap>,
    /// Its sequence in OUTCOMES: tells a redelivery of it from another message.
    stream_seq: Option<u64>,
}

impl Held {
    fn of(msg: Message) -> Held {
        let stream_seq = msg.info().ok().map(|i| i.stream_sequence);
        let (message, acker) = msg.split();
        Held { acker, headers: message.headers, stream_seq }
    }
}

/// How long an outcome delivered to the verifier may go unacknowledged before OUTCOMES
/// delivers it again: what an outcome lost with a verifier (or with a cluster node) waits.
/// Outcomes held longer, for their siblings, get a progress ack every third of it.
const OUTCOME_ACK_WAIT: Duration = Duration::from_secs(10);

impl Publisher {
    /// Decides a task in the trace of its first outcome, linked to the others.
    async fn publish(&self, Pending { gathering: g, held: messages }: Pending) {
        let first = g.first_ticket().expect("non-empty");
        let span = sundara_common::consumer_span!("verifier decide", subj::OUTCOMES_STREAM,
            otel.status_code = tracing::field::Empty,
            "messaging.batch.message_count" = messages.len(),
            sundara.task_id = %first.task_id,
            sundara.model = %first.model,
            sundara.k = first.k,
            sundara.outcome = tracing::field::Empty,
            sundara.agreeing = tracing::field::Empty,
            sundara.miners = tracing::field::Empty,
            sundara.reference = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        let mut held = messages.iter().map(|m| m.headers.as_ref());
        telemetry::follow(&span, held.next().flatten());
        for headers in held {
            telemetry::link(&span, headers);
        }
        self.decide(g, messages).instrument(span).await
    }

    /// Whether (and why) the reference runs the task: every vote short of unanimous
    /// (within the failing miners' budget, see [`judgement`]), and a sample of the rest.
    fn needs_reference(&self, audit_rate: f64, g: &Gathering, voted: &quorum::Decision) -> Option<Why> {
        let workers: Vec<&str> = g.replicas.values().map(|r| r.outcome.ticket.worker.as_str()).collect();
        let operators = g.replicas.values().map(|r| r.outcome.ticket.operator());
        match judgement::unanimity(g.k(), voted, &workers) {
            Unanimity::Split => Some(Why::Split),
            Unanimity::Shortfall { workers, absent } => {
                let mut budget = self.shortfalls.lock().unwrap_or_else(|e| e.into_inner());
                budget.take(&workers, absent, Instant::now()).then_some(Why::Shortfall)
            }
            Unanimity::Unanimous => {
                let rate = self.trust.lock().unwrap_or_else(|e| e.into_inner()).audit_rate(audit_rate, operators);
                (rand::rng().random::<f64>() < rate).then_some(Why::Audit)
            }
        }
    }

    async fn decide(&self, g: Gathering, messages: Vec<Held>) {
        let first = g.first_ticket().expect("non-empty");
        let task_id = first.task_id.clone();
        let tenant = first.tenant.clone();
        let policy = match self.registry.version(&first.model.name, &first.model.version).await {
            Ok(Some(meta)) => meta.policy,
            _ => Policy::default(),
        };
        let rule = policy.rule;
        let voted = vote(&rule, &g);
        let reference = match (&self.reference, self.needs_reference(policy.audit_rate, &g, &voted)) {
            (Some(reference), Some(why)) => match reference.slot(why).await {
                Some(_slot) => {
                    let span = tracing::info_span!(target: sundara_common::telemetry::SPANS, "verifier reference run", sundara.reason = ?why);
                    let outputs = reference.run(&self.registry, first).instrument(span).await;
                    if let Err(e) = &outputs {
                        tracing::warn!(task = %task_id, error = %e, ?why, "reference run failed");
                    }
                    Some(ReferenceRun { why, outputs })
                }
                None => {
                    let why = format!("{why:?}").to_lowercase();
                    metrics::counter!("sundara_verifier_reference_skipped_total", "why" => why).increment(1);
                    None
                }
            },
            _ => None,
        };
        let (result, verdict, dead) = conclude(rule, &g, voted, reference.as_ref());
        record_decision(&tracing::Span::current(), &result, &verdict);
        self.trust.lock().unwrap_or_else(|e| e.into_inner()).record(&verdict);
        self.count(&g, &result, &verdict);
        let stored = async {
            // Each stored once per task, even when decided again long after the duplicate
            // window: the first decision stands.
            if let Some(dead) = &dead {
                nats::keep_dead_task(&self.js, &self.tasks, &task_id, dead.task_seq).await?;
                nats::publish_once(&self.js, subj::dead(&task_id), &task_id, encode(dead)).await?;
            }
            // The result and the verdict are independent: both stored, in one round trip.
            tokio::try_join!(
                nats::publish_once(&self.js, subj::result(&tenant, &task_id), &task_id, encode(&result)),
                nats::publish_once(&self.js, subj::verdict(&task_id), &task_id, encode(&verdict)),
            )?;
            Ok::<(), CommonError>(())
        };
        match stored.await {
            Ok(()) => {
                tracing::debug!(task = %task_id, accepted = verdict.accepted, "decided");
                for m in messages {
                    let _ = m.acker.ack().await;
                }
            }
            Err(e) => {
                // Un-acked: the outcomes come back and the task is decided again, once the
                // gathering loop has forgotten it (told before the outcomes are released).
                tracing::warn!(task = %task_id, error = %e, "decision not stored; outcomes will be redelivered");
                let _ = self.undecided.send(task_id.clone());
                for m in messages {
                    let _ = m.acker.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
    }

    /// Metrics of a decision: the verdict, the reference check, the time of each stage of
    /// the task (from the fastest agreeing miner's timings), and what each rejected outcome
    /// looked like.
    fn count(&self, g: &Gathering, result: &ClientResult, verdict: &Verdict) {
        let model = verdict.model.name.clone();
        let accepted = if verdict.accepted { "true" } else { "false" };
        metrics::counter!("sundara_verifier_verdicts_total", "model" => model.clone(), "accepted" => accepted)
            .increment(1);
        if let Some(check) = verdict.reference.as_ref().map(ReferenceCheck::label) {
            metrics::counter!("sundara_verifier_reference_runs_total", "model" => model.clone(), "check" => check)
                .increment(1);
        }
        if let Some(t) = &result.timing {
            let stages = [
                ("wait", t.accepted_us, t.dispatched_us),
                ("to_worker", t.dispatched_us, t.received_us),
                ("worker_queue", t.received_us, t.started_us),
                ("inference", t.started_us, t.finished_us),
                ("to_verifier", t.finished_us, t.outcome_stored_us),
                ("decide", t.outcome_stored_us, t.decided_us),
                ("total", t.accepted_us, t.decided_us),
            ];
            for (stage, from, to) in stages {
                if from > 0 && to >= from {
                    let seconds = (to - from) as f64 / 1e6;
                    metrics::histogram!("sundara_task_stage_seconds", "model" => model.clone(), "stage" => stage)
                        .record(seconds);
                }
            }
        }
        let accepted_outputs = match &result.status {
            ResultStatus::Verified { outputs, .. } => Some(outputs.as_slice()),
            _ => None,
        };
        // Verdict miners are the replicas in order, then the late answers.
        let outcomes = g.replicas.values().chain(&g.late).map(|r| &r.outcome.result);
        let judged = verdict.miners.iter().map(|m| m.standing).zip(outcomes);
        let found = {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            detect::rejections(&mut recent, &model, accepted_outputs, judged)
        };
        for d in found {
            metrics::counter!("sundara_verifier_rejected_total", "model" => model.clone(), "class" => d.label())
                .increment(1);
        }
    }

    /// An outcome whose outputs are not the model's declared outputs (names, dtypes, ranks,
    /// fixed dimensions) counts as the miner's failure, and its outputs are dropped at once:
    /// a miner cannot make the verifier hold more than its model's outputs per replica.
    async fn as_declared(&self, mut outcome: Outcome) -> Outcome {
        let m = &outcome.ticket.model;
        let Ok(Some(meta)) = self.registry.version(&m.name, &m.version).await else { return outcome };
        if let OutcomeResult::Ok { outputs } = &outcome.result
            && let Some(why) = undeclared(&meta.outputs, outputs)
        {
            outcome.result = OutcomeResult::Failed { reason: format!("outputs not as declared: {why}") };
        }
        outcome
    }

    /// Whether a verdict for the task is already stored (a verifier restart lost our memory of it).
    async fn already_decided(&self, task_id: &str) -> bool {
        self.verdicts.direct_get_last_for_subject(subj::verdict(task_id)).await.is_ok()
    }

    /// Ends a task none of whose outcomes could be admitted (see [`refused`]): a failed
    /// result and a dead letter with the reason and the refused outcomes, unless the task
    /// has a result already (decided elsewhere, or expired by the scheduler). No verdict:
    /// nothing the miners sent was judged, so nobody is scored.
    async fn end_refused(&self, r: &refused::RefusedTask) -> Result<(), CommonError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        match self.results.direct_get_last_for_subject(subj::result(&r.tenant, &r.task_id)).await {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
            Err(e) => return Err(js_err(e)),
        }
        let (result, dead) = r.conclude();
        tracing::error!(task = %r.task_id, reason = %dead.reason, "task ended: none of its outcomes could be admitted");
        metrics::counter!("sundara_verifier_verdicts_total", "model" => r.model.name.clone(), "accepted" => "false")
            .increment(1);
        nats::keep_dead_task(&self.js, &self.tasks, &r.task_id, dead.task_seq).await?;
        nats::publish_once(&self.js, subj::dead(&r.task_id), &r.task_id, encode(&dead)).await?;
        nats::publish_once(&self.js, subj::result(&r.tenant, &r.task_id), &r.task_id, encode(&result)).await?;
        Ok(())
    }
}

/// Runs the verifier until `shutdown`; once asked to stop, it stops within
/// [`sundara_common::SHUTDOWN_GRACE`] whatever NATS does (outcomes it held un-acked are
/// delivered again).
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), VerifierError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("verifier", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), VerifierError> {
    let keys = validator_key::Keyring::new(config.secret.clone(), config.previous_secret.clone());
    let (client, js) = validator_key::connect_signer::<VerifierError>(
        &config.endpoints.nats,
        "verifier",
        &keys,
        config.secret_claim,
        &config.retention,
    )
    .await?;
    let registry = Registry::open(&js).await?;
    let verdicts = js.get_stream(subj::VERDICTS_STREAM).await.map_err(js_err)?;
    let results = js.get_stream(subj::RESULTS_STREAM).await.map_err(js_err)?;
    let tasks = js.get_stream(subj::TASKS_STREAM).await.map_err(js_err)?;
    let consumer = nats::durable_consumer(
        &js,
        subj::OUTCOMES_STREAM,
        "verifier",
        subj::OUTCOME_ALL,
        OUTCOME_ACK_WAIT,
        config.max_held as i64,
    )
    .await?;
    let mut messages = nats::pull(&consumer);
    let reference = match &config.reference {
        Some(r) => Some(Reference::start(r, &registry, tasks.clone())?),
        None => None,
    };
    let (undecided, undecided_rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = Arc::new(Publisher {
        js,
        verdicts,
        results,
        tasks: tasks.clone(),
        registry,
        reference,
        trust: Default::default(),
        recent: Default::default(),
        shortfalls: std::sync::Mutex::new(ShortfallBudget::new(config.shortfall_burst, config.shortfall_per_minute)),
        undecided,
    });
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut intake = Intake {
        keys,
        grace_ms: config.grace.as_millis() as u64,
        pending: HashMap::new(),
        refused: HashMap::new(),
        tasks,
        decided: Decided { order: VecDeque::new(), set: HashSet::new(), cap: 200_000 },
        undecided: undecided_rx,
        publisher,
        permits: permits.clone(),
        progressed: Instant::now(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tracing::info!("verifier running");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => intake.on_tick().await,
            next = messages.next() => match next {
                Some(Ok(msg)) => intake.on_outcome(msg).await,
                Some(Err(e)) => tracing::warn!(error = %e, "outcome consumer"),
                None => break,
            },
        }
    }
    // First this verifier's pull requests go (else JetStream would deliver the outcomes
    // it hands back to it again).
    drop(messages);
    intake.hand_back(&client, &permits, config.concurrency).await;
    tracing::info!("verifier stopped");
    Ok(())
}

impl Reference {
    /// The verifier's own runtime for audits, on `r.threads` CPU threads.
    fn start(
        r: &ReferenceConfig,
        registry: &Registry,
        tasks: jetstream::stream::Stream,
    ) -> Result<Reference, VerifierError> {
        sundara_runtime::init(&r.ort_library)?;
        let executor = Executor::start("reference", ExecutorConfig::cpu(r.threads.max(1), r.memory, 1024));
        let cache = ModelCache::new(r.cache_dir.clone(), registry.clone());
        let slots = gate::Gate::new(r.threads.max(1) * 4, 1024);
        Ok(Reference { executor, cache, tasks, timeout: r.timeout, slots })
    }
}

impl Intake {
    /// At shutdown: outcomes held for undecided tasks go back at once (NAKed), so that the
    /// next verifier (this one restarted, perhaps with the right secret) gathers them
    /// without waiting out their ack wait; then in-flight decisions finish storing. Each
    /// step is bounded: with NATS unreachable none of them can complete, and shutdown must
    /// still end.
    async fn hand_back(&mut self, client: &async_nats::Client, permits: &Semaphore, concurrency: usize) {
        let _ = tokio::time::timeout(SHUTDOWN_STEP, client.flush()).await;
        if tokio::time::timeout(SHUTDOWN_STEP, self.release_held()).await.is_err() {
            tracing::warn!("held outcomes not released in time; they come back after their ack wait");
        }
        let storing = permits.acquire_many(concurrency as u32);
        if tokio::time::timeout(SHUTDOWN_STEP, storing).await.is_err() {
            tracing::warn!("decisions still storing at shutdown; their outcomes will be redelivered");
        }
        let _ = tokio::time::timeout(SHUTDOWN_STEP, client.flush()).await;
    }
}

/// Longest each step of the verifier's shutdown may take.
const SHUTDOWN_STEP: Duration = Duration::from_secs(3);

/// The gathering loop's state, owned by the loop: tasks being gathered, and tasks decided
/// recently (so that their late or replayed outcomes are dropped at once).
struct Intake {
    keys: validator_key::Keyring,
    grace_ms: u64,
    pending: HashMap<String, Pending>,
    /// Tasks with refused outcomes and none admitted (see [`refused`]), with the refused
    /// outcomes held.
    refused: HashMap<String, (refused::RefusedTask, Vec<Held>)>,
    /// TASKS: a refused outcome's task is read back from here, not trusted from its ticket.
    tasks: jetstream::stream::Stream,
    decided: Decided,
    /// Tasks whose decision could not be stored, reported before their outcomes were released.
    undecided: tokio::sync::mpsc::UnboundedReceiver<String>,
    publisher: Arc<Publisher>,
    permits: Arc<Semaphore>,
    /// When held outcomes were last progress-acked: once per third of the ack wait, though
    /// the tick that checks comes every second.
    progressed: Instant,
}

impl Intake {
    /// Decides a task in its own task, bounded by the decision permits.
    async fn finish(&mut self, task: &str) {
        let Some(pending) = self.pending.remove(task) else { return };
        self.decided.insert(task.to_string());
        let permit = self.permits.clone().acquire_owned().await.expect("semaphore never closes");
        let publisher = self.publisher.clone();
        tokio::spawn(async move {
            publisher.publish(pending).await;
            drop(permit);
        });
    }

    /// Decides tasks whose deadline has long passed with what arrived, and keeps held
    /// outcomes from being redelivered while their siblings run.
    async fn on_tick(&mut self) {
        let now = now_ms();
        let stale: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.gathering.deadline_at_ms().saturating_add(self.grace_ms) <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for task in stale {
            if self.publisher.already_decided(&task).await {
                let pending = self.pending.remove(&task).expect("listed above");
                self.decided.insert(task);
                for m in pending.held {
                    let _ = m.acker.ack().await;
                }
            } else {
                self.finish(&task).await;
            }
        }
        let progress_due = self.progressed.elapsed() >= OUTCOME_ACK_WAIT / 3;
        if progress_due {
            self.progressed = Instant::now();
        }
        for p in self.pending.values().filter(|_| progress_due) {
            if p.gathering.first_seen.is_some_and(|t| t.elapsed() > OUTCOME_ACK_WAIT / 3) {
                for m in &p.held {
                    let _ = m.acker.ack_with(AckKind::Progress).await;
                }
            }
        }
        self.end_refused(now, progress_due).await;
    }

    /// Ends the tasks whose outcomes were all refused once their deadline + grace passed
    /// (see [`refused`]); keeps the refused outcomes of the others from redelivery.
    async fn end_refused(&mut self, now: u64, progress_due: bool) {
        let due: Vec<String> = self
            .refused
            .iter()
            .filter(|(_, (r, _))| r.deadline_at_ms.saturating_add(self.grace_ms) <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for task in due {
            let (r, held) = self.refused.remove(&task).expect("listed above");
            // An admitted outcome made it an ordinary task, decided with the refused
            // replicas missing.
            let ordinary = self.decided.set.contains(&task) || self.pending.contains_key(&task);
            if !ordinary && let Err(e) = self.publisher.end_refused(&r).await {
                tracing::warn!(task = %task, error = %e, "could not end a task whose outcomes were refused; will retry");
                self.refused.insert(task, (r, held));
                continue;
            }
            if !ordinary {
                self.decided.insert(task);
            }
            for m in held {
                let _ = m.acker.ack().await;
            }
        }
        for (r, held) in self.refused.values().filter(|_| progress_due) {
            if r.first_seen.elapsed() > OUTCOME_ACK_WAIT / 3 {
                for m in held {
                    let _ = m.acker.ack_with(AckKind::Progress).await;
                }
            }
        }
    }

    /// Holds a refused outcome of a task that has no admitted one, so that the task ends
    /// (see [`refused`]); drops it when the task is gathered or decided already, or when
    /// its ticket does not name the task TASKS holds at its sequence (a forgery).
    async fn on_refused(&mut self, msg: Message, why: &'static str, outcome: Outcome) {
        let task = outcome.ticket.task_id.clone();
        if self.decided.set.contains(&task) || self.pending.contains_key(&task) {
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
        if let Some((r, held)) = self.refused.get_mut(&task) {
            if r.add(why, outcome) {
                held.push(Held::of(msg));
            } else {
                let _ = msg.ack_with(AckKind::Term).await;
            }
            return;
        }
        if self.refused.len() >= refused::MAX_REFUSED_TASKS {
            tracing::warn!(task = %task, "too many tasks with refused outcomes tracked; dropping this one");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        }
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let seq = outcome.ticket.task_seq;
        let stored = match self.tasks.get_raw_message(seq).await {
            Ok(raw) => decode::<Task>(&raw.payload, MAX_MESSAGE_BYTES).ok(),
            Err(e) if e.kind() == LastRawMessageErrorKind::Other => {
                // TASKS not reachable now: look again when it comes back.
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
            Err(_) => None,
        };
        match stored {
            Some(t) if t.task_id == task => {
                let mut r = refused::RefusedTask::of(&t, seq);
                r.add(why, outcome);
                self.refused.insert(task, (r, vec![Held::of(msg)]));
            }
            _ => {
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
    }

    /// At shutdown: every outcome still held for an undecided task goes back to JetStream
    /// (NAK), to be delivered again at once to the next verifier.
    async fn release_held(&mut self) {
        let held = self.pending.drain().flat_map(|(_, p)| p.held).chain(self.refused.drain().flat_map(|(_, (_, h))| h));
        for m in held {
            let _ = m.acker.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Checks one outcome and gathers it; decides its task once every replica reported.
    async fn on_outcome(&mut self, msg: Message) {
        let outcome = match admit(&self.keys, &msg) {
            Ok(outcome) => self.publisher.as_declared(outcome).await,
            Err(refusal) => {
                let why = refusal.label();
                tracing::warn!(subject = %msg.subject, why, "outcome refused");
                metrics::counter!("sundara_verifier_refused_outcomes_total", "why" => why).increment(1);
                match refusal {
                    // On its own subject, for a task it names: the task must still end.
                    Refusal::Forged(outcome) => self.on_refused(msg, why, *outcome).await,
                    _ => {
                        let _ = msg.ack_with(AckKind::Term).await;
                    }
                }
                return;
            }
        };
        let task = outcome.ticket.task_id.clone();
        while let Ok(failed) = self.undecided.try_recv() {
            self.decided.forget(&failed);
        }
        // A ticket of a task long past its deadline (an old ticket replayed, or outcomes
        // redelivered after a restart): one lookup, then it is never held if decided.
        let expired = outcome.ticket.deadline_at_ms.saturating_add(self.grace_ms) <= now_ms();
        if self.decided.set.contains(&task)
            || (expired && !self.pending.contains_key(&task) && self.publisher.already_decided(&task).await)
        {
            self.decided.insert(task);
            let _ = msg.ack().await;
            return;
        }
        let stored_at = nats::stored_at_us(&msg).unwrap_or_else(sundara_schemas::now_us);
        let latency_us = stored_at.saturating_sub(outcome.ticket.dispatched_at_us);
        let late = is_late(&outcome.ticket, stored_at);
        if late {
            tracing::info!(task = %task, worker = %outcome.ticket.worker, "late outcome");
        }
        let worker = outcome.ticket.worker.clone();
        let pending = self.pending.entry(task.clone()).or_default();
        pending.gathering.first_seen.get_or_insert_with(Instant::now);
        match pending.gathering.offer(Received { outcome, latency_us, stored_at_us: stored_at, late }) {
            Offer::Held => pending.held.push(Held::of(msg)),
            Offer::Duplicate => {
                let seq = msg.info().ok().map(|i| i.stream_sequence);
                match pending.held.iter_mut().find(|h| seq.is_some() && h.stream_seq == seq) {
                    // The held outcome delivered again: acking this delivery would ack it
                    // before its task is decided. This delivery's handle takes its place.
                    Some(held) => *held = Held::of(msg),
                    None => {
                        let _ = msg.ack().await;
                    }
                }
                return;
            }
            Offer::SameOperator => {
                tracing::warn!(task = %task, %worker, "a second replica of the task from one operator; not counted");
                let _ = msg.ack().await;
                return;
            }
        }
        if pending.gathering.complete() {
            self.finish(&task).await;
        }
    }
}

/// Why an outcome was not admitted.
enum Refusal {
    Undecodable,
    /// Not on the outcome subject of the task and worker its ticket names.
    Misaddressed,
    /// On its own subject, but its ticket's MAC does not verify under this verifier's secret.
    Forged(Box<Outcome>),
}

impl Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Undecodable => "undecodable",
            Refusal::Misaddressed => "another worker's ticket",
            Refusal::Forged(_) => "forged ticket",
        }
    }
}

/// Decodes an outcome and checks what its sender claims: published on the outcome subject
/// of the task and worker its ticket names (NATS lets a miner publish only on its own
/// outcome subjects, so a miner cannot answer under another miner's ticket), with a ticket
/// the validator signed. Malformed outputs become the miner's failure ([`well_formed`]).
fn admit(keys: &validator_key::Keyring, msg: &Message) -> Result<Outcome, Refusal> {
    let outcome = decode::<Outcome>(&msg.payload, MAX_MESSAGE_BYTES).map_err(|_| Refusal::Undecodable)?;
    if msg.subject.as_str() != subj::outcome(&outcome.ticket.task_id, &outcome.ticket.worker) {
        return Err(Refusal::Misaddressed);
    }
    if !keys.verify(&outcome.ticket) {
        return Err(Refusal::Forged(Box::new(outcome)));
    }
    Ok(well_formed(outcome))
}

/// Why `outputs` are not what the model declares (each declared output once, by name, of
/// its dtype, rank and fixed dimensions), or `None`.
pub fn undeclared(declared: &[sundara_schemas::TensorSpec], outputs: &[Tensor]) -> Option<String> {
    if outputs.len() != declared.len() {
        return Some(format!("{} outputs, the model declares {}", outputs.len(), declared.len()));
    }
    declared.iter().find_map(|spec| match outputs.iter().find(|t| t.name == spec.name) {
        None => Some(format!("no output `{}`", spec.name)),
        Some(t) => spec.mismatch_of("output", t),
    })
}

/// An outcome whose outputs are not well-formed tensors (shape and bytes disagree, or
/// hostile sizes) counts as the miner's failure: malformed outputs never reach a vote, a
/// comparison or a client.
fn well_formed(mut outcome: Outcome) -> Outcome {
    let limits = sundara_schemas::Limits {
        max_rank: sundara_schemas::bounded::MAX_DIMS,
        max_tensors: sundara_schemas::bounded::MAX_TENSORS,
        max_tensor_bytes: MAX_MESSAGE_BYTES,
    };
    if let OutcomeResult::Ok { outputs } = &outcome.result
        && let Some(e) = outputs.iter().find_map(|t| t.validate(&limits).err())
    {
        outcome.result = OutcomeResult::Failed { reason: format!("malformed outputs: {e}") };
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::{ModelRef, WorkTiming};

    const RULE: CompareRule = CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 };

    fn out(v: f32) -> Vec<Tensor> {
        vec![Tensor::from_values("y", vec![1, 2], &[v, 1.0 - v])]
    }

    /// A task with k replicas, each answering the given value (None: a failure).
    fn gathering(answers: &[Option<f32>]) -> Gathering {
        let mut g = Gathering::default();
        for (i, a) in answers.iter().enumerate() {
            let ticket = Ticket {
                task_id: "t1".into(),
                tenant: "tenant".into(),
                model: ModelRef { name: "m".into(), version: "1".into() },
                k: answers.len() as u8,
                replica: i as u8,
                attempt: 0,
                worker: format!("w{i}"),
                operator: String::new(),
                slice: format!("w{i}-cpu0"),
                dispatched_at_us: 1,
                deadline_at_ms: u64::MAX,
                answer_by_ms: u64::MAX,
                task_seq: 1,
                key_id: String::new(),
                mac: vec![],
            };
            let result = match a {
                Some(v) => OutcomeResult::Ok { outputs: out(*v) },
                None => OutcomeResult::Failed { reason: "x".into() },
            };
            let outcome = Outcome { v: WIRE_VERSION, ticket, result, compute_us: 0, timing: WorkTiming::default() };
            g.replicas.insert(i as u8, Received { outcome, latency_us: 10 + i as u64, stored_at_us: 0, late: false });
        }
        g
    }

    #[test]
    fn outputs_must_be_the_declared_ones() {
        use sundara_schemas::{DType, TensorSpec};
        let declared = vec![TensorSpec { name: "y".into(), dtype: DType::F32, shape: vec![None, Some(2)] }];
        assert_eq!(undeclared(&declared, &out(0.5)), None);
        let junk = vec![Tensor::from_values("y", vec![1 << 18], &vec![7.0f32; 1 << 18])];
        assert!(undeclared(&declared, &junk).is_some_and(|why| why.contains("output `y` must have shape [?, 2]")));
        let renamed = vec![Tensor::from_values("z", vec![1, 2], &[0.5f32, 0.5])];
        assert!(undeclared(&declared, &renamed).is_some());
        let extra = [out(0.5), out(0.5)].concat();
        assert!(undeclared(&declared, &extra).is_some());
    }

    #[test]
    fn malformed_outputs_count_as_the_miners_failure() {
        let g = gathering(&[Some(1.0)]);
        let good = g.replicas[&0].outcome.clone();
        assert_eq!(well_formed(good.clone()), good);
        let mut short = good;
        if let OutcomeResult::Ok { outputs } = &mut short.result {
            outputs[0].data.pop();
        }
        assert!(
            matches!(well_formed(short).result, OutcomeResult::Failed { reason } if reason.starts_with("malformed outputs"))
        );
    }

    /// [`conclude`] after the miners' vote, as the service does.
    fn decided(g: &Gathering, reference: Option<&ReferenceRun>) -> (ClientResult, Verdict, Option<DeadLetter>) {
        conclude(RULE, g, vote(&RULE, g), reference)
    }

    fn standings(v: &Verdict) -> Vec<Standing> {
        v.miners.iter().map(|m| m.standing).collect()
    }

    fn outputs(r: &ClientResult) -> &[Tensor] {
        match &r.status {
            ResultStatus::Verified { outputs, .. } => outputs,
            other => panic!("not verified: {other:?}"),
        }
    }

    #[test]
    fn a_passed_audit_changes_nothing() {
        let g = gathering(&[Some(0.25), Some(0.25)]);
        let audit = ReferenceRun { why: Why::Audit, outputs: Ok(out(0.25)) };
        let (result, verdict, dead) = decided(&g, Some(&audit));
        assert_eq!(verdict.reference, Some(ReferenceCheck::AuditPassed));
        assert_eq!(standings(&verdict), vec![Standing::Agreed, Standing::Agreed]);
        assert_eq!(outputs(&result), out(0.25));
        assert!(dead.is_none() && verdict.accepted);
    }

    #[test]
    fn an_audit_overrules_a_colluding_majority() {
        // Two colluders agree on a wrong answer and would win the vote.
        let g = gathering(&[Some(0.9), Some(0.25), Some(0.9)]);
        let (voted, _, _) = decided(&g, None);
        assert_eq!(outputs(&voted), out(0.9), "the vote alone is fooled");
        let audit = ReferenceRun { why: Why::Audit, outputs: Ok(out(0.25)) };
        let (result, verdict, _) = decided(&g, Some(&audit));
        assert_eq!(verdict.reference, Some(ReferenceCheck::AuditFailed));
        assert_eq!(standings(&verdict), vec![Standing::Disagreed, Standing::Agreed, Standing::Disagreed]);
        assert_eq!(outputs(&result), out(0.25));
    }

    #[test]
    fn a_lone_cheater_at_k1_gets_nothing_and_the_client_gets_the_reference() {
        let g = gathering(&[Some(0.9)]);
        let audit = ReferenceRun { why: Why::Audit, outputs: Ok(out(0.25)) };
        let (result, verdict, dead) = decided(&g, Some(&audit));
        assert_eq!(standings(&verdict), vec![Standing::Disagreed]);
        assert!(matches!(result.status, ResultStatus::Verified { agreeing: 0, k: 1, .. }));
        assert_eq!(outputs(&result), out(0.25));
        assert!(dead.is_none() && verdict.accepted);
    }

    #[test]
    fn escalation_settles_a_split_vote_and_an_unavailable_reference_dead_letters_it() {
        let g = gathering(&[Some(0.9), Some(0.25)]);
        let (_, _, dead) = decided(&g, None);
        assert!(dead.is_some(), "no majority without a reference");
        let escalation = ReferenceRun { why: Why::Split, outputs: Ok(out(0.25)) };
        let (result, verdict, dead) = decided(&g, Some(&escalation));
        assert_eq!(verdict.reference, Some(ReferenceCheck::Escalated));
        assert_eq!(standings(&verdict), vec![Standing::Disagreed, Standing::Agreed]);
        assert_eq!(outputs(&result), out(0.25));
        assert!(dead.is_none());
        let broken = ReferenceRun { why: Why::Split, outputs: Err("timed out".into()) };
        let (result, verdict, dead) = decided(&g, Some(&broken));
        assert!(matches!(verdict.reference, Some(ReferenceCheck::Unavailable { .. })));
        assert!(matches!(result.status, ResultStatus::Failed { .. }));
        assert!(dead.is_some() && !verdict.accepted);
    }

    #[test]
    fn a_late_answer_helps_the_client_but_earns_nothing() {
        let slow = |g: &mut Gathering, replica: u8| {
            let r = g.replicas.get_mut(&replica).unwrap();
            r.outcome.ticket.answer_by_ms = 5;
            r.late = is_late(&r.outcome.ticket, 5_001);
            assert!(r.late && !is_late(&r.outcome.ticket, 5_000));
        };
        // Replica 1 answered late and nobody else answered for it: its outputs count for
        // the client, it earns nothing.
        let mut g = gathering(&[Some(0.25), Some(0.25)]);
        slow(&mut g, 1);
        let (result, verdict, dead) = decided(&g, None);
        assert_eq!(outputs(&result), out(0.25));
        assert_eq!(standings(&verdict), vec![Standing::Agreed, Standing::Late]);
        assert_eq!(verdict.miners[1].latency_us, None);
        assert!(dead.is_none());
        // Late and wrong stays wrong.
        let mut g = gathering(&[Some(0.25), Some(0.25), Some(0.9)]);
        slow(&mut g, 2);
        let (_, verdict, _) = decided(&g, None);
        assert_eq!(standings(&verdict), vec![Standing::Agreed, Standing::Agreed, Standing::Disagreed]);
        // A late answer superseded by its replica's reassigned attempt is only listed.
        let mut g = gathering(&[Some(0.25), Some(0.25)]);
        let mut superseded = gathering(&[Some(0.25)]).replicas.remove(&0).unwrap();
        superseded.late = true;
        superseded.outcome.ticket.worker = "slow".into();
        g.late.push(superseded);
        let (_, verdict, _) = decided(&g, None);
        assert_eq!(standings(&verdict), vec![Standing::Agreed, Standing::Agreed, Standing::Late]);
    }

    #[test]
    fn a_split_vote_is_never_accepted_on_the_vote_alone() {
        // Two liars outvote an honest miner; the reference cannot run: nothing is accepted.
        let g = gathering(&[Some(0.9), Some(0.25), Some(0.9)]);
        let broken = ReferenceRun { why: Why::Split, outputs: Err("timed out".into()) };
        let (result, verdict, dead) = decided(&g, Some(&broken));
        assert!(matches!(result.status, ResultStatus::Failed { code: FailureCode::NoConsensus, .. }));
        assert!(dead.is_some_and(|d| d.reason.contains("timed out") && d.evidence.len() == 3));
        assert!(!verdict.accepted);
        // A unanimous vote whose audit could not run stands.
        let g = gathering(&[Some(0.25), Some(0.25)]);
        let broken = ReferenceRun { why: Why::Audit, outputs: Err("timed out".into()) };
        let (result, verdict, dead) = decided(&g, Some(&broken));
        assert_eq!(outputs(&result), out(0.25));
        assert!(verdict.accepted && dead.is_none());
    }

    #[test]
    fn failures_are_judged_as_failures_even_against_a_reference() {
        let g = gathering(&[None, Some(0.25)]);
        let escalation = ReferenceRun { why: Why::Split, outputs: Ok(out(0.25)) };
        let (_, verdict, _) = decided(&g, Some(&escalation));
        assert_eq!(standings(&verdict), vec![Standing::Failed, Standing::Agreed]);
    }
}
