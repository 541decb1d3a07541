//! `sundara tasks dead`: the dead-letter stream (tasks that could not be verified, or
//! expired before dispatch, each with its history), and resubmitting one of them.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use sundara_common::js_err;
use sundara_schemas::{
    DeadLetter, MAX_MESSAGE_BYTES, OutcomeResult, SubmitOutcome, SubmitRequest, Task, decode, subjects as subj,
};

use crate::client::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum TasksError {
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Decode(#[from] sundara_schemas::DecodeError),
    #[error("no dead letter for task {0}")]
    NotDead(String),
    #[error("task {task} is no longer in TASKS (sequence {seq}): {reason}")]
    Gone { task: String, seq: u64, reason: String },
    #[error("resubmission rejected ({code}): {reason}")]
    Rejected { code: &'static str, reason: String },
}

/// The newest `limit` dead letters, oldest first.
pub async fn dead_letters(js: &jetstream::Context, limit: usize) -> Result<Vec<DeadLetter>, TasksError> {
    let mut stream = js.get_stream(subj::DEAD_STREAM).await.map_err(js_err)?;
    let state = stream.info().await.map_err(js_err)?.state.clone();
    if state.messages == 0 || limit == 0 {
        return Ok(Vec::new());
    }
    // A letter and its task's copy are two messages: the last 2 × limit hold the last
    // `limit` letters.
    let start = state.last_sequence.saturating_sub(2 * limit as u64 - 1).max(state.first_sequence);
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subj::DEAD_ALL.to_string(),
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: start },
            ..Default::default()
        })
        .await
        .map_err(js_err)?;
    let mut messages = consumer.messages().await.map_err(js_err)?;
    let mut letters = Vec::new();
    while let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
        let m = next.map_err(js_err)?;
        letters.push(decode::<DeadLetter>(&m.payload, MAX_MESSAGE_BYTES)?);
        if m.info().map(|i| i.pending).unwrap_or(0) == 0 {
            break;
        }
    }
    let extra = letters.len().saturating_sub(limit);
    letters.drain(..extra);
    Ok(letters)
}

/// A task's history in one line per outcome: who ran which attempt, and what came back.
pub fn describe(letter: &DeadLetter) -> String {
    let mut out = format!(
        "{}  tenant {}  model {}  dead at {} ({})\n  reason: {}\n",
        letter.task_id,
        letter.tenant,
        letter.model,
        sundara_schemas::rfc3339_ms(letter.dead_at_ms),
        age_text(sundara_schemas::now_ms().saturating_sub(letter.dead_at_ms)),
        letter.reason
    );
    if letter.evidence.is_empty() {
        out.push_str("  never dispatched\n");
    }
    for o in &letter.evidence {
        let what = match &o.result {
            OutcomeResult::Ok { outputs } => format!("outputs ({} tensors)", outputs.len()),
            OutcomeResult::Failed { reason } => format!("failed: {reason}"),
            OutcomeResult::Abandoned { reason } => format!("abandoned: {reason}"),
        };
        let t = &o.ticket;
        out.push_str(&format!("  replica {} attempt {} on {}: {what}\n", t.replica, t.attempt, t.worker));
    }
    out
}

/// `42 s ago`, `7 min ago`, `3 h ago`, `2 d ago`.
pub fn age_text(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s} s ago"),
        60..3600 => format!("{} min ago", s / 60),
        3600..86_400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// Submits a dead task again, as new work with the same model version, inputs, seed, tenant,
/// priority and timeout (read back from the copy DEAD keeps, or TASKS). Idempotent: resubmitting the same dead
/// task twice yields the same new task. Returns the new task id.
/// Submits on the original tenant's subject, which needs the operator's (validator's)
/// credentials on `js`.
pub async fn resubmit(js: &jetstream::Context, task_id: &str) -> Result<String, TasksError> {
    let dead = js.get_stream(subj::DEAD_STREAM).await.map_err(js_err)?;
    let letter = dead
        .direct_get_last_for_subject(subj::dead(task_id))
        .await
        .map_err(|_| TasksError::NotDead(task_id.to_string()))?;
    let letter: DeadLetter = decode(&letter.payload, MAX_MESSAGE_BYTES)?;
    let gone = |reason: String| TasksError::Gone { task: task_id.to_string(), seq: letter.task_seq, reason };
    // The copy kept beside the letter; TASKS itself for a letter written before copies were.
    let raw = match dead.direct_get_last_for_subject(subj::dead_task(task_id)).await {
        Ok(copy) => copy.payload,
        Err(_) => {
            let tasks = js.get_stream(subj::TASKS_STREAM).await.map_err(js_err)?;
            tasks.get_raw_message(letter.task_seq).await.map_err(|e| gone(e.to_string()))?.payload
        }
    };
    let task: Task = decode(&raw, MAX_MESSAGE_BYTES)?;
    if task.task_id != task_id {
        return Err(gone(format!("that sequence holds task {}", task.task_id)));
    }
    let request = SubmitRequest {
        request_id: Some(format!("resubmit-{task_id}")),
        seed: task.seed,
        timeout_ms: Some(task.deadline_at_ms.saturating_sub(task.submitted_at_ms)),
        priority: task.priority,
        // The version it ran as: published versions never change (docs/operations.md).
        ..SubmitRequest::new(&task.model.to_string(), task.inputs)
    };
    match Client::new(js.client(), &task.tenant).submit(&request).await? {
        SubmitOutcome::Accepted { task_id, .. } => Ok(task_id),
        SubmitOutcome::Rejected { code, reason } => Err(TasksError::Rejected { code: code.as_str(), reason }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_read_as_ages() {
        assert_eq!(super::age_text(59_999), "59 s ago");
        assert_eq!(super::age_text(7 * 60_000), "7 min ago");
        assert_eq!(super::age_text(50 * 3_600_000), "2 d ago");
    }
}
