//! Verified data-parallel training (`sundara::training`, docs/training.md): scikit-learn's
//! digits trained through the network's shard tasks at k=3, beside a miner that poisons its
//! gradients and one that replays stale ones. The run must reach the accuracy of the same
//! run in process, step for step, with every cheater outvoted. Real NATS, Redis and ONNX
//! Runtime; the step model is `scripts/make_train_step.py`'s.

use sundara_testkit as support;

use std::collections::HashSet;
use std::time::Duration;

use sundara::jobs::ShardOptions;
use sundara::pipeline::WorkerSpec;
use sundara::stack::project_root;
use sundara::training::{Backend, Dataset, EpochRecord, TrainOptions, Trainer};
use sundara_common::Registry;
use sundara_schemas::{ModelMeta, Policy, ResultStatus, Standing};
use sundara_worker::Behaviour;
use support::{Harness, RULE, honest};

const EPOCHS: usize = 3;

fn options() -> TrainOptions {
    TrainOptions {
        batch_rows: 64,
        shards: 4,
        epochs: EPOCHS,
        learning_rate: 0.1,
        momentum: 0.9,
        seed: 7,
        held_out: 0.2,
    }
}

/// A fleet of three honest miners and `cheater`, the step model registered at k=3. The
/// scheduler keeps a model's work on slices that hold it, so the cheater must hold it when
/// training starts: one task of the step model runs on two honest miners and the cheater
/// before the third honest miner (a `sundara worker` process) joins.
async fn fleet_with(cheater: WorkerSpec) -> (Harness, Registry, ModelMeta, Dataset) {
    let workers = vec![honest("h1", 1), honest("h2", 1), cheater];
    let policy = Policy { redundancy: 3, rule: RULE, audit_rate: 0.0 };
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(5)).await;
    let registry = Registry::open(&h.js).await.unwrap();
    let root = project_root();
    let file = root.join(".cache/models/digits_train.onnx");
    let step = sundara::models::push(&registry, &file, "digits-train", "1", policy, Default::default())
        .await
        .expect("the step model exists (run scripts/setup)");
    let data = Dataset::read_csv(&root.join(".cache/data/digits.csv")).expect("the digits exist (run scripts/setup)");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
    let warm = h.request(&step.name, sundara::models::sample_inputs(&step.inputs, 8, &mut rng), "warm-up");
    h.run_tasks(&[warm]).await;
    h.spawn_worker_process("h3", 1).await;
    (h, registry, step, data)
}

async fn train(trainer: &mut Trainer, backend: &mut Backend<'_>) -> Vec<EpochRecord> {
    let mut epochs = Vec::new();
    for _ in 0..EPOCHS {
        epochs.push(trainer.epoch(backend).await.unwrap());
    }
    epochs
}

/// Trains on the network and in process from the same seed; checks the two runs are the
/// same run and that `cheater` was outvoted. Returns the network's trainer.
async fn trains_as_in_process(h: &Harness, step: &ModelMeta, data: &Dataset, cheater: &str) -> Trainer {
    let shards =
        ShardOptions { model: step.name.clone(), in_flight: 4, attempts: 3, shard_timeout: Duration::from_secs(60) };
    let mut network = Trainer::new(data.clone(), &step.inputs, &step.outputs, options()).unwrap();
    let net_epochs = train(&mut network, &mut Backend::Network { client: &h.client, shards }).await;

    let bytes = std::fs::read(project_root().join(".cache/models/digits_train.onnx")).unwrap();
    let model = sundara_runtime::Model::load(&bytes, 2).unwrap();
    let mut local = Trainer::new(data.clone(), &step.inputs, &step.outputs, options()).unwrap();
    let local_epochs = train(&mut local, &mut Backend::InProcess(Box::new(model))).await;

    // The same run: every step's loss, and the weights at the end, equal within float noise
    // (the network adds four shards' gradients where the process sums the batch at once).
    assert_eq!(network.steps.len(), local.steps.len());
    for (a, b) in network.steps.iter().zip(&local.steps) {
        assert!(
            (a.loss - b.loss).abs() < 1e-3,
            "step {}: loss {} on the network, {} in process",
            a.step,
            a.loss,
            b.loss
        );
        assert_eq!(a.tasks.len(), 4, "step {} ran {} shard tasks", a.step, a.tasks.len());
    }
    for (a, b) in network.weights().values().iter().zip(local.weights().values()) {
        let gap = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(gap < 1e-3, "the weights moved apart by {gap}");
    }
    let (net, loc) = (net_epochs.last().unwrap(), local_epochs.last().unwrap());
    assert!(net.test_accuracy >= 0.9, "held-out accuracy {} after {EPOCHS} epochs", net.test_accuracy);
    assert!((net.test_accuracy - loc.test_accuracy).abs() <= 2.0 / 359.0, "{net:?} against {loc:?}");
    assert!(net_epochs.windows(2).all(|w| w[1].train_loss < w[0].train_loss), "loss did not fall: {net_epochs:?}");

    // The cheater ran shards and was outvoted in those it falsified (then, flagged, it gets
    // no more work). The weights above show that nothing it sent was applied.
    let tasks: HashSet<String> = network.steps.iter().flat_map(|s| s.tasks.iter().cloned()).collect();
    let standings = h.standings(cheater, |t| tasks.contains(t)).await;
    assert!(standings.contains(&Standing::Disagreed), "{cheater} in the training's shards: {standings:?}");
    network
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoning_miner_cannot_move_the_model_and_the_trained_version_serves() {
    let (mut h, registry, step, data) = fleet_with(WorkerSpec::cpu("poisoner", 1, Behaviour::Dishonest)).await;
    let network = trains_as_in_process(&h, &step, &data, "poisoner").await;
    let standings = h.standings("poisoner", |_| true).await;
    assert!(!standings.contains(&Standing::Agreed), "the poisoner agreed somewhere: {standings:?}");

    // Published with its lineage, the trained version serves: its predictions on held-out
    // digits come back verified and mostly right.
    let template = std::fs::read(project_root().join(".cache/models/digits.onnx")).unwrap();
    let last = EpochRecord { epoch: 2, steps: 0, train_loss: 0.0, test_loss: 0.0, test_accuracy: 0.95, seconds: 0.0 };
    let lineage = network.lineage("run-1", &step, None, 0, &last);
    let tasks = lineage.tasks.clone();
    let version =
        sundara::training::publish(&registry, &template, "digits", network.weights(), &step, lineage).await.unwrap();
    let meta = registry.version("digits", &version).await.unwrap().expect("published");
    let recorded = meta.lineage.as_ref().expect("a lineage");
    assert_eq!(recorded.tasks, tasks);
    assert_eq!((recorded.steps, recorded.trained_with.name.as_str()), (network.steps.len() as u64, "digits-train"));
    let (_, held_out) = data.split(0.2, 7);
    let rows = &held_out[..64];
    let [x, y] = data.tensors(rows);
    let req = h.request(&format!("digits@{version}"), vec![x], "held-out");
    let results = h.run_tasks(&[req]).await;
    let result = results.into_values().next().unwrap();
    let ResultStatus::Verified { outputs, .. } = result.status else { panic!("not verified: {:?}", result.status) };
    let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    let (logits, labels) = (outputs[0].values::<f32>().unwrap(), y.values::<f32>().unwrap());
    let right = logits.chunks(10).zip(labels.chunks(10)).filter(|(l, y)| argmax(l) == argmax(y)).count();
    assert!(right >= 56, "{right} of 64 held-out digits right");
    h.stop().await;
}

/// A replaying miner answers honestly until it has outputs to replay (its first shards, run
/// at once), then returns those stale gradients for every later step.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lazy_miner_replaying_stale_gradients_cannot_move_the_model() {
    let (h, _registry, step, data) = fleet_with(WorkerSpec::cpu("lazy", 1, Behaviour::Replay)).await;
    trains_as_in_process(&h, &step, &data, "lazy").await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sundara_train_reports_both_runs_and_publishes_each_epoch() {
    let (h, registry, _step, data) = fleet_with(honest("h4", 1)).await;
    let steps_per_epoch = data.split(0.2, 7).0.len().div_ceil(64);
    let root = project_root();
    let dir = tempfile::tempdir().unwrap();
    let curve = dir.path().join("curve.json");
    let template = root.join(".cache/models/digits.onnx");
    let csv = root.join(".cache/data/digits.csv");
    let printed = h.run_cli([
        "train",
        "--epochs",
        "2",
        "--data",
        csv.to_str().unwrap(),
        "--publish-as",
        "digits",
        "--template",
        template.to_str().unwrap(),
        "--compare",
        "--curve",
        curve.to_str().unwrap(),
    ]);
    assert!(printed.contains("network epoch 2:"), "{printed}");
    assert!(printed.contains("published digits@2"), "{printed}");
    assert!(printed.contains("in process epoch 2:"), "{printed}");
    assert!(printed.contains("largest loss difference per step"), "{printed}");
    let curves: serde_json::Value = serde_json::from_slice(&std::fs::read(&curve).unwrap()).unwrap();
    let steps = curves["network"]["steps"].as_array().unwrap().len();
    assert_eq!(steps, 2 * steps_per_epoch);
    assert_eq!(curves["in_process"]["steps"].as_array().unwrap().len(), steps);
    // Version 2 was trained from version 1, each with its epoch's tasks.
    let v2 = registry.version("digits", "2").await.unwrap().expect("published");
    let lineage = v2.lineage.as_ref().unwrap();
    assert_eq!(lineage.parent.as_deref(), Some("digits@1"));
    assert_eq!(lineage.tasks.len(), steps_per_epoch * 4);
    let listed = h.run_cli(["models", "list"]);
    let line = listed.lines().find(|l| l.starts_with("digits ") && l.contains(" 2 ")).unwrap_or_default();
    assert!(line.contains("by digits-train@1, from digits@1, "), "{listed}");

    // The run goes on from its last version: same run, its steps counted on.
    let resumed = h.run_cli([
        "train",
        "--epochs",
        "1",
        "--data",
        csv.to_str().unwrap(),
        "--resume",
        "digits@2",
        "--publish-as",
        "digits",
        "--template",
        template.to_str().unwrap(),
    ]);
    assert!(resumed.contains("network epoch 3:") && resumed.contains("published digits@3"), "{resumed}");
    let v3 = registry.version("digits", "3").await.unwrap().expect("published");
    let l3 = v3.lineage.as_ref().unwrap();
    assert_eq!(
        (l3.run.as_str(), l3.parent.as_deref(), l3.steps),
        (lineage.run.as_str(), Some("digits@2"), 3 * steps_per_epoch as u64)
    );
    assert_eq!(l3.tasks.len(), steps_per_epoch * 4);
    assert!(l3.test_accuracy.unwrap() >= 0.9, "{l3:?}");
    h.stop().await;
}
