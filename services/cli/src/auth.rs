//! Least privilege on NATS: one NKey user per validator, tenant and miner, each allowed
//! only its own subjects. `sundara auth init` writes the users' seed files and the
//! server's `authorization` block (include it from nats-server's config and reload).
//!
//! - **validator** (ingress, scheduler, verifier, rewarder, autoscaler, operators): everything.
//! - **tenant `t`**: publish on `sundara.submit.t` and `sundara.jobs.t.*` (its job
//!   requests), subscribe to `sundara.jobevent.t.>`; read the registry; read results only
//!   through its own RESULTS consumers, named `results-t-<slot>` one by one and filtered to
//!   `sundara.result.t.>`; no other consumer on RESULTS (ingress's, other tenants').
//! - **miner `w`**: read the registry; pull only from its own WORK consumer (filter
//!   `sundara.work.*.w`); publish outcomes only as `w`, reports only on
//!   `sundara.report.w`; answer commands on `sundara.control.w`.
//!
//! Every user receives replies only on its own inbox prefix (`_INBOX_<public key>`), so no
//! one can read another's replies or JetStream acks.
//!
//! A miner makes its own key (`sundara auth keygen --miner w`, on its own machine) and
//! hands the validator only the public key (`sundara auth add --miner w --public-key U…`),
//! which the users' directory keeps as `miner-w.pub`: the validator never holds a miner's
//! seed. `init --miner w` still makes seeds for miners run on the validator's machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::client::{RESULT_FOLLOWERS, results_consumer};
use sundara_common::nats::{Identity, inbox_prefix};
use sundara_schemas::subjects as subj;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0:?} is not a valid name (1-64 of [A-Za-z0-9_-])")]
    InvalidName(String),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(transparent)]
    Credentials(#[from] sundara_common::Error),
    /// The credentials belong to someone else than the command says (`--tenant`, `--id`).
    #[error("your credentials are {}'s; {flag} {value} is not permitted", .credentials.stem())]
    NotYours { credentials: Role, flag: &'static str, value: String },
    /// The credentials are of a role that cannot do this at all.
    #[error("your credentials are {}'s: {what}", .credentials.stem())]
    WrongRole { credentials: Role, what: &'static str },
    #[error("the running stack's NATS has no users to add to (it runs without auth)")]
    NoAuth,
    #[error(transparent)]
    Reload(#[from] crate::stack::StackError),
    #[error("{key:?} is not a user's public key (U…, 56 characters): {reason}")]
    NotPublicKey { key: String, reason: String },
    /// A role already has another key: a key is never replaced silently.
    #[error("{role} already has key {known}; remove {} first to give it {offered}", .path.display())]
    OtherKey { role: Role, known: String, offered: String, path: PathBuf },
}

/// The server refused a command's credentials something the command needs.
#[derive(Debug, thiserror::Error)]
#[error("not permitted: {} cannot {denial}; {need}", whose(.credentials.as_deref()))]
pub struct NotPermitted {
    /// The seed file the command connected with.
    pub credentials: Option<PathBuf>,
    pub denial: sundara_common::nats::Denial,
    /// What the command needs instead (`model pushes need the validator's credentials`).
    pub need: String,
}

/// `tenant acme's credentials`, as the seed file's name tells.
fn whose(credentials: Option<&Path>) -> String {
    match credentials {
        None => "a connection without credentials".into(),
        Some(path) => match Role::of_credentials(path) {
            Some(Role::Validator) => "the validator's credentials".into(),
            Some(role) => format!("{role}'s credentials"),
            None => format!("the credentials {}", path.display()),
        },
    }
}

/// Who a user is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The operators' user: provisions the streams, pushes models, runs the CLI.
    Validator,
    /// One validator service: only its own subjects.
    Service(Service),
    /// The validator's own worker pools (compose, Nomad, an autoscaler's), whose worker ids
    /// are known only when each starts: a miner under any id.
    Pool,
    Tenant(String),
    Miner(String),
}

/// The validator services, each its own NATS user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Ingress,
    Scheduler,
    Verifier,
    Rewarder,
    Autoscaler,
    Gateway,
    /// `sundara jobs serve`: tenants' batch jobs.
    Jobs,
    /// `sundara chain serve`: the metagraph sync and the auth callout that lets miners in
    /// by their hotkeys.
    Chain,
}

impl Service {
    pub const ALL: [Service; 8] = [
        Service::Ingress,
        Service::Scheduler,
        Service::Verifier,
        Service::Rewarder,
        Service::Autoscaler,
        Service::Gateway,
        Service::Jobs,
        Service::Chain,
    ];

    /// Its subcommand's name: `ingress`, `scheduler`, ...
    pub fn name(self) -> &'static str {
        match self {
            Service::Ingress => "ingress",
            Service::Scheduler => "scheduler",
            Service::Verifier => "verifier",
            Service::Rewarder => "rewarder",
            Service::Autoscaler => "autoscaler",
            Service::Gateway => "gateway",
            Service::Jobs => "jobs",
            Service::Chain => "chain",
        }
    }

    pub fn from_name(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl std::fmt::Display for Role {
    /// `validator`, `tenant acme`, `miner m1`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Validator => f.write_str("validator"),
            Role::Service(s) => write!(f, "service {}", s.name()),
            Role::Pool => f.write_str("worker pool"),
            Role::Tenant(t) => write!(f, "tenant {t}"),
            Role::Miner(w) => write!(f, "miner {w}"),
        }
    }
}

impl Role {
    /// Its seed file's name in the credentials directory.
    pub fn file_name(&self) -> String {
        format!("{}.nk", self.stem())
    }

    /// `validator`, `service-ingress`, `pool`, `tenant-acme`, `miner-m1`: its seed file's
    /// name without `.nk`.
    pub fn stem(&self) -> String {
        match self {
            Role::Validator => "validator".into(),
            Role::Service(s) => format!("service-{}", s.name()),
            Role::Pool => "pool".into(),
            Role::Tenant(t) => format!("tenant-{t}"),
            Role::Miner(w) => format!("miner-{w}"),
        }
    }

    /// Whose a seed file is, by its name (as `init` names them); `None` for another name.
    pub fn of_credentials(path: &Path) -> Option<Role> {
        Role::from_file_name(path.file_name()?.to_str()?)
    }

    /// The file holding only its public key, for a user whose seed is elsewhere.
    pub fn public_key_file_name(&self) -> String {
        format!("{}.pub", self.stem())
    }

    /// The role its [`Display`](std::fmt::Display) names (`tenant acme`, `worker pool`).
    fn from_display(text: &str) -> Option<Role> {
        let role = match text {
            "validator" => Role::Validator,
            "worker pool" => Role::Pool,
            _ => match text.split_once(' ')? {
                ("service", s) => Role::Service(Service::from_name(s)?),
                ("tenant", t) if subj::is_token(t) => Role::Tenant(t.to_string()),
                ("miner", w) if subj::is_token(w) => Role::Miner(w.to_string()),
                _ => return None,
            },
        };
        Some(role)
    }

    fn from_file_name(name: &str) -> Option<Role> {
        Role::from_stem(name.strip_suffix(".nk")?)
    }

    fn from_stem(stem: &str) -> Option<Role> {
        let role = match stem {
            "validator" => Role::Validator,
            "pool" => Role::Pool,
            _ => match stem.split_once('-')? {
                ("service", s) => Role::Service(Service::from_name(s)?),
                ("tenant", t) => Role::Tenant(t.to_string()),
                ("miner", w) => Role::Miner(w.to_string()),
                _ => return None,
            },
        };
        let named = match &role {
            Role::Validator | Role::Service(_) | Role::Pool => true,
            Role::Tenant(n) | Role::Miner(n) => subj::is_token(n),
        };
        named.then_some(role)
    }
}

/// The tenant a command acts as: `flag` (`--tenant`) if given, else the tenant whose
/// credentials `creds` are, else `default`. Credentials of another tenant than `flag`, or a
/// miner's, are refused here rather than by the server (whose refusal looks like silence).
/// Seed files named otherwise than `init` names them cannot be told apart: `flag` or
/// `default` then, and the server decides.
pub fn tenant_of(creds: Option<&Path>, flag: Option<&str>) -> Result<String, AuthError> {
    let role = creds.and_then(Role::of_credentials);
    match (role, flag) {
        (Some(Role::Tenant(own)), Some(flag)) if own != flag => {
            Err(AuthError::NotYours { credentials: Role::Tenant(own), flag: "--tenant", value: flag.to_string() })
        }
        (Some(Role::Tenant(own)), _) => Ok(own),
        (Some(other @ (Role::Miner(_) | Role::Pool | Role::Service(_))), _) => {
            Err(AuthError::WrongRole { credentials: other, what: "only a tenant (or the validator) submits tasks" })
        }
        (_, Some(flag)) => Ok(flag.to_string()),
        (_, None) => Ok("default".into()),
    }
}

/// Checks that a worker started as `id` has credentials that can be `id`'s: not another
/// miner's, nor a tenant's (the validator's can act as any miner).
pub fn check_miner(creds: Option<&Path>, id: &str) -> Result<(), AuthError> {
    match creds.and_then(Role::of_credentials) {
        Some(Role::Miner(own)) if own != id => {
            Err(AuthError::NotYours { credentials: Role::Miner(own), flag: "--id", value: id.to_string() })
        }
        Some(other @ (Role::Tenant(_) | Role::Service(_))) => {
            Err(AuthError::WrongRole { credentials: other, what: "only a miner (or the pool) runs a worker" })
        }
        _ => Ok(()),
    }
}

/// Subjects a user may publish to and subscribe to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer requests it received (a miner's control replies) without a publish grant.
    pub allow_responses: bool,
}

/// Read-only access to a stream through consumers (registry streams only: their content is
/// the same for everyone).
fn read_stream(stream: &str) -> Vec<String> {
    [
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.*"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
        format!("$JS.FC.{stream}.>"),
    ]
    .into()
}

fn registry_read() -> Vec<String> {
    let mut subjects = read_stream(&format!("KV_{}", subj::MODELS_BUCKET));
    subjects.extend(read_stream(&format!("OBJ_{}", subj::MODEL_BLOBS)));
    subjects
}

/// Tenant `t`'s own RESULTS consumers, each by name: [`RESULT_FOLLOWERS`] of them,
/// `results-<t>-<slot>`. A consumer name is one subject token and permissions cannot match
/// part of a token, so `*` in its place would reach every consumer on the stream (ingress's,
/// other tenants'): pull their messages, read or delete them, or update them through a create
/// request naming them. Each create request also names its filter, which the server checks
/// against the body, so the consumers see only `sundara.result.t.>`.
fn results_read(t: &str) -> Vec<String> {
    let results = subj::RESULTS_STREAM;
    (0..RESULT_FOLLOWERS)
        .map(|slot| results_consumer(t, slot))
        .flat_map(|name| {
            [
                format!("$JS.API.CONSUMER.CREATE.{results}.{name}.{}", subj::results_of(t)),
                format!("$JS.API.CONSUMER.MSG.NEXT.{results}.{name}"),
                format!("$JS.API.CONSUMER.INFO.{results}.{name}"),
                format!("$JS.API.CONSUMER.DELETE.{results}.{name}"),
            ]
        })
        .collect()
}

/// Everything a service needs of a stream it consumes: its info and messages (by sequence
/// or subject), pull consumers (create, info, delete, next), acks and flow control.
fn consume_stream(stream: &str) -> Vec<String> {
    let mut subjects = read_stream(stream);
    subjects.push(format!("$JS.ACK.{stream}.>"));
    subjects
}

/// A KV bucket read and written.
fn kv_read_write(bucket: &str) -> Vec<String> {
    let mut subjects = consume_stream(&format!("KV_{bucket}"));
    subjects.push(format!("$KV.{bucket}.>"));
    subjects
}

/// A service that submits tasks as any tenant (the gateway, the jobs service) and reads
/// their results: every one as published, and one by one from RESULTS where its
/// subscription missed one.
fn submits_for_tenants(publish: &mut Vec<String>, subscribe: &mut Vec<String>) {
    let results = subj::RESULTS_STREAM;
    publish.extend([
        subj::SUBMIT_ALL.into(),
        format!("$JS.API.DIRECT.GET.{results}"),
        format!("$JS.API.DIRECT.GET.{results}.>"),
    ]);
    subscribe.push(subj::RESULT_ALL.into());
}

/// What validator service `s` may do: each publishes only what it produces and consumes
/// only the streams it reads, so a compromised ingress cannot forge assignments or
/// verdicts, nor a rewarder results. Every service may check that the streams exist
/// (`$JS.API.STREAM.INFO.*`) but not create or change them: the validator's user
/// provisions them first.
fn service_permissions(s: Service, inbox: String) -> Permissions {
    let mut publish: Vec<String> = vec!["$JS.API.INFO".into(), "$JS.API.STREAM.INFO.*".into()];
    publish.extend(registry_read());
    let mut subscribe = vec![inbox];
    let mut allow_responses = false;
    // The ends of a task: the client's result, the verdict, a dead letter and its task.
    let decide = [subj::RESULT_ALL, subj::VERDICT_ALL, subj::DEAD_ALL, subj::DEAD_TASK_ALL].map(String::from);
    match s {
        Service::Ingress => {
            publish.push(subj::TASK_ALL.into());
            publish.extend(consume_stream(subj::RESULTS_STREAM));
            // Submissions arrive as requests on its micro service's endpoints.
            subscribe.extend([subj::SUBMIT_ALL.into(), "$SRV.>".into()]);
            allow_responses = true;
        }
        Service::Scheduler => {
            publish.extend([subj::WORK_ALL.into(), subj::OUTCOME_ALL.into()]);
            publish.extend(decide);
            for stream in [subj::TASKS_STREAM, subj::OUTCOMES_STREAM, subj::RESULTS_STREAM, subj::VERDICTS_STREAM] {
                publish.extend(consume_stream(stream));
            }
            publish.extend(kv_read_write(subj::VALIDATOR_BUCKET));
            // Its fleet gateway answers the miners' reports.
            subscribe.push(subj::REPORT_ALL.into());
            allow_responses = true;
        }
        Service::Verifier => {
            publish.extend(decide);
            for stream in [subj::TASKS_STREAM, subj::OUTCOMES_STREAM, subj::RESULTS_STREAM, subj::VERDICTS_STREAM] {
                publish.extend(consume_stream(stream));
            }
            publish.extend(kv_read_write(subj::VALIDATOR_BUCKET));
        }
        Service::Rewarder => {
            publish.push(subj::REWARD_ALL.into());
            publish.extend(consume_stream(subj::VERDICTS_STREAM));
            publish.extend(consume_stream(subj::REWARDS_STREAM));
            publish.extend(kv_read_write(subj::REWARDS_BUCKET));
            subscribe.push(subj::REWARDER_CLOSE.into());
            allow_responses = true;
        }
        Service::Autoscaler => {
            // Declares dead workers, asks workers to drain, and clears a dead one's work.
            publish.extend([
                subj::FLEET_DEAD.into(),
                subj::control("*"),
                format!("$JS.API.STREAM.PURGE.{}", subj::WORK_STREAM),
            ]);
            // Queue depths: the services' consumers' backlogs, read, never touched.
            for stream in [subj::TASKS_STREAM, subj::WORK_STREAM, subj::OUTCOMES_STREAM, subj::VERDICTS_STREAM] {
                publish.push(format!("$JS.API.CONSUMER.INFO.{stream}.*"));
            }
            // Its fleet gateway looks up whether a handed-back assignment's outcome is stored.
            let outcomes = subj::OUTCOMES_STREAM;
            publish.extend([format!("$JS.API.DIRECT.GET.{outcomes}"), format!("$JS.API.DIRECT.GET.{outcomes}.>")]);
            subscribe.push(subj::REPORT_ALL.into());
            allow_responses = true;
        }
        Service::Gateway => {
            // Submits for the tenants its API keys name, and reads their results.
            submits_for_tenants(&mut publish, &mut subscribe);
            // Its `/v1/jobs` endpoints ask the jobs service for the tenants its keys name,
            // and hear of their jobs' changes.
            publish.push(subj::JOBS_ALL.into());
            subscribe.push(subj::JOB_EVENTS_ALL.into());
        }
        Service::Jobs => {
            // Answers job requests, submits shard tasks as their tenant and reads their
            // results; its records and the jobs' data are its own.
            submits_for_tenants(&mut publish, &mut subscribe);
            publish.push(subj::JOB_EVENTS_ALL.into());
            publish.extend(kv_read_write(subj::JOBS_BUCKET));
            publish.extend(consume_stream(&format!("OBJ_{}", subj::JOB_DATA)));
            publish
                .extend([format!("$O.{}.>", subj::JOB_DATA), format!("$JS.API.STREAM.PURGE.OBJ_{}", subj::JOB_DATA)]);
            subscribe.push(subj::JOBS_ALL.into());
            allow_responses = true;
        }
        Service::Chain => {
            // nats-server asks it about every connection not among the auth callout's
            // `auth_users`, and takes its answer as the reply.
            subscribe.push(sundara_chain::callout::AUTH_SUBJECT.into());
            allow_responses = true;
            // The epoch weights it maps to uids for the chain: read, never written; what
            // it sent goes beside them under `chain.`.
            publish.extend(read_stream(&format!("KV_{}", subj::REWARDS_BUCKET)));
            publish.push(format!("$KV.{}.chain.>", subj::REWARDS_BUCKET));
        }
    }
    Permissions { publish, subscribe, allow_responses }
}

/// A miner's grants as worker `w`; `*` for a pool's workers, whose ids are not known ahead.
fn miner_permissions(w: &str, inbox: String) -> Permissions {
    let work = subj::WORK_STREAM;
    let consumer = if w == "*" { "*".to_string() } else { format!("worker-{w}") };
    let mut publish = vec![
        subj::outcome("*", w),
        subj::report(w),
        format!("$JS.API.STREAM.INFO.{work}"),
        format!("$JS.API.CONSUMER.CREATE.{work}.{consumer}.{}", subj::work_of(w)),
        format!("$JS.API.CONSUMER.INFO.{work}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{work}.{consumer}"),
        format!("$JS.ACK.{work}.{consumer}.>"),
    ];
    publish.extend(registry_read());
    Permissions { publish, subscribe: vec![inbox, subj::control(w)], allow_responses: true }
}

/// What `role` (whose public key is `public_key`) may do.
pub fn permissions(role: &Role, public_key: &str) -> Permissions {
    let inbox = format!("{}.>", inbox_prefix(public_key));
    match role {
        Role::Validator => {
            Permissions { publish: vec![">".into()], subscribe: vec![">".into()], allow_responses: false }
        }
        Role::Service(s) => service_permissions(*s, inbox),
        Role::Pool => miner_permissions("*", inbox),
        Role::Tenant(t) => {
            let mut publish = vec![subj::submit(t), subj::jobs(t, "*")];
            publish.extend(results_read(t));
            publish.extend(registry_read());
            Permissions { publish, subscribe: vec![inbox, subj::job_events_of(t)], allow_responses: false }
        }
        Role::Miner(w) => miner_permissions(w, inbox),
    }
}

/// The seed of the auth callout's issuer account (`SA…`), in the users' directory: its
/// presence turns the callout on (`sundara auth init --chain`).
pub const CALLOUT_ISSUER_FILE: &str = "callout-issuer.nk";

/// Users who never go through the auth callout: the validator's own (fixed at `init`, so
/// that adding tenants and miners later leaves the server's `auth_callout` block, which
/// it cannot reload, unchanged). Tenants and miners keyed by hand go through it too, and
/// the callout lets each in by its NKey's signature of the server's nonce.
fn bypasses_callout(role: &Role) -> bool {
    matches!(role, Role::Validator | Role::Service(_) | Role::Pool)
}

/// Creates the callout issuer's seed in `dir` unless it is there; its public key.
pub fn enable_callout(dir: &Path) -> Result<String, AuthError> {
    let path = dir.join(CALLOUT_ISSUER_FILE);
    let io = |e: std::io::Error| AuthError::Io { path: path.clone(), reason: e.to_string() };
    if !path.exists() {
        std::fs::create_dir_all(dir).map_err(io)?;
        let (seed, _) = sundara_chain::callout::Issuer::generate();
        write_secret(&path, &format!("{seed}\n")).map_err(io)?;
    }
    callout_issuer(dir)?
        .ok_or_else(|| AuthError::Io { path: path.clone(), reason: "vanished".into() })
        .map(|i| i.public_key())
}

/// The callout issuer of `dir`, when the callout is on.
pub fn callout_issuer(dir: &Path) -> Result<Option<sundara_chain::callout::Issuer>, AuthError> {
    let path = dir.join(CALLOUT_ISSUER_FILE);
    match std::fs::read_to_string(&path) {
        Ok(seed) => sundara_chain::callout::Issuer::from_seed(&seed)
            .map(Some)
            .map_err(|e| AuthError::Io { path, reason: format!("not an account seed: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuthError::Io { path, reason: e.to_string() }),
    }
}

fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())
}

/// The role whose public key is `key` in `dir`, if any: how the auth callout knows a
/// user keyed by hand. From the seeds and public keys there, else from the users' list
/// `auth.conf` (all a deployment that keeps the seeds elsewhere gives the callout).
pub fn role_of_key(dir: &Path, key: &str) -> Result<Option<Role>, AuthError> {
    if let Some(role) = public_keys(dir)?.into_iter().find(|(_, k)| k == key).map(|(role, _)| role) {
        return Ok(Some(role));
    }
    let path = dir.join("auth.conf");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(users_of_config(&text).into_iter().find(|(_, k)| k == key).map(|(role, _)| role)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuthError::Io { path, reason: e.to_string() }),
    }
}

/// The users [`server_config`] wrote into `text`: each `# <role>` line and the `nkey` of the
/// line after it.
fn users_of_config(text: &str) -> Vec<(Role, String)> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    lines
        .windows(2)
        .filter_map(|pair| {
            let role = Role::from_display(pair[0].strip_prefix("# ")?)?;
            let key = pair[1].split("nkey: \"").nth(1)?.split('"').next()?;
            Some((role, key.to_string()))
        })
        .collect()
}

/// nats-server's `authorization` block for these users; with `callout_issuer`, an
/// `auth_callout` block sends every connection but the validator's own users to the
/// callout (`sundara chain serve`).
pub fn server_config(users: &[(Role, String)], callout_issuer: Option<&str>) -> String {
    let list = |subjects: &[String]| subjects.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let mut out =
        String::from("# Written by `sundara auth init`: one NKey user per role.\nauthorization {\n  users = [\n");
    for (role, key) in users {
        let p = permissions(role, key);
        out.push_str(&format!(
            "    # {role}\n    {{ nkey: {key:?}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}{} }} }}\n",
            list(&p.publish),
            list(&p.subscribe),
            if p.allow_responses { ", allow_responses: true" } else { "" },
        ));
    }
    out.push_str("  ]\n");
    if let Some(issuer) = callout_issuer {
        let bypass: Vec<String> =
            users.iter().filter(|(r, _)| bypasses_callout(r)).map(|(_, k)| format!("{k:?}")).collect();
        out.push_str(&format!(
            "  # Everyone else (miners by their hotkeys, tenants by their keys) is let in by `sundara chain serve`.\n  auth_callout {{\n    issuer: {issuer:?}\n    auth_users: [{}]\n  }}\n",
            bypass.join(", ")
        ));
    }
    out.push_str("}\n");
    out
}

/// What `init` left in the directory.
#[derive(Debug)]
pub struct AuthDir {
    pub dir: PathBuf,
    /// Every user, by role, with its public key.
    pub users: BTreeMap<Role, String>,
    /// The `authorization` block, also written to `auth.conf`.
    pub server_config: String,
}

impl AuthDir {
    /// The seed file of `role` (it exists after `init` named the role, unless the user
    /// handed over only its public key).
    pub fn credentials(&self, role: &Role) -> PathBuf {
        self.dir.join(role.file_name())
    }

    /// What the directory holds of `role`: its seed file, or only its public key.
    pub fn holds(&self, role: &Role) -> String {
        let seed = self.credentials(role);
        match self.users.get(role) {
            Some(key) if !seed.exists() => format!("public key {key} (its seed is its own)"),
            _ => seed.display().to_string(),
        }
    }
}

/// Writes a new user seed to `path` (readable by its owner only; an existing file is never
/// overwritten) and returns its public key: what a miner runs on its own machine.
pub fn keygen(path: &Path) -> Result<String, AuthError> {
    let identity = Identity::generate();
    identity.write(path)?;
    Ok(identity.public_key)
}

/// Records `public_key` as `role`'s in `dir` (`<role>.pub`): the user exists for the server
/// without its seed being here. The same key again is a no-op; another key for a role that
/// has one (a seed here or a `.pub`) is refused.
pub fn trust_key(dir: &Path, role: &Role, public_key: &str) -> Result<(), AuthError> {
    if let Err(e) = Identity::check_public_key(public_key) {
        return Err(AuthError::NotPublicKey { key: public_key.to_string(), reason: e.to_string() });
    }
    let io = |path: &Path, e: std::io::Error| AuthError::Io { path: path.to_path_buf(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let known = public_keys(dir)?.remove(role);
    let path = dir.join(role.public_key_file_name());
    match known {
        Some(known) if known == public_key => Ok(()),
        Some(known) => Err(AuthError::OtherKey { role: role.clone(), known, offered: public_key.into(), path }),
        None => std::fs::write(&path, format!("{public_key}\n")).map_err(|e| io(&path, e)),
    }
}

/// Every user of `dir` with its public key: from its seed (`<role>.nk`) or, for a user
/// whose seed is elsewhere, its public key file (`<role>.pub`).
fn public_keys(dir: &Path) -> Result<BTreeMap<Role, String>, AuthError> {
    let io = |e: std::io::Error| AuthError::Io { path: dir.to_path_buf(), reason: e.to_string() };
    let mut users = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if let Some(role) = Role::from_file_name(&name) {
            users.insert(role, Identity::load(&entry.path())?.public_key);
        } else if let Some(role) = name.strip_suffix(".pub").and_then(Role::from_stem) {
            let text = std::fs::read_to_string(entry.path()).map_err(io)?;
            users.entry(role).or_insert_with(|| text.trim().to_string());
        }
    }
    Ok(users)
}

/// Makes sure `dir` has a seed for the validator and every named tenant and miner (existing
/// seeds are kept, so adding a miner does not change anyone else's key), then writes
/// `auth.conf` for every user whose seed or public key is in `dir`.
pub fn init(dir: &Path, tenants: &[String], miners: &[String]) -> Result<AuthDir, AuthError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: std::io::Error| AuthError::Io { path, reason: e.to_string() }
    };
    for name in tenants.iter().chain(miners) {
        if !subj::is_token(name) {
            return Err(AuthError::InvalidName(name.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let wanted = [Role::Validator, Role::Pool]
        .into_iter()
        .chain(Service::ALL.map(Role::Service))
        .chain(tenants.iter().map(|t| Role::Tenant(t.clone())))
        .chain(miners.iter().map(|m| Role::Miner(m.clone())));
    for role in wanted {
        let path = dir.join(role.file_name());
        // A miner whose public key was handed over keeps its own seed: none is made here.
        if !path.exists() && !dir.join(role.public_key_file_name()).exists() {
            Identity::generate().write(&path)?;
        }
    }
    let users = public_keys(dir)?;
    let issuer = callout_issuer(dir)?.map(|i| i.public_key());
    let config =
        server_config(&users.iter().map(|(r, k)| (r.clone(), k.clone())).collect::<Vec<_>>(), issuer.as_deref());
    let conf = dir.join("auth.conf");
    std::fs::write(&conf, &config).map_err(io(&conf))?;
    Ok(AuthDir { dir: dir.to_path_buf(), users, server_config: config })
}

/// Adds tenants and miners to the stack a running `sundara up` described in `context`:
/// their seeds go into its credentials directory (everyone else's kept), and its
/// nats-server reloads the users. Returns the users' directory and the roles added.
pub fn add(
    context: &crate::context::Context,
    tenants: &[String],
    miners: &[String],
    miner_keys: &[(String, String)],
) -> Result<(AuthDir, Vec<Role>), AuthError> {
    let (Some(dir), Some(auth_config)) = (&context.credentials_dir, &context.nats_auth_config) else {
        return Err(AuthError::NoAuth);
    };
    let before: Vec<Role> = public_keys(dir)?.into_keys().collect();
    for (miner, key) in miner_keys {
        if !subj::is_token(miner) {
            return Err(AuthError::InvalidName(miner.clone()));
        }
        trust_key(dir, &Role::Miner(miner.clone()), key)?;
    }
    let auth = init(dir, tenants, miners)?;
    crate::stack::reload_nats(auth_config, &auth.server_config, context.nats_server_pid, context.nats_monitor_port)?;
    let added = auth.users.keys().filter(|r| !before.contains(r)).cloned().collect();
    Ok((auth, added))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_file_names() {
        let services = Service::ALL.map(Role::Service);
        let others = [Role::Validator, Role::Pool, Role::Tenant("acme".into()), Role::Miner("m-1".into())];
        for role in services.into_iter().chain(others) {
            assert_eq!(Role::from_file_name(&role.file_name()), Some(role));
        }
        assert_eq!(Role::from_file_name("tenant-a.b.nk"), None);
        assert_eq!(Role::from_file_name("service-router.nk"), None, "no such service");
        assert_eq!(Role::from_file_name("auth.conf"), None);
    }

    #[test]
    fn a_miner_that_handed_over_its_public_key_has_no_seed_here() {
        let dir = tempfile::tempdir().unwrap();
        let miners_own = tempfile::tempdir().unwrap();
        let m1 = Role::Miner("m1".into());
        let key = keygen(&miners_own.path().join("miner-m1.nk")).unwrap();
        trust_key(dir.path(), &m1, &key).unwrap();
        trust_key(dir.path(), &m1, &key).expect("the same key again is a no-op");
        let auth = init(dir.path(), &[], &["m1".into(), "m2".into()]).unwrap();
        assert_eq!(auth.users[&m1], key);
        assert!(!dir.path().join("miner-m1.nk").exists(), "no seed made for a miner with its own");
        assert!(dir.path().join("miner-m2.nk").exists(), "a seed made for a miner without one");
        assert!(auth.server_config.contains(&key));

        let other = Identity::generate().public_key;
        assert!(matches!(trust_key(dir.path(), &m1, &other), Err(AuthError::OtherKey { .. })));
        let m2 = Role::Miner("m2".into());
        assert!(matches!(trust_key(dir.path(), &m2, &other), Err(AuthError::OtherKey { .. })), "m2 has a seed");
        let seed_not_key = Identity::generate();
        let m3 = Role::Miner("m3".into());
        assert!(matches!(trust_key(dir.path(), &m3, "UNOTAKEY"), Err(AuthError::NotPublicKey { .. })));
        assert!(trust_key(dir.path(), &m3, &seed_not_key.public_key.replacen('U', "N", 1)).is_err());
    }

    #[test]
    fn roles_print_plainly() {
        assert_eq!(Role::Tenant("acme".into()).to_string(), "tenant acme");
        assert_eq!(Role::Miner("m1".into()).to_string(), "miner m1");
        assert_eq!(Role::Validator.to_string(), "validator");
    }

    #[test]
    fn a_refusal_names_the_credentials_and_the_subject() {
        let denial = sundara_common::nats::Denial {
            operation: sundara_common::nats::Operation::Publish,
            subject: "$JS.API.STREAM.INFO.TASKS".into(),
        };
        let e = NotPermitted {
            credentials: Some("/c/tenant-acme.nk".into()),
            denial,
            need: "model pushes need the validator's credentials".into(),
        };
        assert_eq!(
            e.to_string(),
            "not permitted: tenant acme's credentials cannot publish to $JS.API.STREAM.INFO.TASKS; \
             model pushes need the validator's credentials"
        );
    }

    #[test]
    fn the_tenant_comes_from_the_credentials() {
        let acme = Path::new("/creds/tenant-acme.nk");
        assert_eq!(tenant_of(Some(acme), None).unwrap(), "acme");
        assert_eq!(tenant_of(Some(acme), Some("acme")).unwrap(), "acme");
        let refused = tenant_of(Some(acme), Some("bob")).unwrap_err();
        assert!(matches!(&refused, AuthError::NotYours { flag: "--tenant", value, .. } if value == "bob"));
        assert_eq!(refused.to_string(), "your credentials are tenant-acme's; --tenant bob is not permitted");
        assert!(matches!(tenant_of(Some(Path::new("miner-m1.nk")), None), Err(AuthError::WrongRole { .. })));
        assert_eq!(tenant_of(Some(Path::new("validator.nk")), Some("bob")).unwrap(), "bob");
        assert_eq!(tenant_of(Some(Path::new("my-key.nk")), None).unwrap(), "default");
        assert_eq!(tenant_of(None, None).unwrap(), "default");
        assert_eq!(tenant_of(None, Some("bob")).unwrap(), "bob");

        assert!(check_miner(Some(Path::new("/c/miner-m1.nk")), "m1").is_ok());
        assert!(check_miner(Some(Path::new("/c/validator.nk")), "m2").is_ok());
        let refused = check_miner(Some(Path::new("/c/miner-m1.nk")), "m2").unwrap_err();
        assert_eq!(refused.to_string(), "your credentials are miner-m1's; --id m2 is not permitted");
        assert!(matches!(check_miner(Some(Path::new("tenant-a.nk")), "m1"), Err(AuthError::WrongRole { .. })));
    }

    #[test]
    fn a_miner_may_touch_only_its_own_subjects() {
        let p = permissions(&Role::Miner("m1".into()), "UKEY");
        assert!(p.publish.contains(&"sundara.outcome.*.m1".to_string()));
        assert!(p.publish.contains(&"sundara.report.m1".to_string()));
        assert!(!p.publish.iter().any(|s| s == ">" || s.starts_with("sundara.submit") || s.contains("m2")));
        assert_eq!(p.subscribe, vec!["_INBOX_UKEY.>".to_string(), "sundara.control.m1".to_string()]);
    }

    /// Whether `grants` cover `subject` as nats-server matches them (`*` one token, `>` the rest).
    fn covers(grants: &[String], subject: &str) -> bool {
        grants.iter().any(|grant| {
            let (mut g, mut s) = (grant.split('.'), subject.split('.'));
            loop {
                match (g.next(), s.next()) {
                    (Some(">"), Some(_)) => return true,
                    (Some(a), Some(b)) if a == "*" || a == b => {}
                    (None, None) => return true,
                    _ => return false,
                }
            }
        })
    }

    #[test]
    fn each_service_publishes_only_what_it_produces_and_changes_no_stream() {
        let produces = |s: Service| match s {
            Service::Ingress => vec!["sundara.task.normal.mlp"],
            Service::Scheduler => {
                vec!["sundara.work.mlp.m1", "sundara.result.a.t", "sundara.dead.t", "sundara.outcome.t.m1"]
            }
            Service::Verifier => vec!["sundara.result.a.t", "sundara.verdict.t", "sundara.deadtask.t"],
            Service::Rewarder => vec!["sundara.reward.t", "sundara.reward.epoch", "$KV.rewards.ledger"],
            Service::Autoscaler => vec!["sundara.fleet.dead", "sundara.control.m1", "$JS.API.STREAM.PURGE.WORK"],
            Service::Gateway => vec!["sundara.submit.a", "sundara.jobs.a.create"],
            Service::Jobs => vec!["sundara.submit.a", "sundara.jobevent.a.j", "$KV.jobs.a.j", "$O.job-data.C.x"],
            Service::Chain => vec!["$KV.rewards.chain.weights.7"],
        };
        let all: Vec<&str> = Service::ALL.iter().flat_map(|s| produces(*s)).collect();
        for s in Service::ALL {
            let p = permissions(&Role::Service(s), "UKEY");
            for subject in &all {
                let own = produces(s).contains(subject)
                    // The rewarder owns its bucket, the chain's records in it too.
                    || (s == Service::Rewarder && subject.starts_with("$KV.rewards."))
                    // Scheduler and verifier both decide tasks; the rewarder's epoch is a reward.
                    || (matches!(s, Service::Scheduler | Service::Verifier) && !subject.starts_with("sundara.work")
                        && ["sundara.result.", "sundara.verdict.", "sundara.dead"].iter().any(|p| subject.starts_with(p)));
                assert_eq!(covers(&p.publish, subject), own, "{s:?} publishing {subject}");
            }
            for change in ["CREATE", "UPDATE", "DELETE"] {
                assert!(!covers(&p.publish, &format!("$JS.API.STREAM.{change}.TASKS")), "{s:?} may {change} a stream");
            }
            let submits = matches!(s, Service::Gateway | Service::Jobs);
            assert_eq!(covers(&p.publish, "sundara.submit.a"), submits, "{s:?} submits");
            assert!(!covers(&p.subscribe, "_INBOX_OTHER.x"), "{s:?} reads another's inbox");
            let reads_results = covers(&p.subscribe, "sundara.result.a.t");
            assert_eq!(reads_results, submits, "{s:?} reads results outside JetStream");
        }
    }

    #[test]
    fn the_pool_acts_as_any_miner_and_nothing_else() {
        let p = permissions(&Role::Pool, "UKEY");
        for subject in
            ["sundara.outcome.t.pool-7", "sundara.report.pool-7", "$JS.API.CONSUMER.MSG.NEXT.WORK.worker-pool-7"]
        {
            assert!(covers(&p.publish, subject), "{subject}");
        }
        for subject in ["sundara.result.a.t", "sundara.verdict.t", "sundara.task.normal.mlp", "sundara.submit.a"] {
            assert!(!covers(&p.publish, subject), "{subject}");
        }
        assert!(covers(&p.subscribe, "sundara.control.pool-7"));
    }

    /// The consumer each RESULTS grant of tenant `t` names (the token after the stream's).
    fn results_consumers_of(t: &str) -> Vec<String> {
        let p = permissions(&Role::Tenant(t.into()), "UKEY");
        let on_results: Vec<&String> = p.publish.iter().filter(|s| s.contains(".RESULTS")).collect();
        assert_eq!(on_results.len(), 4 * RESULT_FOLLOWERS, "create, next, info and delete per slot");
        on_results
            .iter()
            .map(|s| {
                let tokens: Vec<&str> = s.split('.').collect();
                let at = tokens.iter().position(|t| *t == "RESULTS").unwrap();
                if tokens[3] == "CREATE" {
                    assert_eq!(tokens[at + 2..].join("."), format!("sundara.result.{t}.>"), "{s}: the filter is t's");
                }
                tokens[at + 1].to_string()
            })
            .collect()
    }

    #[test]
    fn a_tenant_may_touch_only_its_own_results_consumers() {
        let names = results_consumers_of("a");
        for name in &names {
            assert!((0..RESULT_FOLLOWERS).any(|slot| *name == results_consumer("a", slot)), "{name}");
        }
        // Tenants whose names share a prefix still name disjoint consumers.
        for other in ["a-1", "a-10", "b"] {
            let theirs = results_consumers_of(other);
            assert!(!names.iter().any(|n| theirs.contains(n)), "a and {other} share a consumer");
        }
    }

    #[test]
    fn a_tenant_asks_and_hears_only_of_its_own_jobs() {
        let p = permissions(&Role::Tenant("a".into()), "UKEY");
        assert!(covers(&p.publish, &subj::jobs("a", "create")));
        assert!(covers(&p.subscribe, &subj::job_events("a", "j1")));
        for other in ["a-1", "b"] {
            assert!(!covers(&p.publish, &subj::jobs(other, "show")), "asks of {other}'s jobs");
            assert!(!covers(&p.subscribe, &subj::job_events(other, "j1")), "hears of {other}'s jobs");
        }
        for store in ["$KV.jobs.a.j1", "$O.job-data.C.x", "$JS.API.DIRECT.GET.KV_jobs.$KV.jobs.a.j1"] {
            assert!(!covers(&p.publish, store), "reaches the jobs' store directly: {store}");
        }
    }

    /// nats-server cannot reload its `auth_callout` block: adding tenants and miners must
    /// leave it as it was, so only the validator's own users bypass the callout.
    #[test]
    fn the_callout_block_names_only_the_validators_users_and_stays_put() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = enable_callout(dir.path()).unwrap();
        assert_eq!(enable_callout(dir.path()).unwrap(), issuer, "the issuer is made once");
        let block = |config: &str| config[config.find("auth_callout").expect("a callout block")..].to_string();
        let first = init(dir.path(), &[], &[]).unwrap();
        let second = init(dir.path(), &["a".into()], &["m1".into()]).unwrap();
        assert_eq!(block(&first.server_config), block(&second.server_config));
        let callout = block(&second.server_config);
        assert!(callout.contains(&issuer));
        for (role, key) in &second.users {
            assert_eq!(callout.contains(key.as_str()), bypasses_callout(role), "{role}");
        }
        assert_eq!(
            role_of_key(dir.path(), &second.users[&Role::Tenant("a".into())]).unwrap(),
            Some(Role::Tenant("a".into()))
        );
        // With only the users' list (a deployment keeps the seeds elsewhere).
        let list_only = tempfile::tempdir().unwrap();
        std::fs::write(list_only.path().join("auth.conf"), &second.server_config).unwrap();
        for (role, key) in &second.users {
            assert_eq!(role_of_key(list_only.path(), key).unwrap().as_ref(), Some(role));
        }
    }

    #[test]
    fn init_keeps_existing_keys_and_adds_new_users() {
        let dir = tempfile::tempdir().unwrap();
        let first = init(dir.path(), &["a".into()], &["m1".into()]).unwrap();
        let second = init(dir.path(), &[], &["m2".into()]).unwrap();
        assert_eq!(second.users.len(), 13, "validator, the pool, eight services, a, m1 and m2");
        for (role, key) in &first.users {
            assert_eq!(&second.users[role], key, "{role:?} kept its key");
        }
        assert!(second.server_config.contains(&second.users[&Role::Miner("m2".into())]));
        assert!(init(dir.path(), &["a.b".into()], &[]).is_err());
    }
}
