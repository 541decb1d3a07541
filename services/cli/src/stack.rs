//! The embedded local stack: nats-server (JetStream) and redis-server as child processes
//! on free loopback ports with their own temp dirs. Used by `sundara up` and by the tests.

use std::net::{IpAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sundara_common::Endpoints;
use sundara_common::nats::NatsEndpoint;
use sundara_common::tls::NatsTls;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what} not found: {hint}")]
    Missing { what: &'static str, hint: &'static str },
    #[error(
        "no Sundara checkout found: {reason}. Run from the repository root (where scripts/setup and .venv are), \
         or set SUNDARA_HOME to it"
    )]
    NoProjectRoot { reason: String },
    #[error("nats-server (pid {pid}) did not reload its configuration within {secs} s: {reason}")]
    Reload { pid: u32, secs: u64, reason: String },
    #[error("cannot start {what}: {reason}")]
    Start { what: &'static str, reason: String },
    #[error("{what} exited at start with {status} (its port may have been taken)")]
    Exited { what: &'static str, status: std::process::ExitStatus },
    #[error("{what} did not become ready on port {port} within {secs} s")]
    NotReady { what: &'static str, port: u16, secs: u64 },
    #[error("the stack's TLS certificates: {0}")]
    Tls(#[from] crate::tls::TlsInitError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

const SETUP_HINT: &str = "run scripts/setup (it installs redis-server from apt and nats-server 2.15 into .venv)";

/// The project root: where `.venv` (nats-server, ONNX Runtime) and `.cache` (models) live.
/// `SUNDARA_HOME` when set; else the current directory when it is a checkout (or an
/// installation: it has `.venv` or `scripts/setup`); else the nearest ancestor of this
/// executable's directory that is one (a binary in `target/release` of a checkout). Never
/// the tree the binary was built from: that may not be where the user is working.
pub fn find_project_root() -> Result<PathBuf, StackError> {
    let home = std::env::var_os("SUNDARA_HOME").map(PathBuf::from);
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    resolve_project_root(home, cwd, exe)
}

/// Whether `dir` looks like a checkout or an installation.
fn is_project_root(dir: &Path) -> bool {
    dir.join(".venv").is_dir() || dir.join("scripts/setup").is_file()
}

/// [`find_project_root`] on the given environment.
pub fn resolve_project_root(
    home: Option<PathBuf>,
    cwd: Option<PathBuf>,
    exe: Option<PathBuf>,
) -> Result<PathBuf, StackError> {
    if let Some(home) = home {
        return if home.is_dir() {
            Ok(home)
        } else {
            Err(StackError::NoProjectRoot { reason: format!("SUNDARA_HOME={} is not a directory", home.display()) })
        };
    }
    if let Some(cwd) = cwd.filter(|d| is_project_root(d)) {
        return Ok(cwd);
    }
    if let Some(found) = exe.as_deref().and_then(Path::parent).and_then(|d| d.ancestors().find(|a| is_project_root(a)))
    {
        return Ok(found.to_path_buf());
    }
    Err(StackError::NoProjectRoot {
        reason: "neither the current directory nor any directory above this executable has .venv or scripts/setup"
            .into(),
    })
}

/// [`find_project_root`] for tests and benchmarks, which run inside a checkout; panics
/// with the reason where there is none.
pub fn project_root() -> PathBuf {
    find_project_root().unwrap_or_else(|e| panic!("{e}"))
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

/// Whether servers run in a process group of their own (see [`detach_servers`]).
static DETACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Servers started from now on run in a process group of their own, so that a terminal's
/// Ctrl-C reaches only this process, which then stops its services before its servers
/// (`sundara up`: its services would otherwise drain against servers already gone). Tests
/// leave their servers in their group: an interrupted test run takes them along.
pub fn detach_servers() {
    DETACHED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `cmd`, in a process group of its own after [`detach_servers`].
fn server_command(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    #[cfg(unix)]
    if DETACHED.load(std::sync::atomic::Ordering::Relaxed) {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    cmd
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

fn wait_ready(
    what: &'static str,
    host: IpAddr,
    port: u16,
    child: &mut Child,
    within: Duration,
) -> Result<(), StackError> {
    let started = Instant::now();
    // No readiness event crosses process boundaries here; poll the port briefly.
    while started.elapsed() < within {
        if let Some(status) = child.try_wait()? {
            return Err(StackError::Exited { what, status });
        }
        if std::net::TcpStream::connect((host, port)).is_ok() {
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
    on_free_ports(|| start_nats_on(binary, dir, LOOPBACK, free_port()?, free_port()?, extra))
}

/// Where the embedded servers listen unless told otherwise.
pub const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

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
    host: IpAddr,
    port: u16,
    monitor: u16,
    extra: &str,
) -> Result<ServerProcess, StackError> {
    let store = dir.join("jetstream");
    std::fs::create_dir_all(&store)?;
    let conf = dir.join("nats.conf");
    // `NATS_MAX_PAYLOAD` (8 MiB): the ingress accepts submissions up to 4 MiB plus headroom. A fixed
    // store limit: by default it is derived from the free disk, and streams' `max_bytes`
    // reservations (TASKS: 4 GiB) then fail on a machine short of disk, though the
    // embedded stack stores little.
    std::fs::write(
        &conf,
        format!(
            "listen: {}\nhttp: 127.0.0.1:{monitor}\nmax_payload: {}\njetstream {{\n  store_dir: {:?}\n  max_file_store: 64GB\n}}\n{extra}\n",
            std::net::SocketAddr::new(host, port),
            sundara_schemas::NATS_MAX_PAYLOAD,
            store
        ),
    )?;
    let mut command = server_command(binary);
    if std::env::var_os("GOMEMLIMIT").is_none() {
        command.env("GOMEMLIMIT", NATS_MEMORY_LIMIT);
    }
    let mut child = command
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| StackError::Start { what: "nats-server", reason: format!("{}: {e}", binary.display()) })?;
    wait_ready("nats-server", host, port, &mut child, Duration::from_secs(20))?;
    Ok(ServerProcess { what: "nats-server", child, port, monitor_port: Some(monitor) })
}

/// The embedded nats-server's soft memory limit (Go's `GOMEMLIMIT`, unless the environment
/// sets one). Without it the Go heap grows to twice what the streams' state needs before
/// each collection, and the server's memory crept up for the whole 30-minute soak
/// (+36.7 MiB/min); with it the server stays level just under the limit, at no measurable
/// CPU cost (docs/reliability.md, "The 30-minute soak").
pub const NATS_MEMORY_LIMIT: &str = "3GiB";

/// Starts redis-server on a free port of loopback, without persistence.
pub fn start_redis(binary: &Path, dir: &Path) -> Result<ServerProcess, StackError> {
    on_free_ports(|| start_redis_on(binary, dir, LOOPBACK, free_port()?, None))
}

/// Most memory the embedded redis-server may use. At the cap it refuses writes rather
/// than evicting keys (`noeviction`): an evicted reservation would free a slot that is in
/// use, or lose an in-flight assignment (docs/reliability.md, "Redis memory").
pub const REDIS_MAXMEMORY: &str = "1gb";

/// The user every process connects to the embedded redis-server as (the default user is
/// off: a client without the password gets nothing).
pub const REDIS_USER: &str = "sundara";

/// The embedded redis-server's password in `dir` (`redis.password`, mode 0600): made on
/// first use, so a restart on the same directory keeps it. In a file, not on a command
/// line `ps` shows.
fn redis_password(dir: &Path) -> Result<String, StackError> {
    let path = dir.join("redis.password");
    if let Ok(password) = std::fs::read_to_string(&path) {
        return Ok(password.trim().to_string());
    }
    let password = hex::encode(rand::random::<[u8; 24]>());
    write_private(&path, &password)?;
    Ok(password)
}

/// Writes the embedded redis-server's config in `dir` (mode 0600): its ACL, the default
/// user off and [`REDIS_USER`] with [`redis_password`].
fn redis_config(dir: &Path) -> Result<PathBuf, StackError> {
    let conf = dir.join("redis.conf");
    let password = redis_password(dir)?;
    write_private(&conf, &format!("user default off\nuser {REDIS_USER} on >{password} ~* &* +@all\n"))?;
    Ok(conf)
}

/// Writes `text` to a file only its owner can read.
fn write_private(path: &Path, text: &str) -> Result<(), StackError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    std::io::Write::write_all(&mut options.open(path)?, text.as_bytes())?;
    Ok(())
}

/// The URL of the embedded redis-server of `dir` on `port`: its user and password.
pub fn redis_url(dir: &Path, port: u16) -> Result<String, StackError> {
    let password = redis_password(dir)?;
    Ok(format!("redis://{REDIS_USER}:{password}@127.0.0.1:{port}/"))
}

/// Starts redis-server on `port` of loopback and `host` (validator services on other hosts
/// reach it there), without persistence (so a restart comes back empty), with at most
/// [`REDIS_MAXMEMORY`] and no eviction, and an ACL ([`redis_config`]): connect with
/// [`redis_url`]. With `tls`, it speaks TLS only on that port (`rediss://`), with `tls`'s
/// server certificate, clients not asked for one.
pub fn start_redis_on(
    binary: &Path,
    dir: &Path,
    host: IpAddr,
    port: u16,
    tls: Option<&crate::tls::DevPki>,
) -> Result<ServerProcess, StackError> {
    let conf = redis_config(dir)?;
    let mut bind = vec![LOOPBACK.to_string()];
    if host != LOOPBACK {
        bind.push(host.to_string());
    }
    let ports: Vec<std::ffi::OsString> = match tls {
        None => ["--port".into(), port.to_string().into()].into(),
        Some(pki) => [
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string().into(),
            "--tls-cert-file".into(),
            pki.server_cert().into(),
            "--tls-key-file".into(),
            pki.server_key().into(),
            "--tls-ca-cert-file".into(),
            pki.ca().into(),
            "--tls-auth-clients".into(),
            "no".into(),
        ]
        .into(),
    };
    let mut child = server_command(binary)
        .arg(&conf)
        .args(&ports)
        .args(["--save", "", "--appendonly", "no", "--bind"])
        .args(&bind)
        .args(["--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "noeviction"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| StackError::Start { what: "redis-server", reason: format!("{}: {e}", binary.display()) })?;
    wait_ready("redis-server", LOOPBACK, port, &mut child, Duration::from_secs(20))?;
    Ok(ServerProcess { what: "redis-server", child, port, monitor_port: None })
}

/// NATS and Redis for one pipeline, gone when dropped. NATS speaks TLS only on its client
/// port, with a certificate of a throwaway CA made in the stack's directory (its
/// monitoring port stays plain HTTP).
pub struct LocalStack {
    pub nats: ServerProcess,
    pub redis: ServerProcess,
    pub dir: tempfile::TempDir,
    /// The seed file [`LocalStack::endpoints`] connects with, when NATS has auth on.
    pub nats_credentials: Option<PathBuf>,
    /// The stack's CA and certificates (`tls/` in its directory): sign more clients with
    /// [`crate::tls::client`] on `pki.dir`.
    pub pki: crate::tls::DevPki,
    /// What [`LocalStack::endpoints`] connect with: the CA, and with mutual TLS a client
    /// certificate (`validator`'s).
    pub nats_tls: NatsTls,
    nats_binary: PathBuf,
    /// What nats-server's config has besides the basics (a restart keeps it).
    nats_extra: String,
    /// The address nats-server's client port listens on.
    pub listen: IpAddr,
    /// Whether redis-server speaks TLS only (`rediss://`, the stack's CA).
    pub redis_tls: bool,
}

/// How a [`LocalStack`]'s servers are reached and whom they let in.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// The address nats-server's client port (and redis-server, besides loopback) listens
    /// on (the certificate names it): loopback, or one other hosts reach (a network
    /// namespace's link, a LAN).
    pub listen: IpAddr,
    /// NATS clients must present a certificate of the stack's CA (the endpoints present
    /// one named `validator`; sign others with [`crate::tls::client`]).
    pub mutual_tls: bool,
    /// redis-server speaks TLS only (`rediss://`), with a certificate of the stack's CA.
    pub redis_tls: bool,
}

impl Default for ServerOptions {
    fn default() -> ServerOptions {
        ServerOptions { listen: LOOPBACK, mutual_tls: false, redis_tls: false }
    }
}

/// The file of a secured stack's nats-server config that holds its `authorization` block,
/// included from `nats.conf` in the same directory: rewrite it and [`reload_nats`] to
/// change the users.
pub const AUTH_CONF: &str = "auth.conf";

impl LocalStack {
    /// NATS without auth (TLS on), and Redis.
    pub fn start(root: &Path) -> Result<LocalStack, StackError> {
        LocalStack::start_with(root, None, &ServerOptions::default())
    }

    /// As [`LocalStack::start`], with NATS' users and permissions from `sundara auth init`
    /// (see [`crate::auth`]) in [`LocalStack::auth_config`]; the stack's endpoints connect
    /// as the validator.
    pub fn start_secured(root: &Path, auth: &crate::auth::AuthDir) -> Result<LocalStack, StackError> {
        LocalStack::start_with(root, Some(auth), &ServerOptions::default())
    }

    /// The stack with NATS' users from `auth` (when given), listening and verifying
    /// clients as `options` say.
    pub fn start_with(
        root: &Path,
        auth: Option<&crate::auth::AuthDir>,
        options: &ServerOptions,
    ) -> Result<LocalStack, StackError> {
        let mutual_tls = options.mutual_tls;
        let dir = tempfile::Builder::new().prefix("sundara-stack-").tempdir()?;
        let hosts: Vec<String> = [options.listen].iter().filter(|h| **h != LOOPBACK).map(|h| h.to_string()).collect();
        let pki = crate::tls::init(&dir.path().join("tls"), &hosts, false)?;
        let nats_tls = if mutual_tls { crate::tls::client(&pki.dir, "validator", false)? } else { pki.client_tls() };
        let mut nats_extra = pki.server_block(mutual_tls);
        if let Some(auth) = auth {
            std::fs::write(dir.path().join(AUTH_CONF), &auth.server_config)?;
            // Relative to nats.conf's directory.
            nats_extra.push_str(&format!("include {AUTH_CONF:?}\n"));
        }
        let nats_binary = nats_server_binary(root)?;
        let listen = options.listen;
        let nats =
            on_free_ports(|| start_nats_on(&nats_binary, dir.path(), listen, free_port()?, free_port()?, &nats_extra))?;
        let redis_binary = redis_server_binary()?;
        let redis_tls = options.redis_tls.then_some(&pki);
        let redis = on_free_ports(|| start_redis_on(&redis_binary, dir.path(), listen, free_port()?, redis_tls))?;
        let nats_credentials = auth.map(|a| a.credentials(&crate::auth::Role::Validator));
        let redis_tls = options.redis_tls;
        Ok(LocalStack { nats, redis, dir, nats_credentials, pki, nats_tls, nats_binary, nats_extra, listen, redis_tls })
    }

    /// nats-server's config file.
    pub fn nats_config(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    /// The `authorization` block nats-server's config includes (a secured stack's).
    pub fn auth_config(&self) -> PathBuf {
        self.dir.path().join(AUTH_CONF)
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
        self.nats =
            start_nats_on(&self.nats_binary, self.dir.path(), self.listen, self.nats.port, monitor, &self.nats_extra)?;
        Ok(())
    }

    /// Kills Redis and starts an empty one on the same port (fault injection: every
    /// client's connection manager reconnects to it).
    pub fn restart_redis_empty(&mut self) -> Result<(), StackError> {
        self.redis.kill();
        self.start_redis_again()
    }

    /// Starts redis-server again, empty, after [`ServerProcess::kill`], on the same port
    /// and as before (TLS or not).
    pub fn start_redis_again(&mut self) -> Result<(), StackError> {
        let tls = self.redis_tls.then_some(&self.pki);
        self.redis = start_redis_on(&redis_server_binary()?, self.dir.path(), self.listen, self.redis.port, tls)?;
        Ok(())
    }

    pub fn endpoints(&self) -> Endpoints {
        Endpoints {
            nats: NatsEndpoint {
                url: format!("tls://{}", std::net::SocketAddr::new(self.listen, self.nats.port)),
                credentials: self.nats_credentials.clone(),
                tls: Some(self.nats_tls.clone()),
                hotkey: None,
            },
            redis_url: redis_url(self.dir.path(), self.redis.port)
                .map(|url| if self.redis_tls { url.replacen("redis://", "rediss://", 1) } else { url })
                .expect("the stack's redis password is in its directory"),
            redis_ca: self.redis_tls.then(|| self.pki.ca()),
        }
    }
}

/// Rewrites nats-server's `authorization` block (`auth_config`, which its config
/// includes) and makes the server (process `pid`, monitoring on `monitor_port`) reload it:
/// SIGHUP, then waits (bounded) until `/varz` shows a newer config load. A config the
/// server refuses leaves the load time as it was, and this fails.
pub fn reload_nats(auth_config: &Path, server_config: &str, pid: u32, monitor_port: u16) -> Result<(), StackError> {
    let within = Duration::from_secs(10);
    let failed = |reason: String| StackError::Reload { pid, secs: within.as_secs(), reason };
    let loaded_at = || -> Result<String, StackError> {
        let (status, body) = http_get(monitor_port, "/varz")?;
        let varz: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| failed(format!("/varz (HTTP {status}): {e}")))?;
        Ok(varz["config_load_time"].as_str().unwrap_or_default().to_string())
    };
    let before = loaded_at()?;
    std::fs::write(auth_config, server_config)?;
    let sent = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .map_err(|e| failed(format!("kill -HUP: {e}")))?;
    if !sent.success() {
        return Err(failed(format!("kill -HUP {pid}: {sent} (is nats-server still running?)")));
    }
    let started = Instant::now();
    // The reload is announced only in the server's log and /varz; poll /varz briefly.
    while started.elapsed() < within {
        if loaded_at()? != before {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(failed("its config load time did not change: see its log, the config may be invalid".into()))
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
///
/// Clients connect with TLS (a throwaway CA in its directory, as [`LocalStack`]'s); the
/// routes between the nodes stay plain TCP on loopback.
pub struct LocalCluster {
    pub nodes: Vec<ClusterNode>,
    binary: PathBuf,
    pub dir: tempfile::TempDir,
    /// The cluster's CA and the nodes' certificate.
    pub pki: crate::tls::DevPki,
}

impl LocalCluster {
    /// Starts `n` nodes and waits (bounded) until JetStream is healthy on each, a meta
    /// leader elected.
    pub fn start(root: &Path, n: usize) -> Result<LocalCluster, StackError> {
        let dir = tempfile::Builder::new().prefix("sundara-cluster-").tempdir()?;
        let pki = crate::tls::init(&dir.path().join("tls"), &[], false)?;
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
        let mut cluster = LocalCluster { nodes, binary, dir, pki };
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
        // Routes speak TLS too, each side presenting the nodes' certificate (it is also a
        // client certificate) and verifying the other's against the stack's CA.
        let extra = format!(
            "server_name: {}\ncluster {{\n  name: sundara\n  listen: 127.0.0.1:{}\n  routes: [{}]\n  {}}}\n{}",
            node.name,
            node.cluster_port,
            routes.join(", "),
            self.pki.server_block(true),
            self.pki.server_block(false)
        );
        let process = start_nats_on(&self.binary, &node.dir, LOOPBACK, node.port, node.monitor_port, &extra)?;
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
        self.nodes.iter().map(|n| format!("tls://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    pub fn endpoint(&self) -> NatsEndpoint {
        NatsEndpoint::open(self.urls()).with_tls(Some(self.pki.client_tls()))
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
