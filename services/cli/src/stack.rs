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
            return Err(StackError::Start { what, reason: format!("exited with {status}") });
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
    let port = free_port()?;
    let monitor = free_port()?;
    let store = dir.join("jetstream");
    std::fs::create_dir_all(&store)?;
    let conf = dir.join("nats.conf");
    // 8 MiB payloads: the ingress accepts submissions up to 4 MiB plus headroom.
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n}}\n{extra}\n",
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
    start_redis_on(binary, dir, free_port()?)
}

/// Starts redis-server on `port`, without persistence (so a restart comes back empty).
pub fn start_redis_on(binary: &Path, dir: &Path, port: u16) -> Result<ServerProcess, StackError> {
    let mut child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
}

impl LocalStack {
    pub fn start(root: &Path) -> Result<LocalStack, StackError> {
        let dir = tempfile::Builder::new().prefix("sundara-stack-").tempdir()?;
        let nats = start_nats(&nats_server_binary(root)?, dir.path())?;
        let redis = start_redis(&redis_server_binary()?, dir.path())?;
        Ok(LocalStack { nats, redis, dir })
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
            nats: NatsEndpoint::open(format!("nats://127.0.0.1:{}", self.nats.port)),
            redis_url: format!("redis://127.0.0.1:{}/", self.redis.port),
        }
    }
}
