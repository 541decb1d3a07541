//! `sundara up`: the whole pipeline on one machine, with a demo load and a summary.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use sundara_common::nats::NatsEndpoint;
use sundara_common::{Endpoints, Registry, nats};
use sundara_schemas::{
    CompareRule, EpochWeights, MAX_MESSAGE_BYTES, ModelMeta, Policy, ResultStatus, SubmitOutcome, SubmitRequest,
    decode, subjects as subj,
};
use sundara_worker::{Behaviour, SliceConfig};

use crate::client::Client;
use crate::pipeline::{Pipeline, PipelineConfig, WorkerSpec};
use crate::stack::{LocalStack, project_root};

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
        metas.push(crate::models::push(registry, &path, name, "1", policy, Default::default()).await?);
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
    let recorder = sundara_common::metrics::install(opts.metrics)?;
    let root = project_root();
    let ort_library = sundara_runtime::find_library(std::slice::from_ref(&root))?;
    sundara_runtime::init(&ort_library)?;
    // The honest miners, then the liar where this build has the cheaters.
    let miners = opts.honest_workers + usize::from(Behaviour::liar().is_some());
    let miner_ids: Vec<String> = (1..=miners).map(|i| format!("miner-{i}")).collect();
    // The embedded stack runs NATS with a user per role (docs/reliability.md), except with
    // an autoscaled pool, whose workers are named as they start and so have no seeds.
    let (endpoints, auth, _stack, _auth_dir) = match opts.endpoints {
        Some(ep) => (ep, None, None, None),
        None if opts.autoscale.is_some() => {
            let stack = LocalStack::start(&root)?;
            println!(
                "nats-server on {} (no auth: --autoscale), redis-server on {}",
                stack.endpoints().nats.url,
                stack.endpoints().redis_url
            );
            (stack.endpoints(), None, Some(stack), None)
        }
        None => {
            let dir = tempfile::Builder::new().prefix("sundara-auth-").tempdir()?;
            let auth = crate::auth::init(dir.path(), &[DEMO_TENANT.to_string()], &miner_ids)?;
            let stack = LocalStack::start_secured(&root, &auth)?;
            println!(
                "nats-server on {} with {} users (validator, tenant {DEMO_TENANT}, one per miner), redis-server on {}",
                stack.endpoints().nats.url,
                auth.users.len(),
                stack.endpoints().redis_url
            );
            (stack.endpoints(), Some(auth), Some(stack), Some(dir))
        }
    };
    let nats_client = nats::connect(&endpoints.nats, "sundara-up").await?;
    let js = jetstream::new(nats_client.clone());
    nats::provision(&js, &nats::Retention::default()).await?;
    let registry = Registry::open(&js).await?;
    let models = push_demo_models(&registry, &root).await?;
    for m in &models {
        println!("registered {}", crate::models::describe(m));
    }

    let secret: Vec<u8> = rand::rng().random::<[u8; 32]>().to_vec();
    let mut workers: Vec<WorkerSpec> =
        miner_ids[..opts.honest_workers].iter().map(|id| WorkerSpec::cpu(id, 2, Behaviour::Honest)).collect();
    // The first miner splits its machine in two CPU slices of one thread, the second of
    // which has room for only one model at a time: it swaps models as the demo alternates.
    workers[0].slices = vec![
        SliceConfig::cpu("cpu0", 1, sundara_worker::default_cpu_memory(2)),
        SliceConfig::cpu("small", 1, 128 << 20),
    ];
    // One liar, where this build has the cheaters (`--features cheaters`).
    let liar = Behaviour::liar().map(|lie| {
        let id = miner_ids[opts.honest_workers].clone();
        workers.push(WorkerSpec::cpu(&id, 2, lie));
        id
    });
    let cache_dir = root.join(".cache/worker-models");
    let scaling = match opts.autoscale {
        Some(max) => Some(local_pool(&endpoints, &ort_library, max)?),
        None => None,
    };
    let pipeline = Pipeline::start(PipelineConfig {
        endpoints: endpoints.clone(),
        secret,
        ort_library,
        cache_dir,
        workers: workers.clone(),
        assignment_timeout: Duration::from_secs(10),
        epoch_length: Duration::from_secs(3600),
        scaling,
        tenants: demo_tenants(),
        max_in_flight: 100_000,
        miner_credentials: auth.as_ref().map(|a| a.dir.clone()),
    })
    .await;
    pipeline.ready(Duration::from_secs(60)).await.map_err(|e| anyhow::anyhow!(e))?;
    let fleet = match &liar {
        Some(liar) => format!("dishonest: {liar}"),
        None => "all honest: this build has no cheaters; `--features cheaters` adds a dishonest one".into(),
    };
    println!(
        "services up: ingress, scheduler, verifier, rewarder, autoscaler; workers {} ({fleet})",
        workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>().join(", ")
    );

    let tenant = NatsEndpoint {
        url: endpoints.nats.url.clone(),
        credentials: auth.as_ref().map(|a| a.credentials(&crate::auth::Role::Tenant(DEMO_TENANT.into()))),
    };
    let summary = demo_load(&tenant, &models, opts.tasks).await;
    if let Some(failed) = pipeline.failed() {
        bail!("{failed} stopped unexpectedly");
    }
    let (verified, failed) = summary?;
    rewarder_caught_up(&js, Duration::from_secs(30)).await?;
    let weights = close_epoch(&nats_client).await?;
    println!();
    let capacity = sundara_common::Capacity::connect(&endpoints.redis_url).await?;
    print!("{}", crate::fleet::table(&capacity).await?);
    println!();
    println!("tasks: {} submitted, {verified} verified, {failed} failed", opts.tasks);
    print_rewards(&js, Some(&weights)).await?;
    if let Some(liar) = &liar {
        let liar_weight = weights.weights.iter().find(|m| m.miner == *liar).map_or(0, |m| m.weight);
        let ledger = sundara_rewarder::read_ledger(&js).await?;
        let liar_agreed =
            ledger.as_ref().and_then(|l| l.miners().find(|(m, _)| *m == liar).map(|(_, s)| s.agreed)).unwrap_or(0);
        if liar_weight == 0 && liar_agreed == 0 {
            println!("dishonest miner {liar} caught: every outcome rejected, weight 0");
        } else {
            println!("dishonest miner {liar}: weight {liar_weight}, agreed {liar_agreed} (NOT caught)");
        }
    }
    println!("{}", verification_summary(&recorder.render()));

    if !opts.once {
        println!("serving on {} until Ctrl-C", endpoints.nats.url);
        sundara_common::termination_signal().await;
    }
    let errors = pipeline.stop().await;
    for e in &errors {
        eprintln!("shutdown: {e}");
    }
    println!("stopped cleanly");
    Ok(())
}

/// A pool of `sundara worker` processes of this binary, up to `max`, sized to demand.
fn local_pool(
    endpoints: &Endpoints,
    ort_library: &std::path::Path,
    max: usize,
) -> anyhow::Result<sundara_autoscaler::ScalingConfig> {
    let driver = sundara_autoscaler::DriverConfig::Local {
        binary: std::env::current_exe()?,
        args: vec!["--threads".into(), "1".into()],
        env: vec![
            ("SUNDARA_NATS_URL".into(), endpoints.nats.url.clone()),
            ("ORT_DYLIB_PATH".into(), ort_library.display().to_string()),
        ],
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

/// Submits `tasks` demo tasks (alternating models) and waits for every result.
async fn demo_load(tenant: &NatsEndpoint, models: &[ModelMeta], tasks: usize) -> anyhow::Result<(usize, usize)> {
    let client = Client::connect(tenant, DEMO_TENANT).await?;
    let mut results = client.results().await?;
    let bar = ProgressBar::new(tasks as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} verified tasks {msg}").expect("valid template"));
    let models = Arc::new(models.to_vec());
    let submitting = {
        let client = client.clone();
        let models = models.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let requests: Vec<SubmitRequest> = (0..tasks)
                .map(|i| {
                    let meta = &models[i % models.len()];
                    let inputs = crate::models::sample_inputs(&meta.inputs, 1, &mut rng);
                    SubmitRequest {
                        request_id: Some(format!("demo-{i}")),
                        seed: i as u64,
                        timeout_ms: Some(60_000),
                        ..SubmitRequest::new(&meta.name, inputs)
                    }
                })
                .collect();
            let outcomes: Vec<_> = futures::stream::iter(requests)
                .map(|r| {
                    let client = client.clone();
                    async move { client.submit(&r).await }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            let mut accepted = 0;
            for o in outcomes {
                match o? {
                    SubmitOutcome::Accepted { .. } => accepted += 1,
                    SubmitOutcome::Rejected { code, reason } => bail!("demo task rejected: {} {reason}", code.as_str()),
                }
            }
            Ok::<usize, anyhow::Error>(accepted)
        })
    };
    let mut seen: BTreeMap<String, bool> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while seen.len() < tasks {
        let next = tokio::time::timeout_at(deadline, results.next()).await;
        let Ok(Some(result)) = next else { bail!("only {} of {tasks} results arrived within 120 s", seen.len()) };
        let result = result?;
        let ok = matches!(result.status, ResultStatus::Verified { .. });
        if seen.insert(result.task_id, ok).is_none() {
            bar.inc(1);
        }
    }
    submitting.await??;
    bar.finish();
    let verified = seen.values().filter(|ok| **ok).count();
    Ok((verified, seen.len() - verified))
}

/// Where `sundara up` looks for its demo files.
pub fn models_dir() -> PathBuf {
    project_root().join(".cache/models")
}

/// The embedded stack's tenants: the operator's own, entitled to every priority (so that
/// `sundara submit --priority high` works against `up`); otherwise the default limits.
fn demo_tenants() -> sundara_common::admission::TenantPolicy {
    let mut tenants = sundara_common::admission::TenantPolicy::default();
    tenants.default.max_priority = sundara_schemas::Priority::High;
    tenants
}
