//! Server-side batch jobs (`sundara jobs`, the jobs service): a job of 10,000 rows put in
//! parts, run across several miners with one falsifying its outputs, one miner SIGKILLed
//! mid-job and the jobs service itself SIGKILLed and restarted mid-job; every row's result
//! present once, in order, equal to the model run directly. Then what one tenant may do to
//! another's jobs (nothing), cancel, deadlines, hostile requests, the command line and the
//! operator's view. Real NATS, Redis and ONNX Runtime; the killed miner and the killed jobs
//! service are `sundara` processes.

use sundara_testkit as support;

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sundara_jobs::client::{JobOptions, JobsClient, JobsClientError};
use sundara_schemas::{
    JobAnswer, JobRefusal, JobReply, JobSpec, JobState, MAX_MESSAGE_BYTES, Policy, Standing, decode, subjects as subj,
};
use support::{Harness, RULE, dishonest, honest, wait};

/// `sundara jobs serve` as a process of this harness' stack.
fn jobs_service(h: &Harness) -> Child {
    let ep = h.stack.endpoints();
    Command::new(support::sundara_binary())
        .args(["jobs", "serve"])
        .env("SUNDARA_NATS_URL", &ep.nats.url)
        .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .spawn()
        .expect("the sundara binary runs")
}

async fn jobs_client(h: &Harness, tenant: &str) -> JobsClient {
    let connection = sundara_common::nats::connect(&h.stack.endpoints().nats, "test-jobs").await.unwrap();
    JobsClient::new(connection, tenant)
}

fn refusal(e: JobsClientError) -> JobRefusal {
    match e {
        JobsClientError::Refused { code, .. } => code,
        other => panic!("not a refusal: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_survives_a_cheater_a_killed_miner_and_a_killed_jobs_service_in_order() {
    let workers = vec![honest("h1", 1), honest("h2", 1), honest("h3", 1), dishonest("liar", 1)];
    let policy = Policy { redundancy: 3, rule: RULE, audit_rate: 0.0 };
    let stack =
        sundara::stack::LocalStack::start(&sundara::stack::project_root()).expect("servers start (run scripts/setup)");
    // The jobs service runs as a process here, so that the test can SIGKILL it.
    let no_jobs_service = |c: &mut sundara::pipeline::PipelineConfig| c.jobs = None;
    let mut h = Harness::start_on(stack, workers, policy, Duration::from_secs(3), no_jobs_service).await;
    let victim = h.spawn_worker_process("victim", 1).await;
    let first_service = h.adopt(jobs_service(&h));

    let meta = h.models["mlp"].clone();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(22);
    let inputs = sundara::models::sample_inputs(&meta.inputs, 10_000, &mut rng);
    let want = support::reference(&meta, &inputs);

    let jobs = jobs_client(&h, "test").await;
    wait::until_true("the jobs service to answer", Duration::from_secs(30), || async { jobs.list().await.is_ok() })
        .await;
    let killer = h.kill_when_holding(victim, "victim", 2);
    // Parts of 20 shards: the job arrives in 5 requests.
    let row_bytes: usize = inputs.iter().map(|t| t.data.len() / 10_000).sum();
    let options = JobOptions { part_bytes: 20 * 100 * row_bytes, ..JobOptions::new("mlp", 100) };
    let started = jobs.submit(inputs, &options).await.unwrap();
    assert_eq!((started.state, started.parts, started.shards, started.rows), (JobState::Running, 5, 100, 10_000));
    let job_id = started.job_id.clone();

    // SIGKILL the jobs service with shards running, start another.
    let status = wait::until("20 shards verified", Duration::from_secs(120), || async {
        match jobs.show(&job_id).await {
            Ok(s) if s.verified >= 20 && s.running > 0 => Ok(s),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(status.verified < 100, "the job ended before the jobs service was killed");
    let pid = h.worker_pid(first_service);
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    h.adopt(jobs_service(&h));

    let mut seen = Vec::new();
    let (done, shards, outputs) =
        jobs.results(&job_id, Duration::from_secs(120), |s| seen.push(s.verified)).await.unwrap();
    assert!(killer.join().unwrap(), "the victim never held 2 assignments at once");
    assert_eq!((done.state, done.verified, done.shards), (JobState::Done, 100, 100));
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "progress went back: {seen:?}");
    assert_eq!(outputs.iter().map(|t| t.shape[0]).collect::<Vec<_>>(), vec![10_000, 10_000]);
    assert!(sundara_verifier::compare::agree(&RULE, &outputs, &want), "some row differs or moved");
    let firsts: Vec<u64> = shards.iter().map(|s| s.first_row).collect();
    assert_eq!(firsts, (0..100).map(|i| i * 100).collect::<Vec<u64>>(), "shards out of order");

    // Each shard's task is distinct; the liar, picked for shards, was outvoted in each; the
    // victim's assignments were reassigned.
    let tasks: HashSet<&str> = shards.iter().map(|s| s.task_id.as_str()).collect();
    assert_eq!(tasks.len(), 100);
    let liar = h.standings("liar", |t| tasks.contains(t)).await;
    assert!(!liar.is_empty(), "the liar ran no shard");
    assert!(liar.iter().all(|s| *s == Standing::Disagreed), "{liar:?}");
    let verdicts = h.all_verdicts().await;
    let mut ours = verdicts.iter().filter(|v| tasks.contains(v.task_id.as_str())).flat_map(|v| &v.miners);
    assert!(ours.any(|m| m.attempt > 0), "the victim's assignments were not reassigned");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_their_tenants_own_end_by_cancel_or_deadline_and_refuse_bad_requests() {
    let stack = sundara::stack::LocalStack::start(&sundara::stack::project_root()).expect("servers start");
    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: 0.0 };
    // 2 MiB of inputs per tenant: 668 rows of mlp.
    let tight = |c: &mut sundara::pipeline::PipelineConfig| c.jobs.as_mut().unwrap().max_tenant_bytes = 2 << 20;
    let h =
        Harness::start_on(stack, vec![honest("h1", 1), honest("h2", 1)], policy, Duration::from_secs(3), tight).await;
    let (a, b) = (jobs_client(&h, "a").await, jobs_client(&h, "b").await);
    let spec = |parts: u32, deadline_ms: u64| JobSpec {
        model: "mlp".into(),
        parts,
        shard_rows: 100,
        in_flight: 1,
        attempts: 2,
        shard_timeout_ms: 30_000,
        deadline_ms,
    };
    let meta = h.models["mlp"].clone();
    let rows = |n: u64| sundara::models::sample_inputs(&meta.inputs, n, &mut rand::rng());

    // A job that never gets all its parts expires at its deadline.
    let stale = a.create(spec(2, 1_500)).await.unwrap();
    a.put(&stale.job_id, 0, rows(10)).await.unwrap();
    let expired = wait::until("the stale job to expire", Duration::from_secs(20), || async {
        match a.show(&stale.job_id).await {
            Ok(s) if s.state == JobState::Expired => Ok(s),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(expired.reason.unwrap().contains("deadline passed"));
    assert_eq!(refusal(a.put(&stale.job_id, 1, rows(10)).await.unwrap_err()), JobRefusal::WrongState);

    // A cancelled job submits nothing more; its unverified shards cannot be fetched; its
    // inputs are deleted. The job runs the version it was created with.
    let long = a.submit(rows(500), &JobOptions { in_flight: 1, ..JobOptions::new("mlp", 25) }).await.unwrap();
    assert_eq!(long.model, "mlp@1", "pinned");
    let cancelled = a.cancel(&long.job_id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(refusal(a.fetch(&long.job_id, 19).await.unwrap_err()), JobRefusal::WrongState);
    let data = h.js.get_object_store(subj::JOB_DATA).await.unwrap();
    let input = format!("a/{}/in/0", long.job_id);
    wait::until_true("the cancelled job's inputs to be deleted", Duration::from_secs(10), || async {
        data.get(input.as_str()).await.is_err()
    })
    .await;
    assert_eq!(refusal(a.cancel(&long.job_id).await.unwrap_err()), JobRefusal::WrongState);
    let followed = a.follow(&long.job_id, Duration::from_secs(10), |_| {}, |_| std::future::ready(())).await;
    assert!(matches!(followed, Err(JobsClientError::Ended { state: JobState::Cancelled, .. })), "{followed:?}");

    // Tenant `b` finds none of `a`'s jobs, whatever it asks.
    for id in [&stale.job_id, &long.job_id] {
        assert_eq!(refusal(b.show(id).await.unwrap_err()), JobRefusal::NotFound);
        assert_eq!(refusal(b.cancel(id).await.unwrap_err()), JobRefusal::NotFound);
        assert_eq!(refusal(b.fetch(id, 0).await.unwrap_err()), JobRefusal::NotFound);
        assert_eq!(refusal(b.put(id, 1, rows(1)).await.unwrap_err()), JobRefusal::NotFound);
    }
    assert!(b.list().await.unwrap().is_empty());
    assert_eq!(a.list().await.unwrap().len(), 2);

    // Bad requests get typed refusals at once, and the service keeps serving.
    let unknown = JobSpec { model: "no-such-model".into(), ..spec(1, 60_000) };
    assert_eq!(refusal(a.create(unknown).await.unwrap_err()), JobRefusal::UnknownModel);
    assert_eq!(refusal(a.create(spec(1_000_000, 60_000)).await.unwrap_err()), JobRefusal::TooLarge);
    let open = a.create(spec(2, 60_000)).await.unwrap();
    assert_eq!(refusal(a.put(&open.job_id, 3, rows(1)).await.unwrap_err()), JobRefusal::BadRequest);
    assert_eq!(refusal(a.start(&open.job_id).await.unwrap_err()), JobRefusal::WrongState);
    // A part no shard of could run is refused at once, as ingress would refuse its tasks.
    let wrong = vec![sundara_schemas::Tensor::from_values("x", vec![1, 3], &[1f32, 2., 3.])];
    match a.put(&open.job_id, 0, wrong).await.unwrap_err() {
        JobsClientError::Refused { code: JobRefusal::BadRequest, reason } => {
            assert!(reason.contains("wrong_shape"), "{reason}")
        }
        other => panic!("{other}"),
    }
    // The tenant's unfinished jobs hold 2 MiB of inputs at most.
    a.put(&open.job_id, 0, rows(400)).await.unwrap();
    match a.put(&open.job_id, 1, rows(400)).await.unwrap_err() {
        JobsClientError::Refused { code: JobRefusal::TooLarge, reason } => {
            assert!(reason.contains("its limit"), "{reason}")
        }
        other => panic!("{other}"),
    }
    // Cancelling it frees its bytes for the next job.
    a.cancel(&open.job_id).await.unwrap();
    assert_eq!(refusal(a.show("../../etc").await.unwrap_err()), JobRefusal::NotFound);
    let nats = sundara_common::nats::connect(&h.stack.endpoints().nats, "hostile").await.unwrap();
    for garbage in [&b"\x00\xff garbage"[..], &[0x91; 4096][..]] {
        let reply = nats.request(subj::jobs("a", "create"), garbage.to_vec().into()).await.unwrap();
        let reply: JobReply = decode(&reply.payload, MAX_MESSAGE_BYTES).unwrap();
        assert!(matches!(reply.answer, JobAnswer::Refused { code: JobRefusal::BadRequest, .. }), "{reply:?}");
    }

    // From the command line: submit and follow to the end, list, the operator's view.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("outputs.json");
    let submit = ["jobs", "submit", "--model", "mlp", "--rows", "500", "--tenant", "a", "--wait", "--out"];
    let printed = h.run_cli(submit.iter().copied().chain([out.to_str().unwrap()]));
    assert!(printed.contains("done: 5 shards verified"), "{printed}");
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(written["outputs"][0]["shape"], serde_json::json!([500, 10]));
    let listed = h.run_cli(["jobs", "list", "--tenant", "a"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(listed.lines().next().unwrap().contains(" done "), "newest first: {listed}");
    let view = sundara::server_jobs::status_lines(&h.js, 10).await.unwrap();
    assert!(view[0].starts_with("jobs: 0 running, 0 uploading, 4 kept"), "{view:?}");
    assert!(view.iter().any(|l| l.contains(" a ") && l.contains("cancelled")), "{view:?}");
    h.stop().await;
}
