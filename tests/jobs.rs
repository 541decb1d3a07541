//! Batch jobs split by data (`sundara::jobs`): 10,000 rows cut into shard tasks across
//! several miners, one of them falsifying its outputs and one SIGKILLed mid-job; every
//! row's result is present once, in order, and equal to running the model directly. Real
//! NATS, Redis and ONNX Runtime; the killed miner is a `sundara worker` process.

use sundara_testkit as support;

use std::time::Duration;

use sundara::jobs::{JobOptions, ShardOptions};
use sundara_schemas::{Policy, Standing};
use support::{Harness, RULE, dishonest, honest};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_of_10000_rows_survives_a_cheater_and_a_killed_miner_in_order() {
    let workers = vec![honest("h1", 1), honest("h2", 1), honest("h3", 1), dishonest("liar", 1)];
    let policy = Policy { redundancy: 3, rule: RULE, audit_rate: 0.0 };
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(3)).await;
    let victim = h.spawn_worker_process("victim", 1).await;

    let meta = h.models["mlp"].clone();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(10_000);
    let inputs = sundara::models::sample_inputs(&meta.inputs, 10_000, &mut rng);
    let want = support::reference(&meta, &inputs);

    // SIGKILL the victim while it holds assignments of the job.
    let killer = h.kill_when_holding(victim, "victim", 2);
    let options = JobOptions {
        shard_rows: 100,
        shards: ShardOptions { model: "mlp".into(), in_flight: 8, attempts: 3, shard_timeout: Duration::from_secs(60) },
    };
    let mut seen = Vec::new();
    let job = sundara::jobs::run(&h.client, inputs, &options, |p| seen.push(p.verified)).await.unwrap();
    assert!(killer.join().unwrap(), "the victim never held 2 assignments at once");

    assert_eq!(job.progress.shards, 100);
    assert_eq!(job.progress.verified, 100);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen.last() == Some(&100), "progress: {seen:?}");
    assert_eq!(job.outputs.iter().map(|t| t.shape[0]).collect::<Vec<_>>(), vec![10_000, 10_000]);
    assert!(sundara_verifier::compare::agree(&RULE, &job.outputs, &want), "some row differs or moved");

    // Each shard's task is distinct; the liar, picked for shards, was outvoted in each.
    let distinct: std::collections::HashSet<&str> = job.tasks.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), 100);
    let liar = h.standings("liar", |t| distinct.contains(t)).await;
    let verdicts = h.all_verdicts().await;
    let mut ours = verdicts.iter().filter(|v| distinct.contains(v.task_id.as_str())).flat_map(|v| &v.miners);
    assert!(ours.any(|m| m.attempt > 0), "the victim's assignments were not reassigned");
    assert!(!liar.is_empty(), "the liar ran no shard");
    assert!(liar.iter().all(|s| *s == Standing::Disagreed), "{liar:?}");

    // The same from the command line, its outputs in a file.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("outputs.json");
    let job_args = ["job", "--model", "mlp", "--rows", "1000", "--shard-rows", "100", "--out", out.to_str().unwrap()];
    let printed = h.run_cli(job_args);
    assert!(printed.contains("10 shards of 100 rows verified"), "{printed}");
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let shapes: Vec<&serde_json::Value> = written["outputs"].as_array().unwrap().iter().map(|t| &t["shape"]).collect();
    assert_eq!(shapes, [&serde_json::json!([1000, 10]), &serde_json::json!([1000, 10])]);
    h.stop().await;
}
