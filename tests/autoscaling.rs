//! The autoscaler's local driver for real: worker processes started and stopped as load
//! changes, and a quarantined worker replaced.

use sundara_testkit as support;

use std::time::Duration;

use sundara_autoscaler::plan::ScalePolicy;
use sundara_autoscaler::{DriverConfig, ScalingConfig};
use sundara_common::{Capacity, Shutdown};
use support::{Harness, await_results, wait};

/// An autoscaler whose local driver starts `sundara worker --id auto-<n>` processes.
fn start_autoscaler(h: &Harness, policy: ScalePolicy) -> (Shutdown, tokio::task::JoinHandle<()>) {
    let ep = h.stack.endpoints();
    let driver = DriverConfig::Local {
        binary: env!("CARGO_BIN_EXE_sundara").into(),
        args: vec!["--threads".into(), "1".into(), "--cache-dir".into(), h.cache.path().display().to_string()],
        env: vec![
            ("SUNDARA_NATS_URL".into(), ep.nats.url.clone()),
            ("SUNDARA_REDIS_URL".into(), ep.redis_url.clone()),
            ("ORT_DYLIB_PATH".into(), h.ort_library.display().to_string()),
            ("RUST_LOG".into(), "warn".into()),
        ]
        .into_iter()
        .chain(ep.nats.tls.iter().flat_map(|t| t.env()))
        .collect(),
        prefix: "auto".into(),
    };
    let mut scaling = ScalingConfig::new(driver);
    scaling.policy = policy;
    scaling.interval = Duration::from_millis(500);
    scaling.window = Duration::from_secs(3);
    let mut config = sundara_autoscaler::Config::new(ep);
    config.scaling = Some(scaling);
    let shutdown = Shutdown::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { sundara_autoscaler::run(config, shutdown).await.expect("autoscaler runs") }
    });
    (shutdown, task)
}

/// The pool's workers with a live heartbeat, by id.
async fn live_pool(capacity: &Capacity) -> Vec<String> {
    let pool: Vec<String> = capacity.workers().await.unwrap().into_iter().filter(|w| w.starts_with("auto-")).collect();
    let health = capacity.health(&pool).await.unwrap();
    pool.into_iter()
        .zip(health)
        .filter(|(_, (hb, state))| *hb && state.as_deref() == Some("alive"))
        .map(|(w, _)| w)
        .collect()
}

/// Polls (bounded) until the live pool satisfies `ok`: worker start-up and heartbeats
/// offer no event to wait on here.
async fn pool_until(capacity: &Capacity, within: Duration, what: &str, ok: impl Fn(&[String]) -> bool) -> Vec<String> {
    wait::until(format_args!("{what} (the live pool)"), within, || async {
        let pool = live_pool(capacity).await;
        if ok(&pool) { Ok(pool) } else { Err(pool) }
    })
    .await
}

/// A load step makes the autoscaler add workers within 30 s; when the load stops it sheds
/// them again after its quiet period, and no task is lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_step_adds_workers_and_a_quiet_fleet_sheds_them() {
    let h = Harness::start(vec![], 1, Duration::from_secs(30)).await;
    let policy = ScalePolicy {
        min_workers: 1,
        max_workers: 3,
        lanes_per_worker: 1,
        target_utilisation: 0.5,
        scale_down_after: Duration::from_secs(3),
    };
    let (shutdown, autoscaler) = start_autoscaler(&h, policy);
    pool_until(&h.capacity, Duration::from_secs(30), "the minimum of one worker", |p| p.len() == 1).await;

    // The step: 40 ppocr-cls tasks of 16 images every 100 ms, until the pool has grown
    // (one set of inputs, generated once: making random images is slow in a debug build).
    let mut results = h.client.results().await.unwrap();
    let meta = h.models["ppocr-cls"].clone();
    let client = h.client.clone();
    let stop = Shutdown::new();
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(9);
            let inputs = sundara::models::sample_inputs(&meta.inputs, 16, &mut rng);
            let mut ids = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            // Bounded: 60 s of load at most.
            for _ in 0..600 {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for _ in 0..40 {
                    let r = sundara_schemas::SubmitRequest {
                        timeout_ms: Some(120_000),
                        ..sundara_schemas::SubmitRequest::new("ppocr-cls", inputs.clone())
                    };
                    match client.submit(&r).await.unwrap() {
                        sundara_schemas::SubmitOutcome::Accepted { task_id, .. } => ids.push(task_id),
                        // 16 images make a 1.8 MB task: a slow machine can reach the
                        // tenant's stored-bytes quota before the pool grows. A client
                        // backs off then, and the tasks already queued keep the load up.
                        sundara_schemas::SubmitOutcome::Rejected {
                            code: sundara_schemas::RejectCode::StorageQuota,
                            ..
                        } => break,
                        rejected => panic!("{rejected:?}"),
                    }
                }
            }
            ids
        }
    });
    let grown = pool_until(&h.capacity, Duration::from_secs(30), "more workers under load", |p| p.len() >= 2).await;
    stop.cancel();
    let ids = load.await.unwrap();
    eprintln!("{} tasks submitted; the pool grew to {grown:?}", ids.len());
    let got = await_results(&mut results, &ids).await;
    assert!(got.values().all(|r| matches!(r.status, sundara_schemas::ResultStatus::Verified { .. })));

    // Quiet: one worker at a time goes, down to the minimum.
    pool_until(&h.capacity, Duration::from_secs(60), "back to one worker", |p| p.len() == 1).await;
    shutdown.cancel();
    autoscaler.await.unwrap();
    h.stop().await;
}

/// A quarantined worker of the pool is replaced by a fresh one (well within 60 s), and the
/// quarantined one stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quarantined_worker_is_replaced() {
    let mut h = Harness::start(vec![], 1, Duration::from_secs(30)).await;
    let policy = ScalePolicy { min_workers: 2, max_workers: 2, ..ScalePolicy::default() };
    let (shutdown, autoscaler) = start_autoscaler(&h, policy);
    let pool = pool_until(&h.capacity, Duration::from_secs(30), "two workers", |p| p.len() == 2).await;
    let bad = pool[0].clone();
    h.capacity.quarantine(&bad, "test: quarantined").await.unwrap();
    let started = tokio::time::Instant::now();
    let pool =
        pool_until(&h.capacity, Duration::from_secs(60), "a replacement", |p| p.len() == 2 && !p.contains(&bad)).await;
    eprintln!("{bad} replaced in {:?}: pool {pool:?}", started.elapsed());
    let health = h.capacity.health(std::slice::from_ref(&bad)).await.unwrap();
    assert!(health[0].1.as_deref() != Some("alive"), "the quarantined worker is out: {health:?}");
    // Work goes to the fresh pool only.
    let requests = h.sample_requests(20, "after", 10, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    for v in h.all_verdicts().await {
        assert!(v.miners.iter().all(|m| m.worker != bad), "the quarantined worker got work");
    }
    shutdown.cancel();
    autoscaler.await.unwrap();
    h.stop().await;
}

/// The worker's side of model placement: a preload command loads the model on the slice,
/// and a bad command gets a reason back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_preloads_a_model_on_request() {
    use sundara_schemas::{Control, ControlReply, ControlRequest, WIRE_VERSION, decode, encode, subjects as subj};
    let h = Harness::start(vec![support::honest("w", 1)], 1, Duration::from_secs(30)).await;
    let ask = |command: Control| encode(&ControlRequest { v: WIRE_VERSION, command });
    let send = |payload: Vec<u8>| {
        let nats = h.client.nats.clone();
        async move {
            let reply = nats.request(subj::control("w"), payload.into()).await.unwrap();
            decode::<ControlReply>(&reply.payload, 1 << 16).unwrap()
        }
    };
    let model = h.models["magika"].model_ref();
    let reply = send(ask(Control::Preload { model: model.clone(), slice: "w-cpu0".into() })).await;
    assert!(reply.ok, "{reply:?}");
    let slices = h.capacity.slices_of("w").await.unwrap();
    assert!(slices[0].loaded.iter().any(|(k, _)| k.starts_with("magika@")), "{slices:?}");
    let reply = send(ask(Control::Preload { model, slice: "w-nope".into() })).await;
    assert!(!reply.ok && reply.reason.contains("no slice"), "{reply:?}");
    let reply = send(b"\xc1garbage".to_vec()).await;
    assert!(!reply.ok && reply.reason.contains("malformed"), "{reply:?}");
    h.stop().await;
}

/// Demand for a model that one loaded copy could serve alone, with a utilisation target
/// that asks for three: the autoscaler preloads it on more slices until three hold it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demand_loads_more_copies_of_a_model() {
    let workers = vec![support::honest("c1", 1), support::honest("c2", 1), support::honest("c3", 1)];
    let h = Harness::start(workers, 1, Duration::from_secs(30)).await;
    let recorder = sundara_common::metrics::install(None).unwrap();
    let policy = ScalePolicy { min_workers: 0, max_workers: 0, target_utilisation: 0.05, ..ScalePolicy::default() };
    let (shutdown, autoscaler) = start_autoscaler(&h, policy);
    let meta = h.models["ppocr-cls"].clone();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(11);
    let inputs = sundara::models::sample_inputs(&meta.inputs, 16, &mut rng);
    let copies = |slices: &[sundara_common::capacity::SliceState]| {
        slices.iter().filter(|s| s.loaded.iter().any(|(k, _)| k.starts_with("ppocr-cls@"))).count()
    };
    // A light, steady load: 10 tasks a second, until three copies are loaded (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut loaded = 0;
    while loaded < 3 {
        assert!(tokio::time::Instant::now() < deadline, "only {loaded} copies within 30 s");
        tick.tick().await;
        let r = sundara_schemas::SubmitRequest::new("ppocr-cls", inputs.clone());
        assert!(matches!(h.client.submit(&r).await.unwrap(), sundara_schemas::SubmitOutcome::Accepted { .. }));
        let mut slices = Vec::new();
        for w in ["c1", "c2", "c3"] {
            slices.extend(h.capacity.slices_of(w).await.unwrap());
        }
        loaded = copies(&slices);
    }
    // The scheduler may itself load a copy on a cold slice once its measured load time is
    // short against the queue (`docs/scheduling.md`); the autoscaler loads the rest.
    let preloads = sundara_common::metrics::sum(&recorder.render(), "sundara_autoscaler_preloads_total", &[]);
    assert!(preloads >= 1.0, "{preloads} preloads");
    shutdown.cancel();
    autoscaler.await.unwrap();
    h.stop().await;
}
