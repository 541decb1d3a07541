//! Verification against cheating miners through the whole pipeline: the verifier's own
//! reference runs (audits) catch what a vote cannot.

use sundara_testkit as support;

use std::time::Duration;

use sundara_schemas::{Policy, ReferenceCheck, ResultStatus, Standing};
use support::{Harness, RULE, dishonest, honest};

/// Submits `n` tasks over the demo models and checks every result against a direct ORT run.
async fn run_and_check(h: &mut Harness, n: usize, tag: &str) {
    let seed = tag.bytes().fold(11u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
    let requests = h.sample_requests(n, tag, seed, |i| ["mlp", "magika", "ppocr-cls"][i % 3]);
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
}

/// Two colluders (the same falsified outputs) outvote an honest miner at k=3; audits on
/// every task catch it: the client still gets the right result, the colluders are judged
/// wrong and the honest miner right, and both colluders are quarantined (three honest
/// miners then carry on at k=3).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_catch_a_colluding_majority() {
    let workers = vec![
        dishonest("colluder-a", 1),
        dishonest("colluder-b", 1),
        honest("honest-1", 1),
        honest("honest-2", 1),
        honest("honest-3", 1),
    ];
    let policy = Policy { redundancy: 3, rule: RULE, audit_rate: 1.0 };
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(10)).await;
    run_and_check(&mut h, 30, "collude").await;
    let mut overruled = 0;
    for v in h.all_verdicts().await {
        for m in &v.miners {
            let want = if m.worker.starts_with("honest") { Standing::Agreed } else { Standing::Disagreed };
            assert_eq!(m.standing, want, "{} on task {}", m.worker, v.task_id);
        }
        let colluders = v.miners.iter().filter(|m| m.worker.starts_with("colluder")).count();
        if colluders == 2 {
            // The colluders were the majority: the vote alone would have been wrong. The vote
            // was split, so the reference judged it as an escalation, not a sampled audit.
            assert_eq!(v.reference, Some(ReferenceCheck::Escalated), "task {}", v.task_id);
            overruled += 1;
        }
    }
    assert!(overruled > 0, "the colluders never formed a majority: the test did not exercise collusion");
    let quarantined = quarantined_within(&h, 2).await;
    assert_eq!(quarantined, vec!["colluder-a".to_string(), "colluder-b".to_string()]);
    h.stop().await;
}

/// At k=1 nobody else runs a task: audits are the only check. A lone cheater's outputs
/// never reach the client; it is judged wrong on every task it ran, and quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_catch_a_lone_cheater_at_k1() {
    let policy = Policy { redundancy: 1, rule: RULE, audit_rate: 1.0 };
    let workers = vec![dishonest("liar", 2), honest("honest", 1)];
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(10)).await;
    run_and_check(&mut h, 30, "lone").await;
    let mut lied = 0;
    for v in h.all_verdicts().await.iter().filter(|v| v.miners[0].worker == "liar") {
        assert_eq!(v.reference, Some(ReferenceCheck::AuditFailed));
        assert_eq!(v.miners[0].standing, Standing::Disagreed);
        lied += 1;
    }
    assert!(lied > 0, "the liar ran no task");
    assert_eq!(quarantined_within(&h, 1).await, vec!["liar".to_string()]);
    h.stop().await;
}

/// Waits (bounded: the rewarder applies verdicts asynchronously and Redis has no event to
/// wait on) until `n` workers are quarantined; returns them sorted.
async fn quarantined_within(h: &Harness, n: usize) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let q = h.capacity.quarantined().await.unwrap();
        if q.len() >= n || tokio::time::Instant::now() > deadline {
            return q.into_keys().collect();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Honest miners pass their audits: nothing changes for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn honest_miners_pass_audits() {
    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: 1.0 };
    let mut h = Harness::start_with(vec![honest("a", 1), honest("b", 1)], policy, Duration::from_secs(10)).await;
    run_and_check(&mut h, 30, "honest").await;
    for v in h.all_verdicts().await {
        assert_eq!(v.reference, Some(ReferenceCheck::AuditPassed));
        assert!(v.miners.iter().all(|m| m.standing == Standing::Agreed));
    }
    h.stop().await;
}

/// Every cheater class of the catalogue beside two honest miners, with every task audited:
/// no client ever gets a cheater's outputs, each cheater is proven wrong (or, for the one
/// that never answers or answers late, times out) and is quarantined and then given no more work, and the
/// honest miners are never judged wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cheater_class_is_caught_and_quarantined() {
    use sundara::pipeline::WorkerSpec;
    use sundara_common::metrics;
    use sundara_worker::Behaviour;
    // Every service of the harness runs in this process and counts into this recorder
    // (other tests of the binary may add to it: counts are checked as lower bounds).
    let recorder = metrics::install(None).unwrap();
    let mut workers = vec![honest("honest-1", 1), honest("honest-2", 1)];
    for (i, b) in Behaviour::CHEATERS.iter().enumerate() {
        workers.push(WorkerSpec::cpu(&format!("cheater-{i}"), 1, *b));
    }
    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: 1.0 };
    // The miner that never answers is found out by its timeouts. Not shorter than 10 s: the
    // other tests of this binary load the machine, and an honest miner whose assignments
    // outlast the timeout is counted too.
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(10)).await;
    // Waves of tasks: cheaters that answer at once (random, constant) take most of a wave
    // before the rewarder has seen their proofs; once they are quarantined, the slower
    // cheaters get their share.
    for wave in 0..10 {
        run_and_check(&mut h, 30, &format!("catalogue-{wave}")).await;
        if h.capacity.quarantined().await.unwrap().len() == Behaviour::CHEATERS.len() {
            break;
        }
    }

    let verdicts = h.all_verdicts().await;
    for (i, b) in Behaviour::CHEATERS.iter().enumerate() {
        let id = format!("cheater-{i}");
        let mine: Vec<Standing> =
            verdicts.iter().flat_map(|v| &v.miners).filter(|m| m.worker == id).map(|m| m.standing).collect();
        let count = |s| mine.iter().filter(|m| **m == s).count();
        eprintln!(
            "{b:?}: {} outcomes, {} disagreed, {} agreed, {} late",
            mine.len(),
            count(Standing::Disagreed),
            count(Standing::Agreed),
            count(Standing::Late)
        );
        if *b == Behaviour::NeverAnswer {
            // Its replicas were reassigned; it appears in no verdict and earns nothing.
            assert!(mine.is_empty(), "{b:?} answered: {mine:?}");
            continue;
        }
        if *b == Behaviour::Late {
            // Its replicas were reassigned too; an answer that came before the task was
            // decided is listed as late and earns nothing.
            assert!(mine.iter().all(|s| *s == Standing::Late), "{b:?} was counted: {mine:?}");
            continue;
        }
        assert!(mine.contains(&Standing::Disagreed), "{b:?} was never caught: {mine:?}");
        // Replay runs a model's first tasks honestly, and a bfloat16 copy is sometimes
        // within tolerance (then it is acceptable by the model's own rule); every other
        // cheater is wrong every time.
        if !matches!(b, Behaviour::Replay | Behaviour::Quantised) {
            assert!(!mine.contains(&Standing::Agreed), "{b:?} passed a check: {mine:?}");
        }
    }
    for v in &verdicts {
        for m in v.miners.iter().filter(|m| m.worker.starts_with("honest")) {
            assert_eq!(m.standing, Standing::Agreed, "honest {} judged wrong on {}", m.worker, v.task_id);
        }
    }

    // The rewarder quarantines each cheater after 3 proven-wrong outputs, the scheduler the
    // ones that never answer or answer late after 3 timeouts.
    let quarantined = quarantined_within(&h, Behaviour::CHEATERS.len()).await;
    let expected: Vec<String> = (0..Behaviour::CHEATERS.len()).map(|i| format!("cheater-{i}")).collect();
    assert_eq!(quarantined, expected);

    // The metrics show each signature the catalogue leaves: detections per class, audits,
    // strikes and quarantines.
    let text = recorder.render();
    let rejected = |class| metrics::sum(&text, "sundara_verifier_rejected_total", &[("class", class)]);
    for class in ["far", "near_miss", "constant", "replayed"] {
        assert!(rejected(class) >= 1.0, "no {class} detection counted:\n{text}");
    }
    // At k=2 a lone cheater splits the vote: the task escalates to the reference.
    assert!(metrics::sum(&text, "sundara_verifier_reference_runs_total", &[("check", "escalated")]) >= 1.0);
    assert!(metrics::sum(&text, "sundara_rewarder_proven_wrong_total", &[]) >= 6.0 * 3.0);
    assert!(metrics::sum(&text, "sundara_scheduler_timeout_strikes_total", &[]) >= 2.0 * 3.0);
    assert!(metrics::sum(&text, "sundara_quarantines_total", &[("by", "rewarder")]) >= 6.0);
    assert!(metrics::sum(&text, "sundara_quarantines_total", &[("by", "scheduler")]) >= 2.0);
    // Stage latencies and batch sizes are histograms with explicit buckets.
    for stage in ["wait", "inference", "decide", "total"] {
        let tasks = metrics::sum(&text, "sundara_task_stage_seconds_count", &[("stage", stage)]);
        assert!(tasks >= 1.0, "no {stage} timings:\n{text}");
    }
    assert!(text.contains("sundara_task_stage_seconds_bucket{") && text.contains("le=\"0.0005\""));
    assert!(metrics::sum(&text, "sundara_worker_batch_size_count", &[]) >= 1.0);

    // Quarantined miners get no more work: the next tasks go to the honest miners only.
    let before: std::collections::HashSet<String> = verdicts.iter().map(|v| v.task_id.clone()).collect();
    run_and_check(&mut h, 20, "after").await;
    for v in h.all_verdicts().await.iter().filter(|v| !before.contains(&v.task_id)) {
        assert!(v.miners.iter().all(|m| m.worker.starts_with("honest")), "a quarantined miner got work: {v:?}");
    }
    h.stop().await;
}

/// Honest miners on different hardware disagree in the last bits. Two miners whose every
/// float output carries random relative noise of 1e-6, beside an exact one, at k=2 with
/// the default audit rate: 10,000 tasks, and not one honest outcome is judged wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn honest_float_noise_is_never_rejected() {
    use sundara::pipeline::WorkerSpec;
    use sundara_worker::Behaviour;
    let workers = vec![
        WorkerSpec::cpu("noisy-1", 2, Behaviour::HonestNoisy),
        WorkerSpec::cpu("noisy-2", 2, Behaviour::HonestNoisy),
        honest("exact", 1),
    ];
    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: sundara_schemas::DEFAULT_AUDIT_RATE };
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(30)).await;
    let requests = h.sample_requests(10_000, "noise", 12, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    assert_eq!(results.len(), 10_000);
    assert!(results.values().all(|r| matches!(r.status, ResultStatus::Verified { agreeing: 2, k: 2, .. })));
    let verdicts = h.all_verdicts().await;
    let audited = verdicts.iter().filter(|v| v.reference.is_some()).count();
    for v in &verdicts {
        assert!(v.miners.iter().all(|m| m.standing == Standing::Agreed), "false rejection: {v:?}");
        assert!(matches!(v.reference, None | Some(ReferenceCheck::AuditPassed)), "{v:?}");
    }
    assert!(audited > 0, "no task was audited");
    assert!(h.capacity.quarantined().await.unwrap().is_empty());
    eprintln!("10,000 tasks, {audited} audited, 0 false rejections");
    h.stop().await;
}
