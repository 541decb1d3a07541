//! Messages of a task's life, in the order they are sent.

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, Versioned};
use crate::model::{CompareRule, ModelRef};
use crate::tensor::Tensor;
use crate::ticket::Ticket;

/// Client → ingress (request on [`crate::subjects::submit`]`(tenant)`). The tenant is not
/// in the payload: it is the subject's last token, which NATS permissions tie to the
/// client's credentials, so no client can submit as another.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SubmitRequest {
    pub v: u16,
    /// Registered model name (its latest version is used), or `name@version` to pin one
    /// version (published versions are immutable: the same bytes and policy every time).
    pub model: String,
    #[serde(deserialize_with = "crate::bounded::tensors")]
    pub inputs: Vec<Tensor>,
    /// Client's idempotency key: resubmitting with the same key yields the same task.
    pub request_id: Option<String>,
    /// Seed for models with randomness; part of the task's input.
    pub seed: u64,
    /// How long the client is willing to wait for a result; the ingress caps it.
    pub timeout_ms: Option<u64>,
    /// Under contention, higher priority is dispatched first.
    #[serde(default)]
    pub priority: Priority,
}

/// Dispatch priority of a task. Each class has its own scheduler consumer, so a backlog
/// of low-priority tasks never holds back the delivery of a high-priority one.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// Highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// Its subject token and name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    pub fn parse(text: &str) -> Result<Priority, UnknownPriority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == text).ok_or_else(|| UnknownPriority(text.to_string()))
    }
}

/// A priority other than `high`, `normal` or `low`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown priority {0:?}: high, normal or low")]
pub struct UnknownPriority(pub String);

impl SubmitRequest {
    /// A request at the current wire version with no idempotency key, seed 0, the
    /// ingress's default timeout and normal priority; set the other fields as needed.
    pub fn new(model: &str, inputs: Vec<Tensor>) -> SubmitRequest {
        SubmitRequest {
            v: crate::WIRE_VERSION,
            model: model.to_string(),
            inputs,
            request_id: None,
            seed: 0,
            timeout_ms: None,
            priority: Priority::Normal,
        }
    }
}

/// Ingress → client.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SubmitReply {
    pub v: u16,
    pub outcome: SubmitOutcome,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum SubmitOutcome {
    /// Durably stored; a [`ClientResult`] will follow on `sundara.result.<tenant>.<task_id>`.
    /// `duplicate` is true when this request id was seen before.
    Accepted {
        task_id: String,
        duplicate: bool,
    },
    Rejected {
        code: RejectCode,
        reason: String,
    },
}

/// Why a submission was refused. Stable codes clients can branch on.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    Malformed,
    UnsupportedVersion,
    PayloadTooLarge,
    InvalidName,
    UnknownModel,
    MissingInput,
    UnexpectedInput,
    WrongDtype,
    WrongShape,
    HostileShape,
    /// The model needs more memory than any slice of the fleet has.
    ModelTooLarge,
    /// The fleet's backlog is full: retry later.
    Overloaded,
    /// The tenant submits faster than its rate limit: retry after the reason's delay.
    RateLimited,
    /// The tenant already has as many tasks in flight as its limit allows.
    TooManyInFlight,
    /// The task asks for a higher priority than its tenant is entitled to.
    PriorityNotPermitted,
    /// The task's timeout is shorter than the ingress' minimum.
    TimeoutTooShort,
    /// The tenant's stored tasks already take as many bytes as its quota allows: retry
    /// when older tasks have left TASKS.
    StorageQuota,
    Internal,
}

impl RejectCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::Malformed => "malformed",
            RejectCode::UnsupportedVersion => "unsupported_version",
            RejectCode::PayloadTooLarge => "payload_too_large",
            RejectCode::InvalidName => "invalid_name",
            RejectCode::UnknownModel => "unknown_model",
            RejectCode::MissingInput => "missing_input",
            RejectCode::UnexpectedInput => "unexpected_input",
            RejectCode::WrongDtype => "wrong_dtype",
            RejectCode::WrongShape => "wrong_shape",
            RejectCode::HostileShape => "hostile_shape",
            RejectCode::ModelTooLarge => "model_too_large",
            RejectCode::Overloaded => "overloaded",
            RejectCode::RateLimited => "rate_limited",
            RejectCode::TooManyInFlight => "too_many_in_flight",
            RejectCode::PriorityNotPermitted => "priority_not_permitted",
            RejectCode::TimeoutTooShort => "timeout_too_short",
            RejectCode::StorageQuota => "storage_quota",
            RejectCode::Internal => "internal",
        }
    }
}

/// An accepted task (stream TASKS, subject `sundara.task.<model>`, Nats-Msg-Id = task id).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Task {
    pub v: u16,
    pub task_id: String,
    pub tenant: String,
    pub model: ModelRef,
    /// Redundancy from the model's policy at acceptance.
    pub k: u8,
    #[serde(deserialize_with = "crate::bounded::tensors")]
    pub inputs: Vec<Tensor>,
    pub seed: u64,
    pub submitted_at_ms: u64,
    pub deadline_at_ms: u64,
    /// When ingress accepted the task (Unix µs); the start of its stage timings.
    #[serde(default)]
    pub accepted_at_us: u64,
    #[serde(default)]
    pub priority: Priority,
}

/// Scheduler → one worker (stream WORK, subject `sundara.work.<model>.<worker>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Assignment {
    pub v: u16,
    pub ticket: Ticket,
    #[serde(deserialize_with = "crate::bounded::tensors")]
    pub inputs: Vec<Tensor>,
    pub seed: u64,
    /// The task's [`Task::accepted_at_us`], echoed into the outcome's timing.
    #[serde(default)]
    pub accepted_at_us: u64,
}

/// Scheduler → one worker: the assignments ready for the same worker and model at once, in
/// one WORK message (subject `sundara.work.<model>.<worker>`, header
/// [`crate::subjects::ASSIGNMENTS`] set to their count). Under load this is one message
/// (and one ack each way) for many tasks. One assignment alone travels as a plain
/// [`Assignment`], as it always has. Decode either with [`decode_work`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Assignments {
    pub v: u16,
    pub assignments: Vec<Assignment>,
    /// Each assignment's W3C `traceparent` (empty when untraced), in the same order: a
    /// message carries one set of headers, and each task has its own trace.
    #[serde(default)]
    pub traceparents: Vec<String>,
}

/// [`Assignments`] encoded from assignments already encoded (by [`crate::encode`]), so
/// that a batch costs no second encoding of its inputs. Equal to encoding the struct.
pub fn encode_assignments<'a>(encoded: impl ExactSizeIterator<Item = &'a [u8]>, traceparents: &[String]) -> Vec<u8> {
    use rmp::encode as mp;
    let mut out = Vec::with_capacity(64 + encoded.len() * 64);
    // Writes to a Vec cannot fail.
    let _ = mp::write_map_len(&mut out, 3);
    let _ = mp::write_str(&mut out, "v");
    let _ = mp::write_uint(&mut out, u64::from(crate::WIRE_VERSION));
    let _ = mp::write_str(&mut out, "assignments");
    let _ = mp::write_array_len(&mut out, encoded.len() as u32);
    for bytes in encoded {
        out.extend_from_slice(bytes);
    }
    let _ = mp::write_str(&mut out, "traceparents");
    let _ = mp::write_array_len(&mut out, traceparents.len() as u32);
    for t in traceparents {
        let _ = mp::write_str(&mut out, t);
    }
    out
}

/// Most assignments one WORK message carries.
pub const MAX_ASSIGNMENTS_PER_MESSAGE: usize = 256;

/// A WORK message's assignments, each with its `traceparent` when it has its own:
/// [`Assignments`] when the message has the [`crate::subjects::ASSIGNMENTS`] header
/// (`batched`), else one [`Assignment`].
pub fn decode_work(batched: bool, payload: &[u8]) -> Result<Vec<(Assignment, Option<String>)>, DecodeError> {
    if !batched {
        return Ok(vec![(crate::decode::<Assignment>(payload, crate::MAX_MESSAGE_BYTES)?, None)]);
    }
    let batch: Assignments = crate::decode(payload, crate::MAX_MESSAGE_BYTES)?;
    if batch.assignments.len() > MAX_ASSIGNMENTS_PER_MESSAGE {
        return Err(DecodeError::Malformed(format!(
            "{} assignments in one message, more than {MAX_ASSIGNMENTS_PER_MESSAGE}",
            batch.assignments.len()
        )));
    }
    let mut traceparents = batch.traceparents.into_iter();
    Ok(batch.assignments.into_iter().map(|a| (a, traceparents.next().filter(|t| !t.is_empty()))).collect())
}

/// Worker (or the scheduler, when it gives up on a replica) → verifier
/// (stream OUTCOMES, subject `sundara.outcome.<task>.<worker>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Outcome {
    pub v: u16,
    /// Echo of the signed ticket: proves the assignment was real and when it was sent.
    pub ticket: Ticket,
    pub result: OutcomeResult,
    /// Self-reported compute time; informative only, never used for rewards.
    pub compute_us: u64,
    /// Self-reported stage times (diagnostics only, never used for rewards).
    #[serde(default)]
    pub timing: WorkTiming,
}

/// When an assignment went through a worker's stages, in Unix µs on the worker's clock
/// (0 = not reported). Feeds the per-stage breakdown of [`TaskTiming`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkTiming {
    /// Echo of [`Assignment::accepted_at_us`].
    pub accepted_us: u64,
    /// The worker received the assignment.
    pub received_us: u64,
    /// Inference started (after the wait in the worker's queue).
    pub started_us: u64,
    /// Inference finished.
    pub finished_us: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum OutcomeResult {
    Ok {
        #[serde(deserialize_with = "crate::bounded::tensors")]
        outputs: Vec<Tensor>,
    },
    /// The worker could not run the task.
    Failed { reason: String },
    /// The scheduler gave up on this replica (attempts exhausted or deadline passed).
    Abandoned { reason: String },
}

impl OutcomeResult {
    /// `ok`, `failed` or `abandoned` (for traces and logs).
    pub fn label(&self) -> &'static str {
        match self {
            OutcomeResult::Ok { .. } => "ok",
            OutcomeResult::Failed { .. } => "failed",
            OutcomeResult::Abandoned { .. } => "abandoned",
        }
    }
}

/// What the client receives (stream RESULTS, subject `sundara.result.<tenant>.<task>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ClientResult {
    pub v: u16,
    pub task_id: String,
    pub model: ModelRef,
    pub status: ResultStatus,
    pub completed_at_ms: u64,
    /// Where the time went, for verified results (from the fastest agreeing miner).
    /// Left out of the bytes when absent, so older readers see the same message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<TaskTiming>,
}

/// A verified task's path through the pipeline, in Unix µs. Stages: ingress (submit →
/// `accepted_us`), capacity wait (→ `dispatched_us`), dispatch (→ `received_us`), worker
/// queue (→ `started_us`), inference (→ `finished_us`), outcome hand-off (→ `outcome_stored_us`),
/// verification (→ `decided_us`), delivery (→ the client). Worker stamps come from the
/// worker's clock: across machines they carry its clock skew.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskTiming {
    pub accepted_us: u64,
    pub dispatched_us: u64,
    pub received_us: u64,
    pub started_us: u64,
    pub finished_us: u64,
    pub outcome_stored_us: u64,
    pub decided_us: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum ResultStatus {
    /// `agreeing` of the `k` miners produced outputs equal to these under the model's rule.
    Verified {
        #[serde(deserialize_with = "crate::bounded::tensors")]
        outputs: Vec<Tensor>,
        agreeing: u8,
        k: u8,
    },
    Failed {
        code: FailureCode,
        reason: String,
    },
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The miners' outcomes had no majority; the evidence is in the DEAD stream.
    NoConsensus,
    /// The deadline passed before the task could run.
    Expired,
}

/// How one miner stood in a task's decision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Standing {
    /// In the winning group.
    Agreed,
    /// Returned outputs outside the winning group (or there was no winner).
    Disagreed,
    /// Reported a failure.
    Failed,
    /// Never returned anything in time.
    Missing,
    /// Answered after its assignment's deadline (`Ticket::answer_by_ms`, judged by when
    /// OUTCOMES stored the answer): not counted in the vote and earns nothing; the
    /// replica went to another miner.
    Late,
}

impl Standing {
    pub const ALL: [Standing; 5] =
        [Standing::Agreed, Standing::Disagreed, Standing::Failed, Standing::Missing, Standing::Late];

    /// As serialised: `agreed`, `disagreed`, `failed`, `missing`, `late`.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Agreed => "agreed",
            Standing::Disagreed => "disagreed",
            Standing::Failed => "failed",
            Standing::Missing => "missing",
            Standing::Late => "late",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MinerVerdict {
    pub worker: String,
    /// The worker's operator, as its signed ticket names it (empty in older verdicts: the
    /// worker was its own operator). Trust and quarantine also count per operator.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operator: String,
    pub replica: u8,
    pub attempt: u16,
    pub standing: Standing,
    /// Assignment sent → outcome stored, on validator clocks; `None` when missing.
    pub latency_us: Option<u64>,
}

impl MinerVerdict {
    /// The operator this miner counts under (its own id when none was named).
    pub fn operator(&self) -> &str {
        if self.operator.is_empty() { &self.worker } else { &self.operator }
    }
}

/// Verifier → rewarder and auditors (stream VERDICTS, subject `sundara.verdict.<task>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Verdict {
    pub v: u16,
    pub task_id: String,
    pub tenant: String,
    pub model: ModelRef,
    pub k: u8,
    pub rule: CompareRule,
    pub accepted: bool,
    pub miners: Vec<MinerVerdict>,
    pub decided_at_ms: u64,
    /// Whether the verifier ran the task itself, and what that showed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceCheck>,
}

impl Verdict {
    /// Whether the miners were judged against the verifier's own run (an audit or an
    /// escalation), so a disagreeing miner is proven wrong, not merely outvoted.
    pub fn judged_by_reference(&self) -> bool {
        matches!(
            self.reference,
            Some(ReferenceCheck::AuditPassed | ReferenceCheck::AuditFailed | ReferenceCheck::Escalated)
        )
    }
}

/// A run of a task on the verifier's own reference runtime (CPU ONNX Runtime).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "check", rename_all = "snake_case")]
pub enum ReferenceCheck {
    /// A sampled audit: the miners' accepted outputs matched the reference.
    AuditPassed,
    /// A sampled audit: the miners' majority (or sole miner) did not match the reference;
    /// its members were judged against the reference instead, and the client got outputs
    /// that match it.
    AuditFailed,
    /// No majority among the miners: the reference decided which of them were right.
    Escalated,
    /// The reference could not run; the miners' vote stood alone.
    Unavailable { reason: String },
}

impl ReferenceCheck {
    /// Its wire name (`check`), also the metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            ReferenceCheck::AuditPassed => "audit_passed",
            ReferenceCheck::AuditFailed => "audit_failed",
            ReferenceCheck::Escalated => "escalated",
            ReferenceCheck::Unavailable { .. } => "unavailable",
        }
    }
}

/// One miner's share of one task, as the rewarder scored it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RewardEntry {
    pub worker: String,
    pub standing: Standing,
    pub latency_us: Option<u64>,
    /// 1 = fastest among the agreeing miners; `None` when not agreeing.
    pub rank: Option<u32>,
    pub score: f64,
}

/// Rewarder's per-task trace (stream REWARDS, subject `sundara.reward.task.<task>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RewardTrace {
    pub v: u16,
    pub task_id: String,
    /// Sequence of the verdict in VERDICTS this trace was computed from.
    pub verdict_seq: u64,
    pub epoch: u64,
    pub entries: Vec<RewardEntry>,
}

/// The traces of one rewarder flush, in verdict order (stream REWARDS, subject
/// `sundara.reward.traces.<first verdict seq>`): one message for many tasks, where a
/// message per task cost two NATS messages per task. A rewarder that restarts before
/// storing its ledger scores the same verdicts again and may store their traces twice, in
/// other groupings; they are the same traces, and readers keep one per verdict sequence.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RewardTraces {
    pub v: u16,
    pub traces: Vec<RewardTrace>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MinerWeight {
    pub miner: String,
    /// Bittensor's u16 weight; all weights of an epoch sum to 65535.
    pub weight: u16,
    /// The moving score the weight was normalised from.
    pub score: f64,
}

/// Normalised weights at the close of an epoch (subject `sundara.reward.epoch`, KV `rewards`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EpochWeights {
    pub v: u16,
    pub epoch: u64,
    pub closed_at_ms: u64,
    pub weights: Vec<MinerWeight>,
    /// Miners weighed 0 because they were quarantined when the epoch closed (by the
    /// rewarder on proof, or by the scheduler for timeouts), in id order. With the reward
    /// traces, this is all a replay needs to recompute every weight. Absent in older
    /// messages, which quarantined no one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<String>,
}

/// A task that could not be verified, with all evidence (stream DEAD, subject `sundara.dead.<task>`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DeadLetter {
    pub v: u16,
    pub task_id: String,
    pub tenant: String,
    pub model: ModelRef,
    pub reason: String,
    /// Every outcome of the task, each with its ticket (worker, attempt) and result: the
    /// task's history. Empty for a task that expired before any dispatch.
    pub evidence: Vec<Outcome>,
    pub dead_at_ms: u64,
    /// Sequence of the task in TASKS, to read it back (resubmission).
    #[serde(default)]
    pub task_seq: u64,
}

/// Autoscaler → one worker: a core NATS request on `sundara.control.<worker>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ControlRequest {
    pub v: u16,
    pub command: Control,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Load (and warm up) the model on the slice now, ahead of its tasks.
    Preload { model: ModelRef, slice: String },
}

/// Worker → autoscaler: whether the command was carried out, and if not why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ControlReply {
    pub v: u16,
    pub ok: bool,
    #[serde(default)]
    pub reason: String,
}

/// One capacity unit a worker offers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SliceAnnounce {
    pub id: String,
    pub device: String,
    pub slots: u32,
    /// Models it serves (loaded now or on first need).
    pub models: Vec<String>,
    /// `Some(why)` when out of service: it then leaves the candidate sets.
    pub failed: Option<String>,
    pub memory_total: u64,
    pub memory_free: u64,
    /// `name@version` of each model loaded (and warmed up) there now, with the bytes its
    /// sessions hold.
    pub loaded: Vec<(String, u64)>,
    /// Measured bytes of one session, per `name@version`.
    pub footprints: Vec<(String, u64)>,
    pub loads: u64,
    pub evictions: u64,
    /// Inferences it runs at once.
    pub lanes: u32,
    /// Measured inference time per task (µs) of each model loaded there now, by name.
    pub service_us: Vec<(String, u64)>,
    /// Measured time to load and warm up each model (µs), by name.
    pub load_us: Vec<(String, u64)>,
}

/// What a worker reports on start and on every heartbeat (see [`FleetUpdate::Announce`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WorkerAnnounce {
    pub worker: String,
    pub operator: String,
    pub slices: Vec<SliceAnnounce>,
}

/// Worker → the validator's fleet gateway (in the scheduler): a core NATS request on
/// [`crate::subjects::report`]`(worker)`. Workers never reach Redis themselves; the gateway
/// checks that the update is about the subject's worker (which NATS permissions tie to
/// the miner's credentials) and applies it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FleetRequest {
    pub v: u16,
    pub update: FleetUpdate,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FleetUpdate {
    /// The worker's slices and their state; `fresh` on start. Also its heartbeat.
    Announce { announce: WorkerAnnounce, fresh: bool, heartbeat_ttl_ms: u64 },
    /// Stop offering `model` on `slice` (it cannot hold it).
    Withdraw { slice: String, model: String },
    /// Take `slice` out of service; its assignments are reassigned.
    FailSlice { slice: String, reason: String },
    /// Give an assignment back for reassignment without an outcome.
    HandBack { assignment_id: String },
}

/// Gateway → worker: whether the update was applied, and if not why. An applied
/// announcement of a quarantined worker says so in `reason` (`quarantined: <why>`).
pub type FleetReply = ControlReply;

macro_rules! versioned {
    ($($t:ty),*) => {$(
        impl Versioned for $t {
            fn version(&self) -> u16 { self.v }
        }
    )*};
}
/// Calls macro `$m!` with every top-level message type of this module (with the wire
/// version; `ModelMeta`, stored in KV, is versioned in `model.rs`): one list for the
/// `Versioned` impls and for whatever must cover every message (the fuzz checks).
#[macro_export]
macro_rules! with_messages {
    ($m:ident) => {
        $m!(
            FleetRequest,
            SubmitRequest,
            SubmitReply,
            Task,
            Assignment,
            Assignments,
            Outcome,
            ClientResult,
            Verdict,
            RewardTrace,
            RewardTraces,
            EpochWeights,
            DeadLetter,
            ControlRequest,
            ControlReply,
            JobRequest,
            JobReply
        );
    };
}
use crate::jobs::{JobReply, JobRequest};
with_messages!(versioned);
