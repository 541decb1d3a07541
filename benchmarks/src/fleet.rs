//! The pipeline under test as separate processes (one per service and worker, as in a
//! deployment), so that each one's CPU use can be read from `/proc`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sundara_common::{Capacity, Endpoints};

/// One worker of the benchmark fleet.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub id: String,
    pub threads: usize,
}

/// Extra command-line arguments and environment for one process of the fleet (for
/// example ingress' `--max-in-flight`), appended to what [`Fleet::start`] gives it.
#[derive(Clone, Debug, Default)]
pub struct ServiceOptions {
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

pub struct Fleet {
    procs: Vec<(String, Child)>,
    /// Each process's name and base arguments, in the order of `procs` (for restarts).
    commands: Vec<(String, Vec<String>)>,
    workers: Vec<String>,
    endpoints: Endpoints,
    bin: PathBuf,
    log_dir: PathBuf,
    restarts: usize,
}

/// Why the fleet could not be started, restarted or found ready.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("locating this binary: {0}")]
    CurrentExe(#[source] std::io::Error),
    #[error("{} not found: build it with `cargo build --release`", .0.display())]
    NoBinary(PathBuf),
    #[error("creating the log {}: {source}", .path.display())]
    Log { path: PathBuf, source: std::io::Error },
    #[error("starting {name}: {source}")]
    Start { name: String, source: std::io::Error },
    #[error("no process named {0}")]
    Unknown(String),
    #[error("{name} exited during start-up ({status})")]
    Exited { name: String, status: std::process::ExitStatus },
    #[error("fleet not ready within {0:?}")]
    NotReady(Duration),
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// The `sundara` binary built beside the running benchmark binary.
pub fn sundara_binary() -> Result<PathBuf, FleetError> {
    let exe = std::env::current_exe().map_err(FleetError::CurrentExe)?;
    let bin = exe.with_file_name("sundara");
    if bin.exists() { Ok(bin) } else { Err(FleetError::NoBinary(bin)) }
}

impl Fleet {
    /// Starts ingress, scheduler, verifier and rewarder, and the workers (each its own
    /// operator). Service logs go to `log_dir`.
    pub fn start(
        endpoints: &Endpoints,
        workers: &[WorkerSpec],
        cache_dir: &Path,
        log_dir: &Path,
    ) -> Result<Fleet, FleetError> {
        Fleet::start_with(endpoints, workers, cache_dir, log_dir, &HashMap::new())
    }

    /// [`Fleet::start`], with extra arguments and environment for the processes named in
    /// `options` (`ingress`, `scheduler`, `verifier`, `rewarder` or a worker's id).
    pub fn start_with(
        endpoints: &Endpoints,
        workers: &[WorkerSpec],
        cache_dir: &Path,
        log_dir: &Path,
        options: &HashMap<String, ServiceOptions>,
    ) -> Result<Fleet, FleetError> {
        let bin = sundara_binary()?;
        let mut commands: Vec<(String, Vec<String>)> = ["ingress", "scheduler", "verifier", "rewarder"]
            .iter()
            .map(|s| (s.to_string(), vec![s.to_string()]))
            .collect();
        for w in workers {
            let args = sundara_worker::Args {
                threads: w.threads,
                cache_dir: Some(cache_dir.to_path_buf()),
                ..sundara_worker::Args::new(&w.id)
            };
            commands
                .push((w.id.clone(), std::iter::once("worker".to_string()).chain(args.to_command_line()).collect()));
        }
        let mut fleet = Fleet {
            procs: Vec::new(),
            commands,
            workers: workers.iter().map(|w| w.id.clone()).collect(),
            endpoints: endpoints.clone(),
            bin,
            log_dir: log_dir.to_path_buf(),
            restarts: 0,
        };
        for (name, args) in fleet.commands.clone() {
            let child = fleet.spawn(&name, &args, options.get(&name), &format!("{name}.log"))?;
            fleet.procs.push((name, child));
        }
        Ok(fleet)
    }

    fn spawn(
        &self,
        name: &str,
        args: &[String],
        options: Option<&ServiceOptions>,
        log_name: &str,
    ) -> Result<Child, FleetError> {
        let path = self.log_dir.join(log_name);
        let log = std::fs::File::create(&path).map_err(|source| FleetError::Log { path, source })?;
        let mut command = Command::new(&self.bin);
        command
            .args(args)
            .env("SUNDARA_NATS_URL", &self.endpoints.nats.url)
            .envs(self.endpoints.nats.tls.iter().flat_map(|t| t.env()))
            .env("SUNDARA_REDIS_URL", &self.endpoints.redis_url)
            .env("SUNDARA_SECRET", "benchmark-secret")
            .env("RUST_LOG", "warn,async_nats=error")
            // Eight processes share the machine's cores: one runtime thread each.
            .env("SUNDARA_RUNTIME_THREADS", "1");
        if let Some(o) = options {
            command.args(&o.args).envs(o.env.iter().map(|(k, v)| (k, v)));
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| FleetError::Start { name: name.to_string(), source })
    }

    /// Starts one more `sundara` process, `sundara <args>` (for example the HTTP gateway),
    /// under `name`: it is stopped, counted and checked with the rest of the fleet.
    pub fn add(&mut self, name: &str, args: Vec<String>) -> Result<u32, FleetError> {
        let child = self.spawn(name, &args, None, &format!("{name}.log"))?;
        let pid = child.id();
        self.commands.push((name.to_string(), args));
        self.procs.push((name.to_string(), child));
        Ok(pid)
    }

    /// Stops process `name` (SIGTERM, SIGKILL after `grace`) and starts it again with its
    /// base arguments plus `options` (for example ingress with another `--max-in-flight`).
    /// Its log goes to `<name>.<n>.log`. Call [`Fleet::ready`] before using it.
    pub fn restart(&mut self, name: &str, options: &ServiceOptions, grace: Duration) -> Result<(), FleetError> {
        let i = self.procs.iter().position(|(n, _)| n == name).ok_or_else(|| FleetError::Unknown(name.to_string()))?;
        terminate(&mut self.procs[i].1, grace);
        self.restarts += 1;
        let args = self.commands[i].1.clone();
        let child = self.spawn(name, &args, Some(options), &format!("{name}.{}.log", self.restarts))?;
        self.procs[i].1 = child;
        Ok(())
    }

    /// The workers' ids.
    pub fn workers(&self) -> &[String] {
        &self.workers
    }

    /// `(name, pid)` of every process, for CPU accounting.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.iter().map(|(n, c)| (n.clone(), c.id())).collect()
    }

    /// Waits until ingress answers and every worker has announced itself (polled: readiness
    /// of other processes has no event to wait on).
    pub async fn ready(&mut self, nats: &async_nats::Client, within: Duration) -> Result<(), FleetError> {
        let capacity = Capacity::connect(&self.endpoints.redis_url).await?;
        let deadline = Instant::now() + within;
        loop {
            for (name, child) in &mut self.procs {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(FleetError::Exited { name: name.clone(), status });
                }
            }
            let workers: Vec<&str> = self.workers.iter().map(String::as_str).collect();
            if sundara::pipeline::serving(nats, &capacity, &workers).await? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(FleetError::NotReady(within));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM to every process, then SIGKILL for any still running after `grace`.
    pub fn stop(mut self, grace: Duration) {
        for (_, child) in &self.procs {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        }
        let deadline = Instant::now() + grace;
        for (_, child) in &mut self.procs {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.procs.clear();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM to `child`, then SIGKILL if it still runs after `grace`; reaps it.
fn terminate(child: &mut Child, grace: Duration) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`), or `None`
/// if it has exited.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Messages nats-server has received and sent so far (`in_msgs`, `out_msgs` of `/varz`).
pub fn nats_message_counts(monitor_port: u16) -> Option<(u64, u64)> {
    let varz = nats_monitor(monitor_port, "/varz")?;
    Some((varz["in_msgs"].as_u64()?, varz["out_msgs"].as_u64()?))
}

/// Messages nats-server has exchanged so far with each client, summed by connection name
/// (`in_msgs` + `out_msgs` of `/connz`): which service sends and receives how many.
pub fn nats_messages_by_client(monitor_port: u16) -> Option<std::collections::BTreeMap<String, u64>> {
    let connz = nats_monitor(monitor_port, "/connz?limit=4096")?;
    let mut by = std::collections::BTreeMap::new();
    for c in connz["connections"].as_array()? {
        let name = c["name"].as_str().filter(|n| !n.is_empty()).unwrap_or("unnamed");
        // Per-process names carry an index or a key (miner-1, bench-client-3): one row per kind.
        let kind = name.trim_end_matches(|ch: char| ch.is_ascii_digit() || ch == '-');
        *by.entry(kind.to_string()).or_insert(0) += c["in_msgs"].as_u64()? + c["out_msgs"].as_u64()?;
    }
    Some(by)
}

/// One JetStream stream's state, from nats-server's `/jsz`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StreamState {
    pub name: String,
    pub messages: u64,
    pub bytes: u64,
    /// Distinct subjects held (nats-server keeps per-subject state in memory).
    pub subjects: u64,
}

/// Every stream's state (`/jsz?streams=true`).
pub fn nats_streams(monitor_port: u16) -> Option<Vec<StreamState>> {
    let jsz = nats_monitor(monitor_port, "/jsz?streams=true")?;
    let mut streams = Vec::new();
    for account in jsz["account_details"].as_array()? {
        for stream in account["stream_detail"].as_array().into_iter().flatten() {
            let state = &stream["state"];
            streams.push(StreamState {
                name: stream["name"].as_str().unwrap_or_default().to_string(),
                messages: state["messages"].as_u64().unwrap_or(0),
                bytes: state["bytes"].as_u64().unwrap_or(0),
                subjects: state["num_subjects"].as_u64().unwrap_or(0),
            });
        }
    }
    Some(streams)
}

/// Bytes JetStream stores on disk, all streams together (`/jsz`'s `storage`).
pub fn nats_store_bytes(monitor_port: u16) -> Option<u64> {
    nats_monitor(monitor_port, "/jsz")?["storage"].as_u64()
}

/// A JSON document from nats-server's monitoring port.
fn nats_monitor(monitor_port: u16, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", monitor_port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).ok()?;
    let body = &response[response.find("\r\n\r\n")? + 4..];
    serde_json::from_str(body).ok()
}

/// Keys in Redis' current database and the bytes its allocator holds (`DBSIZE`,
/// `used_memory` of `INFO memory`).
pub async fn redis_memory(redis_url: &str) -> Option<(u64, u64)> {
    let client = redis::Client::open(redis_url).ok()?;
    let mut con = client.get_multiplexed_async_connection().await.ok()?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut con).await.ok()?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut con).await.ok()?;
    let used = info.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())?;
    Some((keys, used))
}

/// Commands Redis has processed so far (`total_commands_processed` of `INFO stats`).
pub async fn redis_command_count(redis_url: &str) -> Option<u64> {
    let client = redis::Client::open(redis_url).ok()?;
    let mut con = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg("stats").query_async(&mut con).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("total_commands_processed:")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vm_rss() {
        let status = "Name:\tredis-server\nVmPeak:\t  9000 kB\nVmRSS:\t    7424 kB\nRssAnon:\t 1 kB\n";
        assert_eq!(parse_vm_rss(status), Some(7424 * 1024));
        assert_eq!(parse_vm_rss("Name:\tzombie\n"), None);
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
    }
}
