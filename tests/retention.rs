//! Streams bounded by the work in flight: each task leaves TASKS at its deadline plus the
//! linger (a per-message TTL, no delete per task), no tenant can fill TASKS for the others
//! (a minimum timeout and a per-tenant quota on stored bytes), a dead task can still be
//! resubmitted after TASKS let it go, and no outcome is lost while the verifier is down.
//! Real nats-server, redis-server and ONNX Runtime.

use sundara_testkit as support;

use std::time::Duration;

use sundara::client::Client;
use sundara::stack::{LocalStack, project_root};
use sundara_common::admission::{TenantLimits, TenantPolicy};
use sundara_schemas::{Policy, RejectCode, ResultStatus, SubmitOutcome, SubmitRequest, encode, subjects as subj};
use support::processes::{ProcessStack, StackOptions};
use support::{Harness, RULE, await_results, wait};

/// The linger of these tests: tasks leave TASKS a second after their deadline.
const LINGER: Duration = Duration::from_secs(1);

fn accepted(outcome: SubmitOutcome) -> Result<String, RejectCode> {
    match outcome {
        SubmitOutcome::Accepted { task_id, .. } => Ok(task_id),
        SubmitOutcome::Rejected { code, .. } => Err(code),
    }
}

async fn stored_in_tasks(h: &Harness) -> (u64, u64) {
    let mut stream = h.js.get_stream(subj::TASKS_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    (state.messages, state.bytes)
}

/// One tenant pushes large tasks with the shortest timeout allowed, four at a time, for
/// [`FILL_FOR`]: it is refused `storage_quota` whenever its stored tasks reach its quota,
/// TASKS never holds more than that of it, its quota comes back as its tasks leave TASKS
/// (deadline + linger), and another tenant's tasks, submitted all along, are all accepted
/// and verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_filling_tasks_does_not_stop_another() {
    const QUOTA: u64 = 4 << 20;
    const FILL_FOR: Duration = Duration::from_secs(60);
    let mut policy = TenantPolicy::default();
    policy.tenants.insert("filler".into(), TenantLimits { max_stored_bytes: QUOTA, ..Default::default() });
    let stack = LocalStack::start(&project_root()).unwrap();
    let model_policy = Policy { redundancy: 1, rule: RULE, audit_rate: 0.0 };
    let h = Harness::start_on(stack, vec![support::honest("w", 1)], model_policy, Duration::from_secs(10), |c| {
        c.tenants = policy;
        c.retention.task_linger = LINGER;
    })
    .await;
    let filler = Client::new(h.client.nats.clone(), "filler");
    let other = Client::new(h.client.nats.clone(), "other");

    // Tasks of about 256 KiB (mlp rows), timing out as soon as allowed.
    let inputs = h.models["mlp"].inputs.clone();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(3);
    let one_row = encode(&SubmitRequest::new("mlp", sundara::models::sample_inputs(&inputs, 1, &mut rng)));
    let rows = (256 << 10) / one_row.len() as u64;
    let large = move |i: usize, rng: &mut rand::rngs::StdRng| SubmitRequest {
        request_id: Some(format!("fill-{i}")),
        timeout_ms: Some(1000),
        ..SubmitRequest::new("mlp", sundara::models::sample_inputs(&inputs, rows, rng))
    };
    let too_short = SubmitRequest { timeout_ms: Some(10), ..large(0, &mut rng) };
    assert_eq!(accepted(filler.submit(&too_short).await.unwrap()), Err(RejectCode::TimeoutTooShort));

    let mut other_results = other.results().await.unwrap();
    let until = tokio::time::Instant::now() + FILL_FOR;
    let filling = tokio::spawn({
        let large = large.clone();
        async move {
            let (mut filled, mut refused, mut i) = (0, 0, 0);
            while tokio::time::Instant::now() < until {
                let batch: Vec<SubmitRequest> = (0..4).map(|k| large(i + k, &mut rng)).collect();
                i += batch.len();
                for outcome in futures::future::join_all(batch.iter().map(|r| filler.submit(r))).await {
                    match accepted(outcome.unwrap()) {
                        Ok(_) => filled += 1,
                        Err(RejectCode::StorageQuota) => refused += 1,
                        Err(code) => panic!("the filler was refused {code:?}, not storage_quota"),
                    }
                }
            }
            (filled, refused, filler, rng)
        }
    });
    let normal = h.sample_requests(400, "other", 9, |_| "mlp");
    let (mut other_ids, mut most_stored) = (Vec::new(), 0);
    for request in &normal {
        if tokio::time::Instant::now() >= until {
            break;
        }
        let id = accepted(other.submit(request).await.unwrap());
        other_ids.push(id.unwrap_or_else(|code| panic!("the other tenant was refused {code:?}")));
        most_stored = most_stored.max(h.capacity.stored_bytes("filler").await.unwrap());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (filled, refused, filler, mut rng) = filling.await.unwrap();
    eprintln!("filler: {filled} accepted, {refused} refused; most stored {most_stored} B of {QUOTA}");
    assert!(refused > 0 && filled > 0, "{filled} accepted, {refused} refused");
    // Its quota came back again and again as its tasks left: far more accepted than fit.
    let fit = QUOTA / (256 << 10);
    assert!(filled > 2 * fit, "only {filled} of the filler's tasks were accepted in {FILL_FOR:?} ({fit} fit at once)");
    assert!(most_stored <= QUOTA, "the filler's stored tasks reached {most_stored} B");
    assert!(other_ids.len() >= 100, "the other tenant got {} tasks in", other_ids.len());
    let results = await_results(&mut other_results, &other_ids).await;
    for id in &other_ids {
        assert!(matches!(results[id].status, ResultStatus::Verified { .. }), "{id}: {:?}", results[id].status);
    }

    // Every task leaves TASKS at its deadline plus the linger, no delete per task: the
    // filler's are gone; the other tenant's (two-minute timeouts) are still there.
    wait::until("the filler's tasks to leave TASKS", Duration::from_secs(30), || async {
        let stored = stored_in_tasks(&h).await;
        if stored.0 == other_ids.len() as u64 { Ok(()) } else { Err(stored) }
    })
    .await;
    assert!(accepted(filler.submit(&large(1_000_000, &mut rng)).await.unwrap()).is_ok(), "the quota came back");
    h.stop().await;
}

/// A task that expired before any miner took it is dead-lettered with a copy of itself,
/// and is resubmitted from that copy after TASKS has let it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_task_is_resubmitted_after_it_left_tasks() {
    let stack = LocalStack::start(&project_root()).unwrap();
    let model_policy = Policy { redundancy: 1, rule: RULE, audit_rate: 0.0 };
    // No workers: the task expires.
    let mut h = Harness::start_on(stack, vec![], model_policy, Duration::from_secs(10), |c| {
        c.retention.task_linger = LINGER;
    })
    .await;
    let mut results = h.client.results().await.unwrap();
    let request = SubmitRequest { timeout_ms: Some(1000), ..h.sample_requests(1, "dead", 1, |_| "mlp").remove(0) };
    let task_id = accepted(h.client.submit(&request).await.unwrap()).unwrap();
    let expired = await_results(&mut results, std::slice::from_ref(&task_id)).await;
    assert!(matches!(expired[&task_id].status, ResultStatus::Failed { .. }), "{:?}", expired[&task_id].status);
    wait::until("the task to leave TASKS", Duration::from_secs(30), || async {
        let stored = stored_in_tasks(&h).await;
        if stored.0 == 0 { Ok(()) } else { Err(stored) }
    })
    .await;

    h.pipeline.as_mut().unwrap().add_worker(support::honest("w", 1));
    let again = sundara::tasks::resubmit(&h.js, &task_id).await.expect("resubmitted from DEAD's copy");
    let verified = await_results(&mut results, std::slice::from_ref(&again)).await;
    assert!(matches!(verified[&again].status, ResultStatus::Verified { .. }), "{:?}", verified[&again].status);
    h.stop().await;
}

/// The verifier is stopped under load for several seconds while miners keep answering:
/// their outcomes wait in OUTCOMES (bounded by age, not by count), and once it is back
/// every task accepted is verified, none lost or decided twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_outcome_is_lost_while_the_verifier_is_down() {
    let mut stack = ProcessStack::start(StackOptions::new(2, &["w1", "w2", "w3"])).await;
    let load = stack.load("lagging", 20);
    stack.first_verified_after(&load, 0, Duration::from_secs(30)).await;
    stack.kill_service("verifier");
    let outcomes = stack.js.get_stream(subj::OUTCOMES_STREAM).await.unwrap();
    let before = outcomes.get_info().await.unwrap().state.messages;
    // A backlog of outcomes builds while it is down: the fault lasts until 100 are waiting.
    wait::until("100 outcomes to wait for the verifier", Duration::from_secs(60), || async {
        let now = outcomes.get_info().await.unwrap().state.messages;
        if now >= before + 100 { Ok(()) } else { Err(now - before) }
    })
    .await;
    stack.start_service("verifier");
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, Duration::from_secs(90)).await;
    assert_eq!(settled.verified, settled.accepted, "every task verified: {settled:?}");
}

/// Evaluations of Lua scripts Redis has run so far (`INFO commandstats`).
async fn scripts_run(redis_url: &str) -> u64 {
    let client = redis::Client::open(redis_url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut con).await.unwrap();
    info.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| l.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
        .sum()
}

/// A full fleet is known for a few milliseconds: a flood of submissions against it is
/// refused `overloaded` without a Redis call for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_fleet_refuses_a_flood_without_a_redis_call_each() {
    const FLOOD: usize = 200;
    let stack = LocalStack::start(&project_root()).unwrap();
    let model_policy = Policy { redundancy: 1, rule: RULE, audit_rate: 0.0 };
    // No workers: the two admitted tasks stay in flight, and the fleet's bound is two.
    let h = Harness::start_on(stack, vec![], model_policy, Duration::from_secs(10), |c| c.max_in_flight = 2).await;
    for r in h.sample_requests(2, "fill", 4, |_| "mlp") {
        accepted(h.client.submit(&r).await.unwrap()).expect("within the fleet's bound");
    }
    let flood: Vec<SubmitRequest> = h
        .sample_requests(FLOOD, "flood", 5, |_| "mlp")
        .into_iter()
        .map(|r| SubmitRequest { request_id: None, ..r })
        .collect();
    // Learnt once: the fleet is full.
    let first = SubmitRequest { request_id: None, ..h.sample_requests(1, "learn", 6, |_| "mlp").remove(0) };
    assert_eq!(accepted(h.client.submit(&first).await.unwrap()), Err(RejectCode::Overloaded));
    let redis_url = h.stack.endpoints().redis_url;
    let before = scripts_run(&redis_url).await;
    let refusals = futures::future::join_all(flood.iter().map(|r| h.client.submit(r))).await;
    let scripts = scripts_run(&redis_url).await - before;
    for refusal in refusals {
        assert_eq!(accepted(refusal.unwrap()), Err(RejectCode::Overloaded));
    }
    eprintln!("{FLOOD} refusals cost {scripts} Redis script runs (the services' own included)");
    assert!(scripts < FLOOD as u64 / 2, "{scripts} script runs for {FLOOD} refusals");
    // The scheduler holds the two tasks, waiting for capacity: it hands them back and
    // stops at once rather than waiting with them (SHUTDOWN_GRACE would cut it off).
    let stopping = std::time::Instant::now();
    h.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(5), "stopping took {:?}", stopping.elapsed());
}

/// History ages an operator gives (`--outcomes-max-age-secs` and the others, the same on
/// every service) are set on streams that already exist; without them an existing stream
/// keeps the age it has, whatever tuned it.
#[tokio::test]
async fn history_ages_given_are_set_on_existing_streams() {
    use sundara_common::nats::{self, HistoryArgs, Retention};
    let stack = LocalStack::start(&project_root()).unwrap();
    let client = nats::connect(&stack.endpoints().nats, "retention-test").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let ages = || async {
        let mut ages = Vec::new();
        for name in [subj::OUTCOMES_STREAM, subj::RESULTS_STREAM, subj::VERDICTS_STREAM, subj::REWARDS_STREAM] {
            let mut stream = js.get_stream(name).await.unwrap();
            ages.push(stream.info().await.unwrap().config.max_age.as_secs());
        }
        let mut dead = js.get_stream(subj::DEAD_STREAM).await.unwrap();
        ages.push(dead.info().await.unwrap().config.max_age.as_secs());
        ages
    };
    let (day, month) = (24 * 3600, 30 * 24 * 3600);
    nats::provision(&js, &Retention::default()).await.unwrap();
    assert_eq!(ages().await, [day, day, month, month, month]);

    let given =
        HistoryArgs { outcomes_max_age_secs: Some(300), results_max_age_secs: None, records_max_age_secs: Some(3600) };
    nats::provision(&js, &given.apply(Retention::default())).await.unwrap();
    assert_eq!(ages().await, [300, day, 3600, 3600, 3600]);
    // The duplicate window never outlasts the age.
    let mut outcomes = js.get_stream(subj::OUTCOMES_STREAM).await.unwrap();
    assert!(outcomes.info().await.unwrap().config.duplicate_window <= Duration::from_secs(300));

    // A service started without them changes nothing.
    nats::provision(&js, &Retention::default()).await.unwrap();
    assert_eq!(ages().await, [300, day, 3600, 3600, 3600]);
}
