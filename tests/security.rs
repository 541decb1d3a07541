//! Least privilege and tenant limits, on a real nats-server with the users and permissions
//! `sundara auth init` generates: every role connects with its own NKey and is shown what
//! the server refuses; the whole pipeline still runs under those permissions.

use sundara_testkit as support;

use std::path::Path;
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use sundara::auth::{AuthDir, Role, Service};
use sundara::client::Client;
use sundara::stack::{LocalStack, project_root};
use sundara_common::admission::{TenantLimits, TenantPolicy};
use sundara_common::nats::{NatsEndpoint, inbox_prefix};
use sundara_jobs::client::{JobOptions, JobsClient};
use sundara_schemas::{
    FleetReply, FleetRequest, FleetUpdate, MAX_MESSAGE_BYTES, RejectCode, ResultStatus, SubmitOutcome, WIRE_VERSION,
    WorkerAnnounce, decode, encode,
};
use support::{Harness, RULE, await_results, wait};
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

async fn connect_as(url: &str, ca: &Path, auth: &AuthDir, role: &Role) -> Watched {
    let (tx, violations) = mpsc::unbounded_channel();
    let client = ConnectOptions::with_nkey(seed_of(&auth.credentials(role)))
        .require_tls(true)
        .add_root_certificates(ca.to_path_buf())
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

    /// Sends `payload` to `subject` as a request (a reply inbox of its own, so the server
    /// would act on it if allowed) and waits for the server's refusal.
    async fn request_refused(&mut self, subject: &str, payload: String) {
        let inbox = self.client.new_inbox();
        self.client.publish_with_reply(subject.to_string(), inbox, payload.into()).await.unwrap();
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
    let (tls, ca) = (stack.endpoints().nats.tls, stack.pki.ca());
    let policy = sundara_schemas::Policy { redundancy: 2, rule: RULE, audit_rate: 0.0 };
    // Each service connects as its own user: the pipeline runs under least privilege.
    let services_as_themselves = |c: &mut sundara::pipeline::PipelineConfig| c.credentials_dir = Some(auth.dir.clone());
    let mut h = Harness::start_on(stack, vec![], policy, Duration::from_secs(10), services_as_themselves).await;
    for miner in ["m1", "m2"] {
        let seed = auth.credentials(&Role::Miner(miner.into()));
        h.spawn_worker_process_with(miner, 1, &[("SUNDARA_NATS_CREDS", seed.to_str().unwrap())]).await;
    }

    // Tenant `a`, with its own credentials, is served end to end.
    let endpoint = NatsEndpoint {
        url: url.clone(),
        credentials: Some(auth.credentials(&Role::Tenant("a".into()))),
        tls: tls.clone(),
        hotkey: None,
    };
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

    // Tenant `a`'s batch job runs end to end, the jobs service acting as its own user.
    let a_jobs = JobsClient::new(sundara_common::nats::connect(&endpoint, "a-jobs").await.unwrap(), "a");
    let rows = sundara::models::sample_inputs(&h.models["mlp"].inputs, 300, &mut rand::rng());
    let job = a_jobs.submit(rows, &JobOptions::new("mlp", 100)).await.unwrap();
    let (done, _, outputs) = a_jobs.results(&job.job_id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!((done.verified, outputs[0].shape[0]), (3, 300));

    // No credentials, no connection.
    let anonymous =
        sundara_common::nats::connect(&NatsEndpoint::open(url.clone()).with_tls(tls.clone()), "anonymous").await;
    assert!(anonymous.is_err(), "an anonymous client was let in");

    // Tenant `a` can neither act as `b`, nor read `b`'s results, nor go around ingress.
    let mut a = connect_as(&url, &ca, &auth, &Role::Tenant("a".into())).await;
    for subject in [
        "sundara.submit.b",
        "$JS.API.CONSUMER.CREATE.RESULTS.peek.sundara.result.b.>",
        "$JS.API.CONSUMER.CREATE.RESULTS",
        "$JS.API.CONSUMER.LIST.RESULTS",
        "$JS.API.STREAM.INFO.RESULTS",
        "sundara.task.normal.mlp",
        "sundara.outcome.t1.m1",
        "$JS.API.STREAM.DELETE.TASKS",
        // Nor ask of `b`'s jobs, nor reach the jobs' records and data around the service.
        "sundara.jobs.b.show",
        "$KV.jobs.b.j1",
        "$JS.API.DIRECT.GET.KV_jobs.$KV.jobs.b.j1",
        "$JS.API.STREAM.INFO.OBJ_job-data",
        "$O.job-data.C.x",
    ] {
        a.publish_refused(subject).await;
    }
    a.subscribe_refused("sundara.result.>").await;
    a.subscribe_refused("sundara.jobevent.b.>").await;
    a.subscribe_refused(&format!("{}.>", inbox_prefix(&auth.users[&Role::Validator]))).await;

    // Miner `m1` can read only its own work and speak only as itself.
    let mut m1 = connect_as(&url, &ca, &auth, &Role::Miner("m1".into())).await;
    for subject in ["sundara.work.*.m2", "sundara.control.m2", "_INBOX.>"] {
        m1.subscribe_refused(subject).await;
    }
    for subject in [
        "$JS.API.CONSUMER.CREATE.WORK.worker-m2.sundara.work.*.m2",
        "$JS.API.CONSUMER.MSG.NEXT.WORK.worker-m2",
        "sundara.outcome.t1.m2",
        "sundara.report.m2",
        "sundara.result.a.t1",
        "sundara.verdict.t1",
        "sundara.submit.a",
        "$JS.API.STREAM.PURGE.WORK",
    ] {
        m1.publish_refused(subject).await;
    }

    // Each validator service publishes only what it produces and changes no stream: a
    // compromised ingress cannot forge an assignment or a verdict, nor a rewarder a result.
    let never_any_service = ["$JS.API.STREAM.DELETE.TASKS", "$JS.API.STREAM.UPDATE.OUTCOMES", "sundara.submit.a"];
    let refusals = [
        (
            Service::Ingress,
            &["sundara.work.mlp.m1", "sundara.verdict.t1", "sundara.result.a.t1", "$KV.validator.x"][..],
        ),
        (Service::Scheduler, &["sundara.reward.epoch", "$JS.API.STREAM.PURGE.WORK", "$KV.models.mlp"][..]),
        (Service::Verifier, &["sundara.work.mlp.m1", "sundara.task.normal.mlp", "sundara.reward.t1"][..]),
        (Service::Rewarder, &["sundara.result.a.t1", "sundara.verdict.t1", "$KV.validator.x"][..]),
        (
            Service::Autoscaler,
            &["sundara.work.mlp.m1", "sundara.result.a.t1", "$JS.API.CONSUMER.DELETE.VERDICTS.rewarder"][..],
        ),
    ];
    for (service, own_refusals) in refusals {
        let mut user = connect_as(&url, &ca, &auth, &Role::Service(service)).await;
        for subject in never_any_service.iter().chain(own_refusals) {
            user.publish_refused(subject).await;
        }
    }
    // The jobs service submits as any tenant, and nothing else of the pipeline's.
    let mut jobs = connect_as(&url, &ca, &auth, &Role::Service(Service::Jobs)).await;
    for subject in ["sundara.work.mlp.m1", "sundara.result.a.t1", "sundara.verdict.t1", "$KV.validator.x"] {
        jobs.publish_refused(subject).await;
    }
    let mut pool = connect_as(&url, &ca, &auth, &Role::Pool).await;
    for subject in ["sundara.result.a.t1", "sundara.verdict.t1", "sundara.task.normal.mlp", "$JS.API.STREAM.PURGE.WORK"]
    {
        pool.publish_refused(subject).await;
    }

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

/// A tenant is an adversary to the other tenants and to the services. Tenant `a` tries to
/// re-filter, pull from, read and delete ingress's RESULTS consumer (which releases every
/// tenant's admissions) and the consumer tenant `b` follows its results with. The server
/// refuses each request, both consumers are left as they were, and the pipeline keeps
/// serving `b` (and `a`, through its own consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_cannot_touch_another_tenants_or_a_services_consumers() {
    use futures::TryStreamExt;
    let creds = tempfile::tempdir().unwrap();
    let auth = sundara::auth::init(creds.path(), &["a".into(), "b".into()], &["m1".into()]).unwrap();
    let stack = secured_stack(&auth);
    let url = stack.endpoints().nats.url;
    let (tls, ca) = (stack.endpoints().nats.tls, stack.pki.ca());
    let policy = sundara_schemas::Policy { redundancy: 1, rule: RULE, audit_rate: 0.0 };
    let mut h = Harness::start_on(stack, vec![], policy, Duration::from_secs(10), |_| {}).await;
    let seed = auth.credentials(&Role::Miner("m1".into()));
    h.spawn_worker_process_with("m1", 1, &[("SUNDARA_NATS_CREDS", seed.to_str().unwrap())]).await;

    let endpoint = |t: &str| NatsEndpoint {
        url: url.clone(),
        credentials: Some(auth.credentials(&Role::Tenant(t.into()))),
        tls: tls.clone(),
        hotkey: None,
    };
    let tenant_b = Client::connect(&endpoint("b"), "b").await.unwrap();
    let mut b_results = tenant_b.results().await.unwrap();
    let tenant_a = Client::connect(&endpoint("a"), "a").await.unwrap();
    let mut a_results = tenant_a.results().await.unwrap();

    // The victims, as the validator sees them.
    let stream = h.js.get_stream(sundara_schemas::subjects::RESULTS_STREAM).await.unwrap();
    let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    let b_consumer = names.iter().find(|n| n.starts_with("results-b-")).expect("b's consumer").clone();
    let victims = ["ingress-finish".to_string(), b_consumer];
    let mut before = Vec::new();
    for victim in &victims {
        before.push(stream.consumer_info(victim).await.unwrap().config.clone());
    }

    let mut a = connect_as(&url, &ca, &auth, &Role::Tenant("a".into())).await;
    for (victim, config) in victims.iter().zip(&before) {
        // A create request naming an existing consumer updates it (nats-server 2.10+):
        // the same consumer, filtered to `a`'s results, would starve its owner.
        let mut refiltered = config.clone();
        refiltered.filter_subject = "sundara.result.a.>".into();
        let update = serde_json::json!({ "stream_name": "RESULTS", "config": refiltered, "action": "" });
        a.request_refused(&format!("$JS.API.CONSUMER.CREATE.RESULTS.{victim}.sundara.result.a.>"), update.to_string())
            .await;
        a.request_refused(&format!("$JS.API.CONSUMER.MSG.NEXT.RESULTS.{victim}"), r#"{"batch":10}"#.into()).await;
        a.request_refused(&format!("$JS.API.CONSUMER.INFO.RESULTS.{victim}"), String::new()).await;
        a.request_refused(&format!("$JS.API.CONSUMER.DELETE.RESULTS.{victim}"), String::new()).await;
        a.request_refused(&format!("$JS.API.CONSUMER.DURABLE.CREATE.RESULTS.{victim}"), update.to_string()).await;
    }
    for (victim, config) in victims.iter().zip(&before) {
        let now = stream.consumer_info(victim).await.unwrap_or_else(|e| panic!("{victim} is gone: {e}"));
        assert_eq!(&now.config, config, "{victim} was changed");
    }

    // The pipeline keeps serving `b`, and `a` through its own consumer.
    let requests = h.sample_requests(3, "victim", 11, |_| "mlp");
    let mut b_ids = Vec::new();
    for r in &requests[..2] {
        match tenant_b.submit(r).await.unwrap() {
            SubmitOutcome::Accepted { task_id, .. } => b_ids.push(task_id),
            rejected => panic!("{rejected:?}"),
        }
    }
    let a_id = match tenant_a.submit(&requests[2]).await.unwrap() {
        SubmitOutcome::Accepted { task_id, .. } => task_id,
        rejected => panic!("{rejected:?}"),
    };
    let got = await_results(&mut b_results, &b_ids).await;
    assert!(got.values().all(|r| matches!(r.status, ResultStatus::Verified { .. })), "{got:?}");
    await_results(&mut a_results, &[a_id]).await;
    h.stop().await;
}

/// A tenant's result followers hold its RESULTS consumers by slot (the names its grants
/// list). A follower that loses its consumer (deleted, or lost with a restarted server)
/// carries on after the last result it delivered: nothing again, nothing missed. A dropped
/// follower frees its slot, and a tenant has at most `RESULT_FOLLOWERS` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn result_followers_resume_and_hold_their_tenants_slots() {
    use futures::{StreamExt, TryStreamExt};
    use sundara::client::RESULT_FOLLOWERS;
    let h = Harness::start(vec![support::honest("w", 1)], 1, Duration::from_secs(10)).await;
    let requests = h.sample_requests(4, "follow", 13, |_| "mlp");
    let mut first = h.client.results().await.unwrap();
    let early = h.submit_all(&requests[..2]).await;
    await_results(&mut first, &early).await;
    // Started after those results were stored: it never sees them.
    let mut second = h.client.results().await.unwrap();

    let stream = h.js.get_stream(sundara_schemas::subjects::RESULTS_STREAM).await.unwrap();
    let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    let ours: Vec<&String> = names.iter().filter(|n| n.starts_with("results-test-")).collect();
    assert_eq!(ours.len(), 2, "one consumer per follower: {names:?}");
    for name in ours {
        stream.delete_consumer(name).await.unwrap();
    }
    let late = h.submit_all(&requests[2..]).await;
    for follower in [&mut first, &mut second] {
        let got = await_results(follower, &late).await;
        let mut ids: Vec<&String> = got.keys().collect();
        ids.sort();
        let mut want: Vec<&String> = late.iter().collect();
        want.sort();
        assert_eq!(ids, want, "a follower delivered a result it had delivered or should never see");
        assert!(tokio::time::timeout(Duration::from_millis(500), follower.next()).await.is_err(), "an extra result");
    }

    // Dropped followers give their slots back; then every slot is taken, and another
    // tenant is not affected.
    drop((first, second));
    let mut all = Vec::new();
    while all.len() < RESULT_FOLLOWERS {
        let follower = wait::until("a dropped follower's slot", Duration::from_secs(10), || async {
            h.client.results().await.map_err(|e| e.to_string())
        });
        all.push(follower.await);
    }
    match h.client.results().await {
        Ok(_) => panic!("a follower beyond RESULT_FOLLOWERS"),
        Err(e) => assert!(e.to_string().contains("at once"), "{e}"),
    }
    assert!(Client::new(h.client.nats.clone(), "other").results().await.is_ok(), "tenants share no slots");
    all.pop();
    wait::until("a dropped follower to free its slot", Duration::from_secs(10), || async {
        h.client.results().await.map(drop).map_err(|e| e.to_string())
    })
    .await;
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
    wait::until("finished tasks to free their slots", Duration::from_secs(10), || async {
        match code(busy.submit(&requests[3]).await.unwrap()) {
            Ok(_) => Ok(()),
            Err(code @ (RejectCode::TooManyInFlight | RejectCode::Overloaded)) => Err(code),
            other => panic!("refused for another reason: {other:?}"),
        }
    })
    .await;
    h.stop().await;
}

/// Priority is an entitlement per tenant, not whatever a request asks: a tenant not granted
/// `high` that asks for it is refused at once with `priority_not_permitted`, and nothing is
/// stored; a tenant granted `high` is served at high priority; asking for less than one's
/// entitlement is always allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn priority_above_the_entitlement_is_refused() {
    use sundara_schemas::{Priority, subjects as subj};
    let mut policy = TenantPolicy::default();
    policy.tenants.insert("vip".into(), limits(|l| l.max_priority = Priority::High));
    let stack = LocalStack::start(&project_root()).unwrap();
    let model_policy = sundara_schemas::Policy { redundancy: 1, rule: RULE, audit_rate: 0.0 };
    let h = Harness::start_on(stack, vec![support::honest("w", 1)], model_policy, Duration::from_secs(10), |c| {
        c.tenants = policy;
    })
    .await;
    let client = |tenant: &str| Client::new(h.client.nats.clone(), tenant);
    let high =
        |r: &sundara_schemas::SubmitRequest| sundara_schemas::SubmitRequest { priority: Priority::High, ..r.clone() };
    let requests = h.sample_requests(3, "entitled", 17, |_| "mlp");
    let tasks = h.js.get_stream(subj::TASKS_STREAM).await.unwrap();
    let high_subject = subj::task(Priority::High, "mlp");

    let plain = client("plain");
    match plain.submit(&high(&requests[0])).await.unwrap() {
        SubmitOutcome::Rejected { code, reason } => {
            assert_eq!(code, RejectCode::PriorityNotPermitted);
            assert!(reason.contains("normal"), "{reason}");
        }
        accepted => panic!("a tenant without the entitlement got high priority: {accepted:?}"),
    }
    assert!(tasks.get_last_raw_message_by_subject(&high_subject).await.is_err(), "the refused task was stored");
    assert_eq!(code(plain.submit(&requests[1]).await.unwrap()), Ok(false), "normal is within the default entitlement");

    let vip = client("vip");
    let mut vip_results = vip.results().await.unwrap();
    let id = match vip.submit(&high(&requests[2])).await.unwrap() {
        SubmitOutcome::Accepted { task_id, .. } => task_id,
        rejected => panic!("a tenant entitled to high was refused: {rejected:?}"),
    };
    let stored = tasks.get_last_raw_message_by_subject(&high_subject).await.expect("stored at high priority");
    let task: sundara_schemas::Task = decode(&stored.payload, MAX_MESSAGE_BYTES).unwrap();
    assert_eq!((task.task_id.as_str(), task.tenant.as_str(), task.priority), (id.as_str(), "vip", Priority::High));
    let got = await_results(&mut vip_results, std::slice::from_ref(&id)).await;
    assert!(matches!(got[&id].status, ResultStatus::Verified { .. }), "{:?}", got[&id].status);
    h.stop().await;
}

/// The embedded Redis lets in only its user with its password: a client without them (or
/// with a wrong password) gets no command through; the stack's own URL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refuses_a_client_without_the_stacks_password() {
    let stack = LocalStack::start(&project_root()).unwrap();
    let port = stack.redis.port;
    let ping = |url: String| async move {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut con).await
    };
    let anonymous = ping(format!("redis://127.0.0.1:{port}/")).await;
    assert!(anonymous.is_err(), "a client without credentials got in: {anonymous:?}");
    let guessed = ping(format!("redis://{}:wrong@127.0.0.1:{port}/", sundara::stack::REDIS_USER)).await;
    assert!(guessed.is_err(), "a wrong password got in: {guessed:?}");
    assert_eq!(ping(stack.endpoints().redis_url).await.unwrap(), "PONG");
    assert!(!format!("{:?}", stack.endpoints()).contains(&stack.endpoints().redis_url), "the password is not shown");
}
