//! Worker slices through the whole pipeline (real NATS, Redis and ONNX Runtime): a worker
//! whose memory holds fewer models than it serves, a slice whose device fails, and a model
//! that fits no slice.

use sundara_testkit as support;

use std::time::Duration;

use rand::SeedableRng;
use sundara::pipeline::WorkerSpec;
use sundara_common::capacity::SliceState;
use sundara_schemas::{RejectCode, ResultStatus, SubmitOutcome};
use sundara_worker::{Behaviour, Executor, ExecutorConfig, ModelRun, SliceConfig};
use support::{Harness, honest};

const MODELS: [&str; 4] = ["mlp", "silero", "magika", "ppocr-cls"];

/// The tests of this file run one at a time: a worker measures a model's footprint as the
/// process's heap growth, and workers of other tests in the same process would add to it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn worker(id: &str, slice: SliceConfig) -> WorkerSpec {
    WorkerSpec { id: id.into(), slices: vec![slice], behaviour: Behaviour::Honest }
}

/// Footprints as a worker in this process measures them: load each demo model once.
async fn footprints() -> Vec<(String, u64)> {
    let root = sundara::stack::project_root();
    sundara_runtime::init(&sundara_runtime::find_library(std::slice::from_ref(&root)).unwrap()).unwrap();
    let probe = Executor::start("probe", ExecutorConfig::cpu(1, 1 << 34, 8));
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for (file, _) in sundara::up::DEMO_MODELS {
        let path = root.join(".cache/models").join(file);
        let model = sundara_runtime::Model::load(&std::fs::read(&path).unwrap(), 1).unwrap();
        let x = sundara_runtime::example_inputs(&model.inputs, 1, &mut rng);
        probe.run(&ModelRun::new(file, std::sync::Arc::new(path)), x).await.unwrap();
    }
    probe.reports().borrow().footprints.clone()
}

/// Models a slice offers, as Redis has them.
async fn offered(h: &Harness, slice: &str) -> Vec<String> {
    let client = redis::Client::open(h.stack.endpoints().redis_url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    redis::AsyncCommands::smembers(&mut con, format!("sundara:slice:{slice}:models")).await.unwrap()
}

/// Polls Redis (bounded) until the slice satisfies `ok`: a worker writes its state on every
/// change, and Redis offers no event to wait on.
async fn slice_when(h: &Harness, worker: &str, ok: impl Fn(&SliceState) -> bool) -> SliceState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let slices = h.capacity.slices_of(worker).await.unwrap();
        if let Some(s) = slices.into_iter().next() {
            if ok(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "slice never reached the expected state: {s:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One worker serving four models with room for fewer: tasks that alternate between
/// models force loads and evictions, every task is verified and correct, and Redis says
/// exactly what is loaded, with memory that adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_with_little_memory_serves_every_model_by_evicting() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let measured = footprints().await;
    let mut sizes: Vec<u64> = measured.iter().map(|(_, b)| *b).collect();
    sizes.sort_unstable();
    // Room for the largest model and half the next: those two never fit together.
    let budget = sizes[3] + sizes[2] / 2;
    let mut slice = SliceConfig::cpu("cpu0", 2, budget);
    slice.slots = 24;
    let mut h = Harness::start(vec![worker("tight", slice)], 1, Duration::from_secs(30)).await;

    // Bursts of 8 tasks per model, round-robin: each burst needs its model back.
    let requests = h.sample_requests(160, "tight", 4, |i| MODELS[(i / 8) % 4]);
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);

    let footprints = h.capacity.footprints().await.unwrap();
    let slice =
        slice_when(&h, "tight", |s| s.memory_total - s.memory_free == s.loaded.iter().map(|(_, b)| b).sum::<u64>())
            .await;
    assert_eq!(slice.state, "alive");
    assert_eq!(slice.memory_total, budget);
    assert!(slice.memory_free <= slice.memory_total);
    assert!(slice.evictions > 0, "no eviction: {slice:?}");
    assert!(slice.loads > 4, "evicted models were loaded again: {slice:?}");
    for (model, bytes) in &slice.loaded {
        let one = footprints[model];
        assert!(bytes % one == 0 && *bytes >= one, "{model} holds {bytes} bytes, not whole sessions of {one}");
        assert!(MODELS.iter().any(|m| model.starts_with(&format!("{m}@"))), "unknown model {model} loaded");
    }
    h.stop().await;
}

/// A slice whose device fails mid-load (an injected fault: the stand-in for a GPU error,
/// which cannot happen on this CPU machine) leaves service with its reason, and the tasks
/// it held are reassigned to the healthy worker: none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_slice_hands_its_tasks_to_another_worker() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut faulty = SliceConfig::cpu("cpu0", 1, 1 << 30);
    faulty.fail_after_runs = Some(1);
    let mut h = Harness::start(vec![worker("faulty", faulty), honest("sound", 1)], 1, Duration::from_secs(30)).await;
    let requests = h.sample_requests(120, "fault", 5, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    assert!(results.values().all(|r| matches!(r.status, ResultStatus::Verified { .. })), "a task failed");

    let slice = slice_when(&h, "faulty", |s| s.state == "failed").await;
    assert!(slice.reason.contains("injected device fault"), "{}", slice.reason);
    assert!(slice.loaded.is_empty(), "a failed slice holds no model");
    let verdicts = h.all_verdicts().await;
    assert!(verdicts.iter().any(|v| v.miners.iter().any(|m| m.worker == "faulty")), "faulty ran some tasks first");
    h.stop().await;
}

/// With every slice smaller than a model, ingress refuses the model's tasks with a typed
/// reason; models that fit are still accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_larger_than_every_slice_is_refused_at_ingress() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let small = SliceConfig::cpu("cpu0", 1, 1 << 20); // 1 MiB: mlp's file fits, magika's does not
    let h = Harness::start(vec![worker("small", small)], 1, Duration::from_secs(30)).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let magika = &h.models["magika"];
    let req = h.request("magika", sundara::models::sample_inputs(&magika.inputs, 1, &mut rng), "big");
    match h.client.submit(&req).await.unwrap() {
        SubmitOutcome::Rejected { code, reason } => {
            assert_eq!(code, RejectCode::ModelTooLarge);
            assert!(reason.contains("largest slice"), "{reason}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let mlp = &h.models["mlp"];
    let req = h.request("mlp", sundara::models::sample_inputs(&mlp.inputs, 1, &mut rng), "small");
    assert!(matches!(h.client.submit(&req).await.unwrap(), SubmitOutcome::Accepted { .. }));
    h.stop().await;
}

/// A slice too small for a model hands its tasks back instead of failing them (a failure
/// would count against an honest miner): another worker runs them, and the small slice
/// stops offering the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slice_too_small_for_a_model_hands_its_tasks_back() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let small = SliceConfig::cpu("cpu0", 1, 8 << 20); // magika's 3 MB file fits, its session does not
    let mut h = Harness::start(vec![worker("small", small), honest("roomy", 1)], 1, Duration::from_secs(30)).await;
    let requests = h.sample_requests(24, "big", 7, |_| "magika");
    let results = h.run_tasks(&requests).await;
    assert!(results.values().all(|r| matches!(r.status, ResultStatus::Verified { .. })), "a task failed");
    let verdicts = h.all_verdicts().await;
    assert!(verdicts.iter().all(|v| v.miners.iter().all(|m| m.worker == "roomy")), "only the roomy worker answered");
    let slice = slice_when(&h, "small", |s| s.state == "alive").await;
    assert!(slice.loaded.is_empty(), "{slice:?}");
    let offered: Vec<String> = {
        let mut con = redis::Client::open(h.stack.endpoints().redis_url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::AsyncCommands::smembers(&mut con, "sundara:slice:small-cpu0:models").await.unwrap()
    };
    assert!(!offered.contains(&"magika".to_string()), "the small slice still offers magika: {offered:?}");
    h.stop().await;
}

/// The same within one worker: its small slice hands magika's tasks back, and the worker's
/// roomy slice runs them (a worker that gave no outcome stays eligible for the replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_runs_handed_back_tasks_on_its_other_slice() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // Named so that the small slice sorts first: with equal free slots it is picked first.
    let slices = vec![SliceConfig::cpu("a-small", 1, 8 << 20), SliceConfig::cpu("big", 1, 1 << 30)];
    let spec = WorkerSpec { id: "split".into(), slices, behaviour: Behaviour::Honest };
    let mut h = Harness::start(vec![spec], 1, Duration::from_secs(30)).await;
    let requests = h.sample_requests(40, "split", 8, |_| "magika");
    let results = h.run_tasks(&requests).await;
    assert!(results.values().all(|r| matches!(r.status, ResultStatus::Verified { .. })), "a task failed");
    let verdicts = h.all_verdicts().await;
    assert!(verdicts.iter().all(|v| v.miners.iter().all(|m| m.worker == "split")));
    // The small slice did get magika tasks (and gave them back): it no longer offers it.
    assert!(!offered(&h, "split-a-small").await.contains(&"magika".to_string()));
    assert!(offered(&h, "split-big").await.contains(&"magika".to_string()));
    h.stop().await;
}
