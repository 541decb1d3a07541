//! A slice's executor on real models: several models sharing a memory budget that forces
//! evictions under load, the batching window, a model that never fits, and a slice whose
//! device fails. No NATS or Redis here (tests/slices.rs at the root covers those).

use std::path::PathBuf;
use std::sync::Arc;

use futures::StreamExt;
use rand::SeedableRng;
use sundara_runtime::{Model, example_inputs, find_library, init};
use sundara_schemas::{Batching, Tensor};
use sundara_worker::{Executor, ExecutorConfig, JobError, ModelRun};

/// The tests of this file run one at a time: a slice measures a model's footprint as the
/// process's heap growth, and executors of other tests in the same process would add to it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(file: &str) -> (ModelRun, Model) {
    init(&find_library(&[root()]).expect("run scripts/setup")).unwrap();
    let path = root().join(".cache/models").join(file);
    let alone = Model::load(&std::fs::read(&path).unwrap(), 1).unwrap();
    (ModelRun::new(file, Arc::new(path)), alone)
}

fn close(got: &[Tensor], want: &[Tensor]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| match (g.values::<f32>(), w.values::<f32>()) {
            (Some(g), Some(w)) => {
                g.len() == w.len() && g.iter().zip(&w).all(|(a, b)| (a - b).abs() <= 1e-5 + 1e-4 * b.abs())
            }
            _ => g == w,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_share_a_budget_by_evicting_idle_ones_and_no_task_fails() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let files = ["mlp.onnx", "silero_vad.onnx", "magika.onnx", "ppocr_cls.onnx"];
    let mut models: Vec<(ModelRun, Model)> = files.iter().map(|f| model(f)).collect();
    // Learn each model's footprint on a roomy slice first, twice, keeping the smaller: a
    // full run of the workspace's tests once measured a footprint that gave a budget with
    // room for all four, so nothing was evicted.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut footprints: Vec<(String, u64)> = Vec::new();
    for round in 0..2 {
        let probe = Executor::start(&format!("probe{round}"), ExecutorConfig::cpu(1, 1 << 32, 8));
        for (run, alone) in &models {
            probe.run(run, example_inputs(&alone.inputs, 1, &mut rng)).await.unwrap();
        }
        let measured = probe.reports().borrow().footprints.clone();
        assert_eq!(measured.len(), files.len(), "every model was measured");
        for (model, bytes) in measured {
            match footprints.iter_mut().find(|(m, _)| *m == model) {
                Some((_, kept)) => *kept = (*kept).min(bytes),
                None => footprints.push((model, bytes)),
            }
        }
    }
    let largest = footprints.iter().map(|(_, b)| *b).max().unwrap();
    let total: u64 = footprints.iter().map(|(_, b)| *b).sum();
    // Room for the largest and half again: never all four at once (a footprint measured
    // while another thread runs inference can come out a few MiB larger than the probe's).
    let budget = largest + largest / 2;
    assert!(budget < total, "budget {budget} must force evictions (all four take {total})");

    let executor = Executor::start("tight", ExecutorConfig::cpu(2, budget, 1024));
    // 240 tasks in bursts of one model at a time, round-robin, 40 in flight.
    let tasks: Vec<(usize, Vec<Tensor>)> = (0..240)
        .map(|i| {
            let m = (i / 10) % models.len();
            (m, example_inputs(&models[m].1.inputs, 1, &mut rng))
        })
        .collect();
    let expected: Vec<Vec<Tensor>> = tasks.iter().map(|(m, x)| models[*m].1.run(x).unwrap()).collect();
    let runs: Vec<_> = tasks.iter().map(|(m, x)| (models[*m].0.clone(), x.clone())).collect();
    let results: Vec<_> = futures::stream::iter(runs)
        .map(|(run, x)| {
            let executor = executor.clone();
            async move { executor.run(&run, x).await }
        })
        .buffered(40)
        .collect()
        .await;
    for (i, (result, want)) in results.iter().zip(&expected).enumerate() {
        let ran = result.as_ref().unwrap_or_else(|e| panic!("task {i} failed: {e}"));
        assert!(close(&ran.outputs, want), "task {i} ({}) differs from running it alone", files[tasks[i].0]);
    }
    // A load can overshoot until the models it displaces are idle; then the slice is back
    // within its budget.
    let mut reports = executor.reports();
    let within = reports.wait_for(|r| r.memory_used <= r.memory_total);
    let report = tokio::time::timeout(std::time::Duration::from_secs(10), within)
        .await
        .expect("the slice came back within its budget")
        .unwrap()
        .clone();
    assert!(report.failed.is_none());
    assert!(report.evictions > 0, "the budget forced no eviction: {report:?}; probed footprints {footprints:?}");
    assert!(report.loads > files.len() as u64, "evicted models were loaded again");
    assert!(report.memory_used <= report.memory_total, "{report:?}");
    let held: u64 = report.loaded.iter().map(|(_, b)| *b).sum();
    assert_eq!(held, report.memory_used, "the report's loaded models account for all used memory");
}

#[tokio::test]
async fn a_batching_window_gathers_tasks_and_a_partial_batch_runs_when_it_closes() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (mut run, mut alone) = model("mlp.onnx");
    let executor = Executor::start("window", ExecutorConfig::cpu(1, 1 << 30, 64));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // Load (and warm) the model first, so the window is all that shapes the batches.
    executor.run(&run, example_inputs(&alone.inputs, 1, &mut rng)).await.unwrap();

    // A long window and a max batch of 4: four tasks sent together run as one batch,
    // as soon as the fourth arrives (the test would take a minute otherwise).
    run.batching = Batching { max_batch: 4, max_delay_us: 60_000_000 };
    let inputs: Vec<Vec<Tensor>> = (0..4).map(|_| example_inputs(&alone.inputs, 1, &mut rng)).collect();
    let ran = futures::future::join_all(inputs.iter().map(|x| executor.run(&run, x.clone()))).await;
    for (r, x) in ran.iter().zip(&inputs) {
        let r = r.as_ref().unwrap();
        assert_eq!(r.batch, 4);
        assert!(close(&r.outputs, &alone.run(x).unwrap()));
    }

    // A short window: two tasks run together once it closes, without waiting for a full batch.
    run.batching = Batching { max_batch: 4, max_delay_us: 20_000 };
    let ran = futures::future::join_all(inputs[..2].iter().map(|x| executor.run(&run, x.clone()))).await;
    assert!(ran.iter().all(|r| r.as_ref().unwrap().batch == 2));
}

#[tokio::test]
async fn a_model_larger_than_the_slice_is_refused_with_its_size() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (run, alone) = model("magika.onnx");
    let executor = Executor::start("small", ExecutorConfig::cpu(1, 1 << 20, 8));
    let x = example_inputs(&alone.inputs, 1, &mut rand::rngs::StdRng::seed_from_u64(1));
    match executor.run(&run, x).await {
        Err(JobError::TooLarge { need, budget }) => assert!(need > budget && budget == 1 << 20),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // The slice itself is fine: a model that fits still runs.
    let (mlp, mlp_alone) = model("mlp.onnx");
    let executor = Executor::start("small", ExecutorConfig::cpu(1, 64 << 20, 8));
    let x = example_inputs(&mlp_alone.inputs, 1, &mut rand::rngs::StdRng::seed_from_u64(1));
    executor.run(&mlp, x).await.unwrap();
}

/// The device fault is injected (`fail_after_runs`): a stand-in for a GPU lost or an ECC
/// error, which cannot happen on this CPU-only machine.
#[tokio::test]
async fn a_failing_device_takes_its_slice_out_of_service_and_hands_work_back() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (run, alone) = model("mlp.onnx");
    let mut config = ExecutorConfig::cpu(1, 1 << 30, 64);
    config.fail_after_runs = Some(3);
    config.max_batch = 1;
    let executor = Executor::start("faulty", config);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(executor.run(&run, example_inputs(&alone.inputs, 1, &mut rng)).await);
    }
    // The warm-up is not counted: three tasks run, then the fault hits.
    assert!(outcomes[..3].iter().all(|o| o.is_ok()), "{outcomes:?}");
    for o in &outcomes[3..] {
        assert!(matches!(o, Err(JobError::SliceFailed(_))), "{o:?}");
    }
    let report = executor.reports().borrow().clone();
    let why = report.failed.expect("the slice says it failed");
    assert!(why.contains("injected device fault"), "{why}");
    assert!(report.loaded.is_empty() && report.memory_used == 0, "a failed slice holds nothing");
}

/// Batching is measured, not assumed: a model whose rows cost more in a batch than alone
/// (magika's convolutions on CPU) runs a row at a time and is charged the small footprint
/// of that; one whose GEMMs gain from it (mlp) batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batching_runs_only_where_it_pays_and_the_footprint_follows() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut largest_batch = std::collections::HashMap::new();
    let mut footprints = Vec::new();
    for file in ["magika.onnx", "mlp.onnx"] {
        let (run, alone) = model(file);
        let executor = Executor::start("measured", ExecutorConfig::cpu(1, 1 << 32, 256));
        executor.run(&run, example_inputs(&alone.inputs, 1, &mut rng)).await.unwrap();
        let inputs: Vec<Vec<Tensor>> = (0..64).map(|_| example_inputs(&alone.inputs, 1, &mut rng)).collect();
        let ran = futures::future::join_all(inputs.iter().map(|x| executor.run(&run, x.clone()))).await;
        let largest = ran.iter().map(|r| r.as_ref().unwrap().batch).max().unwrap();
        largest_batch.insert(file, largest);
        footprints.push(executor.reports().borrow().footprints.clone());
    }
    assert_eq!(largest_batch["magika.onnx"], 1, "magika's batches cost more per row: it runs unbatched");
    assert!(largest_batch["mlp.onnx"] > 1, "mlp gains from batches: 64 queued tasks must share some");
    // Warmed at 32 rows magika's arena held about 150 MiB; a row at a time, a few tens at most.
    let magika = footprints[0][0].1;
    assert!(magika < 64 << 20, "magika is charged {magika} bytes though it runs a row at a time");
}
