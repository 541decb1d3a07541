//! Rewarder: turns verdicts into per-task reward traces and, once per epoch, into
//! Bittensor-style u16 weights.
//!
//! One task owns the [`Ledger`]. Each verdict is applied in stream order and its trace
//! published; the verdict stays un-acked until the trace is stored and the ledger (which
//! records the last applied sequence) is persisted in KV, so a crash at any point replays
//! exactly the verdicts the stored ledger has not seen. Epochs close on a timer or on request
//! ([`CLOSE_EPOCH_SUBJECT`]).

pub mod ledger;
#[cfg(test)]
mod service_tests;

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind, Message,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::ConsumerInfoErrorKind,
    kv::{self, UpdateErrorKind},
    message::Acker,
};
use bytes::Bytes;
use futures::StreamExt;
use sundara_common::retry::Backoff;
use sundara_common::{Capacity, Endpoints, Error as CommonError, Shutdown, js_err, nats, telemetry};
use sundara_schemas::{
    EpochWeights, MAX_MESSAGE_BYTES, RewardTrace, RewardTraces, Standing, Verdict, WIRE_VERSION, decode, encode,
    now_ms, subjects as subj,
};
use tracing::Instrument;

pub use ledger::{Ledger, MinerScore, WEIGHT_TOTAL, normalize_u16};

/// Any core-NATS message here closes the epoch now; a request gets the encoded
/// [`EpochWeights`] back ([`subj::REWARDER_CLOSE`]).
pub const CLOSE_EPOCH_SUBJECT: &str = subj::REWARDER_CLOSE;
/// KV key (bucket [`subj::REWARDS_BUCKET`]) of the persisted ledger.
pub const LEDGER_KEY: &str = "ledger";
/// KV key of the most recently closed epoch's weights.
pub const LATEST_WEIGHTS_KEY: &str = "weights.latest";
/// Durable consumer name on VERDICTS.
pub const CONSUMER: &str = "rewarder";

const ACK_WAIT: Duration = Duration::from_secs(30);
const MAX_ACK_PENDING: i64 = 8192;
/// Held verdicts that force a flush before the next tick.
const FLUSH_BATCH: usize = 512;
/// Reward traces per REWARDS message (a trace is a few hundred bytes at k ≤ 3).
const TRACES_PER_MESSAGE: usize = 256;
/// Tries of a store operation before the rewarder gives up (and restarts from the stored
/// ledger): with [`RETRY_BACKOFF`], about a minute, enough to ride out a nats-server restart
/// or a JetStream cluster electing new leaders after losing a node (several seconds), while
/// the verdicts stay held un-acked.
const ATTEMPTS: u32 = 32;
/// Waits between two tries of a store operation: 100 ms, then double, at most 2 s.
const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// KV key of one closed epoch's weights.
pub fn weights_key(epoch: u64) -> String {
    format!("weights.{epoch}")
}

/// How the rewarder runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// NATS, and Redis (used only when `quarantine_after` > 0).
    pub endpoints: Endpoints,
    /// Wall-clock length of an epoch (survives restarts: measured from the stored start).
    pub epoch_length: Duration,
    /// Weight of the newest task score in each miner's moving average, in (0, 1].
    pub alpha: f64,
    /// How often held verdicts are made durable and acked.
    pub flush_interval: Duration,
    /// Outputs proven wrong by the verifier's reference (audits, escalations) after which a
    /// miner is quarantined: the scheduler never chooses it again, and its epoch weight is 0.
    /// 0 turns quarantine off, and the rewarder then needs no Redis: it then neither
    /// publishes reputations nor reads the scheduler's quarantines at an epoch close.
    pub quarantine_after: u64,
    /// Limits of the streams the rewarder provisions.
    pub retention: nats::Retention,
}

/// `sundara rewarder`'s flags: what an operator sets; [`Config::from_args`] adds the rest.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Length of an epoch in seconds: weights are computed and published at each close.
    #[arg(long, env = "SUNDARA_EPOCH_SECS", default_value_t = DEFAULT_EPOCH_SECS)]
    pub epoch_secs: u64,
}

/// `--epoch-secs`' default.
pub const DEFAULT_EPOCH_SECS: u64 = 60;

impl Default for Args {
    /// The flags' defaults (what `sundara rewarder` with no flags runs with).
    fn default() -> Args {
        Args { epoch_secs: DEFAULT_EPOCH_SECS }
    }
}

impl Config {
    /// The config of `sundara rewarder` with these flags.
    pub fn from_args(args: Args, endpoints: Endpoints) -> Config {
        let mut config = Config::new(endpoints);
        config.epoch_length = Duration::from_secs(args.epoch_secs);
        config
    }

    /// The defaults: 60 s epochs, alpha 0.1, quarantine after 3 proofs.
    pub fn new(endpoints: Endpoints) -> Config {
        Config {
            endpoints,
            epoch_length: Duration::from_secs(DEFAULT_EPOCH_SECS),
            alpha: 0.1,
            flush_interval: Duration::from_millis(200),
            quarantine_after: 3,
            retention: nats::Retention::default(),
        }
    }
}

/// Why the rewarder stopped.
#[derive(Debug, thiserror::Error)]
pub enum RewarderError {
    /// NATS, Redis or a wire decode failed.
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error("invalid rewarder configuration: {0}")]
    Config(String),
    /// The stored ledger is unreadable, or another rewarder wrote it under us.
    #[error("rewards ledger: {0}")]
    Ledger(String),
}

struct Rewarder {
    config: Config,
    /// Where quarantines go; `None` when quarantine is off.
    capacity: Option<Capacity>,
    js: jetstream::Context,
    kv: kv::Store,
    ledger: Ledger,
    /// KV revision of the ledger as we last read or wrote it (0: never written). Every write
    /// expects it, so a second rewarder writing the same ledger is detected, not merged.
    revision: u64,
    /// The in-memory ledger differs from the stored one.
    dirty: bool,
    /// Verdict deliveries to ack once the ledger covering them is stored.
    held: HeldVerdicts,
    /// Traces of the verdicts applied since the last flush, which stores them.
    traces: Vec<RewardTrace>,
    /// When reputations were last written to Redis.
    reputations_at: Option<std::time::Instant>,
}

/// Reputations go to Redis at most this often.
const REPUTATION_EVERY: Duration = Duration::from_secs(1);
/// Longest wait for Redis' list of quarantined miners at an epoch close: an unreachable
/// Verdict deliveries held until a flush makes the ledger covering them durable. The
/// consumer acks cumulatively ([`AckPolicy::All`]), so a flush sends one ack for the newest
/// verdict instead of one per verdict (under load about one message per task less), plus
/// one for each redelivery that came after it, which a cumulative ack may not reach.
#[derive(Default)]
struct HeldVerdicts {
    /// (stream sequence, acker), in delivery order.
    held: Vec<(u64, Acker)>,
}

impl HeldVerdicts {
    fn push(&mut self, seq: u64, acker: Acker) {
        self.held.push((seq, acker));
    }

    fn len(&self) -> usize {
        self.held.len()
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The ackers to ack: the newest verdict's, and every delivery after it.
    fn into_acks(self) -> Vec<Acker> {
        let seqs: Vec<u64> = self.held.iter().map(|(seq, _)| *seq).collect();
        self.held.into_iter().skip(nats::first_to_ack(&seqs)).map(|(_, acker)| acker).collect()
    }
}

/// Redis must not hold the weights back (the ledger's own proofs still count).
const QUARANTINED_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl Rewarder {
    async fn on_verdict(&mut self, msg: Message) -> Result<(), RewarderError> {
        let seq = match msg.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                tracing::warn!(error = %e, "verdict delivery without JetStream metadata; skipped");
                return Ok(());
            }
        };
        let (msg, acker) = msg.split();
        let verdict = match decode::<Verdict>(&msg.payload, MAX_MESSAGE_BYTES) {
            Ok(v) if subj::is_token(&v.task_id) => v,
            Ok(v) => {
                tracing::warn!(seq, task = ?v.task_id, "verdict with an invalid task id; terminating it");
                let _ = acker.ack_with(AckKind::Term).await;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(seq, error = %e, "undecodable verdict; terminating it");
                let _ = acker.ack_with(AckKind::Term).await;
                return Ok(());
            }
        };
        let span = sundara_common::consumer_span!("rewarder score", msg.subject,
            sundara.task_id = %verdict.task_id,
            sundara.model = %verdict.model,
            sundara.epoch = tracing::field::Empty,
            sundara.scores = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::follow(&span, msg.headers.as_ref());
        self.apply(&verdict, seq).instrument(span).await;
        // Even a verdict already applied waits: the ledger that includes it may not be stored yet.
        self.held.push(seq, acker);
        if self.held.len() >= FLUSH_BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    /// Scores a verdict into the ledger (once per verdict) and sends its reward trace.
    async fn apply(&mut self, verdict: &Verdict, seq: u64) {
        if let Some(trace) = self.ledger.apply(verdict, seq) {
            self.dirty = true;
            let span = tracing::Span::current();
            span.record("sundara.epoch", trace.epoch);
            let scores: Vec<String> = trace.entries.iter().map(|e| format!("{}={:.4}", e.worker, e.score)).collect();
            span.record("sundara.scores", scores.join(","));
            for e in &trace.entries {
                metrics::counter!("sundara_rewarder_outcomes_total", "standing" => e.standing.as_str()).increment(1);
            }
            for m in verdict.miners.iter().filter(|m| m.standing == Standing::Disagreed) {
                if !verdict.judged_by_reference() {
                    continue;
                }
                metrics::counter!("sundara_rewarder_proven_wrong_total").increment(1);
                let after = self.config.quarantine_after;
                let wrong = self.ledger.miner(&m.worker).map_or(0, |s| s.confirmed_wrong);
                if after > 0 && wrong >= after {
                    let reason = format!("{wrong} outputs proven wrong by the verifier's reference runs");
                    self.quarantine(&m.worker, &reason).await;
                }
                // The operator's names share its record: one proven wrong enough times
                // takes all of them out, and the scheduler never picks a new name of it.
                let operator = self.ledger.operator(m.operator()).cloned().unwrap_or_default();
                if after > 0 && operator.confirmed_wrong >= after {
                    let reason = format!(
                        "operator {}: {} outputs of its workers proven wrong by the verifier's reference runs",
                        m.operator(),
                        operator.confirmed_wrong
                    );
                    self.quarantine_operator(m.operator(), &reason).await;
                    for worker in &operator.workers {
                        self.quarantine(worker, &reason).await;
                    }
                }
            }
            tracing::debug!(seq, task = %trace.task_id, epoch = trace.epoch, "verdict applied");
            self.traces.push(trace);
        } else {
            tracing::debug!(seq, task = %verdict.task_id, "verdict already applied");
        }
    }

    /// Quarantines a miner (idempotent in Redis; repeated on every further proof, so a
    /// Redis that lost it learns it again).
    async fn quarantine(&self, worker: &str, reason: &str) {
        let Some(capacity) = &self.capacity else { return };
        match capacity.quarantine(worker, reason).await {
            Ok(true) => {
                metrics::counter!("sundara_quarantines_total", "by" => "rewarder").increment(1);
                tracing::warn!(worker, %reason, "miner quarantined");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(worker, error = %e, "could not quarantine the miner; will try on its next proof"),
        }
    }

    /// Quarantines an operator: none of its workers, old names or new, is picked again.
    async fn quarantine_operator(&self, operator: &str, reason: &str) {
        let Some(capacity) = &self.capacity else { return };
        if let Err(e) = capacity.quarantine_operator(operator, reason).await {
            tracing::warn!(operator, error = %e, "could not quarantine the operator; will try on its next proof");
        }
    }

    /// Makes everything applied so far durable (traces stored, ledger persisted), then acks
    /// the verdicts it covers.
    async fn flush(&mut self) -> Result<(), RewarderError> {
        // A message per [`TRACES_PER_MESSAGE`] traces, not one per task. Its id names the
        // verdicts it covers, so a publish repeated after a lost ack is stored once.
        for traces in std::mem::take(&mut self.traces).chunks(TRACES_PER_MESSAGE) {
            let (first, last) = (traces[0].verdict_seq, traces[traces.len() - 1].verdict_seq);
            let id = format!("traces-{first}-{last}");
            let payload = encode(&RewardTraces { v: WIRE_VERSION, traces: traces.to_vec() });
            let publish = || nats::publish_durable(&self.js, subj::reward_traces(first), &id, payload.clone());
            retry("reward traces publish", publish).await?;
        }
        if self.dirty {
            self.persist().await?;
            self.publish_reputations().await;
        }
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            tracing::debug!(count = held.len(), last_seq = self.ledger.last_seq(), "verdicts acked");
        }
        for acker in held.into_acks() {
            // A lost ack only means a redelivery, which the ledger ignores by sequence.
            if let Err(e) = acker.ack().await {
                tracing::warn!(error = %e, "verdict ack failed; it will be redelivered");
            }
        }
        Ok(())
    }

    /// Tells the scheduler each miner's reputation, which ranks its slices: its share of
    /// reference-judged outcomes the reference confirmed ([`MinerScore::reputation`]; won
    /// votes do not count, since colluders can win them). Miners no reference judged get no
    /// entry. At most once per [`REPUTATION_EVERY`]; a failure waits for the next time.
    async fn publish_reputations(&mut self) {
        let Some(capacity) = &self.capacity else { return };
        if self.reputations_at.is_some_and(|t| t.elapsed() < REPUTATION_EVERY) {
            return;
        }
        self.reputations_at = Some(std::time::Instant::now());
        let reputations = self.ledger.reputations();
        if let Err(e) = capacity.set_reputation(&reputations).await {
            tracing::warn!(error = %e, "could not publish reputations");
        }
    }

    /// Writes the ledger, expecting the revision we last saw.
    async fn persist(&mut self) -> Result<(), RewarderError> {
        let bytes = Bytes::from(self.ledger.to_bytes());
        let mut backoff = RETRY_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let err = match self.kv.update(LEDGER_KEY, bytes.clone(), self.revision).await {
                Ok(revision) => {
                    self.revision = revision;
                    self.dirty = false;
                    return Ok(());
                }
                Err(e) => e,
            };
            // A write that timed out may still have landed: look before concluding anything.
            if let Ok(Some(entry)) = self.kv.entry(LEDGER_KEY).await {
                if entry.value == bytes {
                    self.revision = entry.revision;
                    self.dirty = false;
                    return Ok(());
                }
                if err.kind() == UpdateErrorKind::WrongLastRevision && entry.revision != self.revision {
                    return Err(RewarderError::Ledger(format!(
                        "written by someone else (revision {} where {} was expected); is a second rewarder running?",
                        entry.revision, self.revision
                    )));
                }
            }
            tracing::warn!(attempt, error = %err, "ledger not persisted; retrying");
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        Err(RewarderError::Ledger(format!("could not be persisted after {ATTEMPTS} attempts")))
    }

    fn epoch_due(&self) -> bool {
        let length = u64::try_from(self.config.epoch_length.as_millis()).unwrap_or(u64::MAX);
        now_ms() >= self.ledger.epoch_started_ms().saturating_add(length)
    }

    /// Closes the epoch on a flushed ledger, so that the weights depend only on stored verdicts
    /// and on who is quarantined (a crash before the closed ledger is stored recomputes the
    /// same weights at restart, unless the quarantines changed meanwhile). The quarantined
    /// miners are published with the weights, so the traces and they explain every weight.
    async fn close_epoch(&mut self) -> Result<EpochWeights, RewarderError> {
        self.flush().await?;
        let quarantined = self.quarantined_now().await;
        let weights = self.ledger.close_epoch(now_ms(), &quarantined);
        self.dirty = true;
        let bytes = encode(&weights);
        let id = format!("epoch-{}", weights.epoch);
        let publish = || nats::publish_durable(&self.js, subj::REWARD_EPOCH.to_string(), &id, bytes.clone());
        retry("epoch weights publish", publish).await?;
        for key in [weights_key(weights.epoch), LATEST_WEIGHTS_KEY.to_string()] {
            retry("epoch weights put", || async {
                self.kv.put(&key, Bytes::from(bytes.clone())).await.map_err(js_err)
            })
            .await?;
        }
        self.persist().await?;
        metrics::counter!("sundara_rewarder_epochs_total").increment(1);
        for w in &weights.weights {
            metrics::gauge!("sundara_rewarder_epoch_weight", "miner" => w.miner.clone()).set(f64::from(w.weight));
        }
        let total: u32 = weights.weights.iter().map(|w| u32::from(w.weight)).sum();
        let quarantined = weights.quarantined.len();
        tracing::info!(epoch = weights.epoch, miners = weights.weights.len(), quarantined, total, "epoch closed");
        Ok(weights)
    }

    /// Who is quarantined now, to be weighed 0: the miners the ledger holds enough proof
    /// against (the rewarder's own quarantines), and those Redis lists (the scheduler's, for
    /// timeouts). When Redis cannot be read, that is logged and the ledger's proofs alone count.
    async fn quarantined_now(&self) -> BTreeSet<String> {
        let mut quarantined = self.ledger.quarantined_by_proof(self.config.quarantine_after);
        let Some(capacity) = &self.capacity else { return quarantined };
        match tokio::time::timeout(QUARANTINED_READ_TIMEOUT, capacity.quarantined()).await {
            Ok(Ok(listed)) => quarantined.extend(listed.into_keys()),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not read the quarantined miners; weighing by the ledger's proofs only")
            }
            Err(_) => tracing::warn!(
                timeout = ?QUARANTINED_READ_TIMEOUT,
                "reading the quarantined miners timed out; weighing by the ledger's proofs only"
            ),
        }
        quarantined
    }
}

/// Runs `op` up to [`ATTEMPTS`] times, waiting [`RETRY_BACKOFF`] between the tries.
async fn retry<T, F, Fut>(what: &str, op: F) -> Result<T, CommonError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, CommonError>>,
{
    sundara_common::retry::retry(what, ATTEMPTS, RETRY_BACKOFF, op).await
}

/// Reads the stored ledger and its KV revision (0 when there is none).
async fn load_ledger(kv: &kv::Store) -> Result<(Option<Ledger>, u64), RewarderError> {
    let Some(entry) = kv.entry(LEDGER_KEY).await.map_err(js_err)? else {
        return Ok((None, 0));
    };
    if entry.operation != kv::Operation::Put {
        return Ok((None, entry.revision));
    }
    let ledger = Ledger::from_bytes(&entry.value)
        .map_err(|e| RewarderError::Ledger(format!("stored ledger is unreadable: {e}")))?;
    Ok((Some(ledger), entry.revision))
}

/// The durable verdict consumer, positioned so that deliveries arrive in stream order after
/// `last_seq`. A consumer that already delivered past the stored ledger (the rewarder stopped
/// before persisting) is recreated: its un-acked verdicts would otherwise come back only after
/// newer ones, which the ledger would then skip as already seen.
async fn verdict_consumer(js: &jetstream::Context, last_seq: u64) -> Result<PullConsumer, RewarderError> {
    let stream = js.get_stream(subj::VERDICTS_STREAM).await.map_err(js_err)?;
    match stream.consumer_info(CONSUMER).await {
        Ok(info) if info.delivered.stream_sequence <= last_seq && info.config.ack_policy == AckPolicy::All => {
            return Ok(stream.get_consumer(CONSUMER).await.map_err(js_err)?);
        }
        Ok(info) if info.config.ack_policy != AckPolicy::All => {
            // Made before verdicts were acked a flush at a time: the same position, anew.
            tracing::info!(last_seq, "verdict consumer acks one by one; recreating it to ack per flush");
            stream.delete_consumer(CONSUMER).await.map_err(js_err)?;
        }
        Ok(info) => {
            tracing::info!(
                delivered = info.delivered.stream_sequence,
                last_seq,
                "verdicts delivered past the stored ledger; restarting the consumer after it"
            );
            stream.delete_consumer(CONSUMER).await.map_err(js_err)?;
        }
        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {}
        Err(e) => return Err(js_err(e).into()),
    }
    let deliver_policy = match last_seq {
        0 => DeliverPolicy::All,
        seq => DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
    };
    let config = pull::Config {
        durable_name: Some(CONSUMER.to_string()),
        filter_subject: subj::VERDICT_ALL.to_string(),
        ack_policy: AckPolicy::All,
        ack_wait: ACK_WAIT,
        max_ack_pending: MAX_ACK_PENDING,
        deliver_policy,
        ..Default::default()
    };
    Ok(stream.create_consumer(config).await.map_err(js_err)?)
}

/// Runs the rewarder until `shutdown`, then flushes what it holds.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), RewarderError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("rewarder", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), RewarderError> {
    if !ledger::valid_alpha(config.alpha) {
        return Err(RewarderError::Config(format!("alpha must be in (0, 1], got {}", config.alpha)));
    }
    if config.flush_interval.is_zero() {
        return Err(RewarderError::Config("flush_interval must be positive".into()));
    }
    let client = nats::connect(&config.endpoints.nats, "sundara-rewarder").await?;
    let js = jetstream::new(client.clone());
    nats::provision(&js, &config.retention).await?;
    let kv = js.get_key_value(subj::REWARDS_BUCKET).await.map_err(js_err)?;
    let (stored, revision) = load_ledger(&kv).await?;
    let mut ledger = match stored {
        Some(ledger) => {
            tracing::info!(
                epoch = ledger.epoch(),
                last_seq = ledger.last_seq(),
                miners = ledger.miners().len(),
                "ledger loaded"
            );
            ledger
        }
        None => {
            tracing::info!("no stored ledger; starting at epoch 1");
            Ledger::new(config.alpha, now_ms())
        }
    };
    let dirty = stored_alpha_differs(&mut ledger, config.alpha);
    let consumer = verdict_consumer(&js, ledger.last_seq()).await?;
    let mut closes = client.subscribe(CLOSE_EPOCH_SUBJECT).await.map_err(js_err)?;
    let capacity = match config.quarantine_after {
        0 => None,
        _ => Some(Capacity::open(&config.endpoints).await?),
    };
    let mut rewarder = Rewarder {
        config,
        capacity,
        js,
        kv,
        ledger,
        revision,
        dirty,
        held: HeldVerdicts::default(),
        traces: Vec::new(),
        reputations_at: None,
    };
    // An epoch that ended while we were down closes before any newer verdict counts in it.
    if rewarder.epoch_due() {
        rewarder.close_epoch().await?;
    }
    let mut messages = nats::pull(&consumer);
    let mut tick = tokio::time::interval(rewarder.config.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(epoch = rewarder.ledger.epoch(), "rewarder running");
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(request) = closes.next() => {
                let weights = rewarder.close_epoch().await?;
                if let Some(reply) = request.reply
                    && let Err(e) = client.publish(reply, encode(&weights).into()).await
                {
                    tracing::warn!(error = %e, "epoch close reply failed");
                }
            }
            _ = tick.tick() => {
                rewarder.flush().await?;
                if rewarder.epoch_due() {
                    rewarder.close_epoch().await?;
                }
            }
            delivery = messages.next() => match delivery {
                Some(Ok(msg)) => rewarder.on_verdict(msg).await?,
                Some(Err(e)) => tracing::warn!(error = %e, "verdict consumer"),
                None => return Err(js_err(sundara_common::JetStreamError::other("verdict consumer ended")).into()),
            },
        }
    }
    rewarder.flush().await?;
    let _ = client.flush().await;
    tracing::info!(last_seq = rewarder.ledger.last_seq(), "rewarder stopped");
    Ok(())
}

/// Applies the configured alpha to a loaded ledger; true when that changed it.
fn stored_alpha_differs(ledger: &mut Ledger, alpha: f64) -> bool {
    if ledger.alpha() == alpha {
        return false;
    }
    tracing::info!(from = ledger.alpha(), to = alpha, "smoothing factor changed");
    ledger.set_alpha(alpha);
    true
}

/// The stored ledger, for reporting (`sundara rewards`). `None` before the first verdict.
pub async fn read_ledger(js: &jetstream::Context) -> Result<Option<Ledger>, RewarderError> {
    let kv = js.get_key_value(subj::REWARDS_BUCKET).await.map_err(js_err)?;
    Ok(load_ledger(&kv).await?.0)
}

/// The weights of a closed epoch, or of the latest one when `epoch` is `None`.
pub async fn read_weights(js: &jetstream::Context, epoch: Option<u64>) -> Result<Option<EpochWeights>, RewarderError> {
    let kv = js.get_key_value(subj::REWARDS_BUCKET).await.map_err(js_err)?;
    let key = epoch.map_or_else(|| LATEST_WEIGHTS_KEY.to_string(), weights_key);
    let Some(bytes) = kv.get(key).await.map_err(js_err)? else {
        return Ok(None);
    };
    Ok(Some(decode(&bytes, MAX_MESSAGE_BYTES).map_err(CommonError::from)?))
}

/// Every reward trace stored in REWARDS, in stream order, one per verdict (for `sundara
/// rewards --explain`): those stored a flush per message ([`RewardTraces`]) and those an
/// older rewarder stored a task per message.
pub async fn read_traces(js: &jetstream::Context) -> Result<Vec<RewardTrace>, RewarderError> {
    let mut stream = js.get_stream(subj::REWARDS_STREAM).await.map_err(js_err)?;
    let last = stream.info().await.map_err(js_err)?.state.last_sequence;
    let mut traces = Vec::new();
    if last == 0 {
        return Ok(traces);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subj::REWARD_ALL.to_string(),
            ..Default::default()
        })
        .await
        .map_err(js_err)?;
    let mut messages = consumer.messages().await.map_err(js_err)?;
    let mut seen = std::collections::HashSet::new();
    loop {
        // Bounded: the stream may change while it is read.
        let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
        let Ok(Some(msg)) = next else { break };
        let msg = msg.map_err(js_err)?;
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(last);
        let stored = if subj::is_reward_traces(&msg.subject) {
            decode::<RewardTraces>(&msg.payload, MAX_MESSAGE_BYTES).map(|t| t.traces).unwrap_or_default()
        } else if subj::is_reward_task(&msg.subject) {
            decode::<RewardTrace>(&msg.payload, MAX_MESSAGE_BYTES).into_iter().collect()
        } else {
            Vec::new()
        };
        // A rewarder that restarted before storing its ledger stored some traces twice.
        traces.extend(stored.into_iter().filter(|t| seen.insert(t.verdict_seq)));
        if seq >= last {
            break;
        }
    }
    Ok(traces)
}
