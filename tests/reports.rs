//! Reports are claims: what a miner states about itself through the fleet gateway (service
//! times, footprints, slots, models) cannot buy it work, deny other miners' clients
//! service, or write keys for models nobody registered. Real NATS, Redis and ONNX Runtime,
//! honest `sundara worker`s beside an attacking miner ([`support::attack::Miner`]).

use sundara_testkit as support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use sundara_common::gateway::{ANNOUNCES_PER_S, MAX_SLOTS_PER_SLICE};
use sundara_common::nats;
use sundara_schemas::{
    FleetReply, FleetRequest, FleetUpdate, MAX_MESSAGE_BYTES, ResultStatus, SliceAnnounce, SubmitOutcome, WIRE_VERSION,
    WorkerAnnounce, decode, encode, subjects as subj,
};
use support::attack::Miner;
use support::{Harness, await_results, honest};

/// Largest footprint a slice may state (the gateway's cap on memory).
const GIANT: u64 = sundara_common::gateway::MAX_SLICE_MEMORY;

/// A report through the fleet gateway as `worker`, and the gateway's reply.
async fn report(client: &async_nats::Client, worker: &str, update: FleetUpdate) -> FleetReply {
    let request = encode(&FleetRequest { v: WIRE_VERSION, update });
    let asked = client.request(subj::report(worker), request.into());
    let reply = tokio::time::timeout(Duration::from_secs(5), asked).await.expect("an answer").expect("an answer");
    decode(&reply.payload, MAX_MESSAGE_BYTES).expect("a fleet reply")
}

/// A slice of `worker` serving `models`, with a small honest-looking state.
fn slice_of(worker: &str, models: &[&str]) -> SliceAnnounce {
    SliceAnnounce {
        id: format!("{worker}-cpu0"),
        device: "cpu".into(),
        slots: 8,
        lanes: 1,
        models: models.iter().map(|m| m.to_string()).collect(),
        memory_total: 1 << 30,
        memory_free: 1 << 30,
        ..Default::default()
    }
}

fn announce(worker: &str, slice: SliceAnnounce) -> FleetUpdate {
    let announce = WorkerAnnounce { worker: worker.into(), operator: worker.into(), slices: vec![slice] };
    FleetUpdate::Announce { announce, fresh: true, heartbeat_ttl_ms: 2000 }
}

/// A miner that states it runs every model in 1 µs, and that each needs 4 TiB (more than
/// any slice has, its own 1 GiB included), while it really answers each task after
/// 100 ms. Before the gateway treated reports as claims, the footprint made ingress refuse
/// every task of a model no honest slice had loaded yet (`model_too_large`, for every
/// client), and the service time won the attacker every task it had a free slot for.
/// Now ingress refuses nothing, and once its answers are measured the attacker gets
/// less than its fair share (a third here) of a steady load the honest miners keep up with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stated_speed_and_footprints_buy_no_work_and_refuse_no_model() {
    let mut h = Harness::start(vec![honest("h1", 1), honest("h2", 1)], 1, Duration::from_secs(10)).await;
    // The honest miners have run mlp (loaded, measured) before the attacker arrives.
    let warm = h.sample_requests(20, "warm", 1, |_| "mlp");
    let results = h.run_tasks(&warm).await;
    assert!(results.values().all(|r| matches!(r.status, ResultStatus::Verified { .. })));

    let models: Vec<String> = h.models.keys().cloned().collect();
    let claims = WorkerAnnounce {
        worker: "boaster".into(),
        operator: "boaster".into(),
        slices: vec![SliceAnnounce {
            id: "boaster-cpu0".into(),
            device: "cpu".into(),
            slots: 64,
            lanes: 64,
            models: models.clone(),
            memory_total: 1 << 30,
            memory_free: 1 << 30,
            loaded: vec![("mlp@1".into(), 1 << 20)],
            footprints: models.iter().map(|m| (format!("{m}@1"), GIANT)).collect(),
            service_us: models.iter().map(|m| (m.clone(), 1)).collect(),
            load_us: models.iter().map(|m| (m.clone(), 1)).collect(),
            ..Default::default()
        }],
    };
    let attacker = Miner::join_with(&h, "boaster", claims).await;
    let took: Arc<Mutex<HashSet<String>>> = Arc::default();
    let serving = {
        let mut assignments = attacker.assignments().await;
        let took = took.clone();
        let attacker = Arc::new(attacker);
        tokio::spawn(async move {
            while let Some(taken) = assignments.next().await {
                took.lock().unwrap().insert(taken.assignment.ticket.task_id.clone());
                let attacker = attacker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let outputs = taken.honest.clone();
                    attacker.answer(taken, outputs).await;
                });
            }
        })
    };
    // Ingress reads the fleet's fit at most once a second: let it see the claims.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut results = h.client.results().await.unwrap();
    // Every model is admitted, also those no honest slice has loaded yet.
    let mut ids = Vec::new();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(2);
    for name in &models {
        let meta = &h.models[name];
        let req = h.request(name, sundara::models::sample_inputs(&meta.inputs, 1, &mut rng), &format!("fit-{name}"));
        match h.client.submit(&req).await.unwrap() {
            SubmitOutcome::Accepted { task_id, .. } => ids.push(task_id),
            SubmitOutcome::Rejected { code, reason } => panic!("{name} refused: {code:?} {reason}"),
        }
    }
    // Their results first: a model's first load on a slice holds the slice while it
    // measures the model (docs/workers.md §2), and the paced load below is about claims,
    // not about those loads.
    let mut got = await_results(&mut results, &ids).await;
    // A steady mlp load, well within what the honest miners do.
    let paced = h.sample_requests(120, "paced", 3, |_| "mlp");
    let mut paced_ids = Vec::new();
    for req in &paced {
        paced_ids.extend(h.submit_all(std::slice::from_ref(req)).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    got.extend(await_results(&mut results, &paced_ids).await);
    ids.extend(paced_ids.iter().cloned());
    for id in &ids {
        assert!(matches!(got[id].status, ResultStatus::Verified { .. }), "{id}: {:?}", got[id].status);
    }

    let taken = took.lock().unwrap().clone();
    let attacker_share = paced_ids.iter().filter(|id| taken.contains(*id)).count();
    // Its slice's time is what the scheduler measured, not the 1 µs it states.
    let mut con = redis::Client::open(h.stack.endpoints().redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let measured: Option<u64> = con.hget("sundara:slice:boaster-cpu0:svc", "mlp").await.unwrap();
    eprintln!("attacker: {attacker_share} of {} paced tasks, measured {measured:?} µs", paced_ids.len());
    if attacker_share > 0 {
        assert!(measured.is_some_and(|us| us >= 50_000), "the attacker's slice is measured at {measured:?} µs");
    }
    let mut fleet = Vec::new();
    for s in ["h1-cpu0", "h2-cpu0", "boaster-cpu0"] {
        let key = format!("sundara:slice:{s}");
        let state: Option<String> = con.hget(&key, "state").await.unwrap();
        let svc: Option<u64> = con.hget(format!("{key}:svc"), "mlp").await.unwrap();
        let warm: Vec<String> = con.smembers(format!("{key}:warm")).await.unwrap();
        fleet.push(format!("{s}: {state:?}, {svc:?} µs, loaded {warm:?}"));
    }
    assert!(
        attacker_share < paced_ids.len() / 3,
        "the attacker got {attacker_share} of {} tasks, more than a fair third; {fleet:?}",
        paced_ids.len()
    );
    serving.abort();
    h.stop().await;
}

/// Reports that name a model nobody registered, or state more than any slice may hold, are
/// refused with the reason, and write nothing; a flood of reports is held to a rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unregistered_models_and_overstated_slices_are_refused() {
    let h = Harness::start(vec![honest("h1", 1)], 1, Duration::from_secs(10)).await;
    let client = nats::connect(&h.stack.endpoints().nats, "claimant").await.unwrap();
    let mut con = redis::Client::open(h.stack.endpoints().redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    let reply = report(&client, "claimant", announce("claimant", slice_of("claimant", &["mlp", "nosuch"]))).await;
    assert!(!reply.ok && reply.reason.contains("nosuch") && reply.reason.contains("registry"), "{}", reply.reason);
    let mut loaded_unknown = slice_of("claimant", &["mlp"]);
    loaded_unknown.footprints = vec![("mlp@99".into(), 1 << 20)];
    let reply = report(&client, "claimant", announce("claimant", loaded_unknown)).await;
    assert!(!reply.ok && reply.reason.contains("mlp@99"), "{}", reply.reason);

    let mut huge = slice_of("claimant", &["mlp"]);
    huge.slots = MAX_SLOTS_PER_SLICE + 1;
    let reply = report(&client, "claimant", announce("claimant", huge)).await;
    assert!(!reply.ok && reply.reason.contains("slots"), "{}", reply.reason);
    let mut lanes = slice_of("claimant", &["mlp"]);
    lanes.lanes = lanes.slots + 1;
    assert!(!report(&client, "claimant", announce("claimant", lanes)).await.ok);

    // Nothing of the refused reports reached Redis.
    assert!(!h.capacity.workers().await.unwrap().contains(&"claimant".to_string()));
    let keys: Vec<String> = con.keys("sundara:*nosuch*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    let keys: Vec<String> = con.keys("sundara:*claimant*").await.unwrap();
    assert!(keys.is_empty(), "{keys:?}");

    // A valid report is applied.
    let reply = report(&client, "claimant", announce("claimant", slice_of("claimant", &["mlp"]))).await;
    assert!(reply.ok, "{}", reply.reason);

    // A flood: 200 announcements as fast as the gateway answers. Each gateway (the
    // scheduler's and the autoscaler's) lets 20 through at once and 20 a second after.
    let (mut applied, started) = (0, std::time::Instant::now());
    for _ in 0..200 {
        let reply = report(&client, "claimant", announce("claimant", slice_of("claimant", &["mlp"]))).await;
        if reply.ok {
            applied += 1;
        } else {
            assert!(reply.reason.contains("a second"), "{}", reply.reason);
        }
    }
    let per_gateway = ANNOUNCES_PER_S as f64 * (1.0 + started.elapsed().as_secs_f64());
    eprintln!("flood: {applied} of 200 applied in {:?}", started.elapsed());
    assert!(f64::from(applied) <= 2.0 * per_gateway + 2.0, "{applied} of 200 applied in {:?}", started.elapsed());
    h.stop().await;
}
