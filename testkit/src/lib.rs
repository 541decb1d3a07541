//! The integration tests' harness: a real nats-server and redis-server on free ports
//! (temp dirs), the demo models registered, and the pipeline running in-process
//! ([`Harness`]) or as processes a test can kill ([`processes::ProcessStack`]); miners
//! that attack ([`attack`]); and waits with deadlines ([`wait`]). Everything stops on drop.

pub mod attack;
pub mod http;
pub mod netns;
pub mod processes;
pub mod up;
pub mod wait;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use rand::SeedableRng;
use sundara::client::Client;
use sundara::pipeline::{Pipeline, PipelineConfig, WorkerSpec};
use sundara::stack::{LocalStack, project_root};
use sundara_common::{Capacity, Registry, nats};
use sundara_schemas::{
    ClientResult, CompareRule, MAX_MESSAGE_BYTES, ModelMeta, Policy, ResultStatus, Standing, SubmitOutcome,
    SubmitRequest, Tensor, Verdict, decode, subjects as subj,
};
use sundara_worker::Behaviour;

/// The validator secret of the tests' stacks (at least 16 bytes, as every secret must be).
pub const SECRET: &[u8] = b"test-secret-0123456789";
pub const RULE: CompareRule = CompareRule::AllClose { atol: 1e-4, rtol: 1e-3 };
/// Audits in tests: none unless a test asks (so that tests count miners' work exactly).
pub const AUDIT_RATE: f64 = 0.0;

pub fn honest(id: &str, threads: usize) -> WorkerSpec {
    WorkerSpec::cpu(id, threads, Behaviour::Honest)
}
pub fn dishonest(id: &str, threads: usize) -> WorkerSpec {
    WorkerSpec::cpu(id, threads, Behaviour::Dishonest)
}

pub struct Harness {
    pub stack: LocalStack,
    pub pipeline: Option<Pipeline>,
    pub client: Client,
    pub js: jetstream::Context,
    pub capacity: Capacity,
    pub models: HashMap<String, ModelMeta>,
    pub ort_library: PathBuf,
    pub cache: tempfile::TempDir,
    children: Vec<Child>,
}

impl Harness {
    /// Starts servers, registers the demo models with redundancy `k` (no audits), starts the pipeline.
    pub async fn start(workers: Vec<WorkerSpec>, k: u8, assignment_timeout: Duration) -> Harness {
        let policy = Policy { redundancy: k, rule: RULE, audit_rate: AUDIT_RATE };
        Harness::start_with(workers, policy, assignment_timeout).await
    }

    /// As [`Harness::start`], with the models' verification policy given.
    pub async fn start_with(workers: Vec<WorkerSpec>, policy: Policy, assignment_timeout: Duration) -> Harness {
        let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
        Harness::start_on(stack, workers, policy, assignment_timeout, |_| {}).await
    }

    /// As [`Harness::start_with`], on a given stack (its endpoints' credentials are the
    /// services' and the harness client's), with the pipeline's config changed by `tweak`.
    pub async fn start_on(
        stack: LocalStack,
        workers: Vec<WorkerSpec>,
        policy: Policy,
        assignment_timeout: Duration,
        tweak: impl FnOnce(&mut PipelineConfig),
    ) -> Harness {
        let root = project_root();
        let ort_library = sundara_runtime::find_library(std::slice::from_ref(&root)).expect("run scripts/setup");
        sundara_runtime::init(&ort_library).unwrap();
        let endpoints = stack.endpoints();
        let cache = tempfile::tempdir().unwrap();
        let mut config = PipelineConfig {
            endpoints: endpoints.clone(),
            secret: SECRET.to_vec(),
            ort_library: ort_library.clone(),
            cache_dir: cache.path().to_path_buf(),
            workers,
            assignment_timeout,
            epoch_length: Duration::from_secs(3600),
            tenants: Default::default(),
            max_in_flight: 100_000,
            credentials_dir: None,
            gateway: None,
            jobs: Some(sundara_jobs::Config::from_args(Default::default(), endpoints.clone())),
            scaling: None,
            retention: Default::default(),
        };
        tweak(&mut config);
        let nats_client = nats::connect(&endpoints.nats, "test").await.unwrap();
        let js = jetstream::new(nats_client);
        nats::provision(&js, &config.retention).await.unwrap();
        let registry = Registry::open(&js).await.unwrap();
        let mut models = HashMap::new();
        for (file, name) in sundara::up::DEMO_MODELS {
            let path = root.join(".cache/models").join(file);
            let meta = sundara::models::push(&registry, &path, name, "1", policy, Default::default())
                .await
                .expect("demo models exist (run scripts/setup)");
            models.insert(name.to_string(), meta);
        }
        let pipeline = Pipeline::start(config).await;
        pipeline.ready(Duration::from_secs(30)).await.expect("pipeline starts");
        let client = Client::connect(&endpoints.nats, "test").await.unwrap();
        let capacity = Capacity::open(&endpoints).await.unwrap();
        Harness { stack, pipeline: Some(pipeline), client, js, capacity, models, ort_library, cache, children: vec![] }
    }

    /// Starts a worker as a child process of the `sundara` binary (so a test can SIGKILL it).
    pub async fn spawn_worker_process(&mut self, id: &str, threads: usize) -> usize {
        self.spawn_worker_process_with(id, threads, &[]).await
    }

    /// As [`Harness::spawn_worker_process`], with extra environment variables.
    pub async fn spawn_worker_process_with(&mut self, id: &str, threads: usize, env: &[(&str, &str)]) -> usize {
        let ep = self.stack.endpoints();
        let child = Command::new(sundara_binary())
            .args(["worker", "--id", id, "--threads", &threads.to_string()])
            .arg("--cache-dir")
            .arg(self.cache.path())
            .env("SUNDARA_NATS_URL", &ep.nats.url)
            .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
            .env("ORT_DYLIB_PATH", &self.ort_library)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("sundara binary runs");
        self.children.push(child);
        self.wait_for_worker(id).await;
        self.children.len() - 1
    }

    /// Keeps `child` (a worker process the test started itself) to be killed with the
    /// harness; its index.
    pub fn adopt(&mut self, child: Child) -> usize {
        self.children.push(child);
        self.children.len() - 1
    }

    /// Process id of a child worker.
    pub fn worker_pid(&self, index: usize) -> u32 {
        self.children[index].id()
    }

    /// Waits (bounded) until `id` has announced itself in Redis.
    pub async fn wait_for_worker(&self, id: &str) {
        wait::until_true(format_args!("worker {id} to announce itself"), Duration::from_secs(30), || async {
            self.capacity.workers().await.unwrap().iter().any(|w| w == id)
        })
        .await
    }

    pub fn request(&self, model: &str, inputs: Vec<Tensor>, request_id: &str) -> SubmitRequest {
        SubmitRequest {
            request_id: Some(request_id.into()),
            timeout_ms: Some(120_000),
            ..SubmitRequest::new(model, inputs)
        }
    }

    /// `n` one-row requests with sample inputs: request `i` is for `model_of(i)`, with id
    /// `<tag>-<i>`; inputs come from a generator seeded with `seed`.
    pub fn sample_requests(
        &self,
        n: usize,
        tag: &str,
        seed: u64,
        model_of: impl Fn(usize) -> &'static str,
    ) -> Vec<SubmitRequest> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let meta = &self.models[model_of(i)];
                let inputs = sundara::models::sample_inputs(&meta.inputs, 1, &mut rng);
                self.request(&meta.name, inputs, &format!("{tag}-{i}"))
            })
            .collect()
    }

    /// Asserts that every request's result is verified and agrees (under [`RULE`]) with
    /// running its model directly.
    pub fn assert_correct(&self, requests: &[SubmitRequest], results: &HashMap<String, ClientResult>) {
        for (i, req) in requests.iter().enumerate() {
            let task_id = sundara_ingress::task_id("test", req.request_id.as_deref());
            let ResultStatus::Verified { outputs, .. } = &results[&task_id].status else {
                panic!("task {i} ({}) not verified: {:?}", req.model, results[&task_id].status);
            };
            let want = reference(&self.models[&req.model], &req.inputs);
            assert!(sundara_verifier::compare::agree(&RULE, outputs, &want), "task {i} ({}): wrong result", req.model);
        }
    }

    /// Submits all requests (each must be accepted) and collects one result per task.
    pub async fn run_tasks(&mut self, requests: &[SubmitRequest]) -> HashMap<String, ClientResult> {
        let mut results = self.client.results().await.unwrap();
        let ids = self.submit_all(requests).await;
        await_results(&mut results, &ids).await
    }

    /// Submits all requests; each must be accepted. Returns the task ids in order.
    pub async fn submit_all(&self, requests: &[SubmitRequest]) -> Vec<String> {
        let mut ids = Vec::new();
        for r in requests {
            match self.client.submit(r).await.unwrap() {
                SubmitOutcome::Accepted { task_id, .. } => ids.push(task_id),
                SubmitOutcome::Rejected { code, reason } => panic!("rejected {code:?}: {reason}"),
            }
        }
        ids
    }

    /// Every message stored in a stream, decoded.
    pub async fn all_verdicts(&self) -> Vec<Verdict> {
        self.stream_messages(subj::VERDICTS_STREAM)
            .await
            .iter()
            .map(|p| decode(p, MAX_MESSAGE_BYTES).unwrap())
            .collect()
    }

    /// Runs the `sundara` binary as a client of this harness' NATS; its stdout, once it
    /// has exited 0 (a failure panics with its output).
    pub fn run_cli<S: AsRef<std::ffi::OsStr>>(&self, args: impl IntoIterator<Item = S>) -> String {
        let ep = self.stack.endpoints();
        let out = Command::new(sundara_binary())
            .args(args)
            .env("SUNDARA_NATS_URL", &ep.nats.url)
            .envs(ep.nats.tls.iter().flat_map(|t| t.env()))
            .output()
            .expect("the sundara binary runs");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
        printed
    }

    /// How `worker` stood in the verdicts of the tasks that `of` selects.
    pub async fn standings(&self, worker: &str, of: impl Fn(&str) -> bool) -> Vec<Standing> {
        let verdicts = self.all_verdicts().await;
        let chosen = verdicts.iter().filter(|v| of(&v.task_id));
        chosen.flat_map(|v| v.miners.iter().filter(|m| m.worker == worker).map(|m| m.standing)).collect()
    }

    /// SIGKILLs the worker process `index` (started as `worker`) once it holds `n`
    /// assignments, so that the kill always strands work. Redis offers no event for that:
    /// polled, bounded (120 s). The thread says whether it killed.
    pub fn kill_when_holding(&self, index: usize, worker: &str, n: u64) -> std::thread::JoinHandle<bool> {
        let (pid, redis_url) = (self.worker_pid(index), self.stack.endpoints().redis_url);
        let held = format!("sundara:inflight:w:{worker}");
        std::thread::spawn(move || {
            let mut redis = redis::Client::open(redis_url).unwrap().get_connection().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while std::time::Instant::now() < deadline {
                let holds: u64 = redis::cmd("SCARD").arg(&held).query(&mut redis).unwrap_or(0);
                if holds >= n {
                    return Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success();
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        })
    }

    pub async fn stream_messages(&self, stream: &str) -> Vec<Vec<u8>> {
        stream_messages(&self.js, stream).await
    }

    pub async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let errors = self.pipeline.take().unwrap().stop().await;
        assert!(errors.is_empty(), "services stopped with errors: {errors:?}");
    }
}

impl Drop for Harness {
    /// A test that fails before `stop` must not leave worker processes behind.
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Collects one result for each of `ids` from a results stream opened before they were
/// submitted (bounded: 120 s).
pub async fn await_results(
    results: &mut (impl futures::Stream<Item = Result<ClientResult, sundara::client::ClientError>> + Unpin),
    ids: &[String],
) -> HashMap<String, ClientResult> {
    let mut got: HashMap<String, ClientResult> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ids.iter().any(|id| !got.contains_key(id)) {
        let next = tokio::time::timeout_at(deadline, results.next()).await;
        let Ok(Some(Ok(result))) = next else { panic!("only {} of {} results arrived", got.len(), ids.len()) };
        assert!(got.insert(result.task_id.clone(), result).is_none(), "a result was delivered twice");
    }
    got
}

/// The `sundara` binary Cargo built for the running integration test: it sits beside the
/// test's `deps/` folder (Cargo builds a package's binaries before its integration tests).
pub fn sundara_binary() -> PathBuf {
    let test = std::env::current_exe().expect("the test's own path");
    let profile_dir = test.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join(format!("sundara{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "{} is missing: run the tests with cargo test", binary.display());
    binary
}

/// The model run directly with ONNX Runtime: what a verified result must agree with.
pub fn reference(meta: &ModelMeta, inputs: &[Tensor]) -> Vec<Tensor> {
    let (file, _) = sundara::up::DEMO_MODELS.iter().find(|(_, name)| *name == meta.name).expect("a demo model");
    let bytes = std::fs::read(project_root().join(".cache/models").join(file)).unwrap();
    sundara_runtime::Model::load(&bytes, 1).unwrap().run(inputs).unwrap()
}

/// Every message `stream` holds now, oldest first (their payloads).
pub async fn stream_messages(js: &jetstream::Context, stream: &str) -> Vec<Vec<u8>> {
    let mut stream = js.get_stream(stream).await.unwrap();
    let count = stream.info().await.unwrap().state.messages as usize;
    let consumer = stream.create_consumer(jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    while out.len() < count {
        let m = tokio::time::timeout(Duration::from_secs(10), messages.next()).await.unwrap().unwrap().unwrap();
        out.push(m.payload.to_vec());
    }
    out
}
