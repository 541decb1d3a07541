//! The model registry on the real stack: published versions are immutable (`sundara models
//! push` run as the user runs it), policies that cannot work are refused, a policy the
//! fleet cannot serve now is warned about, `models rm` keeps removed numbers from other
//! bytes, clients pin versions with `name@version`, and a task that expires for want of
//! distinct operators is told so.

use sundara_testkit as support;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use rand::SeedableRng;
use sha2::{Digest, Sha256};
use sundara::stack::{LocalStack, project_root};
use sundara_common::registry::{PushError, Pushed};
use sundara_common::{Endpoints, Registry, nats};
use sundara_schemas::{
    FailureCode, ModelMeta, Policy, PolicyError, RejectCode, ResultStatus, SubmitOutcome, SubmitRequest,
};
use support::{Harness, RULE, await_results, honest, wait};

fn model_file(file: &str) -> PathBuf {
    project_root().join(".cache/models").join(file)
}

fn sha(file: &str) -> String {
    hex::encode(Sha256::digest(std::fs::read(model_file(file)).expect("demo models exist (run scripts/setup)")))
}

/// `sundara <args>` against the stack, as a user runs it; waits for it to exit.
async fn sundara(endpoints: &Endpoints, args: &[&str]) -> Output {
    let ort = sundara_runtime::find_library(&[project_root()]).expect("run scripts/setup");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sundara"));
    cmd.args(["--nats", &endpoints.nats.url]).args(args).env("ORT_DYLIB_PATH", ort);
    for (k, _) in std::env::vars() {
        if k.starts_with("SUNDARA_") {
            cmd.env_remove(k);
        }
    }
    // In the environment: a password in --redis is refused (`ps` would show it).
    cmd.env("SUNDARA_REDIS_URL", &endpoints.redis_url);
    if let Some(creds) = &endpoints.nats.credentials {
        cmd.arg("--nats-creds").arg(creds);
    }
    if let Some(tls) = &endpoints.nats.tls {
        cmd.arg("--nats-ca").arg(&tls.ca);
    }
    let run = tokio::time::timeout(Duration::from_secs(60), cmd.output());
    run.await.expect("sundara exits within a minute").expect("sundara runs")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `models push FILE --name NAME` with extra arguments.
async fn push(endpoints: &Endpoints, file: &str, name: &str, extra: &[&str]) -> Output {
    let path = model_file(file);
    let mut args = vec!["models", "push", path.to_str().unwrap(), "--name", name];
    args.extend_from_slice(extra);
    sundara(endpoints, &args).await
}

/// A stack of its own with the registry open on it.
async fn registry_on_a_stack() -> (LocalStack, Endpoints, Registry) {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let ep = stack.endpoints();
    let registry = open_registry(&ep).await;
    (stack, ep, registry)
}

async fn open_registry(endpoints: &Endpoints) -> Registry {
    let client = nats::connect(&endpoints.nats, "test").await.unwrap();
    let js = async_nats::jetstream::new(client);
    nats::provision(&js, &nats::Retention::default()).await.unwrap();
    Registry::open(&js).await.unwrap()
}

fn init_ort() {
    let lib = sundara_runtime::find_library(&[project_root()]).expect("run scripts/setup");
    sundara_runtime::init(&lib).unwrap();
}

/// The user's story: the same file twice is a no-op, another file becomes the next
/// version, and another file under a published version is refused with both sha256s and
/// the next free version named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_versions_are_immutable() {
    let (_stack, ep, registry) = registry_on_a_stack().await;
    let (light, heavy) = (sha("mlp.onnx"), sha("mlp_heavy.onnx"));
    assert_ne!(light, heavy, "two different demo files");

    let first = push(&ep, "mlp.onnx", "m", &[]).await;
    let (stdout, _) = text(&first);
    assert!(first.status.success(), "{first:?}");
    assert!(stdout.starts_with("m ") && stdout.contains(&light[..12]), "{stdout}");
    assert_eq!(registry.version("m", "1").await.unwrap().unwrap().sha256, light);

    let again = push(&ep, "mlp.onnx", "m", &[]).await;
    assert!(again.status.success(), "{again:?}");
    assert!(text(&again).0.contains("m@1 unchanged"), "{again:?}");
    assert!(registry.version("m", "2").await.unwrap().is_none(), "no version was made of the same bytes");

    let other = push(&ep, "mlp_heavy.onnx", "m", &[]).await;
    assert!(other.status.success(), "{other:?}");
    let m2 = registry.version("m", "2").await.unwrap().expect("other bytes became m@2");
    assert_eq!(m2.sha256, heavy);
    assert_eq!(registry.version("m", "1").await.unwrap().unwrap().sha256, light, "m@1 kept its bytes");
    assert_eq!(wait_latest(&registry, "m", "2").await.sha256, heavy);

    let refused = push(&ep, "mlp_heavy.onnx", "m", &["--version", "1"]).await;
    let (_, stderr) = text(&refused);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(stderr.contains("m@1 is already published with other bytes"), "{stderr}");
    assert!(stderr.contains(&light[..12]) && stderr.contains(&heavy[..12]) && stderr.contains("m@3"), "{stderr}");
    let m1 = registry.version("m", "1").await.unwrap().unwrap();
    assert_eq!(m1.sha256, light);
    // The bytes miners fetch are m@1's own, still.
    let bytes = registry.fetch(&m1).await.unwrap();
    assert_eq!(hex::encode(Sha256::digest(&bytes)), light);

    // The same bytes under another policy are another version, too.
    let named = push(&ep, "mlp.onnx", "m", &["--version", "1", "--redundancy", "3"]).await;
    assert!(!named.status.success() && text(&named).1.contains("another policy"), "{named:?}");
    let auto = push(&ep, "mlp_heavy.onnx", "m", &["--redundancy", "3"]).await;
    assert!(auto.status.success(), "{auto:?}");
    assert_eq!(registry.version("m", "3").await.unwrap().expect("m@3").policy.redundancy, 3);
}

/// Waits (bounded) until the registry's view of `name`'s latest version is `version`
/// (another process pushed it; the view follows a KV watch).
async fn wait_latest(registry: &Registry, name: &str, version: &str) -> ModelMeta {
    wait::until(format_args!("{name}@{version} to become the latest"), Duration::from_secs(10), || async {
        match registry.latest(name).await.unwrap() {
            Some(m) if m.version == version => Ok((*m).clone()),
            other => Err(other.map(|m| m.version.clone())),
        }
    })
    .await
}

/// k=0 (and other policies that can never work) are refused before anything is
/// registered, by the CLI and by the registry itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_that_cannot_work_are_refused() {
    let (_stack, ep, registry) = registry_on_a_stack().await;
    for (args, says) in [
        (&["--redundancy", "0"][..], "redundancy must be 1 to 9"),
        (&["--redundancy", "10"][..], "redundancy must be 1 to 9"),
        (&["--audit-rate", "1.5"][..], "audit rate must be between 0 and 1"),
        (&["--atol=-1"][..], "atol must be a finite number"),
        (&["--rule", "cosine", "--min-cosine", "2"][..], "minimum cosine similarity"),
        (&["--max-batch", "0"][..], "max batch must be at least 1"),
    ] {
        let out = push(&ep, "mlp.onnx", "bad", args).await;
        assert!(!out.status.success(), "{args:?} accepted: {out:?}");
        assert!(text(&out).1.contains(says), "{args:?}: {out:?}");
    }
    assert!(registry.versions("bad").await.unwrap().published.is_empty(), "nothing registered");

    // No path around the CLI registers one either.
    init_ort();
    let policy = Policy { redundancy: 0, rule: RULE, audit_rate: 0.0 };
    let refused =
        sundara::models::push(&registry, &model_file("mlp.onnx"), "bad", "1", policy, Default::default()).await;
    assert!(
        matches!(
            refused,
            Err(sundara::models::ModelError::Push(PushError::Policy { source: PolicyError::Redundancy(0), .. }))
        ),
        "{refused:?}"
    );

    // k=1 works, with a warning that only audits check it.
    let single = push(&ep, "mlp.onnx", "single", &["--redundancy", "1"]).await;
    assert!(single.status.success(), "{single:?}");
    assert!(text(&single).1.contains("k=1: no miner's answer is cross-checked"), "{single:?}");
}

/// Two pushes of one version with different bytes at once: exactly one wins, the other is
/// refused, and the version's record and bytes are the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pushes_of_one_version_have_one_winner() {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let ep = stack.endpoints();
    let (a, b) = (open_registry(&ep).await, open_registry(&ep).await);
    let js = async_nats::jetstream::new(nats::connect(&ep.nats, "test").await.unwrap());
    let blobs = js.get_object_store(sundara_schemas::subjects::MODEL_BLOBS).await.unwrap();
    let light = std::fs::read(model_file("mlp.onnx")).unwrap();
    let heavy = std::fs::read(model_file("mlp_heavy.onnx")).unwrap();
    let meta = |version: &str, bytes: &[u8]| ModelMeta {
        v: sundara_schemas::WIRE_VERSION,
        name: "race".into(),
        version: version.into(),
        sha256: hex::encode(Sha256::digest(bytes)),
        size: bytes.len() as u64,
        object: String::new(),
        inputs: vec![],
        outputs: vec![],
        policy: Policy::default(),
        pushed_at_ms: sundara_schemas::now_ms(),
        batching: Default::default(),
        lineage: None,
    };
    for version in ["1", "2", "3", "4", "5"] {
        let (x, y) = (meta(version, &light), meta(version, &heavy));
        let (pushed_x, pushed_y) = tokio::join!(a.push(&x, &light), b.push(&y, &heavy));
        let (won, lost) = match (pushed_x, pushed_y) {
            (Ok(Pushed::Created(m)), Err(e)) | (Err(e), Ok(Pushed::Created(m))) => (m, e),
            other => panic!("{version}: not one winner: {other:?}"),
        };
        assert!(matches!(lost, PushError::VersionExists { .. }), "{lost:?}");
        let stored = a.version("race", version).await.unwrap().unwrap();
        assert_eq!(stored.sha256, won.sha256);
        assert_eq!(hex::encode(Sha256::digest(b.fetch(&stored).await.unwrap())), won.sha256, "the winner's bytes");
        // The loser's upload does not stay behind.
        let loser = if won.sha256 == x.sha256 { &y.sha256 } else { &x.sha256 };
        let orphan = sundara_common::registry::object_name("race", version, loser);
        assert!(!blobs.info(&orphan).await.is_ok_and(|i| !i.deleted), "{orphan} left behind");
    }
    assert_eq!(wait_latest(&a, "race", "5").await.version, "5");
}

/// `models rm`: a removed version is gone from the registry with its bytes, `latest` goes
/// back to the newest version left, and the removed number is never given to other bytes
/// (explicitly or automatically).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_versions_keep_their_numbers() {
    let (_stack, ep, registry) = registry_on_a_stack().await;
    let (light, heavy) = (sha("mlp.onnx"), sha("mlp_heavy.onnx"));
    assert!(push(&ep, "mlp.onnx", "m", &[]).await.status.success());
    assert!(push(&ep, "mlp_heavy.onnx", "m", &[]).await.status.success());
    let m2 = registry.version("m", "2").await.unwrap().expect("m@2");

    let rm = sundara(&ep, &["models", "rm", "m@2"]).await;
    assert!(rm.status.success(), "{rm:?}");
    assert!(text(&rm).0.contains(&format!("removed m@2 (sha256 {}", &heavy[..12])), "{rm:?}");
    assert_eq!(wait_latest(&registry, "m", "1").await.sha256, light);
    assert!(registry.fetch(&m2).await.is_err(), "its bytes are gone");
    let list = sundara(&ep, &["models", "list"]).await;
    assert!(text(&list).0.contains(&light[..12]) && !text(&list).0.contains(&heavy[..12]), "{list:?}");

    let reuse = push(&ep, "mlp.onnx", "m", &["--version", "2"]).await;
    assert!(!reuse.status.success(), "{reuse:?}");
    assert!(text(&reuse).1.contains("m@2 was removed") && text(&reuse).1.contains("m@3"), "{reuse:?}");
    // Its own bytes may come back under it.
    let back = push(&ep, "mlp_heavy.onnx", "m", &["--version", "2"]).await;
    assert!(back.status.success(), "{back:?}");
    assert_eq!(wait_latest(&registry, "m", "2").await.sha256, heavy);
    let rm = sundara(&ep, &["models", "rm", "m@2"]).await;
    assert!(rm.status.success(), "{rm:?}");

    // Without --version, the next number skips the removed one.
    let next = push(&ep, "mlp_heavy.onnx", "m", &[]).await;
    assert!(next.status.success(), "{next:?}");
    assert_eq!(registry.version("m", "3").await.unwrap().expect("m@3").sha256, heavy);

    // Every version at once; the model leaves the list, and its numbers stay taken.
    let all = sundara(&ep, &["models", "rm", "m"]).await;
    let (stdout, _) = text(&all);
    assert!(all.status.success() && stdout.contains("removed m@1") && stdout.contains("removed m@3"), "{all:?}");
    wait::until_true("m to leave the registry's view", Duration::from_secs(10), || async {
        registry.latest("m").await.unwrap().is_none()
    })
    .await;
    assert!(!text(&sundara(&ep, &["models", "list"]).await).0.contains("m "), "m is still listed");
    let fresh = push(&ep, "mlp.onnx", "m", &[]).await;
    assert!(fresh.status.success(), "{fresh:?}");
    assert_eq!(registry.version("m", "4").await.unwrap().expect("m@4").sha256, light);

    let missing = sundara(&ep, &["models", "rm", "m@9"]).await;
    assert!(!missing.status.success() && text(&missing).1.contains("no model m@9"), "{missing:?}");
}

/// Tasks pinned to `m@1` and `m@2` run those versions' bytes (and carry the version to
/// their result); unpinned ones run the latest; a missing version is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_version_is_the_one_that_runs() {
    let mut h = Harness::start(vec![honest("a", 1), honest("b", 1)], 2, Duration::from_secs(10)).await;
    let registry = Registry::open(&h.js).await.unwrap();
    let policy = Policy { redundancy: 2, rule: RULE, audit_rate: 0.0 };
    let mut versions = Vec::new();
    for (file, version) in [("mlp.onnx", "1"), ("mlp_heavy.onnx", "2")] {
        let path = model_file(file);
        let meta = sundara::models::push(&registry, &path, "pin", version, policy, Default::default()).await.unwrap();
        versions.push((meta, path));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut requests = Vec::new();
    for (i, spec) in ["pin@1", "pin@2", "pin"].into_iter().enumerate() {
        let meta = if spec == "pin@1" { &versions[0].0 } else { &versions[1].0 };
        let inputs = sundara::models::sample_inputs(&meta.inputs, 1, &mut rng);
        requests.push(SubmitRequest { timeout_ms: Some(30_000), ..h.request(spec, inputs, &format!("pin-{i}")) });
    }
    let results = h.run_tasks(&requests).await;
    for (req, want_version) in requests.iter().zip(["1", "2", "2"]) {
        let task_id = sundara_ingress::task_id("test", req.request_id.as_deref());
        let result = &results[&task_id];
        assert_eq!(result.model.version, want_version, "{}", req.model);
        let (_, path) = &versions[if want_version == "1" { 0 } else { 1 }];
        let mut model = sundara_runtime::Model::load(&std::fs::read(path).unwrap(), 1).unwrap();
        let want = model.run(&req.inputs).unwrap();
        let ResultStatus::Verified { outputs, .. } = &result.status else { panic!("{}: {:?}", req.model, result) };
        assert!(sundara_verifier::compare::agree(&RULE, outputs, &want), "{}: not that version's outputs", req.model);
    }
    let missing = h.request("pin@9", requests[0].inputs.clone(), "pin-missing");
    match h.client.submit(&missing).await.unwrap() {
        SubmitOutcome::Rejected { code: RejectCode::UnknownModel, reason } => {
            assert!(reason.contains("\"9\"") && reason.contains("pin@2"), "{reason}")
        }
        other => panic!("pin@9 not refused: {other:?}"),
    }
    h.stop().await;
}

/// A k=3 model on a fleet of two operators: `models push` warns that its tasks will wait,
/// and a task of it expires telling the client that it needs 3 distinct operators and only
/// two serve it, naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_few_operators_are_warned_about_and_named_at_expiry() {
    let h = Harness::start(vec![honest("alice", 1), honest("bob", 1)], 3, Duration::from_secs(10)).await;
    let ep = h.stack.endpoints();

    let warned = push(&ep, "mlp_heavy.onnx", "wide", &["--redundancy", "3"]).await;
    assert!(warned.status.success(), "{warned:?}");
    let (_, stderr) = text(&warned);
    assert!(
        stderr.contains("warning: wide needs 3 distinct operators per task; the fleet has 2 now (alice, bob)"),
        "{stderr}"
    );
    let enough = push(&ep, "mlp_heavy.onnx", "narrow", &["--redundancy", "2"]).await;
    assert!(enough.status.success() && !text(&enough).1.contains("warning"), "{enough:?}");

    // The demo models were pushed with k=3; both workers serve mlp.
    let mut request = h.sample_requests(1, "wide", 3, |_| "mlp").remove(0);
    request.timeout_ms = Some(1000);
    let mut results = h.client.results().await.unwrap();
    let ids = h.submit_all(std::slice::from_ref(&request)).await;
    let got = await_results(&mut results, &ids).await;
    match &got[&ids[0]].status {
        ResultStatus::Failed { code: FailureCode::Expired, reason } => assert_eq!(
            reason, "expired: model mlp needs 3 distinct operators per task, only 2 serve it (alice, bob)",
            "{reason}"
        ),
        other => panic!("not expired: {other:?}"),
    }
    let letters = sundara::tasks::dead_letters(&h.js, 10).await.unwrap();
    assert!(letters[0].reason.contains("only 2 serve it"), "{}", letters[0].reason);
    h.stop().await;
}
