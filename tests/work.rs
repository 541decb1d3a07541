//! Assignments to WORK, several per message (issue 21): what is ready for one worker and
//! model at once travels in one message, in order, each with its own trace context; one
//! alone travels as a plain assignment, as before. Real nats-server.

use std::time::Duration;

use async_nats::jetstream;
use sundara::stack::{LocalStack, project_root};
use sundara_common::nats;
use sundara_scheduler::work::{Outgoing, WorkSender};
use sundara_schemas::{
    Assignment, MAX_MESSAGE_BYTES, ModelRef, Outcome, OutcomeResult, Tensor, Ticket, WIRE_VERSION, decode, decode_work,
    subjects as subj,
};

fn assignment(task: &str, worker: &str) -> Assignment {
    let ticket = Ticket { operator: format!("op-{worker}"), ..Ticket::unsigned(task, worker) };
    let inputs = vec![Tensor::from_values("x", vec![1, 2], &[1.0f32, 2.0])];
    Assignment { v: WIRE_VERSION, ticket, inputs, seed: 0, accepted_at_us: 1 }
}

fn outgoing(task: &str, worker: &str) -> Outgoing {
    let a = assignment(task, worker);
    Outgoing {
        subject: subj::work("mlp", worker),
        aid: a.ticket.assignment_id(),
        traceparent: format!("00-{:032x}-{:016x}-01", task.len() + 1, 7),
        assignment: a,
    }
}

/// Every WORK message for `worker`: its assignments (with their traceparents) and whether
/// it was a batch. (WORK is a work queue: read by sequence, not by a second consumer.)
async fn work_messages(js: &jetstream::Context, worker: &str) -> Vec<(bool, Vec<(Assignment, Option<String>)>)> {
    let mut stream = js.get_stream(subj::WORK_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(msg) = stream.get_raw_message(seq).await else { continue };
        if msg.subject.as_str() != subj::work("mlp", worker) {
            continue;
        }
        let batched = msg.headers.get(subj::ASSIGNMENTS).is_some();
        out.push((batched, decode_work(batched, &msg.payload).unwrap()));
    }
    out
}

/// One runtime thread: the sender's task runs only once every assignment of the call is
/// queued, so what is ready at once is exactly the call's assignments.
#[tokio::test(flavor = "current_thread")]
async fn assignments_ready_at_once_for_one_worker_travel_in_one_message() {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let js = jetstream::new(nats::connect(&stack.endpoints().nats, "test").await.unwrap());
    nats::provision(&js, &nats::Retention::default()).await.unwrap();
    let sender = WorkSender::start(js.clone());

    // 100 for w1 and 3 for w2, ready at once; then one for w3 alone.
    let mut ready: Vec<Outgoing> = (0..100).map(|i| outgoing(&format!("t{i:03}"), "w1")).collect();
    ready.extend((0..3).map(|i| outgoing(&format!("u{i}"), "w2")));
    sender.send(ready).await.expect("stored");
    sender.send(vec![outgoing("alone", "w3")]).await.expect("stored");

    let w1 = work_messages(&js, "w1").await;
    assert_eq!(w1.len(), 1, "one message for w1's 100");
    let (batched, got) = &w1[0];
    assert!(*batched);
    let tasks: Vec<&str> = got.iter().map(|(a, _)| a.ticket.task_id.as_str()).collect();
    let expected: Vec<String> = (0..100).map(|i| format!("t{i:03}")).collect();
    assert_eq!(tasks, expected, "in the order they were sent");
    assert_eq!(got[0].0, assignment("t000", "w1"), "each assignment whole");
    assert_eq!(got[0].1.as_deref(), Some(outgoing("t000", "w1").traceparent.as_str()), "its own trace context");

    let w2 = work_messages(&js, "w2").await;
    assert_eq!(w2.iter().map(|(b, a)| (*b, a.len())).collect::<Vec<_>>(), vec![(true, 3)]);

    let w3 = work_messages(&js, "w3").await;
    assert_eq!(w3.len(), 1);
    assert!(!w3[0].0, "one assignment alone is a plain assignment, as before batches");
    assert_eq!(w3[0].1[0].0, assignment("alone", "w3"));

    // The same round sent again whole is one message again, deduplicated by its id.
    let again: Vec<Outgoing> = (0..3).map(|i| outgoing(&format!("u{i}"), "w2")).collect();
    sender.send(again).await.expect("stored");
    assert_eq!(work_messages(&js, "w2").await.len(), 1, "deduplicated");
}

/// A real `sundara worker` process answers every assignment of a batched WORK message,
/// each with its own outcome on its own subject, and acks the message: WORK is empty after.
/// (The tickets are unsigned, so the verifier drops these outcomes: what is tested is the
/// worker's side of the batch.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_answers_each_assignment_of_a_batch() {
    let mut h = sundara_testkit::Harness::start(vec![], 1, Duration::from_secs(10)).await;
    let meta = h.models["mlp"].clone();
    let sender = WorkSender::start(h.js.clone());
    let requests = h.sample_requests(20, "batch", 5, |_| "mlp");
    let batch: Vec<Outgoing> = requests
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            let mut o = outgoing(&format!("b{i:02}"), "wb");
            o.assignment.ticket.model = ModelRef { name: meta.name.clone(), version: meta.version.clone() };
            o.assignment.ticket.deadline_at_ms = sundara_schemas::now_ms() + 60_000;
            o.assignment.inputs = request.inputs;
            o.traceparent = String::new();
            o
        })
        .collect();
    let inputs: Vec<Vec<Tensor>> = batch.iter().map(|o| o.assignment.inputs.clone()).collect();
    sender.send(batch).await.expect("stored");
    // Stored before the worker starts: it finds them batched.
    let stored = work_messages(&h.js, "wb").await;
    assert!(stored.len() < 20 && stored.iter().any(|(batched, _)| *batched), "batched: {}", stored.len());
    h.spawn_worker_process("wb", 1).await;

    let outcomes = h.js.get_stream(subj::OUTCOMES_STREAM).await.unwrap();
    for (i, inputs) in inputs.iter().enumerate() {
        let subject = subj::outcome(&format!("b{i:02}"), "wb");
        let stored =
            sundara_testkit::wait::until(format_args!("the outcome of b{i:02}"), Duration::from_secs(60), || {
                let (outcomes, subject) = (outcomes.clone(), subject.clone());
                async move { outcomes.direct_get_last_for_subject(subject).await.map_err(|e| e.to_string()) }
            })
            .await;
        let outcome: Outcome = decode(&stored.payload, MAX_MESSAGE_BYTES).unwrap();
        let OutcomeResult::Ok { outputs } = outcome.result else { panic!("b{i:02}: {:?}", outcome.result) };
        let expected = sundara_testkit::reference(&meta, inputs);
        assert_eq!(outputs.len(), expected.len(), "b{i:02}");
    }
    sundara_testkit::wait::until_true("the batch to be acked", Duration::from_secs(30), || async {
        let Ok(mut work) = h.js.get_stream(subj::WORK_STREAM).await else { return false };
        work.info().await.is_ok_and(|i| i.state.messages == 0)
    })
    .await;
    h.stop().await;
}
