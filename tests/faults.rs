//! Faults under load, on real servers with every service and worker as its own process:
//! SIGKILL of each service in turn and of workers, nats-server restarted, a node of a
//! three-node JetStream cluster lost, Redis restarted empty. After each, every accepted
//! task ends exactly once (verified, expired or dead-lettered), and the time to recover
//! is measured and bounded.
//!
//! Each fault prints one line:
//! `FAULT <name>: recovery_ms=… drain_ms=… accepted=… verified=… expired=… no_consensus=… dead=… retried=… duplicates=…`
//! where recovery is kill → first verified result of a task accepted after the restart, drain is
//! restart → last result of the tasks accepted before it (since the previous fault's
//! restart), and the counts are the whole test's.

use sundara_testkit as support;

use std::time::Duration;

use sundara_schemas::{MAX_MESSAGE_BYTES, Verdict, decode, now_us, subjects as subj};
use support::processes::{Accepted, Fault, ProcessStack, Settled, StackOptions};
use support::wait;

/// Submissions a second while faults happen.
const RATE: u32 = 20;
/// How long a killed service stays down before it is started again (a supervisor's
/// restart delay; the fault, not a wait for an event).
const DOWN: Duration = Duration::from_millis(1000);
/// Accepted submissions between faults (about two seconds of load).
const BETWEEN: usize = 2 * RATE as usize;
/// Bounds: a fault's first new result, and the last result of the work it caught.
const RECOVERY_BOUND_MS: u64 = 30_000;
/// Outcomes or tasks held un-acked by a killed service come back after their ack wait
/// (30 s); tasks caught by a lost replica end at their deadline (15 s).
const DRAIN_BOUND_MS: u64 = 60_000;
/// How long every accepted task may take to end after the load stops.
const SETTLE: Duration = Duration::from_secs(90);
/// How long a task accepted after a fault may take to get its result.
const RECOVERY: Duration = Duration::from_secs(30);

fn three_workers() -> StackOptions {
    StackOptions::new(2, &["w1", "w2", "w3"])
}

/// Prints each fault's figures and checks the bounds.
fn check_recoveries(stack: &ProcessStack, faults: &[Fault], accepted: &[Accepted], settled: &Settled) {
    for (fault, r) in faults.iter().zip(stack.report(faults, accepted, settled)) {
        assert!(r.recovery_ms < RECOVERY_BOUND_MS, "{}: recovery took {} ms", fault.name, r.recovery_ms);
        assert!(r.drain_ms < DRAIN_BOUND_MS, "{}: draining took {} ms", fault.name, r.drain_ms);
    }
    assert!(settled.verified > 0 && settled.accepted >= 50, "{settled:?}");
}

/// Faults the system rides out expire no task: a dispatch that fails while JetStream is
/// unreachable is tried again, not left to its ack wait. (Killing the scheduler does strand
/// the tasks it held until their ack wait, past their deadline: that test allows expiries.)
fn no_expiry(settled: &Settled) {
    assert_eq!(settled.expired, 0, "tasks expired: {settled:?}");
}

/// Every verdict stored.
async fn verdicts(stack: &ProcessStack) -> Vec<Verdict> {
    use futures::StreamExt;
    let mut stream = stack.js.get_stream(subj::VERDICTS_STREAM).await.unwrap();
    let count = stream.info().await.unwrap().state.messages as usize;
    let consumer =
        stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while out.len() < count {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.unwrap().unwrap().unwrap();
        out.push(decode(&m.payload, MAX_MESSAGE_BYTES).unwrap());
    }
    out
}

/// Each service in turn is SIGKILLed under load and started again a second later: the
/// verifier (outcomes it held come back after their ack wait), the scheduler (the fleet
/// gateway goes with it, so heartbeats stop), the ingress (submissions in flight get no
/// answer and are retried with the same request id), the rewarder and the autoscaler.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_each_service_in_turn_loses_no_task() {
    let mut stack = ProcessStack::start(three_workers()).await;
    let load = stack.load("services", RATE);
    stack.first_verified_after(&load, 0, RECOVERY).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let mut faults = Vec::new();
    for name in ["verifier", "scheduler", "ingress", "rewarder", "autoscaler"] {
        let killed_us = stack.kill_service(name);
        tokio::time::sleep(DOWN).await;
        stack.start_service(name);
        let restarted_us = now_us();
        stack.first_verified_after(&load, restarted_us, RECOVERY).await;
        if name == "ingress" {
            // Clients that never heard back retry with the same request id: a restarted
            // ingress maps each to the task it stored before.
            let before: Vec<Accepted> = {
                let log = load.log.lock().unwrap();
                log.accepted.iter().filter(|a| a.at_us <= killed_us).rev().take(10).cloned().collect()
            };
            stack.resubmit(&before).await;
        }
        stack.more_accepted(&load, BETWEEN, RECOVERY).await;
        faults.push(Fault { name: format!("sigkill-{name}"), killed_us, restarted_us });
    }
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, SETTLE).await;
    check_recoveries(&stack, &faults, &accepted, &settled);
    assert!(settled.retried > 0, "no submission was retried while the ingress was down: {settled:?}");
}

/// Two of three workers are SIGKILLed under load, one at a time, each while it holds
/// assignments: the autoscaler declares it dead, its replicas are reassigned, and it
/// comes back before the next one goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_workers_loses_no_task() {
    let mut stack = ProcessStack::start(three_workers()).await;
    // 512 rows a task: long enough inferences that a worker still holds the assignment it
    // was seen holding when it is killed (on an idle machine a worker rarely holds two).
    let load = stack.load_rows("workers", RATE, 512);
    stack.first_verified_after(&load, 0, RECOVERY).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let mut faults = Vec::new();
    let mut spared = vec!["w1", "w2", "w3"];
    for _ in 0..2 {
        let victim = stack.wait_holding(&spared, 1, Duration::from_secs(30)).await;
        spared.retain(|w| *w != victim);
        let killed_us = stack.kill_worker(&victim);
        stack.wait_declared_dead(&victim, Duration::from_secs(15)).await;
        stack.first_verified_after(&load, killed_us, RECOVERY).await;
        // What it held has been reassigned and answered before it comes back.
        let before: Vec<Accepted> =
            load.log.lock().unwrap().accepted.iter().filter(|a| a.at_us <= killed_us).cloned().collect();
        stack.await_results(&before, RECOVERY).await;
        faults.push(Fault { name: format!("sigkill-worker-{victim}"), killed_us, restarted_us: killed_us });
        stack.start_worker(&victim);
        stack.wait_for_worker(&victim).await;
        stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    }
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, SETTLE).await;
    check_recoveries(&stack, &faults, &accepted, &settled);
    no_expiry(&settled);
    let reassigned = verdicts(&stack).await.iter().flat_map(|v| v.miners.clone()).filter(|m| m.attempt > 0).count();
    assert!(reassigned > 0, "no replica was reassigned");
}

/// nats-server is SIGKILLed under load and started again on the same port and store a
/// second later: JetStream recovers the streams from disk, every process reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_server_restarted_under_load_loses_no_task() {
    let mut stack = ProcessStack::start(three_workers()).await;
    let load = stack.load("nats", RATE);
    stack.first_verified_after(&load, 0, RECOVERY).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let killed_us = stack.kill_nats();
    tokio::time::sleep(DOWN).await;
    stack.start_nats_again();
    let restarted_us = now_us();
    stack.first_verified_after(&load, restarted_us, RECOVERY).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, SETTLE).await;
    let fault = Fault { name: "nats-restart".into(), killed_us, restarted_us };
    check_recoveries(&stack, &[fault], &accepted, &settled);
    no_expiry(&settled);
}

/// A three-node JetStream cluster with every stream, bucket and the object store
/// replicated three times loses, under load, a node that leads every one of them and every
/// replicated consumer, and that the scheduler is not connected to: each Raft group elects
/// a new leader among the other two, the services that were connected to the lost node
/// reconnect to the others (all three URLs given), and the pull requests that waited at
/// the lost leaders (the scheduler's among them) are made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_losing_the_leading_node_loses_no_task() {
    let mut stack = ProcessStack::start(StackOptions { cluster: Some(3), ..three_workers() }).await;
    let load = stack.load("cluster", RATE);
    stack.first_verified_after(&load, 0, RECOVERY).await;
    let scheduler_at = stack.node_of("sundara-scheduler").expect("the scheduler is connected");
    let tasks_leader = stack.stream_leader(subj::TASKS_STREAM).await;
    let victim = if tasks_leader != scheduler_at {
        tasks_leader
    } else {
        stack.cluster_nodes().into_iter().find(|n| *n != scheduler_at).unwrap()
    };
    stack.move_leaders_to(&victim).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let killed_us = stack.kill_cluster_node(&victim);
    stack.first_verified_after(&load, killed_us, RECOVERY).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, SETTLE).await;
    let fault = Fault { name: format!("cluster-node-{victim}-lost"), killed_us, restarted_us: killed_us };
    check_recoveries(&stack, &[fault], &accepted, &settled);
    no_expiry(&settled);
}

/// Redis is SIGKILLed under load and, a second later, an empty one takes its port: the
/// workers announce themselves again through the gateway, and scheduling resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_empty_under_load_loses_no_task() {
    let mut stack = ProcessStack::start(three_workers()).await;
    let load = stack.load("redis", RATE);
    stack.first_verified_after(&load, 0, RECOVERY).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    let killed_us = stack.kill_redis();
    tokio::time::sleep(DOWN).await;
    stack.start_redis_empty();
    let restarted_us = now_us();
    stack.first_verified_after(&load, restarted_us, RECOVERY).await;
    // The fleet is back in the new Redis, and serves on (slots lost with the old one's
    // bookkeeping must not starve it).
    for w in ["w1", "w2", "w3"] {
        stack.wait_for_worker(w).await;
    }
    stack.more_accepted(&load, 3 * BETWEEN, RECOVERY).await;
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, SETTLE).await;
    let fault = Fault { name: "redis-restart-empty".into(), killed_us, restarted_us };
    check_recoveries(&stack, &[fault], &accepted, &settled);
    no_expiry(&settled);
}

/// A task delivered to the scheduler again after its result was stored (a scheduler or
/// nats-server killed before the task's ack reached the disk: JetStream hands the task out
/// again, as `nats_server_restarted_under_load_loses_no_task` showed) is acked at once. Its
/// first dispatch's workers are excluded from its replicas, so it finds no capacity; it
/// must not wait for its deadline and then expire, dead-lettering a verified task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_delivered_again_after_its_result_is_not_dead_lettered() {
    let stack = ProcessStack::start(three_workers()).await;
    // Tasks as ingress stores them (a verified task leaves TASKS once its result is read).
    let mut stored_tasks = stack.js.client().subscribe(subj::TASK_ALL).await.unwrap();
    stack.js.client().flush().await.unwrap();
    let load = stack.load("again", 1);
    stack.first_verified_after(&load, 0, RECOVERY).await;
    let accepted = load.stop().await;
    stack.await_results(&accepted, RECOVERY).await;
    let task_id = accepted[0].task_id.clone();
    // The task stored once more under another message id: to the scheduler's consumer,
    // the same task delivered again.
    let raw = wait::next_matching(format_args!("task {task_id} in TASKS"), RECOVERY, &mut stored_tasks, |msg| {
        let task: sundara_schemas::Task = decode(&msg.payload, MAX_MESSAGE_BYTES).unwrap();
        (task.task_id == task_id).then_some(msg)
    })
    .await;
    let again = format!("{task_id}-again");
    sundara_common::nats::publish_durable(&stack.js, raw.subject.to_string(), &again, raw.payload.to_vec())
        .await
        .unwrap();
    stack.step("the task stored again");
    stack.scheduler_idle(Duration::from_secs(30)).await;
    let dead = support::processes::subject_counts(&stack.js, subj::DEAD_STREAM, subj::DEAD_ALL).await;
    assert!(dead.is_empty(), "dead-lettered after its result: {}", stack.dead_letter(&task_id).await);
    let results =
        support::processes::subject_counts(&stack.js, subj::RESULTS_STREAM, &subj::result("test", &task_id)).await;
    assert_eq!(results.values().sum::<usize>(), 1, "one result");
}

/// A verifier whose decision could not be stored (RESULTS refused it: a server restarting,
/// a leader being elected) decides the task again when its outcomes come back, instead of
/// taking them for late outcomes of a task it had decided. Found by
/// `nats_server_restarted_under_load_loses_no_task`, where such a task never ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decision_that_could_not_be_stored_is_made_again() {
    use async_nats::jetstream::stream::DiscardPolicy;
    let stack = ProcessStack::start(three_workers()).await;
    let first = stack.submit_one("stored-first").await;
    stack.await_results(std::slice::from_ref(&first), RECOVERY).await;
    // RESULTS refuses every new message from now on.
    let mut results = stack.js.get_stream(subj::RESULTS_STREAM).await.unwrap();
    let config = results.info().await.unwrap().config.clone();
    let full = async_nats::jetstream::stream::Config { max_messages: 1, discard: DiscardPolicy::New, ..config.clone() };
    stack.js.update_stream(full).await.unwrap();
    let outcomes = stack.js.get_stream(subj::OUTCOMES_STREAM).await.unwrap();
    let deliveries = async || outcomes.consumer_info("verifier").await.unwrap().delivered.consumer_sequence;
    let before = deliveries().await;
    let refused = stack.submit_one("stored-refused").await;
    // Its two outcomes were delivered, handed back (NAKed) when the decision was refused,
    // and delivered again: four deliveries. JetStream announces no such moment to a
    // client; poll briefly.
    wait::until("the refused outcomes to be delivered again", RECOVERY, || async {
        let delivered = deliveries().await;
        if delivered >= before + 4 { Ok(()) } else { Err(format!("{} deliveries", delivered - before)) }
    })
    .await;
    stack.step("the decision was refused and the outcomes came back");
    stack.js.update_stream(config).await.unwrap();
    stack.await_results(std::slice::from_ref(&refused), RECOVERY).await;
    let stored = support::processes::subject_counts(&stack.js, subj::RESULTS_STREAM, subj::RESULT_ALL).await;
    assert_eq!(stored.get(&subj::result("test", &refused.task_id)), Some(&1));
}

/// With nats-server gone, SIGTERM still stops a worker (and every service) in bounded time. Before, a worker waited for NATS to come back: its last flush has no
/// server to answer it, and Ctrl-C and SIGTERM did nothing for as long as NATS was down.
/// The worker holds assignments when NATS goes (a load with longer inferences).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_is_bounded_while_nats_is_down() {
    let mut stack = ProcessStack::start(StackOptions::new(1, &["w1"])).await;
    let load = stack.load_rows("down", RATE, 64);
    stack.first_verified_after(&load, 0, RECOVERY).await;
    stack.more_accepted(&load, BETWEEN, RECOVERY).await;
    stack.kill_nats();
    // sundara_common::SHUTDOWN_GRACE is 10 s; a process that exits then has a little more.
    let bound = Duration::from_secs(15);
    let every = ["worker-w1", "ingress", "scheduler", "verifier", "rewarder", "autoscaler"];
    let stopped = stack.terminate(&every, bound).await;
    // NATS back before the load stops: its submissions under way then end at once.
    stack.start_nats_again();
    load.stop().await;
    for (name, exit) in &stopped {
        let Some((took, status)) = exit else {
            panic!("{name} did not exit within {bound:?} of SIGTERM with NATS down")
        };
        eprintln!("STOP {name}: {} ms ({status})", took.as_millis());
        assert!(status.success(), "{name} exited with {status}");
    }
}
