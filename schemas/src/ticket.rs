//! Signed assignment tickets.
//!
//! The scheduler signs each assignment with the validator side's secret (HMAC-SHA256); the
//! worker echoes the ticket in its outcome. The verifier checks the signature, so a miner
//! can neither claim work it was not given nor alter the dispatch time that its reward is
//! measured from — and no per-assignment state has to be looked up to know that.

use std::fmt;
use std::str::FromStr;

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
    /// The key id ([`key_id`]) of the secret that signed it: during a rotation the
    /// verifier checks each ticket with the secret it names, so tickets signed before the
    /// change still verify. Signed like every other field. Empty in tickets from before
    /// key ids: the verifier's current secret.
    #[serde(default)]
    pub key_id: String,
    #[serde(with = "serde_bytes")]
    pub mac: Vec<u8>,
}

/// The key id of a validator secret: the first 8 bytes of
/// SHA-256("sundara key id" ‖ secret), in hex. It names the secret without revealing it.
pub fn key_id(secret: &[u8]) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    h.update(b"sundara key id");
    h.update(secret);
    h.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Ticket {
    /// An unsigned ticket for replica 0, attempt 0 of `task_id` on `worker` (its own
    /// operator, slice `<worker>-cpu0`), model `mlp@1`, k = 1, with no deadline: a
    /// starting point for tests and tools, which set what they need.
    pub fn unsigned(task_id: &str, worker: &str) -> Ticket {
        Ticket {
            task_id: task_id.into(),
            tenant: "default".into(),
            model: ModelRef { name: "mlp".into(), version: "1".into() },
            k: 1,
            replica: 0,
            attempt: 0,
            worker: worker.into(),
            operator: String::new(),
            slice: format!("{worker}-cpu0"),
            dispatched_at_us: 1,
            deadline_at_ms: u64::MAX,
            answer_by_ms: u64::MAX,
            task_seq: 1,
            key_id: String::new(),
            mac: Vec::new(),
        }
    }

    /// The operator this ticket's worker was picked as.
    pub fn operator(&self) -> &str {
        if self.operator.is_empty() { &self.worker } else { &self.operator }
    }

    /// Which dispatch of which replica this ticket is for.
    pub fn assignment(&self) -> AssignmentId {
        AssignmentId { task_id: self.task_id.clone(), replica: self.replica, attempt: self.attempt }
    }

    /// [`Ticket::assignment`] as the string used on the wire and in Redis:
    /// `<task>.<replica>.<attempt>`.
    pub fn assignment_id(&self) -> String {
        self.assignment().to_string()
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
        format!("{}.{ABANDONED_TAG}", self.outcome_id())
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

    /// Signs with `key`, naming it by its key id.
    pub fn sign(&mut self, key: &[u8]) {
        self.key_id = key_id(key);
        self.mac = self.digest(key).finalize().into_bytes().to_vec();
    }

    /// Constant-time check of the signature.
    pub fn verify(&self, key: &[u8]) -> bool {
        self.digest(key).verify_slice(&self.mac).is_ok()
    }
}

/// The last token of the scheduler's `Abandoned` outcome ids ([`Ticket::abandoned_id`]).
pub const ABANDONED_TAG: &str = "abandoned";

/// Id of one dispatch of one replica, `<task>.<replica>.<attempt>` on the wire: unique per
/// dispatch, the key of its reservation and the Nats-Msg-Id of its assignment. Task ids
/// are subject tokens (no dots), so the id splits back unambiguously; [`FromStr`] takes
/// exactly what [`Display`](fmt::Display) writes.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AssignmentId {
    pub task_id: String,
    /// Which of the task's k copies (0..k).
    pub replica: u8,
    /// 0 for the replica's first dispatch, +1 on each reassignment.
    pub attempt: u16,
}

impl AssignmentId {
    pub fn new(task_id: impl Into<String>, replica: u8, attempt: u16) -> AssignmentId {
        AssignmentId { task_id: task_id.into(), replica, attempt }
    }
}

impl fmt::Display for AssignmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.task_id, self.replica, self.attempt)
    }
}

/// A string that is not an [`AssignmentId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed assignment id {0:?} (expected <task>.<replica>.<attempt>)")]
pub struct MalformedAssignmentId(pub String);

impl FromStr for AssignmentId {
    type Err = MalformedAssignmentId;

    fn from_str(s: &str) -> Result<AssignmentId, MalformedAssignmentId> {
        let malformed = || MalformedAssignmentId(s.to_string());
        let mut parts = s.split('.');
        let (Some(task), Some(replica), Some(attempt), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        // Digits only, no leading zeros: the one spelling Display writes.
        let canonical =
            |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n == "0" || !n.starts_with('0'));
        if !crate::subjects::is_token(task) || !canonical(replica) || !canonical(attempt) {
            return Err(malformed());
        }
        let replica = replica.parse().map_err(|_| malformed())?;
        let attempt = attempt.parse().map_err(|_| malformed())?;
        Ok(AssignmentId { task_id: task.to_string(), replica, attempt })
    }
}

/// The assignment that an outcome's Nats-Msg-Id ([`Ticket::outcome_id`]:
/// `<assignment id>.<16 hex digits>`) names, or `None` for anything else (the scheduler's
/// `.abandoned` ids among them). The id is the publisher's claim: whoever uses it must still
/// check that the sender holds the assignment.
pub fn assignment_of_outcome_id(id: &str) -> Option<AssignmentId> {
    let (aid, tag) = id.rsplit_once('.')?;
    let well_formed = tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit());
    if well_formed { aid.parse().ok() } else { None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Ticket {
        Ticket {
            tenant: "default".into(),
            k: 2,
            replica: 1,
            operator: "op1".into(),
            dispatched_at_us: 1000,
            deadline_at_ms: 2000,
            answer_by_ms: 1500,
            task_seq: 7,
            ..Ticket::unsigned("t1", "w1")
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
        assert_eq!(assignment_of_outcome_id(&id), Some(AssignmentId::new("t1", 1, 0)));
        assert_eq!(assignment_of_outcome_id(&t.abandoned_id()), None);
        // Another replica's id differs in its MAC tag, which only its holder is given.
        let mut other = ticket();
        other.replica = 0;
        other.sign(b"secret");
        let guessed = format!("{}.{}", other.assignment_id(), &id[id.len() - 16..]);
        assert_ne!(guessed, other.outcome_id());
        assert_eq!(assignment_of_outcome_id("t1.1"), None);
        assert_eq!(assignment_of_outcome_id("t1.1.0"), None);
        assert_eq!(assignment_of_outcome_id("t1.x.0.0123456789abcdef"), None);
    }

    #[test]
    fn assignment_ids_read_back_what_they_write() {
        let id = AssignmentId::new("0192f0c4-ab", 2, 300);
        assert_eq!(id.to_string(), "0192f0c4-ab.2.300");
        assert_eq!("0192f0c4-ab.2.300".parse(), Ok(id));
        assert_eq!(ticket().assignment(), AssignmentId::new("t1", 1, 0));
        assert_eq!(ticket().assignment_id(), ticket().assignment().to_string());
        for bad in [
            "",
            "t1",
            "t1.1",
            "t1.1.0.0",
            "t.1.x",
            "t.256.0",
            "t.0.65536",
            "t.+1.0",
            "t.01.0",
            "a*.0.0",
            ".0.0",
            "t..0",
        ] {
            assert!(bad.parse::<AssignmentId>().is_err(), "{bad:?}");
        }
        let mut t = ticket();
        t.sign(b"secret");
        assert!(t.abandoned_id().starts_with(&t.outcome_id()));
        assert!(t.abandoned_id().ends_with(".abandoned"));
    }
}
