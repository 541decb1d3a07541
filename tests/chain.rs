//! Sundara on a Bittensor subnet, on real servers: miners join by proving registered
//! hotkeys through the validator's NATS auth callout, count under their coldkeys, and
//! lose their work when deregistered.
//!
//! The chain is the one test double here (no package registry ships a subtensor node):
//! the metagraph is a snapshot file the test writes, read by the real `chain serve`
//! service as it reads the bridge's. The keys are Substrate's development accounts
//! (`//Alice`, ...), derived and checked as the chain does (`sundara-chain`'s tests).

use sundara_testkit as support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use sundara::auth::{AuthDir, Role, Service};
use sundara::stack::{LocalStack, project_root};
use sundara_chain::Hotkey;
use sundara_common::nats::{self, HotkeyLogin};
use sundara_common::{Capacity, Shutdown};
use sundara_schemas::Policy;
use sundara_schemas::chain::{Metagraph, Neuron};
use support::{Harness, RULE, honest, sundara_binary, wait};

fn ss58(uri: &str) -> String {
    Hotkey::dev(uri).unwrap().account.to_ss58()
}

/// A neuron of hotkey `hot` under coldkey `cold` (development keys).
fn neuron(uid: u16, hot: &str, cold: &str, block: u64) -> Neuron {
    Neuron {
        uid,
        hotkey: ss58(hot),
        coldkey: ss58(cold),
        stake: 0.0,
        validator_permit: false,
        registered_at_block: block,
    }
}

fn write_metagraph(path: &Path, block: u64, neurons: Vec<Neuron>) {
    let m = Metagraph { netuid: 7, block, neurons };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string(&m).unwrap()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

/// The validator's side of the chain: `chain serve` on `endpoints` until `shutdown`, once
/// it holds the metagraph at `block`.
async fn serve_chain(
    endpoints: sundara_common::Endpoints,
    dir: &Path,
    metagraph: &Path,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<()> {
    let args = sundara::chain::ServeArgs {
        metagraph: Some(metagraph.to_path_buf()),
        bridge: None,
        netuid: None,
        version_key: None,
        weights_every_s: 30.0,
        sync_every_s: 0.2,
        validator_hotkey: ss58("//Validator"),
        credentials_dir: dir.to_path_buf(),
        miner_session_s: 3600,
    };
    let capacity = Capacity::open(&endpoints).await.unwrap();
    let config = sundara::chain::Config { endpoints, args };
    let service = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { sundara::chain::run(config, shutdown).await.expect("the chain service runs") }
    });
    wait::until_true("the chain service to hold the metagraph", Duration::from_secs(20), || async {
        capacity.chain_status().await.unwrap().block.is_some()
    })
    .await;
    service
}

fn hotkey_file(dir: &Path, uri: &str) -> PathBuf {
    let path = dir.join(uri.trim_start_matches('/'));
    std::fs::write(&path, format!("{uri}\n")).unwrap();
    path
}

/// A secured stack whose NATS sends every connection but the validator's own to the
/// auth callout (`auth init --chain`).
fn chain_stack(dir: &Path) -> (AuthDir, LocalStack) {
    sundara::auth::enable_callout(dir).unwrap();
    let auth = sundara::auth::init(dir, &[], &[]).unwrap();
    assert!(auth.server_config.contains("auth_callout"), "{}", auth.server_config);
    let stack = LocalStack::start_secured(&project_root(), &auth).expect("servers start (run scripts/setup)");
    (auth, stack)
}

/// A `sundara worker` process with hotkey `uri`, joining for `validator`.
fn hotkey_worker(h: &Harness, keys: &Path, uri: &str, validator: &str) -> Command {
    let ep = h.stack.endpoints();
    let mut cmd = Command::new(sundara_binary());
    cmd.args(["worker", "--threads", "1", "--validator-hotkey", validator])
        .arg("--hotkey-file")
        .arg(hotkey_file(keys, uri))
        .arg("--cache-dir")
        .arg(h.cache.path())
        .env("SUNDARA_NATS_URL", &ep.nats.url)
        .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
        .env_remove("SUNDARA_NATS_CREDS")
        .env("SUNDARA_CONTEXT", keys.join("no-context.json"))
        .env("ORT_DYLIB_PATH", &h.ort_library)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Miners join by their hotkeys (no NATS credentials) and count under their coldkeys:
/// two hotkeys of one coldkey never share a task. A hotkey not on the subnet, and a
/// registered one joining for another validator, are refused at connect with the reason;
/// a deregistered hotkey loses its work at the next read of the metagraph, and the
/// hotkey that takes over its uid starts without its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn miners_join_by_hotkey_and_count_under_their_coldkeys() {
    let creds = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let (auth, stack) = chain_stack(creds.path());
    let metagraph = keys.path().join("metagraph.json");
    // Alice and Bob: one coldkey; Charlie: another; Dave not registered (yet).
    write_metagraph(
        &metagraph,
        100,
        vec![
            neuron(0, "//Alice", "//Cold1", 10),
            neuron(1, "//Bob", "//Cold1", 11),
            neuron(2, "//Charlie", "//Cold2", 12),
        ],
    );
    let shutdown = Shutdown::new();
    let mut chain_endpoints = stack.endpoints();
    chain_endpoints.nats.credentials = Some(auth.credentials(&Role::Service(Service::Chain)));
    let chain = serve_chain(chain_endpoints, creds.path(), &metagraph, &shutdown).await;

    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: 0.0 };
    let as_themselves = |c: &mut sundara::pipeline::PipelineConfig| c.credentials_dir = Some(auth.dir.clone());
    let mut h = Harness::start_on(stack, vec![], policy, Duration::from_secs(10), as_themselves).await;
    let validator = ss58("//Validator");
    for uri in ["//Alice", "//Bob", "//Charlie"] {
        let child = hotkey_worker(&h, keys.path(), uri, &validator).spawn().unwrap();
        h.adopt(child);
        h.wait_for_worker(&ss58(uri)).await;
    }
    // The operator is the coldkey, whatever the worker would state.
    for (uri, cold) in [("//Alice", "//Cold1"), ("//Bob", "//Cold1"), ("//Charlie", "//Cold2")] {
        assert_eq!(h.capacity.operator_of(&ss58(uri)).await.unwrap(), Some(ss58(cold)), "{uri}");
    }

    // k=2: every task has Charlie and one of Alice and Bob, never both of Cold1's.
    let requests = h.sample_requests(24, "chain", 4, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    for v in h.all_verdicts().await {
        let operators: HashSet<&str> = v.miners.iter().map(|m| m.operator()).collect();
        assert_eq!(operators.len(), v.miners.len(), "task {} went twice to one coldkey: {:?}", v.task_id, v.miners);
        assert!(v.miners.iter().any(|m| m.worker == ss58("//Charlie")), "task {}: {:?}", v.task_id, v.miners);
    }

    // Dave is not on the subnet: refused at connect, and told why.
    let out = hotkey_worker(&h, keys.path(), "//Dave", &validator).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("refused hotkey") && said.contains(&ss58("//Dave")), "{said}");
    // Alice is, but a join signed for another validator is no good here.
    let ep = h.stack.endpoints();
    let elsewhere = nats::NatsEndpoint {
        credentials: None,
        hotkey: Some(HotkeyLogin { hotkey: Arc::new(Hotkey::dev("//Alice").unwrap()), receiver: ss58("//Other") }),
        ..ep.nats.clone()
    };
    let refused = nats::connect(&elsewhere, "alice-elsewhere").await.unwrap_err();
    assert!(matches!(refused, sundara_common::Error::NatsHotkeyRefused { .. }), "{refused}");
    // A proof taken from one connection (here: Alice's, for another server nonce) gets no
    // other connection in: it signs that connection's nonce only.
    let alice = HotkeyLogin { hotkey: Arc::new(Hotkey::dev("//Alice").unwrap()), receiver: validator.clone() };
    let stolen = alice.prove("a-nonce-of-another-connection");
    let tls = ep.nats.tls.clone().unwrap();
    let replayed = async_nats::ConnectOptions::with_auth_callback(move |_| {
        let mut auth = async_nats::Auth::new();
        (auth.token, auth.signature) = (stolen.token.clone(), stolen.signature.clone());
        async move { Ok(auth) }
    })
    .require_tls(true)
    .add_root_certificates(tls.ca.clone())
    .connection_timeout(Duration::from_secs(5))
    .connect(ep.nats.url.as_str())
    .await;
    assert!(replayed.is_err(), "a proof for another connection let a client in");

    // Bob deregisters; Dave takes his uid.
    write_metagraph(
        &metagraph,
        200,
        vec![
            neuron(0, "//Alice", "//Cold1", 10),
            neuron(1, "//Dave", "//Cold3", 150),
            neuron(2, "//Charlie", "//Cold2", 12),
        ],
    );
    let bob = ss58("//Bob");
    wait::until_true("Bob to be declared dead", Duration::from_secs(20), || async {
        h.capacity.health(std::slice::from_ref(&bob)).await.unwrap()[0].1.as_deref() != Some("alive")
    })
    .await;
    let child = hotkey_worker(&h, keys.path(), "//Dave", &validator).spawn().unwrap();
    h.adopt(child);
    h.wait_for_worker(&ss58("//Dave")).await;
    assert_eq!(h.capacity.operator_of(&ss58("//Dave")).await.unwrap(), Some(ss58("//Cold3")));
    let before: HashSet<String> = h.all_verdicts().await.into_iter().map(|v| v.task_id).collect();
    let requests = h.sample_requests(24, "after", 4, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    for v in h.all_verdicts().await.into_iter().filter(|v| !before.contains(&v.task_id)) {
        assert!(v.miners.iter().all(|m| m.worker != bob), "task {} went to deregistered Bob", v.task_id);
    }
    let status = sundara::chain::status_text(&h.capacity.chain_status().await.unwrap(), sundara_schemas::now_ms());
    assert!(status.contains("block 200, 3 neurons"), "{status}");

    // The chain's endpoint answers nonsense (or nothing): the metagraph held stays in use,
    // and the status says how old it is and why the last read failed.
    std::fs::write(&metagraph, "<html>502 Bad Gateway</html>").unwrap();
    wait::until_true("the failed read to show", Duration::from_secs(20), || async {
        h.capacity.chain_status().await.unwrap().error.is_some()
    })
    .await;
    let held = h.capacity.chain_status().await.unwrap();
    assert_eq!((held.block, held.neurons), (Some(200), 3), "{held:?}");
    let status = sundara::chain::status_text(&held, sundara_schemas::now_ms());
    assert!(status.contains("last read failed") && status.contains("not a metagraph"), "{status}");
    let requests = h.sample_requests(8, "stale", 4, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);

    shutdown.cancel();
    chain.await.unwrap();
    h.stop().await;
}

/// The cartel of the adversarial tests, as two hotkeys under one coldkey: with operators
/// taken from the chain it never holds two replicas of a task, so it never holds a
/// majority, however it names itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cartel_under_one_coldkey_never_holds_two_replicas() {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let dir = tempfile::tempdir().unwrap();
    let metagraph = dir.path().join("metagraph.json");
    let honest_keys = ["//Charlie", "//Dave", "//Eve"];
    let mut neurons = vec![neuron(0, "//Alice", "//Cartel", 1), neuron(1, "//Bob", "//Cartel", 1)];
    for (i, uri) in honest_keys.iter().enumerate() {
        neurons.push(neuron(2 + i as u16, uri, &format!("//Honest{i}"), 1));
    }
    write_metagraph(&metagraph, 1, neurons);
    sundara::auth::enable_callout(dir.path()).unwrap();
    let shutdown = Shutdown::new();
    let chain = serve_chain(stack.endpoints(), dir.path(), &metagraph, &shutdown).await;
    let workers = honest_keys.iter().map(|uri| honest(&ss58(uri), 1)).collect();
    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: 0.0 };
    let mut h = Harness::start_on(stack, workers, policy, Duration::from_secs(5), |_| {}).await;
    // Each states an operator of its own: the chain's coldkey counts instead.
    let alice = support::attack::Miner::join(&h, &ss58("//Alice"), "alice-op", 8).await;
    let bob = support::attack::Miner::join(&h, &ss58("//Bob"), "bob-op", 8).await;
    let cartel = [ss58("//Alice"), ss58("//Bob")];
    let answering: Vec<_> = [alice, bob]
        .into_iter()
        .map(|m| {
            let m = Arc::new(m);
            tokio::spawn(async move {
                use futures::StreamExt;
                let mut taken = m.assignments().await;
                while let Some(t) = taken.next().await {
                    let outputs = t.honest.clone();
                    m.answer(t, outputs).await;
                }
            })
        })
        .collect();
    let requests = h.sample_requests(60, "cartel", 2, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    let verdicts = h.all_verdicts().await;
    let with_cartel = verdicts.iter().filter(|v| v.miners.iter().any(|m| cartel.contains(&m.worker))).count();
    assert!(with_cartel > 0, "the cartel got work");
    for v in &verdicts {
        let held = v.miners.iter().filter(|m| cartel.contains(&m.worker)).count();
        assert!(held <= 1, "task {}: the cartel held {held} replicas: {:?}", v.task_id, v.miners);
    }
    for a in answering {
        a.abort();
    }
    shutdown.cancel();
    chain.await.unwrap();
    h.stop().await;
}

/// The chain double's state: subnet 7 at block 1000, a block every 100 ms, commit-reveal
/// on, weights at most every 3 blocks, version key at least 2, the validator permitted.
fn double_state(path: &Path, neurons: Vec<Neuron>) {
    let state = serde_json::json!({
        "netuid": 7, "start_block": 1000, "block_seconds": 0.1,
        "started_at": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64(),
        "commit_reveal": true, "weights_rate_limit": 3, "weights_version": 2,
        "permits": [ss58("//Validator")],
        "metagraph": { "netuid": 7, "block": 1000, "neurons": neurons },
    });
    std::fs::write(path, state.to_string()).unwrap();
}

fn edit_double(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut state);
    std::fs::write(path, state.to_string()).unwrap();
}

fn received(path: &Path) -> Vec<serde_json::Value> {
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    state["received"].as_array().cloned().unwrap_or_default()
}

/// Each epoch's weights reach the chain (here its double, which enforces the subnet's
/// rules and records what it receives): mapped to uids through the metagraph, as a
/// commit (the subnet has commit-reveal on), with the subnet's version key, no sooner than
/// the rate limit allows, through transient failures of the chain; a validator that lost
/// its permit sends nothing. Every try is recorded beside the epoch's weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn epoch_weights_reach_the_chain_under_its_rules() {
    let creds = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (auth, stack) = chain_stack(creds.path());
    let state = dir.path().join("chain.json");
    let miners = ["//Alice", "//Bob", "//Charlie"];
    let neurons: Vec<Neuron> =
        miners.iter().enumerate().map(|(i, m)| neuron(i as u16 + 4, m, &format!("{m}Cold"), 1)).collect();
    double_state(&state, neurons);
    let double = project_root().join("testkit/chain_double.py");
    let bridge = format!("python3 {} --state {} --hotkey {}", double.display(), state.display(), ss58("//Validator"));

    let shutdown = Shutdown::new();
    let mut endpoints = stack.endpoints();
    endpoints.nats.credentials = Some(auth.credentials(&Role::Service(Service::Chain)));
    let workers = miners.iter().map(|m| honest(&ss58(m), 1)).collect();
    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: 0.0 };
    let mut h = Harness::start_on(stack, workers, policy, Duration::from_secs(5), |_| {}).await;
    let args = sundara::chain::ServeArgs {
        metagraph: None,
        bridge: Some(bridge.clone()),
        netuid: Some(7),
        version_key: None,
        weights_every_s: 0.1,
        sync_every_s: 0.2,
        validator_hotkey: ss58("//Validator"),
        credentials_dir: creds.path().to_path_buf(),
        miner_session_s: 3600,
    };
    let chain = tokio::spawn({
        let (shutdown, config) = (shutdown.clone(), sundara::chain::Config { endpoints, args });
        async move { sundara::chain::run(config, shutdown).await.expect("the chain service runs") }
    });
    wait::until_true("the metagraph read through the bridge", Duration::from_secs(20), || async {
        h.capacity.chain_status().await.unwrap().neurons == 3
    })
    .await;

    // Epoch 1: the weights go out as a commit, mapped to uids.
    let requests = h.sample_requests(20, "w1", 4, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    let first = close_epoch(&h).await;
    let metagraph = Metagraph { netuid: 7, block: 0, neurons: h.capacity.neurons().await.unwrap() };
    let want = sundara_chain::weights::to_uids(&first, &metagraph);
    assert_eq!(want.uids.len(), 3, "every miner earned: {first:?}");
    wait::until_true("the chain to receive epoch 1", Duration::from_secs(30), || async { received(&state).len() == 1 })
        .await;
    let got = &received(&state)[0];
    assert_eq!(got["uids"], serde_json::json!(want.uids));
    assert_eq!(got["weights"], serde_json::json!(want.weights));
    assert_eq!((got["mode"].as_str(), got["version_key"].as_u64()), (Some("commit_reveal"), Some(2)));

    // Epoch 2, at once: held back by the rate limit, then through two failures of the chain.
    edit_double(&state, |s| s["fail_next"] = 2.into());
    let requests = h.sample_requests(20, "w2", 4, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    let second = close_epoch(&h).await;
    wait::until_true("the chain to receive epoch 2", Duration::from_secs(40), || async { received(&state).len() == 2 })
        .await;
    let got = received(&state);
    assert!(got[1]["block"].as_u64().unwrap() >= got[0]["block"].as_u64().unwrap() + 3, "the rate limit held: {got:?}");
    wait::until_true("epoch 2's record to say so", Duration::from_secs(10), || async {
        submission(&h, second.epoch).await["attempts"].as_array().unwrap().len() == 3
    })
    .await;
    let record = submission(&h, second.epoch).await;
    assert!(!record["uids"].as_array().unwrap().is_empty(), "{record}");
    let kinds: Vec<&str> =
        record["attempts"].as_array().unwrap().iter().map(|a| a[1]["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["unavailable", "unavailable", "included"], "{record}");

    // The validator loses its permit: epoch 3 is refused by the chain and not retried.
    edit_double(&state, |s| s["permits"] = serde_json::json!([]));
    let third = close_epoch(&h).await;
    wait::until_true("epoch 3's record", Duration::from_secs(30), || async {
        h.js.get_key_value("rewards")
            .await
            .unwrap()
            .get(sundara::chain::submission_key(third.epoch))
            .await
            .unwrap()
            .is_some()
    })
    .await;
    let record = submission(&h, third.epoch).await;
    assert_eq!(record["attempts"][0][1]["kind"], "no_permit", "{record}");
    assert_eq!(received(&state).len(), 2);

    // What an operator sees: the metagraph, the last weights and the chain's answer; and
    // what would be sent now.
    let ep = h.stack.endpoints();
    let cli = |args: &[&str]| {
        let out = Command::new(sundara_binary())
            .args(args)
            .env("SUNDARA_NATS_URL", &ep.nats.url)
            .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
            .env("SUNDARA_NATS_CREDS", auth.credentials(&Role::Validator))
            .env("SUNDARA_REDIS_URL", &ep.redis_url)
            .env("SUNDARA_CONTEXT", dir.path().join("no-context.json"))
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "sundara {args:?}: {text}");
        text
    };
    let validator = ss58("//Validator");
    let status = cli(&["chain", "status", "--validator-hotkey", &validator]);
    assert!(status.contains("metagraph: subnet 7") && status.contains("3 neurons"), "{status}");
    assert!(status.contains(&format!("weights: epoch {}", third.epoch)) && status.contains("NoPermit"), "{status}");
    assert!(status.contains("is not registered"), "{status}");
    let dry = cli(&["chain", "weights", "--dry-run", "--bridge", &bridge, "--netuid", "7"]);
    assert!(dry.contains(&format!("epoch {}", third.epoch)) && dry.contains("CommitReveal"), "{dry}");

    shutdown.cancel();
    chain.await.unwrap();
    h.stop().await;
}

/// Closes the rewarder's epoch now; its weights.
async fn close_epoch(h: &Harness) -> sundara_schemas::EpochWeights {
    let reply =
        h.js.client()
            .request(sundara_schemas::subjects::REWARDER_CLOSE, "".into())
            .await
            .expect("the rewarder closes the epoch");
    sundara_schemas::decode(&reply.payload, sundara_schemas::MAX_MESSAGE_BYTES).unwrap()
}

/// The record of the weights sent for `epoch`.
async fn submission(h: &Harness, epoch: u64) -> serde_json::Value {
    let kv = h.js.get_key_value("rewards").await.unwrap();
    let bytes = kv.get(sundara::chain::submission_key(epoch)).await.unwrap().expect("a record");
    serde_json::from_slice(&bytes).unwrap()
}

/// The bridge on the Bittensor SDK speaks the same protocol; without the SDK (as here) or
/// without a chain it fails with a reason, which `chain serve` treats as the chain being
/// unavailable. (It cannot be run against a chain here: see the double above.)
#[test]
fn the_sdk_bridge_fails_with_a_reason_without_a_chain() {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg(project_root().join("scripts/bittensor_bridge.py"))
        .args(["--network", "ws://127.0.0.1:1", "rules"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(br#"{"netuid": 7}"#).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("pip install bittensor") || said.contains("unreachable"), "{said}");
}

/// `sundara up --chain`, joined as a new miner would from docs/bittensor.md: make a hotkey,
/// register it (on the development metagraph, standing in for `btcli subnet register`), run
/// a worker with it; it is let in, announced under its coldkey, and serves tasks.
#[test]
fn a_new_miner_joins_a_local_subnet_by_its_hotkey() {
    let state = tempfile::tempdir().unwrap();
    let context = state.path().join("up.json");
    let (_up, said) = support::up::start(&context, &["--chain", "--tasks", "10"], "serving on");
    let line = |prefix: &str| {
        said.iter()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_string))
            .unwrap_or_else(|| panic!("{said:#?}"))
    };
    let metagraph = line("sundara chain register-dev --metagraph ").split(' ').next().unwrap().to_string();
    let validator = line("sundara worker --hotkey-file my-hotkey.json --validator-hotkey ");
    let cli = |args: &[&str]| {
        let out = support::up::sundara(Command::new(sundara_binary()), &context).args(args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "sundara {args:?}: {text}");
        text
    };
    let hotkey_file = state.path().join("my-hotkey.json");
    let made = cli(&["chain", "keygen", "--out", hotkey_file.to_str().unwrap()]);
    let address = made.split_whitespace().nth(1).unwrap().to_string();
    cli(&["chain", "register-dev", "--metagraph", &metagraph, hotkey_file.to_str().unwrap()]);
    let worker = support::up::sundara(Command::new(sundara_binary()), &context)
        .args(["worker", "--validator-hotkey", &validator, "--hotkey-file", hotkey_file.to_str().unwrap()])
        .arg("--cache-dir")
        .arg(state.path().join("models"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _worker = support::up::Running(worker);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cli(&["fleet"]).contains(&address) {
        assert!(std::time::Instant::now() < deadline, "{address} did not join: {}", cli(&["fleet"]));
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = cli(&["chain", "status"]);
    assert!(status.contains("at block 2"), "one registration since the start: {status}");
    let submitted = cli(&["submit", "--model", "mlp", "--count", "10"]);
    assert!(submitted.contains("10 verified"), "{submitted}");
}
