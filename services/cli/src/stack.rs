//! The embedded local stack: nats-server (JetStream) and redis-server as child processes
//! on free loopback ports with their own temp dirs. Used by `sundara up` and by the tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sundara_common::Endpoints;
use sundara_common::nats::NatsEndpoint;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what} not found: {hint}")]
    Missing { what: &'static str, hint: &'static str },
    #[error("cannot start {what}: {reason}")]
    Start { what: &'static str, reason: String },
    #[error("{what} exited at start with {status} (its port may have been taken)")]
    Exited { what: &'static str, status: std::process::ExitStatus },
    #[error("{what} did not become ready on port {port} within {secs} s")]
    NotReady { what: &'static str, port: u16, secs: u64 },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

const SETUP_HINT: &str = "run scripts/setup (it installs redis-server from apt and nats-server 2.15 into .venv)";

/// The project root: where `.venv` and `.cache/models` live (the current directory when
/// it has them, else the directory this crate was built from).
pub fn project_root() -> PathBuf {
    let cwd = std::env::current_dir().unwrap_or_default();
    if cwd.join(".venv").exists() || cwd.join("scripts/setup").exists() {
        return cwd;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// nats-server: `SUNDARA_NATS_SERVER`, else `.venv/bin/nats-server` under `root`.
/// (Debian's nats-server 2.9 silently ignores consumer filters; it is not used.)
pub fn nats_server_binary(root: &Path) -> Result<PathBuf, StackError> {
    if let Some(p) = std::env::var_os("SUNDARA_NATS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    let venv = root.join(".venv/bin/nats-server");
    if venv.exists() {
        return Ok(venv);
    }
    Err(StackError::Missing { what: "nats-server 2.15", hint: SETUP_HINT })
}

/// redis-server: `SUNDARA_REDIS_SERVER`, else on PATH.
pub fn redis_server_binary() -> Result<PathBuf, StackError> {
    if let Some(p) = std::env::var_os("SUNDARA_REDIS_SERVER") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("redis-server");
        if p.exists() {
            return Ok(p);
        }
    }
    for p in ["/usr/bin/redis-server", "/usr/sbin/redis-server"] {
        if Path::new(p).exists() {
            return Ok(PathBuf::from(p));
        }
    }
    Err(StackError::Missing { what: "redis-server", hint: SETUP_HINT })
}

/// A free loopback port (the OS picks it; a race with another process is retried by the caller).
pub fn free_port() -> Result<u16, StackError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One server process, killed when dropped.
pub struct ServerProcess {
    what: &'static str,
    child: Child,
    pub port: u16,
    /// HTTP monitoring port (nats-server's `/varz`, `/jsz`), where the server has one.
    pub monitor_port: Option<u16>,
}

impl ServerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the server (fault injection in tests).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        tracing::debug!(what = self.what, port = self.port, "server stopped");
    }
}

fn wait_ready(what: &'static str, port: u16, child: &mut Child, within: Duration) -> Result<(), StackError> {
    let started = Instant::now();
    // No readiness event crosses process boundaries here; poll the port briefly.
    while started.elapsed() < within {
        if let Some(status) = child.try_wait()? {
            return Err(StackError::Exited { what, status });
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(StackError::NotReady { what, port, secs: within.as_secs() })
}

/// Starts nats-server with JetStream on a free port, storing in `dir`.
pub fn start_nats(binary: &Path, dir: &Path) -> Result<ServerProcess, StackError> {
    start_nats_with(binary, dir, "")
}

/// As [`start_nats`], with `extra` appended to the server's config (e.g. `authorization`).
pub fn start_nats_with(binary: &Path, dir: &Path, extra: &str) -> Result<ServerProcess, StackError> {
    on_free_ports(|| start_nats_on(binary, dir, free_port()?, free_port()?, extra))
}

/// Starts a server on ports found free, again on others if it exits at once: a port
/// found free can be taken by another process (a parallel test's server) before the
/// server binds it.
fn on_free_ports(start: impl Fn() -> Result<ServerProcess, StackError>) -> Result<ServerProcess, StackError> {
    let mut tries = 0;
    loop {
        match start() {
            Err(StackError::Exited { .. }) if tries < 4 => tries += 1,
            started => return started,
        }
    }
}

/// As [`start_nats_with`], on the given client and monitoring ports. JetStream stores in
/// `dir/jetstream`, so a server started again on the same `dir` finds its streams.
pub fn start_nats_on(
    binary: &Path,
    dir: &Path,
    port: u16,
    monitor: u16,
    extra: &str,
) -> Result<ServerProcess, StackError> {
    let store = dir.join("jetstream");
    std::fs::create_dir_all(&store)?;
    let conf = dir.join("nats.conf");
    // 8 MiB payloads: the ingress accepts submissions up to 4 MiB plus headroom. A fixed
    // store limit: by default it is derived from the free disk, and streams' `max_bytes`
    // reservations (TASKS: 4 GiB) then fail on a machine short of disk, though the
    // embedded stack stores little.
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n  max_file_store: 64GB\n}}\n{extra}\n",
            store
        ),
    )?;
    let mut child = Command::new(binary)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| StackError::Start { what: "nats-server", reason: format!("{}: {e}", binary.display()) })?;
    wait_ready("nats-server", port, &mut child, Duration::from_secs(20))?;
    Ok(ServerProcess { what: "nats-server", child, port, monitor_port: Some(monitor) })
}

/// Starts redis-server on a free port, without persistence.
pub fn start_redis(binary: &Path, dir: &Path) -> Result<ServerProcess, StackError> {
    on_free_ports(|| start_redis_on(binary, dir, free_port()?))
}

/// Most memory the embedded redis-server may use. At the cap it refuses writes rather
/// than evicting keys (`noeviction`): an evicted reservation would free a slot that is in
/// use, or lose an in-flight assignment (docs/reliability.md, "Redis memory").
pub const REDIS_MAXMEMORY: &str = "1gb";

/// Starts redis-server on `port`, without persistence (so a restart comes back empty),
/// with at most [`REDIS_MAXMEMORY`] and no eviction.
pub fn start_redis_on(binary: &Path, dir: &Path, port: u16) -> Result<ServerProcess, StackError> {
    let mut child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "noeviction"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| StackError::Start { what: "redis-server", reason: format!("{}: {e}", binary.display()) })?;
    wait_ready("redis-server", port, &mut child, Duration::from_secs(20))?;
    Ok(ServerProcess { what: "redis-server", child, port, monitor_port: None })
}

/// NATS and Redis for one pipeline, gone when dropped.
pub struct LocalStack {
    pub nats: ServerProcess,
    pub redis: ServerProcess,
    pub dir: tempfile::TempDir,
    /// The seed file [`LocalStack::endpoints`] connects with, when NATS has auth on.
    pub nats_credentials: Option<PathBuf>,
}

impl LocalStack {
    pub fn start(root: &Path) -> Result<LocalStack, StackError> {
        let dir = tempfile::Builder::new().prefix("sundara-stack-").tempdir()?;
        let nats = start_nats(&nats_server_binary(root)?, dir.path())?;
        let redis = start_redis(&redis_server_binary()?, dir.path())?;
        Ok(LocalStack { nats, redis, dir, nats_credentials: None })
    }

    /// As [`LocalStack::start`], with NATS' users and permissions from `sundara auth init`
    /// (see [`crate::auth`]); the stack's endpoints connect as the validator.
    pub fn start_secured(root: &Path, auth: &crate::auth::AuthDir) -> Result<LocalStack, StackError> {
        let dir = tempfile::Builder::new().prefix("sundara-stack-").tempdir()?;
        let nats = start_nats_with(&nats_server_binary(root)?, dir.path(), &auth.server_config)?;
        let redis = start_redis(&redis_server_binary()?, dir.path())?;
        let nats_credentials = Some(auth.credentials(&crate::auth::Role::Validator));
        Ok(LocalStack { nats, redis, dir, nats_credentials })
    }

    /// SIGKILLs nats-server and starts it again on the same ports and store directory
    /// (fault injection: JetStream recovers its streams from disk; every client reconnects).
    pub fn restart_nats(&mut self) -> Result<(), StackError> {
        self.nats.kill();
        self.start_nats_again()
    }

    /// Starts nats-server again after [`ServerProcess::kill`] on the same ports and store
    /// directory (a test that times the outage kills it itself).
    pub fn start_nats_again(&mut self) -> Result<(), StackError> {
        let monitor = self.nats.monitor_port.unwrap_or(free_port()?);
        self.nats = start_nats_on(&nats_server_binary(&project_root())?, self.dir.path(), self.nats.port, monitor, "")?;
        Ok(())
    }

    /// Kills Redis and starts an empty one on the same port (fault injection: every
    /// client's connection manager reconnects to it).
    pub fn restart_redis_empty(&mut self) -> Result<(), StackError> {
        let port = self.redis.port;
        self.redis.kill();
        self.redis = start_redis_on(&redis_server_binary()?, self.dir.path(), port)?;
        Ok(())
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            nats: NatsEndpoint {
                url: format!("nats://127.0.0.1:{}", self.nats.port),
                credentials: self.nats_credentials.clone(),
            },
            redis_url: format!("redis://127.0.0.1:{}/", self.redis.port),
        }
    }
}

/// A GET of `path` on a loopback HTTP port (nats-server's monitoring): the status code and
/// the body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String), StackError> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// One node of a [`LocalCluster`]: its name, ports and store, and its process while it runs.
pub struct ClusterNode {
    pub name: String,
    pub port: u16,
    pub monitor_port: u16,
    pub cluster_port: u16,
    pub dir: PathBuf,
    pub process: Option<ServerProcess>,
}

/// A JetStream cluster of nats-server processes on loopback (routes between every pair,
/// each node with its own store), gone when dropped.
pub struct LocalCluster {
    pub nodes: Vec<ClusterNode>,
    binary: PathBuf,
    pub dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts `n` nodes and waits (bounded) until JetStream is healthy on each, a meta
    /// leader elected.
    pub fn start(root: &Path, n: usize) -> Result<LocalCluster, StackError> {
        let dir = tempfile::Builder::new().prefix("sundara-cluster-").tempdir()?;
        let binary = nats_server_binary(root)?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let node_dir = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&node_dir)?;
            nodes.push(ClusterNode {
                name: format!("n{i}"),
                port: free_port()?,
                monitor_port: free_port()?,
                cluster_port: free_port()?,
                dir: node_dir,
                process: None,
            });
        }
        let mut cluster = LocalCluster { nodes, binary, dir };
        for i in 0..n {
            cluster.start_node(i)?;
        }
        cluster.healthy(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Starts node `i` (again, after [`LocalCluster::kill`]: same ports, same store).
    pub fn start_node(&mut self, i: usize) -> Result<(), StackError> {
        let routes: Vec<String> =
            self.nodes.iter().map(|n| format!("nats-route://127.0.0.1:{}", n.cluster_port)).collect();
        let node = &self.nodes[i];
        let extra = format!(
            "server_name: {}\ncluster {{\n  name: sundara\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
            node.name,
            node.cluster_port,
            routes.join(", ")
        );
        let process = start_nats_on(&self.binary, &node.dir, node.port, node.monitor_port, &extra)?;
        self.nodes[i].process = Some(process);
        Ok(())
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill();
        }
    }

    /// The index of the node named `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Every node's client URL, comma-separated (what `--nats` takes for a cluster).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    pub fn endpoint(&self) -> NatsEndpoint {
        NatsEndpoint::open(self.urls())
    }

    /// Waits (bounded) until every running node reports JetStream healthy (`/healthz`).
    /// Nothing announces that across processes; poll briefly.
    pub fn healthy(&self, within: Duration) -> Result<(), StackError> {
        let started = Instant::now();
        for node in self.nodes.iter().filter(|n| n.process.is_some()) {
            loop {
                if let Ok((200, _)) = http_get(node.monitor_port, "/healthz") {
                    break;
                }
                if started.elapsed() > within {
                    return Err(StackError::NotReady { what: "nats cluster", port: node.port, secs: within.as_secs() });
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}
