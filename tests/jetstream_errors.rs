//! JetStream errors keep their kind (`sundara_common::JetStreamErrorKind`), read from the
//! async-nats error kinds and the server's API error codes of real nats-server answers,
//! never from their text; and callers decide on it: a full TASKS stream is `overloaded`.

use sundara_testkit as support;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use sundara::stack::{LocalStack, project_root};
use sundara_common::{Error, JetStreamErrorKind as Kind, js_err, nats};
use sundara_schemas::{RejectCode, SubmitOutcome, subjects as subj};
use support::{Harness, RULE};

fn kind(e: &Error) -> Kind {
    match e {
        Error::JetStream(e) => e.kind(),
        other => panic!("not a JetStream error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_errors_keep_the_kind_the_server_answered() {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let js = jetstream::new(nats::connect(&stack.endpoints().nats, "test").await.unwrap());

    // A stream at its limit with DiscardPolicy::New: "maximum messages exceeded" (10077).
    let config = stream::Config {
        name: "FULL".into(),
        subjects: vec!["full.>".into()],
        max_messages: 1,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    js.create_stream(config).await.unwrap();
    nats::publish_durable(&js, "full.a".into(), "1", b"one".to_vec()).await.unwrap();
    let full = nats::publish_durable(&js, "full.b".into(), "2", b"two".to_vec()).await.unwrap_err();
    assert_eq!(kind(&full), Kind::StreamFull, "{full}");
    assert!(full.to_string().contains("maximum messages exceeded"), "the server's words are kept: {full}");
    assert!(std::error::Error::source(&full).is_some(), "the async-nats error is kept as the source");

    // A subject that must be empty (`Nats-Expected-Last-Subject-Sequence: 0`) but is not.
    let config = stream::Config {
        name: "ONCE".into(),
        subjects: vec!["once.>".into()],
        allow_direct: true,
        ..Default::default()
    };
    js.create_stream(config).await.unwrap();
    assert!(nats::publish_once(&js, "once.a".into(), "a", b"first".to_vec()).await.unwrap());
    assert!(!nats::publish_once(&js, "once.a".into(), "b", b"second".to_vec()).await.unwrap(), "held already");
    let msg = nats::durable_message("c", b"third".to_vec()).expected_last_subject_sequence(0);
    let wrong = async { js.send_publish("once.a", msg).await?.await }.await.map_err(js_err).unwrap_err();
    assert_eq!(kind(&wrong), Kind::WrongLastSequence, "{wrong}");

    // What is not there, and what is there already.
    let missing = js.get_stream("NOSUCH").await.map_err(js_err).unwrap_err();
    assert_eq!(kind(&missing), Kind::NotFound, "{missing}");
    let once = js.get_stream("ONCE").await.unwrap();
    let no_message = once.direct_get_last_for_subject("once.none").await.map_err(js_err).unwrap_err();
    assert_eq!(kind(&no_message), Kind::NotFound, "{no_message}");
    let undirected = js.get_stream("FULL").await.unwrap().direct_get_last_for_subject("full.a").await;
    assert_eq!(kind(&undirected.map_err(js_err).unwrap_err()), Kind::NoResponders, "FULL has no allow_direct");
    let no_consumer = once.get_consumer::<jetstream::consumer::pull::Config>("nobody").await.map_err(js_err);
    assert_eq!(kind(&no_consumer.unwrap_err()), Kind::NotFound);
    let kv = js.create_key_value(jetstream::kv::Config { bucket: "B".into(), ..Default::default() }).await.unwrap();
    kv.create("k", "v".into()).await.unwrap();
    let again = kv.create("k", "w".into()).await.map_err(js_err).unwrap_err();
    assert_eq!(kind(&again), Kind::AlreadyExists, "{again}");

    // A publish no stream takes: nobody answers.
    let nobody = nats::publish_durable(&js, "unstored.x".into(), "x", vec![]).await.unwrap_err();
    assert_eq!(kind(&nobody), Kind::NoResponders, "{nobody}");
}

/// A TASKS stream at its bound refuses new tasks (DiscardPolicy::New); the ingress tells
/// the client `overloaded` (retry later), not `internal`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_tasks_stream_is_overloaded() {
    let policy = sundara_schemas::Policy { redundancy: 1, rule: RULE, audit_rate: 0.0 };
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    // TASKS keeps what it accepted (limits retention), served or not.
    let h = Harness::start_on(stack, vec![support::honest("w", 1)], policy, Duration::from_secs(10), |_| {}).await;
    let requests = h.sample_requests(2, "full", 1, |_| "mlp");
    let accepted = h.client.submit(&requests[0]).await.unwrap();
    assert!(matches!(accepted, SubmitOutcome::Accepted { .. }), "{accepted:?}");
    let mut tasks = h.js.get_stream(subj::TASKS_STREAM).await.unwrap();
    let info = tasks.info().await.unwrap();
    let stored = i64::try_from(info.state.messages).unwrap();
    let full = stream::Config { max_messages: stored, ..info.config.clone() };
    h.js.update_stream(full).await.unwrap();
    match h.client.submit(&requests[1]).await.unwrap() {
        SubmitOutcome::Rejected { code, reason } => {
            assert_eq!(code, RejectCode::Overloaded, "{reason}");
            assert!(reason.contains("maximum messages exceeded"), "{reason}");
        }
        accepted => panic!("a full TASKS stream took a task: {accepted:?}"),
    }
    // Room again before the services stop, as they would stop in service.
    h.js.update_stream(info.config.clone()).await.unwrap();
    h.stop().await;
}
