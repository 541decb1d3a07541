//! Models split by layer (`scripts/split_model.py`, `sundara::staged`): a model larger
//! than every slice's memory runs as stages on slices that each hold one, every stage a
//! verified task, and the staged result equals the unsplit model's. A miner that falsifies
//! its stage's activations is outvoted in that stage and the result stays right. Real
//! NATS, Redis and ONNX Runtime; the split is made by the script, from the `onnx` package.

use sundara_testkit as support;

use std::process::Command;
use std::time::Duration;

use sundara::pipeline::WorkerSpec;
use sundara::stack::project_root;
use sundara_common::Registry;
use sundara_schemas::{Batching, Policy, ResultStatus, Standing, SubmitOutcome, SubmitRequest};
use sundara_worker::{Behaviour, SliceConfig};
use support::{Harness, RULE, await_results};

/// Below mlp_heavy's 33 MB of weights, above its largest stage's 17 MB.
const SLICE_MEMORY: u64 = 26 << 20;

fn worker(id: &str, behaviour: Behaviour) -> WorkerSpec {
    WorkerSpec { id: id.into(), slices: vec![SliceConfig::cpu("cpu0", 1, SLICE_MEMORY)], behaviour }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_too_large_for_any_slice_runs_as_verified_stages() {
    let workers = vec![
        worker("h1", Behaviour::Honest),
        worker("h2", Behaviour::Honest),
        worker("h3", Behaviour::Honest),
        worker("liar", Behaviour::Dishonest),
    ];
    let policy = Policy { redundancy: 3, rule: RULE, audit_rate: 0.0 };
    let h = Harness::start_with(workers, policy, Duration::from_secs(10)).await;

    let root = project_root();
    let full = root.join(".cache/models/mlp_heavy.onnx");
    let dir = tempfile::tempdir().unwrap();
    let split = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/split_model.py"))
        .arg(&full)
        .args(["--at", "h1_relu,h2_relu", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(split.status.success(), "{}", String::from_utf8_lossy(&split.stderr));
    let registry = Registry::open(&h.js).await.unwrap();
    let meta = sundara::models::push(&registry, &full, "mlp_heavy", "1", policy, Batching::default()).await.unwrap();
    let stages: Vec<String> = (0..3).map(|i| format!("mlp_heavy-s{i}")).collect();
    for stage in &stages {
        let file = dir.path().join(format!("{stage}.onnx"));
        sundara::models::push(&registry, &file, stage, "1", policy, Batching::default()).await.unwrap();
    }

    // The model whole fits no slice: it never runs.
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(22);
    let x = sundara::models::sample_inputs(&meta.inputs, 2, &mut rng);
    let mut results = h.client.results().await.unwrap();
    let whole = SubmitRequest { timeout_ms: Some(3_000), ..SubmitRequest::new("mlp_heavy", x.clone()) };
    match h.client.submit(&whole).await.unwrap() {
        SubmitOutcome::Accepted { task_id, .. } => {
            let got = await_results(&mut results, std::slice::from_ref(&task_id)).await;
            let status = &got[&task_id].status;
            assert!(matches!(status, ResultStatus::Failed { .. }), "the whole model ran: {status:?}");
        }
        SubmitOutcome::Rejected { .. } => {}
    }
    drop(results);

    // As stages, every run verified and equal to the whole model run directly.
    let mut direct = sundara_runtime::Model::load(&std::fs::read(&full).unwrap(), 1).unwrap();
    let mut stage_tasks = Vec::new();
    for run in 0..4 {
        let x = sundara::models::sample_inputs(&meta.inputs, 2, &mut rng);
        let want = direct.run(&x).unwrap();
        let staged = sundara::staged::run(&h.client, &stages, x, Duration::from_secs(60)).await.unwrap();
        assert!(sundara_verifier::compare::agree(&RULE, &staged.outputs, &want), "run {run}: staged result differs");
        assert_eq!(staged.stages.len(), 3);
        stage_tasks.extend(staged.stages.into_iter().map(|(task, _, _)| task));
    }

    // The same from the command line.
    let printed = h.run_cli(["run-staged", "--stages", &stages.join(","), "--rows", "2"]);
    for stage in &stages {
        assert!(printed.contains(&format!("{stage}: task ")), "{printed}");
    }
    assert!(printed.contains("probs f32[2, 1000]"), "{printed}");

    // The liar was picked for some stages (k=3 of 4 workers, 12 stage tasks) and was
    // outvoted each time: its falsified activations never reached the next stage.
    let liar = h.standings("liar", |t| stage_tasks.iter().any(|s| s == t)).await;
    assert!(!liar.is_empty(), "the liar ran no stage");
    assert!(liar.iter().all(|s| *s == Standing::Disagreed), "{liar:?}");
    h.stop().await;
}
