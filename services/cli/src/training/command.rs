//! `sundara train`: a run on the network, optionally the same run in process beside it,
//! each epoch reported, trained versions published with their lineage.

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use sundara_common::Registry;
use sundara_runtime::Model;
use sundara_schemas::ModelMeta;

use super::{Backend, Dataset, EpochRecord, StepRecord, TrainError, TrainOptions, Trainer};
use crate::client::Client;
use crate::jobs::ShardOptions;

/// What `sundara train` runs.
pub struct TrainCommand {
    /// `shards.model` is the step model.
    pub shards: ShardOptions,
    pub options: TrainOptions,
    pub data: PathBuf,
    pub tenant: String,
    /// Publish each epoch's weights as the next version of this model.
    pub publish_as: Option<String>,
    /// The inference graph the weights are written into (with `publish_as`).
    pub template: Option<PathBuf>,
    /// Also train in process from the same seed, and compare.
    pub compare: bool,
    /// Continue from this published version (`name@version`): its weights, seed and steps.
    pub resume: Option<String>,
    /// Where to write every step and epoch as JSON.
    pub curve: Option<PathBuf>,
}

/// A finished run: what `--curve` writes.
#[derive(Serialize)]
pub struct Curves {
    pub network: Run,
    pub in_process: Option<Run>,
}

#[derive(Serialize)]
pub struct Run {
    pub steps: Vec<StepRecord>,
    pub epochs: Vec<EpochRecord>,
    pub seconds: f64,
    /// Optimizer steps per second over the whole run (held-out measurements included).
    pub steps_per_second: f64,
    /// The versions published, one per epoch.
    pub versions: Vec<String>,
}

/// `sundara train`: returns the report.
pub async fn run_command(
    nats: &sundara_common::nats::NatsEndpoint,
    command: TrainCommand,
) -> Result<String, TrainError> {
    let client = Client::connect(nats, &command.tenant).await.map_err(crate::jobs::JobError::from)?;
    let registry = Registry::open(&async_nats::jetstream::new(client.nats.clone()))
        .await
        .map_err(crate::models::ModelError::from)?;
    let step_model = registry
        .resolve(&command.shards.model)
        .await
        .map_err(crate::models::ModelError::from)?
        .ok_or_else(|| TrainError::StepModel(format!("no model {} in the registry", command.shards.model)))?;
    let data = Dataset::read_csv(&command.data)?;
    let template = match (&command.publish_as, &command.template) {
        (Some(_), Some(path)) => Some(
            std::fs::read(path).map_err(|source| TrainError::ReadData { path: path.display().to_string(), source })?,
        ),
        (Some(_), None) => return Err(TrainError::Template("--publish-as needs --template".into())),
        (None, _) => None,
    };
    let start = match &command.resume {
        Some(spec) => Start::resumed(&registry, spec, &step_model, &command.options).await?,
        None => Start::fresh(&step_model, &command.options),
    };
    let Start { run, mut parent, mut since, options, resumed } = start;
    let mut trainer = Trainer::new(data.clone(), &step_model.inputs, &step_model.outputs, options.clone())?;
    if let Some((weights, steps)) = &resumed {
        trainer.resume(weights.clone(), *steps)?;
    }
    let (train_rows, test_rows) = trainer.rows();
    let mut report = format!(
        "training {} on {} rows ({} held out), {} epochs of {} steps of {} rows, each step {} shard tasks\n",
        step_model.model_ref(),
        train_rows,
        test_rows,
        command.options.epochs,
        train_rows.div_ceil(command.options.batch_rows.max(1)),
        command.options.batch_rows,
        command.options.shards,
    );
    eprint!("{report}");
    let mut backend = Backend::Network { client: &client, shards: command.shards.clone() };
    let started = Instant::now();
    let (mut epochs, mut versions) = (Vec::new(), Vec::new());
    for _ in 0..command.options.epochs {
        let epoch = trainer.epoch(&mut backend).await?;
        let mut line = epoch_line("network", &epoch);
        if let (Some(name), Some(template)) = (&command.publish_as, &template) {
            let lineage = trainer.lineage(&run, &step_model, parent.clone(), since, &epoch);
            let version = super::publish(&registry, template, name, trainer.weights(), &step_model, lineage).await?;
            line.push_str(&format!(", published {name}@{version}"));
            (parent, since) = (Some(sundara_schemas::ModelRef::spec(name, &version)), trainer.step());
            versions.push(version);
        }
        eprintln!("{line}");
        report.push_str(&line);
        report.push('\n');
        epochs.push(epoch);
    }
    let network = finished(trainer.steps, epochs, started, versions);
    report.push_str(&format!("network: {:.1} steps/s over {:.1} s\n", network.steps_per_second, network.seconds));

    let in_process = if command.compare {
        let bytes = registry.fetch(&step_model).await.map_err(crate::models::ModelError::from)?;
        let mut local = Trainer::new(data, &step_model.inputs, &step_model.outputs, options)?;
        if let Some((weights, steps)) = resumed {
            local.resume(weights, steps)?;
        }
        let run = train_in_process(local, &bytes, command.options.epochs, &mut report).await?;
        report.push_str(&compare_line(&network, &run));
        Some(run)
    } else {
        None
    };
    if let Some(path) = &command.curve {
        let text = serde_json::to_string_pretty(&Curves { network, in_process }).expect("curves encode");
        std::fs::write(path, text)
            .map_err(|source| TrainError::ReadData { path: path.display().to_string(), source })?;
        report.push_str(&format!("curves written to {}\n", path.display()));
    }
    Ok(report)
}

/// `epochs` of `local` with the step model (`bytes`) in this process, on the 2 threads an
/// inference slice of this machine would have; each epoch reported.
async fn train_in_process(
    mut local: Trainer,
    bytes: &[u8],
    epochs: usize,
    report: &mut String,
) -> Result<Run, TrainError> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(2);
    let mut backend = Backend::InProcess(Box::new(Model::load(bytes, threads)?));
    let started = Instant::now();
    let mut records = Vec::new();
    for _ in 0..epochs {
        let epoch = local.epoch(&mut backend).await?;
        report.push_str(&epoch_line("in process", &epoch));
        report.push('\n');
        records.push(epoch);
    }
    let run = finished(local.steps, records, started, Vec::new());
    report.push_str(&format!("in process: {:.1} steps/s over {:.1} s\n", run.steps_per_second, run.seconds));
    Ok(run)
}

/// Where a run starts: a new run, or a published version's run continued.
struct Start {
    run: String,
    /// The version trained from (`name@version`).
    parent: Option<String>,
    /// The steps before this command's.
    since: u64,
    options: TrainOptions,
    /// The weights and steps to continue from.
    resumed: Option<(super::Weights, u64)>,
}

impl Start {
    fn fresh(step_model: &ModelMeta, options: &TrainOptions) -> Start {
        let run = format!("{}-{:016x}", step_model.name, rand::random::<u64>());
        Start { run, parent: None, since: 0, options: options.clone(), resumed: None }
    }

    /// Continues the run of version `spec`, which must have been trained with `step_model`:
    /// its weights, its seed (so its split and batch order) and its steps.
    async fn resumed(
        registry: &Registry,
        spec: &str,
        step_model: &ModelMeta,
        options: &TrainOptions,
    ) -> Result<Start, TrainError> {
        let unknown = || TrainError::StepModel(format!("no model {spec} to resume from"));
        let meta = registry.resolve(spec).await.map_err(crate::models::ModelError::from)?.ok_or_else(unknown)?;
        let Some(lineage) = meta.lineage.clone() else {
            return Err(TrainError::StepModel(format!("{spec} was not trained here: it has no lineage")));
        };
        if lineage.trained_with != step_model.model_ref() {
            let (had, have) = (&lineage.trained_with, step_model.model_ref());
            return Err(TrainError::StepModel(format!("{spec} was trained with {had}, not {have}")));
        }
        let bytes = registry.fetch(&meta).await.map_err(crate::models::ModelError::from)?;
        let weights = super::from_initializers(&bytes, step_model.inputs.get(2..).unwrap_or_default())?;
        Ok(Start {
            run: lineage.run,
            parent: Some(meta.model_ref().to_string()),
            since: lineage.steps,
            options: TrainOptions { seed: lineage.seed, ..options.clone() },
            resumed: Some((weights, lineage.steps)),
        })
    }
}

fn finished(steps: Vec<StepRecord>, epochs: Vec<EpochRecord>, started: Instant, versions: Vec<String>) -> Run {
    let seconds = started.elapsed().as_secs_f64();
    let steps_per_second = steps.len() as f64 / seconds.max(1e-9);
    Run { steps, epochs, seconds, steps_per_second, versions }
}

fn epoch_line(what: &str, e: &EpochRecord) -> String {
    format!(
        "{what} epoch {}: train loss {:.4}, held-out loss {:.4}, accuracy {:.2} % ({} steps, {:.1} s)",
        e.epoch + 1,
        e.train_loss,
        e.test_loss,
        100.0 * e.test_accuracy,
        e.steps,
        e.seconds
    )
}

/// How far the network's loss curve is from the in-process one, step by step.
pub fn compare_line(network: &Run, local: &Run) -> String {
    let gap = network.steps.iter().zip(&local.steps).map(|(a, b)| (a.loss - b.loss).abs()).fold(0.0, f64::max);
    format!(
        "largest loss difference per step, network against in process: {gap:.2e}; speed {:.2}x in process\n",
        network.steps_per_second / local.steps_per_second.max(1e-9)
    )
}
