//! Miners are adversaries: each test runs the whole pipeline on real NATS and Redis with
//! honest `sundara worker`s beside attacking miners ([`support::attack::Miner`]: NATS
//! clients of their own that speak the miners' wire protocol and lie where the test says),
//! and asserts what no attack may do: strike or quarantine an honest miner, deliver a wrong
//! result to a client while an honest miner was in the task, or hold the attacker's work
//! unverified.

use sundara_testkit as support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use sundara_schemas::{Policy, ReferenceCheck, ResultStatus, Standing, Tensor, Verdict};
use support::attack::{Miner, falsify};
use support::{Harness, honest, wait};

/// An honest worker with one slot: the attackers, with more, get a good share of the tasks.
fn one_slot(id: &str) -> sundara::pipeline::WorkerSpec {
    let mut spec = honest(id, 1);
    spec.slices[0].slots = 1;
    spec
}

/// Workers whose timeouts the scheduler counted (assignments they let expire while alive).
async fn timeouts(h: &Harness) -> HashMap<String, u64> {
    let client = redis::Client::open(h.stack.endpoints().redis_url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    con.hgetall("sundara:timeouts").await.unwrap()
}

/// Asserts that no honest miner was struck for a timeout or quarantined.
async fn no_honest_miner_harmed(h: &Harness, honest: &[&str]) {
    let quarantined = h.capacity.quarantined().await.unwrap();
    let timeouts = timeouts(h).await;
    for w in honest {
        assert!(!quarantined.contains_key(*w), "honest {w} quarantined: {:?}", quarantined.get(*w));
        assert_eq!(timeouts.get(*w), None, "honest {w} struck for timeouts");
    }
}

/// Waits (bounded) until `worker` is quarantined.
async fn wait_quarantined(h: &Harness, worker: &str, within: Duration) -> String {
    wait::until(format_args!("{worker} to be quarantined"), within, || async {
        h.capacity.quarantined().await.unwrap().remove(worker).ok_or("not quarantined")
    })
    .await
}

/// The outcome id of every other assignment of the task an attacker might target: the
/// assignment ids themselves (the outcome ids before they carried the ticket's MAC), and
/// those with the attacker's own MAC tag.
fn forged_ids(ticket: &sundara_schemas::Ticket) -> Vec<String> {
    let own = ticket.outcome_id();
    let tag = &own[own.len() - 16..];
    let mut ids = Vec::new();
    for replica in 0..ticket.k {
        for attempt in 0..3 {
            if (replica, attempt) == (ticket.replica, ticket.attempt) {
                continue;
            }
            let aid = format!("{}.{replica}.{attempt}", ticket.task_id);
            ids.push(format!("{aid}.{tag}"));
            ids.push(aid);
        }
    }
    ids
}

/// One miner stores copies of its own outcome under every other replica's outcome id
/// before answering. JetStream drops a message whose Nats-Msg-Id it has seen, so before
/// outcome ids carried the ticket's MAC the honest miners' outcomes were dropped as
/// duplicates, their assignments timed out, and they were quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_outcome_ids_silence_no_honest_miner() {
    let workers = vec![one_slot("h1"), one_slot("h2"), one_slot("h3")];
    let mut h = Harness::start(workers, 2, Duration::from_secs(3)).await;
    let attacker = Miner::join(&h, "forger", "forger-op", 8).await;
    let forging = {
        let mut taken = attacker.assignments().await;
        tokio::spawn(async move {
            let mut forged = 0;
            while let Some(t) = taken.next().await {
                for id in forged_ids(&t.assignment.ticket) {
                    attacker.answer_as(&t.assignment, t.honest.clone(), &id).await;
                    forged += 1;
                }
                let outputs = t.honest.clone();
                attacker.answer(t, outputs).await;
            }
            forged
        })
    };
    let requests = h.sample_requests(150, "forge", 1, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    let verdicts = h.all_verdicts().await;
    let attacked = verdicts.iter().filter(|v| v.miners.iter().any(|m| m.worker == "forger")).count();
    eprintln!("forged ids: the attacker was in {attacked} of 150 tasks; every replica counted in all 150");
    assert!(attacked >= 30, "the attacker took part in {attacked} tasks");
    for v in &verdicts {
        let agreed = v.miners.iter().filter(|m| m.standing == Standing::Agreed).count();
        assert_eq!(agreed, 2, "task {}: every replica's outcome counted: {:?}", v.task_id, v.miners);
    }
    no_honest_miner_harmed(&h, &["h1", "h2", "h3"]).await;
    forging.abort();
    h.stop().await;
}

/// A miner answers its replica, then hands the assignment back (and guesses the other
/// replicas' assignment ids to hand back theirs). Only the holder of a live assignment may
/// hand it back: every one is refused, nothing is reassigned, and no worker ever holds two
/// replicas of a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handing_back_what_was_answered_or_is_anothers_is_refused() {
    let workers = vec![honest("h1", 1), honest("h2", 1)];
    let mut h = Harness::start(workers, 2, Duration::from_secs(3)).await;
    let attacker = Arc::new(Miner::join(&h, "hander", "hander-op", 8).await);
    let refusals = Arc::new(Mutex::new((0usize, 0usize)));
    let attacking = {
        let (attacker, refusals) = (attacker.clone(), refusals.clone());
        let mut taken = attacker.assignments().await;
        tokio::spawn(async move {
            while let Some(t) = taken.next().await {
                let ticket = t.assignment.ticket.clone();
                let outputs = t.honest.clone();
                attacker.answer(t, outputs).await;
                let mut tries = vec![ticket.assignment_id()];
                tries.extend(
                    (0..ticket.k).filter(|r| *r != ticket.replica).map(|r| format!("{}.{r}.0", ticket.task_id)),
                );
                for aid in tries {
                    let reply = attacker.hand_back(&aid).await;
                    let mut r = refusals.lock().unwrap();
                    r.0 += 1;
                    r.1 += usize::from(!reply.ok);
                }
            }
        })
    };
    let requests = h.sample_requests(100, "handback", 2, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    let (tried, refused) = *refusals.lock().unwrap();
    eprintln!("hand-backs: {refused} of {tried} refused");
    // Usually 25-35; fewer when the machine is loaded and the honest miners take more.
    assert!(tried >= 6, "the attacker tried {tried} hand-backs");
    assert_eq!(refused, tried, "every hand-back of an answered or another's assignment is refused");
    for v in h.all_verdicts().await {
        let workers: HashSet<&str> = v.miners.iter().map(|m| m.worker.as_str()).collect();
        assert_eq!(workers.len(), v.miners.len(), "task {}: one worker, two replicas: {:?}", v.task_id, v.miners);
        assert!(v.miners.iter().all(|m| m.attempt == 0), "task {} was reassigned: {:?}", v.task_id, v.miners);
    }
    no_honest_miner_harmed(&h, &["h1", "h2"]).await;
    attacking.abort();
    h.stop().await;
}

/// Tasks each member of a cartel holds, shared out of band: the cartel lies only where it
/// holds two of a task's three replicas (a majority), and is honest everywhere else.
#[derive(Default)]
struct Cartel {
    holding: Mutex<HashMap<String, usize>>,
    lies: Mutex<HashSet<String>>,
}

impl Cartel {
    /// Whether the cartel holds a majority of the task: each member registers its
    /// assignment and waits briefly for the other (replicas are dispatched together).
    async fn holds_majority(&self, task: &str) -> bool {
        *self.holding.lock().unwrap().entry(task.to_string()).or_default() += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        loop {
            if self.holding.lock().unwrap()[task] >= 2 {
                self.lies.lock().unwrap().insert(task.to_string());
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Runs one cartel member: a lie where the cartel holds the majority, the truth elsewhere.
async fn cartel_member(h: &Harness, id: &str, cartel: Arc<Cartel>) -> tokio::task::JoinHandle<()> {
    let miner = Arc::new(Miner::join(h, id, &format!("{id}-op"), 8).await);
    let mut taken = miner.assignments().await;
    tokio::spawn(async move {
        while let Some(t) = taken.next().await {
            let (miner, cartel) = (miner.clone(), cartel.clone());
            tokio::spawn(async move {
                let lie = cartel.holds_majority(&t.assignment.ticket.task_id).await;
                let outputs: Vec<Tensor> = if lie { falsify(&t.honest) } else { t.honest.clone() };
                miner.answer(t, outputs).await;
            });
        }
    })
}

/// Two miners under two operator names collude: they falsify their outputs exactly when
/// they hold 2 of a task's 3 replicas, and are honest otherwise. At the default audit rate
/// the vote alone accepted those lies; now every split vote is judged by the reference, so
/// no lie reaches a client, the honest miner in those tasks is not struck, and each
/// colluder is quarantined after its third proven lie.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cartel_holding_the_majority_cannot_win_with_a_lie() {
    // One slot each, so that a task waits for a free honest slot and then often goes to
    // the cartel's two miners and one honest miner.
    let workers = vec![one_slot("h1"), one_slot("h2"), one_slot("h3")];
    let policy = Policy { redundancy: 3, rule: support::RULE, audit_rate: 0.05 };
    let mut h = Harness::start_with(workers, policy, Duration::from_secs(5)).await;
    let cartel = Arc::new(Cartel::default());
    let members = [cartel_member(&h, "c1", cartel.clone()).await, cartel_member(&h, "c2", cartel.clone()).await];
    // In batches of 4, so that at most 4 tasks are in flight when a quarantine lands.
    let requests = h.sample_requests(120, "cartel", 3, |_| "mlp");
    let mut results = HashMap::new();
    for batch in requests.chunks(4) {
        results.extend(h.run_tasks(batch).await);
    }
    // Every result is right, those of the tasks the cartel lied in among them.
    h.assert_correct(&requests, &results);
    let lies = cartel.lies.lock().unwrap().clone();
    assert!(lies.len() >= 3, "the cartel held a majority in {} tasks", lies.len());
    let verdicts: Vec<Verdict> = h.all_verdicts().await;
    for v in verdicts.iter().filter(|v| lies.contains(&v.task_id)) {
        assert!(matches!(v.reference, Some(ReferenceCheck::Escalated)), "task {}: {:?}", v.task_id, v.reference);
        for m in &v.miners {
            let liar = m.worker.starts_with('c');
            let want = if liar { Standing::Disagreed } else { Standing::Agreed };
            assert_eq!(m.standing, want, "task {}: {} judged {:?}", v.task_id, m.worker, m.standing);
        }
    }
    // Quarantined on the third proof: three lies each, plus at most the 4 tasks in flight
    // when the quarantine landed.
    for c in ["c1", "c2"] {
        let why = wait_quarantined(&h, c, Duration::from_secs(20)).await;
        let proven = verdicts
            .iter()
            .filter(|v| v.miners.iter().any(|m| m.worker == c && m.standing == Standing::Disagreed))
            .count();
        eprintln!("cartel: {} majority tasks; {c} proven wrong in {proven} before quarantine ({why})", lies.len());
        assert!((3..=7).contains(&proven), "{c} lied {proven} times before quarantine ({why})");
    }
    no_honest_miner_harmed(&h, &["h1", "h2", "h3"]).await;
    for m in members {
        m.abort();
    }
    h.stop().await;
}

/// A miner keeps its old tickets and, once their tasks are decided, replays outcomes for
/// them with large junk outputs under fresh outcome ids. The verifier holds none of them
/// (the tasks are decided), decides no task twice, and keeps serving the other miners.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replayed_old_tickets_with_junk_are_dropped_and_decide_nothing_twice() {
    let workers = vec![honest("h1", 1)];
    let mut h = Harness::start(workers, 2, Duration::from_secs(5)).await;
    let attacker = Arc::new(Miner::join(&h, "replayer", "replayer-op", 8).await);
    let kept = Arc::new(Mutex::new(Vec::new()));
    let answering = {
        let (attacker, kept) = (attacker.clone(), kept.clone());
        let mut taken = attacker.assignments().await;
        tokio::spawn(async move {
            while let Some(t) = taken.next().await {
                kept.lock().unwrap().push(t.assignment.clone());
                let outputs = t.honest.clone();
                attacker.answer(t, outputs).await;
            }
        })
    };
    let requests = h.sample_requests(40, "replay", 4, |_| "mlp");
    let first = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &first);
    let kept = kept.lock().unwrap().clone();
    assert_eq!(kept.len(), 40, "the attacker held a replica of every task (k=2, one honest miner)");
    // 1 MiB of junk per replay, 5 replays of each old ticket under fresh ids.
    let junk = vec![Tensor::from_values("y", vec![1 << 18], &vec![7.0f32; 1 << 18])];
    for (i, a) in kept.iter().enumerate() {
        for n in 0..5 {
            attacker.answer_as(a, junk.clone(), &format!("{}.replay{n}.{i}", a.ticket.assignment_id())).await;
        }
    }
    // The verifier drains them at once, holding nothing.
    let outcomes = h.js.get_stream(sundara_schemas::subjects::OUTCOMES_STREAM).await.unwrap();
    wait::until("the verifier to hold no replay", Duration::from_secs(20), || async {
        let info = outcomes.consumer_info("verifier").await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 { Ok(()) } else { Err(info) }
    })
    .await;
    eprintln!("replays: {} junk outcomes of 1 MiB drained, none held", kept.len() * 5);
    // Nothing decided twice, and the pipeline still serves.
    let verdicts = h.all_verdicts().await;
    assert_eq!(verdicts.len(), 40);
    let results = h.stream_messages(sundara_schemas::subjects::RESULTS_STREAM).await;
    assert_eq!(results.len(), 40, "one result per task");
    let more = h.sample_requests(10, "after", 5, |_| "mlp");
    let after = h.run_tasks(&more).await;
    for r in after.values() {
        assert!(matches!(r.status, ResultStatus::Verified { .. }), "{:?}", r.status);
    }
    answering.abort();
    h.stop().await;
}

/// One operator runs three miners under three names and lies on every task. The
/// scheduler never gives two replicas of a task to one operator, so each lie meets an
/// honest miner, is judged by the reference, and counts against the operator's one record:
/// after three proofs, whichever names they came from, every name is quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operators_many_names_share_one_record() {
    let workers = vec![honest("h1", 1), honest("h2", 1)];
    let mut h = Harness::start(workers, 2, Duration::from_secs(5)).await;
    let mut names = Vec::new();
    for id in ["x1", "x2", "x3"] {
        let miner = Arc::new(Miner::join(&h, id, "sybil-op", 8).await);
        let mut taken = miner.assignments().await;
        names.push(tokio::spawn(async move {
            while let Some(t) = taken.next().await {
                let lie = falsify(&t.honest);
                miner.answer(t, lie).await;
            }
        }));
    }
    let requests = h.sample_requests(60, "sybil", 6, |_| "mlp");
    let mut results = HashMap::new();
    for batch in requests.chunks(4) {
        results.extend(h.run_tasks(batch).await);
    }
    h.assert_correct(&requests, &results);
    let verdicts = h.all_verdicts().await;
    let mut lies = 0;
    for v in &verdicts {
        let of_operator = v.miners.iter().filter(|m| m.worker.starts_with('x')).count();
        assert!(of_operator <= 1, "task {}: two replicas of one operator: {:?}", v.task_id, v.miners);
        lies += of_operator;
    }
    for id in ["x1", "x2", "x3"] {
        let why = wait_quarantined(&h, id, Duration::from_secs(20)).await;
        assert!(why.contains("proven wrong"), "{id}: {why}");
    }
    eprintln!("sybil: {lies} lies by operator sybil-op's three names before all were quarantined");
    assert!((3..=3 + 4).contains(&lies), "the operator lied {lies} times");
    no_honest_miner_harmed(&h, &["h1", "h2"]).await;
    for n in names {
        n.abort();
    }
    h.stop().await;
}

/// A cartel that holds every replica of a task agrees with itself: only a sampled audit
/// can catch that lie, and every lie an audit does not pick reaches the client. This test
/// states the bound: with audit rate a, a cartel lying on every task is quarantined after
/// about 3 / a of its tasks (3 proofs), and each audited task gives the client the
/// reference's result. Two colluders, nobody else, k=2, a = 0.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cartel_holding_every_replica_is_caught_by_audits_within_a_bound() {
    let policy = Policy { redundancy: 2, rule: support::RULE, audit_rate: 0.2 };
    let mut h = Harness::start_with(vec![], policy, Duration::from_secs(5)).await;
    let mut members = Vec::new();
    for id in ["c1", "c2"] {
        let miner = Arc::new(Miner::join(&h, id, &format!("{id}-op"), 8).await);
        let mut taken = miner.assignments().await;
        members.push(tokio::spawn(async move {
            while let Some(t) = taken.next().await {
                let lie = falsify(&t.honest);
                miner.answer(t, lie).await;
            }
        }));
    }
    // A short deadline: the task in flight when a quarantine lands has nobody left to take
    // the quarantined miner's replica, and ends when the scheduler gives it up.
    let mut requests = h.sample_requests(200, "allcartel", 7, |_| "mlp");
    for r in &mut requests {
        r.timeout_ms = Some(3_000);
    }
    let (mut tasks, mut wrong) = (0, 0);
    for request in &requests {
        let results = h.run_tasks(std::slice::from_ref(request)).await;
        let result = results.into_values().next().expect("one result");
        tasks += 1;
        if let ResultStatus::Verified { outputs, .. } = &result.status {
            let right = support::reference(&h.models["mlp"], &request.inputs);
            wrong += usize::from(!sundara_verifier::compare::agree(&support::RULE, outputs, &right));
        }
        // One quarantined leaves too few miners for k=2: the other follows on the same proofs.
        if !h.capacity.quarantined().await.unwrap().is_empty() {
            break;
        }
    }
    for c in ["c1", "c2"] {
        wait_quarantined(&h, c, Duration::from_secs(20)).await;
    }
    let audited = h.all_verdicts().await.iter().filter(|v| v.reference.is_some()).count();
    eprintln!("all-cartel tasks: quarantined after {tasks} tasks, {audited} audited, {wrong} wrong results delivered");
    // Expected 3 / 0.2 = 15 tasks; 200 would be a failure of the audits.
    assert!(tasks < 200, "the cartel was not quarantined within {tasks} tasks");
    assert!(wrong + audited <= tasks, "an audited task got a lie");
    assert!(wrong + audited + 1 >= tasks, "an unaudited task got the truth: the cartel did not lie every time");
    for m in members {
        m.abort();
    }
    h.stop().await;
}

/// Timeouts quarantine only in a row: an answer in time clears a miner's count, so an
/// honest miner late now and then under load is not quarantined for timeouts spread over
/// its life; a late answer clears nothing (a miner answering everything late is still
/// counted at each timeout). The scheduler's own scripts on a real redis-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_timeouts_in_a_row_count_towards_quarantine() {
    let stack = sundara::stack::LocalStack::start(&sundara::stack::project_root()).unwrap();
    let capacity = sundara_common::capacity::Capacity::open(&stack.endpoints()).await.unwrap();
    let client = redis::Client::open(stack.endpoints().redis_url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let () = con.set_ex("sundara:hb:w", 1, 60).await.unwrap();
    let now = sundara_schemas::now_ms();
    // An assignment held by `w`, to be answered by `answer_by` (ms).
    let mut assign = async |aid: &str, answer_by: u64| {
        let fields = [("slice", "s1".to_string()), ("worker", "w".into()), ("answer_by", answer_by.to_string())];
        let () = con.hset_multiple(format!("sundara:asg:{aid}"), &fields).await.unwrap();
    };
    let in_time = now + 60_000;
    for (aid, count) in [("a1", 1), ("a2", 2)] {
        assign(aid, in_time).await;
        assert_eq!(capacity.timeout_strike(aid, "w").await.unwrap(), count);
    }
    assign("a3", in_time).await;
    assert!(capacity.release_answer("a3", "w", sundara_schemas::now_us()).await.unwrap());
    assign("a4", in_time).await;
    assert_eq!(capacity.timeout_strike("a4", "w").await.unwrap(), 1, "an answer in time clears the count");
    // An answer after its deadline frees nothing and clears nothing.
    assign("a5", now - 1_000).await;
    assert!(!capacity.release_answer("a5", "w", sundara_schemas::now_us()).await.unwrap());
    assign("a6", in_time).await;
    assert_eq!(capacity.timeout_strike("a6", "w").await.unwrap(), 2, "a late answer clears nothing");
}

/// A release lost on its way to the scheduler does not make an honest answer a timeout.
/// `scheduler-release` acks cumulatively, so a delivery lost in flight (a cluster node
/// dying with it) can be covered by a later ack and never applied. Here the consumer is
/// deleted before the miner answers, so no release arrives at all. The sweep finds the
/// assignment due after its 2 s timeout, finds its answer stored in time, and frees it as
/// that answer: no strike, no reassignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_release_was_lost_is_not_a_timeout() {
    let h = Harness::start(vec![], 1, Duration::from_secs(2)).await;
    let miner = Miner::join(&h, "m1", "op1", 4).await;
    let mut taken = miner.assignments().await;
    let requests = h.sample_requests(1, "lost-release", 3, |_| "mlp");
    let task_ids = h.submit_all(&requests).await;
    let t = tokio::time::timeout(Duration::from_secs(30), taken.next()).await.expect("assigned").expect("assigned");
    let aid = t.assignment.ticket.assignment_id();
    let outcomes = h.js.get_stream(sundara_schemas::subjects::OUTCOMES_STREAM).await.unwrap();
    outcomes.delete_consumer("scheduler-release").await.unwrap();
    let outputs = t.honest.clone();
    miner.answer(t, outputs).await;

    let client = redis::Client::open(h.stack.endpoints().redis_url.as_str()).unwrap();
    let con = client.get_multiplexed_async_connection().await.unwrap();
    wait::until_true(format_args!("the sweep to free {aid}"), Duration::from_secs(30), || {
        let mut con = con.clone();
        let key = format!("sundara:asg:{aid}");
        async move { !con.exists::<_, bool>(key).await.unwrap() }
    })
    .await;
    no_honest_miner_harmed(&h, &["m1"]).await;
    let verdicts = h.all_verdicts().await;
    let verdict = verdicts.iter().find(|v| v.task_id == task_ids[0]).expect("the task was decided");
    assert!(verdict.accepted, "{verdict:?}");
    assert!(verdict.miners.iter().all(|m| m.worker == "m1" && m.attempt == 0), "not reassigned: {verdict:?}");
}
