//! Worker (the miner): announces its slices in Redis and keeps a heartbeat, pulls its
//! assignments from its own WORK consumer, runs them with ONNX Runtime on dedicated
//! threads, and publishes one outcome per assignment before acking it.

mod batch;
mod cache;
mod executor;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message};
use sundara_common::capacity::{SliceAnnounce, WorkerAnnounce};
use sundara_common::{Capacity, Endpoints, Error as CommonError, Registry, Shutdown, nats};
use sundara_schemas::{
    Assignment, DType, MAX_MESSAGE_BYTES, Outcome, OutcomeResult, Tensor, WIRE_VERSION, WorkTiming, decode, encode,
    now_ms, now_us, subjects as subj,
};

pub use cache::ModelCache;
pub use executor::Executor;

/// How the worker treats its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Honest,
    /// Runs the model, then returns plausible but wrong outputs (for demos and tests of
    /// the verifier): float rows rotated by one (so top-1 moves) and scaled, integers shifted, bools flipped.
    Dishonest,
}

/// Assignments a worker accepts per inference thread by default: enough that a thread
/// always has the next one queued while outcomes and new work are in transit, and that
/// queued tasks can be batched.
pub const SLOTS_PER_THREAD: u32 = 16;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    /// Subject-safe id, unique in the fleet.
    pub worker_id: String,
    /// Who runs this worker; the scheduler never gives two copies of a task to one operator.
    pub operator: String,
    /// Inference threads (each runs one inference at a time with `intra_threads` ORT threads).
    pub threads: usize,
    /// Assignments the worker accepts at once (the slots of its CPU slice in Redis);
    /// [`SLOTS_PER_THREAD`] × `threads` by default.
    pub slots: u32,
    /// Most tasks run as one inference (dynamic batching; 1 turns it off).
    pub max_batch: usize,
    /// ORT intra-op threads per session.
    pub intra_threads: usize,
    /// Models offered; empty offers every model registered at start.
    pub models: Vec<String>,
    pub cache_dir: PathBuf,
    pub ort_library: PathBuf,
    pub behaviour: Behaviour,
    pub heartbeat_interval: Duration,
    /// A worker whose heartbeat is older than this is declared dead.
    pub heartbeat_ttl: Duration,
    pub retention: nats::Retention,
}

impl Config {
    pub fn new(endpoints: Endpoints, worker_id: &str, ort_library: PathBuf, cache_dir: PathBuf) -> Config {
        Config {
            endpoints,
            worker_id: worker_id.to_string(),
            operator: worker_id.to_string(),
            threads: 1,
            slots: SLOTS_PER_THREAD,
            max_batch: 32,
            intra_threads: 1,
            models: Vec::new(),
            cache_dir,
            ort_library,
            behaviour: Behaviour::Honest,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_ttl: Duration::from_millis(2000),
            retention: nats::Retention::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Common(#[from] CommonError),
    #[error(transparent)]
    Runtime(#[from] sundara_runtime::RuntimeError),
    #[error("worker id {0:?} must be 1-64 of [A-Za-z0-9_-]")]
    InvalidId(String),
}

/// Tampers outputs the way [`Behaviour::Dishonest`] says.
pub fn falsify(outputs: &mut [Tensor]) {
    for t in outputs {
        let row = t.shape.last().copied().unwrap_or(1).max(1) as usize;
        match t.dtype {
            DType::F32 => {
                let mut v = t.values::<f32>().unwrap_or_default();
                v.chunks_mut(row).for_each(|r| r.rotate_left(1));
                v.iter_mut().for_each(|x| *x = *x * 1.05 + 0.01);
                *t = Tensor::from_values(&t.name, t.shape.clone(), &v);
            }
            DType::F64 => {
                let mut v = t.values::<f64>().unwrap_or_default();
                v.chunks_mut(row).for_each(|r| r.rotate_left(1));
                v.iter_mut().for_each(|x| *x = *x * 1.05 + 0.01);
                *t = Tensor::from_values(&t.name, t.shape.clone(), &v);
            }
            DType::Bool => t.data.iter_mut().for_each(|b| *b ^= 1),
            // Integers: bump the lowest byte of each element.
            _ => {
                let size = t.dtype.size();
                t.data.chunks_mut(size).for_each(|e| e[0] = e[0].wrapping_add(1));
            }
        }
    }
}

struct Worker {
    config: Config,
    js: jetstream::Context,
    registry: Registry,
    cache: ModelCache,
    executor: Executor,
}

impl Worker {
    /// Runs an assignment; returns the result, the compute time and when inference started.
    async fn execute(&self, a: &Assignment) -> (OutcomeResult, u64, u64) {
        let m = &a.ticket.model;
        let meta = match self.registry.version(&m.name, &m.version).await {
            Ok(Some(meta)) => meta,
            Ok(None) => return (OutcomeResult::Failed { reason: format!("model {m} is not in the registry") }, 0, 0),
            Err(e) => return (OutcomeResult::Failed { reason: e.to_string() }, 0, 0),
        };
        let path = match self.cache.path(&meta).await {
            Ok(p) => p,
            Err(e) => return (OutcomeResult::Failed { reason: e.to_string() }, 0, 0),
        };
        let budget = Duration::from_millis(a.ticket.deadline_at_ms.saturating_sub(now_ms()).max(1));
        let run = self.executor.run(m.to_string(), path, a.inputs.clone());
        match tokio::time::timeout(budget, run).await {
            Ok(Ok(mut ran)) => {
                if self.config.behaviour == Behaviour::Dishonest {
                    falsify(&mut ran.outputs);
                }
                (OutcomeResult::Ok { outputs: ran.outputs }, ran.compute_us, ran.started_us)
            }
            Ok(Err(reason)) => (OutcomeResult::Failed { reason }, 0, 0),
            Err(_) => (OutcomeResult::Failed { reason: "deadline passed during inference".into() }, 0, 0),
        }
    }

    async fn on_assignment(&self, msg: Message) {
        let received_us = now_us();
        let assignment = match decode::<Assignment>(&msg.payload, MAX_MESSAGE_BYTES) {
            Ok(a) if a.ticket.worker == self.config.worker_id => a,
            Ok(a) => {
                tracing::warn!(worker = %a.ticket.worker, "assignment for another worker; dropping");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable assignment; dropping");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let (result, compute_us, started_us) = self.execute(&assignment).await;
        let timing = WorkTiming {
            accepted_us: assignment.accepted_at_us,
            received_us,
            started_us,
            finished_us: if started_us > 0 { started_us + compute_us } else { 0 },
        };
        if let OutcomeResult::Failed { reason } = &result {
            tracing::warn!(task = %assignment.ticket.task_id, %reason, "assignment failed");
        }
        let ticket = assignment.ticket;
        let aid = ticket.assignment_id();
        let subject = subj::outcome(&ticket.task_id, &ticket.worker);
        let outcome = Outcome { v: WIRE_VERSION, ticket, result, compute_us, timing };
        match nats::publish_durable(&self.js, subject, &aid, encode(&outcome)).await {
            Ok(_) => {
                let _ = msg.ack().await;
            }
            Err(e) => {
                // Not acked: JetStream redelivers it and the outcome is published again
                // (deduplicated by assignment id).
                tracing::warn!(assignment = %aid, error = %e, "outcome not stored; will retry");
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(200)))).await;
            }
        }
    }
}

/// Runs a worker until `shutdown`; in-flight assignments finish before it returns.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), WorkerError> {
    if !subj::is_token(&config.worker_id) {
        return Err(WorkerError::InvalidId(config.worker_id.clone()));
    }
    sundara_runtime::init(&config.ort_library)?;
    let client = nats::connect(&config.endpoints.nats_url, &format!("sundara-worker-{}", config.worker_id)).await?;
    let js = jetstream::new(client.clone());
    nats::provision(&js, &config.retention).await?;
    let registry = Registry::open(&js).await?;
    let capacity = Capacity::connect(&config.endpoints.redis_url).await?;

    let models = if config.models.is_empty() {
        registry.list().await?.into_iter().map(|m| m.name).collect()
    } else {
        config.models.clone()
    };
    let announce = WorkerAnnounce {
        worker: config.worker_id.clone(),
        operator: config.operator.clone(),
        slices: vec![SliceAnnounce {
            id: format!("{}-cpu0", config.worker_id),
            device: "cpu".into(),
            slots: config.slots,
            models: models.clone(),
        }],
    };
    let ttl_ms = config.heartbeat_ttl.as_millis() as u64;
    capacity.announce(&announce, true, ttl_ms).await?;
    tracing::info!(worker = %config.worker_id, ?models, slots = config.slots, behaviour = ?config.behaviour, "worker announced");

    let slots = config.slots.max(1) as usize;
    let consumer = nats::durable_consumer(
        &js,
        subj::WORK_STREAM,
        &format!("worker-{}", config.worker_id),
        &subj::work_of(&config.worker_id),
        Duration::from_secs(30),
        (slots * 4) as i64,
    )
    .await?;
    let worker = Worker {
        executor: Executor::start(
            &config.worker_id,
            config.threads.max(1),
            config.intra_threads,
            config.max_batch,
            slots,
        ),
        cache: ModelCache::new(config.cache_dir.clone(), registry.clone()),
        config: config.clone(),
        js,
        registry,
    };

    let heartbeat = async {
        let mut tick = tokio::time::interval(config.heartbeat_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = capacity.announce(&announce, false, ttl_ms).await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    };
    let work = nats::consume(&consumer, &shutdown, slots * 2, |msg| worker.on_assignment(msg));
    let (_, worked) = tokio::join!(heartbeat, work);
    worked?;
    let _ = client.flush().await;
    tracing::info!(worker = %config.worker_id, "worker stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falsified_outputs_differ_but_keep_shape() {
        let honest = vec![
            Tensor::from_values("p", vec![2, 3], &[0.1f32, 0.7, 0.2, 0.5, 0.3, 0.2]),
            Tensor::from_values("best", vec![2], &[1i64, 0]),
        ];
        let mut lied = honest.clone();
        falsify(&mut lied);
        assert_eq!(lied[0].shape, honest[0].shape);
        assert_ne!(lied[0], honest[0]);
        assert_eq!(lied[1].values::<i64>().unwrap(), vec![2, 1]);
        // Top-1 moves too, so even an argmax rule catches it.
        let row = lied[0].values::<f32>().unwrap();
        assert!(row[0] > row[1] && row[0] > row[2]);
    }
}
