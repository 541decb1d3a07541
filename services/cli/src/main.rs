//! `sundara`: client and operator commands, the embedded stack (`up`), and the main of
//! every service (`sundara ingress`, `sundara worker`, ...): one binary to ship.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use clap::{Parser, Subcommand};
use sundara::stack::find_project_root;
use sundara_common::{Endpoints, Registry, Shutdown, nats};
use sundara_schemas::{CompareRule, Policy};

#[derive(Parser)]
#[command(name = "sundara", version, about = "Sundara: verified inference on untrusted miners")]
struct Cli {
    /// NATS server(s), comma-separated [default: the running `sundara up`'s, from its
    /// context (SUNDARA_CONTEXT), else nats://127.0.0.1:4222]
    #[arg(long, global = true, env = "SUNDARA_NATS_URL")]
    nats: Option<String>,
    /// NKey seed file to authenticate to NATS with (as `sundara auth init` writes them)
    /// [default: from the running `sundara up`'s context: the validator's, or the miner's
    /// or tenant's own that --id or --tenant names]
    #[arg(long, global = true, env = "SUNDARA_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) the NATS server's certificate must be signed by: TLS on, this CA
    /// the only one trusted (`sundara tls init` makes one) [default: the running `sundara
    /// up`'s, from its context]
    #[arg(long, global = true, env = "SUNDARA_NATS_CA")]
    nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a NATS server with mutual TLS, with --nats-key
    /// (`sundara tls client` makes one)
    #[arg(long, global = true, env = "SUNDARA_NATS_CERT", requires = "nats_key")]
    nats_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM)
    #[arg(long, global = true, env = "SUNDARA_NATS_KEY", requires = "nats_cert")]
    nats_key: Option<PathBuf>,
    /// Redis, given before the command (as earlier versions took it); the commands that use
    /// Redis take `--redis` themselves.
    #[arg(long, hide = true)]
    redis: Option<String>,
    /// Threads of the async runtime (network and bookkeeping; a worker's inference has
    /// threads of its own) [default: one per core]. Where many Sundara processes share a
    /// few cores (the benchmark: eight on two), 1 spares them thread switches.
    #[arg(long, global = true, env = "SUNDARA_RUNTIME_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    runtime_threads: Option<u16>,
    /// Serve Prometheus metrics at http://ADDR/metrics (services and `up`).
    #[arg(long, global = true, env = "SUNDARA_METRICS_ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Log lines as `text` or `json` (one object per line, for log collectors).
    #[arg(long, global = true, env = "SUNDARA_LOG_FORMAT", default_value = "text", value_parser = sundara_common::LogFormat::parse)]
    log_format: sundara_common::LogFormat,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://localhost:4317): one trace
    /// per task across every service. Off when not set.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    #[command(flatten)]
    history: nats::HistoryArgs,
    /// `--redis` was typed on the command line (set after parsing).
    #[arg(skip)]
    redis_typed: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline locally (own nats-server and redis-server), submit a demo load, print a summary.
    Up {
        /// Exit after the summary instead of serving until Ctrl-C.
        #[arg(long)]
        once: bool,
        /// Tasks of the demo load submitted once the stack serves.
        #[arg(long, default_value_t = 200)]
        tasks: usize,
        /// Honest workers (a build with `--features cheaters` adds one dishonest worker).
        #[arg(long, default_value_t = 3)]
        workers: usize,
        /// Use the NATS and Redis given by --nats/--redis instead of starting them.
        #[arg(long)]
        external: bool,
        /// Let the autoscaler run a pool of up to N more worker processes, sized to demand.
        #[arg(long)]
        autoscale: Option<usize>,
        /// The embedded nats-server verifies clients (mutual TLS): every connection presents
        /// a certificate of the stack's CA (the context gives the commands one).
        #[arg(long, conflicts_with = "external")]
        mutual_tls: bool,
        /// The embedded redis-server speaks TLS only (`rediss://`, a certificate of the
        /// stack's CA; the context gives the commands the CA).
        #[arg(long, conflicts_with = "external")]
        redis_tls: bool,
        /// The address the embedded nats-server listens on (its certificate names it):
        /// loopback, or one that miners on other hosts reach.
        #[arg(long, default_value = "127.0.0.1", conflicts_with = "external")]
        nats_listen: std::net::IpAddr,
        /// Where the HTTP gateway listens [default: a free port of loopback, printed]
        #[arg(long)]
        gateway_listen: Option<std::net::SocketAddr>,
        /// As a local Bittensor subnet (docs/bittensor.md): miners join by hotkey through the
        /// auth callout, operators are coldkeys, and the metagraph is a development file
        /// (printed) that `sundara chain register-dev` adds hotkeys to.
        #[arg(long, conflicts_with = "external")]
        chain: bool,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// The model registry.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Submit tasks and follow their results as they arrive. Exit code: 0 when every task
    /// was verified, 1 when some was not (rejected, expired, no consensus, no result), 2 on error.
    Submit {
        /// The model to run: NAME (its latest version) or NAME@VERSION.
        #[arg(long)]
        model: String,
        /// Tasks to submit (with a progress bar on a terminal when more than one).
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[command(flatten)]
        task: TaskArgs,
        /// high, normal or low: under contention, higher priority is dispatched first.
        #[arg(long, default_value = "normal", value_parser = sundara_schemas::Priority::parse)]
        priority: sundara_schemas::Priority,
        /// One JSON object per result on stdout (every output value), rejections included;
        /// the summary on stderr.
        #[arg(long)]
        json: bool,
    },
    /// Runs a batch job: many rows of one model's inputs, cut into shard tasks that are
    /// each verified, retried when they end unverified, and put back in order (docs/jobs.md).
    Job {
        /// The model to run: NAME or NAME@VERSION.
        #[arg(long)]
        model: String,
        /// Rows per shard task.
        #[arg(long, default_value_t = 100)]
        shard_rows: u64,
        /// Shard tasks in flight at once.
        #[arg(long, default_value_t = 8)]
        in_flight: usize,
        /// Submissions of one shard at most, the first included.
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// Where to write the outputs (JSON: {"outputs": [{"name", "dtype", "shape", "values"}]}).
        #[arg(long)]
        out: Option<PathBuf>,
        /// --input: every row of the job; --rows: how many rows to generate without it;
        /// --timeout-ms: each shard's.
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Batch jobs held by the validator side's jobs service: submitted in parts, run as
    /// verified shard tasks, followed, listed, cancelled; and the service itself (`serve`).
    /// docs/jobs.md §3.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Trains a model on the network: each step's batch cut into shard tasks of a training
    /// step model, the verified gradients added and applied here (docs/training.md).
    Train(TrainArgs),
    /// Runs a model split by layer (`scripts/split_model.py`): each stage a verified task,
    /// its outputs the next stage's inputs (docs/jobs.md).
    RunStaged {
        /// The stages' registered names, in order, comma-separated (`mlp_heavy-s0,mlp_heavy-s1`).
        #[arg(long, value_delimiter = ',', required = true)]
        stages: Vec<String>,
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Reward table: per-miner scores and the latest epoch weights; with --explain, how one
    /// miner's weight in an epoch came about, recomputed from the reward traces.
    Rewards {
        /// The epoch (default: the latest closed one).
        #[arg(long)]
        epoch: Option<u64>,
        /// A miner whose weight to explain task by task.
        #[arg(long)]
        explain: Option<String>,
    },
    /// Every slice of the fleet: state, slots and memory in use, models loaded; and the
    /// quarantines (`fleet quarantined`, `fleet release OPERATOR`).
    Fleet {
        #[command(subcommand)]
        command: Option<FleetCommand>,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// A live view of the fleet, the queues and the newest verdicts, refreshed in place.
    Status {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        every: f64,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Tasks: the dead letters.
    Tasks {
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// NATS users per role (validator, tenants, miners) with least-privilege permissions.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// Development certificates for TLS on NATS: a local CA, the server's, clients'.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
    /// Run the ingress service.
    Ingress {
        #[command(flatten)]
        args: sundara_ingress::Args,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Run the scheduler service.
    Scheduler {
        #[command(flatten)]
        args: sundara_scheduler::Args,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Run the verifier service.
    Verifier(sundara_verifier::Args),
    /// Run the rewarder service.
    Rewarder {
        #[command(flatten)]
        args: sundara_rewarder::Args,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Run the autoscaler service: fleet health, and with --driver the size of the worker pool.
    Autoscaler {
        #[command(flatten)]
        args: sundara_autoscaler::Args,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Run a worker (miner).
    Worker(sundara_worker::Args),
    /// Run the HTTP gateway: KServe v2 (`/v2/...`) and OpenAI (`/v1/models`) in front of the
    /// verified pipeline, each request as the tenant its API key names.
    Gateway(sundara_gateway::Args),
    /// The Bittensor subnet: the metagraph and the miners' hotkey joins (docs/bittensor.md).
    Chain {
        #[command(subcommand)]
        command: ChainCommand,
        #[command(flatten)]
        redis: RedisArgs,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Run the jobs service (one per stack; `sundara up` runs it).
    Serve(sundara_jobs::Args),
    /// Submit a job: its inputs put in parts of whole shards, then started. Prints its id;
    /// with --wait, follows it to its end.
    Submit {
        /// The model to run: NAME or NAME@VERSION.
        #[arg(long)]
        model: String,
        /// Rows per shard task.
        #[arg(long, default_value_t = 100)]
        shard_rows: u64,
        /// Shard tasks in flight at once.
        #[arg(long, default_value_t = 8)]
        in_flight: u32,
        /// Submissions of one shard at most, the first included.
        #[arg(long, default_value_t = 3)]
        attempts: u32,
        /// Seconds the whole job may take (the service caps it).
        #[arg(long, default_value_t = 3600)]
        deadline_secs: u64,
        /// Follow the job to its end, progress on stderr.
        #[arg(long)]
        wait: bool,
        /// With --wait: where to write the outputs (JSON, as `sundara job --out`).
        #[arg(long, requires = "wait")]
        out: Option<PathBuf>,
        /// --input: every row of the job; --rows: how many rows to generate without it;
        /// --timeout-ms: each shard's.
        #[command(flatten)]
        task: TaskArgs,
    },
    /// Your jobs, newest first: state, shards verified, rows, reason.
    List {
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// One job's state and progress.
    Show {
        /// The job's id (`sundara jobs list` shows them).
        job_id: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// Stop a job: no shard is submitted after this; those verified stay readable.
    Cancel {
        /// The job's id (`sundara jobs list` shows them).
        job_id: String,
        #[command(flatten)]
        tenant: TenantArg,
    },
    /// Follow a job to its end and read its outputs, in the rows' order.
    Results {
        /// The job's id (`sundara jobs list` shows them).
        job_id: String,
        /// Where to write the outputs (JSON, as `sundara job --out`).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        tenant: TenantArg,
    },
}

/// Whose jobs.
#[derive(clap::Args)]
struct TenantArg {
    /// The tenant [default: the one whose credentials --nats-creds are, else `default`].
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Subcommand)]
enum ChainCommand {
    /// Run the chain service: the metagraph sync and the NATS auth callout that lets
    /// registered hotkeys in as miners.
    Serve(sundara::chain::ServeArgs),
    /// The metagraph the validator holds (its block, neurons and age, the last read), the
    /// validator's own uid and permit, and the last weights sent with the chain's answer.
    Status {
        /// The validator's hotkey (SS58), to show its uid and permit.
        #[arg(long, env = "SUNDARA_VALIDATOR_HOTKEY")]
        validator_hotkey: Option<String>,
    },
    /// Make a hotkey: a Bittensor wallet hotkey file (readable by you only; never
    /// overwritten) with a fresh seed. Prints its SS58 address.
    Keygen {
        /// Where it goes (e.g. ~/.bittensor/wallets/miner/hotkeys/default).
        #[arg(long)]
        out: PathBuf,
    },
    /// Register a hotkey in a development metagraph file (`up --chain` prints its path): a
    /// stand-in for `btcli subnet register`, for local stacks and tests only.
    RegisterDev {
        /// The metagraph file.
        #[arg(long)]
        metagraph: PathBuf,
        /// The hotkey's file (as `--hotkey-file`) or its SS58 address.
        hotkey: String,
        /// The coldkey it registers under (SS58) [default: a new one of its own].
        #[arg(long)]
        coldkey: Option<String>,
    },
    /// What `chain serve` would send for the latest epoch: its weights mapped to uids, the
    /// miners left out, and (with --bridge) whether the subnet's rules let it go now.
    Weights {
        /// Only show; sending is `chain serve`'s.
        #[arg(long)]
        dry_run: bool,
        /// The chain bridge, to read the subnet's rules (as `chain serve --bridge`).
        #[arg(long, env = "SUNDARA_CHAIN_BRIDGE")]
        bridge: Option<String>,
        /// The subnet's netuid (with --bridge).
        #[arg(long, env = "SUNDARA_NETUID")]
        netuid: Option<u16>,
        /// A pinned version key (as `chain serve --version-key`).
        #[arg(long)]
        version_key: Option<u64>,
    },
}

/// `--redis`, on the commands that use Redis.
#[derive(clap::Args, Clone, Debug, Default)]
struct RedisArgs {
    /// Redis [default: the running `sundara up`'s, else redis://127.0.0.1:6379/]
    #[arg(long = "redis", env = "SUNDARA_REDIS_URL", global = true)]
    url: Option<String>,
    /// CA certificate (PEM) a `rediss://` Redis's certificate must be signed by, the only
    /// one trusted [default: the system's roots]
    #[arg(long = "redis-ca", env = "SUNDARA_REDIS_CA", global = true)]
    ca: Option<PathBuf>,
    /// A file holding Redis' password (its first line), put into the URL: a password given
    /// in `--redis` on the command line is refused, since `ps` shows it
    #[arg(long = "redis-password-file", env = "SUNDARA_REDIS_PASSWORD_FILE", global = true)]
    password_file: Option<PathBuf>,
}

impl RedisArgs {
    /// The URL to connect to: with the password file's password, if given. `typed`: the URL
    /// came from the command line, where no password may be (the environment may hold one).
    fn url(&self, typed: bool) -> anyhow::Result<Option<String>> {
        if typed {
            refuse_typed_password(self.url.as_deref())?;
        }
        let Some(file) = &self.password_file else { return Ok(self.url.clone()) };
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let password = text.lines().next().unwrap_or_default().trim();
        if password.is_empty() {
            bail!("{} holds no password", file.display());
        }
        let url = self.url.as_deref().unwrap_or("redis://127.0.0.1:6379/");
        Ok(Some(sundara_common::with_password(url, password)))
    }
}

/// A Redis URL typed on the command line may carry no password: `ps` shows it.
fn refuse_typed_password(url: Option<&str>) -> anyhow::Result<()> {
    if url.is_some_and(sundara_common::has_password) {
        bail!(
            "a password in --redis shows in `ps` to every user of this machine: give the URL in \
             SUNDARA_REDIS_URL, or the password in a file with --redis-password-file"
        );
    }
    Ok(())
}

/// Whether `--redis` was typed on the command line of the command `matches` parsed (not
/// taken from the environment).
fn redis_url_typed(matches: &clap::ArgMatches) -> bool {
    let mut m = matches;
    loop {
        let typed = |id: &str| {
            m.try_get_raw(id).ok().flatten().is_some()
                && m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
        };
        if typed("url") || typed("redis") {
            return true;
        }
        match m.subcommand() {
            Some((_, sub)) => m = sub,
            None => return false,
        }
    }
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Write a seed file per user into DIR (keeping existing ones) and DIR/auth.conf, the
    /// server's `authorization` block for all of them: `include` it in nats-server's config,
    /// then reload the server (`nats-server --signal reload`) after adding users.
    Init {
        /// Where the seed files and auth.conf go.
        #[arg(long, default_value = "nats-auth")]
        dir: PathBuf,
        #[command(flatten)]
        users: Users,
        /// On a Bittensor subnet: miners join by their hotkeys, through the auth callout
        /// that `sundara chain serve` answers (DIR/callout-issuer.nk; docs/bittensor.md).
        #[arg(long)]
        chain: bool,
    },
    /// Add tenants and miners to the stack a running `sundara up` serves (its context):
    /// their seeds (or, with --miner-key, a miner's public key) go into its credentials
    /// directory and its nats-server reloads its users.
    Add {
        #[command(flatten)]
        users: Users,
    },
    /// Make a miner's own key, on the miner's machine: writes its seed file (readable by
    /// you only) and prints the public key to hand to the validator.
    Keygen {
        /// The miner's worker id (names the file: miner-ID.nk).
        #[arg(long)]
        miner: String,
        /// Where the seed file goes (default: ./miner-ID.nk); never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The users `auth init` and `auth add` name.
#[derive(clap::Args)]
struct Users {
    /// A tenant (repeatable).
    #[arg(long = "tenant")]
    tenants: Vec<String>,
    /// A miner, by its worker id, whose seed is made here (repeatable).
    #[arg(long = "miner")]
    miners: Vec<String>,
    /// A miner that made its own key (`sundara auth keygen`): `ID=PUBLIC_KEY`, kept as
    /// miner-ID.pub beside the seeds (repeatable). Its seed never leaves its machine.
    #[arg(long = "miner-key", value_parser = parse_miner_key)]
    miner_keys: Vec<(String, String)>,
}

/// `ID=PUBLIC_KEY` of `--miner-key`.
fn parse_miner_key(text: &str) -> Result<(String, String), String> {
    let (id, key) = text.split_once('=').ok_or("expected ID=PUBLIC_KEY")?;
    Ok((id.to_string(), key.trim().to_string()))
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Create a CA (DIR/ca.pem, DIR/ca-key.pem) and a server certificate it signs
    /// (DIR/server.pem, DIR/server-key.pem) for localhost, 127.0.0.1, ::1 and each --host.
    /// Clients pin DIR/ca.pem with --nats-ca.
    Init {
        /// Where the files go.
        #[arg(long, default_value = "nats-tls")]
        dir: PathBuf,
        /// Another name or IP address the server is reached at (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Replace an existing CA (what it signed stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// A client certificate signed by DIR's CA (DIR/client-NAME.pem), for a server with
    /// mutual TLS: pass it as --nats-cert with its key as --nats-key. With --csr, for the
    /// key of a request a miner made on its own host (`tls request`); without, for a key
    /// made here (DIR/client-NAME-key.pem).
    Client {
        /// Where the CA is (as `tls init` made it).
        #[arg(long, default_value = "nats-tls")]
        dir: PathBuf,
        /// Whose certificate (a miner's id, `validator`, ...): its subject's common name,
        /// whatever a request asked for.
        #[arg(long)]
        name: String,
        /// A certificate signing request (`tls request` made it): only its public key is
        /// signed, once its signature shows the requester holds the key.
        #[arg(long)]
        csr: Option<PathBuf>,
        /// Replace an existing certificate of this name.
        #[arg(long)]
        force: bool,
    },
    /// On a miner's own host: a key for mutual TLS that never leaves it (DIR/client-NAME-key.pem,
    /// 0600) and a signing request for it (DIR/client-NAME.csr) to hand the validator, who
    /// signs it with `tls client --csr`.
    Request {
        /// Where the key and the request go.
        #[arg(long, default_value = "nats-tls")]
        dir: PathBuf,
        /// The name the files carry (your worker id).
        #[arg(long)]
        name: String,
        /// Replace an existing key of this name.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Quarantined operators and workers, with why.
    Quarantined,
    /// Lift the quarantine of an operator (or of a worker, by its id) and of every worker
    /// announced with it: they get work again from their next heartbeat.
    Release {
        /// The operator (`--operator` of its workers; a worker's id when it gave none).
        operator: String,
    },
}

#[derive(Subcommand)]
enum TasksCommand {
    /// Tasks that could not be verified (or expired before dispatch), each with its
    /// history; with --resubmit, submit one of them again as new work.
    Dead {
        /// How many of the newest to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// A dead task to submit again (same model, inputs, seed, tenant, priority, timeout).
        #[arg(long)]
        resubmit: Option<String>,
    },
}

/// A client command's task: its inputs, who submits it, and how long it has.
#[derive(clap::Args)]
struct TaskArgs {
    /// JSON inputs: {"inputs": [{"name", "dtype", "shape", "values"}]}, values flat or
    /// nested lists (numpy's tolist()); random inputs when absent.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Rows per generated task (along the first dynamic dimension).
    #[arg(long, default_value_t = 1)]
    rows: u64,
    /// Who submits [default: the tenant whose credentials --nats-creds are, else
    /// `default`]. Another tenant than the credentials' is refused.
    #[arg(long)]
    tenant: Option<String>,
    /// Milliseconds each task has to be verified, from its submission.
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
}

/// `sundara train`'s settings.
#[derive(clap::Args)]
struct TrainArgs {
    /// The training step model (inputs `x`, `y`, then the weights; outputs `loss`,
    /// `correct`, `grad_<weight>`): NAME or NAME@VERSION.
    #[arg(long, default_value = "digits-train")]
    model: String,
    /// The rows: CSV, the features then the class label on each line.
    #[arg(long, default_value = ".cache/data/digits.csv")]
    data: PathBuf,
    /// Passes over the training rows.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Rows per optimizer step.
    #[arg(long, default_value_t = 64)]
    batch_rows: usize,
    /// Shard tasks each step's batch is cut into.
    #[arg(long, default_value_t = 4)]
    shards: usize,
    /// SGD's step size: w ← w − lr·v.
    #[arg(long, default_value_t = 0.1)]
    learning_rate: f32,
    /// SGD's momentum: v ← μ·v + (batch gradient) / rows.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Seeds the initial weights, the held-out split and the batch order.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Share of the rows held out to measure accuracy.
    #[arg(long, default_value_t = 0.2)]
    held_out: f64,
    /// Submissions of one shard at most, the first included.
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Milliseconds each shard task has to be verified.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Publish each epoch's weights as the next version of this model, with its lineage.
    #[arg(long, requires = "template")]
    publish_as: Option<String>,
    /// The inference graph whose initializers, named as the weights, take the trained values.
    #[arg(long)]
    template: Option<PathBuf>,
    /// Also train in this process from the same seed, and compare loss and speed.
    #[arg(long)]
    compare: bool,
    /// Continue the run that published this version (NAME@VERSION): its weights, its seed
    /// and its steps so far; the momentum starts from zero.
    #[arg(long)]
    resume: Option<String>,
    /// Where to write every step's and epoch's figures (JSON).
    #[arg(long)]
    curve: Option<PathBuf>,
    /// Who submits [default: the tenant whose credentials --nats-creds are, else `default`].
    #[arg(long)]
    tenant: Option<String>,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Register an ONNX model (inputs and outputs are read from the model). A published
    /// version never changes: the same bytes and policy again change nothing, others get a
    /// new version.
    Push {
        /// The .onnx file.
        file: PathBuf,
        /// The model's name (tasks ask for NAME or NAME@VERSION).
        #[arg(long)]
        name: String,
        /// The version to publish (refused if it exists, or was removed, with other bytes or
        /// another policy). Default: the latest version when the bytes and policy are the
        /// same, else the next number.
        #[arg(long)]
        version: Option<String>,
        /// Distinct miners per task (k), 1 to 9, each of another operator.
        #[arg(long, default_value_t = 2)]
        redundancy: u8,
        /// How two outputs are compared to agree.
        #[arg(long, value_enum, default_value_t = RuleName::Allclose)]
        rule: RuleName,
        /// Absolute tolerance for --rule allclose.
        #[arg(long, default_value_t = 1e-4)]
        atol: f64,
        /// Relative tolerance for --rule allclose.
        #[arg(long, default_value_t = 1e-3)]
        rtol: f64,
        /// Minimum cosine similarity for --rule cosine.
        #[arg(long, default_value_t = 0.999)]
        min_cosine: f64,
        /// Fraction of tasks the verifier re-runs on its reference runtime (audits).
        #[arg(long, default_value_t = sundara_schemas::DEFAULT_AUDIT_RATE)]
        audit_rate: f64,
        /// Most tasks a worker runs as one inference (1: no batching).
        #[arg(long, default_value_t = 32)]
        max_batch: u32,
        /// Longest a task waits for its batch to fill, in µs (0: batch only what is already queued).
        #[arg(long, default_value_t = 0)]
        max_delay_us: u32,
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// List registered models.
    List,
    /// Remove a version (NAME@VERSION) or every version (NAME) of a model: its record and
    /// bytes. Its number is never given to other bytes (miners may still hold them), and
    /// its tasks still in flight fail.
    Rm {
        /// NAME or NAME@VERSION
        model: String,
    },
}

/// `models push --rule`: the compare rules, their tolerances given by their own flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RuleName {
    /// Bit-identical outputs.
    Exact,
    /// Every value within --atol + --rtol × |value|.
    Allclose,
    /// The same index of the largest value per row.
    Argmax,
    /// Cosine similarity at least --min-cosine.
    Cosine,
}

async fn run_service<E: std::error::Error + Send + Sync + 'static>(
    fut: impl Future<Output = Result<(), E>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let signal = shutdown.clone();
    tokio::spawn(async move {
        sundara_common::termination_signal().await;
        signal.cancel();
    });
    // As an error, not its text: `error_report` prints its causes.
    Ok(fut.await?)
}

/// The registry, for operator commands (which create the streams when missing).
async fn registry(nats: &nats::NatsEndpoint) -> anyhow::Result<(jetstream::Context, Registry)> {
    registry_for(nats, "operator commands").await
}

/// [`registry`] for `what` (`model pushes`): credentials the server refuses what it needs
/// fail at once, saying that `what` needs the validator's.
async fn registry_for(nats: &nats::NatsEndpoint, what: &str) -> anyhow::Result<(jetstream::Context, Registry)> {
    let client = nats::connect(nats, "sundara-cli").await?;
    let js = jetstream::new(client.clone());
    let opened = nats::unless_denied(&client, |_| true, async {
        nats::provision(&js, &nats::Retention::default()).await?;
        Registry::open(&js).await
    })
    .await
    .map_err(|denial| sundara::auth::NotPermitted {
        credentials: nats.credentials.clone(),
        denial,
        need: format!("{what} need the validator's credentials"),
    })?;
    Ok((js, opened?))
}

fn train_command(args: TrainArgs, tenant: String) -> sundara::training::TrainCommand {
    let TrainArgs { model, data, epochs, batch_rows, shards, learning_rate, momentum, seed, held_out, .. } = args;
    sundara::training::TrainCommand {
        shards: sundara::jobs::ShardOptions {
            model,
            in_flight: shards.max(1),
            attempts: args.attempts,
            shard_timeout: std::time::Duration::from_millis(args.timeout_ms),
        },
        options: sundara::training::TrainOptions {
            batch_rows,
            shards,
            epochs,
            learning_rate,
            momentum,
            seed,
            held_out,
        },
        data,
        tenant,
        publish_as: args.publish_as,
        template: args.template,
        compare: args.compare,
        resume: args.resume,
        curve: args.curve,
    }
}

/// ONNX Runtime: `ORT_DYLIB_PATH`, else the wheel in the project's `.venv`.
fn ort() -> anyhow::Result<PathBuf> {
    let roots = match std::env::var_os("ORT_DYLIB_PATH") {
        Some(_) => vec![],
        None => vec![find_project_root().context("ONNX Runtime is looked for in the checkout's .venv")?],
    };
    let lib = sundara_runtime::find_library(&roots)?;
    sundara_runtime::init(&lib)?;
    Ok(lib)
}

/// Where to connect, from the command line, the environment and a running `sundara up`'s
/// context (not for `up` itself, which starts its own or takes what it is given).
fn endpoints(cli: &Cli) -> anyhow::Result<Endpoints> {
    let redis = match &cli.command {
        Command::Up { redis, .. }
        | Command::Models { command: ModelsCommand::Push { redis, .. } }
        | Command::Fleet { redis, .. }
        | Command::Status { redis, .. }
        | Command::Ingress { redis, .. }
        | Command::Scheduler { redis, .. }
        | Command::Rewarder { redis, .. }
        | Command::Autoscaler { redis, .. }
        | Command::Chain { redis, .. } => (redis.url(cli.redis_typed)?, redis.ca.clone()),
        _ => (None, None),
    };
    if cli.redis_typed {
        refuse_typed_password(cli.redis.as_deref())?;
    }
    let settings = sundara::context::Settings {
        nats: cli.nats.clone(),
        nats_creds: cli.nats_creds.clone(),
        nats_ca: cli.nats_ca.clone(),
        nats_client_cert: cli.nats_cert.clone().zip(cli.nats_key.clone()),
        redis: redis.0.or_else(|| cli.redis.clone()),
        redis_ca: redis.1,
    };
    let acting_as = match &cli.command {
        Command::Up { .. } => return Ok(settings.resolve(None, None)),
        Command::Worker(args) => Some(sundara::auth::Role::Miner(args.id.clone())),
        Command::Submit { task: TaskArgs { tenant: Some(t), .. }, .. }
        | Command::RunStaged { task: TaskArgs { tenant: Some(t), .. }, .. }
        | Command::Job { task: TaskArgs { tenant: Some(t), .. }, .. }
        | Command::Train(TrainArgs { tenant: Some(t), .. })
        | Command::Jobs { command: JobsCommand::Submit { task: TaskArgs { tenant: Some(t), .. }, .. } }
        | Command::Jobs {
            command:
                JobsCommand::List { tenant: TenantArg { tenant: Some(t) } }
                | JobsCommand::Show { tenant: TenantArg { tenant: Some(t) }, .. }
                | JobsCommand::Cancel { tenant: TenantArg { tenant: Some(t) }, .. }
                | JobsCommand::Results { tenant: TenantArg { tenant: Some(t) }, .. },
        } => Some(sundara::auth::Role::Tenant(t.clone())),
        _ => None,
    };
    let context = sundara::context::Context::current();
    Ok(settings.resolve(context.as_ref().map(|(_, c)| c), acting_as.as_ref()))
}

/// `up` and the client commands print their own report; services log at info.
fn is_quiet(command: &Command) -> bool {
    matches!(
        command,
        Command::Up { .. }
            | Command::Auth { .. }
            | Command::Tls { .. }
            | Command::Submit { .. }
            | Command::RunStaged { .. }
            | Command::Job { .. }
            | Command::Train(_)
            | Command::Jobs {
                command: JobsCommand::Submit { .. }
                    | JobsCommand::List { .. }
                    | JobsCommand::Show { .. }
                    | JobsCommand::Cancel { .. }
                    | JobsCommand::Results { .. }
            }
            | Command::Models { .. }
            | Command::Rewards { .. }
            | Command::Fleet { .. }
            | Command::Tasks { .. }
            | Command::Status { .. }
    )
}

/// Exit codes: 0 success; 1 `submit` ran but some task was not verified (its summary
/// says why); 2 an error, printed once as `error: …` with the causes it does not already
/// say (clap's usage errors also exit 2).
fn main() -> std::process::ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.redis_typed = redis_url_typed(&matches);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // The services run on the worker threads (see `async_main`): give them the main
    // thread's 8 MiB, since unoptimized builds poll deep futures (tokio's default is 2 MiB).
    runtime.enable_all().thread_stack_size(8 << 20);
    if let Some(threads) = cli.runtime_threads {
        runtime.worker_threads(threads.into());
    }
    match runtime.build() {
        Ok(runtime) => runtime.block_on(async_main(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::ExitCode::from(sundara::submit::exit::ERROR)
        }
    }
}

async fn async_main(cli: Cli) -> std::process::ExitCode {
    use sundara::submit::{NotAllVerified, exit};
    let quiet = is_quiet(&cli.command);
    let telemetry = sundara_common::telemetry::init(&sundara_common::telemetry::TelemetryConfig {
        service: service_name(&cli.command).into(),
        log_level: if quiet { "warn" } else { "info" }.into(),
        log_format: cli.log_format,
        otlp_endpoint: cli.otlp_endpoint.clone(),
    });
    let result = match telemetry {
        Ok(telemetry) => {
            // On the runtime's worker threads, not on the main thread: a future polled by
            // `block_on` hands every wake-up across threads (perf at C=1: 37 % of the
            // scheduler's CPU was its main thread, mostly in thread switches).
            let result = tokio::spawn(run(cli, quiet)).await.unwrap_or_else(|e| Err(e.into()));
            telemetry.shutdown();
            result
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<NotAllVerified>().is_some() => std::process::ExitCode::from(exit::NOT_ALL_VERIFIED),
        Err(e) => {
            eprintln!("{}", sundara::error_report(&e));
            std::process::ExitCode::from(exit::ERROR)
        }
    }
}

/// `service.name` of the spans a command exports.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Ingress { .. } => "sundara-ingress",
        Command::Scheduler { .. } => "sundara-scheduler",
        Command::Verifier(_) => "sundara-verifier",
        Command::Rewarder { .. } => "sundara-rewarder",
        Command::Autoscaler { .. } => "sundara-autoscaler",
        Command::Worker(_) => "sundara-worker",
        Command::Gateway(_) => "sundara-gateway",
        Command::Jobs { command: JobsCommand::Serve(_) } => "sundara-jobs",
        Command::Chain { command: ChainCommand::Serve(_), .. } => "sundara-chain",
        Command::Chain {
            command:
                ChainCommand::Status { .. }
                | ChainCommand::Weights { .. }
                | ChainCommand::Keygen { .. }
                | ChainCommand::RegisterDev { .. },
            ..
        } => "sundara",
        // `up` runs every service in one process.
        Command::Up { .. } => "sundara",
        _ => "sundara-cli",
    }
}

/// Runs the command; `quiet` ones (client and `up`) serve no metrics of their own.
async fn run(cli: Cli, quiet: bool) -> anyhow::Result<()> {
    let endpoints = endpoints(&cli)?;
    if cli.nats_cert.is_some() && endpoints.nats.tls.is_none() {
        bail!("--nats-cert needs --nats-ca: the CA that signed the server's certificate");
    }
    let nats = endpoints.nats.clone();
    if !quiet && cli.metrics_addr.is_some() {
        sundara_common::metrics::install(cli.metrics_addr)?;
    }
    match cli.command {
        Command::Up {
            once,
            tasks,
            workers,
            external,
            autoscale,
            mutual_tls,
            redis_tls,
            nats_listen,
            gateway_listen,
            chain,
            redis: _,
        } => {
            let opts = sundara::up::UpOptions {
                once,
                tasks,
                honest_workers: workers.max(2),
                endpoints: external.then_some(endpoints),
                metrics: cli.metrics_addr,
                autoscale,
                nats: sundara::stack::ServerOptions { listen: nats_listen, mutual_tls, redis_tls },
                gateway_listen,
                chain,
                retention: cli.history.apply(Default::default()),
            };
            sundara::up::up(opts).await
        }
        Command::Models { command } => models(command, &endpoints).await,
        Command::Submit { model, count, task: TaskArgs { input, rows, tenant, timeout_ms }, priority, json } => {
            let tenant = sundara::auth::tenant_of(nats.credentials.as_deref(), tenant.as_deref())?;
            let options =
                sundara::submit::SubmitOptions { model, input, count, rows, tenant, timeout_ms, priority, json };
            let tally = sundara::submit::submit(&nats, options).await?;
            Ok(tally.check()?)
        }
        Command::Job {
            model,
            shard_rows,
            in_flight,
            attempts,
            out,
            task: TaskArgs { input, rows, tenant, timeout_ms },
        } => {
            let tenant = sundara::auth::tenant_of(nats.credentials.as_deref(), tenant.as_deref())?;
            let shard_timeout = std::time::Duration::from_millis(timeout_ms);
            let shards = sundara::jobs::ShardOptions { model, in_flight, attempts, shard_timeout };
            let options = sundara::jobs::JobOptions { shard_rows, shards };
            let command = sundara::jobs::JobCommand { options, input, rows, tenant, out };
            print!("{}", sundara::jobs::run_command(&nats, command).await?);
            Ok(())
        }
        Command::Jobs { command: JobsCommand::Serve(_) } => serve(cli.command, endpoints, &cli.history).await,
        Command::Jobs { command } => jobs(command, &nats).await,
        Command::Train(args) => {
            ort()?;
            let tenant = sundara::auth::tenant_of(nats.credentials.as_deref(), args.tenant.as_deref())?;
            print!("{}", sundara::training::run_command(&nats, train_command(args, tenant)).await?);
            Ok(())
        }
        Command::RunStaged { stages, task: TaskArgs { input, rows, tenant, timeout_ms } } => {
            let tenant = sundara::auth::tenant_of(nats.credentials.as_deref(), tenant.as_deref())?;
            let options = sundara::staged::StagedOptions { stages, input, rows, tenant, timeout_ms };
            print!("{}", sundara::staged::run_command(&nats, options).await?);
            Ok(())
        }
        Command::Rewards { epoch, explain } => rewards(&nats, epoch, explain).await,
        Command::Fleet { command, redis: _ } => {
            let capacity = sundara_common::Capacity::open(&endpoints).await?;
            match command {
                None => print!("{}", sundara::fleet::table(&capacity).await?),
                Some(FleetCommand::Quarantined) => print!("{}", sundara::fleet::quarantined(&capacity).await?),
                Some(FleetCommand::Release { operator }) => {
                    println!("{}", sundara::fleet::release(&capacity, &operator).await?)
                }
            }
            Ok(())
        }
        Command::Status { every, once, redis: _ } => {
            if !(every.is_finite() && every >= 0.1) {
                bail!("--every must be at least 0.1 s");
            }
            let (js, _) = registry(&nats).await?;
            let capacity = sundara_common::Capacity::open(&endpoints).await?;
            sundara::status::watch(&js, &capacity, Duration::from_secs_f64(every), once).await?;
            Ok(())
        }
        Command::Tasks { command: TasksCommand::Dead { limit, resubmit } } => dead_tasks(&nats, limit, resubmit).await,
        Command::Auth { command } => auth(command),
        Command::Chain { command: ChainCommand::Status { validator_hotkey }, .. } => {
            let capacity = sundara_common::Capacity::open(&endpoints).await?;
            let status = capacity.chain_status().await?;
            let ours = match &validator_hotkey {
                Some(hotkey) => capacity.neuron(hotkey).await?.ok_or_else(|| hotkey.clone()).map(Some),
                None => Ok(None),
            };
            let (js, _) = registry(&nats).await?;
            let kv = js.get_key_value(sundara_schemas::subjects::REWARDS_BUCKET).await?;
            let last = sundara::chain::last_submission(&kv).await.map_err(anyhow::Error::msg)?;
            print!("{}", sundara::chain::status_text(&status, sundara_schemas::now_ms()));
            print!("{}", sundara::chain::validator_text(ours, last.as_ref()));
            Ok(())
        }
        Command::Chain { command: ChainCommand::Keygen { out }, .. } => {
            let address = sundara::chain::keygen(&out)?;
            println!("hotkey {address} in {} (keep it; it never leaves this machine)", out.display());
            println!(
                "register it on the subnet (btcli subnet register), then: sundara worker --hotkey-file {} --validator-hotkey <the validator's>",
                out.display()
            );
            Ok(())
        }
        Command::Chain { command: ChainCommand::RegisterDev { metagraph, hotkey, coldkey }, .. } => {
            let neuron = sundara::chain::register_dev(&metagraph, &hotkey, coldkey.as_deref())?;
            println!(
                "registered {} as uid {} under coldkey {} (block {}): the validator reads it within seconds",
                neuron.hotkey, neuron.uid, neuron.coldkey, neuron.registered_at_block
            );
            Ok(())
        }
        Command::Chain {
            command: ChainCommand::Weights { dry_run, bridge, netuid: bridge_netuid, version_key },
            ..
        } => {
            if !dry_run {
                bail!("`sundara chain serve` sends the weights; --dry-run shows what it would send now");
            }
            let capacity = sundara_common::Capacity::open(&endpoints).await?;
            let (js, _) = registry(&nats).await?;
            let Some(epoch) = sundara_rewarder::read_weights(&js, None).await? else {
                bail!("no epoch has closed yet: there are no weights to send");
            };
            let status = capacity.chain_status().await?;
            let (Some(netuid), Some(block)) = (status.netuid, status.block) else {
                bail!("no metagraph is held: is `sundara chain serve` running?");
            };
            let metagraph = sundara_schemas::chain::Metagraph { netuid, block, neurons: capacity.neurons().await? };
            let rules = match bridge.zip(bridge_netuid) {
                Some((bridge, netuid)) => Some(sundara::bridge::Bridge::new(bridge).rules(netuid).await?),
                None => None,
            };
            print!("{}", sundara::chain::dry_run_text(&epoch, &metagraph, rules.as_ref(), version_key));
            Ok(())
        }
        Command::Tls { command } => tls(command),
        service @ (Command::Ingress { .. }
        | Command::Scheduler { .. }
        | Command::Verifier(_)
        | Command::Rewarder { .. }
        | Command::Autoscaler { .. }
        | Command::Worker(_)
        | Command::Gateway(_)
        | Command::Chain { command: ChainCommand::Serve(_), .. }) => serve(service, endpoints, &cli.history).await,
    }
}

/// `sundara models …`: the registry.
async fn models(command: ModelsCommand, endpoints: &Endpoints) -> anyhow::Result<()> {
    let nats = &endpoints.nats;
    match command {
        ModelsCommand::List => {
            // Reading only: tenants and miners may list models too.
            let client = nats::connect(nats, "sundara-cli").await?;
            let js = jetstream::new(client.clone());
            let registry = nats::unless_denied(&client, |_| true, Registry::open(&js))
                .await
                .map_err(|denial| sundara::auth::NotPermitted {
                    credentials: nats.credentials.clone(),
                    denial,
                    need: "reading the registry needs a validator's, tenant's or miner's credentials".into(),
                })?
                .context("no model registry on this NATS yet (the services or `sundara up` create it)")?;
            for m in registry.list().await? {
                println!("{}", sundara::models::describe(&m));
            }
            Ok(())
        }
        ModelsCommand::Push {
            file,
            name,
            version,
            redundancy,
            rule,
            atol,
            rtol,
            min_cosine,
            audit_rate,
            max_batch,
            max_delay_us,
            redis: _,
        } => {
            let batching = sundara_schemas::Batching { max_batch, max_delay_us };
            let rule = match rule {
                RuleName::Exact => CompareRule::Exact,
                RuleName::Allclose => CompareRule::AllClose { atol, rtol },
                RuleName::Argmax => CompareRule::Argmax,
                RuleName::Cosine => CompareRule::Cosine { min: min_cosine },
            };
            let policy = Policy { redundancy, rule, audit_rate };
            // Refused before anything is read or loaded (the registry refuses it too).
            policy.validate().and_then(|()| batching.validate()).with_context(|| format!("{name} not pushed"))?;
            ort()?;
            let (_, registry) = registry_for(nats, "model pushes").await?;
            let version = version.as_deref();
            let pushed = sundara::models::publish(&registry, &file, &name, version, policy, batching).await?;
            let meta = pushed.meta();
            match &pushed {
                sundara_common::registry::Pushed::Created(_) => println!("{}", sundara::models::describe(meta)),
                sundara_common::registry::Pushed::Unchanged(_) => {
                    println!("{}@{} unchanged (same sha256 and policy)", meta.name, meta.version)
                }
            }
            for warning in sundara::models::policy_warnings(meta) {
                eprintln!("{warning}");
            }
            match sundara::models::fleet_operators(endpoints).await {
                Ok(operators) => {
                    if let Some(warning) = sundara::models::fleet_warning(meta, &operators) {
                        eprintln!("{warning}");
                    }
                }
                Err(why) => eprintln!("note: could not read the fleet from Redis ({why}); its operators not checked"),
            }
            Ok(())
        }
        ModelsCommand::Rm { model } => {
            let (_, registry) = registry_for(nats, "model removals").await?;
            for meta in sundara::models::remove(&registry, &model).await? {
                println!("removed {}@{} (sha256 {}…)", meta.name, meta.version, &meta.sha256[..12]);
            }
            Ok(())
        }
    }
}

/// `sundara rewards`: the table, or one miner's weight explained.
async fn rewards(nats: &nats::NatsEndpoint, epoch: Option<u64>, explain: Option<String>) -> anyhow::Result<()> {
    let (js, _) = registry(nats).await?;
    match explain {
        None => {
            let weights = match epoch {
                Some(n) => Some(
                    sundara_rewarder::read_weights(&js, Some(n))
                        .await?
                        .with_context(|| format!("epoch {n} is not closed"))?,
                ),
                None => None,
            };
            sundara::up::print_rewards(&js, weights.as_ref()).await
        }
        Some(miner) => sundara::up::explain_rewards(&js, epoch, &miner).await,
    }
}

/// `sundara tasks dead`: the dead letters, or one resubmitted.
async fn dead_tasks(nats: &nats::NatsEndpoint, limit: usize, resubmit: Option<String>) -> anyhow::Result<()> {
    let (js, _) = registry(nats).await?;
    match resubmit {
        Some(task) => {
            let new_task = sundara::tasks::resubmit(&js, &task).await?;
            println!("task {task} resubmitted as {new_task}");
        }
        None => {
            let letters = sundara::tasks::dead_letters(&js, limit).await?;
            if letters.is_empty() {
                println!("no dead letters");
            }
            for letter in &letters {
                print!("{}", sundara::tasks::describe(letter));
            }
        }
    }
    Ok(())
}

/// `sundara tls …`: development certificates.
fn tls(command: TlsCommand) -> anyhow::Result<()> {
    match command {
        TlsCommand::Init { dir, hosts, force } => {
            let pki = sundara::tls::init(&dir, &hosts, force)?;
            println!("CA:     {} (its key: {})", pki.ca().display(), dir.join(sundara::tls::CA_KEY).display());
            println!("server: {} and {}", pki.server_cert().display(), pki.server_key().display());
            println!("nats-server's config:\n{}", pki.server_block(false));
            println!(
                "(verify: true for mutual TLS; then `sundara tls client --dir {} --name N` per client)",
                dir.display()
            );
            println!("connect with --nats-ca {} (env SUNDARA_NATS_CA)", pki.ca().display());
            Ok(())
        }
        TlsCommand::Client { dir, name, csr: Some(csr), force } => {
            let cert = sundara::tls::sign_request(&dir, &name, &csr, force)?;
            println!("client {name}: {} (for the key of {})", cert.display(), csr.display());
            println!(
                "hand it and {} back; the client connects with --nats-cert and its own key",
                dir.join(sundara::tls::CA_CERT).display()
            );
            Ok(())
        }
        TlsCommand::Request { dir, name, force } => {
            let csr = sundara::tls::request(&dir, &name, force)?;
            let (_, key) = sundara::tls::DevPki { dir: dir.clone() }.client_files(&name);
            println!("key:     {} (keep it here)", key.display());
            println!(
                "request: {} (hand it to the validator: `sundara tls client --name {name} --csr FILE`)",
                csr.display()
            );
            Ok(())
        }
        TlsCommand::Client { dir, name, csr: None, force } => {
            let tls = sundara::tls::client(&dir, &name, force)?;
            let (cert, key) = tls.client_cert.expect("a client certificate was made");
            println!("client {name}: {} and {}", cert.display(), key.display());
            println!(
                "connect with --nats-ca {} --nats-cert {} --nats-key {}",
                tls.ca.display(),
                cert.display(),
                key.display()
            );
            Ok(())
        }
    }
}

/// `sundara auth …`: users for a nats-server of one's own, or added to `up`'s.
fn auth(command: AuthCommand) -> anyhow::Result<()> {
    match command {
        AuthCommand::Init { dir, users: Users { tenants, miners, miner_keys }, chain } => {
            for (miner, key) in &miner_keys {
                sundara::auth::trust_key(&dir, &sundara::auth::Role::Miner(miner.clone()), key)?;
            }
            if chain {
                let issuer = sundara::auth::enable_callout(&dir)?;
                println!("auth callout issuer: {issuer} (miners join by hotkey through `sundara chain serve`)");
            }
            let auth = sundara::auth::init(&dir, &tenants, &miners)?;
            for role in auth.users.keys() {
                println!("{:<24} {}", role.to_string(), auth.holds(role));
            }
            println!("server config: {} (include it and reload nats-server)", dir.join("auth.conf").display());
            println!("connect with --nats-creds <seed file> (env SUNDARA_NATS_CREDS)");
            Ok(())
        }
        AuthCommand::Keygen { miner, out } => {
            let role = sundara::auth::Role::Miner(miner.clone());
            let path = out.unwrap_or_else(|| PathBuf::from(role.file_name()));
            let key = sundara::auth::keygen(&path)?;
            println!("seed: {} (keep it; it never leaves this machine)", path.display());
            println!("public key: {key}");
            println!("hand the validator: sundara auth add --miner-key {miner}={key}");
            println!("then run: sundara worker --id {miner} --nats-creds {}", path.display());
            Ok(())
        }
        AuthCommand::Add { users: Users { tenants, miners, miner_keys } } => {
            let path = sundara::context::path()?;
            let Some((path, context)) = sundara::context::Context::current() else {
                bail!(
                    "no running `sundara up` (no live context at {}); for a nats-server of your own, \
                     `sundara auth init --dir DIR` and reload it",
                    path.display()
                );
            };
            if tenants.is_empty() && miners.is_empty() && miner_keys.is_empty() {
                bail!("name at least one --tenant, --miner or --miner-key");
            }
            let (auth, added) = sundara::auth::add(&context, &tenants, &miners, &miner_keys)?;
            for role in &added {
                println!("{:<24} {}", role.to_string(), auth.holds(role));
            }
            if added.is_empty() {
                println!("nothing new: every one named has a seed in {}", auth.dir.display());
            }
            println!(
                "nats-server (pid {}) reloaded its users; the stack's context: {}",
                context.nats_server_pid,
                path.display()
            );
            println!(
                "connect with --nats-creds <seed file>, or --tenant T / worker --id W to pick your own seed from the context"
            );
            Ok(())
        }
    }
}

/// `sundara jobs` (but `serve`): one tenant's server-side jobs.
async fn jobs(command: JobsCommand, nats: &nats::NatsEndpoint) -> anyhow::Result<()> {
    use sundara::server_jobs::{self, SubmitCommand};
    let tenant_of = |t: Option<String>| sundara::auth::tenant_of(nats.credentials.as_deref(), t.as_deref());
    let client = |tenant: String| async move {
        let connection = sundara_common::nats::connect(nats, "sundara-jobs-client").await?;
        anyhow::Ok(sundara_jobs::client::JobsClient::new(connection, &tenant))
    };
    match command {
        JobsCommand::Serve(_) => unreachable!("served by serve()"),
        JobsCommand::Submit {
            model,
            shard_rows,
            in_flight,
            attempts,
            deadline_secs,
            wait,
            out,
            task: TaskArgs { input, rows, tenant, timeout_ms },
        } => {
            let options = sundara_jobs::client::JobOptions {
                in_flight,
                attempts,
                shard_timeout: Duration::from_millis(timeout_ms),
                deadline: Duration::from_secs(deadline_secs),
                ..sundara_jobs::client::JobOptions::new(&model, shard_rows)
            };
            let command = SubmitCommand { options, input, rows, tenant: tenant_of(tenant)?, wait, out };
            print!("{}", server_jobs::submit(nats, command).await?);
        }
        JobsCommand::List { tenant } => {
            let jobs = client(tenant_of(tenant.tenant)?).await?.list().await?;
            if jobs.is_empty() {
                println!("no jobs");
            }
            for job in &jobs {
                println!("{}", server_jobs::status_line(job));
            }
        }
        JobsCommand::Show { job_id, tenant } => {
            println!("{}", server_jobs::status_line(&client(tenant_of(tenant.tenant)?).await?.show(&job_id).await?));
        }
        JobsCommand::Cancel { job_id, tenant } => {
            println!("{}", server_jobs::status_line(&client(tenant_of(tenant.tenant)?).await?.cancel(&job_id).await?));
        }
        JobsCommand::Results { job_id, out, tenant } => {
            let jobs = client(tenant_of(tenant.tenant)?).await?;
            print!("{}", server_jobs::results(&jobs, &job_id, out).await?);
        }
    }
    Ok(())
}

/// `sundara <service>`: runs one service until SIGINT or SIGTERM. The validator services
/// provision the streams with `history`'s ages.
async fn serve(command: Command, endpoints: Endpoints, history: &nats::HistoryArgs) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    match command {
        Command::Ingress { args, redis: _ } => {
            let mut config = sundara_ingress::Config::from_args(args, endpoints).map_err(anyhow::Error::msg)?;
            config.retention = history.apply(config.retention);
            run_service(sundara_ingress::run(config, shutdown.clone()), shutdown).await
        }
        Command::Scheduler { args, redis: _ } => {
            let mut config = sundara_scheduler::Config::from_args(args, endpoints)?;
            config.retention = history.apply(config.retention);
            run_service(sundara_scheduler::run(config, shutdown.clone()), shutdown).await
        }
        Command::Verifier(args) => {
            let mut config = sundara_verifier::Config::from_args(args, endpoints, || {
                anyhow::Ok((ort()?, find_project_root()?.join(".cache/verifier-models")))
            })?;
            config.retention = history.apply(config.retention);
            run_service(sundara_verifier::run(config, shutdown.clone()), shutdown).await
        }
        Command::Rewarder { args, redis: _ } => {
            let mut config = sundara_rewarder::Config::from_args(args, endpoints);
            config.retention = history.apply(config.retention);
            run_service(sundara_rewarder::run(config, shutdown.clone()), shutdown).await
        }
        Command::Autoscaler { args, redis: _ } => {
            let binary = || std::env::current_exe().map_err(|e| format!("locating this binary: {e}"));
            let mut config =
                sundara_autoscaler::Config::from_args(args, endpoints, binary).map_err(anyhow::Error::msg)?;
            config.retention = history.apply(config.retention);
            run_service(sundara_autoscaler::run(config, shutdown.clone()), shutdown).await
        }
        Command::Worker(args) => {
            let (args, nats) = sundara::chain::miner_login(args, endpoints.nats)?;
            let endpoints = Endpoints { nats, ..endpoints };
            sundara::auth::check_miner(endpoints.nats.credentials.as_deref(), &args.id)?;
            let lib = ort()?;
            let cache = || find_project_root().map(|root| root.join(".cache/worker-models")).map_err(|e| e.to_string());
            let config =
                sundara_worker::Config::from_args(args, endpoints.nats, lib, cache).map_err(anyhow::Error::msg)?;
            run_service(sundara_worker::run(config, shutdown.clone()), shutdown).await
        }
        Command::Jobs { command: JobsCommand::Serve(args) } => {
            let config = sundara_jobs::Config::from_args(args, endpoints);
            run_service(sundara_jobs::run(config, shutdown.clone()), shutdown).await
        }
        Command::Gateway(args) => {
            let config = sundara_gateway::Config::from_args(args, endpoints)?;
            run_service(sundara_gateway::run(config, shutdown.clone()), shutdown).await
        }
        Command::Chain { command: ChainCommand::Serve(args), .. } => {
            let config = sundara::chain::Config { endpoints, args };
            run_service(sundara::chain::run(config, shutdown.clone()), shutdown).await
        }
        _ => unreachable!("serve() runs services only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every command and subcommand, with its path (`models push`).
    fn commands(command: &clap::Command, path: String, out: &mut Vec<(String, clap::Command)>) {
        out.push((path.clone(), command.clone()));
        for sub in command.get_subcommands() {
            commands(sub, format!("{path} {}", sub.get_name()).trim().to_string(), out);
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_redis_password_is_refused_on_the_command_line_and_read_from_a_file() {
        let typed = |args: &[&str]| redis_url_typed(&Cli::command().try_get_matches_from(args).unwrap());
        assert!(typed(&["sundara", "status", "--redis", "redis://u:pw@h/"]));
        assert!(typed(&["sundara", "models", "push", "--redis", "redis://h/", "--name", "m", "x.onnx"]));
        assert!(!typed(&["sundara", "status"]));
        let args = RedisArgs { url: Some("redis://sundara:pw@h:6379/".into()), ..Default::default() };
        let refused = args.url(true).unwrap_err().to_string();
        assert!(refused.contains("SUNDARA_REDIS_URL") && !refused.contains("pw@"), "{refused}");
        // From the environment it is taken as it is.
        assert_eq!(args.url(false).unwrap().as_deref(), Some("redis://sundara:pw@h:6379/"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("redis.password");
        std::fs::write(&file, "s3cret/pw\n").unwrap();
        let args =
            RedisArgs { url: Some("redis://sundara@h:6379/".into()), password_file: Some(file), ..Default::default() };
        assert_eq!(args.url(true).unwrap().as_deref(), Some("redis://sundara:s3cret%2Fpw@h:6379/"));
    }

    #[test]
    fn history_ages_are_taken_by_every_command_and_not_below_a_minute() {
        let cli = Cli::try_parse_from(["sundara", "verifier", "--outcomes-max-age-secs", "300"]).unwrap();
        assert_eq!(cli.history.outcomes_max_age_secs, Some(300));
        let applied = cli.history.apply(nats::Retention::default());
        assert!(applied.history_ages_given && applied.outcomes_max_age.as_secs() == 300);
        assert!(!nats::HistoryArgs::default().apply(nats::Retention::default()).history_ages_given);
        let short = Cli::try_parse_from(["sundara", "up", "--records-max-age-secs", "5"]);
        assert!(short.err().is_some_and(|e| e.to_string().contains("at least 60 s")));
    }

    #[test]
    fn every_argument_of_every_command_has_a_help_line() {
        let mut all = Vec::new();
        commands(&Cli::command(), String::new(), &mut all);
        let missing: Vec<String> = all
            .iter()
            .flat_map(|(path, command)| {
                command
                    .get_arguments()
                    .filter(|a| !matches!(a.get_id().as_str(), "help" | "version") && !a.is_hide_set())
                    .filter(|a| a.get_help().is_none() && a.get_long_help().is_none())
                    .map(move |a| format!("sundara {path}: {}", a.get_id()))
            })
            .collect();
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    #[test]
    fn redis_is_an_option_of_the_commands_that_use_it_only() {
        let mut all = Vec::new();
        commands(&Cli::command(), String::new(), &mut all);
        let shown = |path: &str| {
            let (_, command) = all.iter().find(|(p, _)| p == path).unwrap();
            command.get_arguments().any(|a| a.get_long() == Some("redis") && !a.is_hide_set())
        };
        for path in ["up", "models push", "fleet", "status", "ingress", "scheduler", "rewarder", "autoscaler"] {
            assert!(shown(path), "{path} takes --redis");
        }
        for path in ["submit", "rewards", "models list", "tasks dead", "auth init", "verifier", "worker"] {
            assert!(!shown(path), "{path} does not use Redis");
        }
        // Before the command, as earlier versions took it, and after it.
        for args in [
            &["sundara", "--redis", "redis://a/", "submit", "--model", "m"][..],
            &["sundara", "status", "--redis", "redis://a/"],
        ] {
            Cli::try_parse_from(args).unwrap();
        }
    }

    #[test]
    fn service_flags_parse_into_their_configs_defaults() {
        let cli = Cli::try_parse_from(["sundara", "worker", "--id", "w1", "--behaviour", "honest"]).unwrap();
        let Command::Worker(args) = cli.command else { panic!("a worker") };
        assert_eq!(args.threads, sundara_worker::Args::new("w1").threads);
        let cli = Cli::try_parse_from(["sundara", "rewarder"]).unwrap();
        let Command::Rewarder { args, .. } = cli.command else { panic!("the rewarder") };
        assert_eq!(args.epoch_secs, sundara_rewarder::Args::default().epoch_secs);
        let cli = Cli::try_parse_from(["sundara", "ingress"]).unwrap();
        let Command::Ingress { args, .. } = cli.command else { panic!("ingress") };
        assert_eq!(args.max_in_flight, sundara_ingress::Args::default().max_in_flight);
        let cli = Cli::try_parse_from(["sundara", "autoscaler", "--driver", "nomad"]).unwrap();
        let Command::Autoscaler { args, .. } = cli.command else { panic!("the autoscaler") };
        assert_eq!(args.driver, Some(sundara_autoscaler::DriverKind::Nomad));
        assert!(Cli::try_parse_from(["sundara", "autoscaler", "--driver", "k8s"]).is_err());
        assert!(
            Cli::try_parse_from(["sundara", "models", "push", "m.onnx", "--name", "m", "--rule", "nearly"]).is_err()
        );
    }
}
