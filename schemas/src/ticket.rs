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
    /// `<task>.<replica>.<attempt>`: unique per dispatch; used as Nats-Msg-Id of outcomes.
    pub fn assignment_id(&self) -> String {
        format!("{}.{}.{}", self.task_id, self.replica, self.attempt)
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
        assert_eq!(t.assignment_id(), "t1.1.0");
    }
}
