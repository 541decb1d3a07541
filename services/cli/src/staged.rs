//! Models split by layer: a model too large for any slice's memory runs as stages, each
//! a registered model of its own (made by `scripts/split_model.py`: `<name>-s0`,
//! `<name>-s1`, ...), each stage a task verified like any other. The client chains them:
//! a stage's verified outputs are the next stage's inputs, so every activation that
//! crosses from one miner to the next was confirmed by the verifier (k miners' agreement,
//! audits) before it did, and a miner that cheats on a stage is caught in that stage's
//! task. No miner holds more than its stage, and none sees another stage's weights.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use sundara_schemas::{ClientResult, RejectCode, ResultStatus, SubmitOutcome, SubmitRequest, Tensor};

use crate::client::{Client, ClientError};

/// Why a staged run did not finish.
#[derive(Debug, thiserror::Error)]
pub enum StagedError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no stages given")]
    NoStages,
    /// Ingress refused a stage's task (its inputs, the tenant's limits, an unknown stage).
    #[error("stage {stage} ({model}) refused: {code:?}: {reason}")]
    Refused { stage: usize, model: String, code: RejectCode, reason: String },
    /// A stage's task ended without a verified result (no consensus, expired).
    #[error("stage {stage} ({model}) not verified: {status:?}")]
    Unverified { stage: usize, model: String, status: ResultStatus },
    #[error("stage {stage} ({model}) had no result within {timeout:?}")]
    Timeout { stage: usize, model: String, timeout: Duration },
    #[error("the results stream ended during stage {stage}")]
    ResultsEnded { stage: usize },
    #[error(transparent)]
    Inputs(#[from] crate::InputsError),
}

/// A staged run's outcome: the last stage's verified outputs, and each stage's task.
#[derive(Debug)]
pub struct StagedRun {
    pub outputs: Vec<Tensor>,
    /// Per stage, in order: its task id and how many of its k miners agreed.
    pub stages: Vec<(String, u8, u8)>,
}

/// Runs `inputs` through `stages` (registered model names, in order), each stage a task of
/// its own with up to `stage_timeout` to end. A stage's verified outputs are the next
/// stage's inputs, tensor for tensor (the split script makes each stage's outputs exactly
/// the next one's inputs).
pub async fn run(
    client: &Client,
    stages: &[String],
    inputs: Vec<Tensor>,
    stage_timeout: Duration,
) -> Result<StagedRun, StagedError> {
    if stages.is_empty() {
        return Err(StagedError::NoStages);
    }
    // One follower for every stage, opened before the first submission.
    let mut results = client.results().await?;
    let mut carried = inputs;
    let mut done = Vec::with_capacity(stages.len());
    for (stage, model) in stages.iter().enumerate() {
        let req =
            SubmitRequest { timeout_ms: Some(stage_timeout.as_millis() as u64), ..SubmitRequest::new(model, carried) };
        let task_id = match client.submit(&req).await? {
            SubmitOutcome::Accepted { task_id, .. } => task_id,
            SubmitOutcome::Rejected { code, reason } => {
                return Err(StagedError::Refused { stage, model: model.clone(), code, reason });
            }
        };
        let timeout = || StagedError::Timeout { stage, model: model.clone(), timeout: stage_timeout };
        // The task's deadline is the stage timeout; its result (or expiry) follows it
        // shortly, and a little longer is allowed for that.
        let deadline = tokio::time::Instant::now() + stage_timeout + Duration::from_secs(5);
        let result: ClientResult = loop {
            let next = tokio::time::timeout_at(deadline, results.next()).await.map_err(|_| timeout())?;
            match next {
                Some(Ok(r)) if r.task_id == task_id => break r,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(StagedError::ResultsEnded { stage }),
            }
        };
        match result.status {
            ResultStatus::Verified { outputs, agreeing, k } => {
                done.push((task_id, agreeing, k));
                carried = outputs;
            }
            status => return Err(StagedError::Unverified { stage, model: model.clone(), status }),
        }
    }
    Ok(StagedRun { outputs: carried, stages: done })
}

/// What `sundara run-staged` runs.
pub struct StagedOptions {
    pub stages: Vec<String>,
    /// JSON inputs of the first stage; random ones (of `rows` rows) when absent.
    pub input: Option<PathBuf>,
    pub rows: u64,
    pub tenant: String,
    pub timeout_ms: u64,
}

/// `sundara run-staged`: runs the stages and reports each stage's task and the outputs.
pub async fn run_command(
    nats: &sundara_common::nats::NatsEndpoint,
    options: StagedOptions,
) -> Result<String, StagedError> {
    let StagedOptions { stages, input, rows, tenant, timeout_ms } = options;
    let client = Client::connect(nats, &tenant).await?;
    let first = stages.first().ok_or(StagedError::NoStages)?;
    let inputs = crate::command_inputs(&client.nats, first, input.as_deref(), rows).await?;
    let run = run(&client, &stages, inputs, Duration::from_millis(timeout_ms)).await?;
    let mut text = String::new();
    for (stage, (task, agreeing, k)) in stages.iter().zip(&run.stages) {
        text.push_str(&format!("{stage}: task {task} verified by {agreeing}/{k} miners\n"));
    }
    for t in &run.outputs {
        let values = crate::submit::value_texts(t);
        let head: Vec<&str> = values.iter().take(8).map(String::as_str).collect();
        let more = if values.len() > 8 { format!(", … ({} more)", values.len() - 8) } else { String::new() };
        text.push_str(&format!("  {} {}{:?} [{}{more}]\n", t.name, t.dtype, t.shape, head.join(", ")));
    }
    Ok(text)
}
