//! What a miner (a GPU owner) meets, as docs/mining.md describes it: a GPU slice this build
//! cannot run is refused at start; a device failure hands its tasks back and costs the
//! miner no strike; a quarantined miner's log says so, and an operator's
//! `sundara fleet release` gives it work again.
//!
//! Real nats-server and redis-server; workers as `sundara worker` processes where their
//! log is what is checked.

use sundara_testkit as support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sundara::pipeline::WorkerSpec;
use sundara_schemas::{ResultStatus, Standing, SubmitOutcome};
use sundara_worker::{Behaviour, SliceConfig};
use support::{Harness, await_results, honest, wait};

/// `sundara <args>` with the stack's servers in its environment; its output.
fn sundara(h: &Harness, args: &[&str]) -> std::process::Output {
    let ep = h.stack.endpoints();
    let out = Command::new(env!("CARGO_BIN_EXE_sundara"))
        .args(args)
        .env("SUNDARA_NATS_URL", &ep.nats.url)
        .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
        .env("SUNDARA_REDIS_URL", &ep.redis_url)
        .output()
        .expect("sundara runs");
    assert!(out.status.success(), "sundara {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A worker process of operator `operator`, its log (stderr, info and up) in `log`.
fn spawn_worker(h: &Harness, id: &str, operator: &str, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_sundara"))
        .args(["worker", "--id", id, "--operator", operator, "--threads", "1", "--cache-dir"])
        .arg(h.cache.path())
        .env("SUNDARA_NATS_URL", h.stack.endpoints().nats.url)
        .envs(h.stack.endpoints().nats.tls.iter().flat_map(|t| t.env()))
        .env("ORT_DYLIB_PATH", &h.ort_library)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("the sundara binary runs")
}

/// Waits (bounded) until the log holds `text`; returns the line. A log line is no event
/// a test can await: poll briefly.
async fn logged(log: &Path, text: &str, within: Duration) -> String {
    wait::until(format_args!("{} to log {text:?}", log.display()), within, || async {
        let content = std::fs::read_to_string(log).unwrap_or_default();
        content.lines().find(|l| l.contains(text)).map(str::to_string).ok_or(content)
    })
    .await
}

/// Neither a CUDA nor a MIG slice starts on a build without the CUDA execution provider
/// (test builds have none): the worker exits at once with what to do, before it reaches
/// for NATS (none listens at the address given), instead of taking each slice out of
/// service on its first task.
#[test]
fn a_gpu_slice_this_build_cannot_run_is_refused_at_start() {
    let root = sundara::stack::project_root();
    let ort: PathBuf = sundara_runtime::find_library(std::slice::from_ref(&root)).expect("run scripts/setup");
    for slice in ["cuda:0,memory=1G", "mig:MIG-4f1c,memory=1G"] {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_sundara"))
            .args(["worker", "--id", "g1", "--slice", slice])
            .env("SUNDARA_NATS_URL", "nats://127.0.0.1:1")
            .env("ORT_DYLIB_PATH", &ort)
            .env_remove("SUNDARA_NATS_CREDS")
            .output()
            .expect("sundara runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--slice {slice} started:\n{stderr}");
        assert!(stderr.contains("cannot run here") && stderr.contains("no CUDA execution provider"), "{stderr}");
        if !cfg!(feature = "cuda") {
            assert!(stderr.contains("--features cuda"), "says how to get one: {stderr}");
        }
        assert!(!stderr.contains("cannot connect to NATS"), "refused before connecting: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(20), "refused at start, not after a timeout");
    }
}

/// A slice whose device fails (an injected fault, the stand-in for a GPU error) hands
/// every task back: other workers run them, and its miner gets no strike for it: no
/// verdict names it, no timeout is counted against it, it is not quarantined.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_failure_costs_its_miner_no_strike() {
    let mut broken = SliceConfig::cpu("cpu0", 1, 1 << 30);
    broken.fail_after_runs = Some(0);
    let workers = vec![
        WorkerSpec { id: "broken".into(), slices: vec![broken], behaviour: Behaviour::Honest },
        honest("sound", 1),
    ];
    let mut h = Harness::start(workers, 1, Duration::from_secs(30)).await;
    let requests = h.sample_requests(40, "device", 3, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    assert!(results.values().all(|r| matches!(r.status, ResultStatus::Verified { .. })), "a task failed");
    let slices = h.capacity.slices_of("broken").await.unwrap();
    assert_eq!(slices[0].state, "failed", "the broken slice left service");
    let verdicts = h.all_verdicts().await;
    let named: Vec<_> = verdicts.iter().flat_map(|v| &v.miners).filter(|m| m.worker == "broken").collect();
    assert!(named.is_empty(), "the broken slice's miner appears in verdicts: {named:?}");
    let redis = redis::Client::open(h.stack.endpoints().redis_url).unwrap();
    let mut con = redis.get_multiplexed_async_connection().await.unwrap();
    let timeouts: Option<u64> =
        redis::cmd("HGET").arg("sundara:timeouts").arg("broken").query_async(&mut con).await.unwrap();
    assert_eq!(timeouts, None, "no timeout counted against a hand-back");
    assert!(h.capacity.quarantined().await.unwrap().is_empty());
    h.stop().await;
}

/// The rewarder quarantines an operator (and its worker) as it does on proof. The miner's
/// own log says so once, with the reason and what to do; `sundara fleet quarantined` lists
/// it; a task waits (no other worker); `sundara fleet release <operator>` lifts it, the
/// worker's log says so, and the waiting task runs on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quarantined_miner_is_told_and_released_by_the_operator() {
    let h = Harness::start(vec![], 1, Duration::from_secs(30)).await;
    let log = h.cache.path().join("m1.log");
    let mut worker = spawn_worker(&h, "m1", "op1", &log);
    h.wait_for_worker("m1").await;

    let reason = "operator op1: 3 outputs of its workers proven wrong by the verifier's reference runs";
    h.capacity.quarantine_operator("op1", reason).await.unwrap();
    assert!(h.capacity.quarantine("m1", reason).await.unwrap());
    let warned = logged(&log, "quarantined by the validator", Duration::from_secs(10)).await;
    assert!(warned.contains("WARN") && warned.contains(reason), "{warned}");
    assert!(warned.contains("sundara fleet release op1"), "says how it is lifted: {warned}");
    let listed = stdout(&sundara(&h, &["fleet", "quarantined"]));
    assert!(listed.contains("operator op1") && listed.contains(reason), "{listed}");
    assert!(listed.contains("worker   m1") && listed.contains("online"), "{listed}");

    let mut results = h.client.results().await.unwrap();
    let request = h.sample_requests(1, "waits", 9, |_| "mlp").remove(0);
    let SubmitOutcome::Accepted { task_id, .. } = h.client.submit(&request).await.unwrap() else {
        panic!("not accepted")
    };
    assert_eq!(h.capacity.inflight().await.unwrap(), 0, "no quarantined worker is given the task");

    let released = stdout(&sundara(&h, &["fleet", "release", "op1"]));
    assert!(released.contains("released operator op1 and workers m1"), "{released}");
    let got = await_results(&mut results, std::slice::from_ref(&task_id)).await;
    assert!(matches!(got[&task_id].status, ResultStatus::Verified { .. }), "{:?}", got[&task_id].status);
    let verdicts = h.all_verdicts().await;
    let v = verdicts.iter().find(|v| v.task_id == task_id).expect("a verdict");
    assert_eq!((v.miners[0].worker.as_str(), v.miners[0].standing), ("m1", Standing::Agreed));
    logged(&log, "quarantine lifted", Duration::from_secs(10)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("quarantined by the validator").count(), 1, "said once, not on every heartbeat");
    assert_eq!(stdout(&sundara(&h, &["fleet", "quarantined"])).trim(), "no quarantines");
    let again = stdout(&sundara(&h, &["fleet", "release", "op1"]));
    assert!(again.contains("neither an operator nor a worker under quarantine"), "{again}");

    let _ = worker.kill();
    let _ = worker.wait();
    h.stop().await;
}
