//! The Python client (`clients/python`, importable as `sundara`), run with the project's
//! `.venv` python: its wire format against `schemas/golden/` (its unit tests), and the client
//! itself against a running pipeline on a secured stack (TLS, the tenant's own NKey): a
//! verified inference equal to the model run directly, the same task for the same request
//! id, typed rejections, and the sync client.

use sundara_testkit as support;

use std::process::Command;
use std::time::Duration;

use sundara::auth::Role;
use sundara::stack::{LocalStack, project_root};
use sundara_schemas::Tensor;
use support::Harness;

fn python() -> Command {
    let root = project_root();
    let mut python = Command::new(root.join(".venv/bin/python"));
    python.current_dir(&root).env("PYTHONPATH", root.join("clients/python"));
    python
}

fn run(mut command: Command) -> String {
    let out = command.output().expect("the venv's python runs (run scripts/setup)");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{:?} failed:\n{stdout}\n{stderr}", command.get_args().collect::<Vec<_>>());
    stdout.into_owned()
}

#[test]
fn the_python_wire_format_is_the_golden_bytes() {
    let mut unit = python();
    unit.args(["-m", "unittest", "discover", "-s", "clients/python/tests", "-p", "test_*.py"]);
    run(unit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_client_gets_verified_results_from_a_secured_pipeline() {
    let creds = tempfile::tempdir().unwrap();
    let auth = sundara::auth::init(creds.path(), &["test".into()], &["w1".into(), "w2".into()]).unwrap();
    let stack = LocalStack::start_secured(&project_root(), &auth).expect("servers start (run scripts/setup)");
    let (url, ca) = (stack.endpoints().nats.url, stack.pki.ca());
    let workers = vec![support::honest("w1", 1), support::honest("w2", 1)];
    let policy = sundara_schemas::Policy { redundancy: 2, rule: support::RULE, audit_rate: 0.0 };
    let as_themselves = |c: &mut sundara::pipeline::PipelineConfig| c.credentials_dir = Some(auth.dir.clone());
    let h = Harness::start_on(stack, workers, policy, Duration::from_secs(10), as_themselves).await;

    let mut e2e = python();
    e2e.arg("clients/python/tests/e2e.py")
        .env("SUNDARA_NATS_URL", &url)
        .env("SUNDARA_NATS_CA", &ca)
        .env("SUNDARA_NATS_CREDS", auth.credentials(&Role::Tenant("test".into())));
    let stdout = tokio::task::spawn_blocking(move || run(e2e)).await.unwrap();
    let got: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();

    assert_eq!(got["tenant"], "test", "the tenant is the credentials'");
    let values: Vec<f32> = (0..2 * 784).map(|i| ((i % 100) as f64 / 100.0) as f32).collect();
    let want = support::reference(&h.models["mlp"], &[Tensor::from_values("x", vec![2, 784], &values)]);
    let outputs: Vec<Tensor> = want
        .iter()
        .map(|w| {
            let o = &got["outputs"][&w.name];
            let values: Vec<f32> = serde_json::from_value(o["values"].clone()).unwrap();
            Tensor::from_values(&w.name, serde_json::from_value(o["shape"].clone()).unwrap(), &values)
        })
        .collect();
    assert!(sundara_verifier::compare::agree(&support::RULE, &outputs, &want), "{got}");
    assert_eq!(got["same_task_again"], true);
    // The batch job: 250 rows in 3 shards, put back in order.
    assert_eq!(got["job"]["shapes"], serde_json::json!([[250, 10], [250, 10]]), "{got}");
    assert!(got["job"]["max_diff"].as_f64().unwrap() < 1e-4, "{got}");
    assert_eq!(got["job"]["progress"], serde_json::json!([3, 3]), "{got}");
    // The same rows as a server-side job, in three parts: the same outputs.
    assert_eq!(got["server_job"]["parts"], 3, "{got}");
    assert_eq!(got["server_job"]["shapes"], serde_json::json!([[250, 10], [250, 10]]), "{got}");
    assert!(got["server_job"]["max_diff"].as_f64().unwrap() < 1e-4, "{got}");
    assert_eq!(got["server_job"]["listed"], true, "{got}");
    assert_eq!(got["job_refusals"], serde_json::json!(["not_found", "wrong_state"]), "{got}");
    assert_eq!(got["rejected"], serde_json::json!(["unknown_model", "wrong_shape"]), "{got}");
    assert_eq!(got["sync_outputs"], 2, "logits and probs through the sync client");
    h.stop().await;
}
