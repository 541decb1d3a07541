//! Sundara's wire contract: every message that crosses NATS, the tensor encoding,
//! subject names and size limits. Nothing else in the workspace defines wire types.
//!
//! Encoding: MessagePack with named fields (`rmp_serde::to_vec_named`), so fields can be
//! added without breaking older readers. Tensors are raw little-endian bytes plus dtype
//! and shape. Every top-level message carries `v` = [`WIRE_VERSION`].

pub mod bounded;
pub mod codec;
pub mod messages;
pub mod model;
pub mod subjects;
pub mod tensor;
pub mod ticket;

pub use codec::{DecodeError, decode, encode};
pub use messages::*;
pub use model::{
    Batching, CompareRule, DEFAULT_AUDIT_RATE, MAX_REDUNDANCY, ModelMeta, ModelRef, Policy, PolicyError, TensorSpec,
};
pub use tensor::{DType, Limits, Tensor, TensorError};
pub use ticket::{Ticket, assignment_of_outcome_id};

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
