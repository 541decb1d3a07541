//! Gathering the outcomes of one task: what the verifier holds before it decides. Pure
//! logic, tested without NATS.
//!
//! Every outcome is a miner's claim. The ticket's MAC proves the validator gave that
//! assignment to the worker it names, and [`Gathering::offer`] holds at most one outcome
//! per (replica, attempt) and one replica per worker, so neither a replayed outcome nor a
//! miner that somehow holds two replicas of a task can count twice or grow the verifier's
//! memory.

use std::collections::BTreeMap;
use std::time::Instant;

use sundara_schemas::{Outcome, Ticket};

/// One replica's outcome as the verifier saw it.
pub struct Received {
    pub outcome: Outcome,
    /// Assignment sent → outcome stored, both on validator-side clocks.
    pub latency_us: u64,
    /// When OUTCOMES stored it (Unix µs, validator side).
    pub stored_at_us: u64,
    /// Stored after its assignment's deadline ([`is_late`]).
    pub late: bool,
}

impl Received {
    fn ticket(&self) -> &Ticket {
        &self.outcome.ticket
    }
}

/// Whether an outcome stored at `stored_at_us` came after its assignment's deadline.
pub fn is_late(ticket: &Ticket, stored_at_us: u64) -> bool {
    // 0: a ticket from before assignment deadlines were signed.
    ticket.answer_by_ms != 0 && stored_at_us > ticket.answer_by_ms.saturating_mul(1000)
}

/// What [`Gathering::offer`] did with an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Held: it counts for its replica, or is listed as a late answer.
    Held,
    /// Dropped: an outcome for this (replica, attempt) is held already (a replay, or a
    /// second in-time answer for the replica).
    Duplicate,
    /// Dropped: its worker, or another worker of its operator, already answered another
    /// replica of the task. One operator is one vote, whatever the scheduler did.
    SameOperator,
}

/// Outcomes of one task gathered so far: one per replica (the first, except that an
/// in-time outcome supersedes a late one), and late answers that were superseded or came
/// after their replica had an outcome.
#[derive(Default)]
pub struct Gathering {
    pub replicas: BTreeMap<u8, Received>,
    /// Late answers not counted for their replica; listed in the verdict, earning nothing.
    pub late: Vec<Received>,
    pub first_seen: Option<Instant>,
}

impl Gathering {
    pub fn first_ticket(&self) -> Option<&Ticket> {
        self.replicas.values().chain(&self.late).next().map(Received::ticket)
    }

    pub fn k(&self) -> u8 {
        self.first_ticket().map_or(0, |t| t.k)
    }

    pub fn deadline_at_ms(&self) -> u64 {
        self.first_ticket().map_or(0, |t| t.deadline_at_ms)
    }

    pub fn complete(&self) -> bool {
        self.replicas.len() >= self.k() as usize
    }

    /// Every outcome held (counted and late).
    pub fn held(&self) -> impl Iterator<Item = &Received> {
        self.replicas.values().chain(&self.late)
    }

    /// Takes an outcome (its ticket already verified) into the gathering, or says why not.
    pub fn offer(&mut self, received: Received) -> Offer {
        let t = received.ticket();
        let (replica, attempt, worker, operator) = (t.replica, t.attempt, t.worker.as_str(), t.operator());
        if self.held().any(|r| r.ticket().replica == replica && r.ticket().attempt == attempt) {
            return Offer::Duplicate;
        }
        let same = |r: &Received| r.ticket().worker == worker || r.ticket().operator() == operator;
        if self.held().any(|r| same(r) && r.ticket().replica != replica) {
            return Offer::SameOperator;
        }
        match self.replicas.get(&replica) {
            None => {
                self.replicas.insert(replica, received);
            }
            // The reassigned attempt answered in time: it counts, the late one is listed.
            Some(held) if held.late && !received.late => {
                let superseded = self.replicas.insert(replica, received).expect("present");
                self.late.push(superseded);
            }
            Some(_) if received.late => self.late.push(received),
            Some(_) => return Offer::Duplicate,
        }
        Offer::Held
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sundara_schemas::{ModelRef, OutcomeResult, Tensor, WIRE_VERSION, WorkTiming};

    /// An outcome of replica `replica`, attempt `attempt`, by `worker`, answering `v`.
    pub(crate) fn received(replica: u8, attempt: u16, worker: &str, v: f32, late: bool) -> Received {
        let ticket = Ticket {
            tenant: "tenant".into(),
            model: ModelRef { name: "m".into(), version: "1".into() },
            k: 2,
            replica,
            attempt,
            ..Ticket::unsigned("t1", worker)
        };
        let result = OutcomeResult::Ok { outputs: vec![Tensor::from_values("y", vec![1], &[v])] };
        let outcome = Outcome { v: WIRE_VERSION, ticket, result, compute_us: 0, timing: WorkTiming::default() };
        Received { outcome, latency_us: 10, stored_at_us: 0, late }
    }

    #[test]
    fn one_outcome_per_replica_and_attempt_however_often_it_is_replayed() {
        let mut g = Gathering::default();
        assert_eq!(g.offer(received(0, 0, "a", 1.0, false)), Offer::Held);
        for _ in 0..100 {
            assert_eq!(g.offer(received(0, 0, "a", 9.0, false)), Offer::Duplicate);
            assert_eq!(g.offer(received(0, 0, "a", 9.0, true)), Offer::Duplicate);
        }
        assert_eq!(g.held().count(), 1);
        // A late answer of an earlier attempt is listed once; the in-time one counts.
        let mut g = Gathering::default();
        assert_eq!(g.offer(received(1, 0, "slow", 1.0, true)), Offer::Held);
        assert_eq!(g.offer(received(1, 1, "b", 1.0, false)), Offer::Held);
        assert_eq!(g.offer(received(1, 0, "slow", 1.0, true)), Offer::Duplicate);
        assert_eq!(g.replicas[&1].outcome.ticket.worker, "b");
        assert_eq!(g.late.len(), 1);
        // A second in-time answer for a replica (another attempt) does not replace the first.
        assert_eq!(g.offer(received(1, 2, "c", 5.0, false)), Offer::Duplicate);
        assert_eq!(g.replicas[&1].outcome.ticket.worker, "b");
    }

    #[test]
    fn an_operator_is_one_vote_whatever_it_holds() {
        let mut g = Gathering::default();
        assert_eq!(g.offer(received(0, 0, "a", 1.0, false)), Offer::Held);
        assert_eq!(g.offer(received(1, 1, "a", 1.0, false)), Offer::SameOperator);
        let mut sibling = received(1, 2, "a2", 1.0, false);
        sibling.outcome.ticket.operator = "a".into();
        assert_eq!(g.offer(sibling), Offer::SameOperator, "another name of operator a");
        assert!(!g.complete());
        assert_eq!(g.offer(received(1, 0, "b", 1.0, false)), Offer::Held);
        assert!(g.complete());
    }
}
