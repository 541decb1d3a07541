//! All six services in one process, over given NATS and Redis. `sundara up` runs this;
//! the integration tests do too (with extra workers as child processes where they need to
//! SIGKILL one).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use sundara_common::{Capacity, Endpoints, Shutdown};
use sundara_worker::{Behaviour, SliceConfig};
use tokio::task::JoinHandle;

/// One worker of the fleet.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub id: String,
    /// Its slices; [`WorkerSpec::cpu`] gives the usual one CPU slice.
    pub slices: Vec<SliceConfig>,
    /// Honest, or in a build with the `cheaters` feature (every test build) a cheater.
    pub behaviour: Behaviour,
}

impl WorkerSpec {
    /// A worker with one CPU slice of `threads` threads
    /// ([`sundara_worker::SLOTS_PER_THREAD`] slots per thread).
    pub fn cpu(id: &str, threads: usize, behaviour: Behaviour) -> WorkerSpec {
        let memory = sundara_worker::default_cpu_memory(1);
        WorkerSpec { id: id.into(), slices: vec![SliceConfig::cpu("cpu0", threads, memory)], behaviour }
    }
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub endpoints: Endpoints,
    pub secret: Vec<u8>,
    pub ort_library: PathBuf,
    pub cache_dir: PathBuf,
    pub workers: Vec<WorkerSpec>,
    pub assignment_timeout: Duration,
    pub epoch_length: Duration,
    /// The autoscaler's worker pool, if any (by default it watches health only).
    pub scaling: Option<sundara_autoscaler::ScalingConfig>,
    /// Ingress' per-tenant limits and the fleet's bound on tasks in flight.
    pub tenants: sundara_common::admission::TenantPolicy,
    pub max_in_flight: u64,
    /// How long the streams keep what (every service provisions them with it; ingress
    /// gives each task its TTL by it).
    pub retention: sundara_common::nats::Retention,
    /// With NATS auth on: the `sundara auth init` directory. Each service connects as its
    /// own user (`service-<name>.nk`), each worker as its miner (`miner-<id>.nk`);
    /// `endpoints`' credentials (the validator's) only check readiness.
    pub credentials_dir: Option<PathBuf>,
    /// The HTTP gateway, if it runs (its endpoints are replaced by the gateway service's).
    pub gateway: Option<sundara_gateway::Config>,
    /// The jobs service, if it runs in the pipeline (its endpoints are replaced by the
    /// jobs service's); a test that kills and restarts it runs it as a process instead.
    pub jobs: Option<sundara_jobs::Config>,
}

impl PipelineConfig {
    /// The endpoints `role` connects with: its own seed from [`PipelineConfig::credentials_dir`]
    /// when auth is on.
    pub fn endpoints_of(&self, role: &crate::auth::Role) -> Endpoints {
        let mut endpoints = self.endpoints.clone();
        if let Some(dir) = &self.credentials_dir {
            endpoints.nats.credentials = Some(dir.join(role.file_name()));
        }
        endpoints
    }
}

/// Whether ingress answers and every one of `workers` has announced itself in Redis.
pub async fn serving(
    nats: &async_nats::Client,
    capacity: &Capacity,
    workers: &[&str],
) -> Result<bool, sundara_common::Error> {
    let ingress_up = nats.request("$SRV.PING.sundara-ingress", "".into()).await.is_ok();
    let announced = capacity.workers().await?;
    Ok(ingress_up && workers.iter().all(|w| announced.iter().any(|a| a == w)))
}

/// Why [`Pipeline::ready`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
    #[error("{0} stopped during start-up")]
    Stopped(String),
    #[error("pipeline not ready within {0:?}")]
    TimedOut(Duration),
}

/// A service's error, kept whole (with its sources) until it is reported.
type ServiceError = Box<dyn std::error::Error + Send + Sync>;
type Handle = JoinHandle<Result<(), ServiceError>>;

/// Running services; [`Pipeline::stop`] shuts them down in order.
pub struct Pipeline {
    config: PipelineConfig,
    shutdown: Shutdown,
    services: Vec<(&'static str, Handle)>,
    workers: HashMap<String, (Shutdown, Handle)>,
}

fn spawn<E: std::error::Error + Send + Sync + 'static>(
    fut: impl Future<Output = Result<(), E>> + Send + 'static,
) -> Handle {
    tokio::spawn(async move { fut.await.map_err(ServiceError::from) })
}

impl Pipeline {
    /// Starts ingress, scheduler, verifier, rewarder, autoscaler, the gateway and the jobs
    /// service when configured, and the configured workers.
    pub async fn start(config: PipelineConfig) -> Pipeline {
        let shutdown = Shutdown::new();
        let as_service = |s: crate::auth::Service| config.endpoints_of(&crate::auth::Role::Service(s));
        // One secret for the whole validator side in this process: it is the stack's (an
        // earlier `up --external` on the same NATS may have stored another's key id).
        // Each service's config as its command builds it from its flags, then the knobs
        // that are not flags (sub-second timings for the tests, policies given as values).
        let secret = sundara_common::validator_key::SecretArgs {
            rotate_secret: true,
            ..sundara_common::validator_key::SecretArgs::given(config.secret.clone())
        };
        let mut scheduler = sundara_scheduler::Config::from_args(
            sundara_scheduler::Args { secret: secret.clone(), ..sundara_scheduler::Args::new("") },
            as_service(crate::auth::Service::Scheduler),
        )
        .expect("the secret is given, no file to read");
        scheduler.assignment_timeout = config.assignment_timeout;
        scheduler.retention = config.retention.clone();
        let mut rewarder = sundara_rewarder::Config::from_args(
            sundara_rewarder::Args::default(),
            as_service(crate::auth::Service::Rewarder),
        );
        rewarder.epoch_length = config.epoch_length;
        rewarder.retention = config.retention.clone();
        let reference = || {
            Ok::<_, sundara_common::validator_key::SecretError>((
                config.ort_library.clone(),
                config.cache_dir.join("reference"),
            ))
        };
        let verifier = sundara_verifier::Args { secret, ..sundara_verifier::Args::new("") };
        let mut verifier =
            sundara_verifier::Config::from_args(verifier, as_service(crate::auth::Service::Verifier), reference)
                .expect("the secret is given, no file to read");
        verifier.retention = config.retention.clone();
        let ingress = sundara_ingress::Args { max_in_flight: config.max_in_flight, ..Default::default() };
        let mut ingress = sundara_ingress::Config::from_args(ingress, as_service(crate::auth::Service::Ingress))
            .expect("no --tenant-limits file to read");
        ingress.tenants = config.tenants.clone();
        ingress.retention = config.retention.clone();
        let mut autoscaler = sundara_autoscaler::Config::new(as_service(crate::auth::Service::Autoscaler));
        autoscaler.scaling = config.scaling.clone();
        autoscaler.retention = config.retention.clone();
        let s = || shutdown.child_token();
        let mut services = vec![
            ("ingress", spawn(sundara_ingress::run(ingress, s()))),
            ("scheduler", spawn(sundara_scheduler::run(scheduler, s()))),
            ("verifier", spawn(sundara_verifier::run(verifier, s()))),
            ("rewarder", spawn(sundara_rewarder::run(rewarder, s()))),
            ("autoscaler", spawn(sundara_autoscaler::run(autoscaler, s()))),
        ];
        if let Some(gateway) = &config.gateway {
            let gateway =
                sundara_gateway::Config { endpoints: as_service(crate::auth::Service::Gateway), ..gateway.clone() };
            services.push(("gateway", spawn(sundara_gateway::run(gateway, s()))));
        }
        if let Some(jobs) = &config.jobs {
            let jobs = sundara_jobs::Config { endpoints: as_service(crate::auth::Service::Jobs), ..jobs.clone() };
            services.push(("jobs", spawn(sundara_jobs::run(jobs, s()))));
        }
        let mut pipeline = Pipeline { config: config.clone(), shutdown, services, workers: HashMap::new() };
        for w in &config.workers {
            pipeline.add_worker(w.clone());
        }
        pipeline
    }

    /// Config of a worker of this pipeline (tests reuse it for out-of-process workers).
    pub fn worker_config(&self, spec: &WorkerSpec) -> sundara_worker::Config {
        let args = sundara_worker::Args {
            cache_dir: Some(self.config.cache_dir.clone()),
            behaviour: spec.behaviour,
            ..sundara_worker::Args::new(&spec.id)
        };
        let nats = self.config.endpoints_of(&crate::auth::Role::Miner(spec.id.clone())).nats;
        let unused = || Err(String::from("no default cache: --cache-dir is given"));
        let mut c = sundara_worker::Config::from_args(args, nats, self.config.ort_library.clone(), unused)
            .expect("a worker of one CPU slice, honest or a cheater of this build");
        c.slices = spec.slices.clone();
        c
    }

    pub fn add_worker(&mut self, spec: WorkerSpec) {
        let token = self.shutdown.child_token();
        let handle = spawn(sundara_worker::run(self.worker_config(&spec), token.clone()));
        self.workers.insert(spec.id, (token, handle));
    }

    /// Waits until the ingress answers and every configured worker has announced itself.
    /// Polls (bounded by `within`): readiness of other tasks has no event to wait on.
    pub async fn ready(&self, within: Duration) -> Result<(), NotReady> {
        let deadline = tokio::time::Instant::now() + within;
        let nats = sundara_common::nats::connect(&self.config.endpoints.nats, "sundara-ready").await?;
        let capacity = Capacity::open(&self.config.endpoints).await?;
        loop {
            if let Some(failed) = self.failed() {
                return Err(NotReady::Stopped(failed));
            }
            let workers: Vec<&str> = self.config.workers.iter().map(|w| w.id.as_str()).collect();
            if serving(&nats, &capacity, &workers).await? {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(NotReady::TimedOut(within));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Name of a service or worker that has stopped on its own (an error), if any.
    pub fn failed(&self) -> Option<String> {
        let services = self.services.iter().map(|(n, h)| (n.to_string(), h));
        let workers = self.workers.iter().map(|(id, (_, h))| (format!("worker {id}"), h));
        services.chain(workers).find(|(_, h)| h.is_finished()).map(|(n, _)| n)
    }

    /// Stops everything: workers first (they finish what they hold), then the services.
    pub async fn stop(self) -> Vec<String> {
        let mut errors = Vec::new();
        for (id, (token, handle)) in self.workers {
            token.cancel();
            if let Ok(Err(e)) | Err(e) = handle.await.map_err(ServiceError::from) {
                errors.push(format!("worker {id}: {e}"));
            }
        }
        self.shutdown.cancel();
        for (name, handle) in self.services {
            match tokio::time::timeout(Duration::from_secs(10), handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => errors.push(format!("{name}: {e}")),
                Ok(Err(e)) => errors.push(format!("{name}: {e}")),
                Err(_) => errors.push(format!("{name}: did not stop within 10 s")),
            }
        }
        errors
    }
}
