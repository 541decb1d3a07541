//! The whole pipeline as `bench pipeline` and `overload` run it: a private NATS + Redis,
//! one model pushed, and the fleet (each service its own `sundara` process).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sundara::stack::LocalStack;
use sundara_common::{Endpoints, Registry, nats};
use sundara_schemas::{Batching, CompareRule, ModelMeta, Policy};

use crate::fleet::{Fleet, WorkerSpec};

/// What [`Pipeline::start`] sets up.
pub struct PipelineSpec<'a> {
    /// The ONNX file to push, and the name it is pushed under (version `1`).
    pub model_path: &'a Path,
    pub model: &'a str,
    /// Redundancy: miners per task, and how their outputs are compared.
    pub k: u8,
    pub rule: CompareRule,
    /// How workers batch the model's tasks.
    pub batching: Batching,
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
        let policy = Policy { redundancy: spec.k, rule: spec.rule, audit_rate: 0.0 };
        let meta = sundara::models::push(&registry, spec.model_path, spec.model, "1", policy, spec.batching).await?;
        let scratch = tempfile::Builder::new().prefix(spec.scratch_prefix).tempdir()?;
        let specs: Vec<WorkerSpec> =
            (1..=spec.workers).map(|i| WorkerSpec { id: format!("miner-{i}"), threads: spec.threads }).collect();
        let mut fleet = Fleet::start(&endpoints, &specs, &scratch.path().join("cache"), scratch.path())?;
        fleet.ready(&client, Duration::from_secs(30)).await?;
        Ok(Pipeline { fleet, client, endpoints, meta, _scratch: scratch, stack })
    }

    /// Starts `sundara gateway` (its own process, named `gateway` in the fleet) on a free
    /// loopback port, with one API key for tenant [`GATEWAY_TENANT`] and the text-embedding
    /// models `embedding_models` (name, tokenizer file); returns once it is ready.
    pub async fn start_gateway(&mut self, embedding_models: &[(String, PathBuf)]) -> anyhow::Result<Gateway> {
        let keys = self._scratch.path().join("api-keys");
        std::fs::write(&keys, format!("{GATEWAY_TENANT} {GATEWAY_KEY}\n"))?;
        let addr = SocketAddr::new(sundara::stack::LOOPBACK, sundara::stack::free_port()?);
        let mut args: Vec<String> =
            ["gateway", "--api-keys", &keys.to_string_lossy(), "--listen", &addr.to_string()].map(String::from).into();
        for (name, tokenizer) in embedding_models {
            args.push("--embedding-model".into());
            args.push(format!("{name}={}", tokenizer.display()));
        }
        let pid = self.fleet.add("gateway", args)?;
        let probe = crate::http::HttpClient::new(addr, 1, Duration::from_secs(2));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match probe.request(0, "GET /v2/health/ready HTTP/1.1\r\n", b"").await {
                Ok(a) if a.status == 200 => return Ok(Gateway { addr, pid }),
                _ if std::time::Instant::now() > deadline => {
                    anyhow::bail!("the gateway on {addr} not ready within 30 s")
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Pipeline {
    /// Loads the pushed model on every worker ahead of its tasks, as the autoscaler does (a
    /// `Preload` on the worker's control subject), one worker at a time. A model whose
    /// warm-up takes seconds would otherwise hold its first tasks past their deadline, and
    /// the scheduler quarantines a miner that misses three.
    pub async fn preload(&self) -> anyhow::Result<()> {
        use sundara_schemas::{Control, ControlReply, ControlRequest, WIRE_VERSION, decode, encode, subjects};
        for worker in self.fleet.workers() {
            let command = Control::Preload { model: self.meta.model_ref(), slice: format!("{worker}-cpu0") };
            let request = ControlRequest { v: WIRE_VERSION, command };
            let asked = self.client.request(subjects::control(worker), encode(&request).into());
            let reply = tokio::time::timeout(Duration::from_secs(90), asked)
                .await
                .map_err(|_| anyhow::anyhow!("{worker}: no preload reply within 90 s"))?
                .map_err(|e| anyhow::anyhow!("{worker}: preload request: {e} ({:?})", e.kind()))?;
            let reply: ControlReply = decode(&reply.payload, 64 << 10)?;
            if !reply.ok {
                anyhow::bail!("{worker} refused the preload: {}", reply.reason);
            }
        }
        Ok(())
    }
}

/// The tenant the benchmark's API key names, and the key.
pub const GATEWAY_TENANT: &str = "bench-http";
pub const GATEWAY_KEY: &str = "sk-bench-0123456789abcdef";

/// A running gateway: where it listens, and its process.
#[derive(Clone, Copy, Debug)]
pub struct Gateway {
    pub addr: SocketAddr,
    pub pid: u32,
}
