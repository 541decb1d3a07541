//! `sundara`: client and operator commands, the embedded stack (`up`), and the main of
//! every service (`sundara ingress`, `sundara worker`, ...): one binary to ship.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use async_nats::jetstream;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use rand::SeedableRng;
use sundara::client::Client;
use sundara::stack::project_root;
use sundara_common::{Endpoints, Registry, Shutdown, nats};
use sundara_schemas::{CompareRule, Policy, ResultStatus, SubmitOutcome, SubmitRequest};
use sundara_worker::SliceConfig;

#[derive(Parser)]
#[command(name = "sundara", version, about = "Sundara: verified inference on untrusted miners")]
struct Cli {
    #[arg(long, global = true, env = "SUNDARA_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// NKey seed file to authenticate to NATS with (as `sundara auth init` writes them).
    #[arg(long, global = true, env = "SUNDARA_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    #[arg(long, global = true, env = "SUNDARA_REDIS_URL", default_value = "redis://127.0.0.1:6379/")]
    redis: String,
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
    },
    /// The model registry.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Submit tasks and print results as they arrive.
    Submit {
        #[arg(long)]
        model: String,
        /// JSON inputs: {"inputs": [{"name", "dtype", "shape", "values"}]}; random inputs when absent.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Generated tasks to submit (with a progress bar when more than one).
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Rows per generated task (along the first dynamic dimension).
        #[arg(long, default_value_t = 1)]
        rows: u64,
        /// Who submits: it must be the tenant your --nats-creds belong to when NATS has auth on.
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, default_value_t = 60_000)]
        timeout_ms: u64,
        /// high, normal or low: under contention, higher priority is dispatched first.
        #[arg(long, default_value = "normal", value_parser = sundara_schemas::Priority::parse)]
        priority: sundara_schemas::Priority,
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
    /// Every slice of the fleet: state, slots and memory in use, models loaded.
    Fleet,
    /// A live view of the fleet, the queues and the newest verdicts, refreshed in place.
    Status {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        every: f64,
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
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
    /// Run the ingress service.
    Ingress {
        /// Per-tenant limits, JSON: {"default": {"rate_per_s", "burst", "max_in_flight",
        /// "max_payload_bytes"}, "tenants": {"<tenant>": {...}}}; fields left out default.
        #[arg(long, env = "SUNDARA_TENANT_LIMITS")]
        tenant_limits: Option<PathBuf>,
        /// Tasks in flight in the whole fleet beyond which submissions are told `overloaded`.
        #[arg(long, env = "SUNDARA_MAX_IN_FLIGHT", default_value_t = 100_000)]
        max_in_flight: u64,
    },
    /// Run the scheduler service.
    Scheduler(Secret),
    /// Run the verifier service.
    Verifier {
        #[command(flatten)]
        secret: Secret,
        /// Do not run tasks on the verifier's own runtime: no audits, and a task without a
        /// majority is dead-lettered.
        #[arg(long)]
        no_reference: bool,
        /// Inference threads of the reference runtime.
        #[arg(long, default_value_t = 1)]
        reference_threads: usize,
    },
    /// Run the rewarder service.
    Rewarder {
        #[arg(long, default_value_t = 60)]
        epoch_secs: u64,
    },
    /// Run the autoscaler service: fleet health, and with --driver the size of the worker pool.
    Autoscaler(AutoscalerArgs),
    /// Run a worker (miner).
    Worker {
        #[arg(long)]
        id: String,
        #[arg(long)]
        operator: Option<String>,
        /// Inference threads of the one CPU slice (when no --slice is given).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Assignments accepted at once by that slice (default: 16 per thread).
        #[arg(long)]
        slots: Option<u32>,
        /// A slice (repeat for several): `cpu|cuda:<index>|mig:<uuid>` then `,threads=N`,
        /// `,memory=8G`, `,slots=N`, `,name=NAME`. Default: one CPU slice of --threads
        /// threads holding up to half the available memory.
        #[arg(long = "slice")]
        slices: Vec<String>,
        /// Models offered (comma-separated); all registered models when absent.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Return plausible but wrong outputs (demos and tests of the verifier): same as
        /// `--behaviour rotate`. Only in a build with `--features cheaters`.
        #[arg(long)]
        dishonest: bool,
        /// honest. A build with `--features cheaters` also has noisy (honest with 1e-6 float
        /// noise) and the cheaters of docs/verification.md §4: rotate, wrong-model,
        /// quantised, random, constant, replay, never-answer, late.
        #[arg(long, default_value = "honest", value_parser = sundara_worker::Behaviour::parse)]
        behaviour: sundara_worker::Behaviour,
    },
}

#[derive(clap::Args)]
struct AutoscalerArgs {
    /// How the worker pool is changed: local (worker processes of this binary), nomad or
    /// compose. Without it the autoscaler watches health only.
    #[arg(long)]
    driver: Option<String>,
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    #[arg(long, default_value_t = 8)]
    max_workers: usize,
    /// Inference threads of each worker the pool runs (its lanes).
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Share of the pool's lanes to keep busy.
    #[arg(long, default_value_t = 0.7)]
    target_utilisation: f64,
    /// Seconds fewer workers must be needed before one is removed.
    #[arg(long, default_value_t = 60)]
    scale_down_after_s: u64,
    /// Worker ids of the pool start with this (local: `<prefix>-<n>`).
    #[arg(long, default_value = "pool")]
    pool_prefix: String,
    /// Nomad HTTP API, `host:port`.
    #[arg(long, default_value = "127.0.0.1:4646")]
    nomad_addr: String,
    #[arg(long, default_value = "sundara-workers")]
    nomad_job: String,
    #[arg(long, default_value = "worker")]
    nomad_group: String,
    #[arg(long, env = "NOMAD_TOKEN", hide_env_values = true)]
    nomad_token: Option<String>,
    #[arg(long, default_value = "infra/compose.yaml")]
    compose_file: PathBuf,
    #[arg(long, default_value = "worker")]
    compose_service: String,
}

impl AutoscalerArgs {
    fn scaling(self, endpoints: &Endpoints) -> anyhow::Result<Option<sundara_autoscaler::ScalingConfig>> {
        use sundara_autoscaler::DriverConfig;
        let prefix = self.pool_prefix.clone();
        let driver = match self.driver.as_deref() {
            None => return Ok(None),
            Some("local") => DriverConfig::Local {
                binary: std::env::current_exe().context("locating this binary")?,
                args: vec!["--threads".into(), self.worker_threads.to_string()],
                env: vec![("SUNDARA_NATS_URL".into(), endpoints.nats.url.clone())],
                prefix,
            },
            Some("nomad") => DriverConfig::Nomad {
                addr: self.nomad_addr,
                job: self.nomad_job,
                group: self.nomad_group,
                token: self.nomad_token,
                prefix,
            },
            Some("compose") => DriverConfig::Compose { file: self.compose_file, service: self.compose_service, prefix },
            Some(other) => bail!("unknown driver {other:?}: local, nomad or compose"),
        };
        if self.min_workers > self.max_workers || !(0.05..=1.0).contains(&self.target_utilisation) {
            bail!("need --min-workers ≤ --max-workers and --target-utilisation in [0.05, 1]");
        }
        let mut scaling = sundara_autoscaler::ScalingConfig::new(driver);
        scaling.policy = sundara_autoscaler::plan::ScalePolicy {
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            lanes_per_worker: self.worker_threads.max(1),
            target_utilisation: self.target_utilisation,
            scale_down_after: Duration::from_secs(self.scale_down_after_s),
        };
        Ok(Some(scaling))
    }
}

#[derive(clap::Args)]
struct Secret {
    /// Validator secret that signs assignment tickets (same for scheduler and verifier).
    #[arg(long, env = "SUNDARA_SECRET", hide_env_values = true)]
    secret: String,
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Write a seed file per user into DIR (keeping existing ones) and DIR/auth.conf, the
    /// server's `authorization` block for all of them: `include` it in nats-server's config,
    /// then reload the server (`nats-server --signal reload`) after adding users.
    Init {
        #[arg(long, default_value = "nats-auth")]
        dir: PathBuf,
        /// A tenant (repeatable).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// A miner, by its worker id (repeatable).
        #[arg(long = "miner")]
        miners: Vec<String>,
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

#[derive(Subcommand)]
enum ModelsCommand {
    /// Register an ONNX model (inputs and outputs are read from the model).
    Push {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "1")]
        version: String,
        /// Distinct miners per task (k).
        #[arg(long, default_value_t = 2)]
        redundancy: u8,
        /// exact | allclose | argmax | cosine
        #[arg(long, default_value = "allclose")]
        rule: String,
        #[arg(long, default_value_t = 1e-4)]
        atol: f64,
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
    },
    /// List registered models.
    List,
}

async fn run_service<E: std::fmt::Display>(
    fut: impl Future<Output = Result<(), E>>,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let signal = shutdown.clone();
    tokio::spawn(async move {
        sundara_common::termination_signal().await;
        signal.cancel();
    });
    fut.await.map_err(|e| anyhow::anyhow!("{e}"))
}

/// The registry, for operator commands (which create the streams when missing).
async fn registry(nats: &nats::NatsEndpoint) -> anyhow::Result<(jetstream::Context, Registry)> {
    let client = nats::connect(nats, "sundara-cli").await?;
    let js = jetstream::new(client);
    nats::provision(&js, &nats::Retention::default()).await?;
    let registry = Registry::open(&js).await?;
    Ok((js, registry))
}

fn ort() -> anyhow::Result<PathBuf> {
    let lib = sundara_runtime::find_library(&[project_root()])?;
    sundara_runtime::init(&lib)?;
    Ok(lib)
}

/// `up` and the client commands print their own report; services log at info.
fn is_quiet(command: &Command) -> bool {
    matches!(
        command,
        Command::Up { .. }
            | Command::Auth { .. }
            | Command::Submit { .. }
            | Command::Models { .. }
            | Command::Rewards { .. }
            | Command::Fleet
            | Command::Tasks { .. }
            | Command::Status { .. }
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let quiet = is_quiet(&cli.command);
    let telemetry = sundara_common::telemetry::init(&sundara_common::telemetry::TelemetryConfig {
        service: service_name(&cli.command).into(),
        log_level: if quiet { "warn" } else { "info" }.into(),
        log_format: cli.log_format,
        otlp_endpoint: cli.otlp_endpoint.clone(),
    })?;
    let result = run(cli, quiet).await;
    telemetry.shutdown();
    result
}

/// `service.name` of the spans a command exports.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Ingress { .. } => "sundara-ingress",
        Command::Scheduler(_) => "sundara-scheduler",
        Command::Verifier { .. } => "sundara-verifier",
        Command::Rewarder { .. } => "sundara-rewarder",
        Command::Autoscaler(_) => "sundara-autoscaler",
        Command::Worker { .. } => "sundara-worker",
        // `up` runs every service in one process.
        Command::Up { .. } => "sundara",
        _ => "sundara-cli",
    }
}

/// Runs the command; `quiet` ones (client and `up`) serve no metrics of their own.
async fn run(cli: Cli, quiet: bool) -> anyhow::Result<()> {
    let nats = nats::NatsEndpoint { url: cli.nats.clone(), credentials: cli.nats_creds.clone() };
    let endpoints = Endpoints { nats: nats.clone(), redis_url: cli.redis.clone() };
    let shutdown = Shutdown::new();
    if !quiet && cli.metrics_addr.is_some() {
        sundara_common::metrics::install(cli.metrics_addr)?;
    }
    match cli.command {
        Command::Up { once, tasks, workers, external, autoscale } => {
            let opts = sundara::up::UpOptions {
                once,
                tasks,
                honest_workers: workers.max(2),
                endpoints: external.then_some(endpoints),
                metrics: cli.metrics_addr,
                autoscale,
            };
            sundara::up::up(opts).await
        }
        Command::Models { command: ModelsCommand::List } => {
            let (_, registry) = registry(&nats).await?;
            for m in registry.list().await? {
                println!("{}", sundara::models::describe(&m));
            }
            Ok(())
        }
        Command::Models {
            command:
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
                },
        } => {
            if !(0.0..=1.0).contains(&audit_rate) {
                bail!("--audit-rate must be between 0 and 1");
            }
            let batching = sundara_schemas::Batching { max_batch, max_delay_us };
            ort()?;
            let rule = match rule.as_str() {
                "exact" => CompareRule::Exact,
                "allclose" => CompareRule::AllClose { atol, rtol },
                "argmax" => CompareRule::Argmax,
                "cosine" => CompareRule::Cosine { min: min_cosine },
                other => bail!("unknown rule {other:?}: use exact, allclose, argmax or cosine"),
            };
            let (_, registry) = registry(&nats).await?;
            let meta = sundara::models::push(
                &registry,
                &file,
                &name,
                &version,
                Policy { redundancy, rule, audit_rate },
                batching,
            )
            .await?;
            println!("{}", sundara::models::describe(&meta));
            Ok(())
        }
        Command::Submit { model, input, count, rows, tenant, timeout_ms, priority } => {
            let options = SubmitOptions { count, rows, tenant, timeout_ms, priority };
            submit(&nats, &model, input, options).await
        }
        Command::Rewards { epoch, explain } => {
            let (js, _) = registry(&nats).await?;
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
        Command::Fleet => {
            let capacity = sundara_common::Capacity::connect(&cli.redis).await?;
            print!("{}", sundara::fleet::table(&capacity).await?);
            Ok(())
        }
        Command::Status { every, once } => {
            if !(every.is_finite() && every >= 0.1) {
                bail!("--every must be at least 0.1 s");
            }
            let (js, _) = registry(&nats).await?;
            let capacity = sundara_common::Capacity::connect(&cli.redis).await?;
            sundara::status::watch(&js, &capacity, Duration::from_secs_f64(every), once).await?;
            Ok(())
        }
        Command::Tasks { command: TasksCommand::Dead { limit, resubmit } } => {
            let (js, _) = registry(&nats).await?;
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
        Command::Auth { command: AuthCommand::Init { dir, tenants, miners } } => {
            let auth = sundara::auth::init(&dir, &tenants, &miners)?;
            for role in auth.users.keys() {
                println!("{:<24} {}", format!("{role:?}"), auth.credentials(role).display());
            }
            println!("server config: {} (include it and reload nats-server)", dir.join("auth.conf").display());
            println!("connect with --nats-creds <seed file> (env SUNDARA_NATS_CREDS)");
            Ok(())
        }
        Command::Ingress { tenant_limits, max_in_flight } => {
            let mut config = sundara_ingress::Config::new(endpoints);
            if let Some(path) = tenant_limits {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                config.tenants = sundara_common::admission::TenantPolicy::from_json(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            }
            config.max_in_flight = max_in_flight;
            run_service(sundara_ingress::run(config, shutdown.clone()), shutdown).await
        }
        Command::Scheduler(s) => {
            let config = sundara_scheduler::Config::new(endpoints, s.secret.into_bytes());
            run_service(sundara_scheduler::run(config, shutdown.clone()), shutdown).await
        }
        Command::Verifier { secret, no_reference, reference_threads } => {
            let mut config = sundara_verifier::Config::new(endpoints, secret.secret.into_bytes());
            if !no_reference {
                let cache = project_root().join(".cache/verifier-models");
                let mut reference = sundara_verifier::ReferenceConfig::new(ort()?, cache);
                reference.threads = reference_threads.max(1);
                config.reference = Some(reference);
            }
            run_service(sundara_verifier::run(config, shutdown.clone()), shutdown).await
        }
        Command::Rewarder { epoch_secs } => {
            let mut config = sundara_rewarder::Config::new(endpoints);
            config.epoch_length = Duration::from_secs(epoch_secs);
            run_service(sundara_rewarder::run(config, shutdown.clone()), shutdown).await
        }
        Command::Autoscaler(args) => {
            let mut config = sundara_autoscaler::Config::new(endpoints.clone());
            config.scaling = args.scaling(&endpoints)?;
            run_service(sundara_autoscaler::run(config, shutdown.clone()), shutdown).await
        }
        Command::Worker { id, operator, threads, slots, slices, models, cache_dir, dishonest, behaviour } => {
            let lib = ort()?;
            let cache = cache_dir.unwrap_or_else(|| project_root().join(".cache/worker-models"));
            let mut config = sundara_worker::Config::new(endpoints.nats, &id, lib, cache);
            config.operator = operator.unwrap_or(id);
            config.slices = if slices.is_empty() {
                let mut cpu = SliceConfig::cpu("cpu0", threads, sundara_worker::default_cpu_memory(1));
                cpu.slots = slots.unwrap_or(cpu.slots);
                vec![cpu]
            } else {
                let parsed: Result<Vec<SliceConfig>, String> =
                    slices.iter().enumerate().map(|(i, s)| SliceConfig::parse(s, i)).collect();
                let mut parsed = parsed.map_err(anyhow::Error::msg)?;
                let cpus = parsed.iter().filter(|s| s.device == sundara_worker::SliceDevice::Cpu).count();
                for s in parsed.iter_mut().filter(|s| s.memory == 0) {
                    s.memory = sundara_worker::default_cpu_memory(cpus);
                }
                parsed
            };
            config.models = models;
            config.behaviour = if dishonest {
                sundara_worker::Behaviour::parse("rotate").map_err(anyhow::Error::msg)?
            } else {
                behaviour
            };
            run_service(sundara_worker::run(config, shutdown.clone()), shutdown).await
        }
    }
}

struct SubmitOptions {
    count: usize,
    rows: u64,
    tenant: String,
    timeout_ms: u64,
    priority: sundara_schemas::Priority,
}

async fn submit(
    endpoint: &nats::NatsEndpoint,
    model: &str,
    input: Option<PathBuf>,
    options: SubmitOptions,
) -> anyhow::Result<()> {
    let SubmitOptions { count, rows, tenant, timeout_ms, priority } = options;
    // A tenant may read the registry but not create streams: no provisioning here.
    let nats = nats::connect(endpoint, "sundara-client").await?;
    let registry = Registry::open(&jetstream::new(nats.clone())).await?;
    let meta = registry.latest(model).await?.with_context(|| format!("no model named {model:?}"))?;
    let fixed = match &input {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Some(sundara::inputs_from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    let client = Client::new(nats, &tenant);
    let mut results = client.results().await?;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let bar = (count > 1).then(|| indicatif::ProgressBar::new(count as u64));
    let mut pending = std::collections::HashSet::new();
    for _ in 0..count {
        let inputs = fixed.clone().unwrap_or_else(|| sundara::models::sample_inputs(&meta.inputs, rows, &mut rng));
        let req = SubmitRequest { timeout_ms: Some(timeout_ms), priority, ..SubmitRequest::new(model, inputs) };
        match client.submit(&req).await? {
            SubmitOutcome::Accepted { task_id, .. } => {
                pending.insert(task_id);
            }
            SubmitOutcome::Rejected { code, reason } => bail!("rejected ({}): {reason}", code.as_str()),
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms + 5_000);
    while !pending.is_empty() {
        let Ok(Some(result)) = tokio::time::timeout_at(deadline, results.next()).await else {
            bail!("{} results did not arrive in time", pending.len());
        };
        let result = result?;
        if !pending.remove(&result.task_id) {
            continue;
        }
        match (&bar, &result.status) {
            (Some(bar), _) => bar.inc(1),
            (None, ResultStatus::Verified { outputs, agreeing, k }) => {
                println!("task {} verified by {agreeing}/{k} miners", result.task_id);
                for t in outputs {
                    let values = t.to_f64();
                    let shown: Vec<String> = values.iter().take(10).map(|v| format!("{v:.5}")).collect();
                    let more = if values.len() > 10 { ", …" } else { "" };
                    println!("  {} {}{:?} [{}{more}]", t.name, t.dtype, t.shape, shown.join(", "));
                }
            }
            (None, ResultStatus::Failed { code, reason }) => {
                println!("task {} failed ({code:?}): {reason}", result.task_id)
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_with_message("all results in");
    }
    Ok(())
}
