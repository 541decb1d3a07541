//! The fleet gateway: workers' reports (capacity, heartbeats, hand-backs) reach Redis only
//! through here. Miners are strangers, so they hold no Redis credentials; each report
//! arrives on `sundara.report.<worker>`, which NATS permissions let only that worker's
//! credentials publish to, and the gateway applies it only if it is about that worker.
//! The scheduler and the autoscaler both serve it (one queue group), so heartbeats keep
//! arriving while either restarts: the autoscaler declares dead only silent workers.

use std::sync::Arc;

use crate::{Capacity, Error as CommonError, Shutdown, js_err};
use futures::StreamExt;
use sundara_schemas::{FleetReply, FleetRequest, FleetUpdate, WIRE_VERSION, decode, encode, subjects as subj};

/// Most slices one worker may announce, and models per slice: bounds what one report
/// can make the gateway write.
pub const MAX_SLICES: usize = 64;
pub const MAX_MODELS_PER_SLICE: usize = 1024;
/// Reports that are bigger than this are refused undecoded.
pub const MAX_REPORT_BYTES: usize = 1 << 20;

/// Whether `update` is one `worker` may make, as far as the update itself tells: every
/// slice it names is one of the worker's (`<worker>-<name>`) and the sizes are bounded.
/// Pure; [`Gateway::apply`] also checks Redis' owner of each slice.
pub fn check(worker: &str, update: &FleetUpdate) -> Result<(), String> {
    let own_slice = |slice: &str| {
        if subj::is_token(slice) && slice.strip_prefix(worker).is_some_and(|rest| rest.starts_with('-')) {
            Ok(())
        } else {
            Err(format!("slice {slice:?} is not one of worker {worker}'s"))
        }
    };
    match update {
        FleetUpdate::Announce { announce, .. } => {
            if announce.worker != worker {
                return Err(format!("worker {worker} cannot announce worker {:?}", announce.worker));
            }
            if announce.operator.is_empty() || announce.operator.len() > 128 {
                return Err(format!("operator {:?}: 1 to 128 bytes", announce.operator));
            }
            if announce.slices.len() > MAX_SLICES {
                return Err(format!("{} slices, over the limit of {MAX_SLICES}", announce.slices.len()));
            }
            for s in &announce.slices {
                own_slice(&s.id)?;
                let named = s.models.len().max(s.loaded.len()).max(s.footprints.len());
                if named > MAX_MODELS_PER_SLICE {
                    return Err(format!("slice {} names {named} models, over {MAX_MODELS_PER_SLICE}", s.id));
                }
            }
            Ok(())
        }
        FleetUpdate::Withdraw { slice, .. } | FleetUpdate::FailSlice { slice, .. } => own_slice(slice),
        FleetUpdate::HandBack { assignment_id } => {
            // `<task>.<replica>.<attempt>`: tokens and dots only, so it cannot name another key.
            let ok =
                !assignment_id.is_empty() && assignment_id.len() <= 200 && assignment_id.split('.').all(subj::is_token);
            if ok { Ok(()) } else { Err(format!("malformed assignment id {assignment_id:?}")) }
        }
    }
}

/// Applies checked reports to Redis.
pub struct Gateway {
    pub capacity: Capacity,
    /// The OUTCOMES stream: a hand-back of an assignment its worker already answered is
    /// refused (the outcome may be stored before the scheduler has released its slot).
    pub outcomes: async_nats::jetstream::stream::Stream,
}

impl Gateway {
    pub async fn open(capacity: Capacity, js: &async_nats::jetstream::Context) -> Result<Gateway, CommonError> {
        let outcomes = js.get_stream(subj::OUTCOMES_STREAM).await.map_err(js_err)?;
        Ok(Gateway { capacity, outcomes })
    }

    /// Whether `worker` has an outcome stored for the task of assignment `aid` (a worker
    /// holds at most one replica of a task, so it is this assignment's).
    async fn answered(&self, worker: &str, aid: &str) -> bool {
        let task = aid.split('.').next().unwrap_or_default();
        self.outcomes.direct_get_last_for_subject(subj::outcome(task, worker)).await.is_ok()
    }
}

impl Gateway {
    /// Decodes, checks and applies one report from `subject`.
    pub async fn handle(&self, subject: &str, payload: &[u8]) -> Result<(), String> {
        let worker = subj::report_worker(subject).ok_or_else(|| format!("no worker in subject {subject:?}"))?;
        let request: FleetRequest = decode(payload, MAX_REPORT_BYTES).map_err(|e| e.to_string())?;
        check(worker, &request.update)?;
        self.apply(worker, &request.update).await.map_err(|e| e.to_string())
    }

    async fn apply(&self, worker: &str, update: &FleetUpdate) -> Result<(), ApplyError> {
        let c = &self.capacity;
        match update {
            FleetUpdate::Announce { announce, fresh, heartbeat_ttl_ms } => {
                let slices: Vec<&str> = announce.slices.iter().map(|s| s.id.as_str()).collect();
                self.owned(worker, &slices).await?;
                self.same_operator(worker, &announce.operator).await?;
                c.announce(announce, *fresh, (*heartbeat_ttl_ms).clamp(100, 60_000)).await?;
            }
            FleetUpdate::Withdraw { slice, model } => {
                self.owned(worker, &[slice]).await?;
                c.withdraw(slice, model).await?;
            }
            FleetUpdate::FailSlice { slice, reason } => {
                self.owned(worker, &[slice]).await?;
                let reason: String = reason.chars().take(512).collect();
                c.fail_slice(slice, worker, &reason).await?;
            }
            FleetUpdate::HandBack { assignment_id } => {
                if self.answered(worker, assignment_id).await || !c.hand_back(assignment_id, worker).await? {
                    return Err(ApplyError::NotHeld { assignment: assignment_id.clone() });
                }
            }
        }
        Ok(())
    }

    /// The operator is the unit of collusion (two replicas of a task never go to one
    /// operator), so a worker cannot change the operator it first announced: one that
    /// could would join another operator's tasks by claiming a new name before each
    /// reassignment. This is the seam for an operator identity the miner does not state
    /// at all (the chain's coldkey of its hotkey): the first claim stands until then.
    async fn same_operator(&self, worker: &str, claimed: &str) -> Result<(), ApplyError> {
        match self.capacity.operator_of(worker).await? {
            Some(first) if !first.is_empty() && first != claimed => {
                Err(ApplyError::OperatorChanged { first, claimed: claimed.to_string() })
            }
            _ => Ok(()),
        }
    }

    /// Refuses slices Redis knows as another worker's (a name may pass [`check`] and still
    /// be another's: `a-gpu-0` is a slice of both `a` and `a-gpu`).
    async fn owned(&self, worker: &str, slices: &[&str]) -> Result<(), ApplyError> {
        for &slice in slices {
            if let Some(owner) = self.capacity.slice_owner(slice).await?
                && owner != worker
            {
                return Err(ApplyError::NotOwned { slice: slice.to_string(), owner });
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Redis(#[from] CommonError),
    #[error("slice {slice} belongs to worker {owner}")]
    NotOwned { slice: String, owner: String },
    #[error("assignment {assignment} is not a live assignment of this worker")]
    NotHeld { assignment: String },
    #[error("the worker was announced with operator {first:?} and cannot become {claimed:?}")]
    OperatorChanged { first: String, claimed: String },
}

/// Serves `sundara.report.*` (in queue group `sundara-gateway`, shared by every scheduler
/// and autoscaler replica) until `shutdown`.
pub async fn serve(
    client: async_nats::Client,
    gateway: Arc<Gateway>,
    shutdown: Shutdown,
    concurrency: usize,
) -> Result<(), CommonError> {
    let reports = client.queue_subscribe(subj::REPORT_ALL, "sundara-gateway".into()).await.map_err(js_err)?;
    // Each report's future owns what it uses, so the service future stays `Send`.
    reports
        .take_until(shutdown.cancelled())
        .for_each_concurrent(concurrency, |msg| {
            let (client, gateway) = (client.clone(), gateway.clone());
            async move {
                let applied = gateway.handle(&msg.subject, &msg.payload).await;
                if let Err(reason) = &applied {
                    tracing::warn!(subject = %msg.subject, %reason, "fleet report refused");
                    metrics::counter!("sundara_gateway_refused_total").increment(1);
                }
                let reply =
                    FleetReply { v: WIRE_VERSION, ok: applied.is_ok(), reason: applied.err().unwrap_or_default() };
                if let Some(to) = msg.reply
                    && let Err(e) = client.publish(to, encode(&reply).into()).await
                {
                    tracing::warn!(error = %e, "fleet report reply failed");
                }
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::WorkerAnnounce;

    /// A worker's announce with these slices.
    fn announce(worker: &str, slices: &[&str]) -> WorkerAnnounce {
        WorkerAnnounce {
            worker: worker.into(),
            operator: worker.into(),
            slices: slices
                .iter()
                .map(|id| sundara_schemas::SliceAnnounce { id: id.to_string(), ..Default::default() })
                .collect(),
        }
    }

    fn announce_update(worker: &str, slices: &[&str]) -> FleetUpdate {
        FleetUpdate::Announce { announce: announce(worker, slices), fresh: false, heartbeat_ttl_ms: 2000 }
    }

    #[test]
    fn a_worker_reports_only_about_itself() {
        assert_eq!(check("m1", &announce_update("m1", &["m1-cpu", "m1-gpu0"])), Ok(()));
        assert!(check("m1", &announce_update("m2", &["m2-cpu"])).is_err(), "another worker");
        assert!(check("m1", &announce_update("m1", &["m2-cpu"])).is_err(), "another worker's slice");
        assert!(check("m1", &announce_update("m1", &["m1cpu"])).is_err(), "no separator");
        assert!(check("m1", &announce_update("m1", &["m1-a.b"])).is_err(), "not a token");
        let FleetUpdate::Announce { mut announce, .. } = announce_update("m1", &["m1-cpu"]) else { unreachable!() };
        announce.operator.clear();
        let nameless = FleetUpdate::Announce { announce, fresh: false, heartbeat_ttl_ms: 2000 };
        assert!(check("m1", &nameless).is_err(), "no operator");
        let fail = |slice: &str| FleetUpdate::FailSlice { slice: slice.into(), reason: String::new() };
        assert_eq!(check("m1", &fail("m1-cpu")), Ok(()));
        assert!(check("m1", &fail("m2-cpu")).is_err());
        let withdraw = FleetUpdate::Withdraw { slice: "m2-cpu".into(), model: "mlp".into() };
        assert!(check("m1", &withdraw).is_err());
    }

    #[test]
    fn reports_are_bounded() {
        let many: Vec<String> = (0..=MAX_SLICES).map(|i| format!("m1-{i}")).collect();
        let ids: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check("m1", &announce_update("m1", &ids)).is_err());
        let hand_back = |aid: &str| FleetUpdate::HandBack { assignment_id: aid.into() };
        assert_eq!(check("m1", &hand_back("0192abc.0.1")), Ok(()));
        for bad in ["", "a..b", "a.*", "x y", &"a".repeat(201)] {
            assert!(check("m1", &hand_back(bad)).is_err(), "{bad:?}");
        }
    }
}
