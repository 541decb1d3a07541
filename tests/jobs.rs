//! Batch jobs split by data (`sundara::jobs`): 10,000 rows cut into shard tasks across
//! several miners, one of them falsifying its outputs and one SIGKILLed mid-job; every
//! row's result is present once, in order, and equal to running the model directly. Real
//! NATS, Redis and ONNX Runtime; the killed miner is a `sundara worker` process.

use sundara_testkit as support;

use std::process::Command;
use std::time::Duration;

use sundara::jobs::JobOptions;
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

    // SIGKILL the victim while it holds assignments of the job (polled in Redis, bounded).
    let victim_pid = h.worker_pid(victim);
    let redis_url = h.stack.endpoints().redis_url;
    let killer = std::thread::spawn(move || {
        let mut redis = redis::Client::open(redis_url).unwrap().get_connection().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            let held: u64 = redis::cmd("SCARD").arg("sundara:inflight:w:victim").query(&mut redis).unwrap_or(0);
            if held >= 2 {
                return Command::new("kill").args(["-KILL", &victim_pid.to_string()]).status().unwrap().success();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    });
    let options = JobOptions {
        model: "mlp".into(),
        shard_rows: 100,
        in_flight: 8,
        attempts: 3,
        shard_timeout: Duration::from_secs(60),
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
    let distinct: std::collections::HashSet<&String> = job.tasks.iter().collect();
    assert_eq!(distinct.len(), 100);
    let verdicts = h.all_verdicts().await;
    let liar: Vec<Standing> = verdicts
        .iter()
        .filter(|v| distinct.contains(&v.task_id))
        .flat_map(|v| v.miners.iter().filter(|m| m.worker == "liar").map(|m| m.standing))
        .collect();
    let reassigned = verdicts.iter().filter(|v| distinct.contains(&v.task_id)).flat_map(|v| &v.miners);
    assert!(reassigned.clone().any(|m| m.attempt > 0), "the victim's assignments were not reassigned");
    assert!(!reassigned.clone().any(|m| m.worker == "victim" && m.standing == Standing::Agreed && m.attempt > 0));
    assert!(!liar.is_empty(), "the liar ran no shard");
    assert!(liar.iter().all(|s| *s == Standing::Disagreed), "{liar:?}");

    // The same from the command line, its outputs in a file.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("outputs.json");
    let ep = h.stack.endpoints();
    let cli = Command::new(support::sundara_binary())
        .args(["job", "--model", "mlp", "--rows", "1000", "--shard-rows", "100", "--out"])
        .arg(&out)
        .env("SUNDARA_NATS_URL", &ep.nats.url)
        .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{printed}{}", String::from_utf8_lossy(&cli.stderr));
    assert!(printed.contains("10 shards of 100 rows verified"), "{printed}");
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let shapes: Vec<&serde_json::Value> = written["outputs"].as_array().unwrap().iter().map(|t| &t["shape"]).collect();
    assert_eq!(shapes, [&serde_json::json!([1000, 10]), &serde_json::json!([1000, 10])]);
    h.stop().await;
}
