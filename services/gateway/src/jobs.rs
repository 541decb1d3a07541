//! `/v1/jobs`: the jobs service's batch jobs over HTTP (docs/jobs.md §3), as the tenant the
//! bearer key names. Tensors are the KServe v2 JSON tensors of `/v2/.../infer`; errors are
//! written in OpenAI's envelope. A job small enough for one body is posted whole; a larger
//! one is created with `parts`, each part put on its own, then started.
//!
//! - `POST /v1/jobs` `{"model", "inputs"?, "parts"?, "shard_rows"?, "in_flight"?,
//!   "attempts"?, "shard_timeout_ms"?, "deadline_s"?}` → 201 and the job's status.
//! - `PUT /v1/jobs/{id}/parts/{n}` `{"inputs"}`, `POST /v1/jobs/{id}/start`.
//! - `GET /v1/jobs` (newest first), `GET /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel`.
//! - `GET /v1/jobs/{id}/shards/{n}`: one verified shard's outputs.
//! - `GET /v1/jobs/{id}/results`: NDJSON, one line per shard in the rows' order as soon as
//!   it and those before it are verified, then `{"job": status}` once the job ends.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sundara_jobs::client::{JobOptions, JobsClient, JobsClientError, ShardOutput, cut_parts};
use sundara_schemas::{JobRefusal, JobSpec, Tensor};

use crate::kserve::JsonTensor;
use crate::{ApiError, Gateway, Protocol, Shared};

/// `POST /v1/jobs`'s body.
#[derive(Debug, Deserialize)]
struct CreateJob {
    model: String,
    /// Every row of the job; absent when the parts are put one by one.
    #[serde(default)]
    inputs: Option<Vec<JsonTensor>>,
    /// Parts that will be put (without `inputs`).
    #[serde(default)]
    parts: Option<u32>,
    #[serde(default = "default_shard_rows")]
    shard_rows: u64,
    #[serde(default = "default_in_flight")]
    in_flight: u32,
    #[serde(default = "default_attempts")]
    attempts: u32,
    #[serde(default = "default_shard_timeout_ms")]
    shard_timeout_ms: u64,
    #[serde(default = "default_deadline_s")]
    deadline_s: u64,
}

fn default_shard_rows() -> u64 {
    100
}
fn default_in_flight() -> u32 {
    8
}
fn default_attempts() -> u32 {
    3
}
fn default_shard_timeout_ms() -> u64 {
    60_000
}
fn default_deadline_s() -> u64 {
    3600
}

#[derive(Debug, Deserialize)]
struct PutPart {
    inputs: Vec<JsonTensor>,
}

/// What a jobs client error is over HTTP.
fn api_error(e: JobsClientError) -> ApiError {
    let kind = "invalid_request_error";
    match e {
        JobsClientError::Refused { code, reason } => match code {
            JobRefusal::NotFound => ApiError::new(StatusCode::NOT_FOUND, kind, "job_not_found", reason),
            JobRefusal::UnknownModel => ApiError::new(StatusCode::NOT_FOUND, kind, "model_not_found", reason),
            JobRefusal::BadRequest => ApiError::invalid("invalid_request", reason),
            JobRefusal::WrongState => ApiError::new(StatusCode::CONFLICT, kind, "wrong_state", reason),
            JobRefusal::TooLarge => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, kind, "too_large", reason),
            JobRefusal::TooManyJobs => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "too_many_jobs", reason).retry_after(5)
            }
            JobRefusal::Unavailable => ApiError::internal(reason).retry_after(1),
        },
        JobsClientError::NotSplittable => ApiError::invalid("invalid_request", e.to_string()).with_param("inputs"),
        e @ JobsClientError::NoAnswer(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "jobs_unavailable", e.to_string())
                .retry_after(1)
        }
        e => ApiError::internal(e.to_string()),
    }
}

fn tensors(inputs: &[JsonTensor]) -> Result<Vec<Tensor>, ApiError> {
    let parsed: Result<Vec<Tensor>, _> = inputs.iter().map(JsonTensor::to_tensor).collect();
    parsed.map_err(|e| ApiError::invalid("invalid_tensor", e.to_string()).with_param("inputs"))
}

fn shard_json(shard: &ShardOutput) -> serde_json::Value {
    let outputs: Vec<JsonTensor> = shard.outputs.iter().map(JsonTensor::from_tensor).collect();
    json!({"shard": shard.shard, "first_row": shard.first_row, "task_id": shard.task_id, "outputs": outputs})
}

impl Gateway {
    /// The jobs of the request's tenant.
    fn jobs(&self, headers: &HeaderMap) -> Result<JobsClient, ApiError> {
        Ok(JobsClient::new(self.nats.clone(), &self.tenant(headers)?))
    }
}

fn status_json(status: &sundara_schemas::JobStatus) -> Response {
    axum::Json(json!(status)).into_response()
}

pub(crate) async fn create(State(g): Shared, request: Request) -> Response {
    let created = async {
        let (parts, body) = request.into_parts();
        let jobs = g.jobs(&parts.headers)?;
        let asked: CreateJob = g.json_body(body).await?;
        let options = JobOptions {
            in_flight: asked.in_flight,
            attempts: asked.attempts,
            shard_timeout: Duration::from_millis(asked.shard_timeout_ms),
            deadline: Duration::from_secs(asked.deadline_s),
            ..JobOptions::new(&asked.model, asked.shard_rows)
        };
        let status = match (asked.inputs, asked.parts) {
            (Some(inputs), None) => {
                let inputs = tensors(&inputs)?;
                // Checked here, so a body that cannot be cut is refused before a job exists.
                cut_parts(inputs.clone(), options.shard_rows.max(1), options.part_bytes).map_err(api_error)?;
                jobs.submit(inputs, &options).await
            }
            (None, Some(parts)) => {
                let spec = JobSpec {
                    model: options.model.clone(),
                    parts,
                    shard_rows: options.shard_rows,
                    in_flight: options.in_flight,
                    attempts: options.attempts,
                    shard_timeout_ms: asked.shard_timeout_ms,
                    deadline_ms: asked.deadline_s.saturating_mul(1000),
                };
                jobs.create(spec).await
            }
            _ => return Err(ApiError::invalid("invalid_request", "give either inputs or parts").with_param("inputs")),
        };
        let status = status.map_err(api_error)?;
        Ok::<_, ApiError>((StatusCode::CREATED, axum::Json(json!(status))).into_response())
    };
    created.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub(crate) async fn put_part(State(g): Shared, Path((id, part)): Path<(String, u32)>, request: Request) -> Response {
    let put = async {
        let (parts, body) = request.into_parts();
        let jobs = g.jobs(&parts.headers)?;
        let asked: PutPart = g.json_body(body).await?;
        let status = jobs.put(&id, part, tensors(&asked.inputs)?).await.map_err(api_error)?;
        Ok::<_, ApiError>(status_json(&status))
    };
    put.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub(crate) async fn start(State(g): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let started = async { Ok::<_, ApiError>(status_json(&g.jobs(&headers)?.start(&id).await.map_err(api_error)?)) };
    started.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub(crate) async fn show(State(g): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let shown = async { Ok::<_, ApiError>(status_json(&g.jobs(&headers)?.show(&id).await.map_err(api_error)?)) };
    shown.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub(crate) async fn cancel(State(g): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let cancelled = async { Ok::<_, ApiError>(status_json(&g.jobs(&headers)?.cancel(&id).await.map_err(api_error)?)) };
    cancelled.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub(crate) async fn list(State(g): Shared, headers: HeaderMap) -> Response {
    let listed = async {
        let jobs = g.jobs(&headers)?.list().await.map_err(api_error)?;
        Ok::<_, ApiError>(axum::Json(json!({"object": "list", "data": jobs})).into_response())
    };
    listed.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

pub(crate) async fn shard(State(g): Shared, headers: HeaderMap, Path((id, n)): Path<(String, u32)>) -> Response {
    let fetched = async {
        let shard = g.jobs(&headers)?.fetch(&id, n).await.map_err(api_error)?;
        Ok::<_, ApiError>(axum::Json(shard_json(&shard)).into_response())
    };
    fetched.await.unwrap_or_else(|e| e.render(Protocol::OpenAi))
}

/// How long the results stream waits for any change before it ends with an error line.
const RESULTS_IDLE: Duration = Duration::from_secs(300);

pub(crate) async fn results(State(g): Shared, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let jobs = match g.jobs(&headers) {
        Ok(jobs) => jobs,
        Err(e) => return e.render(Protocol::OpenAi),
    };
    // Known before the stream starts: a job that is not the tenant's is a 404, not a stream.
    if let Err(e) = jobs.show(&id).await {
        return api_error(e).render(Protocol::OpenAi);
    }
    // Bounded: a slow reader holds back the follower, which holds no more than 16 lines.
    let (lines, received) = tokio::sync::mpsc::channel::<String>(16);
    tokio::spawn(follow(jobs, id, lines));
    let stream = futures::stream::unfold(received, |mut received| async move {
        let line = received.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(line), received))
    });
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(axum::http::header::CONTENT_TYPE, "application/x-ndjson".parse().unwrap());
    response
}

/// Sends each shard of `id` as an NDJSON line as it is verified, then the job's end; stops
/// when the HTTP client goes away.
async fn follow(jobs: JobsClient, id: String, lines: tokio::sync::mpsc::Sender<String>) {
    let follower = jobs.follow(
        &id,
        RESULTS_IDLE,
        |_| {},
        |s| {
            let (sender, line) = (lines.clone(), format!("{}\n", shard_json(&s)));
            async move {
                let _ = sender.send(line).await;
            }
        },
    );
    let ended = tokio::select! {
        _ = lines.closed() => return,
        ended = follower => ended,
    };
    let last = match ended {
        Ok(status) => json!({"job": status}),
        Err(JobsClientError::Ended { job_id, state, reason }) => {
            json!({"job": {"job_id": job_id, "state": state, "reason": reason}})
        }
        Err(e) => json!({"error": e.to_string()}),
    };
    let _ = lines.send(format!("{last}\n")).await;
}

/// The routes, on the gateway's state.
pub(crate) fn routes() -> axum::Router<Arc<Gateway>> {
    use axum::routing::{get, post, put};
    axum::Router::new()
        .route("/v1/jobs", post(create).get(list))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/parts/{part}", put(put_part))
        .route("/v1/jobs/{id}/start", post(start))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/shards/{shard}", get(shard))
        .route("/v1/jobs/{id}/results", get(results))
}
