//! Inference threads. Each thread owns its sessions (ort's `run` takes `&mut self`), so
//! no lock is held around inference and the async runtime never blocks on it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sundara_runtime::Model;
use sundara_schemas::{Tensor, now_us};
use tokio::sync::oneshot;

/// What one inference produced and when it ran.
#[derive(Debug)]
pub struct Ran {
    pub outputs: Vec<Tensor>,
    /// Unix µs when inference started (after the wait in the queue).
    pub started_us: u64,
    pub compute_us: u64,
}

/// The run, or why the model could not run.
pub type JobResult = Result<Ran, String>;

struct Job {
    /// `name@version`: the session cache key.
    model: String,
    path: Arc<PathBuf>,
    inputs: Vec<Tensor>,
    reply: oneshot::Sender<JobResult>,
}

/// A pool of inference threads behind a bounded queue.
#[derive(Clone)]
pub struct Executor {
    jobs: flume::Sender<Job>,
}

impl Executor {
    /// Starts `threads` threads, each running sessions with `intra_threads` ORT threads.
    /// The queue holds at most `queue` jobs; callers wait for room beyond that.
    pub fn start(name: &str, threads: usize, intra_threads: usize, queue: usize) -> Executor {
        let (tx, rx) = flume::bounded::<Job>(queue.max(1));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-infer-{i}"))
                .spawn(move || infer_loop(rx, intra_threads))
                .expect("inference thread can be spawned");
        }
        Executor { jobs: tx }
    }

    /// Runs `inputs` through the model at `path`, loading it on this thread first if needed.
    pub async fn run(&self, model: String, path: Arc<PathBuf>, inputs: Vec<Tensor>) -> JobResult {
        let (reply, result) = oneshot::channel();
        self.jobs.send_async(Job { model, path, inputs, reply }).await.map_err(|_| "executor stopped".to_string())?;
        result.await.map_err(|_| "inference thread died".to_string())?
    }
}

fn infer_loop(jobs: flume::Receiver<Job>, intra_threads: usize) {
    let mut sessions: HashMap<String, Model> = HashMap::new();
    // Ends when every sender (the worker) is gone.
    while let Ok(job) = jobs.recv() {
        let result = run_one(&mut sessions, &job, intra_threads);
        let _ = job.reply.send(result);
    }
}

fn run_one(sessions: &mut HashMap<String, Model>, job: &Job, intra_threads: usize) -> JobResult {
    if !sessions.contains_key(&job.model) {
        let bytes = std::fs::read(job.path.as_ref()).map_err(|e| format!("reading {}: {e}", job.path.display()))?;
        let model = Model::load(&bytes, intra_threads).map_err(|e| e.to_string())?;
        sessions.insert(job.model.clone(), model);
    }
    let model = sessions.get_mut(&job.model).expect("inserted above");
    let started_us = now_us();
    let started = Instant::now();
    let outputs = model.run(&job.inputs).map_err(|e| e.to_string())?;
    Ok(Ran { outputs, started_us, compute_us: started.elapsed().as_micros() as u64 })
}
