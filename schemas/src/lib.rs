//! Sundara's wire contract: every message that crosses NATS, the tensor encoding,
//! subject names and size limits. Nothing else in the workspace defines wire types.
//!
//! Encoding: MessagePack with named fields (`rmp_serde::to_vec_named`), so fields can be
//! added without breaking older readers. Tensors are raw little-endian bytes plus dtype
//! and shape. Every top-level message carries `v` = [`WIRE_VERSION`].

pub mod bounded;
pub mod chain;
pub mod codec;
pub mod jobs;
pub mod messages;
pub mod model;
pub mod subjects;
pub mod tensor;
pub mod ticket;

pub use codec::{DecodeError, decode, encode};
pub use jobs::{JobAnswer, JobOp, JobRefusal, JobReply, JobRequest, JobSpec, JobState, JobStatus};
pub use messages::*;
pub use model::{
    Batching, CompareRule, DEFAULT_AUDIT_RATE, Lineage, MAX_REDUNDANCY, ModelMeta, ModelRef, Policy, PolicyError,
    TensorSpec,
};
pub use tensor::{DType, Limits, Tensor, TensorError};
pub use ticket::{ABANDONED_TAG, AssignmentId, MalformedAssignmentId, Ticket, assignment_of_outcome_id};

/// Largest message any service decodes (tensors above NATS' max_payload never arrive anyway).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Largest submission ingress accepts (4 MiB): the one place this limit is set. Ingress and
/// the default tenant limits use it, and every nats-server Sundara starts or ships a
/// config for must carry at least [`NATS_MAX_PAYLOAD`] (`tests/deployment.rs` checks
/// `infra/`), so that a submission ingress would accept is never refused by the server.
pub const MAX_SUBMISSION_BYTES: usize = 4 << 20;

/// nats-server's `max_payload` for a Sundara deployment: twice the largest submission (8 MiB),
/// so that the assignment carrying a submission's inputs with its ticket, and outcomes of
/// the same order, fit too.
pub const NATS_MAX_PAYLOAD: usize = 2 * MAX_SUBMISSION_BYTES;

/// Version of every top-level message; readers reject other versions.
pub const WIRE_VERSION: u16 = 1;

/// Microseconds since the Unix epoch (dispatch and outcome times, for latency).
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Milliseconds since the Unix epoch (the wall clock every timestamp on the wire uses).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A wire timestamp (milliseconds since the Unix epoch) as RFC 3339 UTC, to the second:
/// `2026-12-06T02:42:35Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm, proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest / 60 % 60, rest % 60)
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn wire_times_read_as_dates() {
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339_ms(1_796_530_955_999), "2026-12-06T04:22:35Z");
        assert_eq!(super::rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
