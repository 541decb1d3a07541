//! `sundara jobs`: batch jobs held by the jobs service (docs/jobs.md §3): submit, follow,
//! list, show, cancel, read results; and the jobs' lines of `sundara status`.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use sundara_jobs::client::{JobOptions, JobsClient, JobsClientError};
use sundara_schemas::{JobState, JobStatus, MAX_MESSAGE_BYTES, subjects as subj};

#[derive(Debug, thiserror::Error)]
pub enum JobsCommandError {
    #[error(transparent)]
    Jobs(#[from] JobsClientError),
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error(transparent)]
    Inputs(#[from] Box<crate::InputsError>),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// What `sundara jobs submit` runs.
pub struct SubmitCommand {
    pub options: JobOptions,
    /// JSON inputs with every row; generated (`rows` rows) when absent.
    pub input: Option<PathBuf>,
    pub rows: u64,
    pub tenant: String,
    /// Follow the job to its end (and write `out`, if given).
    pub wait: bool,
    pub out: Option<PathBuf>,
}

/// One line per job: id, state, model, shards verified/total, rows, age or reason.
pub fn status_line(s: &JobStatus) -> String {
    let mut line = format!(
        "{}  {:<9} {:<16} shards {}/{} (running {}, retried {})  rows {}",
        s.job_id,
        s.state.as_str(),
        s.model,
        s.verified,
        s.shards,
        s.running,
        s.retried,
        s.rows
    );
    if s.state == JobState::Uploading {
        line.push_str(&format!("  parts {}/{}", s.parts_stored, s.parts));
    }
    if let Some(eta) = s.eta_ms {
        line.push_str(&format!("  eta {:.1} s", eta as f64 / 1000.0));
    }
    if let Some(reason) = &s.reason {
        line.push_str(&format!("  ({reason})"));
    }
    if let Some(waiting) = &s.waiting {
        line.push_str(&format!("  waiting: {waiting}"));
    }
    line
}

/// `sundara jobs submit`.
pub async fn submit(
    nats: &sundara_common::nats::NatsEndpoint,
    command: SubmitCommand,
) -> Result<String, JobsCommandError> {
    let SubmitCommand { options, input, rows, tenant, wait, out } = command;
    let connection = sundara_common::nats::connect(nats, "sundara-jobs-client").await?;
    let inputs = crate::command_inputs(&connection, &options.model, input.as_deref(), rows).await.map_err(Box::new)?;
    let jobs = JobsClient::new(connection, &tenant);
    let status = jobs.submit(inputs, &options).await?;
    let mut report = format!("job {} started: {} rows in {} shards\n", status.job_id, status.rows, status.shards);
    if wait {
        report.push_str(&results(&jobs, &status.job_id, out).await?);
    }
    Ok(report)
}

/// `sundara jobs results`: follows the job to its end, progress on stderr; with `out`, the
/// outputs stacked in the rows' order.
pub async fn results(jobs: &JobsClient, job_id: &str, out: Option<PathBuf>) -> Result<String, JobsCommandError> {
    let started = std::time::Instant::now();
    let followed = jobs
        .results(job_id, Duration::from_secs(300), |s| {
            let waiting = s.waiting.as_deref().map_or(String::new(), |w| format!(" waiting: {w}"));
            eprint!(
                "\rshards verified {}/{} (running {}, retried {}){waiting}   ",
                s.verified, s.shards, s.running, s.retried
            );
        })
        .await;
    eprintln!();
    let (status, _, outputs) = followed?;
    let mut report = format!(
        "job {} done: {} shards verified in {:.1} s ({} retried)\n",
        status.job_id,
        status.shards,
        started.elapsed().as_secs_f64(),
        status.retried
    );
    for t in &outputs {
        report.push_str(&format!("  {} {}{:?}\n", t.name, t.dtype, t.shape));
    }
    if let Some(path) = out {
        crate::submit::write_outputs(&path, &outputs)
            .map_err(|source| JobsCommandError::Write { path: path.display().to_string(), source })?;
        report.push_str(&format!("outputs written to {}\n", path.display()));
    }
    Ok(report)
}

/// `sundara status`'s jobs lines: unfinished jobs by state, their shards queued, running
/// and verified, retried in all; then the newest `n` jobs of any tenant.
pub async fn status_lines(js: &jetstream::Context, n: usize) -> Result<Vec<String>, sundara_common::Error> {
    let Ok(kv) = js.get_key_value(subj::JOBS_BUCKET).await else {
        return Ok(vec!["jobs: none (no jobs bucket)".into()]);
    };
    let mut keys = kv.keys().await.map_err(sundara_common::js_err)?;
    let mut records = Vec::new();
    while let Some(Ok(key)) = keys.next().await {
        if let Ok(Some(value)) = kv.get(&key).await
            && let Ok(record) =
                sundara_schemas::codec::decode_unversioned::<sundara_jobs::job::JobRecord>(&value, MAX_MESSAGE_BYTES)
        {
            records.push(record);
        }
    }
    let now = sundara_schemas::now_ms();
    let statuses: Vec<(String, JobStatus)> = records.iter().map(|r| (r.tenant.clone(), r.status(now))).collect();
    let active: Vec<&JobStatus> = statuses.iter().map(|(_, s)| s).filter(|s| !s.state.is_final()).collect();
    let sum = |f: fn(&JobStatus) -> u32| active.iter().map(|s| f(s) as u64).sum::<u64>();
    let mut lines = vec![format!(
        "jobs: {} running, {} uploading, {} kept  shards queued {} running {} verified {} retried {}",
        active.iter().filter(|s| s.state == JobState::Running).count(),
        active.iter().filter(|s| s.state == JobState::Uploading).count(),
        statuses.len(),
        sum(|s| s.queued),
        sum(|s| s.running),
        sum(|s| s.verified),
        sum(|s| s.retried),
    )];
    let mut newest: Vec<&(String, JobStatus)> = statuses.iter().collect();
    newest.sort_by(|a, b| b.1.job_id.cmp(&a.1.job_id));
    for (tenant, s) in newest.into_iter().take(n) {
        lines.push(format!("  {tenant:<12} {}", status_line(s)));
    }
    Ok(lines)
}
