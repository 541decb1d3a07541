//! Verification against cheating miners through the whole pipeline: the verifier's own
//! reference runs (audits) catch what a vote cannot.

mod support;

use std::time::Duration;

use rand::SeedableRng;
use sundara_schemas::{Policy, ReferenceCheck, ResultStatus, Standing};
use sundara_verifier::compare::agree;
use support::{Harness, RULE, dishonest, honest, reference};

/// Submits `n` tasks over the demo models and checks every result against a direct ORT run.
async fn run_and_check(h: &mut Harness, n: usize, tag: &str) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let requests: Vec<_> = (0..n)
        .map(|i| {
            let meta = &h.models[["mlp", "magika", "ppocr-cls"][i % 3]];
            h.request(&meta.name, sundara::models::sample_inputs(&meta.inputs, 1, &mut rng), &format!("{tag}-{i}"))
        })
        .collect();
    let results = h.run_tasks(&requests).await;
    for (i, req) in requests.iter().enumerate() {
        let task_id = sundara_ingress::task_id("test", req.request_id.as_deref());
        let ResultStatus::Verified { outputs, .. } = &results[&task_id].status else {
            panic!("task {i} not verified: {:?}", results[&task_id].status);
        };
        assert!(agree(&RULE, outputs, &reference(&h.models[&req.model], &req.inputs)), "task {i}: wrong result");
    }
}

/// Two colluders (the same falsified outputs) outvote the honest miner at k=3; audits on
/// every task catch it: the client still gets the right result, the colluders are judged
/// wrong and the honest miner right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_catch_a_colluding_majority() {
    let workers = vec![honest("honest", 2), dishonest("colluder-a", 1), dishonest("colluder-b", 1)];
    let policy = Policy { redundancy: 3, rule: RULE, audit_rate: 1.0 };
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(10)).await;
    run_and_check(&mut h, 30, "collude").await;
    for v in h.all_verdicts().await {
        assert_eq!(v.reference, Some(ReferenceCheck::AuditFailed), "task {}", v.task_id);
        for m in &v.miners {
            let want = if m.worker == "honest" { Standing::Agreed } else { Standing::Disagreed };
            assert_eq!(m.standing, want, "{} on task {}", m.worker, v.task_id);
        }
    }
    h.stop().await;
}

/// At k=1 nobody else runs the task: audits are the only check. A lone cheater's outputs
/// never reach the client, and it is judged wrong on every audited task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audits_catch_a_lone_cheater_at_k1() {
    let policy = Policy { redundancy: 1, rule: RULE, audit_rate: 1.0 };
    let mut h = Harness::start_with(vec![dishonest("liar", 2)], policy, Duration::from_secs(10)).await;
    run_and_check(&mut h, 30, "lone").await;
    for v in h.all_verdicts().await {
        assert_eq!(v.reference, Some(ReferenceCheck::AuditFailed));
        assert_eq!(v.miners[0].standing, Standing::Disagreed);
    }
    h.stop().await;
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
