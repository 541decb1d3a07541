//! The subnet's metagraph as Sundara keeps it: the snapshot file format (`sundara chain
//! serve --metagraph FILE`, and what the Bittensor bridge prints) and what Redis holds
//! per hotkey.

use serde::{Deserialize, Serialize};

/// One registered neuron.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Neuron {
    pub uid: u16,
    /// Its hotkey's SS58 address: a miner's worker id.
    pub hotkey: String,
    /// Its coldkey's SS58 address: the operator it counts under.
    pub coldkey: String,
    /// Stake in TAO (as the metagraph reports it).
    #[serde(default)]
    pub stake: f64,
    #[serde(default)]
    pub validator_permit: bool,
    /// The block it registered at: a hotkey registered again (at a later block) starts anew.
    pub registered_at_block: u64,
}

/// A subnet's metagraph at one block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metagraph {
    pub netuid: u16,
    /// The block it was read at.
    pub block: u64,
    pub neurons: Vec<Neuron>,
}

impl Metagraph {
    pub fn neuron(&self, hotkey: &str) -> Option<&Neuron> {
        self.neurons.iter().find(|n| n.hotkey == hotkey)
    }
}
