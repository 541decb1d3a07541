//! Server-side batch jobs: what a tenant asks of the jobs service and what it answers
//! (docs/jobs.md §3). A request goes to [`crate::subjects::jobs`]`(tenant, op)`; the
//! tenant is the subject's, so credentials that may publish only there act only on their
//! own jobs.

use serde::{Deserialize, Serialize};

use crate::Tensor;

/// Tenant → jobs service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobRequest {
    pub v: u16,
    pub op: JobOp,
}

impl JobRequest {
    pub fn new(op: JobOp) -> JobRequest {
        JobRequest { v: crate::WIRE_VERSION, op }
    }
}

/// What a tenant can ask of its jobs. A job's inputs arrive in parts (each within one
/// message), so a job may be larger than any message: `Create` names how many parts
/// follow, each `Put` carries one, `Start` runs the job once every part is stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum JobOp {
    Create(JobSpec),
    Put {
        job_id: String,
        /// Below the `parts` of its `Create`; the parts' rows follow each other in order.
        part: u32,
        #[serde(deserialize_with = "crate::bounded::tensors")]
        inputs: Vec<Tensor>,
    },
    Start {
        job_id: String,
    },
    Show {
        job_id: String,
    },
    /// The tenant's jobs, newest first (at most 100). A struct variant, as every op: each
    /// is a one-key map on the wire.
    List {},
    /// Stops submitting the job's shards; those verified stay fetchable.
    Cancel {
        job_id: String,
    },
    /// One verified shard's outputs.
    Fetch {
        job_id: String,
        shard: u32,
    },
}

/// How a job is cut and run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobSpec {
    /// Registered model name, or `name@version`.
    pub model: String,
    /// Parts of inputs that will follow (at least 1).
    pub parts: u32,
    /// Rows per shard task (a shard never spans two parts).
    pub shard_rows: u64,
    /// Shard tasks submitted and not yet ended, at most.
    pub in_flight: u32,
    /// Submissions of one shard, at most (the first included).
    pub attempts: u32,
    /// How long each shard task has to be verified.
    pub shard_timeout_ms: u64,
    /// How long the whole job may take, from `Create`; the service caps it.
    pub deadline_ms: u64,
}

/// Jobs service → tenant.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobReply {
    pub v: u16,
    pub answer: JobAnswer,
}

impl JobReply {
    pub fn new(answer: JobAnswer) -> JobReply {
        JobReply { v: crate::WIRE_VERSION, answer }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub enum JobAnswer {
    /// The job as it stands after the request (`Create`, `Put`, `Start`, `Show`, `Cancel`).
    Status(JobStatus),
    List(Vec<JobStatus>),
    /// A verified shard's outputs: its rows are the job's rows `first_row..first_row + rows`.
    Outputs {
        shard: u32,
        first_row: u64,
        task_id: String,
        outputs: Vec<Tensor>,
    },
    Refused {
        code: JobRefusal,
        reason: String,
    },
}

/// Why a job request was refused.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum JobRefusal {
    /// No job of this tenant has that id (another tenant's job is not found either).
    NotFound,
    /// Malformed or inconsistent request: bad sizes, parts that do not line up.
    BadRequest,
    /// The model is not registered.
    UnknownModel,
    /// The job is not in a state that allows it (a part after `Start`, a fetch of a shard
    /// not verified yet).
    WrongState,
    /// Over a limit of the service: bytes, parts, shards.
    TooLarge,
    /// The tenant has as many unfinished jobs as it may.
    TooManyJobs,
    /// The service could not store or read the job; try again.
    Unavailable,
}

/// Where a job is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Created; parts are arriving.
    Uploading,
    /// Shards are being submitted and verified.
    Running,
    /// Every shard verified.
    Done,
    /// A shard failed every attempt, or was refused for good.
    Failed,
    Cancelled,
    /// The deadline passed first.
    Expired,
}

impl JobState {
    /// Whether the job will change no more.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled | JobState::Expired)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Uploading => "uploading",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }
}

/// A job as its tenant sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobStatus {
    pub job_id: String,
    pub model: String,
    pub state: JobState,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms past which the job expires.
    pub deadline_ms: u64,
    /// Parts stored, of `parts`.
    pub parts_stored: u32,
    pub parts: u32,
    /// Rows of the parts stored.
    pub rows: u64,
    pub shards: u32,
    pub queued: u32,
    pub running: u32,
    pub verified: u32,
    /// Shards submitted again after an unverified end.
    pub retried: u32,
    /// Shards `0..verified_prefix` are all verified: what can be read in order.
    pub verified_prefix: u32,
    /// Expected ms to the last shard, at the rate shards were verified so far.
    pub eta_ms: Option<u64>,
    /// Why it failed, was cancelled or expired.
    pub reason: Option<String>,
    /// While running: why no shard is being submitted now, as ingress said (the tenant's
    /// limits: `storage_quota: …`, `rate_limited: …`); the job carries on once they allow.
    #[serde(default)]
    pub waiting: Option<String>,
}
