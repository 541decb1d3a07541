//! The pipeline under test as separate processes (one per service and worker, as in a
//! deployment), so that each one's CPU use can be read from `/proc`.

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

pub struct Fleet {
    procs: Vec<(String, Child)>,
    workers: Vec<String>,
    endpoints: Endpoints,
}

/// The `sundara` binary built beside the running benchmark binary.
pub fn sundara_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name("sundara");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("{} not found: build it with `cargo build --release`", bin.display()))
    }
}

impl Fleet {
    /// Starts ingress, scheduler, verifier and rewarder, and the workers (each its own
    /// operator). Service logs go to `log_dir`.
    pub fn start(
        endpoints: &Endpoints,
        workers: &[WorkerSpec],
        cache_dir: &Path,
        log_dir: &Path,
    ) -> Result<Fleet, String> {
        let bin = sundara_binary()?;
        let mut commands: Vec<(String, Vec<String>)> = ["ingress", "scheduler", "verifier", "rewarder"]
            .iter()
            .map(|s| (s.to_string(), vec![s.to_string()]))
            .collect();
        for w in workers {
            let args = ["worker", "--id", &w.id, "--threads", &w.threads.to_string(), "--cache-dir"]
                .iter()
                .map(|s| s.to_string())
                .chain([cache_dir.display().to_string()])
                .collect();
            commands.push((w.id.clone(), args));
        }
        let mut fleet = Fleet {
            procs: Vec::new(),
            workers: workers.iter().map(|w| w.id.clone()).collect(),
            endpoints: endpoints.clone(),
        };
        for (name, args) in commands {
            let log = std::fs::File::create(log_dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
            let child = Command::new(&bin)
                .args(&args)
                .env("SUNDARA_NATS_URL", &endpoints.nats.url)
                .env("SUNDARA_REDIS_URL", &endpoints.redis_url)
                .env("SUNDARA_SECRET", "benchmark-secret")
                .env("RUST_LOG", "warn,async_nats=error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting {name}: {e}"))?;
            fleet.procs.push((name, child));
        }
        Ok(fleet)
    }

    /// `(name, pid)` of every process, for CPU accounting.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs.iter().map(|(n, c)| (n.clone(), c.id())).collect()
    }

    /// Waits until ingress answers and every worker has announced itself (polled: readiness
    /// of other processes has no event to wait on).
    pub async fn ready(&mut self, nats: &async_nats::Client, within: Duration) -> Result<(), String> {
        let capacity = Capacity::connect(&self.endpoints.redis_url).await.map_err(|e| e.to_string())?;
        let deadline = Instant::now() + within;
        loop {
            for (name, child) in &mut self.procs {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("{name} exited during start-up ({status})"));
                }
            }
            let workers: Vec<&str> = self.workers.iter().map(String::as_str).collect();
            if sundara::pipeline::serving(nats, &capacity, &workers).await? {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("fleet not ready within {within:?}"));
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

/// Messages nats-server has received and sent so far (`in_msgs`, `out_msgs` of `/varz`).
pub fn nats_message_counts(monitor_port: u16) -> Option<(u64, u64)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", monitor_port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(conn, "GET /varz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    conn.read_to_string(&mut response).ok()?;
    let body = &response[response.find("\r\n\r\n")? + 4..];
    let varz: serde_json::Value = serde_json::from_str(body).ok()?;
    Some((varz["in_msgs"].as_u64()?, varz["out_msgs"].as_u64()?))
}

/// Commands Redis has processed so far (`total_commands_processed` of `INFO stats`).
pub async fn redis_command_count(redis_url: &str) -> Option<u64> {
    let client = redis::Client::open(redis_url).ok()?;
    let mut con = client.get_multiplexed_async_connection().await.ok()?;
    let info: String = redis::cmd("INFO").arg("stats").query_async(&mut con).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("total_commands_processed:")?.trim().parse().ok())
}
