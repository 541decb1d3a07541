//! Epoch weights for the chain: the rewarder's weights (per miner, that is per hotkey)
//! mapped to the metagraph's uids, and what to do after each answer of the chain. Plain
//! logic, no I/O: `sundara chain serve` sends what [`plan`] and [`after`] decide.

use std::time::Duration;

use sundara_schemas::EpochWeights;
use sundara_schemas::chain::{Metagraph, SubnetRules, WeightsMode, WeightsOutcome};

/// Weights by uid, for the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UidWeights {
    pub uids: Vec<u16>,
    pub weights: Vec<u16>,
    /// Miners weighed in the epoch that are not registered hotkeys (gone since, or never
    /// on chain): they get nothing.
    pub unregistered: Vec<String>,
}

/// Maps an epoch's weights to uids through `metagraph`: each miner's weight goes to its
/// hotkey's uid; miners not in the metagraph, and zero weights, are left out. In uid order.
pub fn to_uids(epoch: &EpochWeights, metagraph: &Metagraph) -> UidWeights {
    let mut pairs = Vec::new();
    let mut unregistered = Vec::new();
    for w in &epoch.weights {
        match metagraph.neuron(&w.miner) {
            Some(n) if w.weight > 0 => pairs.push((n.uid, w.weight)),
            Some(_) => {}
            None => unregistered.push(w.miner.clone()),
        }
    }
    pairs.sort_unstable();
    UidWeights { uids: pairs.iter().map(|p| p.0).collect(), weights: pairs.iter().map(|p| p.1).collect(), unregistered }
}

/// What to do now about an epoch's weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Send them this way with this version key.
    Send { mode: WeightsMode, version_key: u64 },
    /// Too soon after the last weights this validator set: wait for `block`.
    WaitFor { block: u64 },
    /// Our version key is below the subnet's: the validator must be upgraded (or its
    /// `--version-key` raised); sending would only fail.
    Upgrade { ours: u64, required: u64 },
}

/// What to do about new weights under `rules`, our pinned `version_key` (`None`: the
/// subnet's), and the block our last weights were included at.
pub fn plan(rules: &SubnetRules, version_key: Option<u64>, last_included: Option<u64>) -> Plan {
    if let Some(last) = last_included {
        let next = last + rules.weights_rate_limit;
        if rules.block < next {
            return Plan::WaitFor { block: next };
        }
    }
    let version_key = version_key.unwrap_or(rules.weights_version);
    if version_key < rules.weights_version {
        return Plan::Upgrade { ours: version_key, required: rules.weights_version };
    }
    let mode = if rules.commit_reveal { WeightsMode::CommitReveal } else { WeightsMode::Plain };
    Plan::Send { mode, version_key }
}

/// After the chain answered `outcome` to weights sent in `mode`: done, or what next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    Done,
    /// Send again at once in this mode (the subnet's commit-reveal setting changed).
    SwitchMode(WeightsMode),
    /// Try again at this block.
    WaitFor {
        block: u64,
    },
    /// Try again after this long (the chain or the bridge failed).
    Backoff(Duration),
    /// Give this epoch up: sending again cannot succeed until the validator changes.
    GiveUp,
}

/// What follows `outcome`, the `attempt`-th (from 1) try at `block`.
pub fn after(outcome: &WeightsOutcome, block: u64, attempt: u32) -> Next {
    match outcome {
        WeightsOutcome::Included { .. } => Next::Done,
        WeightsOutcome::RateLimited { retry_after_blocks } => {
            Next::WaitFor { block: block + retry_after_blocks.max(&1) }
        }
        WeightsOutcome::CommitRevealMismatch { commit_reveal: true } => Next::SwitchMode(WeightsMode::CommitReveal),
        WeightsOutcome::CommitRevealMismatch { commit_reveal: false } => Next::SwitchMode(WeightsMode::Plain),
        WeightsOutcome::VersionKeyTooLow { .. } | WeightsOutcome::NoPermit => Next::GiveUp,
        WeightsOutcome::Unavailable { .. } if attempt >= MAX_ATTEMPTS => Next::GiveUp,
        WeightsOutcome::Unavailable { .. } => {
            Next::Backoff((BACKOFF_FIRST * 2u32.saturating_pow(attempt.saturating_sub(1))).min(BACKOFF_MAX))
        }
    }
}

/// Tries of one epoch's weights through chain failures before giving it up (the next
/// epoch's weights replace it anyway).
pub const MAX_ATTEMPTS: u32 = 8;
const BACKOFF_FIRST: Duration = Duration::from_secs(2);
const BACKOFF_MAX: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::MinerWeight;
    use sundara_schemas::chain::Neuron;

    fn rules(block: u64, commit_reveal: bool) -> SubnetRules {
        SubnetRules { block, commit_reveal, weights_rate_limit: 100, weights_version: 5 }
    }

    #[test]
    fn weights_go_to_uids_of_registered_hotkeys_only() {
        let n = |uid, hotkey: &str| Neuron {
            uid,
            hotkey: hotkey.into(),
            coldkey: "c".into(),
            stake: 0.0,
            validator_permit: false,
            registered_at_block: 1,
        };
        let m = Metagraph { netuid: 1, block: 10, neurons: vec![n(3, "a"), n(1, "b"), n(2, "z")] };
        let w = |miner: &str, weight| MinerWeight { miner: miner.into(), weight, score: 0.0 };
        let epoch = EpochWeights {
            v: 1,
            epoch: 4,
            closed_at_ms: 0,
            weights: vec![w("a", 40000), w("b", 20000), w("gone", 5535), w("z", 0)],
            quarantined: vec![],
        };
        let u = to_uids(&epoch, &m);
        assert_eq!((u.uids, u.weights), (vec![1, 3], vec![20000, 40000]));
        assert_eq!(u.unregistered, vec!["gone".to_string()]);
    }

    #[test]
    fn weights_wait_for_the_rate_limit_and_follow_commit_reveal() {
        assert_eq!(plan(&rules(150, true), None, Some(100)), Plan::WaitFor { block: 200 });
        assert_eq!(
            plan(&rules(200, true), None, Some(100)),
            Plan::Send { mode: WeightsMode::CommitReveal, version_key: 5 }
        );
        assert_eq!(plan(&rules(10, false), Some(7), None), Plan::Send { mode: WeightsMode::Plain, version_key: 7 });
        assert_eq!(plan(&rules(10, false), Some(4), None), Plan::Upgrade { ours: 4, required: 5 });
    }

    #[test]
    fn each_answer_of_the_chain_has_its_next_step() {
        assert_eq!(after(&WeightsOutcome::Included { block: 9 }, 9, 1), Next::Done);
        assert_eq!(
            after(&WeightsOutcome::RateLimited { retry_after_blocks: 30 }, 100, 1),
            Next::WaitFor { block: 130 }
        );
        let cr = WeightsOutcome::CommitRevealMismatch { commit_reveal: true };
        assert_eq!(after(&cr, 1, 1), Next::SwitchMode(WeightsMode::CommitReveal));
        assert_eq!(after(&WeightsOutcome::NoPermit, 1, 1), Next::GiveUp);
        assert_eq!(after(&WeightsOutcome::VersionKeyTooLow { required: 9 }, 1, 1), Next::GiveUp);
        let down = WeightsOutcome::Unavailable { message: "ws closed".into() };
        assert_eq!(after(&down, 1, 1), Next::Backoff(Duration::from_secs(2)));
        assert_eq!(after(&down, 1, 3), Next::Backoff(Duration::from_secs(8)));
        assert_eq!(after(&down, 1, 7), Next::Backoff(Duration::from_secs(120)));
        assert_eq!(after(&down, 1, MAX_ATTEMPTS), Next::GiveUp);
    }
}
