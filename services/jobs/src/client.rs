//! A tenant's side of server-side jobs: requests to the jobs service on its own subjects,
//! a job's inputs cut into parts that each fit a message, and its verified shards read
//! back in order while it runs. `sundara jobs`, the HTTP gateway and the tests use it.

use std::time::Duration;

use futures::StreamExt;
use sundara_schemas::{
    DecodeError, JobAnswer, JobOp, JobRefusal, JobReply, JobRequest, JobSpec, JobState, JobStatus, MAX_MESSAGE_BYTES,
    MAX_SUBMISSION_BYTES, Tensor, decode, encode, subjects as subj,
};

/// How long a request waits for the jobs service's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum JobsClientError {
    #[error("refused ({code:?}): {reason}")]
    Refused { code: JobRefusal, reason: String },
    #[error("no answer from the jobs service within {0:?} (is `sundara jobs serve` or `sundara up` running?)")]
    NoAnswer(Duration),
    #[error("job request failed: {0}")]
    Request(String),
    #[error("bad answer from the jobs service: {0}")]
    Reply(#[from] DecodeError),
    #[error("unexpected answer from the jobs service: {0}")]
    Unexpected(String),
    #[error("the inputs have no common first dimension (rows) to split along")]
    NotSplittable,
    #[error("job {job_id} {}: {reason}", state.as_str())]
    Ended { job_id: String, state: JobState, reason: String },
    #[error("job {job_id}: nothing changed within {within:?}")]
    Stalled { job_id: String, within: Duration },
    #[error("the verified shards' outputs do not stack back together")]
    Unassembled,
}

/// One verified shard's outputs: the job's rows `first_row..first_row + rows`.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardOutput {
    pub shard: u32,
    pub first_row: u64,
    pub task_id: String,
    pub outputs: Vec<Tensor>,
}

/// How a job runs; [`JobsClient::submit`] fills in the parts.
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub model: String,
    pub shard_rows: u64,
    pub in_flight: u32,
    pub attempts: u32,
    pub shard_timeout: Duration,
    pub deadline: Duration,
    /// Bytes of inputs per part, at most (one part per request).
    pub part_bytes: usize,
}

impl JobOptions {
    pub fn new(model: &str, shard_rows: u64) -> JobOptions {
        JobOptions {
            model: model.to_string(),
            shard_rows,
            in_flight: 8,
            attempts: 3,
            shard_timeout: Duration::from_secs(60),
            deadline: Duration::from_secs(3600),
            part_bytes: MAX_SUBMISSION_BYTES,
        }
    }
}

/// One tenant's jobs.
#[derive(Clone)]
pub struct JobsClient {
    nats: async_nats::Client,
    tenant: String,
}

impl JobsClient {
    pub fn new(nats: async_nats::Client, tenant: &str) -> JobsClient {
        JobsClient { nats, tenant: tenant.to_string() }
    }

    async fn ask(&self, op: JobOp) -> Result<JobAnswer, JobsClientError> {
        let name = match &op {
            JobOp::Create(_) => "create",
            JobOp::Put { .. } => "put",
            JobOp::Start { .. } => "start",
            JobOp::Show { .. } => "show",
            JobOp::List {} => "list",
            JobOp::Cancel { .. } => "cancel",
            JobOp::Fetch { .. } => "fetch",
        };
        let request = self.nats.request(subj::jobs(&self.tenant, name), encode(&JobRequest::new(op)).into());
        let reply = match tokio::time::timeout(ANSWER_WITHIN, request).await {
            Err(_) => return Err(JobsClientError::NoAnswer(ANSWER_WITHIN)),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(JobsClientError::NoAnswer(Duration::ZERO));
            }
            Ok(Err(e)) => return Err(JobsClientError::Request(e.to_string())),
            Ok(Ok(reply)) => reply,
        };
        match decode::<JobReply>(&reply.payload, MAX_MESSAGE_BYTES)?.answer {
            JobAnswer::Refused { code, reason } => Err(JobsClientError::Refused { code, reason }),
            answer => Ok(answer),
        }
    }

    async fn status(&self, op: JobOp) -> Result<JobStatus, JobsClientError> {
        match self.ask(op).await? {
            JobAnswer::Status(status) => Ok(status),
            other => Err(JobsClientError::Unexpected(format!("{other:?}").chars().take(200).collect())),
        }
    }

    pub async fn create(&self, spec: JobSpec) -> Result<JobStatus, JobsClientError> {
        self.status(JobOp::Create(spec)).await
    }

    pub async fn put(&self, job_id: &str, part: u32, inputs: Vec<Tensor>) -> Result<JobStatus, JobsClientError> {
        self.status(JobOp::Put { job_id: job_id.to_string(), part, inputs }).await
    }

    pub async fn start(&self, job_id: &str) -> Result<JobStatus, JobsClientError> {
        self.status(JobOp::Start { job_id: job_id.to_string() }).await
    }

    pub async fn show(&self, job_id: &str) -> Result<JobStatus, JobsClientError> {
        self.status(JobOp::Show { job_id: job_id.to_string() }).await
    }

    pub async fn cancel(&self, job_id: &str) -> Result<JobStatus, JobsClientError> {
        self.status(JobOp::Cancel { job_id: job_id.to_string() }).await
    }

    /// This tenant's jobs, newest first (at most 100).
    pub async fn list(&self) -> Result<Vec<JobStatus>, JobsClientError> {
        match self.ask(JobOp::List {}).await? {
            JobAnswer::List(jobs) => Ok(jobs),
            other => Err(JobsClientError::Unexpected(format!("{other:?}").chars().take(200).collect())),
        }
    }

    /// A verified shard's outputs.
    pub async fn fetch(&self, job_id: &str, shard: u32) -> Result<ShardOutput, JobsClientError> {
        match self.ask(JobOp::Fetch { job_id: job_id.to_string(), shard }).await? {
            JobAnswer::Outputs { shard, first_row, task_id, outputs } => {
                Ok(ShardOutput { shard, first_row, task_id, outputs })
            }
            other => Err(JobsClientError::Unexpected(format!("{other:?}").chars().take(200).collect())),
        }
    }

    /// Creates a job of `inputs` (every tensor with the same rows), puts them in parts of
    /// at most `options.part_bytes` (whole shards each), and starts it.
    pub async fn submit(&self, inputs: Vec<Tensor>, options: &JobOptions) -> Result<JobStatus, JobsClientError> {
        let parts = cut_parts(inputs, options.shard_rows, options.part_bytes)?;
        let spec = JobSpec {
            model: options.model.clone(),
            parts: parts.len() as u32,
            shard_rows: options.shard_rows,
            in_flight: options.in_flight,
            attempts: options.attempts,
            shard_timeout_ms: options.shard_timeout.as_millis() as u64,
            deadline_ms: options.deadline.as_millis() as u64,
        };
        let job_id = self.create(spec).await?.job_id;
        for (i, part) in parts.into_iter().enumerate() {
            self.put(&job_id, i as u32, part).await?;
        }
        self.start(&job_id).await
    }

    /// Follows `job_id` to its end, handing each verified shard to `on_shard` in the shards'
    /// order as soon as it and those before it are verified (the next is fetched once
    /// `on_shard` returns: a slow reader slows the fetching), and `on_status` every change.
    /// Fails when the job ends other than done (after handing what was verified), or when
    /// nothing changes within `idle`.
    pub async fn follow<F, Fut>(
        &self,
        job_id: &str,
        idle: Duration,
        mut on_status: impl FnMut(&JobStatus),
        mut on_shard: F,
    ) -> Result<JobStatus, JobsClientError>
    where
        F: FnMut(ShardOutput) -> Fut,
        Fut: Future<Output = ()>,
    {
        // Subscribed before the first look, so no change is missed; a missed event costs a
        // second at most (the status is asked again anyway).
        let mut events = self
            .nats
            .subscribe(subj::job_events(&self.tenant, job_id))
            .await
            .map_err(|e| JobsClientError::Request(e.to_string()))?;
        let (mut next, mut last, mut changed) = (0u32, None::<JobStatus>, tokio::time::Instant::now());
        loop {
            // The jobs service restarting (or briefly unreachable) is waited out, up to `idle`.
            let status = match self.show(job_id).await {
                Err(JobsClientError::NoAnswer(_) | JobsClientError::Request(_)) if changed.elapsed() < idle => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                status => status?,
            };
            while next < status.verified_prefix {
                on_shard(self.fetch(job_id, next).await?).await;
                next += 1;
            }
            if last.as_ref() != Some(&status) {
                on_status(&status);
                changed = tokio::time::Instant::now();
            }
            if status.state.is_final() {
                return match status.state {
                    JobState::Done => Ok(status),
                    state => {
                        let reason = status.reason.clone().unwrap_or_default();
                        Err(JobsClientError::Ended { job_id: job_id.to_string(), state, reason })
                    }
                };
            }
            if changed.elapsed() > idle {
                return Err(JobsClientError::Stalled { job_id: job_id.to_string(), within: idle });
            }
            last = Some(status);
            let _ = tokio::time::timeout(Duration::from_secs(1), events.next()).await;
        }
    }

    /// Follows `job_id` to its end and stacks every shard's outputs in the rows' order.
    pub async fn results(
        &self,
        job_id: &str,
        idle: Duration,
        on_status: impl FnMut(&JobStatus),
    ) -> Result<(JobStatus, Vec<ShardOutput>, Vec<Tensor>), JobsClientError> {
        let mut shards = Vec::new();
        let status = self
            .follow(job_id, idle, on_status, |s| {
                shards.push(s);
                std::future::ready(())
            })
            .await?;
        let parts: Vec<&[Tensor]> = shards.iter().map(|s| s.outputs.as_slice()).collect();
        if parts.is_empty() || !parts.windows(2).all(|w| sundara_runtime::batch::compatible(w[0], w[1])) {
            return Err(JobsClientError::Unassembled);
        }
        let outputs = sundara_runtime::batch::stack(&parts);
        Ok((status, shards, outputs))
    }
}

/// Cuts `inputs` into parts of whole shards of `shard_rows` rows, each at most `part_bytes`
/// of tensor data (a part holds one shard at least, whatever its size).
pub fn cut_parts(inputs: Vec<Tensor>, shard_rows: u64, part_bytes: usize) -> Result<Vec<Vec<Tensor>>, JobsClientError> {
    let rows = sundara_runtime::batch::rows(&inputs).ok_or(JobsClientError::NotSplittable)?;
    if rows == 0 || shard_rows == 0 || inputs.iter().any(|t| t.shape.first() != Some(&rows)) {
        return Err(JobsClientError::NotSplittable);
    }
    let row_bytes = inputs.iter().map(|t| t.data.len() as u64 / rows).sum::<u64>().max(1);
    let shards_per_part = (part_bytes as u64 / (row_bytes * shard_rows)).max(1);
    let per_part = shards_per_part * shard_rows;
    let sizes: Vec<u64> = (0..rows).step_by(per_part as usize).map(|start| per_part.min(rows - start)).collect();
    sundara_runtime::batch::split(inputs, &sizes).ok_or(JobsClientError::NotSplittable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::DType;

    fn rows(n: u64) -> Vec<Tensor> {
        let data: Vec<u8> = (0..n * 8).map(|i| i as u8).collect();
        vec![Tensor { name: "x".into(), dtype: DType::F32, shape: vec![n, 2], data }]
    }

    #[test]
    fn parts_hold_whole_shards_within_their_bytes_and_keep_the_rows_in_order() {
        // 8 bytes a row, shards of 10 rows (80 bytes): 3 shards fit in 250 bytes.
        let parts = cut_parts(rows(100), 10, 250).unwrap();
        let sizes: Vec<u64> = parts.iter().map(|p| p[0].shape[0]).collect();
        assert_eq!(sizes, [30, 30, 30, 10]);
        let joined: Vec<u8> = parts.iter().flat_map(|p| p[0].data.clone()).collect();
        assert_eq!(joined, rows(100)[0].data);
        assert_eq!(cut_parts(rows(5), 10, 1).unwrap().len(), 1, "one shard at least per part");
        assert!(matches!(cut_parts(Vec::new(), 10, 1), Err(JobsClientError::NotSplittable)));
    }
}
