//! `sundara submit` as a user runs it: the real binary against a real stack, its output
//! piped (not a terminal), its exit code read.

use sundara_testkit as support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use support::{Harness, honest};

/// What one run of the binary printed, and how it exited.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `sundara <args>` against the harness's servers (or, without one, servers that are
/// not there), bounded by 120 s.
async fn sundara(h: Option<&Harness>, args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sundara"));
    match h {
        Some(h) => {
            let ep = h.stack.endpoints();
            // Redis' password in the environment: in --redis it is refused.
            cmd.args(["--nats", &ep.nats.url]).env("SUNDARA_REDIS_URL", &ep.redis_url);
            if let Some(tls) = &ep.nats.tls {
                cmd.arg("--nats-ca").arg(&tls.ca);
            }
        }
        None => {
            let port = sundara::stack::free_port().unwrap();
            cmd.args(["--nats", &format!("nats://127.0.0.1:{port}"), "--redis", &format!("redis://127.0.0.1:{port}/")]);
        }
    }
    cmd.args(args).env_remove("RUST_LOG").stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("sundara {args:?} did not finish within 120 s"))
        .expect("the sundara binary runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn write(dir: &Path, name: &str, json: &serde_json::Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, json.to_string()).unwrap();
    path.display().to_string()
}

/// The mlp's input, `x` of shape `[rows, 784]`, with `values` as given.
fn mlp_input(shape: &[u64], values: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "x", "dtype": "f32", "shape": shape, "values": values}]})
}

fn json_lines(run: &Run) -> Vec<serde_json::Value> {
    run.lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{run:?}")))
        .collect()
}

/// k=3 with one worker: no task can be dispatched, and every one expires. The user sees a
/// line per task and a summary saying so, and the exit code is not 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_that_all_expire_are_each_reported_and_the_exit_code_says_so() {
    let h = Harness::start(vec![honest("w1", 1)], 3, Duration::from_secs(10)).await;

    let run = sundara(Some(&h), &["submit", "--model", "mlp", "--count", "5", "--timeout-ms", "1000"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    let lines = run.lines();
    assert_eq!(lines.len(), 6, "one line per task and the summary: {run:?}");
    // The reason is the scheduler's: here, that one worker cannot be 3 distinct miners.
    for line in &lines[..5] {
        let (task, rest) = line.split_once(' ').unwrap();
        assert_eq!(task.len(), 32, "a task id first: {run:?}");
        assert!(rest.starts_with("expired: ") && !rest.contains("expired: expired"), "{run:?}");
    }
    assert!(lines[5].starts_with("5 submitted: 0 verified, 5 expired ("), "{run:?}");
    assert_eq!(run.stderr, "", "nothing else, and no error: the summary says it");

    let run = sundara(Some(&h), &["submit", "--model", "mlp", "--count", "3", "--timeout-ms", "1000", "--json"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    let lines = json_lines(&run);
    assert_eq!(lines.len(), 3, "one JSON object per task, nothing else on stdout: {run:?}");
    for line in &lines {
        assert_eq!(line["status"], "failed", "{line}");
        assert_eq!(line["code"], "expired", "{line}");
        assert_eq!(line["model"], "mlp@1", "{line}");
        assert!(line["task_id"].as_str().is_some_and(|id| !id.is_empty()), "{line}");
    }
    assert!(run.stderr.starts_with("3 submitted: 0 verified, 3 expired ("), "the summary on stderr: {run:?}");
    h.stop().await;
}

/// Verified tasks exit 0; `--json` has every output value; a nested-list input file is
/// taken; an empty input is refused by the ingress with its code, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verified_tasks_exit_zero_and_rejections_are_counted_with_their_code() {
    let h = Harness::start(vec![honest("w1", 1)], 1, Duration::from_secs(10)).await;
    let dir = tempfile::tempdir().unwrap();

    let run = sundara(Some(&h), &["submit", "--model", "mlp", "--count", "4", "--rows", "2", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let lines = json_lines(&run);
    assert_eq!(lines.len(), 4, "{run:?}");
    for line in &lines {
        assert_eq!(line["status"], "verified", "{line}");
        assert_eq!((line["agreeing"].as_u64(), line["k"].as_u64()), (Some(1), Some(1)), "{line}");
        let outputs = line["outputs"].as_array().unwrap();
        assert_eq!(outputs.len(), 2, "logits and probs: {line}");
        for o in outputs {
            assert_eq!(o["shape"], serde_json::json!([2, 10]), "{o}");
            assert_eq!(o["values"].as_array().unwrap().len(), 20, "every value: {o}");
        }
    }
    assert_eq!(run.stderr.trim_end(), "4 submitted: 4 verified");

    // numpy's tolist() of a [2, 784] array.
    let rows: Vec<Vec<f32>> = (0..2).map(|r| (0..784).map(|i| ((r * 784 + i) % 17) as f32 / 17.0).collect()).collect();
    let nested = write(dir.path(), "nested.json", &mlp_input(&[2, 784], serde_json::json!(rows)));
    let run = sundara(Some(&h), &["submit", "--model", "mlp", "--input", &nested]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains(" verified by 1/1 miners (mlp@1)"), "{run:?}");
    assert!(run.stdout.contains("logits f32[2, 10] ["), "{run:?}");
    assert!(!run.stdout.contains('…'), "20 values are all shown: {run:?}");
    assert!(run.stdout.ends_with("1 submitted: 1 verified\n"), "{run:?}");

    let empty = write(dir.path(), "empty.json", &mlp_input(&[0, 784], serde_json::json!([])));
    let run = sundara(Some(&h), &["submit", "--model", "mlp", "--input", &empty]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stdout.starts_with("rejected (wrong_shape): input `x` has shape [0, 784]"), "{run:?}");
    assert!(run.stdout.contains("\n1 submitted: 0 verified, 1 rejected (wrong_shape: "), "{run:?}");

    // Submissions go on after a rejection, and JSON has a line for each.
    let run = sundara(Some(&h), &["submit", "--model", "mlp", "--input", &empty, "--count", "3", "--json"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    let lines = json_lines(&run);
    assert_eq!(lines.len(), 3, "{run:?}");
    for line in &lines {
        assert_eq!((line["status"].as_str(), line["code"].as_str()), (Some("rejected"), Some("wrong_shape")), "{line}");
        assert!(line["task_id"].is_null(), "{line}");
    }
    assert!(run.stderr.starts_with("3 submitted: 0 verified, 3 rejected (wrong_shape: "), "{run:?}");
    h.stop().await;
}

/// An input file the dtype or shape cannot take is refused before anything is sent (no
/// server runs here), with the input and index named, once, and exit code 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_input_file_is_refused_before_submitting_with_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let huge = write(dir.path(), "huge.json", &mlp_input(&[1, 4], serde_json::json!([[0.5, 1e39, 0.0, 0.0]])));
    let run = sundara(None, &["submit", "--model", "mlp", "--input", &huge]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stderr, format!("error: {huge}: x[0][1]: 1e+39 is out of range for f32\n"));
    assert_eq!(run.stdout, "");

    let short = write(dir.path(), "short.json", &mlp_input(&[1, 4], serde_json::json!([1, 2, 3])));
    let run = sundara(None, &["submit", "--model", "mlp", "--input", &short]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stderr, format!("error: {short}: x: shape [1, 4] needs 4 values, got 3\n"));
}

/// An error whose message already says its cause is printed once, not again as a cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.json").display().to_string();
    let run = sundara(None, &["submit", "--model", "mlp", "--input", &missing]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert_eq!(run.stderr, format!("error: cannot read {missing}: No such file or directory (os error 2)\n"));
}
