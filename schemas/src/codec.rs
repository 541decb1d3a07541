//! Bounded MessagePack encode/decode.

use serde::{Deserialize, Serialize};

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message is {len} bytes, over the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("unsupported wire version {0} (this build speaks {WIRE})", WIRE = crate::WIRE_VERSION)]
    UnsupportedVersion(u16),
}

/// Encodes with named fields. Our types contain only maps, strings, numbers and bytes,
/// for which MessagePack encoding cannot fail.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(msg).expect("MessagePack encoding of a wire type cannot fail")
}

/// Deepest nesting of arrays and maps a message may have (ours nest at most 8 deep).
/// rmp_serde's default, 1024, lets a few KB of hostile bytes overflow a 2 MiB thread stack
/// (debug builds), and make an internally tagged enum, which serde buffers, preallocate
/// 1 MiB per level: 1 GiB in all.
const MAX_DEPTH: usize = 32;

/// Decodes `bytes` after checking the length against `max`. Decoding reads from the slice,
/// so a length the bytes claim but do not hold allocates nothing beyond serde's cautious
/// 1 MiB per open sequence, of which at most `MAX_DEPTH` are open at once.
pub fn decode<'a, T: Deserialize<'a> + Versioned>(bytes: &'a [u8], max: usize) -> Result<T, DecodeError> {
    let msg: T = decode_unversioned(bytes, max)?;
    match msg.version() {
        crate::WIRE_VERSION => Ok(msg),
        other => Err(DecodeError::UnsupportedVersion(other)),
    }
}

/// [`decode`]'s bounds (length, then nesting depth) for records that carry no wire version:
/// stored state such as tickets and the rewarder's ledger.
pub fn decode_unversioned<'a, T: Deserialize<'a>>(bytes: &'a [u8], max: usize) -> Result<T, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge { len: bytes.len(), max });
    }
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// A top-level wire message: it carries the wire version it was written with.
pub trait Versioned {
    fn version(&self) -> u16;
}
