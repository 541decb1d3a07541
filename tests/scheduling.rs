//! Scheduling on the real stack: priorities under contention, deadlines and dead letters,
//! two scheduler replicas on one fleet, and Redis lost mid-load.

use sundara_testkit as support;

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sundara::pipeline::WorkerSpec;
use sundara_schemas::{ClientResult, DeadLetter, FailureCode, Priority, ResultStatus, subjects as subj};
use support::{Harness, SECRET, await_results, honest, wait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A worker with one CPU slice of one thread that takes one assignment at a time.
fn one_slot(id: &str) -> WorkerSpec {
    let mut spec = honest(id, 1);
    spec.slices[0].slots = 1;
    spec
}

fn dispatched_us(r: &ClientResult) -> u64 {
    r.timing.as_ref().expect("a verified result has timings").dispatched_us
}

/// Waits (bounded) until the scheduler's consumer of each priority holds `n` tasks
/// delivered and not yet dispatched. JetStream offers no event for that; poll.
async fn waiting_in_scheduler(h: &Harness, want: &[(Priority, u64)]) {
    let stream = h.js.get_stream(subj::TASKS_STREAM).await.unwrap();
    wait::until(format_args!("the scheduler to hold {want:?}"), Duration::from_secs(30), || async {
        let mut held = Vec::new();
        for (priority, _) in want {
            let info = stream.consumer_info(format!("scheduler-{}", priority.as_str())).await.unwrap();
            held.push((*priority, info.num_ack_pending as u64));
        }
        if held == want { Ok(()) } else { Err(held) }
    })
    .await
}

/// Thirty low-priority tasks arrive first and ten high-priority ones after them, all
/// waiting because no worker exists yet. When one single-slot worker appears, every
/// high-priority task is dispatched before any low-priority one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn higher_priority_is_dispatched_first_under_contention() {
    // The default entitlement is normal; the test tenant is granted high.
    let policy = sundara_schemas::Policy { redundancy: 1, rule: support::RULE, audit_rate: support::AUDIT_RATE };
    let stack = sundara::stack::LocalStack::start(&sundara::stack::project_root()).unwrap();
    let mut h = Harness::start_on(stack, vec![], policy, Duration::from_secs(30), |c| {
        c.tenants.default.max_priority = Priority::High;
    })
    .await;
    let mut requests = h.sample_requests(40, "prio", 5, |_| "mlp");
    for (i, r) in requests.iter_mut().enumerate() {
        r.priority = if i < 30 { Priority::Low } else { Priority::High };
    }
    let mut results = h.client.results().await.unwrap();
    let ids = h.submit_all(&requests).await;
    waiting_in_scheduler(&h, &[(Priority::Low, 30), (Priority::High, 10)]).await;
    h.pipeline.as_mut().unwrap().add_worker(one_slot("solo"));
    let got = await_results(&mut results, &ids).await;
    h.assert_correct(&requests, &got);
    let times =
        |range: std::ops::Range<usize>| -> Vec<u64> { ids[range].iter().map(|id| dispatched_us(&got[id])).collect() };
    let (low, high) = (times(0..30), times(30..40));
    let last_high = *high.iter().max().unwrap();
    let first_low = *low.iter().min().unwrap();
    assert!(last_high < first_low, "a low-priority task went before a high-priority one");
    h.stop().await;
}

/// A task that cannot be dispatched before its deadline is expired: the client gets
/// `expired`, the task is dead-lettered, and once capacity exists an operator can
/// resubmit it and it is verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_task_is_dead_lettered_and_can_be_resubmitted() {
    let mut h = Harness::start(vec![], 1, Duration::from_secs(30)).await;
    let mut request = h.sample_requests(1, "late", 6, |_| "mlp").remove(0);
    request.timeout_ms = Some(1000);
    let mut results = h.client.results().await.unwrap();
    let ids = h.submit_all(std::slice::from_ref(&request)).await;
    let got = await_results(&mut results, &ids).await;
    match &got[&ids[0]].status {
        ResultStatus::Failed { code: FailureCode::Expired, .. } => {}
        other => panic!("not expired: {other:?}"),
    }
    let letters = sundara::tasks::dead_letters(&h.js, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter: &DeadLetter = &letters[0];
    assert_eq!((letter.task_id.as_str(), letter.evidence.len()), (ids[0].as_str(), 0));
    assert!(sundara::tasks::describe(letter).contains("never dispatched"));

    h.pipeline.as_mut().unwrap().add_worker(one_slot("late-comer"));
    h.wait_for_worker("late-comer").await;
    let again = sundara::tasks::resubmit(&h.js, &ids[0]).await.unwrap();
    assert_ne!(again, ids[0]);
    assert_eq!(sundara::tasks::resubmit(&h.js, &ids[0]).await.unwrap(), again, "idempotent");
    let got = await_results(&mut results, std::slice::from_ref(&again)).await;
    let ResultStatus::Verified { outputs, .. } = &got[&again].status else { panic!("{:?}", got[&again]) };
    let want = support::reference(&h.models["mlp"], &request.inputs);
    assert!(sundara_verifier::compare::agree(&support::RULE, outputs, &want));
    assert!(matches!(
        sundara::tasks::resubmit(&h.js, "no-such-task").await,
        Err(sundara::tasks::TasksError::NotDead(_))
    ));
    h.stop().await;
}

/// Fetches `http://<addr>/metrics` (a plain HTTP/1.0 GET).
async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A second scheduler process shares the fleet with the in-process one: both dispatch,
/// every replica is dispatched once, no slot is double-booked or leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_scheduler_replicas_share_the_fleet_without_double_booking() {
    let workers = vec![honest("r1", 1), honest("r2", 1), honest("r3", 1)];
    let mut h = Harness::start(workers, 2, Duration::from_secs(30)).await;
    let ep = h.stack.endpoints();
    let metrics_addr = format!("127.0.0.1:{}", sundara::stack::free_port().unwrap());
    let _second = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sundara"))
            .args(["scheduler", "--metrics-addr", &metrics_addr])
            .env("SUNDARA_SECRET", std::str::from_utf8(SECRET).unwrap())
            .env("SUNDARA_NATS_URL", &ep.nats.url)
            .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
            .env("SUNDARA_REDIS_URL", &ep.redis_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("sundara binary runs"),
    );
    // It serves metrics once it runs; its consumers are bound by then.
    wait::until("the second scheduler to serve metrics", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(&metrics_addr).await.map(drop).map_err(|e| e.kind())
    })
    .await;
    let requests = h.sample_requests(400, "replicas", 7, |i| if i % 2 == 0 { "mlp" } else { "ppocr-cls" });
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);

    let second = sundara_common::metrics::sum(&scrape(&metrics_addr).await, "sundara_scheduler_dispatched_total", &[]);
    assert!(second > 0.0 && second < 400.0, "the second scheduler dispatched {second} of 400");
    // Each replica was dispatched once, to distinct workers, and answered once.
    let verdicts = h.all_verdicts().await;
    assert_eq!(verdicts.len(), 400);
    for v in &verdicts {
        assert_eq!(v.miners.len(), 2);
        assert_ne!(v.miners[0].worker, v.miners[1].worker);
        assert!(v.miners.iter().all(|m| m.attempt == 0), "a replica was dispatched twice: {v:?}");
    }
    assert_eq!(h.stream_messages(subj::OUTCOMES_STREAM).await.len(), 800);
    // Every slot came back: nothing booked twice, nothing leaked.
    assert_eq!(h.capacity.inflight().await.unwrap(), 0);
    let fleet = sundara::fleet::table(&h.capacity).await.unwrap();
    assert_eq!(fleet.matches("slots   0/").count(), 3, "{fleet}");
    h.stop().await;
}

/// Redis is killed mid-load and comes back empty: workers announce themselves again,
/// scheduling resumes, and every task is verified once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty_mid_load_loses_no_task() {
    use rand::SeedableRng;
    let workers = vec![honest("a", 1), honest("b", 1), honest("c", 1)];
    let mut h = Harness::start(workers, 2, Duration::from_secs(10)).await;
    // 64 rows a task, so that the workers, not the pipeline, are the bottleneck and most
    // tasks are still waiting for a slot when Redis goes.
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let meta = h.models["mlp"].clone();
    let requests: Vec<_> = (0..300)
        .map(|i| h.request("mlp", sundara::models::sample_inputs(&meta.inputs, 64, &mut rng), &format!("redis-{i}")))
        .collect();
    let mut results = h.client.results().await.unwrap();
    // Submitted in the background, so that tasks keep arriving across the restart.
    let client = h.client.clone();
    let submitting = tokio::spawn(async move {
        let mut ids = Vec::new();
        for r in &requests {
            match client.submit(r).await.unwrap() {
                sundara_schemas::SubmitOutcome::Accepted { task_id, .. } => ids.push(task_id),
                rejected => panic!("{rejected:?}"),
            }
        }
        (ids, requests)
    });
    let mut got: HashMap<String, ClientResult> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 30 {
        let next = tokio::time::timeout_at(deadline, futures::StreamExt::next(&mut results)).await;
        let Ok(Some(Ok(r))) = next else { panic!("results stopped at {}", got.len()) };
        got.insert(r.task_id.clone(), r);
    }
    h.stack.restart_redis_empty().unwrap();
    let restarted_us = sundara_schemas::now_us();
    let (ids, requests) = submitting.await.unwrap();
    let rest: Vec<String> = ids.iter().filter(|id| !got.contains_key(*id)).cloned().collect();
    got.extend(await_results(&mut results, &rest).await);
    h.assert_correct(&requests, &got);
    let after = got.values().filter(|r| dispatched_us(r) > restarted_us).count();
    assert!(after > 0, "no task was dispatched after the restart");
    let stored = h.stream_messages(subj::RESULTS_STREAM).await;
    assert_eq!(stored.len(), 300, "one result per task");
    // Dispatching after the restart needed the workers' slices back in Redis.
    // (A new connection: the harness's own broke with the restart.)
    let capacity = sundara_common::Capacity::connect(&h.stack.endpoints().redis_url).await.unwrap();
    assert_eq!(capacity.workers().await.unwrap(), ["a", "b", "c"], "the workers announced themselves again");
    let last_us = got.values().map(|r| r.completed_at_ms * 1000).max().unwrap();
    eprintln!(
        "{after} of 300 tasks dispatched after Redis came back empty; the last result {} ms after the restart",
        last_us.saturating_sub(restarted_us) / 1000
    );
    h.stop().await;
}
