//! How the autoscaler changes the worker fleet: local processes (the embedded default),
//! Nomad's HTTP API, or docker compose. Each driver manages a pool of workers whose ids it
//! knows, and can set its size and replace one worker (a dead or quarantined one) by a
//! fresh one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use sundara_schemas::subjects as subj;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("starting {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("Nomad at {addr}: {reason}")]
    Nomad { addr: String, reason: String },
    #[error("docker compose: {0}")]
    Compose(String),
}

pub enum Driver {
    Local(LocalDriver),
    Nomad(NomadDriver),
    Compose(ComposeDriver),
}

impl Driver {
    /// Ids of the workers this driver runs now (as far as it can tell).
    pub async fn running(&mut self) -> Result<Vec<String>, DriverError> {
        match self {
            Driver::Local(d) => Ok(d.running()),
            Driver::Nomad(d) => Ok(d.running()),
            Driver::Compose(d) => Ok(d.running()),
        }
    }

    /// Runs `n` workers.
    pub async fn scale_to(&mut self, n: usize) -> Result<(), DriverError> {
        match self {
            Driver::Local(d) => d.scale_to(n).await,
            Driver::Nomad(d) => d.scale_to(n).await,
            Driver::Compose(d) => d.scale_to(n).await,
        }
    }

    /// Replaces one worker by a fresh one (a new id).
    pub async fn replace(&mut self, worker: &str) -> Result<(), DriverError> {
        match self {
            Driver::Local(d) => d.replace(worker).await,
            Driver::Nomad(d) => d.replace(worker).await,
            Driver::Compose(d) => d.replace(worker).await,
        }
    }
}

/// Workers as child processes of this one: `<binary> worker --id <prefix>-<n> <args>`.
pub struct LocalDriver {
    pub binary: PathBuf,
    /// Arguments after `worker --id <id>` (e.g. `--threads 1`).
    pub args: Vec<String>,
    /// Environment of the workers (NATS and Redis URLs, ORT library).
    pub env: Vec<(String, String)>,
    pub prefix: String,
    next: u64,
    children: BTreeMap<String, Child>,
}

impl LocalDriver {
    pub fn new(binary: PathBuf, prefix: &str) -> LocalDriver {
        LocalDriver {
            binary,
            args: Vec::new(),
            env: Vec::new(),
            prefix: prefix.to_string(),
            next: 1,
            children: BTreeMap::new(),
        }
    }

    fn running(&mut self) -> Vec<String> {
        // Reap workers that exited: the next scale_to starts others in their place.
        self.children.retain(|id, child| match child.try_wait() {
            Ok(None) => true,
            Ok(Some(status)) => {
                tracing::warn!(worker = %id, %status, "worker process exited");
                false
            }
            Err(_) => false,
        });
        self.children.keys().cloned().collect()
    }

    async fn start_one(&mut self) -> Result<(), DriverError> {
        let id = format!("{}-{}", self.prefix, self.next);
        self.next += 1;
        let child = Command::new(&self.binary)
            .args(["worker", "--id", &id])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DriverError::Spawn { what: format!("worker {id}"), source })?;
        tracing::info!(worker = %id, "worker process started");
        self.children.insert(id, child);
        Ok(())
    }

    async fn scale_to(&mut self, n: usize) -> Result<(), DriverError> {
        self.running();
        while self.children.len() < n {
            self.start_one().await?;
        }
        while self.children.len() > n {
            // The newest goes first; SIGTERM lets it finish what it holds.
            let (id, child) = self.children.pop_last().expect("more than n > 0");
            stop(&id, child, true).await;
        }
        Ok(())
    }

    async fn replace(&mut self, worker: &str) -> Result<(), DriverError> {
        if let Some(child) = self.children.remove(worker) {
            // Dead or quarantined: nothing it holds is worth waiting for.
            stop(worker, child, false).await;
        }
        self.start_one().await
    }
}

/// Stops a worker process: gracefully (SIGTERM, then SIGKILL after 30 s) or at once.
async fn stop(id: &str, mut child: Child, graceful: bool) {
    if graceful && let Some(pid) = child.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
        if tokio::time::timeout(Duration::from_secs(30), child.wait()).await.is_ok() {
            tracing::info!(worker = %id, "worker process stopped");
            return;
        }
    }
    let _ = child.kill().await;
    tracing::info!(worker = %id, "worker process killed");
}

/// A Nomad job whose task group runs one worker per allocation, each with
/// `--id <prefix>${NOMAD_ALLOC_ID}`: the group's count is the fleet size, and a worker is
/// replaced by stopping its allocation (Nomad places a new one).
pub struct NomadDriver {
    /// `host:port` of the Nomad HTTP API (plain HTTP; put a local proxy in front for TLS).
    pub addr: String,
    pub job: String,
    pub group: String,
    pub token: Option<String>,
    /// What precedes the allocation id in a worker's id.
    pub prefix: String,
    /// The count last set (Nomad is the source of truth for which allocations run).
    count: usize,
}

impl NomadDriver {
    pub fn new(addr: &str, job: &str, group: &str) -> NomadDriver {
        NomadDriver {
            addr: addr.into(),
            job: job.into(),
            group: group.into(),
            token: None,
            prefix: String::new(),
            count: 0,
        }
    }

    /// The allocations are Nomad's to list; the pool is known by its count.
    fn running(&self) -> Vec<String> {
        (0..self.count).map(|i| format!("{}[{i}]", self.group)).collect()
    }

    /// `POST /v1/job/<job>/scale` with the new count.
    pub fn scale_request(&self, n: usize) -> (String, String) {
        let body = format!(
            r#"{{"Count":{n},"Target":{{"Group":"{}"}},"Message":"sundara autoscaler"}}"#,
            self.group.replace('"', "")
        );
        (format!("/v1/job/{}/scale", self.job), body)
    }

    async fn scale_to(&mut self, n: usize) -> Result<(), DriverError> {
        if n == self.count {
            return Ok(());
        }
        let (path, body) = self.scale_request(n);
        self.post(&path, &body).await?;
        self.count = n;
        Ok(())
    }

    /// `POST /v1/allocation/<alloc>/stop`: the worker id is the prefix and its allocation id.
    async fn replace(&mut self, worker: &str) -> Result<(), DriverError> {
        let alloc = worker.strip_prefix(self.prefix.as_str()).unwrap_or(worker);
        self.post(&format!("/v1/allocation/{alloc}/stop"), "{}").await
    }

    async fn post(&self, path: &str, body: &str) -> Result<(), DriverError> {
        let err = |reason: String| DriverError::Nomad { addr: self.addr.clone(), reason };
        let token = self.token.as_ref().map(|t| format!("X-Nomad-Token: {t}\r\n")).unwrap_or_default();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{token}Connection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(&self.addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut reply = Vec::new();
            stream.take(64 << 10).read_to_end(&mut reply).await?;
            Ok::<Vec<u8>, std::io::Error>(reply)
        };
        let reply = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| err("no reply within 10 s".into()))?
            .map_err(|e| err(e.to_string()))?;
        let reply = String::from_utf8_lossy(&reply);
        let status = reply.split_whitespace().nth(1).unwrap_or("");
        if !status.starts_with('2') {
            return Err(err(format!("{path}: {}", reply.lines().next().unwrap_or("empty reply"))));
        }
        Ok(())
    }
}

/// A docker compose service of workers: `docker compose up --scale <service>=N`; a worker
/// (whose id is the prefix and its container's hostname) is replaced by removing its
/// container and scaling back up.
pub struct ComposeDriver {
    pub file: PathBuf,
    pub service: String,
    /// What precedes the container's hostname in a worker's id.
    pub prefix: String,
    count: usize,
}

impl ComposeDriver {
    pub fn new(file: PathBuf, service: &str) -> ComposeDriver {
        ComposeDriver { file, service: service.into(), prefix: String::new(), count: 0 }
    }

    /// The `docker` arguments that remove a worker's container: only one of the pool (an id
    /// with the prefix), by its hostname (docker resolves a container's short id).
    pub fn remove_args(&self, worker: &str) -> Option<Vec<String>> {
        let container = worker.strip_prefix(self.prefix.as_str())?;
        subj::is_token(container).then(|| ["rm", "-f", container].map(String::from).to_vec())
    }

    fn running(&self) -> Vec<String> {
        (0..self.count).map(|i| format!("{}-{}", self.service, i + 1)).collect()
    }

    /// The `docker` arguments that set the service to `n` containers.
    pub fn scale_args(&self, n: usize) -> Vec<String> {
        let file = self.file.display().to_string();
        let scale = format!("{}={n}", self.service);
        ["compose", "-f", &file, "up", "-d", "--no-recreate", "--scale", &scale, &self.service]
            .map(String::from)
            .to_vec()
    }

    async fn docker(&self, args: &[String]) -> Result<(), DriverError> {
        let out = Command::new("docker")
            .args(args)
            .output()
            .await
            .map_err(|e| DriverError::Compose(format!("docker {}: {e}", args.join(" "))))?;
        if !out.status.success() {
            return Err(DriverError::Compose(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(())
    }

    async fn scale_to(&mut self, n: usize) -> Result<(), DriverError> {
        if n == self.count {
            return Ok(());
        }
        self.docker(&self.scale_args(n)).await?;
        self.count = n;
        Ok(())
    }

    async fn replace(&mut self, worker: &str) -> Result<(), DriverError> {
        let remove =
            self.remove_args(worker).ok_or_else(|| DriverError::Compose(format!("{worker:?} is not in the pool")))?;
        self.docker(&remove).await?;
        self.docker(&self.scale_args(self.count)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nomad_scales_the_job_group() {
        let d = NomadDriver::new("127.0.0.1:4646", "sundara-workers", "worker");
        let (path, body) = d.scale_request(3);
        assert_eq!(path, "/v1/job/sundara-workers/scale");
        assert_eq!(body, r#"{"Count":3,"Target":{"Group":"worker"},"Message":"sundara autoscaler"}"#);
    }

    /// A stand-in for Nomad's HTTP API (no Nomad server can run here): it records each
    /// request and answers 200, or 403 when told to.
    async fn fake_nomad(status: &'static str) -> (String, tokio::sync::mpsc::Receiver<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).to_string()).await;
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
                let _ = stream.write_all(reply.as_bytes()).await;
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn nomad_requests_reach_the_api_and_errors_are_reported() {
        let (addr, mut requests) = fake_nomad("200 OK").await;
        let mut d = NomadDriver::new(&addr, "sundara-workers", "worker");
        d.token = Some("secret-token".into());
        d.prefix = "sundara-".into();
        d.scale_to(3).await.unwrap();
        let scale = requests.recv().await.unwrap();
        assert!(scale.starts_with("POST /v1/job/sundara-workers/scale HTTP/1.1"), "{scale}");
        assert!(
            scale.contains("X-Nomad-Token: secret-token")
                && scale.ends_with(r#""Count":3,"Target":{"Group":"worker"},"Message":"sundara autoscaler"}"#)
        );
        assert_eq!(d.running().len(), 3);
        d.scale_to(3).await.unwrap();
        d.replace("sundara-0a1b").await.unwrap();
        let stop = requests.recv().await.unwrap();
        assert!(stop.starts_with("POST /v1/allocation/0a1b/stop "), "the same count is not sent twice: {stop}");

        let (addr, _requests) = fake_nomad("403 Forbidden").await;
        let mut d = NomadDriver::new(&addr, "sundara-workers", "worker");
        let err = d.scale_to(2).await.unwrap_err().to_string();
        assert!(err.contains("403"), "{err}");
        assert!(d.running().is_empty(), "a refused scale changes nothing");
    }

    #[test]
    fn compose_removes_only_pool_containers_by_hostname() {
        let mut d = ComposeDriver::new("infra/compose.yaml".into(), "worker");
        d.prefix = "pool-".into();
        assert_eq!(d.remove_args("pool-0a1b2c3d4e5f").unwrap().join(" "), "rm -f 0a1b2c3d4e5f");
        assert_eq!(d.remove_args("miner-7"), None, "not of the pool");
        assert_eq!(d.remove_args("pool-"), None, "no container named");
    }

    #[test]
    fn compose_scales_the_service() {
        let d = ComposeDriver::new("infra/compose.yaml".into(), "worker");
        assert_eq!(
            d.scale_args(4).join(" "),
            "compose -f infra/compose.yaml up -d --no-recreate --scale worker=4 worker"
        );
    }
}
