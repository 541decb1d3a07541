//! NATS connection and the JetStream layout (streams, buckets) every service relies on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream};
use bytes::Bytes;
use sundara_schemas::subjects as subj;

use crate::retry::Backoff;
use crate::{Error, js_err};

/// Where NATS is, and which credentials to connect with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsEndpoint {
    pub url: String,
    /// An NKey seed file (as `sundara auth` writes them); `None` on a server without auth.
    pub credentials: Option<PathBuf>,
    /// TLS: the pinned CA (and a client certificate for mutual TLS); `None`: plain TCP,
    /// unless the URL is `tls://` (then the system's roots, which a private CA is not in).
    pub tls: Option<crate::tls::NatsTls>,
    /// A miner's hotkey: it connects by proving the hotkey (btauth/1 over the server's
    /// nonce, checked by the validator's auth callout) instead of with an NKey seed.
    pub hotkey: Option<HotkeyLogin>,
}

/// How a miner proves its hotkey to the validator's NATS: each connection (and each
/// reconnection) signs the server's fresh nonce for the validator's hotkey.
#[derive(Clone)]
pub struct HotkeyLogin {
    pub hotkey: std::sync::Arc<sundara_chain::Hotkey>,
    /// The validator's hotkey (SS58): the receiver the proof is signed for.
    pub receiver: String,
}

impl PartialEq for HotkeyLogin {
    fn eq(&self, other: &HotkeyLogin) -> bool {
        self.hotkey.account == other.hotkey.account && self.receiver == other.receiver
    }
}

impl Eq for HotkeyLogin {}

impl std::fmt::Debug for HotkeyLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HotkeyLogin({} for {})", self.hotkey.account, self.receiver)
    }
}

/// What a hotkey signs to join: method `CONNECT`, target `nats:<the server's nonce>`, no
/// body (btauth/1, [`sundara_chain::btauth`]). The nonce binds the proof to one
/// connection; the receiver to one validator.
pub const HOTKEY_JOIN_METHOD: &str = "CONNECT";

pub fn hotkey_join_target(server_nonce: &str) -> String {
    format!("nats:{server_nonce}")
}

impl HotkeyLogin {
    /// The proof for a connection the server sent `nonce`: the btauth/1 token (and its
    /// signature, sent as the connection's `sig` so that the server passes the nonce on).
    pub fn prove(&self, nonce: &str) -> async_nats::Auth {
        let signed = sundara_chain::Signed::sign(
            &self.hotkey,
            &self.receiver,
            HOTKEY_JOIN_METHOD,
            &hotkey_join_target(nonce),
            b"",
            sundara_chain::btauth::now_ns(),
        );
        let mut auth = async_nats::Auth::new();
        auth.token = Some(signed.to_token());
        auth.signature = Some(signed.signature.to_vec());
        auth
    }
}

impl NatsEndpoint {
    /// A server without authentication or TLS (a hand-started nats-server).
    pub fn open(url: impl Into<String>) -> NatsEndpoint {
        NatsEndpoint { url: url.into(), credentials: None, tls: None, hotkey: None }
    }

    /// This endpoint with `tls`.
    pub fn with_tls(mut self, tls: Option<crate::tls::NatsTls>) -> NatsEndpoint {
        self.tls = tls;
        self
    }
}

/// Why a seed is not a user's NKey seed.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Key(#[from] nkeys::error::Error),
    #[error("not a user's key (a seed starts with SU, a public key with U)")]
    NotUser,
}

/// An NKey user: its seed signs the server's challenge; its public key names it in the
/// server's config.
#[derive(Clone)]
pub struct Identity {
    seed: String,
    pub public_key: String,
}

impl Identity {
    pub fn from_seed(seed: &str) -> Result<Identity, SeedError> {
        let pair = nkeys::KeyPair::from_seed(seed.trim())?;
        if !pair.public_key().starts_with('U') {
            return Err(SeedError::NotUser);
        }
        Ok(Identity { seed: seed.trim().to_string(), public_key: pair.public_key() })
    }

    /// Whether `key` is a user's public key (`U…`, with a valid checksum).
    pub fn check_public_key(key: &str) -> Result<(), SeedError> {
        nkeys::KeyPair::from_public_key(key)?;
        if key.starts_with('U') { Ok(()) } else { Err(SeedError::NotUser) }
    }

    /// A new user key.
    pub fn generate() -> Identity {
        let pair = nkeys::KeyPair::new_user();
        Identity { seed: pair.seed().expect("a new key pair has a seed"), public_key: pair.public_key() }
    }

    /// Writes the seed file, readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        let bad = |e: std::io::Error| Error::NatsCredentials { path: path.to_path_buf(), reason: e.to_string() };
        let text = format!("# Sundara NATS user {}\n{}\n", self.public_key, self.seed);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(path).map_err(bad)?, text.as_bytes()).map_err(bad)
    }

    /// Reads a seed file: the first line that is a user seed (`SU…`), so comments may precede it.
    pub fn load(path: &Path) -> Result<Identity, Error> {
        let bad = |reason: String| Error::NatsCredentials { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let seed =
            text.lines().map(str::trim).find(|l| l.starts_with("SU")).ok_or_else(|| bad("no SU… seed".into()))?;
        Identity::from_seed(seed).map_err(|e| bad(e.to_string()))
    }

    /// Where this user's replies arrive. Only it may subscribe there, so no other user can
    /// read its request replies or JetStream acks.
    pub fn inbox_prefix(&self) -> String {
        inbox_prefix(&self.public_key)
    }
}

impl std::fmt::Debug for Identity {
    // Never print the seed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("public_key", &self.public_key).finish_non_exhaustive()
    }
}

/// The private inbox prefix of the user with `public_key`.
pub fn inbox_prefix(public_key: &str) -> String {
    format!("_INBOX_{public_key}")
}

/// What the server refused: publishing or subscribing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Publish,
    Subscribe,
}

impl std::fmt::Display for Operation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Operation::Publish => "publish to",
            Operation::Subscribe => "subscribe to",
        })
    }
}

/// A permissions violation the server reported on a connection: it refused `operation` on
/// `subject` for the connection's user (the message was dropped, the subscription never
/// made), and said so at once with `-ERR 'Permissions Violation for Publish to "<subject>"'`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub operation: Operation,
    pub subject: String,
}

impl Denial {
    /// Reads a server error's text (`Permissions Violation for Publish to "s"`, `… for
    /// Subscription to "s" using queue "q"`, `… for Publish with Reply of "s"`); `None` for
    /// any other error.
    pub fn parse(server_error: &str) -> Option<Denial> {
        let text = server_error.trim().trim_matches('\'');
        let (_, rest) = text.split_once("Permissions Violation for ")?;
        let operation = if rest.starts_with("Publish") {
            Operation::Publish
        } else if rest.starts_with("Subscription") {
            Operation::Subscribe
        } else {
            return None;
        };
        let (_, quoted) = rest.split_once('"')?;
        let (subject, _) = quoted.split_once('"')?;
        Some(Denial { operation, subject: subject.to_string() })
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.operation, self.subject)
    }
}

impl From<Denial> for Error {
    fn from(d: Denial) -> Error {
        Error::PermissionDenied { operation: d.operation, subject: d.subject }
    }
}

type DenialSenders = Vec<(std::sync::Weak<async_nats::Statistics>, tokio::sync::broadcast::Sender<Denial>)>;

/// The denials of every connection [`connect`] made, by connection (its statistics are
/// shared by all clones of its client and by nothing else).
static DENIALS: std::sync::Mutex<DenialSenders> = std::sync::Mutex::new(Vec::new());

fn denial_sender(client: &async_nats::Client) -> Option<tokio::sync::broadcast::Sender<Denial>> {
    let stats = std::sync::Arc::downgrade(&client.statistics());
    let senders = DENIALS.lock().unwrap_or_else(|e| e.into_inner());
    senders.iter().find(|(s, _)| s.ptr_eq(&stats)).map(|(_, tx)| tx.clone())
}

/// The permissions violations the server reports on one connection from now on. Every
/// request the server refuses would otherwise wait for its timeout: nothing answers a
/// message that was dropped. Race the work against [`Denials::guard`] to fail at once.
pub struct Denials {
    /// `None` for a connection not made by [`connect`]: nothing is ever reported.
    rx: Option<tokio::sync::broadcast::Receiver<Denial>>,
}

impl Denials {
    /// Starts watching `client`'s connection (made by [`connect`]).
    pub fn watch(client: &async_nats::Client) -> Denials {
        Denials { rx: denial_sender(client).map(|tx| tx.subscribe()) }
    }

    /// The next denial that `matches`, among those reported since [`Denials::watch`];
    /// pending forever if none comes.
    pub async fn next(&mut self, matches: impl Fn(&Denial) -> bool) -> Denial {
        use tokio::sync::broadcast::error::RecvError;
        let Some(rx) = self.rx.as_mut() else { return std::future::pending().await };
        loop {
            match rx.recv().await {
                Ok(denial) if matches(&denial) => return denial,
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return std::future::pending().await,
            }
        }
    }

    /// Runs `work` unless the server refuses something that `matches` first (or already
    /// did since [`Denials::watch`]): then it fails at once with that denial.
    pub async fn guard<F: Future>(&mut self, matches: impl Fn(&Denial) -> bool, work: F) -> Result<F::Output, Denial> {
        tokio::select! {
            denial = self.next(matches) => Err(denial),
            out = work => Ok(out),
        }
    }
}

/// Runs `work` on `client`'s connection unless the server refuses something that `matches`
/// meanwhile: a refused request fails in milliseconds with the denial (convert it into
/// [`Error::PermissionDenied`] with `?`) instead of waiting for its timeout.
pub async fn unless_denied<F: Future>(
    client: &async_nats::Client,
    matches: impl Fn(&Denial) -> bool,
    work: F,
) -> Result<F::Output, Denial> {
    Denials::watch(client).guard(matches, work).await
}

/// Connects to NATS; fails fast with a clear error when the server is not there or refuses
/// the credentials. The server's permissions violations on the connection are reported to
/// [`Denials`] (and logged).
pub async fn connect(endpoint: &NatsEndpoint, name: &str) -> Result<async_nats::Client, Error> {
    let url = &endpoint.url;
    let (denials, _) = tokio::sync::broadcast::channel::<Denial>(64);
    let reported = denials.clone();
    let connection = name.to_string();
    let base = match endpoint.hotkey.clone() {
        Some(login) => {
            // A hotkey's inbox is named by its address: the user key the server makes for
            // the connection is unknown to the client.
            let inbox = inbox_prefix(&login.hotkey.account.to_ss58());
            async_nats::ConnectOptions::with_auth_callback(move |nonce| {
                let auth = login.prove(&String::from_utf8_lossy(&nonce));
                async move { Ok(auth) }
            })
            .custom_inbox_prefix(inbox)
        }
        None => async_nats::ConnectOptions::new(),
    };
    let mut options = base
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .event_callback(move |event| {
            if let async_nats::Event::ServerError(async_nats::ServerError::Other(text)) = &event
                && let Some(denial) = Denial::parse(text)
            {
                // Info: a service logs it; a client command (warn and above) reports the
                // typed error its request fails with instead of printing it twice.
                tracing::info!(connection = %connection, "NATS permissions violation: not permitted to {denial}");
                let _ = reported.send(denial);
            } else {
                tracing::debug!(connection = %connection, %event, "NATS connection event");
            }
            async {}
        });
    if let Some(path) = &endpoint.credentials {
        let identity = Identity::load(path)?;
        options = options.nkey(identity.seed.clone()).custom_inbox_prefix(identity.inbox_prefix());
    }
    if let Some(tls) = &endpoint.tls {
        options = tls.apply(options)?;
    }
    // A comma-separated list names several servers of one cluster (the NATS convention):
    // the client starts with any that answers and fails over to the others.
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse().map_err(|e| Error::NatsConnect { url: u.to_string(), reason: format!("{e}") }))
        .collect::<Result<_, _>>()?;
    match tokio::time::timeout(Duration::from_secs(10), options.connect(servers)).await {
        Ok(Ok(client)) => {
            let mut senders = DENIALS.lock().unwrap_or_else(|e| e.into_inner());
            senders.retain(|(stats, _)| stats.strong_count() > 0);
            senders.push((std::sync::Arc::downgrade(&client.statistics()), denials));
            Ok(client)
        }
        Ok(Err(e)) if e.kind() == async_nats::ConnectErrorKind::AuthorizationViolation => match &endpoint.hotkey {
            Some(login) => Err(Error::NatsHotkeyRefused {
                url: url.to_string(),
                hotkey: login.hotkey.account.to_ss58(),
                validator: login.receiver.clone(),
            }),
            None => Err(Error::NatsRefused { url: url.to_string(), credentials: endpoint.credentials.clone() }),
        },
        Ok(Err(e)) if let Some(failure) = crate::tls::failure_of(&e) => {
            Err(Error::NatsTls { url: url.to_string(), failure, reason: e.to_string() })
        }
        Ok(Err(e)) => Err(Error::NatsConnect { url: url.to_string(), reason: e.to_string() }),
        Err(_) => Err(Error::NatsConnect { url: url.to_string(), reason: "timed out".into() }),
    }
}

/// [`Retention::task_linger`]'s default: ten minutes.
pub const DEFAULT_TASK_LINGER_SECS: u64 = 600;

/// Retention knobs of the streams.
#[derive(Clone, Debug)]
pub struct Retention {
    /// How long any task is kept at most: a backstop above the per-task TTL (the task's
    /// timeout plus [`Retention::task_linger`]) that ingress gives each task.
    pub tasks_max_age: Duration,
    /// How long a task stays in TASKS after its deadline: the scheduler dead-letters an
    /// expired task and the verifier decides one at deadline + grace within it (both read
    /// the task back). A scheduler stopped for longer than this cannot end the tasks that
    /// expired meanwhile (their clients see no result), so keep it above any outage the
    /// scheduler is expected to ride out.
    pub task_linger: Duration,
    /// Bytes of accepted tasks kept at most; beyond it ingress answers `overloaded`. Tenant
    /// byte quotas (`TenantLimits::max_stored_bytes`) keep any one tenant well below it.
    pub tasks_max_bytes: i64,
    /// How long deduplication by id (task, outcome, result) holds.
    pub duplicate_window: Duration,
    /// Copies of every stream, KV bucket and the object store in a JetStream cluster (1 on
    /// a single server; 3 survives the loss of one node).
    pub replicas: usize,
    /// Messages kept at most in each stream of per-task history (OUTCOMES, RESULTS,
    /// VERDICTS, REWARDS, DEAD), oldest dropped first; -1 keeps them for their age limit
    /// alone. The broker's memory grows with what it keeps (per-subject state: every task
    /// has its own subjects), so a long-running deployment caps it. Keep it well above any
    /// consumer's backlog: a message dropped before the verifier or rewarder reads it is lost.
    pub history_max_msgs: i64,
    /// How long miners' outcomes are kept (OUTCOMES): the verifier may lag this long.
    pub outcomes_max_age: Duration,
    /// How long results are kept (RESULTS): a client may be away this long and still
    /// collect its results.
    pub results_max_age: Duration,
    /// How long the records are kept (VERDICTS, REWARDS, DEAD).
    pub records_max_age: Duration,
    /// Bytes of dead letters and dead tasks' copies kept at most (DEAD), oldest dropped
    /// first: a tenant whose tasks all expire cannot fill the broker with them.
    pub dead_max_bytes: i64,
    /// How long a job's record, inputs and outputs are kept after their last change.
    pub jobs_max_age: Duration,
    /// Bytes of job inputs and outputs kept at most (the jobs service refuses new parts
    /// beyond it; each job is also capped, `sundara jobs serve --max-job-bytes`).
    pub job_data_max_bytes: i64,
    /// The history ages above were given by the operator ([`HistoryArgs`]): provisioning
    /// brings existing streams to them. Otherwise an existing stream keeps its own.
    pub history_ages_given: bool,
}

/// Shortest age a history stream may be given: under it an outcome could leave before the
/// verifier (or a client, a result) had a fair chance to read it.
pub const MIN_HISTORY_AGE_SECS: u64 = 60;

/// How long the history streams keep their messages. Disk and broker memory grow with
/// rate × age, so a deployment sizes these to its store (docs/deployment.md, "Sizing the
/// streams"). Every validator service and `up` take them; each provisions the streams at
/// start, so give all of them the same values (one environment).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct HistoryArgs {
    /// Seconds miners' outcomes are kept (OUTCOMES): the verifier may lag this long behind
    /// without losing one [default: 86400, or what the stream has]
    #[arg(long, global = true, env = "SUNDARA_OUTCOMES_MAX_AGE_SECS", value_parser = history_age)]
    pub outcomes_max_age_secs: Option<u64>,
    /// Seconds results are kept (RESULTS): a client may be away this long and still
    /// collect its results [default: 86400, or what the stream has]
    #[arg(long, global = true, env = "SUNDARA_RESULTS_MAX_AGE_SECS", value_parser = history_age)]
    pub results_max_age_secs: Option<u64>,
    /// Seconds the records are kept (VERDICTS, REWARDS, DEAD): `rewards --explain` and
    /// `tasks dead --resubmit` reach this far back [default: 2592000, or what the stream has]
    #[arg(long, global = true, env = "SUNDARA_RECORDS_MAX_AGE_SECS", value_parser = history_age)]
    pub records_max_age_secs: Option<u64>,
}

fn history_age(text: &str) -> Result<u64, String> {
    let secs: u64 = text.parse().map_err(|e| format!("{e}"))?;
    if secs < MIN_HISTORY_AGE_SECS {
        return Err(format!("at least {MIN_HISTORY_AGE_SECS} s"));
    }
    Ok(secs)
}

impl HistoryArgs {
    /// `retention` with the ages given here; the others as they are.
    pub fn apply(&self, mut retention: Retention) -> Retention {
        let given = [self.outcomes_max_age_secs, self.results_max_age_secs, self.records_max_age_secs];
        if given.iter().all(Option::is_none) {
            return retention;
        }
        let secs = Duration::from_secs;
        retention.outcomes_max_age = self.outcomes_max_age_secs.map_or(retention.outcomes_max_age, secs);
        retention.results_max_age = self.results_max_age_secs.map_or(retention.results_max_age, secs);
        retention.records_max_age = self.records_max_age_secs.map_or(retention.records_max_age, secs);
        retention.history_ages_given = true;
        retention
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            tasks_max_age: Duration::from_secs(24 * 3600),
            task_linger: Duration::from_secs(DEFAULT_TASK_LINGER_SECS),
            tasks_max_bytes: 4 << 30,
            duplicate_window: Duration::from_secs(600),
            replicas: 1,
            history_max_msgs: -1,
            outcomes_max_age: Duration::from_secs(24 * 3600),
            results_max_age: Duration::from_secs(24 * 3600),
            records_max_age: Duration::from_secs(30 * 24 * 3600),
            dead_max_bytes: 1 << 30,
            jobs_max_age: Duration::from_secs(7 * 24 * 3600),
            job_data_max_bytes: 2 << 30,
            history_ages_given: false,
        }
    }
}

fn stream_config(name: &str, subjects: &str, max_age: Duration, r: &Retention) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec![subjects.to_string()],
        retention: stream::RetentionPolicy::Limits,
        max_age,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: r.duplicate_window.min(max_age),
        storage: stream::StorageType::File,
        allow_direct: true,
        num_replicas: r.replicas.max(1),
        ..Default::default()
    }
}

/// Creates `config`'s stream if it is missing, and brings an existing one up to what this
/// version needs of it (subjects, per-message TTL) and, with `set_age`, to `config`'s age
/// (an operator gave it), leaving its other settings as they are: an operator may have
/// tuned them.
async fn ensure_stream(js: &jetstream::Context, config: stream::Config, set_age: bool) -> Result<(), Error> {
    let mut stream = js.get_or_create_stream(config.clone()).await.map_err(js_err)?;
    let current = stream.info().await.map_err(js_err)?.config.clone();
    let missing_subjects = config.subjects.iter().any(|s| !current.subjects.contains(s));
    let new_age = set_age && current.max_age != config.max_age;
    if missing_subjects || new_age || (config.allow_message_ttl && !current.allow_message_ttl) {
        let mut subjects = current.subjects.clone();
        subjects.extend(config.subjects.iter().filter(|s| !current.subjects.contains(s)).cloned());
        let (max_age, duplicate_window) = match new_age {
            true => (config.max_age, current.duplicate_window.min(config.max_age)),
            false => (current.max_age, current.duplicate_window),
        };
        let updated = stream::Config {
            subjects,
            allow_message_ttl: current.allow_message_ttl || config.allow_message_ttl,
            max_age,
            duplicate_window,
            ..current
        };
        js.update_stream(updated).await.map_err(js_err)?;
        if new_age {
            tracing::info!(stream = %config.name, max_age_s = config.max_age.as_secs(), "stream's age limit set");
        }
    }
    Ok(())
}

/// Creates the streams, KV buckets and object store if they are missing. Idempotent; every
/// service calls it at start so that start order does not matter.
pub async fn provision(js: &jetstream::Context, r: &Retention) -> Result<(), Error> {
    let day = Duration::from_secs(24 * 3600);
    let tasks = stream::Config {
        max_bytes: r.tasks_max_bytes,
        // A full TASKS stream refuses new tasks instead of dropping accepted ones.
        discard: stream::DiscardPolicy::New,
        // Each task leaves when it can no longer be dispatched, reassigned or decided
        // (ingress sets its TTL), without a delete per task on the hot path.
        allow_message_ttl: true,
        ..stream_config(subj::TASKS_STREAM, subj::TASK_ALL, r.tasks_max_age, r)
    };
    let work = stream::Config {
        retention: stream::RetentionPolicy::WorkQueue,
        ..stream_config(subj::WORK_STREAM, subj::WORK_ALL, day, r)
    };
    let history = |name: &str, subjects: &str, max_age: Duration| stream::Config {
        max_messages: r.history_max_msgs,
        ..stream_config(name, subjects, max_age, r)
    };
    let dead = stream::Config {
        subjects: vec![subj::DEAD_ALL.to_string(), subj::DEAD_TASK_ALL.to_string()],
        max_bytes: r.dead_max_bytes,
        ..history(subj::DEAD_STREAM, subj::DEAD_ALL, r.records_max_age)
    };
    let given = r.history_ages_given;
    let streams = [
        (tasks, false),
        (work, false),
        (history(subj::OUTCOMES_STREAM, subj::OUTCOME_ALL, r.outcomes_max_age), given),
        (history(subj::RESULTS_STREAM, subj::RESULT_ALL, r.results_max_age), given),
        (history(subj::VERDICTS_STREAM, subj::VERDICT_ALL, r.records_max_age), given),
        (history(subj::REWARDS_STREAM, subj::REWARD_ALL, r.records_max_age), given),
        (dead, given),
    ];
    for (config, set_age) in streams {
        ensure_stream(js, config, set_age).await?;
    }
    let replicas = r.replicas.max(1);
    for (bucket, history) in [(subj::MODELS_BUCKET, 8), (subj::REWARDS_BUCKET, 16), (subj::VALIDATOR_BUCKET, 8)] {
        ensure_kv(js, kv::Config { bucket: bucket.to_string(), history, num_replicas: replicas, ..Default::default() })
            .await?;
    }
    // Jobs: their records and their data leave a week after their last change (a job's
    // deadline is capped below that, docs/jobs.md §3).
    let jobs = subj::JOBS_BUCKET.to_string();
    ensure_kv(
        js,
        kv::Config { bucket: jobs, history: 1, max_age: r.jobs_max_age, num_replicas: replicas, ..Default::default() },
    )
    .await?;
    let job_data = object_store::Config {
        bucket: subj::JOB_DATA.to_string(),
        max_age: r.jobs_max_age,
        max_bytes: r.job_data_max_bytes,
        num_replicas: replicas,
        ..Default::default()
    };
    ensure_object_store(js, job_data).await?;
    // Last: `await_provisioned` waits for it.
    let blobs =
        object_store::Config { bucket: subj::MODEL_BLOBS.to_string(), num_replicas: replicas, ..Default::default() };
    ensure_object_store(js, blobs).await?;
    Ok(())
}

/// Creates the KV bucket `config` names if it is missing (an existing one keeps its settings).
async fn ensure_kv(js: &jetstream::Context, config: kv::Config) -> Result<(), Error> {
    if js.get_key_value(&config.bucket).await.is_err() {
        js.create_key_value(config).await.map_err(js_err)?;
    }
    Ok(())
}

/// Creates the object store `config` names if it is missing.
async fn ensure_object_store(js: &jetstream::Context, config: object_store::Config) -> Result<(), Error> {
    if js.get_object_store(&config.bucket).await.is_err() {
        js.create_object_store(config).await.map_err(js_err)?;
    }
    Ok(())
}

/// Waits (bounded by `within`) until the streams exist: for processes that may not create
/// them (miners), started alongside the validator services that do.
pub async fn await_provisioned(js: &jetstream::Context, within: Duration) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + within;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2)).until(deadline);
    loop {
        // The object store is the last thing `provision` creates.
        if js.get_object_store(subj::MODEL_BLOBS).await.is_ok() {
            return Ok(());
        }
        if !backoff.wait().await {
            let missing = format!("streams not provisioned within {within:?} (is the validator up?)");
            return Err(crate::JetStreamError::new(crate::JetStreamErrorKind::TimedOut, missing).into());
        }
    }
}

/// Publishes to JetStream and waits for the stream's ack: the durable hand-off.
/// `id` becomes Nats-Msg-Id, so a retried publish is stored once; the current span's trace
/// context rides along in the headers. Returns the ack.
pub async fn publish_durable(
    js: &jetstream::Context,
    subject: String,
    id: &str,
    payload: Vec<u8>,
) -> Result<jetstream::publish::PublishAck, Error> {
    publish_built(js, subject, durable_message(id, payload)).await
}

/// Publishes a message already built (headers, id) and waits for the stream's ack.
pub async fn publish_built(
    js: &jetstream::Context,
    subject: String,
    msg: jetstream::message::PublishMessage,
) -> Result<jetstream::publish::PublishAck, Error> {
    js.send_publish(subject, msg).await.map_err(js_err)?.await.map_err(js_err)
}

/// Publishes the one message a subject may ever hold (a task's result, verdict or dead
/// letter): stored only while the subject is empty (`Nats-Expected-Last-Subject-Sequence:
/// 0`), so a decision made again after the duplicate window (outcomes redelivered hours
/// later, a verifier that forgot the task) cannot store a second one. Returns `true` if
/// this call stored it, `false` if the subject already held a message (this one, stored
/// by an earlier try, or another decision's).
pub async fn publish_once(js: &jetstream::Context, subject: String, id: &str, payload: Vec<u8>) -> Result<bool, Error> {
    use async_nats::jetstream::context::PublishErrorKind;
    let msg = durable_message(id, payload).expected_last_subject_sequence(0);
    let stored = async { js.send_publish(subject, msg).await?.await };
    match stored.await {
        Ok(ack) => Ok(!ack.duplicate),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
        Err(e) => Err(js_err(e)),
    }
}

/// Publishes task `id` to TASKS (as [`publish_durable`]) with a per-message TTL: it leaves
/// the stream `ttl` after it is stored (whole seconds, at least one).
pub async fn publish_task(
    js: &jetstream::Context,
    subject: String,
    id: &str,
    payload: Vec<u8>,
    ttl: Duration,
) -> Result<jetstream::publish::PublishAck, Error> {
    let ttl = Duration::from_secs(ttl.as_secs_f64().ceil().max(1.0) as u64);
    let msg = durable_message(id, payload).ttl(ttl);
    js.send_publish(subject, msg).await.map_err(js_err)?.await.map_err(js_err)
}

/// Copies dead task `task_id`'s message (sequence `task_seq` in TASKS) into DEAD, once,
/// so that it can be resubmitted after TASKS has let it go. A task already gone from
/// TASKS is no error: there is nothing left to keep.
pub async fn keep_dead_task(
    js: &jetstream::Context,
    tasks: &stream::Stream,
    task_id: &str,
    task_seq: u64,
) -> Result<(), Error> {
    let Ok(raw) = tasks.get_raw_message(task_seq).await else { return Ok(()) };
    publish_once(js, subj::dead_task(task_id), &format!("{task_id}.task"), raw.payload.to_vec()).await?;
    Ok(())
}

/// A WORK message's assignments, each with its own `traceparent` when it carries one
/// (see [`sundara_schemas::decode_work`]).
pub fn work_of_message(
    msg: &async_nats::Message,
) -> Result<Vec<(sundara_schemas::Assignment, Option<String>)>, sundara_schemas::DecodeError> {
    let batched = msg.headers.as_ref().is_some_and(|h| h.get(subj::ASSIGNMENTS).is_some());
    sundara_schemas::decode_work(batched, &msg.payload)
}

/// A JetStream message with Nats-Msg-Id `id` and the current span's trace context.
pub fn durable_message(id: &str, payload: Vec<u8>) -> jetstream::message::PublishMessage {
    let msg = jetstream::message::PublishMessage::build();
    let msg = match crate::telemetry::context_headers() {
        Some(headers) => msg.headers(headers),
        None => msg,
    };
    msg.payload(Bytes::from(payload)).message_id(id)
}

/// Sundara's durable pull consumer settings: explicit acks, `filter`, `ack_wait`, and at
/// most `max_ack_pending` delivered but un-acked.
pub fn consumer_config(
    durable: &str,
    filter: &str,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> jetstream::consumer::pull::Config {
    jetstream::consumer::pull::Config {
        durable_name: Some(durable.to_string()),
        filter_subject: filter.to_string(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait,
        max_ack_pending,
        ..Default::default()
    }
}

/// A durable pull consumer on `stream` with `config` (see [`consumer_config`]), created if
/// missing. One that exists with another ack policy (which JetStream cannot change in
/// place) is made anew, starting after its ack floor: what it had not seen acked is
/// delivered again, which its handlers take as they take any redelivery.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    mut config: jetstream::consumer::pull::Config,
) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::Config>, Error> {
    let stream = js.get_stream(stream).await.map_err(js_err)?;
    let durable = config.durable_name.clone().unwrap_or_default();
    if let Ok(info) = stream.consumer_info(&durable).await {
        if info.config.ack_policy != config.ack_policy {
            let floor = info.ack_floor.stream_sequence;
            tracing::info!(consumer = %durable, floor, ack_policy = ?config.ack_policy, "ack policy changed; recreating the consumer after its ack floor");
            stream.delete_consumer(&durable).await.map_err(js_err)?;
            config.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: floor + 1 };
        } else if info.config.ack_wait != config.ack_wait {
            // Changed in place (a release that shortened it): its deliveries are kept.
            tracing::info!(consumer = %durable, ack_wait = ?config.ack_wait, "ack wait changed; updating the consumer");
            let update = jetstream::consumer::pull::Config { deliver_policy: info.config.deliver_policy, ..config };
            return stream.update_consumer(update).await.map_err(js_err);
        }
    }
    stream.get_or_create_consumer(&durable, config).await.map_err(js_err)
}

/// A durable pull consumer on `stream` with [`consumer_config`], created if missing.
pub async fn durable_consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter: &str,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::Config>, Error> {
    ensure_consumer(js, stream, consumer_config(durable, filter, ack_wait, max_ack_pending)).await
}

/// A JetStream message's server timestamp (when the stream stored it), in Unix microseconds.
pub fn stored_at_us(msg: &jetstream::Message) -> Option<u64> {
    let info = msg.info().ok()?;
    u64::try_from(info.published.unix_timestamp_nanos() / 1_000).ok()
}

/// How long one pull request of [`pull`] waits at the server before it is made again.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// How often the server confirms, while a pull request of [`pull`] waits, that it still
/// holds it. Two missed in a row mean it is gone.
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

/// A durable consumer's messages, pulled for as long as the stream is read, and pulled
/// anew as soon as a pull request is lost.
///
/// A pull request waits at the consumer's leader. When that node dies, the request dies
/// with it, and the new leader knows nothing of it. If this client is connected to another
/// node, its connection never drops, so it gets no signal to pull again. async-nats makes a
/// lost request again only at its expiry plus 5 s, which is 35 s by default. Until then
/// nothing is delivered: tasks waited out their deadlines behind a lost pull
/// (`tests/faults.rs::cluster_losing_the_leading_node_loses_no_task`). Here the server
/// sends a heartbeat every second while the request waits, and two missed heartbeats
/// start a new pull request at once.
pub fn pull(
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
) -> futures::stream::BoxStream<'static, Result<jetstream::Message, Error>> {
    use futures::StreamExt;
    use jetstream::consumer::pull::MessagesErrorKind;
    type Pulling = Option<jetstream::consumer::pull::Stream>;
    let consumer = consumer.clone();
    futures::stream::unfold((consumer, Pulling::None), |(consumer, mut pulling)| async move {
        loop {
            let messages = match pulling.as_mut() {
                Some(messages) => messages,
                None => {
                    let started = consumer.stream().expires(PULL_EXPIRES).heartbeat(PULL_HEARTBEAT).messages().await;
                    match started {
                        Ok(messages) => pulling.insert(messages),
                        Err(e) => {
                            // Bounded retries: the caller sees each failure.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            return Some((Err(js_err(e)), (consumer, None)));
                        }
                    }
                }
            };
            match messages.next().await {
                Some(Err(e)) if e.kind() == MessagesErrorKind::MissingHeartbeat => {
                    let name = consumer.cached_info().name.clone();
                    tracing::info!(consumer = %name, "pull request lost (no heartbeat); pulling again");
                    pulling = None;
                }
                Some(item) => return Some((item.map_err(js_err), (consumer, pulling))),
                None => return None,
            }
        }
    })
    .boxed()
}

/// Handles a durable consumer's messages, `concurrency` at a time, until `shutdown`.
pub async fn consume<F, Fut>(
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    shutdown: &crate::Shutdown,
    concurrency: usize,
    handle: F,
) -> Result<(), Error>
where
    F: Fn(jetstream::Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::StreamExt;
    pull(consumer)
        .take_until(shutdown.cancelled())
        .for_each_concurrent(concurrency, |m| async {
            match m {
                Ok(msg) => handle(msg).await,
                Err(e) => tracing::warn!(error = %e, "consumer"),
            }
        })
        .await;
    Ok(())
}

/// Handles a durable consumer's messages a chunk at a time (what is ready, up to
/// `max_chunk`, all at once) and acks each chunk cumulatively: the consumer's config must
/// have [`jetstream::consumer::AckPolicy::All`] (see [`acking_all`]), and one ack for the
/// chunk's newest message covers the rest, where one ack per message was one NATS
/// message per task. For consumers whose handling is quick and idempotent: a handling that
/// fails is tried again, with back-off, until it succeeds or `shutdown`, so an ack never
/// covers a message that was not handled (at shutdown the chunk stays un-acked and is
/// delivered again).
pub async fn consume_acking_all<F, Fut, E>(
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    shutdown: &crate::Shutdown,
    max_chunk: usize,
    what: &str,
    handle: F,
) -> Result<(), Error>
where
    F: Fn(jetstream::Message) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use futures::StreamExt;
    let chunks = pull(consumer).take_until(shutdown.cancelled()).ready_chunks(max_chunk.max(1));
    tokio::pin!(chunks);
    while let Some(chunk) = chunks.next().await {
        let msgs: Vec<jetstream::Message> = chunk
            .into_iter()
            .filter_map(|m| m.inspect_err(|e| tracing::warn!(error = %e, consumer = what, "consumer")).ok())
            .collect();
        let handled = msgs.iter().map(|msg| async {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            loop {
                // A clone (the handlers here read headers only): the chunk keeps each message to ack.
                match handle(msg.clone()).await {
                    Ok(()) => return true,
                    Err(e) => tracing::warn!(error = %e, consumer = what, "handling failed; trying again"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return false,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        });
        if !futures::future::join_all(handled).await.into_iter().all(|done| done) {
            return Ok(());
        }
        let seqs: Vec<u64> = msgs.iter().map(|m| m.info().map_or(0, |i| i.stream_sequence)).collect();
        for msg in &msgs[first_to_ack(&seqs)..] {
            // A lost ack only means a redelivery, which the handler takes again.
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, consumer = what, "ack failed; the chunk will be delivered again");
            }
        }
    }
    Ok(())
}

/// `config` acking cumulatively, for [`consume_acking_all`].
pub fn acking_all(config: jetstream::consumer::pull::Config) -> jetstream::consumer::pull::Config {
    jetstream::consumer::pull::Config { ack_policy: jetstream::consumer::AckPolicy::All, ..config }
}

/// Of deliveries of a consumer that acks cumulatively, with these stream sequences (in
/// delivery order), the index from which they must be acked: the newest message's ack
/// covers those before it, and a redelivery after it (an older message delivered again)
/// gets its own.
pub fn first_to_ack(seqs: &[u64]) -> usize {
    seqs.iter().enumerate().max_by_key(|(_, seq)| **seq).map_or(0, |(i, _)| i)
}

/// How much work waits where: what an operator watches for backlog.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// Per priority (as [`sundara_schemas::Priority::ALL`]): tasks stored but not yet taken
    /// by a scheduler, and taken but not yet dispatched (waiting for capacity).
    pub tasks: [(u64, u64); 3],
    /// WORK messages queued for workers (each one assignment, or several for one worker
    /// and model: [`sundara_schemas::Assignments`]).
    pub work: u64,
    /// Outcomes the verifier has not read yet.
    pub outcomes: u64,
    /// Verdicts the rewarder has not read yet.
    pub verdicts: u64,
}

impl QueueDepths {
    /// `(queue, depth)` as the `sundara_queue_depth` gauge labels them.
    pub fn labelled(&self) -> Vec<(&'static str, u64)> {
        let [high, normal, low] = self.tasks;
        vec![
            ("tasks_high", high.0),
            ("tasks_normal", normal.0),
            ("tasks_low", low.0),
            ("work", self.work),
            ("outcomes", self.outcomes),
            ("verdicts", self.verdicts),
        ]
    }
}

/// Reads the queue depths from the streams and the services' durable consumers (a consumer
/// not created yet counts as empty).
pub async fn queue_depths(js: &jetstream::Context) -> Result<QueueDepths, Error> {
    let mut depths = QueueDepths::default();
    let tasks = js.get_stream(subj::TASKS_STREAM).await.map_err(js_err)?;
    for (i, p) in sundara_schemas::Priority::ALL.iter().enumerate() {
        if let Ok(info) = tasks.consumer_info(format!("scheduler-{}", p.as_str())).await {
            depths.tasks[i] = (info.num_pending, info.num_ack_pending as u64);
        }
    }
    let mut work = js.get_stream(subj::WORK_STREAM).await.map_err(js_err)?;
    depths.work = work.info().await.map_err(js_err)?.state.messages;
    let pending = |stream: &'static str, consumer: &'static str| async move {
        let stream = js.get_stream(stream).await.map_err(js_err)?;
        Ok::<u64, Error>(stream.consumer_info(consumer).await.map_or(0, |i| i.num_pending))
    };
    depths.outcomes = pending(subj::OUTCOMES_STREAM, "verifier").await?;
    depths.verdicts = pending(subj::VERDICTS_STREAM, "rewarder").await?;
    Ok(depths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cumulative_ack_goes_to_the_newest_delivery_and_the_redeliveries_after_it() {
        assert_eq!(first_to_ack(&[]), 0);
        // In order: one cumulative ack, the last.
        assert_eq!(first_to_ack(&[4, 5, 6, 7]), 3);
        // 3 redelivered after 7: acked itself, since a cumulative ack by delivery order would miss it.
        assert_eq!(first_to_ack(&[4, 5, 7, 3]), 2);
    }

    #[test]
    fn permissions_violations_are_read_from_server_errors() {
        let publish = Denial::parse(r#"Permissions Violation for Publish to "sundara.submit.b""#);
        assert_eq!(publish, Some(Denial { operation: Operation::Publish, subject: "sundara.submit.b".into() }));
        let queue = Denial::parse(r#"'Permissions Violation for Subscription to "sundara.result.>" using queue "q"'"#);
        assert_eq!(queue, Some(Denial { operation: Operation::Subscribe, subject: "sundara.result.>".into() }));
        let reply = Denial::parse(r#"Permissions Violation for Publish with Reply of "_INBOX.x""#);
        assert_eq!(reply.map(|d| d.subject), Some("_INBOX.x".to_string()));
        assert_eq!(Denial::parse("Authorization Violation"), None);
        assert_eq!(Denial::parse("Maximum Payload Violation"), None);
        let error = Error::from(publish.unwrap());
        assert!(matches!(error, Error::PermissionDenied { operation: Operation::Publish, .. }));
        assert_eq!(error.to_string(), "not permitted: these NATS credentials may not publish to sundara.submit.b");
    }
}
