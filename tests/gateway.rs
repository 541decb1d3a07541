//! The HTTP gateway in front of a real pipeline (nats-server, redis-server, two honest
//! miners at k=2): KServe v2 inference answered only with verified outputs that agree with
//! the model run directly, the verification in the headers, an idempotent retry, and every
//! refusal with its status and the protocol's error body; and the `curl` line `sundara up`
//! prints, run as printed. The client is plain HTTP/1.1 over a socket, so what is asserted
//! is what goes over the wire.

use sundara_testkit as support;

use std::net::SocketAddr;
use std::time::Duration;

use rand::SeedableRng;
use serde_json::{Value, json};
use sundara_gateway::kserve::JsonTensor;
use sundara_schemas::Tensor;
use support::Harness;
use support::http::{Reply, http, start_gateway};

const KEY: &str = support::http::TEST_KEY;
/// Another tenant's key.
const OTHER_KEY: &str = "sk-other-0123456789abcdef";

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {KEY}"))
}

async fn get(addr: SocketAddr, path: &str, key: bool) -> Reply {
    let auth = bearer();
    let headers: Vec<(&str, &str)> = if key { vec![(auth.0, auth.1.as_str())] } else { vec![] };
    http(addr, "GET", path, &headers, b"").await
}

async fn infer(addr: SocketAddr, body: &Value, extra: &[(&str, &str)]) -> Reply {
    let auth = bearer();
    let mut headers = vec![(auth.0, auth.1.as_str()), ("Content-Type", "application/json")];
    headers.extend_from_slice(extra);
    http(addr, "POST", "/v2/models/mlp/infer", &headers, body.to_string().as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kserve_inference_is_answered_with_verified_outputs_and_typed_errors() {
    let h = Harness::start(vec![support::honest("w1", 1), support::honest("w2", 1)], 2, Duration::from_secs(10)).await;
    let (addr, shutdown) = start_gateway(h.stack.endpoints(), |c| {
        c.max_body_bytes = 64 << 10;
        c.keys.add("other", OTHER_KEY).unwrap();
    })
    .await;
    let meta = h.models["mlp"].clone();

    let live = get(addr, "/v2/health/live", false).await;
    assert_eq!((live.status, &live.body), (200, &json!({"live": true})));
    assert!(live.headers.contains_key("x-request-id"), "every response names its request");
    assert_eq!(get(addr, "/v2/health/ready", false).await.status, 200);

    // Metadata from the registry; only with a key.
    let unauthorized = get(addr, "/v2/models/mlp", false).await;
    assert_eq!((unauthorized.status, unauthorized.body["code"].as_str()), (401, Some("invalid_api_key")));
    let metadata = get(addr, "/v2/models/mlp", true).await;
    assert_eq!(metadata.status, 200, "{}", metadata.body);
    assert_eq!(metadata.body["name"], "mlp");
    assert_eq!(metadata.body["inputs"][0]["name"], meta.inputs[0].name.as_str());
    assert_eq!(metadata.body["inputs"][0]["datatype"], "FP32");
    assert_eq!(get(addr, "/v2/models/mlp/ready", true).await.status, 200);
    assert_eq!(get(addr, "/v2/models/nope", true).await.status, 404);
    assert_eq!(get(addr, "/v2/models/mlp/versions/99", true).await.status, 404);

    // Inference: verified by both miners, equal to the model run directly.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let inputs: Vec<Tensor> = sundara::models::sample_inputs(&meta.inputs, 2, &mut rng);
    let body = json!({"id": "r1", "inputs": inputs.iter().map(JsonTensor::from_tensor).collect::<Vec<_>>()});
    let answered = infer(addr, &body, &[("Idempotency-Key", "gw-1")]).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    assert_eq!(answered.headers["sundara-verified"], "2/2");
    let task_id = sundara_ingress::task_id("test", Some("gw-1"));
    assert_eq!(answered.headers["sundara-task-id"], task_id);
    assert_eq!((answered.body["model_name"].as_str(), answered.body["id"].as_str()), (Some("mlp"), Some("r1")));
    let want = support::reference(&meta, &inputs);
    let got: Vec<Tensor> = serde_json::from_value::<Vec<JsonTensor>>(answered.body["outputs"].clone())
        .unwrap()
        .iter()
        .map(|t| t.to_tensor().unwrap())
        .collect();
    assert!(sundara_verifier::compare::agree(&support::RULE, &got, &want), "{got:?} vs {want:?}");

    // The binary tensor data extension: inputs as raw bytes after the JSON header, outputs
    // asked back the same way; the same verified values.
    let header = json!({
        "inputs": inputs.iter().map(|t| json!({
            "name": t.name, "shape": t.shape, "datatype": "FP32", "parameters": {"binary_data_size": t.data.len()},
        })).collect::<Vec<_>>(),
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut binary_body = header.clone().into_bytes();
    inputs.iter().for_each(|t| binary_body.extend_from_slice(&t.data));
    let length = header.len().to_string();
    let binary_headers = [
        (bearer().0, bearer().1),
        ("Inference-Header-Content-Length", length),
        ("Idempotency-Key", "gw-binary".to_string()),
    ];
    let binary_headers: Vec<(&str, &str)> = binary_headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let binary = http(addr, "POST", "/v2/models/mlp/infer", &binary_headers, &binary_body).await;
    assert_eq!(binary.status, 200, "{}", binary.body);
    assert_eq!(binary.headers["content-type"], "application/octet-stream");
    let mut tail = &binary.raw[binary.headers["inference-header-content-length"].parse::<usize>().unwrap()..];
    let mut got_binary = Vec::new();
    for output in binary.body["outputs"].as_array().unwrap() {
        let size = output["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        let shape: Vec<u64> = serde_json::from_value(output["shape"].clone()).unwrap();
        let values: Vec<f32> =
            tail[..size].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        got_binary.push(Tensor::from_values(output["name"].as_str().unwrap(), shape, &values));
        tail = &tail[size..];
    }
    assert!(tail.is_empty(), "every byte belongs to an output");
    assert!(sundara_verifier::compare::agree(&support::RULE, &got_binary, &want), "{got_binary:?} vs {want:?}");

    // Another tenant with the same idempotency key gets a task of its own, not test's.
    let other_auth = format!("Bearer {OTHER_KEY}");
    let other_headers = [("Authorization", other_auth.as_str()), ("Idempotency-Key", "gw-1")];
    let others = http(addr, "POST", "/v2/models/mlp/infer", &other_headers, body.to_string().as_bytes()).await;
    assert_eq!(others.status, 200, "{}", others.body);
    assert_eq!(others.headers["sundara-task-id"], sundara_ingress::task_id("other", Some("gw-1")));
    assert_ne!(others.headers["sundara-task-id"], task_id, "a tenant's key never reaches another's task");

    // The same idempotency key again is the same task, answered again.
    let again = infer(addr, &body, &[("Idempotency-Key", "gw-1")]).await;
    assert_eq!((again.status, again.headers["sundara-task-id"].as_str()), (200, task_id.as_str()));

    // Refusals, each with its status and code.
    let wrong_shape = json!({"inputs": [{"name": meta.inputs[0].name, "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]});
    let refused = infer(addr, &wrong_shape, &[]).await;
    assert_eq!((refused.status, refused.body["code"].as_str()), (400, Some("wrong_shape")), "{}", refused.body);
    let miscounted = json!({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1.0]}]});
    let refused = infer(addr, &miscounted, &[]).await;
    assert_eq!((refused.status, refused.body["code"].as_str()), (400, Some("malformed")), "{}", refused.body);
    let auth = bearer();
    let not_json = http(addr, "POST", "/v2/models/mlp/infer", &[(auth.0, auth.1.as_str())], b"{not json").await;
    assert_eq!(not_json.status, 400);
    let too_large = vec![b' '; 100 << 10];
    let refused = http(addr, "POST", "/v2/models/mlp/infer", &[(auth.0, auth.1.as_str())], &too_large).await;
    assert_eq!((refused.status, refused.body["code"].as_str()), (413, Some("payload_too_large")));
    let body_text = body.to_string();
    let unknown = http(addr, "POST", "/v2/models/nope/infer", &[(auth.0, auth.1.as_str())], body_text.as_bytes()).await;
    assert_eq!(unknown.status, 404);
    let wrong_key = [("Authorization", "Bearer sk-wrong-0123456789abcd")];
    assert_eq!(http(addr, "POST", "/v2/models/mlp/infer", &wrong_key, b"{}").await.status, 401);

    // OpenAI's model list, and its error envelope.
    let models = get(addr, "/v1/models", true).await;
    assert_eq!(models.status, 200);
    assert!(models.body["data"].as_array().unwrap().iter().any(|m| m["id"] == "mlp"), "{}", models.body);
    let refused = get(addr, "/v1/models", false).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body["error"]["type"], "authentication_error", "{}", refused.body);
    assert_eq!(refused.body["error"]["code"], "invalid_api_key");

    shutdown.cancel();
    h.stop().await;
}

async fn send(addr: SocketAddr, method: &str, path: &str, key: &str, body: &Value) -> Reply {
    let auth = format!("Bearer {key}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    let bytes = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    http(addr, method, path, &headers, &bytes).await
}

fn json_tensors(tensors: &[Tensor]) -> Vec<JsonTensor> {
    tensors.iter().map(JsonTensor::from_tensor).collect()
}

/// `/v1/jobs`: a job posted whole and its results streamed as NDJSON in the rows' order,
/// equal to the model run directly; a job put in parts; another tenant finds none of them;
/// bad requests get typed errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_jobs_over_http_stream_verified_results_in_order() {
    let h = Harness::start(vec![support::honest("w1", 1), support::honest("w2", 1)], 2, Duration::from_secs(10)).await;
    let (addr, shutdown) = start_gateway(h.stack.endpoints(), |c| c.keys.add("other", OTHER_KEY).unwrap()).await;
    let meta = h.models["mlp"].clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let inputs: Vec<Tensor> = sundara::models::sample_inputs(&meta.inputs, 250, &mut rng);
    let want = support::reference(&meta, &inputs);

    let body = json!({"model": "mlp", "inputs": json_tensors(&inputs), "shard_rows": 100});
    let created = send(addr, "POST", "/v1/jobs", KEY, &body).await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!((created.body["state"].as_str(), created.body["shards"].as_u64()), (Some("running"), Some(3)));
    let id = created.body["job_id"].as_str().unwrap().to_string();

    let streamed = send(addr, "GET", &format!("/v1/jobs/{id}/results"), KEY, &Value::Null).await;
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed.headers["content-type"], "application/x-ndjson");
    let lines = support::http::ndjson(&streamed.raw);
    assert_eq!(lines.len(), 4, "three shards and the end: {lines:?}");
    assert_eq!(lines[3]["job"]["state"], "done");
    let firsts: Vec<u64> = lines[..3].iter().map(|l| l["first_row"].as_u64().unwrap()).collect();
    assert_eq!(firsts, [0, 100, 200]);
    let shards: Vec<Vec<Tensor>> = lines[..3]
        .iter()
        .map(|l| {
            let outputs: Vec<JsonTensor> = serde_json::from_value(l["outputs"].clone()).unwrap();
            outputs.iter().map(|t| t.to_tensor().unwrap()).collect()
        })
        .collect();
    let parts: Vec<&[Tensor]> = shards.iter().map(Vec::as_slice).collect();
    let got = sundara_runtime::batch::stack(&parts);
    assert!(sundara_verifier::compare::agree(&support::RULE, &got, &want), "a row differs or moved");

    let shown = send(addr, "GET", &format!("/v1/jobs/{id}"), KEY, &Value::Null).await;
    assert_eq!((shown.status, shown.body["verified"].as_u64()), (200, Some(3)));
    let shard = send(addr, "GET", &format!("/v1/jobs/{id}/shards/2"), KEY, &Value::Null).await;
    assert_eq!((shard.status, shard.body["first_row"].as_u64()), (200, Some(200)));
    let listed = send(addr, "GET", "/v1/jobs", KEY, &Value::Null).await;
    assert_eq!(listed.body["data"][0]["job_id"].as_str(), Some(id.as_str()));

    // Another tenant's key finds nothing of it.
    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/results"), format!("/v1/jobs/{id}/shards/0")] {
        let refused = send(addr, "GET", &path, OTHER_KEY, &Value::Null).await;
        assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (404, Some("job_not_found")), "{path}");
    }
    let cancel = send(addr, "POST", &format!("/v1/jobs/{id}/cancel"), OTHER_KEY, &Value::Null).await;
    assert_eq!(cancel.status, 404);
    assert_eq!(send(addr, "GET", "/v1/jobs", OTHER_KEY, &Value::Null).await.body["data"], json!([]));

    // A job put in parts: it starts once every part is stored.
    let created = send(addr, "POST", "/v1/jobs", KEY, &json!({"model": "mlp", "parts": 2, "shard_rows": 50})).await;
    assert_eq!((created.status, created.body["state"].as_str()), (201, Some("uploading")), "{}", created.body);
    let id = created.body["job_id"].as_str().unwrap().to_string();
    let (first, second) = (json_tensors(&inputs[..]), json_tensors(&inputs[..]));
    let put = send(addr, "PUT", &format!("/v1/jobs/{id}/parts/0"), KEY, &json!({"inputs": first})).await;
    assert_eq!((put.status, put.body["parts_stored"].as_u64()), (200, Some(1)), "{}", put.body);
    let early = send(addr, "POST", &format!("/v1/jobs/{id}/start"), KEY, &Value::Null).await;
    assert_eq!((early.status, early.body["error"]["code"].as_str()), (409, Some("wrong_state")));
    send(addr, "PUT", &format!("/v1/jobs/{id}/parts/1"), KEY, &json!({"inputs": second})).await;
    let started = send(addr, "POST", &format!("/v1/jobs/{id}/start"), KEY, &Value::Null).await;
    assert_eq!(
        (started.status, started.body["shards"].as_u64(), started.body["rows"].as_u64()),
        (200, Some(10), Some(500))
    );
    let streamed = send(addr, "GET", &format!("/v1/jobs/{id}/results"), KEY, &Value::Null).await;
    let lines = support::http::ndjson(&streamed.raw);
    assert_eq!((lines.len(), &lines[10]["job"]["state"]), (11, &json!("done")));

    // Typed errors.
    let error = |r: &Reply| (r.status, r.body["error"]["code"].as_str().map(str::to_string));
    let unknown = send(addr, "POST", "/v1/jobs", KEY, &json!({"model": "nope", "parts": 1})).await;
    assert_eq!(error(&unknown), (404, Some("model_not_found".into())));
    let neither = send(addr, "POST", "/v1/jobs", KEY, &json!({"model": "mlp"})).await;
    assert_eq!(error(&neither), (400, Some("invalid_request".into())));
    let no_key = http(addr, "GET", "/v1/jobs", &[], b"").await;
    assert_eq!(no_key.status, 401);
    shutdown.cancel();
    h.stop().await;
}

/// `sundara up` serves the gateway and prints a `curl` line; what that line sends gets a
/// verified answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curl_line_up_prints_gets_a_verified_answer() {
    let state = tempfile::tempdir().unwrap();
    let (_up, said) = support::up::start(&state.path().join("up.json"), &["--tasks", "10"], "serving on");
    let line = said.iter().find(|l| l.trim_start().starts_with("curl ")).expect("up prints a curl line");
    // curl -s http://ADDR/PATH -H 'Authorization: Bearer KEY' -d @FILE
    let words: Vec<&str> = line.split_whitespace().collect();
    let url = words.iter().find(|w| w.starts_with("http://")).unwrap().trim_start_matches("http://");
    let (addr, path) = url.split_once('/').unwrap();
    let key = line.split("Bearer ").nth(1).unwrap().split('\'').next().unwrap();
    let file = words.iter().find_map(|w| w.strip_prefix('@')).unwrap();
    let body = std::fs::read(file).unwrap();
    let auth = format!("Bearer {key}");
    let answered = http(addr.parse().unwrap(), "POST", &format!("/{path}"), &[("Authorization", &auth)], &body).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    // k=3; a build with the cheaters runs a dishonest fourth miner, which may be outvoted.
    let (agreeing, k) = answered.headers["sundara-verified"].split_once('/').unwrap();
    let (agreeing, k): (u8, u8) = (agreeing.parse().unwrap(), k.parse().unwrap());
    assert!(k == 3 && agreeing * 2 > k, "{agreeing}/{k}");
    assert_eq!(answered.body["model_name"], "mlp");
}

/// A client that never finishes its headers (a slowloris) is disconnected at the header
/// timeout; it holds no connection longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = sundara::stack::LocalStack::start(&sundara::stack::project_root()).expect("servers start");
    let js = async_nats::jetstream::new(sundara_common::nats::connect(&stack.endpoints().nats, "t").await.unwrap());
    sundara_common::nats::provision(&js, &Default::default()).await.unwrap();
    let (addr, shutdown) = start_gateway(stack.endpoints(), |c| c.header_timeout = Duration::from_secs(1)).await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection is still open after 20 s");
    assert!(started.elapsed() < Duration::from_secs(10), "closed only after {:?}", started.elapsed());
    // The server goes on serving others.
    assert_eq!(http(addr, "GET", "/v2/health/live", &[], b"").await.status, 200);
    shutdown.cancel();
}
