//! Verified data-parallel training with only an inference runtime (docs/training.md).
//!
//! A **step model** is plain ONNX: inputs `x` and `y` (rows of one batch) and the weights,
//! outputs `loss` (summed over the rows), `correct` (rows predicted right) and, for every
//! weight `w`, `grad_w` (d loss / d w, summed over the rows); `scripts/make_train_step.py`
//! builds one. Each optimizer step cuts its batch into shards, runs each shard as a task
//! verified like any other (k miners of distinct operators compared under the model's rule,
//! audits), adds the verified gradients here, on the validator's side, and applies the
//! update. A miner's gradient reaches the weights only inside a verified result, so a
//! poisoning or lazy miner is outvoted or audited before it can move the model.
//!
//! [`Backend::InProcess`] runs the same step model in this process on the whole batch: the
//! baseline the network's loss curve and speed are measured against.

mod command;
mod data;
mod weights;

use std::time::{Duration, Instant};

use serde::Serialize;
use sundara_common::Registry;
use sundara_runtime::Model;
use sundara_schemas::{DType, Lineage, ModelMeta, Tensor, TensorSpec};

pub use command::{Curves, Run, TrainCommand, compare_line, run_command};
pub use data::Dataset;
pub use weights::{Sgd, Weights, from_initializers, into_initializers};

use crate::client::Client;
use crate::jobs::{JobError, ShardOptions};

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("reading {path}: {source}")]
    ReadData { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Data { path: String, reason: String },
    /// The step model does not follow the convention (module docs), or does not fit the data.
    #[error("not a training step model: {0}")]
    StepModel(String),
    /// A verified result whose outputs are not the gradients the step model declares, or not
    /// finite: never applied.
    #[error("step {step}: unusable outputs: {reason}")]
    Outputs { step: u64, reason: String },
    #[error("the inference template: {0}")]
    Template(String),
    #[error(transparent)]
    Job(Box<JobError>),
    #[error(transparent)]
    Runtime(#[from] sundara_runtime::RuntimeError),
    #[error(transparent)]
    Models(Box<crate::models::ModelError>),
}

impl From<JobError> for TrainError {
    fn from(e: JobError) -> Self {
        TrainError::Job(Box::new(e))
    }
}

impl From<crate::models::ModelError> for TrainError {
    fn from(e: crate::models::ModelError) -> Self {
        TrainError::Models(Box::new(e))
    }
}

/// How a run trains.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Rows per optimizer step.
    pub batch_rows: usize,
    /// Shard tasks each step's batch is cut into.
    pub shards: usize,
    pub epochs: usize,
    pub learning_rate: f32,
    pub momentum: f32,
    /// Seeds the initial weights, the held-out split and each epoch's batch order.
    pub seed: u64,
    /// Share of the rows held out to measure accuracy.
    pub held_out: f64,
}

/// Where a step's gradients are computed.
pub enum Backend<'a> {
    /// Shard tasks on the network, each verified (`shards.model` names the step model).
    Network { client: &'a Client, shards: ShardOptions },
    /// The step model in this process, the whole batch in one run.
    InProcess(Box<Model>),
}

/// One optimizer step.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub epoch: usize,
    pub step: u64,
    /// Mean loss of the batch before the update.
    pub loss: f64,
    /// Share of the batch predicted right before the update.
    pub accuracy: f64,
    /// The verified tasks whose gradients were applied (none in process).
    pub tasks: Vec<String>,
}

/// One pass over the training rows, then the held-out rows measured.
#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub steps: u64,
    /// Mean of the epoch's step losses, weighted by rows.
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
}

/// A training run's state: the data, the weights and the optimizer.
pub struct Trainer {
    data: Dataset,
    train: Vec<usize>,
    test: Vec<usize>,
    weights: Weights,
    sgd: Sgd,
    options: TrainOptions,
    epoch: usize,
    step: u64,
    /// Every step so far.
    pub steps: Vec<StepRecord>,
}

/// What a step model's run over some rows adds up to.
struct Summed {
    loss: f64,
    correct: i64,
    gradients: Vec<Vec<f32>>,
    tasks: Vec<String>,
}

impl Trainer {
    /// A run of `step_inputs` / `step_outputs` (the step model's declared tensors) over
    /// `data`, from the seeded initial weights.
    pub fn new(
        data: Dataset,
        step_inputs: &[TensorSpec],
        step_outputs: &[TensorSpec],
        options: TrainOptions,
    ) -> Result<Trainer, TrainError> {
        let weight_specs = check_step_model(step_inputs, step_outputs, &data)?;
        let weights = Weights::initial(weight_specs, options.seed)?;
        let (train, test) = data.split(options.held_out, options.seed);
        if train.is_empty() || test.is_empty() {
            return Err(TrainError::StepModel("the data must leave rows to train on and rows held out".into()));
        }
        let sgd = Sgd::new(options.learning_rate, options.momentum);
        Ok(Trainer { data, train, test, weights, sgd, options, epoch: 0, step: 0, steps: Vec::new() })
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Optimizer steps applied since the run began.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Continues a run from `weights` after `steps` optimizer steps (a published version's
    /// [`Lineage`]): the next batches are those the run would have taken next, given the
    /// same seed. The momentum starts again from zero; it is not published.
    pub fn resume(&mut self, weights: Weights, steps: u64) -> Result<(), TrainError> {
        let shapes = |w: &Weights| w.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect::<Vec<_>>();
        if shapes(&weights) != shapes(&self.weights) {
            return Err(TrainError::StepModel("the version's weights are not the step model's".into()));
        }
        let per_epoch = self.train.len().div_ceil(self.options.batch_rows.max(1)) as u64;
        if !steps.is_multiple_of(per_epoch) {
            return Err(TrainError::StepModel(format!("{steps} steps is not a whole number of epochs of {per_epoch}")));
        }
        (self.weights, self.step, self.epoch) = (weights, steps, (steps / per_epoch) as usize);
        self.sgd = Sgd::new(self.options.learning_rate, self.options.momentum);
        Ok(())
    }

    /// The rows trained on and held out.
    pub fn rows(&self) -> (usize, usize) {
        (self.train.len(), self.test.len())
    }

    /// One epoch: every training row once, in a seeded order, `batch_rows` per step; then
    /// the held-out rows measured with the new weights.
    pub async fn epoch(&mut self, backend: &mut Backend<'_>) -> Result<EpochRecord, TrainError> {
        let started = Instant::now();
        let mut order = self.train.clone();
        let seed = self.options.seed.wrapping_add(1 + self.epoch as u64);
        rand::seq::SliceRandom::shuffle(
            order.as_mut_slice(),
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
        );
        let (mut loss, mut rows, first_step) = (0.0, 0usize, self.step);
        for batch in order.chunks(self.options.batch_rows.max(1)) {
            let summed = self.run(backend, batch).await?;
            self.sgd.step(&mut self.weights, &summed.gradients, batch.len());
            self.steps.push(StepRecord {
                epoch: self.epoch,
                step: self.step,
                loss: summed.loss / batch.len() as f64,
                accuracy: summed.correct as f64 / batch.len() as f64,
                tasks: summed.tasks,
            });
            self.step += 1;
            loss += summed.loss;
            rows += batch.len();
        }
        let (test_loss, test_accuracy) = self.evaluate(backend).await?;
        let record = EpochRecord {
            epoch: self.epoch,
            steps: self.step - first_step,
            train_loss: loss / rows.max(1) as f64,
            test_loss,
            test_accuracy,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.epoch += 1;
        Ok(record)
    }

    /// Mean loss and accuracy of the current weights on the held-out rows.
    pub async fn evaluate(&mut self, backend: &mut Backend<'_>) -> Result<(f64, f64), TrainError> {
        let (mut loss, mut correct) = (0.0, 0i64);
        let test = self.test.clone();
        for batch in test.chunks(self.options.batch_rows.max(1)) {
            let summed = self.run(backend, batch).await?;
            loss += summed.loss;
            correct += summed.correct;
        }
        Ok((loss / test.len() as f64, correct as f64 / test.len() as f64))
    }

    /// The step model over `rows` with the current weights: in shard tasks or in process.
    async fn run(&self, backend: &mut Backend<'_>, rows: &[usize]) -> Result<Summed, TrainError> {
        let inputs = |rows: &[usize]| -> Vec<Tensor> {
            self.data.tensors(rows).into_iter().chain(self.weights.tensors.iter().cloned()).collect()
        };
        let (outputs, sizes, tasks) = match backend {
            Backend::Network { client, shards } => {
                let per_shard = rows.len().div_ceil(self.options.shards.max(1)).max(1);
                let parts: Vec<Vec<Tensor>> = rows.chunks(per_shard).map(inputs).collect();
                let sizes = rows.chunks(per_shard).map(<[usize]>::len).collect();
                let done = crate::jobs::run_shards(client, parts, shards, |_| {}).await?;
                (done.outputs, sizes, done.tasks)
            }
            Backend::InProcess(model) => {
                let model = &mut **model;
                let outputs = tokio::task::block_in_place(|| model.run(&inputs(rows)))?;
                (vec![outputs], vec![rows.len()], Vec::new())
            }
        };
        self.sum(outputs, &sizes, tasks)
    }

    /// Adds the shards' losses, hits and gradients (`sizes[i]` rows in shard i), after
    /// checking each is what the step model declares: a gradient of another shape, or not
    /// finite, or a count of hits beyond the shard's rows, is never applied.
    fn sum(&self, shards: Vec<Vec<Tensor>>, sizes: &[usize], tasks: Vec<String>) -> Result<Summed, TrainError> {
        let step = self.step;
        let bad = |reason: String| TrainError::Outputs { step, reason };
        let mut summed = Summed {
            loss: 0.0,
            correct: 0,
            gradients: self.weights.tensors.iter().map(|t| vec![0.0; t.data.len() / 4]).collect(),
            tasks,
        };
        for (outputs, &rows) in shards.iter().zip(sizes) {
            let named = |name: &str| outputs.iter().find(|t| t.name == name);
            let scalar = |name: &str| named(name).filter(|t| t.shape == [1]).map(Tensor::to_f64);
            let (Some(loss), Some(correct)) = (scalar("loss"), scalar("correct")) else {
                return Err(bad("`loss` and `correct` must be one value each".into()));
            };
            if !loss[0].is_finite() {
                return Err(bad(format!("loss {} is not finite", loss[0])));
            }
            if !(0.0..=rows as f64).contains(&correct[0]) {
                return Err(bad(format!("{} rows right of {rows}", correct[0])));
            }
            summed.loss += loss[0];
            summed.correct += correct[0] as i64;
            for (w, sum) in self.weights.tensors.iter().zip(&mut summed.gradients) {
                let name = format!("grad_{}", w.name);
                let grad = named(&name)
                    .filter(|g| g.shape == w.shape && g.dtype == DType::F32)
                    .and_then(|g| g.values::<f32>())
                    .ok_or_else(|| bad(format!("`{name}` must be f32{:?}", w.shape)))?;
                if grad.iter().any(|g| !g.is_finite()) {
                    return Err(bad(format!("`{name}` is not finite")));
                }
                sum.iter_mut().zip(grad).for_each(|(s, g)| *s += g);
            }
        }
        Ok(summed)
    }

    /// The lineage of a version made now from `parent`, with the tasks of the steps since
    /// step `since`.
    pub fn lineage(
        &self,
        run: &str,
        trained_with: &ModelMeta,
        parent: Option<String>,
        since: u64,
        last: &EpochRecord,
    ) -> Lineage {
        Lineage {
            run: run.to_string(),
            trained_with: trained_with.model_ref(),
            parent,
            seed: self.options.seed,
            steps: self.step,
            learning_rate: f64::from(self.options.learning_rate),
            batch_rows: self.options.batch_rows as u64,
            tasks: self.steps.iter().filter(|s| s.step >= since).flat_map(|s| s.tasks.iter().cloned()).collect(),
            train_loss: last.train_loss,
            test_accuracy: Some(last.test_accuracy),
        }
    }
}

/// The weight inputs of a step model that follows the convention and fits `data`.
fn check_step_model<'a>(
    inputs: &'a [TensorSpec],
    outputs: &[TensorSpec],
    data: &Dataset,
) -> Result<&'a [TensorSpec], TrainError> {
    let fail = |why: String| Err(TrainError::StepModel(why));
    let widths = [("x", data.features as u64), ("y", data.classes as u64)];
    for ((want, width), spec) in widths.iter().zip(inputs) {
        if spec.name != *want || spec.dtype != DType::F32 || spec.shape.len() != 2 || spec.shape[1] != Some(*width) {
            return fail(format!("input `{}` must be `{want}` f32[rows, {width}] for this data", spec.name));
        }
    }
    let weights = inputs.get(2..).filter(|w| !w.is_empty());
    let Some(weights) = weights else { return fail("no weight inputs after `x` and `y`".into()) };
    let declared = |name: &str| outputs.iter().any(|o| o.name == name);
    let missing = ["loss".to_string(), "correct".to_string()]
        .into_iter()
        .chain(weights.iter().map(|w| format!("grad_{}", w.name)))
        .find(|name| !declared(name));
    match missing {
        Some(name) => fail(format!("no output `{name}`")),
        None => Ok(weights),
    }
}

/// Publishes trained weights as the next version of `name`: `template` (an inference
/// graph whose initializers are named as the weights) with the trained values, its lineage
/// in the registry record. Returns the version.
pub async fn publish(
    registry: &Registry,
    template: &[u8],
    name: &str,
    weights: &Weights,
    trained_with: &ModelMeta,
    lineage: Lineage,
) -> Result<String, TrainError> {
    let bytes = into_initializers(template, weights)?;
    let what = crate::models::Published {
        name,
        version: None,
        policy: trained_with.policy,
        batching: Default::default(),
        lineage: Some(lineage),
    };
    Ok(crate::models::publish_bytes(registry, &bytes, what).await?.into_meta().version)
}

/// How long [`Backend::Network`]'s shard tasks have, by default.
pub const SHARD_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, dtype: DType, shape: &[Option<u64>]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
    }

    /// Two features, two classes, one 2×2 weight.
    fn specs() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        let inputs = vec![
            spec("x", DType::F32, &[None, Some(2)]),
            spec("y", DType::F32, &[None, Some(2)]),
            spec("w", DType::F32, &[Some(2), Some(2)]),
        ];
        let outputs = vec![
            spec("loss", DType::F32, &[Some(1)]),
            spec("correct", DType::I64, &[Some(1)]),
            spec("grad_w", DType::F32, &[Some(2), Some(2)]),
        ];
        (inputs, outputs)
    }

    fn trainer() -> Trainer {
        let data = Dataset::parse("0,1,0\n1,0,1\n1,1,1\n0,0,0\n2,1,1\n").unwrap();
        let (inputs, outputs) = specs();
        let options = TrainOptions {
            batch_rows: 2,
            shards: 2,
            epochs: 1,
            learning_rate: 0.1,
            momentum: 0.0,
            seed: 1,
            held_out: 0.4,
        };
        Trainer::new(data, &inputs, &outputs, options).unwrap()
    }

    fn outputs(loss: f32, correct: i64, grad: &[f32], shape: Vec<u64>) -> Vec<Tensor> {
        vec![
            Tensor::from_values("loss", vec![1], &[loss]),
            Tensor::from_values("correct", vec![1], &[correct]),
            Tensor::from_values("grad_w", shape, grad),
        ]
    }

    #[test]
    fn shards_add_up_and_unusable_outputs_are_never_applied() {
        let t = trainer();
        let good = outputs(1.5, 1, &[1.0, 2.0, 3.0, 4.0], vec![2, 2]);
        let summed = t.sum(vec![good.clone(), good.clone()], &[2, 2], vec!["a".into(), "b".into()]).unwrap();
        assert_eq!((summed.loss, summed.correct), (3.0, 2));
        assert_eq!(summed.gradients, vec![vec![2.0, 4.0, 6.0, 8.0]]);
        for (bad, says) in [
            (outputs(1.0, 1, &[1.0, 2.0, 3.0, 4.0], vec![4, 1]), "grad_w"),
            (outputs(1.0, 1, &[1.0, f32::NAN, 3.0, 4.0], vec![2, 2]), "not finite"),
            (outputs(f32::INFINITY, 1, &[0.0; 4], vec![2, 2]), "not finite"),
            (outputs(1.0, 3, &[0.0; 4], vec![2, 2]), "3 rows right of 2"),
            (outputs(1.0, -1, &[0.0; 4], vec![2, 2]), "rows right"),
            (good[1..].to_vec(), "`loss`"),
        ] {
            let e = t.sum(vec![good.clone(), bad], &[2, 2], vec![]).err().expect("refused");
            assert!(matches!(&e, TrainError::Outputs { .. }) && e.to_string().contains(says), "{says}: {e}");
        }
    }

    #[test]
    fn a_step_model_off_the_convention_or_the_data_is_refused() {
        let data = Dataset::parse("0,1,0\n1,0,1\n").unwrap();
        let (inputs, outputs) = specs();
        assert!(check_step_model(&inputs, &outputs, &data).is_ok());
        let no_grad = &outputs[..2];
        assert!(
            matches!(check_step_model(&inputs, no_grad, &data), Err(TrainError::StepModel(m)) if m.contains("grad_w"))
        );
        let three_features = Dataset::parse("0,1,2,0\n").unwrap();
        assert!(
            matches!(check_step_model(&inputs, &outputs, &three_features), Err(TrainError::StepModel(m)) if m.contains("`x`"))
        );
        assert!(matches!(check_step_model(&inputs[..2], &outputs, &data), Err(TrainError::StepModel(_))));
    }
}
