//! Batch jobs split by data, run from the client: many rows of one model's inputs, cut
//! into shard tasks of `shard_rows` rows, each shard a task verified like any other,
//! `in_flight` of them at a time. A shard that ends unverified (no consensus, expired) is
//! submitted again, up to `attempts` times; the verified outputs are put back together in
//! the rows' order. Every row's result comes from a verified task, once.
//!
//! This is the batch job the client drives (docs/jobs.md §2): it ends with its client, and
//! its inputs and outputs travel as task messages. The jobs service holds a job on the
//! validator side instead (`sundara_jobs`, docs/jobs.md §3). [`run_shards`] runs shards
//! that are not rows of one input (the training steps of [`crate::training`]).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use sundara_runtime::batch;
use sundara_schemas::{RejectCode, ResultStatus, SubmitOutcome, SubmitRequest, Tensor};

use crate::client::{Client, ClientError};

/// How a job's shard tasks run.
#[derive(Clone, Debug)]
pub struct ShardOptions {
    pub model: String,
    /// Shard tasks submitted and not yet ended, at most.
    pub in_flight: usize,
    /// Submissions of one shard, at most (the first included).
    pub attempts: u32,
    /// How long each shard task has to be verified.
    pub shard_timeout: Duration,
}

/// How a job is cut and run.
#[derive(Clone, Debug)]
pub struct JobOptions {
    /// Rows per shard task.
    pub shard_rows: u64,
    pub shards: ShardOptions,
}

/// Where a job stands, after each shard that ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobProgress {
    pub shards: usize,
    pub verified: usize,
    /// Shards submitted again after an unverified end, or after a refusal to retry.
    pub retried: usize,
}

/// A finished job: the outputs of every row, in order.
#[derive(Debug)]
pub struct JobOutput {
    pub outputs: Vec<Tensor>,
    /// Per shard, in order, the task whose verified result it took.
    pub tasks: Vec<String>,
    pub progress: JobProgress,
}

/// Every shard of [`run_shards`] verified: each shard's outputs, in the shards' order.
#[derive(Debug)]
pub struct ShardOutputs {
    pub outputs: Vec<Vec<Tensor>>,
    /// Per shard, the task whose verified result it took.
    pub tasks: Vec<String>,
    pub progress: JobProgress,
}

/// Why a job did not finish.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The inputs do not share a first dimension to cut along.
    #[error("the inputs have no common first dimension (rows) to split along")]
    NotSplittable,
    #[error("shard {shard} refused: {code:?}: {reason}")]
    Refused { shard: usize, code: RejectCode, reason: String },
    #[error("shard {shard} not verified after {attempts} attempts: {last}")]
    ShardFailed { shard: usize, attempts: u32, last: String },
    #[error("no shard ended within {0:?}")]
    Stalled(Duration),
    #[error("the results stream ended")]
    ResultsEnded,
    #[error("the verified outputs of the shards do not stack back together")]
    Unassembled,
    #[error(transparent)]
    Inputs(#[from] crate::InputsError),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// How long a job waits to submit again when every shard it has was refused for now.
const REFUSED_PAUSE: Duration = Duration::from_millis(200);

/// Refusals that say "later", not "never": the shard waits and is submitted again.
fn retry_later(code: RejectCode) -> bool {
    matches!(
        code,
        RejectCode::Overloaded | RejectCode::RateLimited | RejectCode::TooManyInFlight | RejectCode::StorageQuota
    )
}

/// Runs `inputs` (every tensor with the same number of rows) as a batch job of `options`,
/// calling `progress` after each shard that ends.
pub async fn run(
    client: &Client,
    inputs: Vec<Tensor>,
    options: &JobOptions,
    progress: impl FnMut(&JobProgress),
) -> Result<JobOutput, JobError> {
    let rows = batch::rows(&inputs).ok_or(JobError::NotSplittable)?;
    if rows == 0 || inputs.iter().any(|t| t.shape.first() != Some(&rows)) {
        return Err(JobError::NotSplittable);
    }
    let step = options.shard_rows.max(1);
    let sizes: Vec<u64> = (0..rows).step_by(step as usize).map(|start| step.min(rows - start)).collect();
    let shards = batch::split(inputs, &sizes).ok_or(JobError::NotSplittable)?;
    let done = run_shards(client, shards, &options.shards, progress).await?;
    let parts: Vec<&[Tensor]> = done.outputs.iter().map(Vec::as_slice).collect();
    if !parts.windows(2).all(|w| batch::compatible(w[0], w[1])) {
        return Err(JobError::Unassembled);
    }
    Ok(JobOutput { outputs: batch::stack(&parts), tasks: done.tasks, progress: done.progress })
}

/// Runs each of `shards` (one task's inputs each) as a verified task of `options.model`,
/// `options.in_flight` at a time, submitting a shard again after an unverified end (up to
/// `options.attempts`) and after a refusal that means "later"; calls `progress` after each
/// shard that ends. Every shard's outputs come from a verified task.
pub async fn run_shards(
    client: &Client,
    shards: Vec<Vec<Tensor>>,
    options: &ShardOptions,
    mut progress: impl FnMut(&JobProgress),
) -> Result<ShardOutputs, JobError> {
    let mut state = JobProgress { shards: shards.len(), ..JobProgress::default() };
    let mut outputs: Vec<Option<Vec<Tensor>>> = vec![None; shards.len()];
    let mut tasks = vec![String::new(); shards.len()];
    let mut attempts = vec![0u32; shards.len()];
    let mut pending: VecDeque<usize> = (0..shards.len()).collect();
    let mut running: HashMap<String, usize> = HashMap::new();
    // Opened before the first submission, so no result is missed.
    let mut results = client.results().await?;
    let stall = options.shard_timeout + Duration::from_secs(10);
    let mut last_end = tokio::time::Instant::now();
    while state.verified < shards.len() {
        while running.len() < options.in_flight.max(1)
            && let Some(shard) = pending.pop_front()
        {
            let req = SubmitRequest {
                timeout_ms: Some(options.shard_timeout.as_millis() as u64),
                ..SubmitRequest::new(&options.model, shards[shard].clone())
            };
            attempts[shard] += 1;
            match client.submit(&req).await? {
                SubmitOutcome::Accepted { task_id, .. } => {
                    running.insert(task_id, shard);
                }
                SubmitOutcome::Rejected { code, .. } if retry_later(code) => {
                    // Tasks in flight (this job's or others') hold what is refused; it is
                    // asked again once a result arrives, or after a pause.
                    attempts[shard] -= 1;
                    pending.push_front(shard);
                    break;
                }
                SubmitOutcome::Rejected { code, reason } => return Err(JobError::Refused { shard, code, reason }),
            }
        }
        if last_end.elapsed() > stall {
            return Err(JobError::Stalled(stall));
        }
        if running.is_empty() {
            tokio::time::sleep(REFUSED_PAUSE).await;
            continue;
        }
        let next = tokio::time::timeout(stall, results.next()).await.map_err(|_| JobError::Stalled(stall))?;
        let result = match next {
            Some(result) => result?,
            None => return Err(JobError::ResultsEnded),
        };
        let Some(shard) = running.remove(&result.task_id) else { continue };
        match result.status {
            ResultStatus::Verified { outputs: got, .. } => {
                outputs[shard] = Some(got);
                tasks[shard] = result.task_id;
                state.verified += 1;
            }
            ResultStatus::Failed { code, reason } if attempts[shard] >= options.attempts.max(1) => {
                let last = format!("{code:?}: {reason}");
                return Err(JobError::ShardFailed { shard, attempts: attempts[shard], last });
            }
            ResultStatus::Failed { .. } => {
                state.retried += 1;
                pending.push_front(shard);
            }
        }
        last_end = tokio::time::Instant::now();
        progress(&state);
    }
    let outputs = outputs.into_iter().map(|o| o.expect("every shard verified")).collect();
    Ok(ShardOutputs { outputs, tasks, progress: state })
}

/// What `sundara job` runs.
pub struct JobCommand {
    pub options: JobOptions,
    /// JSON inputs with every row of the job; generated (`rows` rows) when absent.
    pub input: Option<PathBuf>,
    pub rows: u64,
    pub tenant: String,
    /// Where the outputs go, as `{"outputs": [{"name", "dtype", "shape", "values"}]}`.
    pub out: Option<PathBuf>,
}

/// `sundara job`: runs the job with its progress on stderr; returns the report.
pub async fn run_command(nats: &sundara_common::nats::NatsEndpoint, command: JobCommand) -> Result<String, JobError> {
    let JobCommand { options, input, rows, tenant, out } = command;
    let client = Client::connect(nats, &tenant).await?;
    let inputs = crate::command_inputs(&client.nats, &options.shards.model, input.as_deref(), rows).await?;
    let started = std::time::Instant::now();
    let job = run(&client, inputs, &options, |p| {
        eprint!("\rshards verified {}/{} (retried {})", p.verified, p.shards, p.retried);
    })
    .await;
    eprintln!();
    let job = job?;
    let mut report = format!(
        "{} shards of {} rows verified in {:.1} s ({} retried)\n",
        job.progress.shards,
        options.shard_rows,
        started.elapsed().as_secs_f64(),
        job.progress.retried
    );
    for t in &job.outputs {
        report.push_str(&format!("  {} {}{:?}\n", t.name, t.dtype, t.shape));
    }
    if let Some(path) = out {
        crate::submit::write_outputs(&path, &job.outputs)
            .map_err(|source| JobError::Write { path: path.display().to_string(), source })?;
        report.push_str(&format!("outputs written to {}\n", path.display()));
    }
    Ok(report)
}
