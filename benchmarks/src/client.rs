//! The benchmark's clients: one that submits to the pipeline exactly as a user would
//! (request to ingress, result from the tenant's RESULTS subject), and one that asks a bare
//! NATS responder (the transport baseline).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use sundara_schemas::{
    ClientResult, MAX_MESSAGE_BYTES, ResultStatus, SubmitOutcome, SubmitReply, SubmitRequest, TaskTiming, Tensor,
    decode, encode, now_us, subjects as subj,
};
use tokio::sync::oneshot;

use crate::load::Stages;

type Delivered = (ClientResult, u64);

/// A result can arrive before the submit reply that names its task: both orders meet here.
enum Slot {
    Waiting(oneshot::Sender<Delivered>),
    Arrived(Delivered),
}

/// Submits pre-encoded requests and matches results to them by task id.
pub struct PipelineClient {
    nats: async_nats::Client,
    payloads: Vec<bytes::Bytes>,
    /// The tenant's submit subject.
    subject: String,
    slots: Arc<Mutex<HashMap<String, Slot>>>,
    timeout: Duration,
    _results: tokio::task::JoinHandle<()>,
}

impl PipelineClient {
    /// Follows `tenant`'s results from now on, and prepares one request per input set.
    pub async fn start(
        nats: async_nats::Client,
        model: &str,
        tenant: &str,
        inputs: Vec<Vec<Tensor>>,
        timeout: Duration,
    ) -> Result<PipelineClient, sundara::client::ClientError> {
        let mut results = sundara::client::Client::new(nats.clone(), tenant).results().await?;
        let slots: Arc<Mutex<HashMap<String, Slot>>> = Default::default();
        let router = slots.clone();
        let router_task = tokio::spawn(async move {
            while let Some(result) = results.next().await {
                let received_us = now_us();
                let Ok(result) = result else { continue };
                let mut slots = router.lock().expect("slots lock");
                match slots.remove(&result.task_id) {
                    Some(Slot::Waiting(tx)) => {
                        let _ = tx.send((result, received_us));
                    }
                    _ => {
                        slots.insert(result.task_id.clone(), Slot::Arrived((result, received_us)));
                    }
                }
            }
        });
        let payloads = inputs
            .into_iter()
            .map(|inputs| {
                let req =
                    SubmitRequest { timeout_ms: Some(timeout.as_millis() as u64), ..SubmitRequest::new(model, inputs) };
                bytes::Bytes::from(encode(&req))
            })
            .collect();
        let subject = subj::submit(tenant);
        Ok(PipelineClient { nats, subject, payloads, slots, timeout, _results: router_task })
    }

    /// Submits request `n` (round robin over the prepared inputs) and waits for its result.
    pub async fn task(&self, n: u64) -> Result<Stages, String> {
        let sent_us = now_us();
        let payload = self.payloads[n as usize % self.payloads.len()].clone();
        let reply = tokio::time::timeout(self.timeout, self.nats.request(self.subject.clone(), payload))
            .await
            .map_err(|_| "submit timed out".to_string())?
            .map_err(|e| format!("submit: {e}"))?;
        let task_id = match decode::<SubmitReply>(&reply.payload, MAX_MESSAGE_BYTES).map_err(|e| e.to_string())?.outcome
        {
            SubmitOutcome::Accepted { task_id, .. } => task_id,
            SubmitOutcome::Rejected { code, reason } => return Err(format!("rejected ({}): {reason}", code.as_str())),
        };
        let (tx, rx) = oneshot::channel();
        let arrived = {
            let mut slots = self.slots.lock().expect("slots lock");
            match slots.remove(&task_id) {
                Some(Slot::Arrived(d)) => Some(d),
                _ => {
                    slots.insert(task_id.clone(), Slot::Waiting(tx));
                    None
                }
            }
        };
        let (result, received_us) = match arrived {
            Some(d) => d,
            None => match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(d)) => d,
                _ => {
                    self.slots.lock().expect("slots lock").remove(&task_id);
                    return Err(format!("no result for {task_id} within {:?}", self.timeout));
                }
            },
        };
        match result.status {
            ResultStatus::Verified { .. } => Ok(result.timing.map(|t| stages(sent_us, &t, received_us))),
            ResultStatus::Failed { code, reason } => Err(format!("task failed ({code:?}): {reason}")),
        }
    }
}

/// Stage durations of one task (µs), in the order of [`crate::load::STAGES`].
pub fn stages(sent_us: u64, t: &TaskTiming, received_us: u64) -> [u64; 8] {
    [
        t.accepted_us.saturating_sub(sent_us),
        t.dispatched_us.saturating_sub(t.accepted_us),
        t.received_us.saturating_sub(t.dispatched_us),
        t.started_us.saturating_sub(t.received_us),
        t.finished_us.saturating_sub(t.started_us),
        t.outcome_stored_us.saturating_sub(t.finished_us),
        t.decided_us.saturating_sub(t.outcome_stored_us),
        received_us.saturating_sub(t.decided_us),
    ]
}

/// Subject of the bare request/reply baseline.
pub const RESPONDER_SUBJECT: &str = "bench.infer";

/// Asks the bare NATS responder (transport plus compute, no pipeline).
pub struct ResponderClient {
    nats: async_nats::Client,
    payloads: Vec<bytes::Bytes>,
    timeout: Duration,
}

impl ResponderClient {
    pub fn new(nats: async_nats::Client, inputs: Vec<Vec<Tensor>>, timeout: Duration) -> ResponderClient {
        let payloads = inputs.iter().map(|i| bytes::Bytes::from(encode(i))).collect();
        ResponderClient { nats, payloads, timeout }
    }

    pub async fn task(&self, n: u64) -> Result<Stages, String> {
        let payload = self.payloads[n as usize % self.payloads.len()].clone();
        let reply = tokio::time::timeout(self.timeout, self.nats.request(RESPONDER_SUBJECT, payload))
            .await
            .map_err(|_| "request timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let outputs: Result<Vec<Tensor>, String> =
            rmp_serde::from_slice(&reply.payload).map_err(|e| format!("bad reply: {e}"))?;
        outputs.map(|_| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_the_timestamps() {
        let t = TaskTiming {
            accepted_us: 110,
            dispatched_us: 130,
            received_us: 160,
            started_us: 200,
            finished_us: 250,
            outcome_stored_us: 310,
            decided_us: 380,
        };
        assert_eq!(stages(100, &t, 460), [10, 20, 30, 40, 50, 60, 70, 80]);
        // A clock that went backwards gives 0, not a wrap-around.
        assert_eq!(stages(500, &t, 460)[0], 0);
    }
}
