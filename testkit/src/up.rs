//! `sundara up` as a process of a test: started with no connection settings of this
//! environment but the context file it is given, read line by line, and stopped with
//! SIGINT (so it stops its own servers) when the test ends.

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sundara::stack::project_root;

/// The `sundara` binary with no connection settings of this environment: what a test runs
/// is what it sets (`context`: where it finds a running `up`, if anywhere).
pub fn sundara(mut cmd: Command, context: &Path) -> Command {
    cmd.current_dir(project_root())
        .env("SUNDARA_CONTEXT", context)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for var in ["SUNDARA_NATS_URL", "SUNDARA_NATS_CREDS", "SUNDARA_NATS_CA", "SUNDARA_NATS_CERT", "SUNDARA_NATS_KEY"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Stops a child on drop (a failed test leaves nothing running): SIGINT first, so that
/// `up` stops its own nats-server and redis-server (a SIGKILLed `up` leaves them running),
/// then SIGKILL if it has not exited within 30 s.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sundara up <args>` with its context at `context`, once it has printed a line starting
/// with `until` (within 180 s); returns it and every line it printed up to then.
pub fn start(context: &Path, args: &[&str], until: &str) -> (Running, Vec<String>) {
    let mut up = sundara(Command::new(super::sundara_binary()), context)
        .arg("up")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sundara up runs");
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let up = Running(up);
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let mut said = Vec::new();
    while !said.iter().any(|l: &String| l.trim_start().starts_with(until)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => said.push(line),
            Err(_) => panic!("up did not say {until:?}: {said:#?}"),
        }
    }
    (up, said)
}
