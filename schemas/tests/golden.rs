//! Golden byte vectors: the exact MessagePack bytes of fixed messages. A client written in
//! another language can be checked against `schemas/golden/*.hex`; a change here is a wire
//! change. Regenerate deliberately with `SUNDARA_BLESS=1 cargo test -p sundara-schemas --test golden`.

use std::path::PathBuf;

use sundara_schemas::{
    ClientResult, JobAnswer, JobOp, JobRefusal, JobReply, JobRequest, JobSpec, ModelRef, Priority, RejectCode,
    ResultStatus, SubmitOutcome, SubmitReply, SubmitRequest, Tensor, WIRE_VERSION, decode, encode,
};

fn check<T>(name: &str, msg: &T)
where
    T: serde::Serialize
        + for<'a> serde::Deserialize<'a>
        + sundara_schemas::codec::Versioned
        + PartialEq
        + std::fmt::Debug,
{
    let bytes = encode(msg);
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden").join(format!("{name}.hex"));
    if std::env::var_os("SUNDARA_BLESS").is_some() {
        std::fs::write(&path, hex::encode(&bytes) + "\n").unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} missing", path.display()));
    assert_eq!(hex::encode(&bytes), golden.trim(), "{name}: encoding changed");
    let back: T = decode(&hex::decode(golden.trim()).unwrap(), 1 << 20).unwrap();
    assert_eq!(&back, msg, "{name}: golden bytes decode to something else");
}

fn x() -> Tensor {
    Tensor::from_values("x", vec![1, 2], &[1.5f32, -2.0])
}

#[test]
fn submit_request() {
    let req = SubmitRequest {
        v: WIRE_VERSION,
        model: "mlp".into(),
        inputs: vec![x(), Tensor::from_values("sr", vec![], &[16000i64])],
        request_id: Some("r-1".into()),
        seed: 7,
        timeout_ms: Some(5000),
        priority: Priority::High,
    };
    check("submit_request", &req);
}

/// A request from a client that predates priorities still decodes: at normal priority. Its
/// `tenant` field (from before tenants came from credentials) is ignored.
#[test]
fn submit_request_without_priority() {
    let before_priorities = "87a17601a56d6f64656ca36d6c70a6696e707574739284a46e616d65a178a56474797065a3663332a57368617065920102a464617461c4080000c03f000000c084a46e616d65a27372a56474797065a3693634a5736861706590a464617461c408803e000000000000a674656e616e74a461636d65aa726571756573745f6964a3722d31a47365656407aa74696d656f75745f6d73cd1388";
    let req: SubmitRequest = decode(&hex::decode(before_priorities).unwrap(), 1 << 20).unwrap();
    assert_eq!((req.priority, req.seed, req.timeout_ms), (Priority::Normal, 7, Some(5000)));
}

#[test]
fn submit_replies() {
    let accepted = SubmitOutcome::Accepted { task_id: "0192f0c4a1b2".into(), duplicate: false };
    check("submit_reply_accepted", &SubmitReply { v: WIRE_VERSION, outcome: accepted });
    let rejected =
        SubmitOutcome::Rejected { code: RejectCode::WrongShape, reason: "input `x` must have shape [?, 784]".into() };
    check("submit_reply_rejected", &SubmitReply { v: WIRE_VERSION, outcome: rejected });
}

#[test]
fn client_result() {
    let result = ClientResult {
        v: WIRE_VERSION,
        task_id: "0192f0c4a1b2".into(),
        model: ModelRef { name: "mlp".into(), version: "1".into() },
        status: ResultStatus::Verified { outputs: vec![x()], agreeing: 2, k: 3 },
        completed_at_ms: 1_700_000_000_000,
        timing: None,
    };
    check("client_result", &result);
}

fn assignment(task: &str) -> sundara_schemas::Assignment {
    let ticket = sundara_schemas::Ticket {
        operator: "op1".into(),
        key_id: "k".into(),
        mac: vec![1, 2, 3],
        ..sundara_schemas::Ticket::unsigned(task, "w1")
    };
    sundara_schemas::Assignment { v: WIRE_VERSION, ticket, inputs: vec![x()], seed: 3, accepted_at_us: 9 }
}

/// A batch built from assignments already encoded is the batch encoded whole, and a WORK
/// message decodes to its assignments with their own trace contexts, batched or not.
#[test]
fn assignments_encoded_from_their_parts_decode_as_work() {
    use sundara_schemas::{Assignments, decode_work, encode_assignments};
    let (a, b) = (assignment("t1"), assignment("t2"));
    let traceparents = vec!["00-aa-bb-01".to_string(), String::new()];
    let whole = encode(&Assignments { v: WIRE_VERSION, assignments: vec![a.clone(), b.clone()], traceparents });
    let parts = [encode(&a), encode(&b)];
    let built = encode_assignments(parts.iter().map(Vec::as_slice), &["00-aa-bb-01".into(), String::new()]);
    assert_eq!(built, whole);
    let work = decode_work(true, &built).unwrap();
    assert_eq!(work, vec![(a.clone(), Some("00-aa-bb-01".to_string())), (b, None)]);
    assert_eq!(decode_work(false, &parts[0]).unwrap(), vec![(a, None)]);
    assert!(decode_work(true, &parts[0]).is_err(), "a lone assignment is not a batch");
}

/// The jobs service's requests and answers (docs/jobs.md §3), as the Python client sends
/// and reads them.
#[test]
fn job_messages() {
    let spec = JobSpec {
        model: "mlp".into(),
        parts: 2,
        shard_rows: 100,
        in_flight: 8,
        attempts: 3,
        shard_timeout_ms: 60_000,
        deadline_ms: 3_600_000,
    };
    check("job_request_create", &JobRequest::new(JobOp::Create(spec)));
    check("job_request_put", &JobRequest::new(JobOp::Put { job_id: "j1".into(), part: 1, inputs: vec![x()] }));
    check("job_request_list", &JobRequest::new(JobOp::List {}));
    let outputs = JobAnswer::Outputs { shard: 2, first_row: 200, task_id: "t1".into(), outputs: vec![x()] };
    check("job_reply_outputs", &JobReply::new(outputs));
    let refused = JobAnswer::Refused { code: JobRefusal::NotFound, reason: "no job j9".into() };
    check("job_reply_refused", &JobReply::new(refused));
}
