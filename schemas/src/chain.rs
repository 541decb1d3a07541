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

/// The subnet's rules for setting weights, as the chain reports them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubnetRules {
    /// The current block.
    pub block: u64,
    /// Weights go out as a timelocked commit the chain reveals itself (plain `set_weights`
    /// fails with `CommitRevealEnabled`).
    pub commit_reveal: bool,
    /// Blocks between two weight settings of one validator (`WeightsSetRateLimit`).
    pub weights_rate_limit: u64,
    /// The lowest `version_key` the subnet accepts (`WeightsVersionKey`).
    pub weights_version: u64,
}

/// How weights were sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsMode {
    /// `set_weights`: public at once.
    Plain,
    /// `commit_timelocked_weights`: revealed by the chain after the reveal period.
    CommitReveal,
}

/// The chain's answer to a weight setting, by kind (the bridge maps the chain's errors).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WeightsOutcome {
    /// Included in a block.
    Included { block: u64 },
    /// Too soon after the last one: try again after `retry_after_blocks`.
    RateLimited { retry_after_blocks: u64 },
    /// Plain weights on a subnet with commit-reveal on (or the reverse).
    CommitRevealMismatch { commit_reveal: bool },
    /// The version key is below the subnet's.
    VersionKeyTooLow { required: u64 },
    /// The validator's hotkey has no validator permit (or too little stake).
    NoPermit,
    /// The chain or the bridge failed; worth trying again later.
    Unavailable { message: String },
}

/// One epoch's weights as sent to the chain, and what came of it: kept beside the reward
/// trace (KV `rewards`, `chain.weights.<epoch>`) so anyone can check them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightsSubmission {
    pub epoch: u64,
    pub netuid: u16,
    pub uids: Vec<u16>,
    pub weights: Vec<u16>,
    pub version_key: u64,
    pub mode: WeightsMode,
    /// Miners of the epoch's weights that are no registered hotkey: they get nothing.
    pub unregistered: Vec<String>,
    /// Each try, in order, with the block it was made at.
    pub attempts: Vec<(u64, WeightsOutcome)>,
}

impl WeightsSubmission {
    /// The block the weights were included at, if they were.
    pub fn included_at(&self) -> Option<u64> {
        self.attempts.iter().find_map(|(_, o)| match o {
            WeightsOutcome::Included { block } => Some(*block),
            _ => None,
        })
    }
}
