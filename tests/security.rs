//! Least privilege and tenant limits, on a real nats-server with the users and permissions
//! `sundara auth init` generates: every role connects with its own NKey and is shown what
//! the server refuses; the whole pipeline still runs under those permissions.

mod support;

use std::path::Path;
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use sundara::auth::{AuthDir, Role};
use sundara::client::Client;
use sundara::stack::{LocalStack, project_root};
use sundara_common::admission::{TenantLimits, TenantPolicy};
use sundara_common::nats::{NatsEndpoint, inbox_prefix};
use sundara_schemas::{
    FleetReply, FleetRequest, FleetUpdate, MAX_MESSAGE_BYTES, RejectCode, ResultStatus, SubmitOutcome, WIRE_VERSION,
    WorkerAnnounce, decode, encode,
};
use support::{Harness, RULE, await_results};
use tokio::sync::mpsc;

/// A connection as one user, with the server's permission errors for it.
struct Watched {
    client: async_nats::Client,
    violations: mpsc::UnboundedReceiver<String>,
}

fn seed_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().find(|l| l.starts_with("SU")).expect("a seed").to_string()
}

async fn connect_as(url: &str, auth: &AuthDir, role: &Role) -> Watched {
    let (tx, violations) = mpsc::unbounded_channel();
    let client = ConnectOptions::with_nkey(seed_of(&auth.credentials(role)))
        .custom_inbox_prefix(inbox_prefix(&auth.users[role]))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(url)
        .await
        .unwrap();
    Watched { client, violations }
}

impl Watched {
    /// Waits (bounded) for the server's permissions violation naming `subject`.
    async fn refused(&mut self, what: &str, subject: &str) {
        let wanted = format!("{what} to \"{subject}\"");
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(e) = self.violations.recv().await {
                if e.to_lowercase().contains("permissions violation") && e.contains(&wanted) {
                    return;
                }
            }
        })
        .await;
        assert!(found.is_ok(), "the server did not refuse {wanted}");
    }

    async fn publish_refused(&mut self, subject: &str) {
        self.client.publish(subject.to_string(), "x".into()).await.unwrap();
        self.client.flush().await.unwrap();
        self.refused("Publish", subject).await;
    }

    async fn subscribe_refused(&mut self, subject: &str) {
        let _subscription = self.client.subscribe(subject.to_string()).await.unwrap();
        self.client.flush().await.unwrap();
        self.refused("Subscription", subject).await;
    }
}

fn secured_stack(auth: &AuthDir) -> LocalStack {
    LocalStack::start_secured(&project_root(), auth).expect("servers start (run scripts/setup)")
}

/// The pipeline serves tenant `a` with miners `m1` and `m2` (separate processes, each with
/// its own credentials); then each role tries what is not its own and is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_role_is_refused_what_is_not_its_own() {
    let creds = tempfile::tempdir().unwrap();
    let auth = sundara::auth::init(creds.path(), &["a".into(), "b".into()], &["m1".into(), "m2".into()]).unwrap();
    let stack = secured_stack(&auth);
    let url = stack.endpoints().nats.url;
    let policy = sundara_schemas::Policy { redundancy: 2, rule: RULE, audit_rate: 0.0 };
    let mut h = Harness::start_on(stack, vec![], policy, Duration::from_secs(10), |_| {}).await;
    for miner in ["m1", "m2"] {
        let seed = auth.credentials(&Role::Miner(miner.into()));
        h.spawn_worker_process_with(miner, 1, &[("SUNDARA_NATS_CREDS", seed.to_str().unwrap())]).await;
    }

    // Tenant `a`, with its own credentials, is served end to end.
    let endpoint = NatsEndpoint { url: url.clone(), credentials: Some(auth.credentials(&Role::Tenant("a".into()))) };
    let tenant_a = Client::connect(&endpoint, "a").await.unwrap();
    let mut results = tenant_a.results().await.unwrap();
    let requests = h.sample_requests(4, "secure", 3, |_| "mlp");
    let mut ids = Vec::new();
    for r in &requests {
        match tenant_a.submit(r).await.unwrap() {
            SubmitOutcome::Accepted { task_id, .. } => ids.push(task_id),
            rejected => panic!("{rejected:?}"),
        }
    }
    let got = await_results(&mut results, &ids).await;
    for id in &ids {
        assert!(matches!(got[id].status, ResultStatus::Verified { agreeing: 2, k: 2, .. }), "{:?}", got[id].status);
    }
    assert_eq!(ids[0], sundara_ingress::task_id("a", requests[0].request_id.as_deref()), "the tenant is `a`");

    // No credentials, no connection.
    let anonymous = sundara_common::nats::connect(&NatsEndpoint::open(url.clone()), "anonymous").await;
    assert!(anonymous.is_err(), "an anonymous client was let in");

    // Tenant `a` can neither act as `b`, nor read `b`'s results, nor go around ingress.
    let mut a = connect_as(&url, &auth, &Role::Tenant("a".into())).await;
    a.publish_refused("sundara.submit.b").await;
    a.publish_refused("$JS.API.CONSUMER.CREATE.RESULTS.peek.sundara.result.b.>").await;
    a.publish_refused("$JS.API.CONSUMER.CREATE.RESULTS").await;
    a.publish_refused("$JS.API.CONSUMER.LIST.RESULTS").await;
    a.publish_refused("$JS.API.STREAM.INFO.RESULTS").await;
    a.publish_refused("sundara.task.normal.mlp").await;
    a.publish_refused("sundara.outcome.t1.m1").await;
    a.publish_refused("$JS.API.STREAM.DELETE.TASKS").await;
    a.subscribe_refused("sundara.result.>").await;
    a.subscribe_refused(&format!("{}.>", inbox_prefix(&auth.users[&Role::Validator]))).await;

    // Miner `m1` can read only its own work and speak only as itself.
    let mut m1 = connect_as(&url, &auth, &Role::Miner("m1".into())).await;
    m1.subscribe_refused("sundara.work.*.m2").await;
    m1.subscribe_refused("sundara.control.m2").await;
    m1.subscribe_refused("_INBOX.>").await;
    m1.publish_refused("$JS.API.CONSUMER.CREATE.WORK.worker-m2.sundara.work.*.m2").await;
    m1.publish_refused("$JS.API.CONSUMER.MSG.NEXT.WORK.worker-m2").await;
    m1.publish_refused("sundara.outcome.t1.m2").await;
    m1.publish_refused("sundara.report.m2").await;
    m1.publish_refused("sundara.result.a.t1").await;
    m1.publish_refused("sundara.verdict.t1").await;
    m1.publish_refused("sundara.submit.a").await;
    m1.publish_refused("$JS.API.STREAM.PURGE.WORK").await;

    // On its own report subject, `m1` still cannot speak for `m2`: the gateway refuses.
    let forged = FleetRequest {
        v: WIRE_VERSION,
        update: FleetUpdate::Announce {
            announce: WorkerAnnounce { worker: "m2".into(), operator: "m2".into(), slices: vec![] },
            fresh: true,
            heartbeat_ttl_ms: 2000,
        },
    };
    let reply = m1.client.request("sundara.report.m1", encode(&forged).into()).await.unwrap();
    let reply: FleetReply = decode(&reply.payload, MAX_MESSAGE_BYTES).unwrap();
    assert!(!reply.ok && reply.reason.contains("m2"), "{reply:?}");
    h.stop().await;
}

fn limits(f: impl FnOnce(&mut TenantLimits)) -> TenantLimits {
    let mut l = TenantLimits::default();
    f(&mut l);
    l
}

fn code(outcome: SubmitOutcome) -> Result<bool, RejectCode> {
    match outcome {
        SubmitOutcome::Accepted { duplicate, .. } => Ok(duplicate),
        SubmitOutcome::Rejected { code, .. } => Err(code),
    }
}

/// Each tenant limit (tasks in flight, rate, payload size) and the fleet's bound on tasks
/// in flight gives its own typed rejection; a retry of an admitted task is not counted
/// twice; finished tasks free their tenant's slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_limits_give_typed_rejections() {
    let mut policy = TenantPolicy::default();
    policy.tenants.insert("busy".into(), limits(|l| l.max_in_flight = 3));
    policy.tenants.insert("fast".into(), limits(|l| (l.rate_per_s, l.burst) = (Some(0.01), 2)));
    policy.tenants.insert("small".into(), limits(|l| l.max_payload_bytes = 200));
    let stack = LocalStack::start(&project_root()).unwrap();
    let model_policy = sundara_schemas::Policy { redundancy: 1, rule: RULE, audit_rate: 0.0 };
    // No workers yet: admitted tasks stay in flight.
    let mut h = Harness::start_on(stack, vec![], model_policy, Duration::from_secs(10), |c| {
        c.tenants = policy;
        c.max_in_flight = 6;
    })
    .await;
    let client = |tenant: &str| Client::new(h.client.nats.clone(), tenant);
    let requests = h.sample_requests(8, "limits", 5, |_| "mlp");

    let busy = client("busy");
    let mut busy_results = busy.results().await.unwrap();
    for r in &requests[..3] {
        assert_eq!(code(busy.submit(r).await.unwrap()), Ok(false));
    }
    assert_eq!(code(busy.submit(&requests[3]).await.unwrap()), Err(RejectCode::TooManyInFlight));
    assert_eq!(code(busy.submit(&requests[0]).await.unwrap()), Ok(true), "a retry is the same task, not a 4th");

    let fast = client("fast");
    assert_eq!(code(fast.submit(&requests[4]).await.unwrap()), Ok(false));
    assert_eq!(code(fast.submit(&requests[5]).await.unwrap()), Ok(false));
    assert_eq!(code(fast.submit(&requests[6]).await.unwrap()), Err(RejectCode::RateLimited), "burst of 2 spent");

    let small = client("small");
    let big = &requests[7];
    assert!(encode(big).len() > 200);
    assert_eq!(code(small.submit(big).await.unwrap()), Err(RejectCode::PayloadTooLarge));

    // Five tasks in flight in the fleet; its bound is six.
    assert_eq!(code(client("other").submit(big).await.unwrap()), Ok(false));
    assert_eq!(code(client("another").submit(&requests[3]).await.unwrap()), Err(RejectCode::Overloaded));

    // A worker finishes `busy`'s tasks; their slots come back.
    h.pipeline.as_mut().unwrap().add_worker(support::honest("w", 1));
    let ids: Vec<String> =
        requests[..3].iter().map(|r| sundara_ingress::task_id("busy", r.request_id.as_deref())).collect();
    await_results(&mut busy_results, &ids).await;
    // Ingress frees them on reading the stored results, just after the client sees them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match code(busy.submit(&requests[3]).await.unwrap()) {
            Ok(_) => break,
            Err(RejectCode::TooManyInFlight | RejectCode::Overloaded) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("finished tasks did not free their slots: {other:?}"),
        }
    }
    h.stop().await;
}
