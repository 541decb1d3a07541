//! Ingress: the `sundara.submit.<tenant>` NATS service. Validates each submission against
//! the model registry and stores accepted tasks in the TASKS stream (deduplicated by task
//! id) before answering, so an `Accepted` reply means the task is durable. The tenant is
//! the subject's last token: NATS permissions let each tenant's credentials publish only
//! there, so a payload can never claim another tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::service::ServiceExt;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use sundara_common::admission::{Admission, Refusal, TenantLimits, TenantPolicy};
use sundara_common::{
    Capacity, Endpoints, Error as CommonError, JetStreamErrorKind, Registry, Shutdown, nats, telemetry,
};
use sundara_schemas::{
    DecodeError, Limits, ModelMeta, Priority, RejectCode, SubmitOutcome, SubmitReply, SubmitRequest, Task, TensorError,
    WIRE_VERSION, decode, encode, now_ms, now_us, subjects as subj,
};
use tracing::Instrument;

/// `sundara ingress`'s flags: what an operator sets; [`Config::from_args`] adds the rest.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Per-tenant limits, JSON: {"default": {"rate_per_s", "burst", "max_in_flight",
    /// "max_payload_bytes"}, "tenants": {"<tenant>": {...}}}; fields left out default.
    #[arg(long, env = "SUNDARA_TENANT_LIMITS")]
    pub tenant_limits: Option<std::path::PathBuf>,
    /// Tasks in flight in the whole fleet beyond which submissions are told `overloaded`.
    #[arg(long, env = "SUNDARA_MAX_IN_FLIGHT", default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: u64,
    /// Shortest timeout a task may ask for, in ms: a task that expires at once still takes
    /// its bytes in TASKS for the linger, and would only cost the others.
    #[arg(long, env = "SUNDARA_MIN_TIMEOUT_MS", default_value_t = DEFAULT_MIN_TIMEOUT_MS)]
    pub min_timeout_ms: u64,
    /// Seconds a task stays in TASKS after its deadline (its TTL is its timeout plus
    /// this): the scheduler and the verifier must be able to end it within it, so keep it
    /// above any scheduler outage to ride out.
    #[arg(long, env = "SUNDARA_TASK_LINGER_SECS", default_value_t = DEFAULT_TASK_LINGER_SECS)]
    pub task_linger_secs: u64,
}

/// `--task-linger-secs`' default ([`nats::Retention::task_linger`]'s).
pub const DEFAULT_TASK_LINGER_SECS: u64 = nats::DEFAULT_TASK_LINGER_SECS;

/// `--min-timeout-ms`' default.
pub const DEFAULT_MIN_TIMEOUT_MS: u64 = 1000;

/// `--max-in-flight`'s default.
pub const DEFAULT_MAX_IN_FLIGHT: u64 = 100_000;

impl Default for Args {
    /// The flags' defaults (what `sundara ingress` with no flags runs with).
    fn default() -> Args {
        Args {
            tenant_limits: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            min_timeout_ms: DEFAULT_MIN_TIMEOUT_MS,
            task_linger_secs: DEFAULT_TASK_LINGER_SECS,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    /// Largest submission accepted, in bytes (NATS' own max_payload must be at least this).
    pub max_request_bytes: usize,
    pub limits: Limits,
    /// Deadline given to tasks that ask for none.
    pub default_timeout: Duration,
    /// Longest deadline a task may ask for.
    pub max_timeout: Duration,
    /// Shortest timeout a task may ask for (`--min-timeout-ms`).
    pub min_timeout: Duration,
    /// Submissions handled at once.
    pub concurrency: usize,
    /// How long a full fleet, once Redis said so, is taken as still full. A retry of a task
    /// admitted before may then be told `overloaded` too, and learns it was accepted when it
    /// retries after this.
    pub full_memo: Duration,
    /// How long a model's fit in the fleet (see [`fits`]) is reused before Redis is asked again.
    pub fit_refresh: Duration,
    pub retention: nats::Retention,
    /// Per-tenant limits on rate, tasks in flight, payload size and priority.
    pub tenants: TenantPolicy,
    /// Tasks in flight in the whole fleet (admitted, no result yet) beyond which every
    /// tenant is told `overloaded`: the backlog, and the memory it takes, stay bounded.
    pub max_in_flight: u64,
}

impl Config {
    /// The defaults, as `sundara ingress` with no flags.
    pub fn new(endpoints: Endpoints) -> Config {
        Config {
            endpoints,
            max_request_bytes: sundara_schemas::MAX_SUBMISSION_BYTES,
            limits: Limits::default(),
            default_timeout: Duration::from_secs(60),
            max_timeout: Duration::from_secs(3600),
            min_timeout: Duration::from_millis(DEFAULT_MIN_TIMEOUT_MS),
            concurrency: 256,
            full_memo: Duration::from_millis(10),
            fit_refresh: Duration::from_secs(1),
            retention: nats::Retention::default(),
            tenants: TenantPolicy::default(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// The config of `sundara ingress` with these flags: reads `--tenant-limits`' file.
    pub fn from_args(args: Args, endpoints: Endpoints) -> Result<Config, String> {
        let mut config = Config::new(endpoints);
        if let Some(path) = &args.tenant_limits {
            let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            config.tenants = TenantPolicy::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        config.max_in_flight = args.max_in_flight;
        config.min_timeout = Duration::from_millis(args.min_timeout_ms);
        config.retention.task_linger = Duration::from_secs(args.task_linger_secs);
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error("cannot start the submit service: {0}")]
    Service(String),
}

/// A typed refusal, sent back to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectCode,
    pub reason: String,
}

fn reject(code: RejectCode, reason: impl Into<String>) -> Rejection {
    Rejection { code, reason: reason.into() }
}

/// Decodes a submission, bounded by `max_bytes` before anything is allocated.
pub fn decode_request(bytes: &[u8], max_bytes: usize) -> Result<SubmitRequest, Rejection> {
    decode::<SubmitRequest>(bytes, max_bytes).map_err(|e| match e {
        DecodeError::TooLarge { .. } => reject(RejectCode::PayloadTooLarge, e.to_string()),
        DecodeError::UnsupportedVersion(_) => reject(RejectCode::UnsupportedVersion, e.to_string()),
        DecodeError::Malformed(_) => reject(RejectCode::Malformed, e.to_string()),
    })
}

/// Checks the priority a submission asks for against its tenant's entitlement
/// ([`TenantLimits::max_priority`]). Pure: no I/O. Refused, not lowered: the client learns
/// at once that it is not entitled, rather than finding its task dispatched later than asked.
pub fn entitled(tenant: &str, priority: Priority, limits: &TenantLimits) -> Result<(), Rejection> {
    if limits.permits(priority) {
        return Ok(());
    }
    Err(reject(
        RejectCode::PriorityNotPermitted,
        format!(
            "tenant {tenant} may ask for priority {} at most, not {}",
            limits.max_priority.as_str(),
            priority.as_str()
        ),
    ))
}

/// Checks a submission against its model's declared inputs. Pure: no I/O.
pub fn admit(req: &SubmitRequest, model: &ModelMeta, limits: &Limits) -> Result<(), Rejection> {
    if req.inputs.len() > limits.max_tensors {
        return Err(reject(
            RejectCode::Malformed,
            format!("{} tensors, over the limit of {}", req.inputs.len(), limits.max_tensors),
        ));
    }
    for t in &req.inputs {
        t.validate(limits).map_err(|e| {
            let code = match e {
                TensorError::HostileShape { .. } | TensorError::RankTooHigh { .. } => RejectCode::HostileShape,
                TensorError::TooLarge { .. } => RejectCode::PayloadTooLarge,
                TensorError::LengthMismatch { .. } => RejectCode::Malformed,
            };
            reject(code, e.to_string())
        })?;
        if !model.inputs.iter().any(|spec| spec.name == t.name) {
            return Err(reject(RejectCode::UnexpectedInput, format!("model {} has no input `{}`", model.name, t.name)));
        }
        if req.inputs.iter().filter(|o| o.name == t.name).count() > 1 {
            return Err(reject(RejectCode::Malformed, format!("input `{}` given twice", t.name)));
        }
        // Nothing to run: refused here rather than sent to k miners to fail or agree on nothing.
        if t.shape.contains(&0) {
            return Err(reject(
                RejectCode::WrongShape,
                format!("input `{}` has shape {:?}: a dimension of 0 leaves no values to run on", t.name, t.shape),
            ));
        }
    }
    for spec in &model.inputs {
        let Some(t) = req.inputs.iter().find(|t| t.name == spec.name) else {
            return Err(reject(RejectCode::MissingInput, format!("model {} needs input `{}`", model.name, spec.name)));
        };
        if let Some(why) = spec.mismatch(t) {
            let code = if t.dtype != spec.dtype { RejectCode::WrongDtype } else { RejectCode::WrongShape };
            return Err(reject(code, why));
        }
    }
    Ok(())
}

/// Whether a model fits anywhere: its measured footprint (its file size until a worker
/// has loaded it) against the largest live slice. An empty fleet admits everything (the
/// task waits for capacity).
pub fn fits(model: &ModelMeta, footprint: Option<u64>, largest_slice: Option<u64>) -> Result<(), Rejection> {
    let need = footprint.unwrap_or(model.size);
    match largest_slice {
        Some(largest) if need > largest => Err(reject(
            RejectCode::ModelTooLarge,
            format!(
                "model {}@{} needs {need} bytes loaded; the largest slice in the fleet has {largest}",
                model.name, model.version
            ),
        )),
        _ => Ok(()),
    }
}

/// Why a named model is unknown: no such model, or no such version of it (with its latest).
async fn unknown_model(name: &str, version: Option<&str>, registry: &Registry) -> String {
    let Some(version) = version else { return format!("no model named {name:?}") };
    match registry.latest(name).await {
        Ok(Some(latest)) => {
            format!("model {name} has no version {version:?} (its latest is {name}@{})", latest.version)
        }
        _ => format!("no model named {name:?} (asked for version {version:?})"),
    }
}

/// Task id: derived from (tenant, request id) when the client gives one, so a retried
/// submission maps to the same task and JetStream stores it once; random (time-ordered) otherwise.
pub fn task_id(tenant: &str, request_id: Option<&str>) -> String {
    match request_id {
        Some(rid) => {
            let mut h = Sha256::new();
            h.update(tenant.as_bytes());
            h.update([0]);
            h.update(rid.as_bytes());
            hex::encode(&h.finalize()[..16])
        }
        None => uuid::Uuid::now_v7().simple().to_string(),
    }
}

/// When a model's fit was read, and what it was.
type FitVerdict = (Instant, Result<(), Rejection>);

/// What one ingress knows of the fleet's bound on tasks in flight, owned under a lock and
/// free of I/O. Once Redis said the fleet is full, submissions are refused without asking
/// for `memo`; after that, one submission asks again while the others are still refused,
/// until its answer: so a flood costs about one Redis call per `memo`, not one each.
#[derive(Debug, Default)]
pub struct FullFleet {
    /// When Redis last said full; `None` while it is not known to be.
    full_at: Option<Instant>,
    /// A submission is asking Redis again.
    checking: bool,
}

/// What a submission does about the fleet's bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// Ask Redis (through the admission script).
    Redis,
    /// Refuse as `overloaded` at once.
    Refuse,
}

impl FullFleet {
    pub fn ask(&mut self, now: Instant, memo: Duration) -> Ask {
        match self.full_at {
            None => Ask::Redis,
            Some(at) if now.duration_since(at) < memo || self.checking => Ask::Refuse,
            Some(_) => {
                self.checking = true;
                Ask::Redis
            }
        }
    }

    /// Redis answered a submission: `Some(true)` full, `Some(false)` admitted (so not
    /// full), `None` refused for another reason or not answered (not known).
    pub fn answered(&mut self, full: Option<bool>, now: Instant) {
        self.checking = false;
        self.full_at = match full {
            Some(true) => Some(now),
            Some(false) | None => None,
        };
    }
}

struct Ingress {
    config: Config,
    js: async_nats::jetstream::Context,
    registry: Registry,
    capacity: Capacity,
    /// Per model version: when its fit was last read from Redis, and the verdict.
    fit_cache: Mutex<HashMap<String, FitVerdict>>,
    /// Whether Redis said the fleet is full, and when: a flood against a full fleet costs
    /// no Redis call per rejection (see [`FullFleet`]).
    full_fleet: Mutex<FullFleet>,
}

impl Ingress {
    async fn handle(&self, subject: &str, payload: &[u8]) -> SubmitOutcome {
        let span = tracing::Span::current();
        let accepted = match subj::submit_tenant(subject) {
            Some(tenant) => {
                span.record("sundara.tenant", tenant);
                self.accept(tenant, payload).await
            }
            None => Err(reject(RejectCode::InvalidName, "tenant must be 1-64 of [A-Za-z0-9_-]")),
        };
        match accepted {
            Ok((task_id, duplicate)) => {
                span.record("sundara.task_id", task_id.as_str());
                span.record("sundara.outcome", if duplicate { "duplicate" } else { "accepted" });
                SubmitOutcome::Accepted { task_id, duplicate }
            }
            Err(r) => {
                tracing::debug!(code = r.code.as_str(), reason = %r.reason, "rejected");
                metrics::counter!("sundara_ingress_rejected_total", "reason" => r.code.as_str()).increment(1);
                span.record("sundara.outcome", r.code.as_str());
                span.record("otel.status_code", "error");
                SubmitOutcome::Rejected { code: r.code, reason: r.reason }
            }
        }
    }

    async fn accept(&self, tenant: &str, payload: &[u8]) -> Result<(String, bool), Rejection> {
        let limits = self.config.tenants.limits(tenant);
        let max_bytes = limits.max_payload_bytes.min(self.config.max_request_bytes);
        let req = decode_request(payload, max_bytes)?;
        if req.request_id.as_ref().is_some_and(|r| r.len() > 256) {
            return Err(reject(RejectCode::Malformed, "request_id is longer than 256 bytes"));
        }
        entitled(tenant, req.priority, limits)?;
        let model = self.model(&req.model).await?;
        admit(&req, &model, &self.config.limits)?;
        self.fit(&model).await?;
        let timeout = self.timeout_of(&req)?;
        let now = now_ms();
        let task_id = task_id(tenant, req.request_id.as_deref());
        let deadline_at_ms = now + timeout.as_millis() as u64;
        let task = Task {
            v: WIRE_VERSION,
            task_id: task_id.clone(),
            tenant: tenant.to_string(),
            model: model.model_ref(),
            k: model.policy.redundancy.max(1),
            inputs: req.inputs,
            seed: req.seed,
            submitted_at_ms: now,
            deadline_at_ms,
            accepted_at_us: now_us(),
            priority: req.priority,
        };
        let subject = subj::task(task.priority, &model.name);
        let span = tracing::Span::current();
        span.record("sundara.model", tracing::field::display(&task.model));
        let payload = encode(&task);
        // In TASKS while it can be dispatched, reassigned or decided; then it leaves.
        let ttl = timeout + self.config.retention.task_linger;
        let admission = Admission {
            tenant,
            task: &task_id,
            deadline_ms: deadline_at_ms,
            bytes: payload.len() as u64,
            stored_until_ms: now + ttl.as_millis() as u64,
        };
        self.count_against_limits(&admission).await?;
        let ack = nats::publish_task(&self.js, subject, &task_id, payload, ttl).await;
        match ack {
            Ok(ack) => {
                let labels = [("model", model.name.clone()), ("priority", task.priority.as_str().to_string())];
                metrics::counter!("sundara_ingress_accepted_total", &labels).increment(1);
                Ok((task_id, ack.duplicate))
            }
            Err(e) => {
                // Never stored, so never finished: it must not hold the tenant's slot or bytes.
                let released = async {
                    self.capacity.finish(tenant, &task_id).await?;
                    self.capacity.unstore(tenant, &task_id).await
                };
                if let Err(e) = released.await {
                    tracing::warn!(error = %e, "could not release an unstored task's slot");
                }
                let code = match &e {
                    CommonError::JetStream(e) if e.kind() == JetStreamErrorKind::StreamFull => RejectCode::Overloaded,
                    _ => RejectCode::Internal,
                };
                Err(reject(code, e.to_string()))
            }
        }
    }

    /// The model a submission names: `name` (its latest version) or `name@version` (that
    /// version, pinned). The task carries the version resolved here.
    async fn model(&self, spec: &str) -> Result<Arc<ModelMeta>, Rejection> {
        let (name, version) = sundara_schemas::ModelRef::split_spec(spec);
        match self.registry.resolve(spec).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(reject(RejectCode::UnknownModel, unknown_model(name, version, &self.registry).await)),
            Err(e) => Err(reject(RejectCode::Internal, e.to_string())),
        }
    }

    /// The timeout a request asks for (the default where it asks none), at most the
    /// longest allowed; one shorter than the minimum is refused.
    fn timeout_of(&self, req: &SubmitRequest) -> Result<Duration, Rejection> {
        let asked = req.timeout_ms.map(Duration::from_millis);
        if let Some(asked) = asked
            && asked < self.config.min_timeout
        {
            return Err(reject(
                RejectCode::TimeoutTooShort,
                format!(
                    "timeout_ms {} is under the minimum of {} ms",
                    asked.as_millis(),
                    self.config.min_timeout.as_millis()
                ),
            ));
        }
        Ok(asked.unwrap_or(self.config.default_timeout).min(self.config.max_timeout))
    }

    /// Counts the task against its tenant's limits and the fleet's. If Redis cannot
    /// answer, the task is admitted: the limits are fairness, and the TASKS stream's own
    /// size bound still holds.
    async fn count_against_limits(&self, task: &Admission<'_>) -> Result<(), Rejection> {
        let tenant = task.tenant;
        let limits = self.config.tenants.limits(tenant);
        let fleet_full = || {
            reject(
                RejectCode::Overloaded,
                format!("the fleet has {} tasks in flight; retry later", self.config.max_in_flight),
            )
        };
        let full_fleet = || self.full_fleet.lock().unwrap_or_else(|e| e.into_inner());
        if full_fleet().ask(Instant::now(), self.config.full_memo) == Ask::Refuse {
            return Err(fleet_full());
        }
        let answer = self.capacity.admit(task, limits, self.config.max_in_flight).await;
        let full = match &answer {
            Ok(Ok(())) => Some(false),
            Ok(Err(Refusal::FleetInFlight { .. })) => Some(true),
            _ => None,
        };
        full_fleet().answered(full, Instant::now());
        match answer {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Refusal::RateLimited { retry_after })) => Err(reject(
                RejectCode::RateLimited,
                format!("tenant {tenant} is over its rate limit; retry after {} ms", retry_after.as_millis().max(1)),
            )),
            Ok(Err(Refusal::TenantInFlight { max })) => Err(reject(
                RejectCode::TooManyInFlight,
                format!("tenant {tenant} has {max} tasks in flight, its limit; retry when results arrive"),
            )),
            Ok(Err(Refusal::FleetInFlight { .. })) => Err(fleet_full()),
            Ok(Err(Refusal::StoredBytes { max })) => Err(reject(
                RejectCode::StorageQuota,
                format!(
                    "tenant {tenant}'s stored tasks take {max} bytes, its quota; retry when older tasks have \
                     expired from the queue (each stays until its deadline plus {} s)",
                    self.config.retention.task_linger.as_secs()
                ),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read admission state; admitting");
                Ok(())
            }
        }
    }

    /// A stored result finishes its task: it no longer counts against the limits.
    /// Idempotent, as [`nats::consume_acking_all`] needs.
    async fn on_result(&self, msg: async_nats::jetstream::Message) -> Result<(), sundara_common::Error> {
        match subj::result_parts(&msg.subject) {
            Some((tenant, task)) => self.capacity.finish(tenant, task).await,
            None => Ok(()),
        }
    }
}

impl Ingress {
    /// [`fits`], with the fleet's numbers read from Redis at most once per `fit_refresh`
    /// per model. If Redis cannot answer, the task is admitted: a worker refuses a model it
    /// cannot hold, and fit is an early answer, not a safety check.
    async fn fit(&self, model: &ModelMeta) -> Result<(), Rejection> {
        let key = model.model_ref().to_string();
        if let Some((at, verdict)) = self.fit_cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && at.elapsed() < self.config.fit_refresh
        {
            return verdict.clone();
        }
        let verdict = match self.capacity.fit(&key).await {
            Ok((footprint, largest)) => fits(model, footprint, largest),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the fleet's memory; admitting");
                Ok(())
            }
        };
        self.fit_cache.lock().unwrap_or_else(|e| e.into_inner()).insert(key, (Instant::now(), verdict.clone()));
        verdict
    }
}

/// Serves `sundara.submit` until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), IngressError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("ingress", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), IngressError> {
    let client = nats::connect(&config.endpoints.nats, "sundara-ingress").await?;
    let js = async_nats::jetstream::new(client.clone());
    nats::provision(&js, &config.retention).await?;
    let registry = Registry::open(&js).await?;
    let capacity = Capacity::open(&config.endpoints).await?;
    let service = client
        .service_builder()
        .description("Sundara task submission")
        .queue_group("sundara-ingress")
        .start("sundara-ingress", env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| IngressError::Service(e.to_string()))?;
    let endpoint = service
        .endpoint_builder()
        .name("submit")
        .add(subj::SUBMIT_ALL)
        .await
        .map_err(|e| IngressError::Service(e.to_string()))?;
    // Headers only: finishing a task needs its subject, not its outputs.
    // Acked a chunk at a time: finishing is idempotent.
    let results_config = nats::acking_all(async_nats::jetstream::consumer::pull::Config {
        headers_only: true,
        ..nats::consumer_config("ingress-finish", subj::RESULT_ALL, Duration::from_secs(30), 4096)
    });
    let results = nats::ensure_consumer(&js, subj::RESULTS_STREAM, results_config).await?;
    let ingress = Arc::new(Ingress {
        config: config.clone(),
        js,
        registry,
        capacity,
        fit_cache: Mutex::default(),
        full_fleet: Mutex::default(),
    });
    let finish = tokio::spawn({
        let (ingress, shutdown) = (ingress.clone(), shutdown.clone());
        async move {
            nats::consume_acking_all(&results, &shutdown, 64, "ingress-finish", |msg| ingress.on_result(msg)).await
        }
    });
    tracing::info!(subject = subj::SUBMIT_ALL, "ingress serving");
    let serve = endpoint.take_until(shutdown.cancelled()).for_each_concurrent(config.concurrency, |request| {
        let ingress = &*ingress;
        async move {
            let span = tracing::info_span!(
                target: sundara_common::telemetry::SPANS,
                "ingress submit",
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                messaging.system = "nats",
                "messaging.operation.type" = "process",
                messaging.destination.name = %request.message.subject,
                sundara.task_id = tracing::field::Empty,
                sundara.model = tracing::field::Empty,
                sundara.tenant = tracing::field::Empty,
                sundara.outcome = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            );
            telemetry::follow(&span, request.message.headers.as_ref());
            let outcome = ingress.handle(&request.message.subject, &request.message.payload).instrument(span).await;
            let reply = encode(&SubmitReply { v: WIRE_VERSION, outcome });
            if let Err(e) = request.respond(Ok(reply.into())).await {
                tracing::warn!(error = %e, "could not answer a submission");
            }
        }
    });
    serve.await;
    let _ = service.stop().await;
    let finished = finish.await.map_err(|e| IngressError::Service(format!("result consumer: {e}")))?;
    let _ = client.flush().await;
    tracing::info!("ingress stopped");
    finished.map_err(IngressError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_fleet_is_asked_about_once_per_memo() {
        let memo = Duration::from_millis(10);
        let t0 = Instant::now();
        let mut f = FullFleet::default();
        assert_eq!(f.ask(t0, memo), Ask::Redis, "not known to be full");
        f.answered(Some(true), t0);
        assert_eq!(f.ask(t0 + Duration::from_millis(9), memo), Ask::Refuse, "full, as Redis said");
        let later = t0 + Duration::from_millis(11);
        assert_eq!(f.ask(later, memo), Ask::Redis, "one asks again after the memo");
        assert_eq!(f.ask(later, memo), Ask::Refuse, "the others wait for its answer");
        f.answered(Some(true), later);
        assert_eq!(f.ask(later + Duration::from_millis(5), memo), Ask::Refuse);
        let freed = later + Duration::from_millis(20);
        assert_eq!(f.ask(freed, memo), Ask::Redis);
        f.answered(Some(false), freed);
        assert_eq!(f.ask(freed, memo), Ask::Redis, "admitted: no longer full");
        f.answered(None, freed);
        assert_eq!(f.ask(freed, memo), Ask::Redis, "another refusal tells nothing");
    }
    use sundara_schemas::{DType, Policy, Tensor, TensorSpec};

    fn mlp() -> ModelMeta {
        ModelMeta {
            v: 1,
            name: "mlp".into(),
            version: "1".into(),
            sha256: String::new(),
            size: 0,
            object: String::new(),
            inputs: vec![TensorSpec { name: "x".into(), dtype: DType::F32, shape: vec![None, Some(4)] }],
            outputs: vec![],
            policy: Policy::default(),
            pushed_at_ms: 0,
            batching: Default::default(),
            lineage: None,
        }
    }

    fn req(inputs: Vec<Tensor>) -> SubmitRequest {
        SubmitRequest::new("mlp", inputs)
    }

    fn code(inputs: Vec<Tensor>) -> Option<RejectCode> {
        admit(&req(inputs), &mlp(), &Limits::default()).err().map(|r| r.code)
    }

    #[test]
    fn admits_matching_input_with_any_batch() {
        assert_eq!(code(vec![Tensor::from_values("x", vec![3, 4], &[0f32; 12])]), None);
    }

    #[test]
    fn rejects_each_kind_of_bad_input() {
        assert_eq!(code(vec![]), Some(RejectCode::MissingInput));
        assert_eq!(code(vec![Tensor::from_values("y", vec![1, 4], &[0f32; 4])]), Some(RejectCode::UnexpectedInput));
        assert_eq!(code(vec![Tensor::from_values("x", vec![1, 4], &[0i64; 4])]), Some(RejectCode::WrongDtype));
        assert_eq!(code(vec![Tensor::from_values("x", vec![1, 5], &[0f32; 5])]), Some(RejectCode::WrongShape));
        assert_eq!(code(vec![Tensor::from_values("x", vec![4], &[0f32; 4])]), Some(RejectCode::WrongShape));
        let hostile = Tensor { name: "x".into(), dtype: DType::F32, shape: vec![1 << 40, 1 << 40], data: vec![] };
        assert_eq!(code(vec![hostile]), Some(RejectCode::HostileShape));
        let short = Tensor { name: "x".into(), dtype: DType::F32, shape: vec![1, 4], data: vec![0; 15] };
        assert_eq!(code(vec![short]), Some(RejectCode::Malformed));
    }

    #[test]
    fn an_empty_input_is_refused_at_once() {
        for shape in [vec![0, 4], vec![3, 0], vec![0, 0]] {
            let empty = Tensor::from_values("x", shape.clone(), &[0f32; 0]);
            let refused = admit(&req(vec![empty]), &mlp(), &Limits::default()).unwrap_err();
            assert_eq!(refused.code, RejectCode::WrongShape, "{shape:?}");
            assert!(refused.reason.contains("dimension of 0"), "{}", refused.reason);
        }
    }

    #[test]
    fn decoding_is_bounded_and_typed() {
        assert_eq!(decode_request(&[0xc1], 100).unwrap_err().code, RejectCode::Malformed);
        assert_eq!(decode_request(&[0; 101], 100).unwrap_err().code, RejectCode::PayloadTooLarge);
        let mut r = req(vec![]);
        r.v = 9;
        assert_eq!(decode_request(&encode(&r), 1000).unwrap_err().code, RejectCode::UnsupportedVersion);
    }

    #[test]
    fn a_model_larger_than_every_slice_is_refused() {
        let mut m = mlp();
        m.size = 1000;
        assert_eq!(fits(&m, None, None), Ok(()), "an empty fleet admits: the task waits for capacity");
        assert_eq!(fits(&m, None, Some(1000)), Ok(()));
        assert_eq!(fits(&m, None, Some(999)).unwrap_err().code, RejectCode::ModelTooLarge);
        // A measured footprint replaces the file size.
        assert_eq!(fits(&m, Some(5000), Some(4000)).unwrap_err().code, RejectCode::ModelTooLarge);
        assert_eq!(fits(&m, Some(500), Some(999)), Ok(()));
    }

    #[test]
    fn a_priority_above_the_tenants_entitlement_is_refused() {
        let normal = TenantLimits::default();
        let high = TenantLimits { max_priority: Priority::High, ..TenantLimits::default() };
        let refused = entitled("a", Priority::High, &normal).unwrap_err();
        assert_eq!(refused.code, RejectCode::PriorityNotPermitted);
        assert!(refused.reason.contains("normal") && refused.reason.contains("high"), "{}", refused.reason);
        assert_eq!(entitled("a", Priority::Normal, &normal), Ok(()));
        assert_eq!(entitled("a", Priority::Low, &normal), Ok(()));
        assert_eq!(entitled("a", Priority::High, &high), Ok(()));
        let low_only = TenantLimits { max_priority: Priority::Low, ..TenantLimits::default() };
        assert_eq!(entitled("a", Priority::Normal, &low_only).unwrap_err().code, RejectCode::PriorityNotPermitted);
    }

    #[test]
    fn request_ids_give_stable_task_ids_per_tenant() {
        assert_eq!(task_id("a", Some("r1")), task_id("a", Some("r1")));
        assert_ne!(task_id("a", Some("r1")), task_id("b", Some("r1")));
        assert_ne!(task_id("a", None), task_id("a", None));
        assert!(subj::is_token(&task_id("a", None)));
    }
}
