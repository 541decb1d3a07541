//! Sundara on Bittensor: miners are registered hotkeys, operators are their coldkeys.
//!
//! - [`keys`]: sr25519 hotkeys as Substrate makes them, SS58 addresses, wallet files.
//! - [`btauth`]: btauth/1, the hotkey-signed request Bittensor 11 subnets authenticate with.

pub mod btauth;
pub mod keys;

pub use btauth::{BtAuthError, Signed, Verifier};
pub use keys::{AccountId, Hotkey, KeyError};
