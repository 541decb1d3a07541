//! Dynamic batching on real models: under load tasks share inferences, and no task's
//! outputs move beyond float noise compared with running it alone.

use std::path::PathBuf;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use sundara_runtime::{Model, find_library, init};
use sundara_schemas::Tensor;
use sundara_worker::{Executor, ExecutorConfig, ModelRun};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path(name: &str) -> PathBuf {
    init(&find_library(&[root()]).expect("run scripts/setup")).unwrap();
    root().join(".cache/models").join(name)
}

fn rows(width: usize, n: u64, rng: &mut impl Rng) -> Vec<Tensor> {
    let v: Vec<f32> = (0..n as usize * width).map(|_| rng.random_range(-1.0..1.0)).collect();
    vec![Tensor::from_values("x", vec![n, width as u64], &v)]
}

async fn batched_matches_alone(file: &str, width: usize, tasks: usize) {
    let path = model_path(file);
    let mut alone = Model::load(&std::fs::read(&path).unwrap(), 1).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    // Tasks of 1 to 3 rows, so that splitting by rows is exercised too.
    let inputs: Vec<Vec<Tensor>> = (0..tasks).map(|i| rows(width, 1 + (i % 3) as u64, &mut rng)).collect();
    let expected: Vec<Vec<Tensor>> = inputs.iter().map(|x| alone.run(x).unwrap()).collect();

    // One thread and a queue deep enough that tasks wait together and batch.
    let executor = Executor::start("batching-test", ExecutorConfig::cpu(1, 1 << 30, tasks));
    let model = ModelRun::new(file, Arc::new(path));
    let runs = inputs.iter().map(|x| executor.run(&model, x.clone()));
    let results = futures::future::join_all(runs).await;

    let mut largest = 0;
    for (i, (result, want)) in results.into_iter().zip(&expected).enumerate() {
        let ran = result.unwrap_or_else(|e| panic!("task {i}: {e}"));
        largest = largest.max(ran.batch);
        assert_eq!(ran.outputs.len(), want.len());
        for (got, want) in ran.outputs.iter().zip(want) {
            assert_eq!(got.shape, want.shape, "task {i} output {}", want.name);
            for (g, w) in got.values::<f32>().unwrap().iter().zip(want.values::<f32>().unwrap()) {
                // Batched GEMMs may sum in another order: float noise, nothing more.
                assert!((g - w).abs() <= 1e-5 + 1e-4 * w.abs(), "task {i} {}: {g} vs {w}", want.name);
            }
        }
    }
    assert!(largest > 1, "no batch formed: the test did not exercise batching");
}

#[tokio::test]
async fn mlp_batches_without_changing_results() {
    batched_matches_alone("mlp.onnx", 784, 200).await;
}

#[tokio::test]
async fn heavy_mlp_batches_without_changing_results() {
    batched_matches_alone("mlp_heavy.onnx", 1024, 48).await;
}
