//! `sundara chain serve`: the validator's link to its Bittensor subnet.
//!
//! - **Metagraph sync.** Reads the subnet's metagraph (a snapshot file, which the chain
//!   bridge or an operator writes) every `--sync-every-s`, checks it, and stores it where
//!   the services read it (Redis, [`sundara_common::metagraph`]). A hotkey deregistered,
//!   or registered again, is declared dead at once (its assignments go to others, and a
//!   re-registered one starts anew); a read that fails keeps the metagraph held, and
//!   `sundara chain status` says how old it is.
//! - **Auth callout.** nats-server asks it about every connection but the validator's own
//!   users. A miner proves its hotkey: btauth/1 over the server's nonce for this
//!   connection, addressed to the validator's hotkey, fresh and never seen before; it is
//!   let in as `miner <hotkey>` only while the hotkey is registered, for one session
//!   (`--miner-session-s`), after which it proves itself again. Tenants and miners keyed
//!   by hand are let in by their NKey's signature of the nonce, as without the callout.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use sundara_chain::callout::{AUTH_SUBJECT, AuthRequest, Grant, Issuer};
use sundara_chain::{BtAuthError, Signed, Verifier, metagraph, weights};
use sundara_common::metagraph::ChainStanding;
use sundara_common::nats::{self, HOTKEY_JOIN_METHOD, hotkey_join_target};
use sundara_common::{Capacity, Endpoints, Shutdown};
use sundara_schemas::EpochWeights;
use sundara_schemas::chain::{Metagraph, WeightsMode, WeightsOutcome, WeightsSubmission};
use sundara_schemas::now_ms;

use crate::auth::{self, Role};
use crate::bridge::{Bridge, SetWeights};

/// `sundara chain serve`'s flags.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// The subnet's metagraph from a snapshot file (JSON `{netuid, block, neurons: [{uid,
    /// hotkey, coldkey, stake, validator_permit, registered_at_block}]}`), read again every
    /// --sync-every-s: for development stacks and tests. Without it the bridge reads it.
    #[arg(long, env = "SUNDARA_METAGRAPH")]
    pub metagraph: Option<PathBuf>,
    /// The chain bridge: a command answering `rules`, `metagraph` and `set-weights`
    /// (`scripts/bittensor_bridge.py` with the validator's wallet; see bridge.rs). With it,
    /// each epoch's weights go to the chain; without it they stay in KV `rewards`.
    #[arg(long, env = "SUNDARA_CHAIN_BRIDGE")]
    pub bridge: Option<String>,
    /// The subnet's netuid (needed with --bridge).
    #[arg(long, env = "SUNDARA_NETUID")]
    pub netuid: Option<u16>,
    /// The version key weights are sent with [default: the subnet's own, read each time].
    /// A pinned key below the subnet's is not sent: the validator needs an upgrade.
    #[arg(long)]
    pub version_key: Option<u64>,
    /// Seconds between looks for new epoch weights (and between tries while the chain's
    /// rate limit holds them back).
    #[arg(long, default_value_t = 30.0)]
    pub weights_every_s: f64,
    /// Seconds between reads of the metagraph (a block is 12 s).
    #[arg(long, default_value_t = 12.0)]
    pub sync_every_s: f64,
    /// The validator's hotkey (its SS58 address): miners sign their joins for it, and a
    /// join signed for any other validator is refused.
    #[arg(long, env = "SUNDARA_VALIDATOR_HOTKEY")]
    pub validator_hotkey: String,
    /// The users' directory of `sundara auth init --chain`: the callout issuer's seed, and
    /// the tenants and miners keyed by hand.
    #[arg(long, env = "SUNDARA_CREDENTIALS_DIR")]
    pub credentials_dir: PathBuf,
    /// Seconds a miner's connection lasts before it must prove its hotkey again (and its
    /// registration is checked again).
    #[arg(long, default_value_t = 3600)]
    pub miner_session_s: u64,
}

/// The service's config: its flags and where it connects (as `service-chain`).
#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    pub args: ServeArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("{0} is not the validator's hotkey address: {1}")]
    ValidatorHotkey(String, sundara_chain::KeyError),
    #[error("{}: no callout issuer; run `sundara auth init --chain --dir {}`", .0.display(), .0.display())]
    NoIssuer(PathBuf),
    #[error("subscribing to {AUTH_SUBJECT}: {0}")]
    Subscribe(String),
    #[error("no metagraph source: give --metagraph FILE or --bridge with --netuid")]
    NoSource,
}

/// Where the metagraph comes from.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    Bridge(Bridge, u16),
}

impl Source {
    async fn read(&self) -> Result<Metagraph, String> {
        match self {
            Source::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
                metagraph::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
            Source::Bridge(bridge, netuid) => {
                let m = bridge.metagraph(*netuid).await.map_err(|e| e.to_string())?;
                metagraph::check(&m).map_err(|e| format!("the bridge's metagraph: {e}"))?;
                Ok(m)
            }
        }
    }
}

/// Why a connection was refused: the server logs it, the miner's client reports it.
#[derive(Debug, thiserror::Error)]
pub enum JoinRefused {
    #[error("hotkey proof refused: {0}")]
    Proof(#[from] BtAuthError),
    #[error("the server sent no nonce to sign (the client sent no signature)")]
    NoNonce,
    #[error("{0} is not a hotkey registered on the subnet")]
    NotRegistered(String),
    #[error("no metagraph is held yet")]
    NoMetagraph,
    #[error("the key {0} is no user of this validator")]
    UnknownKey(String),
    #[error("no credentials: a miner proves its hotkey, a tenant signs with its NKey")]
    NoCredentials,
    #[error("the validator could not decide: {0}")]
    Unavailable(String),
}

/// Runs the metagraph sync and the auth callout until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), ChainError> {
    let args = &config.args;
    sundara_chain::AccountId::from_ss58(&args.validator_hotkey)
        .map_err(|e| ChainError::ValidatorHotkey(args.validator_hotkey.clone(), e))?;
    let issuer =
        auth::callout_issuer(&args.credentials_dir)?.ok_or(ChainError::NoIssuer(args.credentials_dir.clone()))?;
    let bridge = args.bridge.clone().zip(args.netuid).map(|(command, netuid)| (Bridge::new(command), netuid));
    let source = match (&args.metagraph, &bridge) {
        (Some(path), _) => Source::File(path.clone()),
        (None, Some((bridge, netuid))) => Source::Bridge(bridge.clone(), *netuid),
        (None, None) => return Err(ChainError::NoSource),
    };
    let capacity = Capacity::open(&config.endpoints).await?;
    let client = nats::connect(&config.endpoints.nats, "sundara-chain").await?;
    let requests = client.subscribe(AUTH_SUBJECT).await.map_err(|e| ChainError::Subscribe(e.to_string()))?;
    // The subscription is live before the first metagraph is stored.
    client.flush().await.map_err(|e| ChainError::Subscribe(e.to_string()))?;
    let gate = std::sync::Arc::new(Gate {
        issuer,
        verifier: Verifier::new(&args.validator_hotkey),
        capacity: capacity.clone(),
        credentials_dir: args.credentials_dir.clone(),
        session: Duration::from_secs(args.miner_session_s.max(10)),
    });
    tracing::info!(validator = %args.validator_hotkey, source = ?source, "chain service serving");
    let sync =
        sync_loop(capacity.clone(), source, Duration::from_secs_f64(args.sync_every_s.max(0.1)), shutdown.clone());
    let weights = async {
        let Some((bridge, netuid)) = bridge else { return };
        let kv = match js_rewards(&client).await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::error!(error = %e, "no KV rewards: epoch weights cannot be read; none are sent");
                return;
            }
        };
        let sender = WeightsSender {
            js: async_nats::jetstream::new(client.clone()),
            kv,
            capacity,
            bridge,
            netuid,
            version_key: args.version_key,
            every: Duration::from_secs_f64(args.weights_every_s.max(0.05)),
        };
        sender.run(shutdown.clone()).await
    };
    let callout = requests.take_until(shutdown.cancelled()).for_each_concurrent(64, |msg| {
        let (client, gate) = (client.clone(), gate.clone());
        async move {
            let Some(reply) = msg.reply else { return };
            if let Some(answer) = gate.answer(&msg.payload).await {
                let _ = client.publish(reply, answer.into()).await;
            }
        }
    });
    tokio::join!(sync, callout, weights);
    Ok(())
}

/// Reads the metagraph now and every `every` until `shutdown`.
async fn sync_loop(capacity: Capacity, source: Source, every: Duration, shutdown: Shutdown) {
    let mut held: Option<(Metagraph, u64)> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sync_once(&capacity, &source, &mut held).await {
            let age = held.as_ref().map(|(_, at)| format!("{} s", now_ms().saturating_sub(*at) / 1000));
            tracing::warn!(error = %e, held_for = age.as_deref().unwrap_or("none held"), "metagraph read failed; keeping the one held");
            let _ = capacity.metagraph_read_failed(now_ms(), &e).await;
        }
        if let Some((m, at)) = &held {
            metrics::gauge!("sundara_chain_metagraph_age_seconds").set(now_ms().saturating_sub(*at) as f64 / 1000.0);
            metrics::gauge!("sundara_chain_neurons").set(m.neurons.len() as f64);
        }
    }
}

/// One read: stores a new metagraph and acts on what changed; an error leaves `held` as it was.
pub async fn sync_once(
    capacity: &Capacity,
    source: &Source,
    held: &mut Option<(Metagraph, u64)>,
) -> Result<(), String> {
    let new = source.read().await?;
    let changes = metagraph::changes(held.as_ref().map(|(m, _)| m), &new).map_err(|e| e.to_string())?;
    let read_at = now_ms();
    // Stored on every read, changed or not: a Redis that restarted empty has it back
    // within one interval.
    capacity.store_metagraph(&new, read_at).await.map_err(|e| e.to_string())?;
    for hotkey in changes.reset() {
        // Its assignments go to others now; a hotkey registered again announces anew.
        capacity.mark_dead(hotkey).await.map_err(|e| e.to_string())?;
    }
    if held.as_ref().is_none_or(|(m, _)| m.block != new.block) {
        tracing::info!(
            block = new.block,
            neurons = new.neurons.len(),
            registered = changes.registered.len(),
            deregistered = ?changes.deregistered,
            reregistered = ?changes.reregistered,
            taken_over = ?changes.taken_over,
            "metagraph read"
        );
    }
    *held = Some((new, read_at));
    Ok(())
}

/// What `sundara chain status` prints of `status`, at `now_ms`.
pub fn status_text(status: &sundara_common::metagraph::ChainStatus, now_ms: u64) -> String {
    let mut out = String::new();
    let age = |at: Option<u64>| at.map(|t| format!("{} s ago", now_ms.saturating_sub(t) / 1000));
    match (status.netuid, status.block) {
        (Some(netuid), Some(block)) => out.push_str(&format!(
            "metagraph: subnet {netuid} at block {block}, {} neurons, read {}\n",
            status.neurons,
            age(status.read_at_ms).unwrap_or_default()
        )),
        _ => out.push_str("metagraph: none held (is `sundara chain serve` running?)\n"),
    }
    if let Some(error) = &status.error {
        out.push_str(&format!(
            "last read failed {}: {error} (the metagraph held stays in use)\n",
            age(status.tried_at_ms).unwrap_or_default()
        ));
    }
    out
}

/// What `sundara chain status` says of the validator itself: its uid and permit
/// (`Err(hotkey)` when the hotkey is not registered) and the last weights sent.
pub fn validator_text(
    ours: Result<Option<sundara_schemas::chain::Neuron>, String>,
    last: Option<&WeightsSubmission>,
) -> String {
    let mut out = String::new();
    match ours {
        Ok(Some(n)) => out.push_str(&format!(
            "validator: uid {}, {}, stake {}\n",
            n.uid,
            if n.validator_permit { "validator permit" } else { "NO validator permit (weights will be refused)" },
            n.stake
        )),
        Ok(None) => {}
        Err(hotkey) => out.push_str(&format!("validator: {hotkey} is not registered on the subnet\n")),
    }
    match last {
        None => out.push_str("weights: none sent yet\n"),
        Some(s) => {
            let answer =
                s.attempts.last().map_or("not tried".to_string(), |(block, o)| format!("{o:?} at block {block}"));
            out.push_str(&format!(
                "weights: epoch {} to {} uids ({:?}, version key {}), {} tries, last answer {answer}\n",
                s.epoch,
                s.uids.len(),
                s.mode,
                s.version_key,
                s.attempts.len()
            ));
        }
    }
    out
}

/// What `sundara chain weights --dry-run` prints: `epoch`'s weights by uid, who is left out,
/// and what the subnet's `rules` (when read) make of sending them now.
pub fn dry_run_text(
    epoch: &EpochWeights,
    metagraph: &Metagraph,
    rules: Option<&sundara_schemas::chain::SubnetRules>,
    version_key: Option<u64>,
) -> String {
    let mapped = weights::to_uids(epoch, metagraph);
    let mut out =
        format!("epoch {}: {} uids weighed (metagraph at block {})\n", epoch.epoch, mapped.uids.len(), metagraph.block);
    out.push_str(&format!("{:>5}  {:<50} {:>6}\n", "uid", "hotkey", "weight"));
    for (uid, weight) in mapped.uids.iter().zip(&mapped.weights) {
        let hotkey = metagraph.neurons.iter().find(|n| n.uid == *uid).map_or("", |n| n.hotkey.as_str());
        out.push_str(&format!("{uid:>5}  {hotkey:<50} {weight:>6}\n"));
    }
    for miner in &mapped.unregistered {
        out.push_str(&format!("left out: {miner} (not a registered hotkey)\n"));
    }
    if let Some(rules) = rules {
        let plan = weights::plan(rules, version_key, None);
        out.push_str(&format!(
            "at block {}: {plan:?} (before the rate limit since the last weights sent)\n",
            rules.block
        ));
    }
    out
}

/// The auth callout's decisions.
struct Gate {
    issuer: Issuer,
    verifier: Verifier,
    capacity: Capacity,
    credentials_dir: PathBuf,
    session: Duration,
}

impl Gate {
    /// The signed answer to one authorization request; `None` for a request that is not
    /// one (nothing to answer: the server times the connection out).
    async fn answer(&self, payload: &[u8]) -> Option<String> {
        let request = match AuthRequest::decode(&String::from_utf8_lossy(payload)) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "not an authorization request");
                return None;
            }
        };
        let now_s = now_ms() / 1000;
        Some(match self.grant(&request, now_s).await {
            Ok(grant) => {
                tracing::debug!(user = %grant.name, host = ?request.client.host, "connection let in");
                metrics::counter!("sundara_chain_joins_total", "outcome" => "allowed").increment(1);
                self.issuer.allow(&request, &grant, now_s)
            }
            Err(why) => {
                tracing::warn!(reason = %why, host = ?request.client.host, "connection refused");
                metrics::counter!("sundara_chain_joins_total", "outcome" => "refused").increment(1);
                self.issuer.deny(&request, &why.to_string(), now_s)
            }
        })
    }

    async fn grant(&self, request: &AuthRequest, now_s: u64) -> Result<Grant, JoinRefused> {
        let unavailable = |e: sundara_common::Error| JoinRefused::Unavailable(e.to_string());
        if let Some(token) = request.connect.auth_token.as_deref().filter(|t| t.starts_with("btauth/1;")) {
            let signed = Signed::from_token(token)?;
            let nonce = request.client.nonce.as_deref().ok_or(JoinRefused::NoNonce)?;
            let target = hotkey_join_target(nonce);
            let hotkey =
                self.verifier.verify(&signed, HOTKEY_JOIN_METHOD, &target, b"", sundara_chain::btauth::now_ns())?;
            let window = self.verifier.replay_window();
            if !self.capacity.first_use(&signed.hotkey, signed.nonce_ns, window).await.map_err(unavailable)? {
                return Err(BtAuthError::Replayed.into());
            }
            let ss58 = hotkey.to_ss58();
            match self.capacity.chain_standing(&ss58).await.map_err(unavailable)? {
                ChainStanding::Registered(_) => {}
                ChainStanding::NotRegistered => return Err(JoinRefused::NotRegistered(ss58)),
                ChainStanding::OffChain => return Err(JoinRefused::NoMetagraph),
            }
            // Its inbox is its hotkey's: the server-made user key is unknown to the miner.
            return Ok(grant(&Role::Miner(ss58.clone()), &ss58, now_s + self.session.as_secs()));
        }
        let Some(key) = request.nkey_signed() else { return Err(JoinRefused::NoCredentials) };
        let role = auth::role_of_key(&self.credentials_dir, key)
            .map_err(|e| JoinRefused::Unavailable(e.to_string()))?
            .ok_or_else(|| JoinRefused::UnknownKey(key.to_string()))?;
        Ok(grant(&role, key, 0))
    }
}

/// What `role` may do (its inbox named by `key`), as the callout grants it until
/// `expires_s` (0: no expiry).
fn grant(role: &Role, key: &str, expires_s: u64) -> Grant {
    let p = auth::permissions(role, key);
    Grant {
        name: role.to_string(),
        publish: p.publish,
        subscribe: p.subscribe,
        allow_responses: p.allow_responses,
        expires_s,
    }
}

/// Why a worker could not take up its hotkey.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error(transparent)]
    Key(#[from] sundara_chain::KeyError),
    #[error("a hotkey joins for one validator: give --validator-hotkey (its SS58 address)")]
    NoValidator,
    #[error("--validator-hotkey {0:?}: {1}")]
    Validator(String, sundara_chain::KeyError),
    #[error("--id {id} is not the hotkey's address {hotkey}: a hotkey's worker id is its address")]
    OtherId { id: String, hotkey: String },
    #[error("no home directory for ~/.bittensor/wallets: give --wallet-path")]
    NoHome,
}

/// A worker started with a hotkey (`--hotkey-file`, or `--wallet-name`): its id becomes
/// the hotkey's address, and it connects by proving the hotkey instead of with NATS
/// credentials. Without a hotkey, both are returned unchanged.
pub fn miner_login(
    mut args: sundara_worker::Args,
    mut nats: nats::NatsEndpoint,
) -> Result<(sundara_worker::Args, nats::NatsEndpoint), LoginError> {
    let file = match (&args.hotkey_file, &args.wallet_name) {
        (Some(file), _) => file.clone(),
        (None, Some(name)) => {
            let wallets = match &args.wallet_path {
                Some(path) => path.clone(),
                None => {
                    std::env::var_os("HOME").map(PathBuf::from).ok_or(LoginError::NoHome)?.join(".bittensor/wallets")
                }
            };
            sundara_chain::Hotkey::wallet_path(&wallets, name, &args.wallet_hotkey)
        }
        (None, None) => return Ok((args, nats)),
    };
    let hotkey = sundara_chain::Hotkey::load(&file)?;
    let receiver = args.validator_hotkey.clone().ok_or(LoginError::NoValidator)?;
    sundara_chain::AccountId::from_ss58(&receiver).map_err(|e| LoginError::Validator(receiver.clone(), e))?;
    let address = hotkey.account.to_ss58();
    if !args.id.is_empty() && args.id != address {
        return Err(LoginError::OtherId { id: args.id, hotkey: address });
    }
    args.id = address;
    nats.credentials = None;
    nats.hotkey = Some(nats::HotkeyLogin { hotkey: std::sync::Arc::new(hotkey), receiver });
    Ok((args, nats))
}

/// KV keys (bucket `rewards`, beside the epoch weights) of the weights sent to the chain.
pub fn submission_key(epoch: u64) -> String {
    format!("chain.weights.{epoch}")
}
pub const LATEST_SUBMISSION_KEY: &str = "chain.weights.latest";

async fn js_rewards(client: &async_nats::Client) -> Result<async_nats::jetstream::kv::Store, String> {
    let js = async_nats::jetstream::new(client.clone());
    js.get_key_value(sundara_schemas::subjects::REWARDS_BUCKET).await.map_err(|e| e.to_string())
}

/// The last weights sent, as recorded.
pub async fn last_submission(kv: &async_nats::jetstream::kv::Store) -> Result<Option<WeightsSubmission>, String> {
    let bytes = kv.get(LATEST_SUBMISSION_KEY).await.map_err(|e| e.to_string())?;
    bytes.map(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())).transpose()
}

/// Sends each closed epoch's weights to the chain once, under the subnet's rules.
struct WeightsSender {
    js: async_nats::jetstream::Context,
    kv: async_nats::jetstream::kv::Store,
    capacity: Capacity,
    bridge: Bridge,
    netuid: u16,
    version_key: Option<u64>,
    every: Duration,
}

impl WeightsSender {
    async fn run(self, shutdown: Shutdown) {
        let mut last = match last_submission(&self.kv).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(error = %e, "the last weights sent are unreadable; sending the latest epoch's");
                None
            }
        };
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let epoch = match sundara_rewarder::read_weights(&self.js, None).await {
                Ok(Some(epoch)) => epoch,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "epoch weights unreadable");
                    continue;
                }
            };
            if last.as_ref().is_some_and(|l| l.epoch >= epoch.epoch) {
                continue;
            }
            let last_included = last.as_ref().and_then(WeightsSubmission::included_at);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                sent = self.send(&epoch, last_included) => {
                    if let Some(sent) = sent {
                        last = Some(sent);
                    }
                }
            }
        }
    }

    /// Tries `epoch`'s weights until they are in or cannot be; the record (`None` while
    /// no metagraph is held: tried again at the next look).
    async fn send(&self, epoch: &EpochWeights, last_included: Option<u64>) -> Option<WeightsSubmission> {
        let metagraph = self.metagraph().await?;
        let mapped = weights::to_uids(epoch, &metagraph);
        let mut record = WeightsSubmission {
            epoch: epoch.epoch,
            netuid: self.netuid,
            uids: mapped.uids,
            weights: mapped.weights,
            version_key: 0,
            mode: WeightsMode::Plain,
            unregistered: mapped.unregistered,
            attempts: Vec::new(),
        };
        let mut forced_mode = None;
        let mut failures = 0u32;
        loop {
            let (block, outcome) = match self.bridge.rules(self.netuid).await {
                Err(e) => (0, WeightsOutcome::Unavailable { message: e.to_string() }),
                Ok(rules) => match weights::plan(&rules, self.version_key, last_included) {
                    weights::Plan::WaitFor { block } => {
                        tracing::debug!(block, now = rules.block, "weights held back by the rate limit");
                        tokio::time::sleep(self.every).await;
                        continue;
                    }
                    weights::Plan::Upgrade { ours, required } => {
                        tracing::error!(ours, required, "version key below the subnet's: upgrade this validator");
                        (rules.block, WeightsOutcome::VersionKeyTooLow { required })
                    }
                    weights::Plan::Send { mode, version_key } => {
                        (record.mode, record.version_key) = (forced_mode.unwrap_or(mode), version_key);
                        let request = SetWeights {
                            netuid: self.netuid,
                            uids: &record.uids,
                            weights: &record.weights,
                            version_key,
                            mode: record.mode,
                        };
                        let outcome = self
                            .bridge
                            .set_weights(&request)
                            .await
                            .unwrap_or_else(|e| WeightsOutcome::Unavailable { message: e.to_string() });
                        (rules.block, outcome)
                    }
                },
            };
            if matches!(outcome, WeightsOutcome::Unavailable { .. }) {
                failures += 1;
            }
            metrics::counter!("sundara_chain_weights_total", "outcome" => outcome_kind(&outcome)).increment(1);
            tracing::info!(epoch = epoch.epoch, block, mode = ?record.mode, outcome = ?outcome, "weights sent");
            record.attempts.push((block, outcome.clone()));
            self.record(&record).await;
            match weights::after(&outcome, block, failures.max(1)) {
                weights::Next::Done | weights::Next::GiveUp => return Some(record),
                weights::Next::SwitchMode(mode) => forced_mode = Some(mode),
                weights::Next::WaitFor { .. } => tokio::time::sleep(self.every).await,
                weights::Next::Backoff(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    async fn metagraph(&self) -> Option<Metagraph> {
        let status = self.capacity.chain_status().await.ok()?;
        let neurons = self.capacity.neurons().await.ok()?;
        Some(Metagraph { netuid: status.netuid?, block: status.block?, neurons })
    }

    /// Keeps `record` beside the epoch's weights.
    async fn record(&self, record: &WeightsSubmission) {
        let json = serde_json::to_vec(record).expect("records serialise");
        for key in [submission_key(record.epoch), LATEST_SUBMISSION_KEY.to_string()] {
            if let Err(e) = self.kv.put(&key, json.clone().into()).await {
                tracing::warn!(error = %e, key, "weights record not stored");
            }
        }
    }
}

fn outcome_kind(outcome: &WeightsOutcome) -> &'static str {
    match outcome {
        WeightsOutcome::Included { .. } => "included",
        WeightsOutcome::RateLimited { .. } => "rate_limited",
        WeightsOutcome::CommitRevealMismatch { .. } => "commit_reveal_mismatch",
        WeightsOutcome::VersionKeyTooLow { .. } => "version_key_too_low",
        WeightsOutcome::NoPermit => "no_permit",
        WeightsOutcome::Unavailable { .. } => "unavailable",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(transparent)]
    Key(#[from] sundara_chain::KeyError),
    #[error(transparent)]
    Metagraph(#[from] metagraph::MetagraphError),
    #[error("{0} is registered already")]
    Registered(String),
}

/// `sundara chain keygen`: a new hotkey in a wallet hotkey file at `out` (mode 0600, never
/// overwritten); its SS58 address.
pub fn keygen(out: &std::path::Path) -> Result<String, DevError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e: std::io::Error| DevError::Io { path: out.to_path_buf(), reason: e.to_string() };
    let seed: [u8; 32] = rand::random();
    let hotkey = sundara_chain::Hotkey::from_seed(&seed)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(out).map_err(io)?;
    file.write_all(hotkey.wallet_json(Some(&seed)).as_bytes()).map_err(io)?;
    Ok(hotkey.account.to_ss58())
}

/// `sundara chain register-dev`: adds `hotkey` (a key file or an SS58 address) to the
/// development metagraph at `path`, at the next uid and block, under `coldkey` (default: a
/// new coldkey of its own). Written whole by rename, so a reader never sees half of it.
pub fn register_dev(
    path: &std::path::Path,
    hotkey: &str,
    coldkey: Option<&str>,
) -> Result<sundara_schemas::chain::Neuron, DevError> {
    let io = |e: std::io::Error| DevError::Io { path: path.to_path_buf(), reason: e.to_string() };
    let hotkey = match sundara_chain::AccountId::from_ss58(hotkey) {
        Ok(account) => account.to_ss58(),
        Err(_) => sundara_chain::Hotkey::load(std::path::Path::new(hotkey))?.account.to_ss58(),
    };
    let coldkey = match coldkey {
        Some(c) => sundara_chain::AccountId::from_ss58(c)?.to_ss58(),
        None => sundara_chain::Hotkey::from_seed(&rand::random::<[u8; 32]>())?.account.to_ss58(),
    };
    let mut m = metagraph::parse(&std::fs::read_to_string(path).map_err(io)?)?;
    if m.neuron(&hotkey).is_some() {
        return Err(DevError::Registered(hotkey));
    }
    m.block += 1;
    let neuron = sundara_schemas::chain::Neuron {
        uid: m.neurons.iter().map(|n| n.uid + 1).max().unwrap_or(0),
        hotkey,
        coldkey,
        stake: 0.0,
        validator_permit: false,
        registered_at_block: m.block,
    };
    m.neurons.push(neuron.clone());
    metagraph::check(&m)?;
    write_metagraph(path, &m).map_err(io)?;
    Ok(neuron)
}

/// Writes a metagraph file whole (by rename).
pub fn write_metagraph(path: &std::path::Path, m: &Metagraph) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(m).expect("a metagraph serialises"))?;
    std::fs::rename(tmp, path)
}
