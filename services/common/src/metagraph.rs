//! The subnet's metagraph where the services read it (Redis), written by `sundara chain
//! serve` after each read of the chain (or of its snapshot file):
//!
//! - `chain:neurons` hash hotkey → the neuron (JSON): who may mine, and the coldkey each
//!   hotkey counts under as its operator;
//! - `chain:status` hash {netuid, block, read_at_ms (when the metagraph held was read),
//!   tried_at_ms, error (why the last read failed, empty when it did not)};
//! - `chain:seen:<hotkey>:<nonce>` one key per btauth/1 proof accepted, for as long as a
//!   replay of it could still be fresh.
//!
//! While `chain:neurons` exists the fleet gateway admits only its hotkeys, each under its
//! coldkey (a worker's stated operator is ignored).

use std::time::Duration;

use redis::AsyncCommands;
use sundara_schemas::chain::{Metagraph, Neuron};

use crate::{Capacity, Error};

const NEURONS: &str = "sundara:chain:neurons";
const STATUS: &str = "sundara:chain:status";

fn seen_key(hotkey: &str, nonce: u64) -> String {
    format!("sundara:chain:seen:{hotkey}:{nonce}")
}

/// What `sundara chain status` shows of the metagraph held.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainStatus {
    pub netuid: Option<u16>,
    pub block: Option<u64>,
    pub neurons: u64,
    /// When the metagraph held was read (Unix ms).
    pub read_at_ms: Option<u64>,
    /// When a read was last tried, and why it failed if it did.
    pub tried_at_ms: Option<u64>,
    pub error: Option<String>,
}

/// A worker's standing with the chain.
#[derive(Clone, Debug, PartialEq)]
pub enum ChainStanding {
    /// No metagraph is held: workers are keyed by hand and state their operator.
    OffChain,
    /// Its id is a hotkey registered on the subnet.
    Registered(Neuron),
    /// A metagraph is held and does not name it.
    NotRegistered,
}

impl Capacity {
    /// Replaces the metagraph held, at once (readers see the old one or the new one).
    pub async fn store_metagraph(&self, m: &Metagraph, read_at_ms: u64) -> Result<(), Error> {
        let mut con = self.con.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().del(NEURONS).ignore();
        let fields: Vec<(String, String)> = m
            .neurons
            .iter()
            .map(|n| (n.hotkey.clone(), serde_json::to_string(n).expect("a neuron serialises")))
            .collect();
        if !fields.is_empty() {
            pipe.hset_multiple(NEURONS, &fields).ignore();
        }
        pipe.hset_multiple(
            STATUS,
            &[
                ("netuid", m.netuid.to_string()),
                ("block", m.block.to_string()),
                ("read_at_ms", read_at_ms.to_string()),
                ("tried_at_ms", read_at_ms.to_string()),
                ("error", String::new()),
            ],
        )
        .ignore();
        pipe.query_async::<()>(&mut con).await?;
        Ok(())
    }

    /// Records a failed read: the metagraph held stays, and its age shows.
    pub async fn metagraph_read_failed(&self, tried_at_ms: u64, error: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        con.hset_multiple::<_, _, _, ()>(STATUS, &[("tried_at_ms", tried_at_ms.to_string()), ("error", error.into())])
            .await?;
        Ok(())
    }

    /// Whether a metagraph is held (the fleet is on chain).
    pub async fn on_chain(&self) -> Result<bool, Error> {
        let mut con = self.con.clone();
        Ok(con.exists(NEURONS).await?)
    }

    /// Where `worker` stands with the chain, in one round trip.
    pub async fn chain_standing(&self, worker: &str) -> Result<ChainStanding, Error> {
        let mut con = self.con.clone();
        let (on, json): (bool, Option<String>) =
            redis::pipe().exists(NEURONS).hget(NEURONS, worker).query_async(&mut con).await?;
        Ok(match (on, json.and_then(|j| serde_json::from_str(&j).ok())) {
            (false, _) => ChainStanding::OffChain,
            (true, Some(neuron)) => ChainStanding::Registered(neuron),
            (true, None) => ChainStanding::NotRegistered,
        })
    }

    /// `hotkey`'s neuron in the metagraph held, if it is registered.
    pub async fn neuron(&self, hotkey: &str) -> Result<Option<Neuron>, Error> {
        let mut con = self.con.clone();
        let json: Option<String> = con.hget(NEURONS, hotkey).await?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Every neuron held.
    pub async fn neurons(&self) -> Result<Vec<Neuron>, Error> {
        let mut con = self.con.clone();
        let all: Vec<String> = con.hvals(NEURONS).await?;
        let mut neurons: Vec<Neuron> = all.iter().filter_map(|j| serde_json::from_str(j).ok()).collect();
        neurons.sort_by_key(|n| n.uid);
        Ok(neurons)
    }

    pub async fn chain_status(&self) -> Result<ChainStatus, Error> {
        let mut con = self.con.clone();
        let h: std::collections::HashMap<String, String> = con.hgetall(STATUS).await?;
        let neurons: u64 = con.hlen(NEURONS).await?;
        let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok());
        Ok(ChainStatus {
            netuid: num("netuid").map(|n| n as u16),
            block: num("block"),
            neurons,
            read_at_ms: num("read_at_ms"),
            tried_at_ms: num("tried_at_ms"),
            error: h.get("error").filter(|e| !e.is_empty()).cloned(),
        })
    }

    /// Records a btauth/1 proof (`hotkey`, `nonce`) as used, for `window`: `false` when it
    /// was used before (a replay).
    pub async fn first_use(&self, hotkey: &str, nonce: u64, window: Duration) -> Result<bool, Error> {
        let mut con = self.con.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(seen_key(hotkey, nonce))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(window.as_millis() as u64)
            .query_async(&mut con)
            .await?;
        Ok(set.is_some())
    }
}
