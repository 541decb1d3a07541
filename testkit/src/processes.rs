//! Fault-injection harness: nats-server (one server, or a JetStream cluster) and
//! redis-server, and every service and worker as its own `sundara` process, so that any
//! of them can be SIGKILLed and started again. A load generator submits continuously
//! and a follower records every result as RESULTS stores it; [`ProcessStack::settle`]
//! then checks the promise: every accepted task ended once, as a result (verified,
//! expired or failed) with its dead letter where it has one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use rand::SeedableRng;
use sundara::client::Client;
use sundara::stack::{LocalCluster, LocalStack, ServerProcess, project_root};
use sundara_common::{Capacity, Registry, nats};
use sundara_schemas::{
    ClientResult, DeadLetter, FailureCode, MAX_MESSAGE_BYTES, ModelMeta, Policy, RejectCode, ResultStatus,
    SubmitOutcome, SubmitRequest, decode, now_us, subjects as subj,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{AUDIT_RATE, RULE, SECRET, wait};

/// The validator's services, each a `sundara <name>` process.
pub const SERVICES: [&str; 5] = ["ingress", "scheduler", "verifier", "rewarder", "autoscaler"];

/// The tenant of every test submission.
pub const TENANT: &str = "test";

/// What a [`ProcessStack`] runs.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Redundancy of the model (k distinct miners per task).
    pub k: u8,
    /// Worker ids (one CPU thread each).
    pub workers: Vec<String>,
    /// `Some(n)`: an n-node JetStream cluster with every stream, bucket and the object
    /// store replicated n times; `None`: one nats-server.
    pub cluster: Option<usize>,
    /// The address the (single) nats-server listens on: loopback by default, or a link
    /// that miners in network namespaces reach ([`crate::netns`]).
    pub nats_listen: Option<std::net::IpAddr>,
}

impl StackOptions {
    pub fn new(k: u8, workers: &[&str]) -> StackOptions {
        StackOptions { k, workers: workers.iter().map(|w| w.to_string()).collect(), cluster: None, nats_listen: None }
    }
}

/// NATS as the stack runs it.
pub enum Servers {
    Single(LocalStack),
    Cluster { nats: LocalCluster, redis: ServerProcess },
}

/// One submission the ingress accepted.
#[derive(Clone, Debug)]
pub struct Accepted {
    pub request_id: String,
    pub task_id: String,
    /// When the client got `Accepted` (Unix µs).
    pub at_us: u64,
    /// Submissions made with this request id (more than one: retried after no answer).
    pub attempts: u32,
    /// The ingress recognised the request id (an earlier attempt had stored the task).
    pub duplicate: bool,
    pub request: SubmitRequest,
}

/// What the load generator saw.
#[derive(Default)]
pub struct LoadLog {
    pub accepted: Vec<Accepted>,
    /// Request ids never accepted within the retry budget.
    pub given_up: Vec<String>,
    /// Typed refusals (every one retried; a final one also lands in `given_up`).
    pub rejected: Vec<RejectCode>,
}

/// A running load generator.
pub struct Load {
    pub log: Arc<Mutex<LoadLog>>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    /// Signalled on every acceptance.
    pub accepted: Arc<Notify>,
}

impl Load {
    /// Stops submitting; waits for submissions under way (each bounded by its retry budget).
    pub async fn stop(self) -> Vec<Accepted> {
        self.stop.cancel();
        self.handle.await.expect("load generator");
        let log = self.log.lock().unwrap();
        log.accepted.clone()
    }

    pub fn accepted_count(&self) -> usize {
        self.log.lock().unwrap().accepted.len()
    }
}

/// One stored result as the follower saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub status: Terminal,
    /// When RESULTS stored it (Unix µs, the server's clock: this machine's).
    pub stored_us: u64,
    /// How many times the follower saw this task's result (more than one: stored twice).
    pub count: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terminal {
    Verified,
    Expired,
    NoConsensus,
}

/// Results as RESULTS stores them, by task id.
#[derive(Default)]
pub struct Results {
    pub by_task: Mutex<HashMap<String, Seen>>,
    pub changed: Notify,
}

impl Results {
    /// When the earliest verified result among `ids` was stored.
    pub fn first_verified(&self, ids: &HashSet<String>) -> Option<u64> {
        let seen = self.by_task.lock().unwrap();
        ids.iter().filter_map(|id| seen.get(id)).filter(|s| s.status == Terminal::Verified).map(|s| s.stored_us).min()
    }

    fn missing<'a>(&self, ids: impl Iterator<Item = &'a String>) -> Vec<String> {
        let seen = self.by_task.lock().unwrap();
        ids.filter(|id| !seen.contains_key(*id)).cloned().collect()
    }
}

/// One fault and its timeline (Unix µs).
#[derive(Clone, Debug)]
pub struct Fault {
    pub name: String,
    /// When the process (or server) was SIGKILLed.
    pub killed_us: u64,
    /// When its replacement was started (for a fault without one: when the fleet was left
    /// to recover on its own, i.e. the kill).
    pub restarted_us: u64,
}

/// What [`ProcessStack::settle`] found.
#[derive(Debug, Default)]
pub struct Settled {
    pub accepted: usize,
    pub verified: usize,
    pub expired: usize,
    pub no_consensus: usize,
    pub dead: usize,
    /// Accepted submissions that had to be retried (ingress gone, or its reply lost).
    pub retried: usize,
    /// Of those, accepted as duplicates: an earlier attempt had stored the task.
    pub duplicates: usize,
}

/// Recovery of one fault, from the results.
#[derive(Debug)]
pub struct Recovery {
    /// Kill → the first verified result of a task accepted after the restart.
    pub recovery_ms: u64,
    /// Restart → the last result of the tasks accepted before it and since the previous
    /// fault's restart: the work this fault caught, drained.
    pub drain_ms: u64,
}

/// Servers, services and workers as processes; the test's own NATS client.
pub struct ProcessStack {
    pub servers: Servers,
    pub nats_url: String,
    /// The servers' CA: every process gets it (`SUNDARA_NATS_CA`).
    pub nats_tls: Option<sundara_common::tls::NatsTls>,
    /// The address nats-server and redis-server listen on besides loopback (loopback
    /// itself when none): processes in network namespaces reach them there.
    pub listen: std::net::IpAddr,
    pub redis_url: String,
    pub js: jetstream::Context,
    pub client: Client,
    pub model: ModelMeta,
    pub ort_library: PathBuf,
    /// Logs (`<name>.log`) and the workers' model cache.
    pub dir: tempfile::TempDir,
    services: HashMap<&'static str, Child>,
    workers: BTreeMap<String, Child>,
    pub results: Arc<Results>,
    follower: tokio::task::JoinHandle<()>,
    started: std::time::Instant,
}

impl ProcessStack {
    /// Starts the servers, registers `mlp` with redundancy `k` (no audits), starts every
    /// service and worker, and waits until the ingress answers and every worker has
    /// announced itself.
    pub async fn start(options: StackOptions) -> ProcessStack {
        let root = project_root();
        let ort_library = sundara_runtime::find_library(std::slice::from_ref(&root)).expect("run scripts/setup");
        // `models::push` reads the model's inputs and outputs through ONNX Runtime.
        sundara_runtime::init(&ort_library).unwrap();
        let (servers, endpoint, redis_url, replicas) = match options.cluster {
            None => {
                let nats = sundara::stack::ServerOptions {
                    listen: options.nats_listen.unwrap_or(sundara::stack::LOOPBACK),
                    ..Default::default()
                };
                let stack = LocalStack::start_with(&root, None, &nats).expect("servers start (run scripts/setup)");
                let ep = stack.endpoints();
                (Servers::Single(stack), ep.nats, ep.redis_url, 1)
            }
            Some(n) => {
                let nats = LocalCluster::start(&root, n).expect("the NATS cluster starts");
                let redis_binary = sundara::stack::redis_server_binary().unwrap();
                let redis = sundara::stack::start_redis(&redis_binary, nats.dir.path()).unwrap();
                let redis_url = sundara::stack::redis_url(nats.dir.path(), redis.port).unwrap();
                let endpoint = nats.endpoint();
                (Servers::Cluster { nats, redis }, endpoint, redis_url, n)
            }
        };
        let connection = nats::connect(&endpoint, "faults").await.unwrap();
        let js = jetstream::new(connection.clone());
        // Before any service: their own provisioning then finds everything replicated.
        let retention = nats::Retention { replicas, ..Default::default() };
        provision_retrying(&js, &retention).await;
        let registry = Registry::open(&js).await.unwrap();
        let policy = Policy { redundancy: options.k, rule: RULE, audit_rate: AUDIT_RATE };
        let path = root.join(".cache/models/mlp.onnx");
        let model = sundara::models::push(&registry, &path, "mlp", "1", policy, Default::default())
            .await
            .expect("the demo models exist (run scripts/setup)");
        let dir = tempfile::Builder::new().prefix("sundara-faults-").tempdir().unwrap();
        let results = Arc::new(Results::default());
        let follower = tokio::spawn(follow_results(js.clone(), results.clone()));
        let mut stack = ProcessStack {
            servers,
            nats_url: endpoint.url.clone(),
            nats_tls: endpoint.tls.clone(),
            listen: options.nats_listen.unwrap_or(sundara::stack::LOOPBACK),
            redis_url,
            js,
            client: Client::new(connection, TENANT),
            model,
            ort_library,
            dir,
            services: HashMap::new(),
            workers: BTreeMap::new(),
            results,
            follower,
            started: std::time::Instant::now(),
        };
        for name in SERVICES {
            stack.start_service(name);
        }
        for id in &options.workers {
            stack.start_worker(id);
        }
        stack.ingress_answers(Duration::from_secs(30)).await;
        for id in &options.workers {
            stack.wait_for_worker(id).await;
        }
        stack
    }

    fn log(&self, name: &str) -> (File, PathBuf) {
        let path = self.dir.path().join(format!("{name}.log"));
        let file = File::options().create(true).append(true).open(&path).unwrap();
        (file, path)
    }

    /// The `sundara` command `args`, logging to `<name>.log`, run in `netns` if given.
    fn command_in(&self, netns: Option<&crate::netns::Netns>, name: &str, args: &[&str]) -> Command {
        let (log, _) = self.log(name);
        let mut c = match netns {
            Some(netns) => netns.command(super::sundara_binary()),
            None => Command::new(super::sundara_binary()),
        };
        c.args(args)
            .current_dir(project_root())
            .env("SUNDARA_NATS_URL", &self.nats_url)
            .envs(self.nats_tls.iter().flat_map(|t| t.env()))
            .env("SUNDARA_REDIS_URL", self.redis_url_from(netns))
            .env("SUNDARA_SECRET", std::str::from_utf8(SECRET).unwrap())
            .env("ORT_DYLIB_PATH", &self.ort_library)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("FAULTS_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(log);
        c
    }

    /// The Redis URL as a process in `netns` (if given) reaches it: at the stack's listen
    /// address rather than loopback.
    fn redis_url_from(&self, netns: Option<&crate::netns::Netns>) -> String {
        match netns {
            Some(_) => self.redis_url.replace("@127.0.0.1:", &format!("@{}:", self.listen)),
            None => self.redis_url.clone(),
        }
    }

    /// Starts service `name` (one of [`SERVICES`]); it must not be running.
    pub fn start_service(&mut self, name: &'static str) {
        self.start_service_in(None, name);
    }

    /// Starts service `name` in `netns`, a host of its own, if given: it reaches NATS and
    /// Redis at the stack's listen address (start the stack with `nats_listen` the link's).
    pub fn start_service_in(&mut self, netns: Option<&crate::netns::Netns>, name: &'static str) {
        let mut args = vec![name];
        if name == "rewarder" {
            args.extend(["--epoch-secs", "3600"]);
        }
        let child = self.command_in(netns, name, &args).spawn().expect("the sundara binary runs");
        assert!(self.services.insert(name, child).is_none(), "{name} was already running");
        self.step(&format!("{name} started"));
    }

    /// SIGKILLs service `name`; returns when it is gone (Unix µs).
    pub fn kill_service(&mut self, name: &'static str) -> u64 {
        let mut child = self.services.remove(name).unwrap_or_else(|| panic!("{name} is not running"));
        kill(&mut child);
        self.step(&format!("{name} killed"));
        now_us()
    }

    /// Starts worker `id` (one CPU thread).
    pub fn start_worker(&mut self, id: &str) {
        self.start_worker_in(None, id);
    }

    /// Starts worker `id` (one CPU thread) in `netns`, a host of its own, if given.
    pub fn start_worker_in(&mut self, netns: Option<&crate::netns::Netns>, id: &str) {
        let args = sundara_worker::Args {
            threads: 1,
            cache_dir: Some(self.dir.path().join(format!("models-{id}"))),
            ..sundara_worker::Args::new(id)
        };
        let line: Vec<String> = std::iter::once("worker".to_string()).chain(args.to_command_line()).collect();
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        let child = self.command_in(netns, &format!("worker-{id}"), &line).spawn().expect("the sundara binary runs");
        assert!(self.workers.insert(id.to_string(), child).is_none(), "worker {id} was already running");
    }

    /// SIGKILLs worker `id`; returns when it is gone (Unix µs).
    pub fn kill_worker(&mut self, id: &str) -> u64 {
        let mut child = self.workers.remove(id).unwrap_or_else(|| panic!("worker {id} is not running"));
        kill(&mut child);
        self.step(&format!("worker {id} killed"));
        now_us()
    }

    /// Sends SIGTERM to each of `processes` (service names, or `worker-<id>`) at once, as a
    /// supervisor stopping them would, and waits (bounded by `within`) for each to exit:
    /// how long each took and its exit status, or `None` for one still running at
    /// `within` (it is then SIGKILLed). They are no longer the stack's.
    pub async fn terminate(
        &mut self,
        processes: &[&str],
        within: Duration,
    ) -> Vec<(String, Option<(Duration, std::process::ExitStatus)>)> {
        let mut children: Vec<(String, Child)> = processes
            .iter()
            .map(|p| {
                let child = match p.strip_prefix("worker-") {
                    Some(id) => self.workers.remove(id),
                    None => self.services.keys().find(|n| *n == p).copied().and_then(|n| self.services.remove(n)),
                };
                (p.to_string(), child.unwrap_or_else(|| panic!("{p} is not running")))
            })
            .collect();
        let sent = std::time::Instant::now();
        for (name, child) in &children {
            let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
            assert!(status.success(), "SIGTERM to {name}");
        }
        self.step(&format!("SIGTERM sent to {processes:?}"));
        let deadline = tokio::time::Instant::now() + within;
        let mut exited = vec![None; children.len()];
        // A child's exit is no event a test can await without a reaper: poll briefly. No
        // `wait::until` here: a child still running at the deadline is a finding, not a failure.
        while exited.iter().any(Option::is_none) && tokio::time::Instant::now() < deadline {
            for ((_, child), slot) in children.iter_mut().zip(&mut exited) {
                if slot.is_none()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    *slot = Some((sent.elapsed(), status));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for ((name, child), slot) in children.iter_mut().zip(&exited) {
            match slot {
                Some((took, status)) => self.step(&format!("{name} exited after {took:?} ({status})")),
                None => {
                    kill(child);
                    self.step(&format!("{name} still running after {within:?}; killed"));
                }
            }
        }
        children.into_iter().map(|(name, _)| name).zip(exited).collect()
    }

    /// Asserts that every service and worker the test did not kill is still running: a
    /// fault elsewhere (a server lost, another process killed) must not stop any of them.
    pub fn assert_running(&mut self) {
        let mut exited = Vec::new();
        let services = self.services.iter_mut().map(|(n, c)| (n.to_string(), c));
        let workers = self.workers.iter_mut().map(|(id, c)| (format!("worker-{id}"), c));
        for (name, child) in services.chain(workers) {
            if let Ok(Some(status)) = child.try_wait() {
                exited.push(format!("{name} ({status})"));
            }
        }
        if !exited.is_empty() {
            panic!("processes exited during the test: {exited:?}");
        }
    }

    /// A new connection to Redis (one made before a Redis restart does not survive it).
    pub async fn capacity(&self) -> Capacity {
        Capacity::connect(&self.redis_url).await.unwrap()
    }

    /// Waits (bounded) until the ingress answers its service ping. Processes announce
    /// nothing across process boundaries; poll briefly.
    pub async fn ingress_answers(&self, within: Duration) {
        wait::until("the ingress to answer its service ping", within, || async {
            let ping = self.client.nats.request("$SRV.PING.sundara-ingress", "".into());
            match tokio::time::timeout(Duration::from_secs(1), ping).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.kind().to_string()),
                Err(_) => Err("no answer within 1 s".into()),
            }
        })
        .await
    }

    /// Waits (bounded) until the scheduler holds no task: every one delivered to its
    /// consumers acked. JetStream announces no such moment to a client; poll briefly.
    pub async fn scheduler_idle(&self, within: Duration) {
        let stream = self.js.get_stream(subj::TASKS_STREAM).await.unwrap();
        wait::until("the scheduler to hold no task", within, || async {
            let mut busy = 0;
            for priority in sundara_schemas::Priority::ALL {
                let info = stream.consumer_info(format!("scheduler-{}", priority.as_str())).await.unwrap();
                busy += info.num_pending + info.num_ack_pending as u64;
            }
            if busy == 0 { Ok(()) } else { Err(format!("{busy} tasks held")) }
        })
        .await;
        self.step("the scheduler holds no task");
    }

    /// Waits (bounded) until worker `id` is announced in Redis with a live heartbeat.
    pub async fn wait_for_worker(&self, id: &str) {
        let ids = [id.to_string()];
        // A new connection each time: the one before a Redis restart does not survive it.
        wait::until(format_args!("worker {id} to announce itself"), Duration::from_secs(30), || async {
            match self.capacity().await.health(&ids).await {
                Ok(h) if h[0].0 && h[0].1.as_deref() == Some("alive") => Ok(()),
                Ok(h) => Err(format!("{:?}", h[0])),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// Waits (bounded) until the autoscaler has declared worker `id` dead.
    pub async fn wait_declared_dead(&self, id: &str, within: Duration) {
        let capacity = self.capacity().await;
        let ids = [id.to_string()];
        wait::until(format_args!("the autoscaler to declare worker {id} dead"), within, || async {
            let health = capacity.health(&ids).await.unwrap().remove(0).1;
            if health.as_deref() == Some("dead") { Ok(()) } else { Err(health) }
        })
        .await
    }

    /// Waits (bounded) until one of `ids` holds at least `n` assignments in Redis, so that
    /// killing it strands work, and returns it. Redis has no event for that here; poll it
    /// briefly.
    pub async fn wait_holding(&self, ids: &[&str], n: u64, within: Duration) -> String {
        let client = redis::Client::open(self.redis_url.as_str()).unwrap();
        let redis = client.get_multiplexed_async_connection().await.unwrap();
        wait::until(format_args!("one of {ids:?} to hold {n} assignments"), within, || {
            let mut redis = redis.clone();
            async move {
                let mut held = Vec::new();
                for id in ids {
                    let key = format!("sundara:inflight:w:{id}");
                    let count: u64 = redis::cmd("SCARD").arg(&key).query_async(&mut redis).await.unwrap_or(0);
                    if count >= n {
                        return Ok(id.to_string());
                    }
                    held.push(count);
                }
                Err(held)
            }
        })
        .await
    }

    fn single(&mut self) -> &mut LocalStack {
        match &mut self.servers {
            Servers::Single(stack) => stack,
            Servers::Cluster { .. } => panic!("a single-server stack"),
        }
    }

    /// SIGKILLs nats-server (Unix µs when it is gone).
    pub fn kill_nats(&mut self) -> u64 {
        self.single().nats.kill();
        self.step("nats-server killed");
        now_us()
    }

    /// Starts nats-server again on its port and store.
    pub fn start_nats_again(&mut self) {
        self.single().start_nats_again().expect("nats-server starts again");
        self.step("nats-server started again");
    }

    /// SIGKILLs redis-server (Unix µs when it is gone).
    pub fn kill_redis(&mut self) -> u64 {
        self.single().redis.kill();
        self.step("redis-server killed");
        now_us()
    }

    /// Starts an empty redis-server on the killed one's port (it kept nothing on disk).
    pub fn start_redis_empty(&mut self) {
        self.single().start_redis_again().unwrap();
        self.step("redis-server started again, empty");
    }

    /// The name of the cluster node that leads `stream`.
    pub async fn stream_leader(&self, stream: &str) -> String {
        let mut stream = self.js.get_stream(stream).await.unwrap();
        let info = stream.info().await.unwrap();
        info.cluster.as_ref().and_then(|c| c.leader.clone()).expect("a clustered stream has a leader")
    }

    /// Moves the leadership of every replicated stream (KV buckets and the object store
    /// included) and of every replicated consumer to cluster node `node`, so that losing
    /// it costs every Raft group its leader at once. Waits (bounded) until they have
    /// moved, asking again each second: elections announce nothing to a client.
    pub async fn move_leaders_to(&self, node: &str) {
        let body = format!(r#"{{"placement":{{"preferred":"{node}"}}}}"#);
        let mut asked = tokio::time::Instant::now() - Duration::from_secs(1);
        wait::until(format_args!("every leader to move to {node}"), Duration::from_secs(30), || {
            let ask = asked.elapsed() >= Duration::from_secs(1);
            if ask {
                asked = tokio::time::Instant::now();
            }
            let body = body.clone();
            async move {
                let elsewhere = self.groups_led_elsewhere(node).await;
                if elsewhere.is_empty() {
                    return Ok(());
                }
                // Step-downs asked again each second: an election takes that long to settle.
                for api in elsewhere.iter().filter(|_| ask) {
                    let _ = self.client.nats.request(format!("$JS.API.{api}"), body.clone().into()).await;
                }
                Err(elsewhere)
            }
        })
        .await;
        self.step(&format!("every replicated stream and consumer led by {node}"));
    }

    /// Step-down API subjects (after `$JS.API.`) of the replicated streams and consumers
    /// whose leader is not `node`.
    async fn groups_led_elsewhere(&self, node: &str) -> Vec<String> {
        let mut elsewhere = Vec::new();
        let names: Vec<String> = self.js.stream_names().filter_map(|n| async { n.ok() }).collect().await;
        for name in names {
            let Ok(mut stream) = self.js.get_stream(&name).await else { continue };
            let Ok(info) = stream.info().await else { continue };
            let led =
                |c: &Option<jetstream::stream::ClusterInfo>| c.as_ref().and_then(|c| c.leader.as_deref()) == Some(node);
            if info.config.num_replicas > 1 && !led(&info.cluster) {
                elsewhere.push(format!("STREAM.LEADER.STEPDOWN.{name}"));
            }
            let consumers: Vec<String> = stream.consumer_names().filter_map(|n| async { n.ok() }).collect().await;
            for consumer in consumers {
                let Ok(info) = stream.consumer_info(&consumer).await else { continue };
                let replicated = info.cluster.as_ref().is_some_and(|c| !c.replicas.is_empty());
                if replicated && !led(&info.cluster) {
                    elsewhere.push(format!("CONSUMER.LEADER.STEPDOWN.{name}.{consumer}"));
                }
            }
        }
        elsewhere
    }

    /// The cluster node that the client named `client` (e.g. `sundara-scheduler`) is
    /// connected to, from each node's `/connz`.
    pub fn node_of(&self, client: &str) -> Option<String> {
        let Servers::Cluster { nats, .. } = &self.servers else { panic!("a cluster stack") };
        nats.nodes.iter().filter(|n| n.process.is_some()).find_map(|node| {
            let (_, body) = sundara::stack::http_get(node.monitor_port, "/connz?limit=4096").ok()?;
            let connz: serde_json::Value = serde_json::from_str(&body).ok()?;
            let connections = connz["connections"].as_array()?;
            connections.iter().any(|c| c["name"] == client).then(|| node.name.clone())
        })
    }

    /// Every cluster node's name.
    pub fn cluster_nodes(&self) -> Vec<String> {
        let Servers::Cluster { nats, .. } = &self.servers else { panic!("a cluster stack") };
        nats.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// SIGKILLs the cluster node named `name` (Unix µs when it is gone).
    pub fn kill_cluster_node(&mut self, name: &str) -> u64 {
        let Servers::Cluster { nats, .. } = &mut self.servers else { panic!("a cluster stack") };
        let i = nats.node_named(name).unwrap_or_else(|| panic!("no node {name}"));
        nats.kill(i);
        self.step(&format!("cluster node {name} killed"));
        now_us()
    }

    /// Submits `per_s` one-row `mlp` tasks a second until stopped, each with its own
    /// request id `<tag>-<n>`. A submission that gets no answer (the ingress is gone, or
    /// NATS is) is retried with the same request id for up to 30 s; its task id must be
    /// the one the request id names. Only accepted ones count.
    pub fn load(&self, tag: &str, per_s: u32) -> Load {
        self.load_rows(tag, per_s, 1)
    }

    /// As [`ProcessStack::load`], with `rows` rows a task (more rows: longer inferences,
    /// so that workers hold assignments a while).
    pub fn load_rows(&self, tag: &str, per_s: u32, rows: u64) -> Load {
        let log = Arc::new(Mutex::new(LoadLog::default()));
        let accepted = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (client, model, tag) = (self.client.clone(), self.model.clone(), tag.to_string());
        let handle = tokio::spawn({
            let (log, accepted, stop) = (log.clone(), accepted.clone(), stop.clone());
            async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(now_us());
                let mut tick = tokio::time::interval(Duration::from_secs(1) / per_s);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut submissions = tokio::task::JoinSet::new();
                for n in 0.. {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let request = SubmitRequest {
                        request_id: Some(format!("{tag}-{n}")),
                        timeout_ms: Some(TASK_TIMEOUT_MS),
                        ..SubmitRequest::new(&model.name, sundara::models::sample_inputs(&model.inputs, rows, &mut rng))
                    };
                    let (client, log, accepted) = (client.clone(), log.clone(), accepted.clone());
                    submissions.spawn(async move { submit_retrying(&client, request, &log, &accepted).await });
                }
                while submissions.join_next().await.is_some() {}
            }
        });
        Load { log, stop, handle, accepted }
    }

    /// Waits (bounded) until `n` more submissions than now have been accepted: load that
    /// runs across a fault.
    pub async fn more_accepted(&self, load: &Load, n: usize, within: Duration) {
        let want = load.accepted_count() + n;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let accepted = load.accepted.notified();
            tokio::pin!(accepted);
            accepted.as_mut().enable();
            if load.accepted_count() >= want {
                self.step(&format!("{want} accepted"));
                return;
            }
            if tokio::time::timeout_at(deadline, accepted).await.is_err() {
                self.print_logs();
                panic!("fewer than {n} submissions accepted within {within:?}");
            }
        }
    }

    /// Submits one one-row `mlp` task with request id `request_id`; it must be accepted.
    pub async fn submit_one(&self, request_id: &str) -> Accepted {
        let mut rng = rand::rngs::StdRng::seed_from_u64(now_us());
        let request = SubmitRequest {
            request_id: Some(request_id.into()),
            timeout_ms: Some(TASK_TIMEOUT_MS),
            ..SubmitRequest::new(&self.model.name, sundara::models::sample_inputs(&self.model.inputs, 1, &mut rng))
        };
        match self.client.submit(&request).await.expect("the ingress answers") {
            SubmitOutcome::Accepted { task_id, duplicate } => {
                Accepted { request_id: request_id.into(), task_id, at_us: now_us(), attempts: 1, duplicate, request }
            }
            rejected => panic!("{request_id}: {rejected:?}"),
        }
    }

    /// Submits each of `accepted` again, as a client retrying would: each is accepted as a
    /// duplicate of the task it named the first time.
    pub async fn resubmit(&self, accepted: &[Accepted]) {
        for a in accepted {
            match self.client.submit(&a.request).await.expect("the ingress answers") {
                SubmitOutcome::Accepted { task_id, duplicate } => {
                    assert_eq!((task_id.as_str(), duplicate), (a.task_id.as_str(), true), "{}", a.request_id)
                }
                rejected => panic!("{}: {rejected:?}", a.request_id),
            }
        }
        self.step(&format!("{} submissions made again: the same tasks, as duplicates", accepted.len()));
    }

    /// Waits (bounded) until a task accepted after `after_us` is verified (the pipeline
    /// serves again: an expiry does not count), and returns when its result was stored.
    pub async fn first_verified_after(&self, load: &Load, after_us: u64, within: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.results.changed.notified();
            let accepted = load.accepted.notified();
            tokio::pin!(changed, accepted);
            changed.as_mut().enable();
            accepted.as_mut().enable();
            let ids: HashSet<String> = {
                let log = load.log.lock().unwrap();
                log.accepted.iter().filter(|a| a.at_us > after_us).map(|a| a.task_id.clone()).collect()
            };
            if let Some(at) = self.results.first_verified(&ids) {
                self.step(&format!("a task accepted since is verified ({} accepted since)", ids.len()));
                return at;
            }
            let waited = tokio::time::timeout_at(deadline, futures::future::select(changed, accepted)).await;
            if waited.is_err() {
                self.print_logs();
                panic!(
                    "no task accepted after the fault was verified within {within:?} ({} accepted since)",
                    ids.len()
                );
            }
        }
    }

    /// Waits (bounded) until every one of `accepted` has a result.
    pub async fn await_results(&self, accepted: &[Accepted], within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let changed = self.results.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let missing = self.results.missing(accepted.iter().map(|a| &a.task_id));
            if missing.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                self.print_logs();
                panic!(
                    "{} of {} accepted tasks have no result within {within:?}, e.g. {:?}",
                    missing.len(),
                    accepted.len(),
                    &missing[..missing.len().min(5)]
                );
            }
        }
    }

    /// Checks the promise for `accepted`: each has exactly one result in RESULTS, a task
    /// with a dead letter has a failed result (and an expired or failed one has its dead
    /// letter), and nothing was stored twice. Waits (bounded) for the results first.
    pub async fn settle(&mut self, accepted: &[Accepted], within: Duration) -> Settled {
        self.step(&format!("load stopped, {} accepted", accepted.len()));
        self.await_results(accepted, within).await;
        self.step("every accepted task has its result");
        self.assert_running();
        let mut out = Settled { accepted: accepted.len(), ..Default::default() };
        let stored = subject_counts(&self.js, subj::RESULTS_STREAM, &subj::results_of(TENANT)).await;
        let dead = subject_counts(&self.js, subj::DEAD_STREAM, subj::DEAD_ALL).await;
        for (subject, n) in &stored {
            assert_eq!(*n, 1, "{subject}: {n} results stored");
        }
        let seen: HashMap<String, Seen> = self.results.by_task.lock().unwrap().clone();
        let mut ids = HashSet::new();
        for a in accepted {
            assert!(ids.insert(a.task_id.clone()), "task {} accepted twice", a.task_id);
            assert_eq!(a.task_id, sundara_ingress::task_id(TENANT, Some(&a.request_id)), "{}", a.request_id);
            let s = &seen[&a.task_id];
            assert_eq!(s.count, 1, "task {}: result delivered {} times", a.task_id, s.count);
            assert_eq!(stored.get(&subj::result(TENANT, &a.task_id)), Some(&1), "task {}", a.task_id);
            let lettered = dead.contains_key(&subj::dead(&a.task_id));
            if s.status == Terminal::Verified && lettered {
                let letter = self.dead_letter(&a.task_id).await;
                panic!("task {} was verified and also dead-lettered: {letter}", a.task_id);
            }
            if s.status != Terminal::Verified {
                assert!(lettered, "task {} failed ({:?}) without a dead letter", a.task_id, s.status);
                // Which task and why, for a test that bounds them (and its kept logs).
                let letter = self.dead_letter(&a.task_id).await;
                let ago_s = sundara_schemas::now_us().saturating_sub(a.at_us) as f64 / 1e6;
                let accepted_s = self.started.elapsed().as_secs_f64() - ago_s;
                self.step(&format!("task {} {:?}, accepted at {accepted_s:.2} s: {letter}", a.task_id, s.status));
            }
            match s.status {
                Terminal::Verified => out.verified += 1,
                Terminal::Expired => out.expired += 1,
                Terminal::NoConsensus => out.no_consensus += 1,
            }
            out.dead += usize::from(lettered);
            if a.attempts > 1 {
                out.retried += 1;
                out.duplicates += usize::from(a.duplicate);
            }
        }
        out
    }

    /// A task's dead letter, described (for failure messages).
    pub async fn dead_letter(&self, task_id: &str) -> String {
        let stream = self.js.get_stream(subj::DEAD_STREAM).await.unwrap();
        match stream.direct_get_last_for_subject(subj::dead(task_id)).await {
            Ok(m) => match decode::<DeadLetter>(&m.payload, MAX_MESSAGE_BYTES) {
                Ok(d) => format!("{:?} ({} outcomes of evidence)", d.reason, d.evidence.len()),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        }
    }

    /// Recovery of `fault` from the results of `accepted`; the work it caught is what was
    /// accepted after `since_us` (the previous fault's restart).
    pub fn recovery(&self, fault: &Fault, since_us: u64, accepted: &[Accepted]) -> Recovery {
        let seen = self.results.by_task.lock().unwrap();
        let stored = |a: &Accepted| seen.get(&a.task_id).map(|s| s.stored_us);
        let verified =
            |a: &Accepted| seen.get(&a.task_id).filter(|s| s.status == Terminal::Verified).map(|s| s.stored_us);
        let first_after = accepted.iter().filter(|a| a.at_us > fault.restarted_us).filter_map(verified).min();
        let caught = |a: &&Accepted| a.at_us > since_us && a.at_us <= fault.restarted_us;
        let last_before = accepted.iter().filter(caught).filter_map(stored).max();
        let recovery_ms =
            first_after.expect("a task accepted after the restart is verified").saturating_sub(fault.killed_us) / 1000;
        let drain_ms = last_before.unwrap_or(0).saturating_sub(fault.restarted_us) / 1000;
        Recovery { recovery_ms, drain_ms }
    }

    /// Prints each fault's recovery with the test's counts in one fixed format, and
    /// returns the recoveries.
    pub fn report(&self, faults: &[Fault], accepted: &[Accepted], settled: &Settled) -> Vec<Recovery> {
        faults
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let since_us = if i == 0 { 0 } else { faults[i - 1].restarted_us };
                let r = self.recovery(f, since_us, accepted);
                eprintln!(
                    "FAULT {}: recovery_ms={} drain_ms={} accepted={} verified={} expired={} no_consensus={} dead={} retried={} duplicates={}",
                    f.name,
                    r.recovery_ms,
                    r.drain_ms,
                    settled.accepted,
                    settled.verified,
                    settled.expired,
                    settled.no_consensus,
                    settled.dead,
                    settled.retried,
                    settled.duplicates
                );
                r
            })
            .collect()
    }

    /// Notes a step of the test on stderr, with the time since the stack started.
    pub fn step(&self, what: &str) {
        eprintln!("[{:6.2} s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// The last lines of every process's log, on stderr (for a failing test).
    pub fn print_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else { return };
        let mut paths: Vec<PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- {} (last 20 of {} lines)", path.display(), lines.len());
            for line in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("{line}");
            }
        }
    }

    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for ProcessStack {
    /// Kills every process (a failing test must not leave them behind), after printing
    /// their logs if the test is failing.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        self.follower.abort();
        for child in self.services.values_mut().chain(self.workers.values_mut()) {
            kill(child);
        }
        if std::env::var_os("FAULTS_KEEP_LOGS").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("logs kept in {}", dir.keep().display());
        }
    }
}

/// Deadline of the load's tasks: long enough for a restart, short enough that a task
/// whose replica was lost ends (abandoned, or decided at deadline + grace) within a test.
pub const TASK_TIMEOUT_MS: u64 = 15_000;

fn kill(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// `provision`, retried (bounded) while a fresh cluster is still electing leaders.
async fn provision_retrying(js: &jetstream::Context, retention: &nats::Retention) {
    wait::until("the streams to be provisioned", Duration::from_secs(30), || async {
        nats::provision(js, retention).await.map_err(|e| e.to_string())
    })
    .await
}

/// One submission, retried with the same request id until accepted (30 s at most).
async fn submit_retrying(client: &Client, request: SubmitRequest, log: &Mutex<LoadLog>, accepted: &Notify) {
    let request_id = request.request_id.clone().expect("a request id");
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut attempts = 0;
    while tokio::time::Instant::now() < give_up {
        attempts += 1;
        // Shorter than the client's own 30 s: a request the ingress took with it when it
        // died gets no answer at all.
        match tokio::time::timeout(Duration::from_secs(3), client.submit(&request)).await {
            Ok(Ok(SubmitOutcome::Accepted { task_id, duplicate })) => {
                let at_us = now_us();
                let a = Accepted { request_id, task_id, at_us, attempts, duplicate, request };
                log.lock().unwrap().accepted.push(a);
                accepted.notify_waiters();
                return;
            }
            Ok(Ok(SubmitOutcome::Rejected { code, .. })) => log.lock().unwrap().rejected.push(code),
            Ok(Err(_)) | Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log.lock().unwrap().given_up.push(request_id);
}

/// Records every result of tenant [`TENANT`] as RESULTS stores it, from the stream's
/// start. Short pull requests (each returns as soon as messages arrive, or after half a
/// second), so a consumer lost with its server is noticed at once and created again after
/// the last result seen.
async fn follow_results(js: jetstream::Context, results: Arc<Results>) {
    let mut next_seq = 1;
    loop {
        let consumer = async {
            let stream = js.get_stream_no_info(subj::RESULTS_STREAM).await?;
            let config = jetstream::consumer::pull::Config {
                filter_subject: subj::results_of(TENANT),
                deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: next_seq },
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            };
            Ok::<_, async_nats::Error>(stream.create_consumer(config).await?)
        };
        let consumer = match consumer.await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        'batches: loop {
            let batch = consumer.batch().max_messages(1000).expires(Duration::from_millis(500)).messages().await;
            let Ok(mut batch) = batch else { break };
            while let Some(msg) = batch.next().await {
                let Ok(msg) = msg else { break 'batches };
                let Ok(info) = msg.info() else { continue };
                if info.stream_sequence < next_seq {
                    continue;
                }
                next_seq = info.stream_sequence + 1;
                let stored_us = (info.published.unix_timestamp_nanos() / 1000) as u64;
                let result: ClientResult = decode(&msg.payload, MAX_MESSAGE_BYTES).expect("a client result");
                let status = match result.status {
                    ResultStatus::Verified { .. } => Terminal::Verified,
                    ResultStatus::Failed { code: FailureCode::Expired, .. } => Terminal::Expired,
                    ResultStatus::Failed { code: FailureCode::NoConsensus, .. } => Terminal::NoConsensus,
                };
                let mut seen = results.by_task.lock().unwrap();
                seen.entry(result.task_id).and_modify(|s| s.count += 1).or_insert(Seen { status, stored_us, count: 1 });
                drop(seen);
                results.changed.notify_waiters();
            }
        }
    }
}

/// Messages per subject of `stream` under `filter`.
pub async fn subject_counts(js: &jetstream::Context, stream: &str, filter: &str) -> HashMap<String, usize> {
    let stream = js.get_stream(stream).await.unwrap();
    let mut subjects = stream.info_with_subjects(filter).await.unwrap();
    let mut counts = HashMap::new();
    while let Some(entry) = subjects.next().await {
        let (subject, n) = entry.unwrap();
        counts.insert(subject, n);
    }
    counts
}
