//! The metagraph as the validator reads it: checked on arrival, and compared with the last
//! one so that what changed on chain changes the fleet (a hotkey gone loses its work; a
//! hotkey registered again, or a new hotkey on an old uid, starts without history).

use std::collections::{BTreeMap, BTreeSet};

use sundara_schemas::chain::{Metagraph, Neuron};

use crate::keys::AccountId;

/// Most neurons a subnet holds (Bittensor's `MaxAllowedUids` is at most 4096).
pub const MAX_NEURONS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MetagraphError {
    #[error("not a metagraph: {0}")]
    Json(#[from] serde_json::Error),
    #[error("uid {uid}: {field} {value:?} is not an SS58 address")]
    Address { uid: u16, field: &'static str, value: String },
    #[error("uid {0} appears twice")]
    DuplicateUid(u16),
    #[error("hotkey {0} appears twice")]
    DuplicateHotkey(String),
    #[error("{0} neurons, more than a subnet holds ({MAX_NEURONS})")]
    TooMany(usize),
    #[error("block {new} is older than the block already held ({held})")]
    Older { held: u64, new: u64 },
}

/// Reads and checks a metagraph: every key a valid SS58 address, uids and hotkeys unique.
pub fn parse(text: &str) -> Result<Metagraph, MetagraphError> {
    let m: Metagraph = serde_json::from_str(text)?;
    check(&m)?;
    Ok(m)
}

pub fn check(m: &Metagraph) -> Result<(), MetagraphError> {
    if m.neurons.len() > MAX_NEURONS {
        return Err(MetagraphError::TooMany(m.neurons.len()));
    }
    let (mut uids, mut hotkeys) = (BTreeSet::new(), BTreeSet::new());
    for n in &m.neurons {
        for (field, value) in [("hotkey", &n.hotkey), ("coldkey", &n.coldkey)] {
            if AccountId::from_ss58(value).is_err() {
                return Err(MetagraphError::Address { uid: n.uid, field, value: value.clone() });
            }
        }
        if !uids.insert(n.uid) {
            return Err(MetagraphError::DuplicateUid(n.uid));
        }
        if !hotkeys.insert(n.hotkey.as_str()) {
            return Err(MetagraphError::DuplicateHotkey(n.hotkey.clone()));
        }
    }
    Ok(())
}

/// What changed from one metagraph to the next, per hotkey.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Hotkeys new on the subnet.
    pub registered: Vec<String>,
    /// Hotkeys no longer on it: they get no work, and their workers are declared dead.
    pub deregistered: Vec<String>,
    /// Hotkeys still on it but registered again since (a later registration block): what
    /// the fleet knew of them (trust, strikes, quarantine) is forgotten.
    pub reregistered: Vec<String>,
    /// Uids now held by another hotkey: (uid, the old hotkey, the new one). The new one is
    /// among `registered`, and starts without the old one's history (history is kept per
    /// hotkey, never per uid).
    pub taken_over: Vec<(u16, String, String)>,
}

impl Changes {
    /// The hotkeys whose history the fleet must forget.
    pub fn reset(&self) -> impl Iterator<Item = &String> {
        self.deregistered.iter().chain(&self.reregistered)
    }
}

/// What changed from `old` (none on the first read) to `new`; refuses a `new` older than
/// `old` (a lagging chain endpoint must not undo what was seen).
pub fn changes(old: Option<&Metagraph>, new: &Metagraph) -> Result<Changes, MetagraphError> {
    let Some(old) = old else {
        return Ok(Changes {
            registered: new.neurons.iter().map(|n| n.hotkey.clone()).collect(),
            ..Changes::default()
        });
    };
    if new.block < old.block {
        return Err(MetagraphError::Older { held: old.block, new: new.block });
    }
    let by_hotkey =
        |m: &Metagraph| m.neurons.iter().map(|n| (n.hotkey.clone(), n.clone())).collect::<BTreeMap<_, Neuron>>();
    let (before, after) = (by_hotkey(old), by_hotkey(new));
    let mut c = Changes::default();
    for (hotkey, n) in &after {
        match before.get(hotkey) {
            None => c.registered.push(hotkey.clone()),
            Some(was) if was.registered_at_block != n.registered_at_block => c.reregistered.push(hotkey.clone()),
            Some(_) => {}
        }
    }
    c.deregistered = before.keys().filter(|h| !after.contains_key(*h)).cloned().collect();
    let old_uids: BTreeMap<u16, &str> = old.neurons.iter().map(|n| (n.uid, n.hotkey.as_str())).collect();
    for n in &new.neurons {
        if let Some(was) = old_uids.get(&n.uid)
            && *was != n.hotkey
        {
            c.taken_over.push((n.uid, was.to_string(), n.hotkey.clone()));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Hotkey;

    fn ss58(uri: &str) -> String {
        Hotkey::dev(uri).unwrap().account.to_ss58()
    }

    fn neuron(uid: u16, hot: &str, cold: &str, block: u64) -> Neuron {
        Neuron {
            uid,
            hotkey: ss58(hot),
            coldkey: ss58(cold),
            stake: 0.0,
            validator_permit: false,
            registered_at_block: block,
        }
    }

    fn graph(block: u64, neurons: Vec<Neuron>) -> Metagraph {
        Metagraph { netuid: 7, block, neurons }
    }

    #[test]
    fn a_metagraph_with_bad_or_repeated_keys_is_refused() {
        let ok = graph(1, vec![neuron(0, "//A", "//C", 1), neuron(1, "//B", "//C", 1)]);
        check(&ok).unwrap();
        let mut bad = ok.clone();
        bad.neurons[1].coldkey = "5Fake".into();
        assert!(matches!(check(&bad), Err(MetagraphError::Address { uid: 1, field: "coldkey", .. })));
        let mut twice = ok.clone();
        twice.neurons[1].uid = 0;
        assert!(matches!(check(&twice), Err(MetagraphError::DuplicateUid(0))));
        let mut same = ok.clone();
        same.neurons[1].hotkey = same.neurons[0].hotkey.clone();
        assert!(matches!(check(&same), Err(MetagraphError::DuplicateHotkey(_))));
        assert!(parse(&serde_json::to_string(&ok).unwrap()).is_ok());
    }

    #[test]
    fn deregistration_reregistration_and_takeover_are_told_apart() {
        let old =
            graph(100, vec![neuron(0, "//A", "//C", 10), neuron(1, "//B", "//C", 20), neuron(2, "//D", "//E", 30)]);
        // A stays; B's uid goes to F; D registered again at a later block.
        let new =
            graph(200, vec![neuron(0, "//A", "//C", 10), neuron(1, "//F", "//G", 150), neuron(2, "//D", "//E", 160)]);
        let c = changes(Some(&old), &new).unwrap();
        assert_eq!(c.registered, vec![ss58("//F")]);
        assert_eq!(c.deregistered, vec![ss58("//B")]);
        assert_eq!(c.reregistered, vec![ss58("//D")]);
        assert_eq!(c.taken_over, vec![(1, ss58("//B"), ss58("//F"))]);
        let mut reset: Vec<_> = c.reset().cloned().collect();
        reset.sort();
        let mut want = vec![ss58("//B"), ss58("//D")];
        want.sort();
        assert_eq!(reset, want);
        // Nothing changed: nothing to do.
        assert_eq!(changes(Some(&new), &new).unwrap(), Changes::default());
        // An endpoint behind the one read before cannot undo it.
        assert!(matches!(changes(Some(&new), &old), Err(MetagraphError::Older { held: 200, new: 100 })));
        // The first read registers everyone.
        assert_eq!(changes(None, &old).unwrap().registered.len(), 3);
    }
}
