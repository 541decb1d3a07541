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
        metagraph: metagraph.to_path_buf(),
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
