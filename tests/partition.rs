//! Miners on hosts of their own: each in a network namespace joined to this one by a veth
//! link (iproute2, as root), made and removed by the test. A miner joins a TLS-secured
//! `sundara up` from there with only its own key and the CA, as a new operator would from
//! docs/mining.md; a miner cut off under load is replaced and rejoins; the verifier, and the
//! scheduler with the autoscaler, cut off from NATS and Redis, lose no task. Where namespaces
//! cannot be made (not root, no `ip`), each test says so and passes without running, unless
//! `SUNDARA_REQUIRE_NETNS` is set (as in CI), where it fails.

use sundara_testkit as support;

use std::process::{Command, Stdio};
use std::time::Duration;

use sundara::context::Context;
use sundara::stack::project_root;
use support::netns::Netns;
use support::processes::{ProcessStack, StackOptions};
use support::wait;

/// A network namespace for this test, or `None` (with the reason printed) where the
/// machine cannot make one. With `SUNDARA_REQUIRE_NETNS` set (`.ci/run` sets it) that
/// fails the test instead: a green CI means these tests ran.
fn netns(tag: &str) -> Option<Netns> {
    match Netns::create(tag) {
        Ok(n) => Some(n),
        Err(why) if std::env::var_os("SUNDARA_REQUIRE_NETNS").is_some() => {
            panic!("cannot create a network namespace here ({}), and SUNDARA_REQUIRE_NETNS is set", why.0)
        }
        Err(why) => {
            eprintln!("SKIPPED: cannot create a network namespace here ({}); run as root with iproute2", why.0);
            None
        }
    }
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The whole path of a new operator: `sundara up` secured (TLS, a user per role) and
/// listening on a link; on the miner's own host (a network namespace) `sundara auth
/// keygen` makes its key; the validator adds only the public key (`auth add
/// --miner-key`); the miner runs `sundara worker` there with its seed and the CA, joins the
/// fleet and takes work. Its seed never leaves its host; nothing else is given to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miner_joins_a_secured_up_from_its_own_host_with_only_its_key_and_the_ca() {
    let Some(net) = netns("j") else { return };
    let state = tempfile::tempdir().unwrap();
    let context_path = state.path().join("up.json");
    let _up =
        support::up::start(&context_path, &["--tasks", "10", "--nats-listen", &net.host_ip.to_string()], "services up")
            .0;
    let context = Context::load(&context_path).unwrap().expect("up wrote its context");
    assert!(context.nats_url.starts_with(&format!("tls://{}:", net.host_ip)), "{}", context.nats_url);

    // The miner's host: its own directory, its own key.
    let miner_home = tempfile::tempdir().unwrap();
    let seed = miner_home.path().join("miner-far.nk");
    let nowhere = miner_home.path().join("no-context.json");
    let out = support::up::sundara(net.command(support::sundara_binary()), &nowhere)
        .args(["auth", "keygen", "--miner", "far", "--out"])
        .arg(&seed)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    let key = said.lines().find_map(|l| l.strip_prefix("public key: ")).expect("keygen prints the public key");

    // The validator: only the public key.
    let out = support::up::sundara(Command::new(support::sundara_binary()), &context_path)
        .args(["auth", "add", "--miner-key", &format!("far={key}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let creds = context.credentials_dir.clone().expect("a secured stack");
    assert!(!creds.join("miner-far.nk").exists(), "the validator holds no seed of the miner");
    assert!(creds.join("miner-far.pub").exists());

    // The miner: its seed and the CA, copied to its host as an operator would.
    let ca = miner_home.path().join("ca.pem");
    std::fs::copy(context.nats_ca.as_ref().expect("up runs TLS"), &ca).unwrap();
    let ort = sundara_runtime::find_library(&[project_root()]).unwrap();
    let log = std::fs::File::create(miner_home.path().join("worker.log")).unwrap();
    let worker = support::up::sundara(net.command(support::sundara_binary()), &nowhere)
        .args(["worker", "--id", "far", "--nats", &context.nats_url, "--nats-ca"])
        .arg(&ca)
        .arg("--nats-creds")
        .arg(&seed)
        .arg("--cache-dir")
        .arg(miner_home.path().join("models"))
        .env("ORT_DYLIB_PATH", &ort)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _worker = support::up::Running(worker);

    let capacity = sundara_common::Capacity::connect(&context.redis_url).await.unwrap();
    wait::until_true("far to announce itself from its host", Duration::from_secs(60), || async {
        capacity.workers().await.unwrap_or_default().iter().any(|w| w == "far")
    })
    .await;
    // Work reaches it: loads of tasks of a model that needs four operators (up's three
    // honest miners and far; a build with the cheaters adds a liar, quarantined within the
    // first loads) are all verified, and far's WORK consumer delivers some of them. With
    // k=3, placement would keep preferring the warm miners it has measured over a cold
    // newcomer, and far could sit out every load.
    let endpoints = sundara::context::Settings::default().resolve(Some(&context), None);
    let js = async_nats::jetstream::new(sundara_common::nats::connect(&endpoints.nats, "test").await.unwrap());
    let work = js.get_stream(sundara_schemas::subjects::WORK_STREAM).await.unwrap();
    let mlp = project_root().join(".cache/models/mlp.onnx");
    let push = support::up::sundara(Command::new(support::sundara_binary()), &context_path)
        .args(["models", "push", mlp.to_str().unwrap(), "--name", "mlp4", "--redundancy", "4"])
        .output()
        .unwrap();
    assert!(push.status.success(), "{}", text(&push));
    let mut loads = 0;
    let far = loop {
        let out = support::up::sundara(Command::new(support::sundara_binary()), &context_path)
            .args(["submit", "--model", "mlp4", "--count", "30"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        loads += 1;
        let far = work.consumer_info("worker-far").await.unwrap();
        if far.delivered.consumer_sequence > 0 || loads == 5 {
            break far;
        }
    };
    assert!(far.delivered.consumer_sequence > 0, "far took no work in {loads} loads of 30 tasks: {far:?}");
    let log = std::fs::read_to_string(miner_home.path().join("worker.log")).unwrap();
    eprintln!("far took {} assignments in {loads} loads; its log:\n{log}", far.delivered.consumer_sequence);
}

/// A miner on its own host is cut off under load (its link down), for longer than its
/// heartbeat lives: the autoscaler declares it dead, its assignments go to the others, and
/// the load goes on. When the link is back it rejoins and takes work again. Every accepted
/// task ends once, none is lost, and the miner is not quarantined for the partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miner_cut_off_under_load_is_replaced_and_rejoins() {
    let Some(net) = netns("p") else { return };
    let options = StackOptions { nats_listen: Some(net.host_ip), ..StackOptions::new(2, &["w1", "w2"]) };
    let mut stack = ProcessStack::start(options).await;
    stack.start_worker_in(Some(&net), "far");
    stack.wait_for_worker("far").await;
    let load = stack.load("partition", 20);
    stack.first_verified_after(&load, 0, Duration::from_secs(30)).await;
    stack.more_accepted(&load, 40, Duration::from_secs(30)).await;

    let work = stack.js.get_stream(sundara_schemas::subjects::WORK_STREAM).await.unwrap();
    let before_cut = work.consumer_info("worker-far").await.unwrap().delivered.stream_sequence;
    assert!(before_cut > 0, "far took no work before the cut");
    net.cut();
    stack.step("far's link cut");
    stack.wait_declared_dead("far", Duration::from_secs(20)).await;
    stack.more_accepted(&load, 40, Duration::from_secs(30)).await;
    net.restore();
    stack.step("far's link restored");
    stack.wait_for_worker("far").await;
    let back = sundara_schemas::now_us();
    stack.more_accepted(&load, 40, Duration::from_secs(30)).await;
    stack.first_verified_after(&load, back, Duration::from_secs(30)).await;

    // It takes work again (its consumer, deleted when it was declared dead, made anew).
    wait::until("far to take work again", Duration::from_secs(30), || async {
        match work.consumer_info("worker-far").await {
            Ok(info) if info.delivered.stream_sequence > before_cut => Ok(()),
            Ok(info) => Err(format!("delivered up to {}", info.delivered.stream_sequence)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, Duration::from_secs(90)).await;
    assert_eq!(settled.verified + settled.expired, settled.accepted, "{settled:?}");
    let quarantined = stack.capacity().await.quarantined().await.unwrap();
    assert!(!quarantined.contains_key("far"), "far was quarantined for the partition: {quarantined:?}");
    stack.assert_running();
}

/// `services` moved to a host of their own (NATS and Redis reached over the link), cut off
/// under load until `during_cut` more tasks have been accepted, and the link restored: every
/// accepted task is then verified, none lost or delivered twice. Returns the host and the
/// stack, still running; `None` where no namespace can be made.
async fn cut_off_under_load_loses_no_task(
    tag: &str,
    services: &[&'static str],
    workers: &[&str],
    during_cut: usize,
) -> Option<(Netns, ProcessStack)> {
    let net = netns(tag)?;
    let options = StackOptions { nats_listen: Some(net.host_ip), ..StackOptions::new(2, workers) };
    let mut stack = ProcessStack::start(options).await;
    for service in services {
        stack.kill_service(service);
        stack.start_service_in(Some(&net), service);
    }
    let load = stack.load(&format!("{tag}-cut"), 20);
    stack.first_verified_after(&load, 0, Duration::from_secs(30)).await;
    stack.more_accepted(&load, 40, Duration::from_secs(30)).await;
    net.cut();
    stack.step(&format!("{services:?}: link cut"));
    stack.more_accepted(&load, during_cut, Duration::from_secs(30)).await;
    net.restore();
    stack.step(&format!("{services:?}: link restored"));
    stack.first_verified_after(&load, sundara_schemas::now_us(), Duration::from_secs(60)).await;
    let accepted = load.stop().await;
    let settled = stack.settle(&accepted, Duration::from_secs(90)).await;
    assert_eq!(settled.verified, settled.accepted, "{settled:?}");
    stack.assert_running();
    Some((net, stack))
}

/// The verifier on a host of its own is cut off from NATS under load and the link restored:
/// outcomes wait for it in OUTCOMES, it reconnects, and every accepted task is verified,
/// none lost or decided twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_verifier_cut_off_from_nats_under_load_loses_no_task() {
    cut_off_under_load_loses_no_task("v", &["verifier"], &["w1", "w2", "w3"], 120).await;
}

/// The scheduler and the autoscaler on a host of their own (NATS and Redis reached over the
/// link) are cut off under load and the link restored. Ingress goes on accepting; nothing
/// is dispatched meanwhile; once back, the scheduler dispatches what waited in TASKS, and
/// every accepted task is verified, none lost or delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scheduler_cut_off_from_nats_and_redis_under_load_loses_no_task() {
    cut_off_under_load_loses_no_task("s", &["scheduler", "autoscaler"], &["w1", "w2"], 80).await;
}

/// The rewarder on a host of its own is cut off from NATS under load and the link restored:
/// tasks are verified meanwhile (it is not on their path), verdicts wait for it in VERDICTS,
/// and once it has caught up its ledger has scored each verdict once: its miners' task
/// counts add up to the miners the verdicts name, none missed and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rewarder_cut_off_under_load_scores_each_verdict_once() {
    let Some((_net, stack)) = cut_off_under_load_loses_no_task("r", &["rewarder"], &["w1", "w2"], 80).await else {
        return;
    };
    let verdicts: Vec<sundara_schemas::Verdict> =
        support::stream_messages(&stack.js, sundara_schemas::subjects::VERDICTS_STREAM)
            .await
            .iter()
            .map(|p| sundara_schemas::decode(p, sundara_schemas::MAX_MESSAGE_BYTES).unwrap())
            .collect();
    let named: u64 = verdicts.iter().map(|v| v.miners.len() as u64).sum();
    let mut stream = stack.js.get_stream(sundara_schemas::subjects::VERDICTS_STREAM).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let ledger = wait::until("the rewarder to score every verdict", Duration::from_secs(60), || async {
        match sundara_rewarder::read_ledger(&stack.js).await {
            Ok(Some(ledger)) if ledger.last_seq() >= last => Ok(ledger),
            Ok(ledger) => Err(format!("scored up to {:?} of {last}", ledger.map(|l| l.last_seq()))),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let scored: u64 = ledger.miners().map(|(_, m)| m.tasks).sum();
    assert_eq!(scored, named, "{} verdicts name {named} miners; the ledger scored {scored}", verdicts.len());
}
