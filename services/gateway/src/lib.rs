//! The HTTP gateway: the verified pipeline behind the protocols inference clients already
//! speak. KServe v2 / Open Inference Protocol (`/v2/...`: health, model metadata and
//! readiness, `infer` with JSON tensors or the binary tensor data extension) and OpenAI's
//! model list (`/v1/models`). Every
//! inference becomes one task, submitted as the tenant its bearer key names, and is
//! answered only with the task's verified result (headers `sundara-task-id` and
//! `sundara-verified: <agreeing>/<k>`), or with the refusal or failure as the protocol
//! writes errors.
//!
//! Bounded everywhere: the time to send a request's headers and its body (a slow client
//! cannot hold a connection or a slot), request bodies (`--max-body-bytes`), requests in flight (`--max-concurrency`; more are told 503
//! with `Retry-After`), and the wait for a result (the task's timeout plus the verifier's
//! grace). An `Idempotency-Key` header makes a retried request the same task.

mod error;
mod jobs;
pub mod keys;
pub mod kserve;
pub mod openai;
mod waiters;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::json;
use sundara_common::{Endpoints, Registry, Shutdown, js_err, nats};
use sundara_schemas::{
    ClientResult, MAX_MESSAGE_BYTES, ModelMeta, ResultStatus, SubmitOutcome, SubmitReply, SubmitRequest, decode,
    encode, subjects as subj,
};
use tokio::sync::Semaphore;
use tracing::Instrument;

pub use error::{ApiError, Protocol};
pub use keys::{ApiKeys, KeysError};
use waiters::Waiters;

/// The binary tensor data extension's header: the JSON part's length in bytes.
const INFERENCE_HEADER_LENGTH: &str = "inference-header-content-length";

/// `--max-body-bytes`' default: the largest submission ingress takes, as JSON (numbers
/// written out take several times their binary size).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * sundara_schemas::MAX_SUBMISSION_BYTES;

/// `sundara gateway`'s flags: what an operator sets; [`Config::from_args`] adds the rest.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Address the HTTP server listens on.
    #[arg(long, env = "SUNDARA_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// API keys, one `<tenant> <key>` per line (`#` comments; keys of at least 16
    /// characters): a request's `Authorization: Bearer <key>` names the tenant it acts as.
    #[arg(long, env = "SUNDARA_API_KEYS")]
    pub api_keys: PathBuf,
    /// Largest request body in bytes; a larger one is refused 413.
    #[arg(long, env = "SUNDARA_GATEWAY_MAX_BODY_BYTES", default_value_t = DEFAULT_MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Requests served at once; more are refused 503 with `Retry-After`.
    #[arg(long, env = "SUNDARA_GATEWAY_MAX_CONCURRENCY", default_value_t = 1024)]
    pub max_concurrency: usize,
    /// Each task's timeout in ms (the response waits at most this plus the verifier's
    /// grace, then answers 504).
    #[arg(long, env = "SUNDARA_GATEWAY_TASK_TIMEOUT_MS", default_value_t = 30_000)]
    pub task_timeout_ms: u64,
    /// A registered text-embedding model `/v1/embeddings` serves, with its Hugging Face
    /// tokenizer: `NAME=TOKENIZER.json` (repeatable)
    #[arg(long = "embedding-model", value_parser = parse_embedding_model)]
    pub embedding_models: Vec<(String, PathBuf)>,
}

/// `NAME=TOKENIZER.json`.
fn parse_embedding_model(text: &str) -> Result<(String, PathBuf), String> {
    match text.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(format!("{text:?}: expected NAME=TOKENIZER.json")),
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    pub listen: SocketAddr,
    pub keys: ApiKeys,
    pub max_body_bytes: usize,
    pub max_concurrency: usize,
    pub task_timeout: Duration,
    /// How long after the task's timeout a result may still come: the verifier decides a
    /// partial set at deadline + its grace (30 s), and ends every task.
    pub result_grace: Duration,
    /// Longest a client may take to send its body.
    pub body_timeout: Duration,
    /// Longest a client may take to send a request's headers (a connection that sends
    /// none, or sends them a byte at a time, is closed then).
    pub header_timeout: Duration,
    /// How often a waiting request reads its result back from RESULTS, in case the
    /// subscription missed it (a reconnect).
    pub recheck: Duration,
    /// Text-embedding models `/v1/embeddings` serves, each with its tokenizer's file.
    pub embedding_models: Vec<(String, PathBuf)>,
}

impl Config {
    pub fn new(endpoints: Endpoints, listen: SocketAddr, keys: ApiKeys) -> Config {
        Config {
            endpoints,
            listen,
            keys,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_concurrency: 1024,
            task_timeout: Duration::from_secs(30),
            result_grace: Duration::from_secs(45),
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            recheck: Duration::from_secs(2),
            embedding_models: Vec::new(),
        }
    }

    /// The config of `sundara gateway` with these flags (reads the API keys' file).
    pub fn from_args(args: Args, endpoints: Endpoints) -> Result<Config, KeysError> {
        let mut config = Config::new(endpoints, args.listen, ApiKeys::load(&args.api_keys)?);
        config.max_body_bytes = args.max_body_bytes;
        config.max_concurrency = args.max_concurrency.max(1);
        config.task_timeout = Duration::from_millis(args.task_timeout_ms);
        config.embedding_models = args.embedding_models;
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("the tokenizer of {model} ({path}): {reason}")]
    Tokenizer { model: String, path: PathBuf, reason: String },
}

/// What every handler shares.
struct Gateway {
    nats: async_nats::Client,
    registry: Registry,
    results: jetstream::stream::Stream<()>,
    keys: ApiKeys,
    waiters: Waiters,
    permits: Arc<Semaphore>,
    /// The tokenizer of each text-embedding model.
    tokenizers: std::collections::HashMap<String, Arc<tokenizers::Tokenizer>>,
    config: Config,
}

/// The tokenizers of `models`, without their files' padding and truncation: the gateway
/// pads each task to its longest input and refuses inputs that are too long.
fn load_tokenizers(
    models: &[(String, PathBuf)],
) -> Result<std::collections::HashMap<String, Arc<tokenizers::Tokenizer>>, GatewayError> {
    models
        .iter()
        .map(|(model, path)| {
            let failed = |reason: String| GatewayError::Tokenizer { model: model.clone(), path: path.clone(), reason };
            let mut tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| failed(e.to_string()))?;
            tokenizer.with_padding(None);
            tokenizer.with_truncation(None).map_err(|e| failed(e.to_string()))?;
            Ok((model.clone(), Arc::new(tokenizer)))
        })
        .collect()
}

type Shared = State<Arc<Gateway>>;

pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), GatewayError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("gateway", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), GatewayError> {
    let tokenizers = load_tokenizers(&config.embedding_models)?;
    let client = nats::connect(&config.endpoints.nats, "sundara-gateway").await?;
    let js = jetstream::new(client.clone());
    nats::await_provisioned(&js, Duration::from_secs(60)).await?;
    let registry = Registry::open(&js).await?;
    let results = js.get_stream_no_info(subj::RESULTS_STREAM).await.map_err(js_err)?;
    let waiters = Waiters::default();
    let subscription = client.subscribe(subj::RESULT_ALL).await.map_err(js_err)?;
    tokio::spawn(hand_out(subscription, waiters.clone(), shutdown.clone()));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| GatewayError::Listen { addr: config.listen, source })?;
    tracing::info!(addr = %config.listen, keys = ?config.keys, "gateway listening");
    let gateway = Arc::new(Gateway {
        nats: client,
        registry,
        results,
        keys: config.keys.clone(),
        waiters,
        permits: Arc::new(Semaphore::new(config.max_concurrency)),
        tokenizers,
        config,
    });
    let header_timeout = gateway.config.header_timeout;
    serve(listener, router(gateway), header_timeout, shutdown).await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Accepts connections until `shutdown`, each served by hyper with a bound on the time to
/// send a request's headers: a client cannot hold a connection open by never finishing them.
/// At shutdown every connection is asked to finish its request and close.
async fn serve(listener: tokio::net::TcpListener, app: axum::Router, header_timeout: Duration, shutdown: Shutdown) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (builder, app, shutdown) = (builder.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(app);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

/// Hands every published result to the request waiting for it. A result no request here
/// waits for (another gateway's, a NATS client's) is skipped by its subject, undecoded.
async fn hand_out(mut results: async_nats::Subscriber, waiters: Waiters, shutdown: Shutdown) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            msg = results.next() => match msg { Some(msg) => msg, None => return },
        };
        let waited = subj::result_parts(&msg.subject).is_some_and(|(_, task)| waiters.waits_for(task));
        if waited && let Ok(result) = decode::<ClientResult>(&msg.payload, MAX_MESSAGE_BYTES) {
            waiters.deliver(result);
        }
    }
}

fn router(gateway: Arc<Gateway>) -> axum::Router {
    axum::Router::new()
        .route("/v2/health/live", get(|| async { axum::Json(json!({"live": true})) }))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(version_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(version_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(infer_version))
        .route("/v1/models", get(openai_models))
        .route("/v1/embeddings", post(openai_embeddings))
        .merge(jobs::routes())
        .layer(axum::middleware::from_fn(access_log))
        .with_state(gateway)
}

/// Gives every request an id (its `x-request-id`, or a new one), returned in the
/// response's `x-request-id`, and logs one line per request with its status and time.
async fn access_log(mut request: Request, next: axum::middleware::Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    request.headers_mut().insert("x-request-id", HeaderValue::from_str(&id).expect("checked: visible ASCII"));
    let mut response = next.run(request).await;
    let status = response.status().as_u16();
    let seconds = started.elapsed().as_secs_f64();
    response.headers_mut().insert("x-request-id", HeaderValue::from_str(&id).expect("checked: visible ASCII"));
    metrics::counter!("sundara_http_requests_total", "status" => status.to_string()).increment(1);
    metrics::histogram!("sundara_http_request_seconds").record(seconds);
    tracing::info!(target: "sundara::access", %method, %path, status, ms = seconds * 1e3, request_id = %id);
    response
}

async fn ready(State(g): Shared) -> Response {
    match g.nats.connection_state() {
        async_nats::connection::State::Connected => axum::Json(json!({"ready": true})).into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"ready": false}))).into_response(),
    }
}

impl Gateway {
    /// The tenant of the request's bearer key.
    fn tenant(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        bearer.and_then(|key| self.keys.tenant(key)).map(str::to_string).ok_or_else(ApiError::unauthorized)
    }

    /// The model `name` (at `version`, else its latest).
    async fn model(&self, name: &str, version: Option<&str>) -> Result<Arc<ModelMeta>, ApiError> {
        let found = match version {
            Some(v) => self.registry.version(name, v).await,
            None => self.registry.latest(name).await,
        };
        let spec = version.map_or_else(|| name.to_string(), |v| format!("{name}@{v}"));
        found.map_err(|e| ApiError::internal(e.to_string()))?.ok_or_else(|| ApiError::unknown_model(&spec))
    }

    /// Submits `request` as `tenant`; the task's id on acceptance.
    async fn submit(&self, tenant: &str, request: &SubmitRequest) -> Result<String, ApiError> {
        let subject = subj::submit(tenant);
        let sent = match sundara_common::telemetry::context_headers() {
            Some(headers) => self.nats.request_with_headers(subject, headers, encode(request).into()).await,
            None => self.nats.request(subject, encode(request).into()).await,
        };
        let reply = sent.map_err(|e| ApiError::internal(format!("ingress did not answer: {e}")).retry_after(1))?;
        let reply = decode::<SubmitReply>(&reply.payload, MAX_MESSAGE_BYTES)
            .map_err(|e| ApiError::internal(format!("ingress' answer: {e}")))?;
        match reply.outcome {
            SubmitOutcome::Accepted { task_id, .. } => Ok(task_id),
            SubmitOutcome::Rejected { code, reason } => Err(ApiError::rejected(code, reason)),
        }
    }

    /// The task's result, once stored: read from RESULTS, for a wait that missed it.
    async fn read_back(&self, tenant: &str, task_id: &str) -> Option<ClientResult> {
        let raw = self.results.direct_get_last_for_subject(subj::result(tenant, task_id)).await.ok()?;
        decode::<ClientResult>(&raw.payload, MAX_MESSAGE_BYTES).ok()
    }

    /// Submits `request` and waits (bounded) for its result.
    async fn run_task(&self, tenant: &str, request: SubmitRequest) -> Result<ClientResult, ApiError> {
        // Known before submitting, so the wait is registered before the result can exist.
        let task_id = sundara_ingress::task_id(tenant, request.request_id.as_deref());
        let waiting = self.waiters.register(&task_id);
        metrics::gauge!("sundara_http_waiting").set(self.waiters.len() as f64);
        let accepted = self.submit(tenant, &request).await?;
        debug_assert_eq!(accepted, task_id, "ingress names a request's task by sundara_ingress::task_id");
        let within = self.config.task_timeout + self.config.result_grace;
        let read_back = || self.read_back(tenant, &task_id);
        let result = waiting.wait(within, self.config.recheck, read_back).await;
        metrics::gauge!("sundara_http_waiting").set(self.waiters.len() as f64);
        result.ok_or_else(|| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                "no_result",
                format!("task {task_id} has no result within {within:?}"),
            )
        })
    }

    /// The request's body as JSON of type `T`, read as [`Gateway::body`] reads it.
    async fn json_body<T: serde::de::DeserializeOwned>(&self, body: Body) -> Result<T, ApiError> {
        let bytes = self.body(body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid("invalid_request", format!("the body: {e}")))
    }

    /// The request's body, read within the body timeout and the size bound.
    async fn body(&self, body: Body) -> Result<Bytes, ApiError> {
        let limit = self.config.max_body_bytes;
        match tokio::time::timeout(self.config.body_timeout, axum::body::to_bytes(body, limit)).await {
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "slow_body",
                "the body took too long",
            )),
            Ok(Err(_)) => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "payload_too_large",
                format!("the body is over {limit} bytes"),
            )),
            Ok(Ok(bytes)) => Ok(bytes),
        }
    }
}

async fn model_metadata(State(g): Shared, headers: HeaderMap, Path(name): Path<String>) -> Response {
    metadata(&g, &headers, &name, None).await.unwrap_or_else(|e| e.render(Protocol::KServe))
}

async fn version_metadata(State(g): Shared, headers: HeaderMap, Path((name, v)): Path<(String, String)>) -> Response {
    metadata(&g, &headers, &name, Some(&v)).await.unwrap_or_else(|e| e.render(Protocol::KServe))
}

async fn metadata(g: &Gateway, headers: &HeaderMap, name: &str, version: Option<&str>) -> Result<Response, ApiError> {
    g.tenant(headers)?;
    let meta = g.model(name, version).await?;
    let versions = g.registry.versions(name).await.map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(axum::Json(kserve::ModelMetadata::of(&meta, versions.published)).into_response())
}

async fn model_ready(State(g): Shared, headers: HeaderMap, Path(name): Path<String>) -> Response {
    readiness(&g, &headers, &name, None).await.unwrap_or_else(|e| e.render(Protocol::KServe))
}

async fn version_ready(State(g): Shared, headers: HeaderMap, Path((name, v)): Path<(String, String)>) -> Response {
    readiness(&g, &headers, &name, Some(&v)).await.unwrap_or_else(|e| e.render(Protocol::KServe))
}

/// A registered model is ready: miners load it when its first task comes.
async fn readiness(g: &Gateway, headers: &HeaderMap, name: &str, version: Option<&str>) -> Result<Response, ApiError> {
    g.tenant(headers)?;
    let meta = g.model(name, version).await?;
    Ok(axum::Json(json!({"name": meta.name, "version": meta.version, "ready": true})).into_response())
}

async fn infer(State(g): Shared, Path(name): Path<String>, request: Request) -> Response {
    infer_as_kserve(g, name, None, request).await
}

async fn infer_version(State(g): Shared, Path((name, v)): Path<(String, String)>, request: Request) -> Response {
    infer_as_kserve(g, name, Some(v), request).await
}

async fn infer_as_kserve(g: Arc<Gateway>, name: String, version: Option<String>, request: Request) -> Response {
    let Ok(_permit) = g.permits.clone().try_acquire_owned() else {
        return ApiError::busy().render(Protocol::KServe);
    };
    // The task's trace starts here (or continues the client's `traceparent`): the
    // submission carries this span's context on to ingress and every stage after it.
    let span = tracing::info_span!(
        target: sundara_common::telemetry::SPANS,
        "http infer",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/v2/models/{name}/infer",
        http.response.status_code = tracing::field::Empty,
        sundara.model = %name,
        sundara.tenant = tracing::field::Empty,
        sundara.task_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    sundara_common::telemetry::follow(&span, Some(&trace_context(request.headers())));
    let response = match kserve_infer(&g, &name, version.as_deref(), request).instrument(span.clone()).await {
        Ok(response) => response,
        Err(e) => e.render(Protocol::KServe),
    };
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// The W3C trace context an HTTP request carries, as the NATS headers the telemetry reads.
fn trace_context(http: &HeaderMap) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = http.get(name).and_then(|v| v.to_str().ok()) {
            headers.insert(name, value);
        }
    }
    headers
}

async fn kserve_infer(g: &Gateway, name: &str, version: Option<&str>, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = g.tenant(&parts.headers)?;
    tracing::Span::current().record("sundara.tenant", tenant.as_str());
    let body = g.body(body).await?;
    let header_length = match parts.headers.get(INFERENCE_HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| ApiError::invalid("malformed", format!("{INFERENCE_HEADER_LENGTH} is not a length")))?,
        ),
    };
    let (infer, inputs) =
        kserve::parse_request(&body, header_length).map_err(|e| ApiError::invalid("malformed", e.to_string()))?;
    let meta = g.model(name, version).await?;
    let idempotency = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    let request = SubmitRequest {
        request_id: Some(idempotency.unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())),
        timeout_ms: Some(g.config.task_timeout.as_millis() as u64),
        ..SubmitRequest::new(&format!("{}@{}", meta.name, meta.version), inputs)
    };
    let result = g.run_task(&tenant, request).await?;
    tracing::Span::current().record("sundara.task_id", result.task_id.as_str());
    let (outputs, agreeing, k) = verified(result.status)?;
    let requested = infer.outputs.unwrap_or_default();
    let outputs: Vec<_> =
        outputs.into_iter().filter(|t| requested.is_empty() || requested.iter().any(|r| r.name == t.name)).collect();
    let all_binary = infer.parameters.binary_data_output == Some(true);
    let binary =
        |name: &str| all_binary || requested.iter().any(|r| r.name == name && r.parameters.binary_data == Some(true));
    let json = kserve::InferResponse {
        model_name: meta.name.clone(),
        model_version: meta.version.clone(),
        id: infer.id,
        outputs: outputs.iter().map(kserve::JsonTensor::from_tensor).collect(),
    };
    let (body, header_length) = kserve::render_response(json, &outputs, binary);
    let mut response = Response::new(Body::from(body));
    let content_type = if header_length.is_some() { "application/octet-stream" } else { "application/json" };
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(length) = header_length {
        response.headers_mut().insert(INFERENCE_HEADER_LENGTH, HeaderValue::from(length));
    }
    verified_headers(response.headers_mut(), &result.task_id, agreeing, k);
    Ok(response)
}

/// How the answer was verified: the task, and how many of its k miners agreed.
fn verified_headers(headers: &mut HeaderMap, task_id: &str, agreeing: u8, k: u8) {
    headers.insert("sundara-task-id", HeaderValue::from_str(task_id).expect("task ids are hex, joined by commas"));
    headers.insert("sundara-verified", HeaderValue::from_str(&format!("{agreeing}/{k}")).expect("digits"));
}

/// OpenAI's `GET /v1/models`: every registered model's latest version.
async fn openai_models(State(g): Shared, headers: HeaderMap) -> Response {
    let listed = async {
        g.tenant(&headers)?;
        let models = g.registry.list().await.map_err(|e| ApiError::internal(e.to_string()))?;
        let data: Vec<_> = models
            .iter()
            .map(|m| json!({"id": m.name, "object": "model", "created": m.pushed_at_ms / 1000, "owned_by": "sundara"}))
            .collect();
        Ok::<_, ApiError>(axum::Json(json!({"object": "list", "data": data})).into_response())
    };
    listed.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

/// A verified result's outputs and agreement, or its failure as an error.
fn verified(status: ResultStatus) -> Result<(Vec<sundara_schemas::Tensor>, u8, u8), ApiError> {
    match status {
        ResultStatus::Verified { outputs, agreeing, k } => Ok((outputs, agreeing, k)),
        ResultStatus::Failed { code, reason } => Err(ApiError::failed(code, reason)),
    }
}

/// OpenAI's `POST /v1/embeddings`: the inputs tokenized, cut into tasks, each verified.
async fn openai_embeddings(State(g): Shared, request: Request) -> Response {
    let Ok(_permit) = g.permits.clone().try_acquire_owned() else {
        return ApiError::busy().render(Protocol::OpenAi);
    };
    let span = tracing::info_span!(
        target: sundara_common::telemetry::SPANS,
        "http embeddings",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/v1/embeddings",
        sundara.tenant = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    sundara_common::telemetry::follow(&span, Some(&trace_context(request.headers())));
    embeddings(&g, request).instrument(span).await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

async fn embeddings(g: &Gateway, request: Request) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    let tenant = g.tenant(&parts.headers)?;
    tracing::Span::current().record("sundara.tenant", tenant.as_str());
    let asked: openai::EmbeddingsRequest = g.json_body(body).await?;
    let encoding = asked.encoding()?;
    if asked.dimensions.is_some() {
        let error = ApiError::invalid("invalid_value", "dimensions is not supported: the model's are returned");
        return Err(error.with_param("dimensions"));
    }
    let Some(tokenizer) = g.tokenizers.get(&asked.model) else {
        return Err(ApiError::unknown_model(&asked.model));
    };
    let meta = g.model(&asked.model, None).await?;
    // Up to 2,048 texts: tokenized off the async threads.
    let tokenizer = tokenizer.clone();
    let rows = tokio::task::spawn_blocking(move || {
        let tokenize =
            |text: &str| tokenizer.encode(text, true).map(|e| e.get_ids().to_vec()).map_err(|e| e.to_string());
        openai::token_rows(&asked.input, tokenize)
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))??;
    let tokens = rows.iter().map(Vec::len).sum();
    let base = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    let base = base.unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let tasks = rows.chunks(openai::ROWS_PER_TASK).enumerate().map(|(i, chunk)| {
        let request = SubmitRequest {
            request_id: Some(format!("{base}-{i}")),
            timeout_ms: Some(g.config.task_timeout.as_millis() as u64),
            ..SubmitRequest::new(&format!("{}@{}", meta.name, meta.version), openai::task_inputs(chunk))
        };
        g.run_task(&tenant, request)
    });
    let results = futures::future::try_join_all(tasks).await?;
    let (mut vectors, mut task_ids, mut weakest) = (Vec::with_capacity(rows.len()), Vec::new(), (u8::MAX, 0u8));
    for result in results {
        task_ids.push(result.task_id.clone());
        let (outputs, agreeing, k) = verified(result.status)?;
        if agreeing < weakest.0 {
            weakest = (agreeing, k);
        }
        let embedding = outputs.first().ok_or_else(|| ApiError::internal("a verified result without outputs"))?;
        let values = embedding.values::<f32>().ok_or_else(|| ApiError::internal("the embedding is not float32"))?;
        let width = embedding.shape.last().copied().unwrap_or(0).max(1) as usize;
        vectors.extend(values.chunks(width).map(<[f32]>::to_vec));
    }
    let mut response = axum::Json(openai::response(&meta.name, &vectors, tokens, encoding)).into_response();
    verified_headers(response.headers_mut(), &task_ids.join(","), weakest.0, weakest.1);
    Ok(response)
}
