//! The chain bridge: a command that talks to the subnet for the validator, one request per
//! run. `<bridge> <op>` reads a JSON request on stdin and writes one JSON answer on stdout:
//!
//! - `rules` `{netuid}` → [`SubnetRules`] (the block and the weight-setting rules);
//! - `metagraph` `{netuid}` → [`Metagraph`];
//! - `set-weights` `{netuid, uids, weights, version_key, mode}` → [`WeightsOutcome`].
//!
//! `scripts/bittensor_bridge.py` is the bridge on the official Python SDK (`bittensor`);
//! `testkit/chain_double.py` is the tests' chain double, which speaks the same protocol.
//! A bridge that fails, hangs past its deadline or answers nonsense is an error here, and
//! the caller treats it as the chain being unavailable.

use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sundara_schemas::chain::{Metagraph, SubnetRules, WeightsMode, WeightsOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest a bridge may take to answer (a weight setting waits for its block's inclusion).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read (a metagraph of 4096 neurons is well under it).
const MAX_ANSWER_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("running the bridge `{command}`: {reason}")]
    Spawn { command: String, reason: String },
    #[error("the bridge took longer than {0:?}")]
    Timeout(Duration),
    #[error("the bridge failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("the bridge's answer to {op} is not one: {reason}")]
    Answer { op: &'static str, reason: String },
}

/// A bridge command (run with `sh -c`, the op appended).
#[derive(Clone, Debug)]
pub struct Bridge {
    pub command: String,
    pub timeout: Duration,
}

#[derive(Serialize)]
struct Netuid {
    netuid: u16,
}

/// A weight setting, as the bridge receives it.
#[derive(Clone, Debug, Serialize)]
pub struct SetWeights<'a> {
    pub netuid: u16,
    pub uids: &'a [u16],
    pub weights: &'a [u16],
    pub version_key: u64,
    pub mode: WeightsMode,
}

impl Bridge {
    pub fn new(command: impl Into<String>) -> Bridge {
        Bridge { command: command.into(), timeout: DEFAULT_TIMEOUT }
    }

    pub async fn rules(&self, netuid: u16) -> Result<SubnetRules, BridgeError> {
        self.call("rules", &Netuid { netuid }).await
    }

    pub async fn metagraph(&self, netuid: u16) -> Result<Metagraph, BridgeError> {
        self.call("metagraph", &Netuid { netuid }).await
    }

    pub async fn set_weights(&self, request: &SetWeights<'_>) -> Result<WeightsOutcome, BridgeError> {
        self.call("set-weights", request).await
    }

    async fn call<T: DeserializeOwned>(&self, op: &'static str, request: &impl Serialize) -> Result<T, BridgeError> {
        let spawn_error =
            |e: std::io::Error| BridgeError::Spawn { command: self.command.clone(), reason: e.to_string() };
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{} {op}", self.command))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let body = serde_json::to_vec(request).expect("requests serialise");
        let mut stdin = child.stdin.take().expect("piped");
        let (mut stdout, mut stderr) = (child.stdout.take().expect("piped"), child.stderr.take().expect("piped"));
        let run = async {
            stdin.write_all(&body).await?;
            drop(stdin);
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (mut out_limited, mut err_limited) =
                ((&mut stdout).take(MAX_ANSWER_BYTES), (&mut stderr).take(64 << 10));
            let (a, b) = tokio::join!(out_limited.read_to_end(&mut out), err_limited.read_to_end(&mut err));
            a?;
            b?;
            Ok::<_, std::io::Error>((child.wait().await?, out, err))
        };
        let (status, out, err) = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| BridgeError::Timeout(self.timeout))?
            .map_err(spawn_error)?;
        if !status.success() {
            let stderr = String::from_utf8_lossy(&err).trim().chars().rev().take(2000).collect::<String>();
            return Err(BridgeError::Failed { status: status.to_string(), stderr: stderr.chars().rev().collect() });
        }
        serde_json::from_slice(&out).map_err(|e| BridgeError::Answer { op, reason: e.to_string() })
    }
}
