//! The whole pipeline as `bench pipeline` and `overload` run it: a private NATS + Redis,
//! one model pushed, and the fleet (each service its own `sundara` process).

use std::path::Path;
use std::time::Duration;

use sundara::stack::LocalStack;
use sundara_common::{Endpoints, Registry, nats};
use sundara_schemas::{CompareRule, ModelMeta, Policy};

use crate::fleet::{Fleet, WorkerSpec};

/// What [`Pipeline::start`] sets up.
pub struct PipelineSpec<'a> {
    /// The ONNX file to push, and the name it is pushed under (version `1`).
    pub model_path: &'a Path,
    pub model: &'a str,
    /// Redundancy: miners per task.
    pub k: u8,
    pub workers: usize,
    /// Inference threads per worker.
    pub threads: usize,
    pub retention: nats::Retention,
    /// The benchmark's NATS client name, and the prefix of its scratch directory.
    pub client_name: &'a str,
    pub scratch_prefix: &'a str,
}

/// A running stack with its fleet ready. Fields drop in order: the fleet's scratch
/// directory goes before the servers, as when these were a function's locals.
pub struct Pipeline {
    pub fleet: Fleet,
    pub client: async_nats::Client,
    pub endpoints: Endpoints,
    /// The pushed model's record (its inputs make the tasks).
    pub meta: ModelMeta,
    _scratch: tempfile::TempDir,
    pub stack: LocalStack,
}

impl Pipeline {
    /// Starts the stack, provisions its streams, pushes the model and starts the fleet.
    pub async fn start(root: &Path, spec: PipelineSpec<'_>) -> anyhow::Result<Pipeline> {
        let stack = LocalStack::start(root)?;
        let endpoints = stack.endpoints();
        let client = nats::connect(&endpoints.nats, spec.client_name).await?;
        let js = async_nats::jetstream::new(client.clone());
        nats::provision(&js, &spec.retention).await?;
        let registry = Registry::open(&js).await?;
        // No audits: the pipeline numbers measure the miners' path (audits cost the verifier a reference run each).
        let policy =
            Policy { redundancy: spec.k, rule: CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 }, audit_rate: 0.0 };
        let meta =
            sundara::models::push(&registry, spec.model_path, spec.model, "1", policy, Default::default()).await?;
        let scratch = tempfile::Builder::new().prefix(spec.scratch_prefix).tempdir()?;
        let specs: Vec<WorkerSpec> =
            (1..=spec.workers).map(|i| WorkerSpec { id: format!("miner-{i}"), threads: spec.threads }).collect();
        let mut fleet = Fleet::start(&endpoints, &specs, &scratch.path().join("cache"), scratch.path())?;
        fleet.ready(&client, Duration::from_secs(30)).await?;
        Ok(Pipeline { fleet, client, endpoints, meta, _scratch: scratch, stack })
    }
}
