//! Sundara on Bittensor: miners are registered hotkeys, operators are their coldkeys.
//!
//! - [`keys`]: sr25519 hotkeys as Substrate makes them, SS58 addresses, wallet files.
//! - [`btauth`]: btauth/1, the hotkey-signed request Bittensor 11 subnets authenticate with.
//! - [`callout`]: nats-server's auth callout claims, so that a hotkey's proof lets a miner in.
//! - [`metagraph`]: the subnet's neurons, checked, and what changed between two reads.
//! - [`weights`]: epoch weights mapped to uids, and what to do after each answer of the chain.

pub mod btauth;
pub mod callout;
pub mod keys;
pub mod metagraph;
pub mod weights;

pub use btauth::{BtAuthError, Signed, Verifier};
pub use keys::{AccountId, Hotkey, KeyError};
