//! Tasks whose outcomes the verifier refused: how such a task still ends.
//!
//! An outcome whose ticket does not verify (its MAC is not the validator's under this
//! verifier's secret) never reaches a vote. The scheduler has freed its slot all the same
//! (it releases from the outcome's headers), so nothing reassigns the replica. If every
//! outcome of a task is refused (a verifier started on another `SUNDARA_SECRET` than the
//! scheduler's refuses them all), the task would end nowhere: no result, verdict or dead
//! letter. So the verifier remembers such tasks and, at the task's deadline + grace, ends
//! each that has no result by then with a failed result and a dead letter that says why.
//!
//! The ticket of a refused outcome is unverified, so nothing in it is trusted: the task is
//! read back from TASKS at the ticket's sequence and must be the task the ticket names
//! (ingress wrote it), and its tenant, model and deadline are taken from there. A miner
//! forging outcomes can therefore only make the verifier end a real task at its own
//! deadline + grace, when the task had no admitted outcome and no result: a task that
//! would otherwise never have ended.
//!
//! Refused outcomes are held un-acked until then (progress acks keep them), so a verifier
//! restarted with the right secret gets them again and decides the task as usual.

use std::collections::BTreeSet;
use std::time::Instant;

use sundara_schemas::{
    ClientResult, DeadLetter, FailureCode, ModelRef, Outcome, ResultStatus, Task, WIRE_VERSION, now_ms,
};

/// Tasks with refused outcomes tracked at once: beyond this, refused outcomes are dropped
/// at once (bounded memory under a flood of forgeries).
pub const MAX_REFUSED_TASKS: usize = 10_000;

/// A task none of whose outcomes so far could be admitted.
#[derive(Debug)]
pub struct RefusedTask {
    pub task_id: String,
    pub tenant: String,
    pub model: ModelRef,
    /// The task's deadline (Unix ms), from TASKS.
    pub deadline_at_ms: u64,
    pub task_seq: u64,
    /// Workers whose outcome was refused (one held per worker).
    pub workers: BTreeSet<String>,
    /// Why, as the verifier's refusal labels (`forged ticket`).
    pub why: BTreeSet<&'static str>,
    /// The refused outcomes, as evidence for the dead letter.
    pub evidence: Vec<Outcome>,
    pub first_seen: Instant,
}

impl RefusedTask {
    /// A record for `task` (as TASKS holds it, at `task_seq`).
    pub fn of(task: &Task, task_seq: u64) -> RefusedTask {
        RefusedTask {
            task_id: task.task_id.clone(),
            tenant: task.tenant.clone(),
            model: task.model.clone(),
            deadline_at_ms: task.deadline_at_ms,
            task_seq,
            workers: BTreeSet::new(),
            why: BTreeSet::new(),
            evidence: Vec::new(),
            first_seen: Instant::now(),
        }
    }

    /// Adds one refused outcome; `false` (nothing added) if its worker's is held already.
    pub fn add(&mut self, why: &'static str, outcome: Outcome) -> bool {
        if !self.workers.insert(outcome.ticket.worker.clone()) {
            return false;
        }
        self.why.insert(why);
        self.evidence.push(outcome);
        true
    }

    /// Why the task ended without a result from its miners.
    pub fn reason(&self) -> String {
        let why: Vec<&str> = self.why.iter().copied().collect();
        let workers: Vec<&str> = self.workers.iter().map(String::as_str).collect();
        format!(
            "outcomes refused: {} (from {}); no outcome of the task could be admitted by its deadline. \
             Tickets whose MAC does not verify come from a scheduler on another SUNDARA_SECRET than the \
             verifier's (compare the key ids both log at start), or from a miner that forged them",
            why.join(", "),
            workers.join(", ")
        )
    }

    /// The failed result and the dead letter that end the task.
    pub fn conclude(&self) -> (ClientResult, DeadLetter) {
        let now = now_ms();
        let reason = self.reason();
        let result = ClientResult {
            v: WIRE_VERSION,
            task_id: self.task_id.clone(),
            model: self.model.clone(),
            status: ResultStatus::Failed { code: FailureCode::NoConsensus, reason: reason.clone() },
            completed_at_ms: now,
            timing: None,
        };
        let dead = DeadLetter {
            v: WIRE_VERSION,
            task_id: self.task_id.clone(),
            tenant: self.tenant.clone(),
            model: self.model.clone(),
            reason,
            evidence: self.evidence.clone(),
            dead_at_ms: now,
            task_seq: self.task_seq,
        };
        (result, dead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::{OutcomeResult, Ticket, WorkTiming};

    fn task() -> Task {
        Task {
            v: WIRE_VERSION,
            task_id: "t1".into(),
            tenant: "acme".into(),
            model: ModelRef { name: "mlp".into(), version: "1".into() },
            k: 2,
            inputs: vec![],
            seed: 0,
            submitted_at_ms: 1,
            deadline_at_ms: 5_000,
            accepted_at_us: 0,
            priority: Default::default(),
        }
    }

    fn outcome(worker: &str) -> Outcome {
        let ticket = Ticket {
            task_id: "t1".into(),
            // A forger's claims: none of these is used.
            tenant: "victim".into(),
            model: ModelRef { name: "other".into(), version: "9".into() },
            k: 2,
            replica: 0,
            attempt: 0,
            worker: worker.into(),
            operator: String::new(),
            slice: format!("{worker}-cpu0"),
            dispatched_at_us: 0,
            deadline_at_ms: u64::MAX,
            answer_by_ms: 0,
            task_seq: 7,
            key_id: String::new(),
            mac: vec![1; 32],
        };
        Outcome {
            v: WIRE_VERSION,
            ticket,
            result: OutcomeResult::Failed { reason: "x".into() },
            compute_us: 0,
            timing: WorkTiming::default(),
        }
    }

    #[test]
    fn a_refused_task_ends_with_its_reason_and_the_stored_tasks_identity() {
        let mut r = RefusedTask::of(&task(), 7);
        assert!(r.add("forged ticket", outcome("w1")));
        assert!(!r.add("forged ticket", outcome("w1")), "one held per worker");
        assert!(r.add("forged ticket", outcome("w2")));
        let (result, dead) = r.conclude();
        let ResultStatus::Failed { code, reason } = &result.status else { panic!("not failed") };
        assert_eq!(*code, FailureCode::NoConsensus);
        assert!(reason.starts_with("outcomes refused: forged ticket (from w1, w2)"), "{reason}");
        assert!(reason.contains("SUNDARA_SECRET"), "{reason}");
        // What TASKS says, not what the tickets claim.
        assert_eq!((dead.tenant.as_str(), dead.model.name.as_str()), ("acme", "mlp"));
        assert_eq!((dead.task_seq, dead.evidence.len(), r.deadline_at_ms), (7, 2, 5_000));
        assert_eq!(dead.reason, *reason);
    }
}
