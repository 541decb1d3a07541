//! `sundara submit`, and `sundara up`'s demo load: tasks are submitted while their results
//! are collected, every outcome is counted by kind ([`Tally`]) and shown as it comes (a
//! progress bar, a line per result, or JSON lines), and a summary ends the run.
//!
//! Exit codes ([`exit`]): 0 when every task was verified, 1 when some task was not
//! (rejected, expired, no consensus, no result by the deadline, or not sent), 2 when the
//! command could not run at all.

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use rand::SeedableRng;
use serde::Serialize;
use sundara_common::nats::{self, NatsEndpoint};
use sundara_common::{Registry, telemetry};
use sundara_schemas::{
    ClientResult, DType, FailureCode, ModelMeta, ModelRef, Priority, RejectCode, ResultStatus, SubmitOutcome,
    SubmitRequest, Tensor,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{Client, ClientError};

/// Exit codes of `sundara submit`; [`exit::ERROR`] is every command's when it fails.
pub mod exit {
    /// Every task was verified.
    pub const ALL_VERIFIED: u8 = 0;
    /// The command ran, but some task was not verified: rejected at submission, expired,
    /// no consensus, no result by the deadline, or not sent.
    pub const NOT_ALL_VERIFIED: u8 = 1;
    /// The command could not run: bad arguments or input file, no connection, unknown model.
    pub const ERROR: u8 = 2;
}

/// How long after a task's deadline its result is still awaited: the verifier decides a
/// task whose miners did not all answer at its deadline plus 30 s.
pub const RESULT_GRACE: Duration = Duration::from_secs(35);

/// Values of one output shown without `--json`; beyond it, a count of the rest.
pub const SHOWN_VALUES: usize = 64;

/// Results that arrive before their submission's reply is handled are kept, up to this many.
const MAX_EARLY_RESULTS: usize = 100_000;

/// One kind of failure: how many, and the first reason given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    pub count: usize,
    pub first_reason: Option<String>,
}

impl Counted {
    /// Counts one; true when it is the first (its reason is the one kept).
    fn add(&mut self, reason: &str) -> bool {
        self.count += 1;
        let first = self.first_reason.is_none();
        if first {
            self.first_reason = Some(reason.to_string());
        }
        first
    }

    fn reason(&self) -> &str {
        self.first_reason.as_deref().unwrap_or("")
    }
}

/// What became of the tasks of a run, by kind. Plain counting: no I/O.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Submissions made (accepted, rejected or not sent).
    pub submitted: usize,
    pub verified: usize,
    /// Refused by the ingress, per code in the order first seen.
    pub rejected: Vec<(RejectCode, Counted)>,
    /// [`FailureCode::Expired`]: the deadline passed before enough workers were free.
    pub expired: Counted,
    /// [`FailureCode::NoConsensus`]: the miners had no majority; the task is dead-lettered.
    pub no_consensus: Counted,
    /// Accepted, but no result arrived by the deadline (plus [`RESULT_GRACE`]).
    pub missing: usize,
    /// The submission itself failed (no ingress answered).
    pub unsent: Counted,
}

impl Tally {
    /// A submission the ingress accepted: its result is to come.
    pub fn accepted(&mut self) {
        self.submitted += 1;
    }

    /// A submission refused with `code`; true when it is the first with that code.
    pub fn rejected(&mut self, code: RejectCode, reason: &str) -> bool {
        self.submitted += 1;
        let at = match self.rejected.iter().position(|(c, _)| *c == code) {
            Some(at) => at,
            None => {
                self.rejected.push((code, Counted::default()));
                self.rejected.len() - 1
            }
        };
        self.rejected[at].1.add(reason)
    }

    /// A submission that got no answer; true when it is the first.
    pub fn unsent(&mut self, reason: &str) -> bool {
        self.submitted += 1;
        self.unsent.add(reason)
    }

    /// An accepted task's result; true when it is the first failure with its code.
    pub fn result(&mut self, status: &ResultStatus) -> bool {
        match status {
            ResultStatus::Verified { .. } => {
                self.verified += 1;
                false
            }
            ResultStatus::Failed { code: FailureCode::Expired, reason } => {
                self.expired.add(bare(FailureCode::Expired, reason))
            }
            ResultStatus::Failed { code: FailureCode::NoConsensus, reason } => {
                self.no_consensus.add(bare(FailureCode::NoConsensus, reason))
            }
        }
    }

    /// Accepted tasks whose results did not arrive by the deadline.
    pub fn missing(&mut self, n: usize) {
        self.missing += n;
    }

    pub fn rejected_total(&self) -> usize {
        self.rejected.iter().map(|(_, c)| c.count).sum()
    }

    /// Tasks not verified, whatever the reason.
    pub fn failed(&self) -> usize {
        self.rejected_total() + self.expired.count + self.no_consensus.count + self.missing + self.unsent.count
    }

    pub fn all_verified(&self) -> bool {
        self.failed() == 0
    }

    pub fn exit_code(&self) -> u8 {
        if self.all_verified() { exit::ALL_VERIFIED } else { exit::NOT_ALL_VERIFIED }
    }

    /// `Err` when some task was not verified (the command's exit code says so).
    pub fn check(&self) -> Result<(), NotAllVerified> {
        if self.all_verified() {
            Ok(())
        } else {
            Err(NotAllVerified { submitted: self.submitted, not_verified: self.failed() })
        }
    }

    /// `5 submitted: 0 verified, 5 expired (the deadline passed …)`: every kind that
    /// happened, with the first reason given for it.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("{} verified", self.verified)];
        if !self.rejected.is_empty() {
            let detail = match self.rejected.as_slice() {
                [(code, c)] => format!("{}: {}", code.as_str(), c.reason()),
                all => all
                    .iter()
                    .map(|(code, c)| format!("{} {}: {}", c.count, code.as_str(), c.reason()))
                    .collect::<Vec<_>>()
                    .join("; "),
            };
            parts.push(format!("{} rejected ({detail})", self.rejected_total()));
        }
        for (label, c) in [("expired", &self.expired), ("no consensus", &self.no_consensus)] {
            if c.count > 0 {
                parts.push(format!("{} {label} ({})", c.count, c.reason()));
            }
        }
        if self.missing > 0 {
            parts.push(format!("{} missing (no result by the deadline)", self.missing));
        }
        if self.unsent.count > 0 {
            parts.push(format!("{} not sent ({})", self.unsent.count, self.unsent.reason()));
        }
        format!("{} submitted: {}", self.submitted, parts.join(", "))
    }
}

/// Some task of the run was not verified; the summary printed says which and why.
#[derive(Debug, thiserror::Error)]
#[error("{not_verified} of {submitted} tasks were not verified")]
pub struct NotAllVerified {
    pub submitted: usize,
    pub not_verified: usize,
}

/// How results are shown as they come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    /// One JSON object per line on stdout, for scripts.
    Json,
    /// One plain line per result on stdout: task id, status, reason.
    Lines,
    /// Each result in full: outputs with their values (a single task).
    Detailed,
    /// Nothing per result; the first reason of each kind of failure, once, on stderr.
    Quiet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    pub show: Show,
    /// Draw a progress bar on stderr.
    pub bar: bool,
}

impl View {
    /// `sundara submit`'s view: JSON when asked (no bar); one task in full; otherwise a bar
    /// where stderr is a terminal, and a line per result unless stdout is a terminal showing
    /// the bar, so that nothing is silent.
    pub fn for_submit(json: bool, count: usize, stdout_terminal: bool, stderr_terminal: bool) -> View {
        if json {
            View { show: Show::Json, bar: false }
        } else if count == 1 {
            View { show: Show::Detailed, bar: false }
        } else if stdout_terminal && stderr_terminal {
            View { show: Show::Quiet, bar: true }
        } else {
            View { show: Show::Lines, bar: stderr_terminal }
        }
    }
}

/// A run: how many tasks, how many submissions at once, and how it is shown.
pub struct Load {
    pub total: usize,
    pub concurrency: usize,
    /// Each task's timeout as submitted: results are awaited until the latest accepted
    /// task's deadline plus [`RESULT_GRACE`].
    pub task_timeout: Duration,
    pub view: View,
    /// Before the bar, e.g. "demo tasks ".
    pub label: &'static str,
}

/// What the submitting task reports for each submission.
enum Submitted {
    Accepted { task_id: String, at: Instant },
    Rejected { model: String, code: RejectCode, reason: String },
    Unsent { model: String, error: String },
}

/// Aborts the task when dropped (the run ended early with an error).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Submits `load.total` tasks (`make(i)` is the i-th) while collecting their results, so
/// progress shows from the first submission. A rejected submission is counted and the
/// run goes on. Returns when every accepted task has its result, or at the deadline (the
/// rest counted missing). Fails only if the results cannot be followed.
pub async fn run_load(
    client: &Client,
    load: Load,
    make: impl FnMut(usize) -> SubmitRequest + Send + 'static,
) -> Result<Tally, ClientError> {
    let mut results = client.results().await?;
    let mut report = Reporter::new(load.view, load.total, load.label);
    let concurrency = load.concurrency.max(1);
    let (tx, mut rx) = mpsc::channel::<Submitted>(concurrency * 2);
    let _submitter = AbortOnDrop(tokio::spawn({
        let client = client.clone();
        let total = load.total;
        let wanted = tx.clone();
        async move {
            futures::stream::iter(0..total)
                // Nobody waits for more once the load is dropped (Ctrl-C in `up`): stop
                // making requests. Their submits may fail at once then, so without this the
                // loop would never yield and its abort would not take effect until the
                // whole count was made.
                .take_while(move |_| futures::future::ready(!wanted.is_closed()))
                .map(make)
                .map(|req| {
                    let client = client.clone();
                    async move {
                        let outcome = client.submit(&req).await;
                        (req.model, outcome, Instant::now())
                    }
                })
                .buffer_unordered(concurrency)
                .for_each(|(model, outcome, at)| {
                    let tx = tx.clone();
                    async move {
                        let event = match outcome {
                            Ok(SubmitOutcome::Accepted { task_id, .. }) => Submitted::Accepted { task_id, at },
                            Ok(SubmitOutcome::Rejected { code, reason }) => Submitted::Rejected { model, code, reason },
                            Err(e) => Submitted::Unsent { model, error: e.to_string() },
                        };
                        let _ = tx.send(event).await;
                    }
                })
                .await;
        }
    }));
    // Accepted tasks awaiting their result.
    let mut pending: HashSet<String> = HashSet::new();
    // Results that came before their submission's reply was handled.
    let mut early: HashMap<String, ClientResult> = HashMap::new();
    let mut submitting = true;
    let mut deadline = Instant::now();
    loop {
        if !submitting && pending.is_empty() {
            break;
        }
        tokio::select! {
            event = rx.recv(), if submitting => match event {
                None => submitting = false,
                Some(Submitted::Accepted { task_id, at }) => {
                    report.tally.accepted();
                    match early.remove(&task_id) {
                        Some(result) => report.result(&result),
                        None => {
                            pending.insert(task_id);
                            deadline = deadline.max(at + load.task_timeout + RESULT_GRACE);
                        }
                    }
                }
                Some(Submitted::Rejected { model, code, reason }) => report.rejected(&model, code, &reason),
                Some(Submitted::Unsent { model, error }) => report.unsent(&model, &error),
            },
            next = results.next() => match next {
                Some(Ok(result)) => {
                    if pending.remove(&result.task_id) {
                        report.result(&result);
                    } else if submitting && early.len() < MAX_EARLY_RESULTS {
                        early.insert(result.task_id.clone(), result);
                    }
                }
                Some(Err(e)) => return Err(e),
                None => break,
            },
            () = tokio::time::sleep_until(deadline), if !submitting => break,
        }
    }
    let mut missing: Vec<String> = pending.into_iter().collect();
    missing.sort();
    report.missing(&missing);
    Ok(report.finish())
}

/// Counts and shows a run's outcomes as they come.
struct Reporter {
    show: Show,
    bar: Option<ProgressBar>,
    /// Verified and failed so far, as the bar shows them (drawn with its position).
    shown: Arc<[AtomicUsize; 2]>,
    tally: Tally,
    /// Log lines go around the bar while it is drawn.
    _logs: Option<telemetry::AroundGuard>,
}

impl Reporter {
    fn new(view: View, total: usize, label: &'static str) -> Reporter {
        let shown = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let bar = view.bar.then(|| {
            let counts = shown.clone();
            let style = ProgressStyle::with_template("{prefix}{bar:40} {pos}/{len} {counts}")
                .expect("a valid bar template")
                .with_key("counts", move |_: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let [verified, failed] = &*counts;
                    let _ = write!(w, "✓{} ✗{}", verified.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
                });
            let bar = ProgressBar::new(total as u64).with_style(style).with_prefix(label);
            bar.tick();
            bar
        });
        let logs = bar
            .clone()
            .map(|bar| telemetry::log_lines_around(Arc::new(move |write: &mut dyn FnMut()| bar.suspend(write))));
        Reporter { show: view.show, bar, shown, tally: Tally::default(), _logs: logs }
    }

    /// A line on stdout (above the bar, if one is drawn). Write errors (a closed pipe) are
    /// ignored: the exit code still tells.
    fn out(&self, line: &str) {
        self.above_bar(|| {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        });
    }

    /// A line on stderr (above the bar, if one is drawn).
    fn note(&self, line: &str) {
        self.above_bar(|| {
            let _ = writeln!(std::io::stderr().lock(), "{line}");
        });
    }

    /// Writes with the bar (if one is drawn) cleared, then draws it again below.
    fn above_bar(&self, write: impl FnOnce()) {
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    fn advance(&self) {
        if let Some(bar) = &self.bar {
            self.shown[0].store(self.tally.verified, Ordering::Relaxed);
            self.shown[1].store(self.tally.failed(), Ordering::Relaxed);
            bar.inc(1);
        }
    }

    fn rejected(&mut self, model: &str, code: RejectCode, reason: &str) {
        let first = self.tally.rejected(code, reason);
        match self.show {
            Show::Json => self.out(&json_line(&JsonLine::rejected(model, code, reason))),
            Show::Lines => self.out(&format!("- rejected ({}): {reason}", code.as_str())),
            Show::Detailed => self.out(&format!("rejected ({}): {reason}", code.as_str())),
            Show::Quiet if first => self.note(&format!("rejected ({}): {reason}", code.as_str())),
            Show::Quiet => {}
        }
        self.advance();
    }

    fn unsent(&mut self, model: &str, error: &str) {
        let first = self.tally.unsent(error);
        match self.show {
            Show::Json => self.out(&json_line(&JsonLine::unsent(model, error))),
            Show::Lines => self.out(&format!("- not sent: {error}")),
            Show::Detailed => self.out(&format!("not sent: {error}")),
            Show::Quiet if first => self.note(&format!("not sent: {error}")),
            Show::Quiet => {}
        }
        self.advance();
    }

    fn result(&mut self, result: &ClientResult) {
        let first = self.tally.result(&result.status);
        match self.show {
            Show::Json => self.out(&json_line(&JsonLine::result(result))),
            Show::Lines => self.out(&plain_line(result)),
            Show::Detailed => self.out(&detailed(result, SHOWN_VALUES)),
            Show::Quiet => {
                if let ResultStatus::Failed { code, reason } = &result.status
                    && first
                {
                    self.note(&format!("{}: {}", failure_label(*code), bare(*code, reason)));
                }
            }
        }
        self.advance();
    }

    fn missing(&mut self, task_ids: &[String]) {
        self.tally.missing(task_ids.len());
        for task_id in task_ids {
            match self.show {
                Show::Json => self.out(&json_line(&JsonLine::missing(task_id))),
                Show::Lines | Show::Detailed => self.out(&format!("{task_id} missing: no result by the deadline")),
                Show::Quiet => {}
            }
            self.advance();
        }
    }

    fn finish(self) -> Tally {
        if let Some(bar) = &self.bar {
            bar.finish();
            // The finished bar stays; what follows starts on a line of its own.
            if !bar.is_hidden() {
                eprintln!();
            }
        }
        self.tally
    }
}

/// A failure's reason without a leading `expired: ` (or the like) where it has one, so that
/// it reads once after the label the client puts before it.
fn bare(code: FailureCode, reason: &str) -> &str {
    [failure_code(code), failure_label(code)]
        .iter()
        .find_map(|label| reason.strip_prefix(label).and_then(|r| r.strip_prefix(": ")))
        .unwrap_or(reason)
}

fn failure_code(code: FailureCode) -> &'static str {
    match code {
        FailureCode::Expired => "expired",
        FailureCode::NoConsensus => "no_consensus",
    }
}

fn failure_label(code: FailureCode) -> &'static str {
    match code {
        FailureCode::Expired => "expired",
        FailureCode::NoConsensus => "no consensus",
    }
}

/// `<task> verified: 3/3 miners agree` or `<task> expired: <reason>`.
pub fn plain_line(result: &ClientResult) -> String {
    match &result.status {
        ResultStatus::Verified { agreeing, k, .. } => {
            format!("{} verified: {agreeing}/{k} miners agree", result.task_id)
        }
        ResultStatus::Failed { code, reason } => {
            format!("{} {}: {}", result.task_id, failure_code(*code), bare(*code, reason))
        }
    }
}

/// One result in full: each output with up to `shown` of its values, then how many more.
pub fn detailed(result: &ClientResult, shown: usize) -> String {
    match &result.status {
        ResultStatus::Verified { outputs, agreeing, k } => {
            let mut text = format!("task {} verified by {agreeing}/{k} miners ({})", result.task_id, result.model);
            for t in outputs {
                let values = value_texts(t);
                let more = match values.len().saturating_sub(shown) {
                    0 => String::new(),
                    n => format!(", … ({n} more; --json for all)"),
                };
                let head: Vec<&str> = values.iter().take(shown).map(String::as_str).collect();
                text.push_str(&format!("\n  {} {}{:?} [{}{more}]", t.name, t.dtype, t.shape, head.join(", ")));
            }
            text
        }
        ResultStatus::Failed { code, reason } => {
            format!("task {} {}: {}", result.task_id, failure_label(*code), bare(*code, reason))
        }
    }
}

/// Each value as its dtype prints it (shortest text that reads back the same).
pub(crate) fn value_texts(t: &Tensor) -> Vec<String> {
    fn all<T: sundara_schemas::tensor::Element + ToString>(t: &Tensor) -> Vec<String> {
        t.values::<T>().unwrap_or_default().iter().map(T::to_string).collect()
    }
    match t.dtype {
        DType::F32 => all::<f32>(t),
        DType::F64 => all::<f64>(t),
        DType::I8 => all::<i8>(t),
        DType::U8 => all::<u8>(t),
        DType::I16 => all::<i16>(t),
        DType::I32 => all::<i32>(t),
        DType::I64 => all::<i64>(t),
        DType::Bool => all::<bool>(t),
    }
}

/// One line of `--json` output.
#[derive(Serialize, Debug)]
pub struct JsonLine<'a> {
    /// `null` for a submission that was refused or not sent.
    pub task_id: Option<&'a str>,
    /// `name@version` in a result, the name asked for otherwise.
    pub model: String,
    /// `verified`, `failed`, `rejected`, `missing` (no result by the deadline) or `unsent`.
    pub status: &'static str,
    /// A failure's or rejection's code (`expired`, `no_consensus`, `wrong_shape`, …).
    pub code: Option<&'static str>,
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreeing: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<JsonTensor<'a>>>,
}

/// An output with all its values (flat, row-major), typed as its dtype.
#[derive(Serialize, Debug)]
pub struct JsonTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
    pub values: JsonValues,
}

#[derive(Serialize, Debug)]
#[serde(untagged)]
pub enum JsonValues {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

/// Writes `outputs` to `path` as `{"outputs": [{"name", "dtype", "shape", "values"}]}`
/// (what `sundara job --out` and `sundara jobs results --out` write).
pub fn write_outputs(path: &std::path::Path, outputs: &[Tensor]) -> std::io::Result<()> {
    let tensors: Vec<JsonTensor> = outputs.iter().map(JsonTensor::of).collect();
    std::fs::write(path, serde_json::json!({ "outputs": tensors }).to_string())
}

impl<'a> JsonTensor<'a> {
    pub fn of(t: &'a Tensor) -> JsonTensor<'a> {
        let values = match t.dtype {
            DType::F32 => JsonValues::F32(t.values().unwrap_or_default()),
            DType::F64 => JsonValues::F64(t.values().unwrap_or_default()),
            DType::I8 => JsonValues::I8(t.values().unwrap_or_default()),
            DType::U8 => JsonValues::U8(t.values().unwrap_or_default()),
            DType::I16 => JsonValues::I16(t.values().unwrap_or_default()),
            DType::I32 => JsonValues::I32(t.values().unwrap_or_default()),
            DType::I64 => JsonValues::I64(t.values().unwrap_or_default()),
            DType::Bool => JsonValues::Bool(t.values().unwrap_or_default()),
        };
        JsonTensor { name: &t.name, dtype: t.dtype, shape: &t.shape, values }
    }
}

impl<'a> JsonLine<'a> {
    fn empty(task_id: Option<&'a str>, model: String, status: &'static str) -> JsonLine<'a> {
        JsonLine { task_id, model, status, code: None, reason: None, agreeing: None, k: None, outputs: None }
    }

    pub fn result(result: &'a ClientResult) -> JsonLine<'a> {
        let line = JsonLine::empty(Some(&result.task_id), result.model.to_string(), "verified");
        match &result.status {
            ResultStatus::Verified { outputs, agreeing, k } => JsonLine {
                agreeing: Some(*agreeing),
                k: Some(*k),
                outputs: Some(outputs.iter().map(JsonTensor::of).collect()),
                ..line
            },
            ResultStatus::Failed { code, reason } => {
                JsonLine { status: "failed", code: Some(failure_code(*code)), reason: Some(reason), ..line }
            }
        }
    }

    pub fn rejected(model: &str, code: RejectCode, reason: &'a str) -> JsonLine<'a> {
        JsonLine { code: Some(code.as_str()), reason: Some(reason), ..JsonLine::empty(None, model.into(), "rejected") }
    }

    pub fn unsent(model: &str, error: &'a str) -> JsonLine<'a> {
        JsonLine { reason: Some(error), ..JsonLine::empty(None, model.into(), "unsent") }
    }

    pub fn missing(task_id: &'a str) -> JsonLine<'a> {
        JsonLine {
            reason: Some("no result by the deadline"),
            ..JsonLine::empty(Some(task_id), String::new(), "missing")
        }
    }
}

fn json_line(line: &JsonLine) -> String {
    serde_json::to_string(line).expect("a result line serialises")
}

/// Options of `sundara submit`.
pub struct SubmitOptions {
    pub model: String,
    /// JSON inputs file; random inputs when absent.
    pub input: Option<PathBuf>,
    pub count: usize,
    /// Rows of generated inputs.
    pub rows: u64,
    /// Who submits: the tenant the NATS credentials belong to when NATS has auth on.
    pub tenant: String,
    pub timeout_ms: u64,
    pub priority: Priority,
    /// One JSON object per result on stdout; the summary on stderr.
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {source}")]
    Input { path: String, source: crate::InputError },
    #[error("no model named {0:?}")]
    UnknownModel(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// `sundara submit`: the input file is read before anything is sent; then `count` tasks
/// are submitted and followed, and a summary printed (on stderr with `--json`). Returns the
/// tally; [`Tally::check`] says whether the command succeeded.
pub async fn submit(endpoint: &NatsEndpoint, options: SubmitOptions) -> Result<Tally, SubmitError> {
    let SubmitOptions { model, input, count, rows, tenant, timeout_ms, priority, json } = options;
    let fixed = match &input {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| SubmitError::Read { path: path.display().to_string(), source })?;
            let inputs = crate::inputs_from_json(&text)
                .map_err(|source| SubmitError::Input { path: path.display().to_string(), source })?;
            Some(inputs)
        }
        None => None,
    };
    // A tenant may read the registry but not create streams: no provisioning here.
    let nats = nats::connect(endpoint, "sundara-client").await?;
    let registry = Registry::open(&jetstream::new(nats.clone())).await?;
    let meta = registry.resolve(&model).await?.ok_or_else(|| SubmitError::UnknownModel(model.clone()))?;
    let client = Client::new(nats, &tenant);
    let view = View::for_submit(json, count, std::io::stdout().is_terminal(), std::io::stderr().is_terminal());
    let timeout = Duration::from_millis(timeout_ms);
    let load = Load { total: count, concurrency: 16, task_timeout: timeout, view, label: "" };
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let tally = run_load(&client, load, move |_| {
        let inputs = fixed.clone().unwrap_or_else(|| crate::models::sample_inputs(&meta.inputs, rows, &mut rng));
        SubmitRequest { timeout_ms: Some(timeout_ms), priority, ..SubmitRequest::new(&model, inputs) }
    })
    .await?;
    if json {
        eprintln!("{}", tally.summary());
    } else {
        let _ = writeln!(std::io::stdout().lock(), "{}", tally.summary());
    }
    Ok(tally)
}

/// `sundara up`'s demo load: `tasks` one-row tasks alternating over `models`, submitted as
/// `tenant_name`, with a progress bar where stderr is a terminal.
pub async fn demo_load(
    tenant: &NatsEndpoint,
    tenant_name: &str,
    models: &[ModelMeta],
    tasks: usize,
) -> Result<Tally, ClientError> {
    const TIMEOUT: Duration = Duration::from_secs(60);
    let client = Client::connect(tenant, tenant_name).await?;
    let view = View { show: Show::Quiet, bar: std::io::stderr().is_terminal() };
    let load = Load { total: tasks, concurrency: 32, task_timeout: TIMEOUT, view, label: "demo tasks " };
    let models = models.to_vec();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Request ids of this run only: a second `up --external` on the same stack is new work,
    // not duplicates of the first run's tasks.
    let run = uuid::Uuid::now_v7().simple().to_string();
    run_load(&client, load, move |i| {
        let meta = &models[i % models.len()];
        let inputs = crate::models::sample_inputs(&meta.inputs, 1, &mut rng);
        SubmitRequest {
            request_id: Some(format!("demo-{}-{i}", &run[run.len() - 8..])),
            seed: i as u64,
            timeout_ms: Some(TIMEOUT.as_millis() as u64),
            // The version just registered, even if another is pushed meanwhile.
            ..SubmitRequest::new(&ModelRef::spec(&meta.name, &meta.version), inputs)
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundara_schemas::{ModelRef, WIRE_VERSION};

    fn result(task: &str, status: ResultStatus) -> ClientResult {
        ClientResult {
            v: WIRE_VERSION,
            task_id: task.into(),
            model: ModelRef { name: "mlp".into(), version: "1".into() },
            status,
            completed_at_ms: 0,
            timing: None,
        }
    }

    fn verified(outputs: Vec<Tensor>) -> ResultStatus {
        ResultStatus::Verified { outputs, agreeing: 3, k: 3 }
    }

    fn failed(code: FailureCode, reason: &str) -> ResultStatus {
        ResultStatus::Failed { code, reason: reason.into() }
    }

    #[test]
    fn a_tally_tells_each_kind_of_failure_apart() {
        let mut t = Tally::default();
        for _ in 0..7 {
            t.accepted();
        }
        assert!(!t.result(&verified(vec![])));
        assert!(!t.result(&verified(vec![])));
        assert!(t.result(&failed(FailureCode::Expired, "late")), "the first expiry is news");
        assert!(!t.result(&failed(FailureCode::Expired, "later")), "the second is counted only");
        assert!(t.result(&failed(FailureCode::NoConsensus, "split 1-1-1")));
        t.missing(2);
        assert!(t.rejected(RejectCode::WrongShape, "x must have shape [?, 784]"));
        assert!(!t.rejected(RejectCode::WrongShape, "again"));
        assert!(t.rejected(RejectCode::RateLimited, "slow down"));
        assert!(t.unsent("no responders"));
        assert_eq!((t.submitted, t.verified, t.expired.count, t.no_consensus.count, t.missing), (11, 2, 2, 1, 2));
        assert_eq!(t.rejected_total(), 3);
        assert_eq!(t.failed(), 9);
        assert!(!t.all_verified());
        assert_eq!(t.exit_code(), exit::NOT_ALL_VERIFIED);
        assert_eq!(
            t.summary(),
            "11 submitted: 2 verified, 3 rejected (2 wrong_shape: x must have shape [?, 784]; 1 rate_limited: \
             slow down), 2 expired (late), 1 no consensus (split 1-1-1), 2 missing (no result by the deadline), \
             1 not sent (no responders)"
        );
        let e = t.check().unwrap_err();
        assert_eq!((e.submitted, e.not_verified), (11, 9));
    }

    #[test]
    fn all_expired_is_a_failure_with_its_reason() {
        let mut t = Tally::default();
        for _ in 0..5 {
            t.accepted();
            t.result(&failed(FailureCode::Expired, "the deadline passed before enough workers were free"));
        }
        assert_eq!(
            t.summary(),
            "5 submitted: 0 verified, 5 expired (the deadline passed before enough workers were free)"
        );
        assert_eq!(t.exit_code(), exit::NOT_ALL_VERIFIED);
        assert!(t.check().is_err());
    }

    #[test]
    fn only_all_verified_exits_zero() {
        let mut t = Tally::default();
        for _ in 0..3 {
            t.accepted();
            t.result(&verified(vec![]));
        }
        assert_eq!(t.summary(), "3 submitted: 3 verified");
        assert_eq!(t.exit_code(), exit::ALL_VERIFIED);
        assert!(t.check().is_ok());
        t.accepted();
        t.missing(1);
        assert_eq!(t.exit_code(), exit::NOT_ALL_VERIFIED, "a task with no result is not verified");
        let mut one_rejection = Tally::default();
        one_rejection.rejected(RejectCode::WrongShape, "empty");
        assert_eq!(one_rejection.summary(), "1 submitted: 0 verified, 1 rejected (wrong_shape: empty)");
        assert_eq!(one_rejection.exit_code(), exit::NOT_ALL_VERIFIED);
    }

    #[test]
    fn the_view_is_never_silent() {
        let v = View::for_submit;
        assert_eq!(v(true, 5, true, true), View { show: Show::Json, bar: false }, "--json: no bar");
        assert_eq!(v(false, 1, true, true), View { show: Show::Detailed, bar: false });
        assert_eq!(v(false, 5, true, true), View { show: Show::Quiet, bar: true });
        assert_eq!(v(false, 5, false, true), View { show: Show::Lines, bar: true }, "piped: a line per result");
        assert_eq!(v(false, 5, true, false), View { show: Show::Lines, bar: false }, "no bar: a line per result");
        assert_eq!(v(false, 5, false, false), View { show: Show::Lines, bar: false });
    }

    #[test]
    fn json_lines_carry_every_value_typed() {
        let logits =
            Tensor::from_values("logits", vec![1, 100], &(0..100).map(|i| i as f32 / 10.0).collect::<Vec<_>>());
        let ids = Tensor::from_values("ids", vec![2], &[i64::MAX, -1]);
        let r = result("t1", verified(vec![logits, ids]));
        let v: serde_json::Value = serde_json::from_str(&json_line(&JsonLine::result(&r))).unwrap();
        assert_eq!(v["task_id"], "t1");
        assert_eq!(v["model"], "mlp@1");
        assert_eq!(v["status"], "verified");
        assert_eq!((v["agreeing"].as_u64(), v["k"].as_u64()), (Some(3), Some(3)));
        assert_eq!(v["outputs"][0]["dtype"], "f32");
        assert_eq!(v["outputs"][0]["shape"], serde_json::json!([1, 100]));
        let values = v["outputs"][0]["values"].as_array().unwrap();
        assert_eq!(values.len(), 100, "every value, not the first few");
        assert_eq!(values[1].as_f64(), Some(0.1), "f32 written as the shortest text that reads back");
        assert_eq!(v["outputs"][1]["values"], serde_json::json!([i64::MAX, -1]), "integers exactly");

        let f = result("t2", failed(FailureCode::NoConsensus, "split"));
        let v: serde_json::Value = serde_json::from_str(&json_line(&JsonLine::result(&f))).unwrap();
        assert_eq!(
            (v["status"].as_str(), v["code"].as_str(), v["reason"].as_str()),
            (Some("failed"), Some("no_consensus"), Some("split"))
        );
        assert!(v.get("outputs").is_none());

        let rj = json_line(&JsonLine::rejected("mlp", RejectCode::WrongShape, "empty"));
        let v: serde_json::Value = serde_json::from_str(&rj).unwrap();
        assert_eq!((v["status"].as_str(), v["code"].as_str()), (Some("rejected"), Some("wrong_shape")));
        assert!(v["task_id"].is_null());
    }

    #[test]
    fn a_single_result_shows_its_values_up_to_a_limit_and_counts_the_rest() {
        let ten = Tensor::from_values("probs", vec![1, 10], &[0.5f32; 10]);
        let text = detailed(&result("t", verified(vec![ten])), SHOWN_VALUES);
        assert_eq!(text.matches("0.5").count(), 10, "{text}");
        assert!(!text.contains('…'), "{text}");
        let many = Tensor::from_values("x", vec![100], &(0..100i64).collect::<Vec<_>>());
        let text = detailed(&result("t", verified(vec![many])), SHOWN_VALUES);
        assert!(text.contains(", 63, … (36 more; --json for all)]"), "{text}");
        assert!(!text.contains(", 64"), "{text}");
        assert_eq!(plain_line(&result("t", failed(FailureCode::Expired, "too late"))), "t expired: too late");
        // A reason that starts with its own label does not say it twice.
        assert_eq!(plain_line(&result("t", failed(FailureCode::Expired, "expired: too late"))), "t expired: too late");
        let mut t = Tally::default();
        t.result(&failed(FailureCode::NoConsensus, "no consensus: split"));
        assert_eq!(t.no_consensus.first_reason.as_deref(), Some("split"));
    }
}
