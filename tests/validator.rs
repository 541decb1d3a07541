//! The validator secret: scheduler and verifier must share `SUNDARA_SECRET`. A service on
//! another secret refuses to start (their key ids differ), and a task whose outcomes are
//! refused all the same (a verifier rotated onto another secret while the scheduler runs on)
//! still ends, with a failed result and a dead letter that says why; once the verifier has
//! the right secret again, the outcomes it held are admitted. A deliberate rotation, with
//! the verifier holding the retiring secret as its previous, drops no task in flight.
//!
//! Real nats-server and redis-server; the services run in this process so that each can
//! be given its own secret.

use sundara_testkit as support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use rand::SeedableRng;
use sundara::client::Client;
use sundara::stack::{LocalStack, project_root};
use sundara_common::validator_key::{self, Claim, SecretError, StoredKey};
use sundara_common::{Capacity, Endpoints, Registry, Shutdown, nats};
use sundara_scheduler::SchedulerError;
use sundara_schemas::{
    ClientResult, DeadLetter, FailureCode, MAX_MESSAGE_BYTES, ModelMeta, Policy, ResultStatus, SubmitOutcome,
    SubmitRequest, decode, subjects as subj,
};
use sundara_verifier::VerifierError;
use tokio::task::JoinHandle;

const SCHEDULERS: &[u8] = b"the-schedulers-secret-0123456789";
const OTHER: &[u8] = b"another-secret-entirely-98765432";

/// Servers with `mlp` registered (k = 1, no audits), and what the services need.
struct Servers {
    stack: LocalStack,
    js: jetstream::Context,
    endpoints: Endpoints,
    model: ModelMeta,
    ort: PathBuf,
    cache: tempfile::TempDir,
}

async fn servers() -> Servers {
    let root = project_root();
    let ort = sundara_runtime::find_library(std::slice::from_ref(&root)).expect("run scripts/setup");
    sundara_runtime::init(&ort).unwrap();
    let stack = LocalStack::start(&root).expect("servers start (run scripts/setup)");
    let endpoints = stack.endpoints();
    let js = jetstream::new(nats::connect(&endpoints.nats, "test").await.unwrap());
    nats::provision(&js, &nats::Retention::default()).await.unwrap();
    let registry = Registry::open(&js).await.unwrap();
    let policy = Policy { redundancy: 1, rule: support::RULE, audit_rate: 0.0 };
    let path = root.join(".cache/models/mlp.onnx");
    let model = sundara::models::push(&registry, &path, "mlp", "1", policy, Default::default())
        .await
        .expect("the demo models exist (run scripts/setup)");
    Servers { stack, js, endpoints, model, ort, cache: tempfile::tempdir().unwrap() }
}

type Running = (Shutdown, JoinHandle<Result<(), String>>);

fn spawn<E: std::fmt::Display + 'static>(
    run: impl FnOnce(Shutdown) -> std::pin::Pin<Box<dyn Future<Output = Result<(), E>> + Send>>,
) -> Running {
    let shutdown = Shutdown::new();
    let fut = run(shutdown.clone());
    (shutdown, tokio::spawn(async move { fut.await.map_err(|e| e.to_string()) }))
}

fn scheduler(s: &Servers, secret: &[u8], claim: Claim) -> sundara_scheduler::Config {
    let mut c = sundara_scheduler::Config::new(s.endpoints.clone(), sundara_common::validator_key::Secret::new(secret));
    c.secret_claim = claim;
    c
}

/// A verifier without a reference runtime that ends tasks 2 s after their deadline.
fn verifier(s: &Servers, secret: &[u8], claim: Claim) -> sundara_verifier::Config {
    verifier_rotating(s, secret, None, claim)
}

/// A verifier that also checks tickets of `previous`, the secret being retired.
fn verifier_rotating(s: &Servers, secret: &[u8], previous: Option<&[u8]>, claim: Claim) -> sundara_verifier::Config {
    let mut c = sundara_verifier::Config::new(s.endpoints.clone(), sundara_common::validator_key::Secret::new(secret));
    c.previous_secret = previous.map(sundara_common::validator_key::Secret::new);
    c.secret_claim = claim;
    c.grace = Duration::from_secs(2);
    c
}

fn run_scheduler(c: sundara_scheduler::Config) -> Running {
    spawn(|s| Box::pin(sundara_scheduler::run(c, s)))
}

fn run_verifier(c: sundara_verifier::Config) -> Running {
    spawn(|s| Box::pin(sundara_verifier::run(c, s)))
}

/// Stops a service; it must stop cleanly within 15 s.
async fn stop((shutdown, handle): Running, name: &str) {
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(15), handle).await;
    let Ok(Ok(result)) = stopped else { panic!("{name} did not stop within 15 s") };
    result.unwrap_or_else(|e| panic!("{name} stopped with an error: {e}"));
}

/// The stack's stored key, once it is `key_id` (a KV watch, bounded by 30 s).
async fn stored_key(js: &jetstream::Context, key_id: &str) -> StoredKey {
    let bucket = js.get_key_value(subj::VALIDATOR_BUCKET).await.unwrap();
    let mut watch = bucket.watch_with_history(subj::SECRET_KEY_ID).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let entry = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("the stack's key id never became {key_id}"))
            .expect("the watch goes on")
            .unwrap();
        let stored: StoredKey = serde_json::from_slice(&entry.value).unwrap();
        if stored.key_id == key_id {
            return stored;
        }
    }
}

/// Waits (bounded) until the verifier's consumer exists: it is created after the secret
/// check, so the verifier started. JetStream announces no such moment; poll briefly.
async fn verifier_consuming(js: &jetstream::Context) {
    let outcomes = js.get_stream(subj::OUTCOMES_STREAM).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outcomes.consumer_info("verifier").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the verifier never started consuming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ingress and worker `w1`, once they serve (with the scheduler and verifier the test runs),
/// and a client of tenant `test`.
async fn start_front(s: &Servers) -> (Running, Running, Client) {
    let ingress = spawn(|sd| Box::pin(sundara_ingress::run(sundara_ingress::Config::new(s.endpoints.clone()), sd)));
    let worker_config =
        sundara_worker::Config::new(s.endpoints.nats.clone(), "w1", s.ort.clone(), s.cache.path().into());
    let worker = spawn(|sd| Box::pin(sundara_worker::run(worker_config, sd)));
    let nats = nats::connect(&s.endpoints.nats, "ready").await.unwrap();
    let capacity = Capacity::connect(&s.endpoints.redis_url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !sundara::pipeline::serving(&nats, &capacity, &["w1"]).await.unwrap() {
        assert!(tokio::time::Instant::now() < deadline, "the services never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ingress, worker, Client::new(nats, "test"))
}

/// Submits one `mlp` task as request `id`; returns its task id.
async fn submit_mlp(client: &Client, s: &Servers, rng: &mut rand::rngs::StdRng, id: &str, timeout_ms: u64) -> String {
    let inputs = sundara::models::sample_inputs(&s.model.inputs, 1, rng);
    let request = SubmitRequest {
        request_id: Some(id.into()),
        timeout_ms: Some(timeout_ms),
        ..SubmitRequest::new("mlp", inputs)
    };
    match client.submit(&request).await.unwrap() {
        SubmitOutcome::Accepted { task_id, .. } => task_id,
        rejected => panic!("{rejected:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_on_another_secret_refuses_to_start() {
    let s = servers().await;
    // Too short a secret is refused before anything else (no server is reached for it).
    let mut short = scheduler(&s, b"test-secret", Claim::Check);
    short.endpoints.nats.url = "nats://127.0.0.1:1".into();
    let refused = sundara_scheduler::run(short, Shutdown::new()).await;
    assert!(
        matches!(refused, Err(SchedulerError::Secret(SecretError::TooShort { len: 11 }))),
        "a short secret: {refused:?}"
    );

    let first = run_scheduler(scheduler(&s, SCHEDULERS, Claim::Check));
    let stored = stored_key(&s.js, &validator_key::key_id(SCHEDULERS)).await;
    assert_eq!(stored.set_by, "scheduler");

    // A verifier on another secret fails at start, loudly, naming both key ids.
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        sundara_verifier::run(verifier(&s, OTHER, Claim::Check), Shutdown::new()),
    )
    .await
    .expect("a mismatched verifier fails at start, not later");
    let Err(VerifierError::Secret(SecretError::Mismatch { ours, stack, set_by, .. })) = &refused else {
        panic!("a verifier on another secret started: {refused:?}");
    };
    assert_eq!((ours.as_str(), stack.as_str()), (validator_key::key_id(OTHER).as_str(), stored.key_id.as_str()));
    assert_eq!(set_by, "scheduler");
    let message = refused.unwrap_err().to_string();
    assert!(
        message.starts_with(&format!(
            "validator secret mismatch: this service's key id {}, the stack's is {} (set by scheduler at",
            validator_key::key_id(OTHER),
            stored.key_id
        )) && message.contains("all of scheduler and verifier must share SUNDARA_SECRET"),
        "{message}"
    );
    assert!(!message.contains(std::str::from_utf8(OTHER).unwrap()), "the message must not reveal the secret");

    // On the same secret it starts.
    let same = run_verifier(verifier(&s, SCHEDULERS, Claim::Check));
    verifier_consuming(&s.js).await;
    stop(same, "verifier").await;

    // A deliberate rotation replaces the stack's key id; a scheduler still on the old
    // secret then refuses to start.
    let rotated = run_verifier(verifier(&s, OTHER, Claim::Rotate));
    let now = stored_key(&s.js, &validator_key::key_id(OTHER)).await;
    assert_eq!(now.set_by, "verifier");
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        sundara_scheduler::run(scheduler(&s, SCHEDULERS, Claim::Check), Shutdown::new()),
    )
    .await
    .expect("a mismatched scheduler fails at start");
    assert!(
        matches!(&refused, Err(SchedulerError::Secret(SecretError::Mismatch { set_by, .. })) if set_by == "verifier"),
        "{refused:?}"
    );
    stop(rotated, "verifier").await;
    stop(first, "scheduler").await;
    drop(s.stack);
}

/// The check bypassed: the verifier was rotated onto another secret while the scheduler
/// runs on with its own. Every outcome is then refused as forged. A task must still end
/// (failed, with a dead letter giving the reason) at its deadline + grace; and the outcomes
/// of a task whose deadline is still ahead are admitted once a verifier with the right
/// secret takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_outcomes_are_refused_still_ends() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let s = servers().await;
    let scheduler = run_scheduler(scheduler(&s, SCHEDULERS, Claim::Check));
    stored_key(&s.js, &validator_key::key_id(SCHEDULERS)).await;
    let wrong = run_verifier(verifier(&s, OTHER, Claim::Rotate));
    let (ingress, worker, client) = start_front(&s).await;
    let mut results = client.results().await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut submit = async |id: &str, timeout_ms: u64| submit_mlp(&client, &s, &mut rng, id, timeout_ms).await;
    let short = submit("short", 3_000).await;
    let long = submit("long", 60_000).await;
    let mut got: HashMap<String, ClientResult> = HashMap::new();
    let mut next_result = async |got: &mut HashMap<String, ClientResult>, within: Duration| {
        let r = tokio::time::timeout(within, results.next()).await.expect("a result in time").unwrap().unwrap();
        got.insert(r.task_id.clone(), r);
    };

    // 3 s deadline + 2 s grace + the verifier's 5 s tick, with room.
    next_result(&mut got, Duration::from_secs(30)).await;
    let ended = got.get(&short).unwrap_or_else(|| panic!("the first result is not the short task's: {got:?}"));
    let ResultStatus::Failed { code: FailureCode::NoConsensus, reason } = &ended.status else {
        panic!("the refused task did not fail: {:?}", ended.status);
    };
    assert!(reason.starts_with("outcomes refused: forged ticket (from w1)"), "{reason}");
    let dead = s.js.get_stream(subj::DEAD_STREAM).await.unwrap();
    let letter = dead.direct_get_last_for_subject(subj::dead(&short)).await.expect("a dead letter");
    let letter: DeadLetter = decode(&letter.payload, MAX_MESSAGE_BYTES).unwrap();
    assert_eq!((letter.reason.as_str(), letter.evidence.len()), (reason.as_str(), 1));
    assert_eq!(letter.evidence[0].ticket.worker, "w1");

    // The long task's outcome is held by the wrong verifier, not dropped.
    let outcomes = s.js.get_stream(subj::OUTCOMES_STREAM).await.unwrap();
    let held = outcomes.consumer_info("verifier").await.unwrap().num_ack_pending;
    assert_eq!(held, 1, "the long task's refused outcome is held");
    // The right secret is back: the held outcome goes back to JetStream at the wrong
    // verifier's shutdown, and the new verifier admits it at once (not after its ack wait).
    stop(wrong, "verifier").await;
    let swapped = tokio::time::Instant::now();
    let right = run_verifier(verifier(&s, SCHEDULERS, Claim::Rotate));
    next_result(&mut got, Duration::from_secs(20)).await;
    let verified = got.get(&long).expect("the long task's result");
    assert!(matches!(verified.status, ResultStatus::Verified { agreeing: 1, k: 1, .. }), "{:?}", verified.status);
    eprintln!("held outcome admitted {:.2} s after the secret was fixed", swapped.elapsed().as_secs_f64());
    assert!(dead.direct_get_last_for_subject(subj::dead(&long)).await.is_err(), "a verified task has no dead letter");

    for (running, name) in [(worker, "worker"), (ingress, "ingress"), (right, "verifier"), (scheduler, "scheduler")] {
        stop(running, name).await;
    }
}

/// A rotation as docs/deployment.md tells it, with tasks in flight: their outcomes, signed
/// under the old secret, wait in OUTCOMES while the verifier moves to the new secret (keeping
/// the old one as its previous) and the scheduler restarts on the new one. Every task is
/// verified, old tickets and new, none refused as forged; a scheduler still on the old
/// secret refuses to start, and tickets of a secret the verifier does not hold are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_rotates_without_dropping_tasks_in_flight() {
    let s = servers().await;
    let old_scheduler = run_scheduler(scheduler(&s, SCHEDULERS, Claim::Check));
    stored_key(&s.js, &validator_key::key_id(SCHEDULERS)).await;
    let old_verifier = run_verifier(verifier(&s, SCHEDULERS, Claim::Check));
    verifier_consuming(&s.js).await;
    let (ingress, worker, client) = start_front(&s).await;
    let mut results = client.results().await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);

    // In flight across the change: outcomes under old tickets, not yet verified.
    stop(old_verifier, "verifier").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit_mlp(&client, &s, &mut rng, &format!("before-{i}"), 60_000).await);
    }
    let outcomes = s.js.get_stream(subj::OUTCOMES_STREAM).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outcomes.get_info().await.unwrap().state.messages < 5 {
        assert!(tokio::time::Instant::now() < deadline, "the worker never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. The verifier takes the new secret and keeps the old one as its previous.
    let new_verifier = run_verifier(verifier_rotating(&s, OTHER, Some(SCHEDULERS), Claim::Rotate));
    stored_key(&s.js, &validator_key::key_id(OTHER)).await;
    // 2. The scheduler restarts on the new secret; one still on the old one cannot start.
    stop(old_scheduler, "scheduler").await;
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        sundara_scheduler::run(scheduler(&s, SCHEDULERS, Claim::Check), Shutdown::new()),
    )
    .await
    .expect("a scheduler on the retired secret fails at start");
    assert!(matches!(&refused, Err(SchedulerError::Secret(SecretError::Mismatch { .. }))), "{refused:?}");
    let new_scheduler = run_scheduler(scheduler(&s, OTHER, Claim::Check));
    for i in 0..5 {
        ids.push(submit_mlp(&client, &s, &mut rng, &format!("after-{i}"), 60_000).await);
    }

    let mut got: HashMap<String, ClientResult> = HashMap::new();
    while got.len() < ids.len() {
        let next = tokio::time::timeout(Duration::from_secs(30), results.next()).await;
        let r = next.expect("every task ends").unwrap().unwrap();
        got.insert(r.task_id.clone(), r);
    }
    for id in &ids {
        assert!(
            matches!(got[id].status, ResultStatus::Verified { agreeing: 1, k: 1, .. }),
            "{id}: {:?}",
            got[id].status
        );
    }
    for (running, name) in
        [(worker, "worker"), (ingress, "ingress"), (new_verifier, "verifier"), (new_scheduler, "scheduler")]
    {
        stop(running, name).await;
    }
}
