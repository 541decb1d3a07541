//! The Redis reservation script against a real redis-server: a decision reads a bounded
//! window of candidates, yet every slice of a large fleet is reachable and work spreads.

use std::collections::{HashMap, HashSet};

use sundara::stack::{ServerProcess, redis_server_binary, start_redis};
use sundara_common::Capacity;
use sundara_common::capacity::{Placement, ReserveTerms, SliceAnnounce, WorkerAnnounce};

const SCAN: usize = 16;

async fn fleet(slices: usize, slots: u32) -> (ServerProcess, tempfile::TempDir, Capacity) {
    let dir = tempfile::tempdir().unwrap();
    let redis = start_redis(&redis_server_binary().expect("run scripts/setup"), dir.path()).unwrap();
    let capacity = Capacity::connect(&sundara::stack::redis_url(dir.path(), redis.port).unwrap()).await.unwrap();
    for i in 0..slices {
        let worker = format!("w{i:05}");
        let announce = WorkerAnnounce {
            worker: worker.clone(),
            operator: worker.clone(),
            slices: vec![SliceAnnounce {
                id: format!("{worker}-cpu0"),
                device: "cpu".into(),
                slots,
                models: vec!["m".into()],
                ..Default::default()
            }],
        };
        capacity.announce(&announce, true, 600_000).await.unwrap();
    }
    (redis, dir, capacity)
}

fn terms(timeout_at_ms: u64) -> ReserveTerms {
    ReserveTerms { timeout_at_ms, ttl_ms: 600_000, scan: SCAN, placement: Placement::default() }
}

async fn reserve(capacity: &Capacity, task: &str, k: u8) -> Option<Vec<(String, String)>> {
    let aids: Vec<String> = (0..k).map(|r| format!("{task}.{r}.0")).collect();
    let picks = capacity.reserve("m", task, &aids, terms(u64::MAX / 2)).await.unwrap()?;
    Some(picks.into_iter().map(|p| (p.slice, p.worker)).collect())
}

#[tokio::test]
async fn every_slot_of_a_fleet_larger_than_the_window_is_reachable() {
    // 200 slices of one slot each, far more than one window of 16 candidates.
    let (_redis, _dir, capacity) = fleet(200, 1).await;
    let mut used = HashSet::new();
    for t in 0..200 {
        let picks = reserve(&capacity, &format!("t{t}"), 1).await.unwrap_or_else(|| panic!("task {t} found no slot"));
        assert!(used.insert(picks[0].0.clone()), "slot of {} booked twice", picks[0].0);
    }
    assert_eq!(used.len(), 200);
    // The fleet is full now: the next reservation is refused, and reserves nothing.
    assert!(reserve(&capacity, "overflow", 1).await.is_none());
    assert_eq!(capacity.inflight().await.unwrap(), 200);
    // A freed slot goes back to the front of the candidates and is found at once.
    assert!(capacity.release("t123.0.0", None).await.unwrap());
    let again = reserve(&capacity, "after-release", 1).await.expect("the freed slot");
    assert_eq!(capacity.inflight().await.unwrap(), 200);
    assert!(!used.insert(again[0].0.clone()), "a slot that was never booked: {again:?}");
}

#[tokio::test]
async fn work_spreads_and_replicas_land_on_distinct_workers() {
    let (_redis, _dir, capacity) = fleet(100, 4).await;
    let mut per_slice: HashMap<String, usize> = HashMap::new();
    for t in 0..100 {
        let picks = reserve(&capacity, &format!("t{t}"), 3).await.expect("capacity is ample");
        let workers: HashSet<&String> = picks.iter().map(|(_, w)| w).collect();
        assert_eq!(workers.len(), 3, "replicas of one task share a worker: {picks:?}");
        for (slice, _) in picks {
            *per_slice.entry(slice).or_default() += 1;
        }
    }
    // 300 replicas over 100 slices of 4 slots: least loaded first gives every slice three.
    assert_eq!(per_slice.len(), 100, "only {} slices used", per_slice.len());
    assert!(per_slice.values().all(|&n| n == 3), "uneven spread: {per_slice:?}");
}

#[tokio::test]
async fn a_redelivered_task_keeps_its_reservation() {
    let (_redis, _dir, capacity) = fleet(50, 2).await;
    let first = reserve(&capacity, "same", 2).await.unwrap();
    let again = reserve(&capacity, "same", 2).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(capacity.inflight().await.unwrap(), 2);
}

#[tokio::test]
async fn only_the_holder_answering_in_time_frees_a_slot() {
    use sundara_common::capacity::Answer;
    let (_redis, _dir, capacity) = fleet(2, 1).await;
    let answer_by = 1_000_000;
    let picks = capacity.reserve("m", "t", &["t.0.0".to_string()], terms(answer_by)).await.unwrap().unwrap();
    let holder = picks[0].worker.as_str();
    let other = if holder == "w00000" { "w00001" } else { "w00000" };
    let answer = |worker, stored_at_ms| Some(Answer { worker, stored_at_ms });
    assert!(!capacity.release("t.0.0", answer(other, answer_by)).await.unwrap(), "another worker's answer");
    assert!(!capacity.release("t.0.0", answer(holder, answer_by + 1)).await.unwrap(), "a late answer");
    assert_eq!(capacity.inflight().await.unwrap(), 1, "the sweep still finds it");
    assert!(capacity.release("t.0.0", answer(holder, answer_by)).await.unwrap());
    assert!(!capacity.release("t.0.0", answer(holder, answer_by)).await.unwrap(), "released once");
}

/// One worker with one slice, as a test describes it.
fn slice(worker: &str, slots: u32, memory_gib: u64, service_us: Option<u64>) -> WorkerAnnounce {
    WorkerAnnounce {
        worker: worker.into(),
        operator: worker.into(),
        slices: vec![SliceAnnounce {
            id: format!("{worker}-s"),
            device: "cpu".into(),
            slots,
            models: vec!["m".into()],
            memory_total: memory_gib << 30,
            lanes: 1,
            service_us: service_us.map(|us| vec![("m".to_string(), us)]).unwrap_or_default(),
            load_us: vec![("m".to_string(), 500_000)],
            ..Default::default()
        }],
    }
}

/// Which worker one k=1 reservation picks (the reservation is kept).
async fn pick(capacity: &Capacity, task: &str) -> String {
    reserve(capacity, task, 1).await.expect("a free slot")[0].1.clone()
}

#[tokio::test]
async fn placement_goes_to_the_expected_fastest_slice() {
    let (_redis, _dir, capacity) = fleet(0, 0).await;
    // Loaded and measured (1 ms a task), loaded but slower (4 ms), and cold (500 ms to load).
    for a in [slice("fast", 8, 8, Some(1_000)), slice("slow", 8, 8, Some(4_000)), slice("cold", 8, 8, None)] {
        capacity.announce(&a, true, 600_000).await.unwrap();
    }
    // 1 ms × (1 + queued): the fast slice until four tasks wait there (5 ms > 4 ms).
    for t in 0..4 {
        assert_eq!(pick(&capacity, &format!("t{t}")).await, "fast");
    }
    assert_eq!(pick(&capacity, "t4").await, "slow");
    // The cold slice (500 ms to load first) only when the others are full: 8 slots each.
    for t in 5..16 {
        assert_ne!(pick(&capacity, &format!("t{t}")).await, "cold", "task {t}");
    }
    assert_eq!(pick(&capacity, "t16").await, "cold");

    // Fit: of two equal slices the smaller device; reputation: of two equal workers, the
    // one whose outcomes agree.
    let (_redis, _dir, capacity) = fleet(0, 0).await;
    for a in [slice("big", 8, 80, Some(1_000)), slice("small", 8, 8, Some(1_000))] {
        capacity.announce(&a, true, 600_000).await.unwrap();
    }
    assert_eq!(pick(&capacity, "fit").await, "small");
    let (_redis, _dir, capacity) = fleet(0, 0).await;
    capacity.set_reputation(&[("liar".to_string(), 0.5), ("honest".to_string(), 1.0)]).await.unwrap();
    for a in [slice("liar", 8, 8, Some(1_000)), slice("honest", 8, 8, Some(1_000))] {
        capacity.announce(&a, true, 600_000).await.unwrap();
    }
    assert_eq!(pick(&capacity, "rep").await, "honest");
}

#[tokio::test]
async fn a_full_slice_leaves_the_candidates_and_returns_on_release() {
    let (_redis, _dir, capacity) = fleet(0, 0).await;
    for a in [slice("one", 1, 8, Some(1_000)), slice("two", 1, 8, Some(9_000))] {
        capacity.announce(&a, true, 600_000).await.unwrap();
    }
    assert_eq!(pick(&capacity, "a").await, "one");
    assert_eq!(pick(&capacity, "b").await, "two");
    assert!(reserve(&capacity, "c", 1).await.is_none(), "both full");
    // A heartbeat does not undo the reservations.
    capacity.announce(&slice("one", 1, 8, Some(1_000)), false, 600_000).await.unwrap();
    assert!(reserve(&capacity, "c", 1).await.is_none(), "still full after a heartbeat");
    assert!(capacity.release("a.0.0", None).await.unwrap());
    assert_eq!(pick(&capacity, "c").await, "one");
}
