//! Signed assignment tickets.
//!
//! The scheduler signs each assignment with the validator side's secret (HMAC-SHA256); the
//! worker echoes the ticket in its outcome. The verifier checks the signature, so a miner
//! can neither claim work it was not given nor alter the dispatch time that its reward is
//! measured from — and no per-assignment state has to be looked up to know that.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::model::ModelRef;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Ticket {
    pub task_id: String,
    pub tenant: String,
    pub model: ModelRef,
    /// Redundancy of the task.
    pub k: u8,
    /// Which of the k copies this is (0..k).
    pub replica: u8,
    /// 0 for the first dispatch of this replica, +1 on each reassignment.
    pub attempt: u16,
    pub worker: String,
    /// The worker's operator when it was picked (the unit of collusion: one operator holds
    /// at most one replica of a task, casts one vote, and shares one trust record). Empty
    /// in tickets from before operators were signed: the worker is then its own operator.
    #[serde(default)]
    pub operator: String,
    /// Redis slice the slot was reserved on.
    pub slice: String,
    pub dispatched_at_us: u64,
    /// The task's deadline (Unix ms).
    pub deadline_at_ms: u64,
    /// This assignment's own deadline (Unix ms): an outcome stored after it is late, the
    /// replica has been (or is about to be) given to another miner, and it earns nothing.
    #[serde(default)]
    pub answer_by_ms: u64,
    /// Sequence of the task in the TASKS stream (to re-read it for reassignment).
    pub task_seq: u64,
    #[serde(with = "serde_bytes")]
    pub mac: Vec<u8>,
}

impl Ticket {
    /// The operator this ticket's worker was picked as.
    pub fn operator(&self) -> &str {
        if self.operator.is_empty() { &self.worker } else { &self.operator }
    }

    /// `<task>.<replica>.<attempt>`: unique per dispatch, the key of its reservation.
    pub fn assignment_id(&self) -> String {
        format!("{}.{}.{}", self.task_id, self.replica, self.attempt)
    }

    /// The Nats-Msg-Id of this assignment's outcome: `<assignment id>.<16 hex digits of
    /// the MAC>`. JetStream drops a second message with the same id as a duplicate, so the
    /// id must be one that only the ticket's holder (and the validator side) can know: a
    /// miner that could name another miner's outcome id in advance could store its own
    /// outcome under it and have the other's dropped. The assignment id alone is guessable;
    /// the MAC is secret until the holder publishes.
    pub fn outcome_id(&self) -> String {
        let tag: String = self.mac.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("{}.{tag}", self.assignment_id())
    }

    /// The Nats-Msg-Id of the scheduler's `Abandoned` outcome for this assignment.
    pub fn abandoned_id(&self) -> String {
        format!("{}.abandoned", self.outcome_id())
    }

    fn digest(&self, key: &[u8]) -> Hmac<Sha256> {
        let unsigned = Ticket { mac: Vec::new(), ..self.clone() };
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(&crate::codec::encode(&unsigned));
        mac
    }

    /// Decodes a ticket stored by the scheduler (bounded like every wire decode).
    pub fn from_bytes(bytes: &[u8]) -> Result<Ticket, crate::DecodeError> {
        crate::codec::decode_unversioned(bytes, 64 << 10)
    }

    pub fn sign(&mut self, key: &[u8]) {
        self.mac = self.digest(key).finalize().into_bytes().to_vec();
    }

    /// Constant-time check of the signature.
    pub fn verify(&self, key: &[u8]) -> bool {
        self.digest(key).verify_slice(&self.mac).is_ok()
    }
}

/// The assignment id that an outcome's Nats-Msg-Id ([`Ticket::outcome_id`]) names, or
/// `None` for anything else (the scheduler's `.abandoned` ids among them). The id is the
/// publisher's claim: whoever uses it must still check that the sender holds the assignment.
pub fn assignment_of_outcome_id(id: &str) -> Option<&str> {
    let (aid, tag) = id.rsplit_once('.')?;
    let well_formed = tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()) && aid.split('.').count() == 3;
    well_formed.then_some(aid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Ticket {
        Ticket {
            task_id: "t1".into(),
            tenant: "default".into(),
            model: ModelRef { name: "mlp".into(), version: "1".into() },
            k: 2,
            replica: 1,
            attempt: 0,
            worker: "w1".into(),
            operator: "op1".into(),
            slice: "w1-cpu0".into(),
            dispatched_at_us: 1000,
            deadline_at_ms: 2000,
            answer_by_ms: 1500,
            task_seq: 7,
            mac: vec![],
        }
    }

    #[test]
    fn signed_ticket_verifies_and_tampering_fails() {
        let mut t = ticket();
        t.sign(b"secret");
        assert!(t.verify(b"secret"));
        assert!(!t.verify(b"other"));
        let mut forged = t.clone();
        forged.dispatched_at_us += 1;
        assert!(!forged.verify(b"secret"));
        let mut extended = t.clone();
        extended.answer_by_ms += 1;
        assert!(!extended.verify(b"secret"));
        let mut stolen = t.clone();
        stolen.worker = "w2".into();
        assert!(!stolen.verify(b"secret"));
        let mut disguised = t.clone();
        disguised.operator = "op2".into();
        assert!(!disguised.verify(b"secret"));
        assert_eq!(t.assignment_id(), "t1.1.0");
    }

    #[test]
    fn outcome_ids_name_the_assignment_and_need_its_mac() {
        let mut t = ticket();
        t.sign(b"secret");
        let id = t.outcome_id();
        assert_eq!(assignment_of_outcome_id(&id), Some("t1.1.0"));
        assert_eq!(assignment_of_outcome_id(&t.abandoned_id()), None);
        // Another replica's id differs in its MAC tag, which only its holder is given.
        let mut other = ticket();
        other.replica = 0;
        other.sign(b"secret");
        let guessed = format!("{}.{}", other.assignment_id(), &id[id.len() - 16..]);
        assert_ne!(guessed, other.outcome_id());
        assert_eq!(assignment_of_outcome_id("t1.1"), None);
        assert_eq!(assignment_of_outcome_id("t1.1.0"), None);
    }
}
