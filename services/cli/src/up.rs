//! `sundara up`: the whole pipeline on one machine, with a demo load and a summary.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use rand::Rng;
use sundara_common::nats::NatsEndpoint;
use sundara_common::{Endpoints, Registry, Shutdown, nats};
use sundara_schemas::{CompareRule, EpochWeights, MAX_MESSAGE_BYTES, ModelMeta, Policy, decode, subjects as subj};
use sundara_worker::{Behaviour, SliceConfig};

use crate::context;
use crate::pipeline::{Pipeline, PipelineConfig, WorkerSpec};
use crate::stack::{LocalStack, find_project_root};

/// Demo models: file under `.cache/models/`, registry name. Besides the generated MLP, real
/// pretrained models from PyPI wheels (see `scripts/setup`): silero-vad (voice activity,
/// f32 audio plus an i64 scalar and a recurrent state), magika (file-type detection, i32
/// byte windows) and PP-OCR's text-direction classifier (f32 images).
pub const DEMO_MODELS: [(&str, &str); 4] =
    [("mlp.onnx", "mlp"), ("silero_vad.onnx", "silero"), ("magika.onnx", "magika"), ("ppocr_cls.onnx", "ppocr-cls")];

pub struct UpOptions {
    pub once: bool,
    pub tasks: usize,
    pub honest_workers: usize,
    pub endpoints: Option<Endpoints>,
    /// Where to serve Prometheus metrics of the whole embedded pipeline.
    pub metrics: Option<std::net::SocketAddr>,
    /// With `Some(max)`, the autoscaler runs a pool of up to `max` worker processes
    /// (local driver) beside the fixed miners, sized to demand.
    pub autoscale: Option<usize>,
    /// Where the embedded nats-server listens, and whether it verifies clients (mutual
    /// TLS: every connection presents a certificate of the stack's CA).
    pub nats: crate::stack::ServerOptions,
    /// Where the HTTP gateway listens (`None`: a free port of loopback).
    pub gateway_listen: Option<std::net::SocketAddr>,
    /// As a local Bittensor subnet ([`DevSubnet`]).
    pub chain: bool,
    /// The streams' limits (`--outcomes-max-age-secs` and the other history ages).
    pub retention: nats::Retention,
}

/// Pushes the demo models (k=3 so that one liar is always outvoted).
pub async fn push_demo_models(registry: &Registry, root: &std::path::Path) -> anyhow::Result<Vec<ModelMeta>> {
    let mut metas = Vec::new();
    for (file, name) in DEMO_MODELS {
        let path = root.join(".cache/models").join(file);
        if !path.exists() {
            bail!("{} is missing: run scripts/setup (it makes the demo models)", path.display());
        }
        let rule = CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 };
        let policy = Policy::new(3, rule);
        // Without a version: the same model again is a no-op, an earlier one under another
        // policy (`up --external` on a used stack) gets the next version.
        metas.push(crate::models::publish(registry, &path, name, None, policy, Default::default()).await?.into_meta());
    }
    Ok(metas)
}

/// Waits until the rewarder has applied every verdict stored so far.
pub async fn rewarder_caught_up(js: &jetstream::Context, within: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut stream = js.get_stream(subj::VERDICTS_STREAM).await?;
    loop {
        let stored = stream.info().await?.state.messages;
        if let Ok(mut consumer) = stream.get_consumer::<jetstream::consumer::pull::Config>("rewarder").await {
            let info = consumer.info().await?;
            if info.delivered.stream_sequence >= stored && info.num_ack_pending == 0 && info.num_pending == 0 {
                return Ok(());
            }
        }
        if started.elapsed() > within {
            bail!("the rewarder did not catch up within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks the rewarder to close the epoch now and returns its weights.
pub async fn close_epoch(client: &async_nats::Client) -> anyhow::Result<EpochWeights> {
    let reply =
        tokio::time::timeout(Duration::from_secs(10), client.request(sundara_rewarder::CLOSE_EPOCH_SUBJECT, "".into()))
            .await
            .context("rewarder did not answer within 10 s")??;
    Ok(decode::<EpochWeights>(&reply.payload, MAX_MESSAGE_BYTES)?)
}

/// Prints the per-miner reward table.
pub async fn print_rewards(js: &jetstream::Context, weights: Option<&EpochWeights>) -> anyhow::Result<()> {
    let ledger = sundara_rewarder::read_ledger(js).await?;
    let weights = match weights {
        Some(w) => Some(w.clone()),
        None => sundara_rewarder::read_weights(js, None).await?,
    };
    let by_miner: HashMap<&str, u16> =
        weights.iter().flat_map(|w| w.weights.iter().map(|m| (m.miner.as_str(), m.weight))).collect();
    println!("{:<12} {:>6} {:>7} {:>8} {:>8} {:>7}", "miner", "tasks", "agreed", "strikes", "score", "weight");
    if let Some(ledger) = &ledger {
        for (miner, s) in ledger.miners() {
            let w = by_miner.get(miner.as_str()).copied().unwrap_or(0);
            println!("{:<12} {:>6} {:>7} {:>8} {:>8.4} {:>7}", miner, s.tasks, s.agreed, s.strikes, s.ema, w);
        }
    }
    if let Some(w) = &weights {
        let total: u32 = w.weights.iter().map(|m| m.weight as u32).sum();
        println!("epoch {} weights sum to {total}", w.epoch);
    }
    Ok(())
}

/// `sundara rewards --explain MINER`: the miner's share of every task of the epoch, and its
/// weight recomputed from the reward traces alone, checked against the published one.
pub async fn explain_rewards(js: &jetstream::Context, epoch: Option<u64>, miner: &str) -> anyhow::Result<()> {
    let weights = sundara_rewarder::read_weights(js, epoch).await?.context("no epoch has closed yet")?;
    let alpha = sundara_rewarder::read_ledger(js).await?.map_or(0.1, |l| l.alpha());
    let traces = sundara_rewarder::read_traces(js).await?;
    let x = sundara_rewarder::ledger::explain(&traces, alpha, weights.epoch, &weights.quarantined, miner);
    let published = weights.weights.iter().any(|m| m.miner == miner);
    if x.entries.is_empty() && !published {
        let known: Vec<&str> = weights.weights.iter().map(|m| m.miner.as_str()).collect();
        bail!(
            "no miner {miner:?} in epoch {}: it ran no task and has no weight (miners of the epoch: {})",
            weights.epoch,
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        );
    }
    println!("{:<34} {:<10} {:>12} {:>5} {:>7}", "task", "standing", "latency ms", "rank", "score");
    for (task, e) in &x.entries {
        let latency = e.latency_us.map_or("–".to_string(), |us| format!("{:.2}", us as f64 / 1000.0));
        let rank = e.rank.map_or("–".to_string(), |r| r.to_string());
        println!("{task:<34} {:<10} {latency:>12} {rank:>5} {:>7.4}", format!("{:?}", e.standing), e.score);
    }
    let published = weights.weights.iter().find(|m| m.miner == miner).map_or(0, |m| m.weight);
    println!(
        "epoch {}: {} tasks; quality (moving score, alpha {alpha}) {:.6} × {} agreed{} = {:.6} of {:.6} in all → weight {} of 65535; published {} ({})",
        weights.epoch,
        x.entries.len(),
        x.quality,
        x.agreed,
        if x.quarantined { ", quarantined at the close: 0" } else { "" },
        x.score,
        x.total_score,
        x.weight,
        published,
        if x.weight == published { "matches" } else { "DIFFERS" }
    );
    Ok(())
}

/// The tenant `up` submits its demo load as.
const DEMO_TENANT: &str = "demo";

pub async fn up(opts: UpOptions) -> anyhow::Result<()> {
    // Ctrl-C (or SIGTERM) from now on no longer ends the process by itself: it stops the
    // stack and removes what `up` wrote (below) wherever `up` is.
    let interrupted = watch_interruptions();
    // The servers are `up`'s to stop, after its services: a terminal's Ctrl-C does not
    // reach them.
    crate::stack::detach_servers();
    let recorder = sundara_common::metrics::install(opts.metrics)?;
    let root = find_project_root()?;
    let ort_library = sundara_runtime::find_library(std::slice::from_ref(&root))?;
    sundara_runtime::init(&ort_library)?;
    // The honest miners, then the liar where this build has the cheaters.
    let miners = opts.honest_workers + usize::from(Behaviour::liar().is_some());
    let subnet = opts.chain.then(|| DevSubnet::new(miners));
    let miner_ids: Vec<String> = match &subnet {
        Some(subnet) => subnet.miner_ids(),
        None => (1..=miners).map(|i| format!("miner-{i}")).collect(),
    };
    // An embedded stack's context (for the other commands) and seeds: a live `up`'s are
    // not taken over, a dead one's are cleared. Dropped last, which removes both, on every
    // way out: the end, an error, Ctrl-C.
    let claim = match opts.endpoints {
        Some(_) => None,
        None => Some(context::claim(&context::path()?)?),
    };
    let (endpoints, auth, stack) =
        start_servers(opts.endpoints, &opts.nats, claim.as_ref(), &root, &miner_ids, subnet.is_some())?;
    if let (Some(claim), Some(stack)) = (&claim, &stack) {
        publish_context(claim, stack, auth.as_ref(), opts.metrics)?;
    }
    let chain = match (&subnet, &auth) {
        (Some(subnet), Some(auth)) => Some(subnet.start(&endpoints, auth).await?),
        _ => None,
    };
    if let Some(addr) = opts.metrics {
        println!("metrics: http://{addr}/metrics");
    }
    let Some(set_up) = unless(&interrupted, register_demo_models(&endpoints, &root, &opts.retention)).await else {
        println!("interrupted: stopping");
        return Ok(());
    };
    let (nats_client, js, models) = set_up?;
    for m in &models {
        println!("registered {}", crate::models::describe(m));
    }

    let (workers, liar) = demo_workers(&miner_ids, opts.honest_workers);
    let scaling = match opts.autoscale {
        Some(max) => Some(local_pool(&endpoints, auth.as_ref(), &ort_library, max)?),
        None => None,
    };
    let embedding = push_embedding_model(&js, &root).await?;
    let gateway = demo_gateway(opts.gateway_listen, embedding.is_some())?;
    let mut config = pipeline_config(&endpoints, ort_library, &root, &workers, auth.as_ref(), scaling);
    config.retention = opts.retention.clone();
    let mut gateway_config = sundara_gateway::Config::new(endpoints.clone(), gateway.listen, gateway.keys.clone());
    gateway_config.embedding_models = embedding.into_iter().collect();
    config.gateway = Some(gateway_config);
    let pipeline = Pipeline::start(config).await;
    let Some(ready) = unless(&interrupted, pipeline.ready(Duration::from_secs(60))).await else {
        return stop_interrupted(pipeline).await;
    };
    ready?;
    announce_fleet(&workers, liar.as_deref());

    let tenant = demo_tenant(&endpoints, auth.as_ref());
    let load = crate::submit::demo_load(&tenant, DEMO_TENANT, &models, opts.tasks);
    // Ctrl-C during the load stops the services, the servers, and removes the seeds.
    let Some(summary) = unless(&interrupted, load).await else {
        return stop_interrupted(pipeline).await;
    };
    if let Some(failed) = pipeline.failed() {
        bail!("{failed} stopped unexpectedly");
    }
    let tally = summary?;
    rewarder_caught_up(&js, Duration::from_secs(30)).await?;
    let weights = close_epoch(&nats_client).await?;
    print_outcome(&js, &endpoints, &tally, &weights, liar.as_deref()).await?;
    println!("{}", verification_summary(&recorder.render()));

    if !opts.once {
        gateway.print_example(&models, claim.as_ref().map(|c| c.credentials_dir.as_path()))?;
        println!("serving on {} until Ctrl-C", endpoints.nats.url);
        interrupted.cancelled().await;
    }
    let errors = pipeline.stop().await;
    for e in &errors {
        eprintln!("shutdown: {e}");
    }
    if let Some((shutdown, service)) = chain {
        shutdown.cancel();
        let _ = service.await;
    }
    println!("stopped cleanly");
    Ok(())
}

/// A token cancelled at the first SIGINT, SIGTERM or SIGHUP (after which `up` stops the
/// stack and cleans up); a second one says that `up` is still stopping.
fn watch_interruptions() -> Shutdown {
    let interrupted = Shutdown::new();
    tokio::spawn({
        let interrupted = interrupted.clone();
        async move {
            interruption().await;
            interrupted.cancel();
            interruption().await;
            eprintln!("still stopping (at most {} s)", STOP_WITHIN.as_secs());
        }
    });
    interrupted
}

/// The servers `up` runs on: `external` ones as given, or an embedded stack. The embedded
/// stack runs NATS with a user per role (docs/reliability.md), seeds written under the
/// claimed context's credentials directory (an autoscaled pool's workers, named as they
/// start, share the pool's). NATS speaks TLS only (a throwaway CA in the stack's
/// directory), verifying clients' certificates too with `mutual_tls`.
fn start_servers(
    external: Option<Endpoints>,
    nats: &crate::stack::ServerOptions,
    claim: Option<&context::Claim>,
    root: &std::path::Path,
    miner_ids: &[String],
    chain: bool,
) -> anyhow::Result<(Endpoints, Option<crate::auth::AuthDir>, Option<LocalStack>)> {
    match (external, claim) {
        (Some(ep), _) => Ok((ep, None, None)),
        (None, claim) => {
            let dir = &claim.expect("an embedded stack has claimed its context").credentials_dir;
            context::create_private_dir(dir)?;
            if chain {
                crate::auth::enable_callout(dir)?;
            }
            let auth = crate::auth::init(dir, &[DEMO_TENANT.to_string()], miner_ids)?;
            let stack = LocalStack::start_with(root, Some(&auth), nats)?;
            println!(
                "nats-server on {} with {} users (validator, one per service, the pool, tenant {DEMO_TENANT}, one per miner), redis-server on {}",
                stack.endpoints().nats.url,
                auth.users.len(),
                sundara_common::redacted(&stack.endpoints().redis_url)
            );
            println!(
                "TLS: CA {}{}",
                stack.pki.ca().display(),
                if nats.mutual_tls { " (mutual: clients present a certificate it signed)" } else { "" }
            );
            Ok((stack.endpoints(), Some(auth), Some(stack)))
        }
    }
}

/// Connects, provisions the streams and pushes the demo models.
async fn register_demo_models(
    endpoints: &Endpoints,
    root: &std::path::Path,
    retention: &nats::Retention,
) -> anyhow::Result<(async_nats::Client, jetstream::Context, Vec<ModelMeta>)> {
    let nats_client = nats::connect(&endpoints.nats, "sundara-up").await?;
    let js = jetstream::new(nats_client.clone());
    nats::provision(&js, retention).await?;
    let registry = Registry::open(&js).await?;
    let models = push_demo_models(&registry, root).await?;
    Ok((nats_client, js, models))
}

/// The demo's miners: `honest` honest ones (the first with two CPU slices), and the liar
/// (its id returned too) where this build has the cheaters (`--features cheaters`).
fn demo_workers(miner_ids: &[String], honest: usize) -> (Vec<WorkerSpec>, Option<String>) {
    let mut workers: Vec<WorkerSpec> =
        miner_ids[..honest].iter().map(|id| WorkerSpec::cpu(id, 2, Behaviour::Honest)).collect();
    // The first miner splits its machine in two CPU slices of one thread, the second of
    // which has room for only one model at a time: it swaps models as the demo alternates.
    workers[0].slices = vec![
        SliceConfig::cpu("cpu0", 1, sundara_worker::default_cpu_memory(2)),
        SliceConfig::cpu("small", 1, 128 << 20),
    ];
    let liar = Behaviour::liar().map(|lie| {
        let id = miner_ids[honest].clone();
        workers.push(WorkerSpec::cpu(&id, 2, lie));
        id
    });
    (workers, liar)
}

/// The embedded pipeline's config: a fresh random secret, the demo's workers and tenants.
fn pipeline_config(
    endpoints: &Endpoints,
    ort_library: PathBuf,
    root: &std::path::Path,
    workers: &[WorkerSpec],
    auth: Option<&crate::auth::AuthDir>,
    scaling: Option<sundara_autoscaler::ScalingConfig>,
) -> PipelineConfig {
    // Hex: a secret is often an environment variable's value (`SUNDARA_SECRET`), text.
    let secret: Vec<u8> = hex::encode(rand::rng().random::<[u8; 32]>()).into_bytes();
    PipelineConfig {
        endpoints: endpoints.clone(),
        secret,
        ort_library,
        cache_dir: root.join(".cache/worker-models"),
        workers: workers.to_vec(),
        assignment_timeout: Duration::from_secs(10),
        epoch_length: Duration::from_secs(3600),
        scaling,
        tenants: demo_tenants(),
        max_in_flight: 100_000,
        credentials_dir: auth.map(|a| a.dir.clone()),
        retention: Default::default(),
        gateway: None,
        jobs: Some(sundara_jobs::Config::from_args(Default::default(), endpoints.clone())),
    }
}

/// The text-embedding model `up` serves through the gateway: all-MiniLM-L6-v2 built by
/// `scripts/setup`, its file, registered name and tokenizer.
pub const EMBEDDING_MODEL: (&str, &str, &str) = ("minilm.onnx", "minilm", "minilm_tokenizer.json");

/// How workers batch the embedding model: not at all. Each request is already a batch of
/// texts, and ONNX Runtime 1.31 runs MiniLM about 30 % slower per request when requests of
/// one sequence length are stacked into one inference (measured on 2 cores: 378 vs 492
/// ms of CPU per 16-text request; the embeddings benchmark's worker used 105 ms a request
/// batching, against 84 in-process).
pub const EMBEDDING_BATCHING: sundara_schemas::Batching = sundara_schemas::Batching { max_batch: 1, max_delay_us: 0 };

/// Registers the embedding model (k=3, cosine at least 0.999: honest miners batching
/// differently still agree) when `scripts/setup` built it; its name and tokenizer.
async fn push_embedding_model(
    js: &jetstream::Context,
    root: &std::path::Path,
) -> anyhow::Result<Option<(String, std::path::PathBuf)>> {
    let (file, name, tokenizer) = EMBEDDING_MODEL;
    let models = root.join(".cache/models");
    if !models.join(file).exists() || !models.join(tokenizer).exists() {
        println!("no {file}: /v1/embeddings is off (scripts/setup builds it)");
        return Ok(None);
    }
    let registry = Registry::open(js).await?;
    let policy = Policy::new(3, CompareRule::Cosine { min: 0.999 });
    let meta = crate::models::publish(&registry, &models.join(file), name, None, policy, EMBEDDING_BATCHING).await?;
    println!("registered {}", crate::models::describe(meta.meta()));
    Ok(Some((name.to_string(), models.join(tokenizer))))
}

/// The HTTP gateway `up` runs: where, the demo tenant's API key, and whether it serves
/// embeddings.
struct DemoGateway {
    listen: std::net::SocketAddr,
    key: String,
    keys: sundara_gateway::ApiKeys,
    embeddings: bool,
}

/// The gateway on `listen` (else a free port of loopback), with a fresh API key for the
/// demo tenant.
fn demo_gateway(listen: Option<std::net::SocketAddr>, embeddings: bool) -> anyhow::Result<DemoGateway> {
    let listen = match listen {
        Some(addr) => addr,
        None => std::net::SocketAddr::new(crate::stack::LOOPBACK, crate::stack::free_port()?),
    };
    let key = format!("sk-{DEMO_TENANT}-{}", hex::encode(rand::rng().random::<[u8; 16]>()));
    let mut keys = sundara_gateway::ApiKeys::default();
    keys.add(DEMO_TENANT, &key)?;
    Ok(DemoGateway { listen, key, keys, embeddings })
}

impl DemoGateway {
    /// Prints where the gateway is and a `curl` line that runs one `mlp` task through it
    /// (its request written to `dir`, else the temporary directory).
    fn print_example(&self, models: &[ModelMeta], dir: Option<&std::path::Path>) -> anyhow::Result<()> {
        println!("HTTP gateway on http://{} (KServe v2, /v1/models, /v1/jobs; docs/clients.md)", self.listen);
        let Some(mlp) = models.iter().find(|m| m.name == "mlp") else { return Ok(()) };
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let inputs = crate::models::sample_inputs(&mlp.inputs, 1, &mut rng);
        let tensors: Vec<_> = inputs.iter().map(sundara_gateway::kserve::JsonTensor::from_tensor).collect();
        let path = dir.map_or_else(std::env::temp_dir, std::path::Path::to_path_buf).join("mlp-infer.json");
        std::fs::write(&path, serde_json::json!({ "inputs": tensors }).to_string())?;
        println!(
            "  curl -s http://{}/v2/models/mlp/infer -H 'Authorization: Bearer {}' -d @{}",
            self.listen,
            self.key,
            path.display()
        );
        println!("  batch jobs: sundara jobs submit --model mlp --rows 10000 --wait (docs/jobs.md)");
        if self.embeddings {
            println!(
                "  curl -s http://{}/v1/embeddings -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' -d '{{\"model\": \"{}\", \"input\": [\"A man is eating food.\"]}}'",
                self.listen, self.key, EMBEDDING_MODEL.1
            );
        }
        Ok(())
    }
}

/// Where and as whom the demo load is submitted.
fn demo_tenant(endpoints: &Endpoints, auth: Option<&crate::auth::AuthDir>) -> NatsEndpoint {
    NatsEndpoint {
        url: endpoints.nats.url.clone(),
        credentials: auth.map(|a| a.credentials(&crate::auth::Role::Tenant(DEMO_TENANT.into()))),
        tls: endpoints.nats.tls.clone(),
        hotkey: None,
    }
}

/// Says which services and workers run, and whether one of them lies.
fn announce_fleet(workers: &[WorkerSpec], liar: Option<&str>) {
    let fleet = match liar {
        Some(liar) => format!("dishonest: {liar}"),
        None => "all honest: this build has no cheaters; `--features cheaters` adds a dishonest one".into(),
    };
    println!(
        "services up: ingress, scheduler, verifier, rewarder, autoscaler, jobs, gateway; workers {} ({fleet})",
        workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>().join(", ")
    );
}

/// After the demo load: the fleet, how the tasks ended, the rewards, and whether the liar
/// was caught.
async fn print_outcome(
    js: &jetstream::Context,
    endpoints: &Endpoints,
    tally: &crate::submit::Tally,
    weights: &EpochWeights,
    liar: Option<&str>,
) -> anyhow::Result<()> {
    println!();
    let capacity = sundara_common::Capacity::open(endpoints).await?;
    print!("{}", crate::fleet::table(&capacity).await?);
    println!();
    // Failures stand out: the demo exits 0 whatever happened, so this line must say it.
    println!("tasks: {}", tally.summary());
    if !tally.all_verified() {
        let dead = tally.expired.count + tally.no_consensus.count;
        let hint = if dead > 0 { " (`sundara tasks dead` lists the dead letters with their evidence)" } else { "" };
        println!("  NOT ALL VERIFIED: {} of {} demo tasks failed{hint}", tally.failed(), tally.submitted);
    }
    print_rewards(js, Some(weights)).await?;
    if let Some(liar) = liar {
        let liar_weight = weights.weights.iter().find(|m| m.miner == liar).map_or(0, |m| m.weight);
        let ledger = sundara_rewarder::read_ledger(js).await?;
        let liar_agreed =
            ledger.as_ref().and_then(|l| l.miners().find(|(m, _)| *m == liar).map(|(_, s)| s.agreed)).unwrap_or(0);
        if liar_weight == 0 && liar_agreed == 0 {
            println!("dishonest miner {liar} caught: every outcome rejected, weight 0");
        } else {
            println!("dishonest miner {liar}: weight {liar_weight}, agreed {liar_agreed} (NOT caught)");
        }
    }
    Ok(())
}

/// How long the services may take to stop after Ctrl-C.
const STOP_WITHIN: Duration = Duration::from_secs(10);

/// SIGINT, SIGTERM or SIGHUP (the terminal closed).
async fn interruption() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = signal(SignalKind::hangup()).expect("SIGHUP handler can be installed");
        tokio::select! {
            _ = sundara_common::termination_signal() => {}
            _ = hangup.recv() => {}
        }
    }
    #[cfg(not(unix))]
    sundara_common::termination_signal().await;
}

/// `work`'s output, or `None` when `interrupted` comes first.
async fn unless<T>(interrupted: &Shutdown, work: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        out = work => Some(out),
        _ = interrupted.cancelled() => None,
    }
}

/// After Ctrl-C: stops the services; the caller's return then stops the servers and
/// removes the context and the seeds.
async fn stop_interrupted(pipeline: Pipeline) -> anyhow::Result<()> {
    println!();
    println!("interrupted: stopping");
    match tokio::time::timeout(STOP_WITHIN, pipeline.stop()).await {
        Ok(errors) => {
            for e in &errors {
                eprintln!("shutdown: {e}");
            }
            println!("stopped cleanly");
        }
        Err(_) => println!("the services did not stop within {} s; stopped them", STOP_WITHIN.as_secs()),
    }
    Ok(())
}

/// Writes the embedded stack's context where the other commands look, and says how to
/// connect and where the seeds are.
fn publish_context(
    claim: &context::Claim,
    stack: &LocalStack,
    auth: Option<&crate::auth::AuthDir>,
    metrics: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    let endpoints = stack.endpoints();
    let ctx = context::Context {
        nats_url: endpoints.nats.url.clone(),
        redis_url: endpoints.redis_url.clone(),
        redis_ca: endpoints.redis_ca.clone(),
        credentials_dir: auth.map(|a| a.dir.clone()),
        nats_credentials: endpoints.nats.credentials.clone(),
        nats_ca: endpoints.nats.tls.as_ref().map(|t| t.ca.clone()),
        nats_client_cert: endpoints.nats.tls.as_ref().and_then(|t| t.client_cert.clone()),
        nats_server_pid: stack.nats.pid(),
        nats_config: stack.nats_config(),
        nats_auth_config: auth.map(|_| stack.auth_config()),
        nats_monitor_port: stack.nats.monitor_port.unwrap_or_default(),
        metrics_addr: metrics,
        up_pid: std::process::id(),
    };
    ctx.write(&claim.path)?;
    println!(
        "connect: export SUNDARA_CONTEXT={} (or the other commands pick it up automatically)",
        claim.path.display()
    );
    if let Some(auth) = auth {
        println!("credentials in {} (removed when up exits):", auth.dir.display());
        for role in [crate::auth::Role::Validator, crate::auth::Role::Tenant(DEMO_TENANT.into())] {
            println!("  {:<14} {}", role.to_string(), auth.credentials(&role).display());
        }
        println!("  add users to the running stack: sundara auth add --tenant T --miner W");
    }
    Ok(())
}

/// A pool of `sundara worker` processes of this binary, up to `max`, sized to demand; with
/// auth on they connect as the pool's user.
fn local_pool(
    endpoints: &Endpoints,
    auth: Option<&crate::auth::AuthDir>,
    ort_library: &std::path::Path,
    max: usize,
) -> anyhow::Result<sundara_autoscaler::ScalingConfig> {
    let driver = sundara_autoscaler::DriverConfig::Local {
        binary: std::env::current_exe()?,
        args: vec!["--threads".into(), "1".into()],
        env: [
            ("SUNDARA_NATS_URL".into(), endpoints.nats.url.clone()),
            ("ORT_DYLIB_PATH".into(), ort_library.display().to_string()),
        ]
        .into_iter()
        .chain(endpoints.nats.tls.iter().flat_map(|t| t.env()))
        .chain(
            auth.map(|a| ("SUNDARA_NATS_CREDS".into(), a.credentials(&crate::auth::Role::Pool).display().to_string())),
        )
        .collect(),
        prefix: "pool".into(),
    };
    let mut scaling = sundara_autoscaler::ScalingConfig::new(driver);
    scaling.policy.min_workers = 0;
    scaling.policy.max_workers = max;
    scaling.interval = Duration::from_secs(2);
    scaling.window = Duration::from_secs(6);
    Ok(scaling)
}

/// One line from the metrics: verdicts, reference runs, and rejected outcomes by what
/// they looked like.
pub fn verification_summary(metrics_text: &str) -> String {
    use sundara_common::metrics::sum;
    let count = |metric, labels: &[(&str, &str)]| sum(metrics_text, metric, labels) as u64;
    let rejected: Vec<String> = sundara_verifier::detect::Detection::ALL
        .iter()
        .map(|d| (d.label(), count("sundara_verifier_rejected_total", &[("class", d.label())])))
        .filter(|(_, n)| *n > 0)
        .map(|(label, n)| format!("{label} {n}"))
        .collect();
    format!(
        "verifier: {} verdicts, {} reference runs; rejected outcomes: {}; quarantines: {}",
        count("sundara_verifier_verdicts_total", &[]),
        count("sundara_verifier_reference_runs_total", &[]),
        if rejected.is_empty() { "none".to_string() } else { rejected.join(", ") },
        count("sundara_quarantines_total", &[]),
    )
}

/// Where `sundara up` looks for its demo files.
pub fn models_dir() -> Result<PathBuf, crate::stack::StackError> {
    Ok(find_project_root()?.join(".cache/models"))
}

/// The embedded stack's tenants: the operator's own, entitled to every priority (so that
/// `sundara submit --priority high` works against `up`); otherwise the default limits.
fn demo_tenants() -> sundara_common::admission::TenantPolicy {
    let mut tenants = sundara_common::admission::TenantPolicy::default();
    tenants.default.max_priority = sundara_schemas::Priority::High;
    tenants
}

/// `up --chain`: a local development subnet. The demo's miners are development hotkeys
/// (`//Sundara//miner-N`, each under a coldkey of its own), the validator's hotkey is
/// `//Sundara//validator`, and the metagraph is a file in the credentials directory that
/// `chain serve` reads every 2 s and `sundara chain register-dev` adds hotkeys to.
pub struct DevSubnet {
    validator: String,
    miners: Vec<(String, String)>,
}

impl DevSubnet {
    pub const NETUID: u16 = 1;

    fn new(miners: usize) -> DevSubnet {
        let address = |uri: String| sundara_chain::Hotkey::dev(&uri).expect("a development key").account.to_ss58();
        DevSubnet {
            validator: address("//Sundara//validator".into()),
            miners: (1..=miners)
                .map(|i| (address(format!("//Sundara//miner-{i}")), address(format!("//Sundara//cold-{i}"))))
                .collect(),
        }
    }

    fn miner_ids(&self) -> Vec<String> {
        self.miners.iter().map(|(hot, _)| hot.clone()).collect()
    }

    /// Writes the metagraph and runs `chain serve` (until the token returned is cancelled),
    /// once it holds the metagraph; says how a miner joins.
    async fn start(
        &self,
        endpoints: &Endpoints,
        auth: &crate::auth::AuthDir,
    ) -> anyhow::Result<(Shutdown, tokio::task::JoinHandle<Result<(), crate::chain::ChainError>>)> {
        let path = auth.dir.join("metagraph.json");
        let neurons = self
            .miners
            .iter()
            .enumerate()
            .map(|(uid, (hotkey, coldkey))| sundara_schemas::chain::Neuron {
                uid: uid as u16,
                hotkey: hotkey.clone(),
                coldkey: coldkey.clone(),
                stake: 0.0,
                validator_permit: false,
                registered_at_block: 1,
            })
            .collect();
        let metagraph = sundara_schemas::chain::Metagraph { netuid: Self::NETUID, block: 1, neurons };
        crate::chain::write_metagraph(&path, &metagraph)?;
        let mut chain_endpoints = endpoints.clone();
        chain_endpoints.nats.credentials =
            Some(auth.credentials(&crate::auth::Role::Service(crate::auth::Service::Chain)));
        let args = crate::chain::ServeArgs {
            metagraph: Some(path.clone()),
            bridge: None,
            netuid: None,
            version_key: None,
            weights_every_s: 30.0,
            sync_every_s: 2.0,
            validator_hotkey: self.validator.clone(),
            credentials_dir: auth.dir.clone(),
            miner_session_s: 3600,
        };
        let capacity = sundara_common::Capacity::open(endpoints).await?;
        let shutdown = Shutdown::new();
        let service = tokio::spawn(crate::chain::run(
            crate::chain::Config { endpoints: chain_endpoints, args },
            shutdown.clone(),
        ));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while capacity.chain_status().await?.block.is_none() {
            if service.is_finished() || tokio::time::Instant::now() > deadline {
                shutdown.cancel();
                return Err(match service.await {
                    Ok(Err(e)) => e.into(),
                    _ => anyhow::anyhow!("the chain service did not read the metagraph within 20 s"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "chain: a local subnet (netuid {}); validator hotkey {}; metagraph {} (read every 2 s)",
            Self::NETUID,
            self.validator,
            path.display()
        );
        println!("  a miner joins by hotkey:");
        println!("    sundara chain keygen --out my-hotkey.json");
        println!("    sundara chain register-dev --metagraph {} my-hotkey.json", path.display());
        println!("    sundara worker --hotkey-file my-hotkey.json --validator-hotkey {}", self.validator);
        Ok((shutdown, service))
    }
}
