//! Inference threads. Each thread owns its sessions (ort's `run` takes `&mut self`), so
//! no lock is held around inference and the async runtime never blocks on it.
//!
//! Batching is opportunistic: a thread takes the next job, then whatever compatible jobs
//! for the same model are already queued (up to `max_batch`), and runs them as one batch.
//! Nothing waits for a batch to fill, so a lone task runs at once; under load the queue
//! fills while a batch runs, and the next batch is ready when the thread comes back.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use sundara_runtime::Model;

use crate::batch;
use sundara_schemas::{Tensor, now_us};
use tokio::sync::oneshot;

/// What one inference produced and when it ran.
#[derive(Debug)]
pub struct Ran {
    pub outputs: Vec<Tensor>,
    /// Unix µs when inference started (after the wait in the queue).
    pub started_us: u64,
    /// Time of the inference that produced these outputs (the whole batch's).
    pub compute_us: u64,
    /// Tasks in that inference.
    pub batch: usize,
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
    /// Starts `threads` threads, each running sessions with `intra_threads` ORT threads and
    /// batching up to `max_batch` tasks (1 turns batching off). The queue holds at most
    /// `queue` jobs; callers wait for room beyond that.
    pub fn start(name: &str, threads: usize, intra_threads: usize, max_batch: usize, queue: usize) -> Executor {
        let (tx, rx) = flume::bounded::<Job>(queue.max(1));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-infer-{i}"))
                .spawn(move || infer_loop(rx, intra_threads, max_batch.max(1)))
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

struct Session {
    model: Model,
    batchable: bool,
}

fn infer_loop(jobs: flume::Receiver<Job>, intra_threads: usize, max_batch: usize) {
    let mut sessions: HashMap<String, Session> = HashMap::new();
    // A job taken while gathering a batch that did not fit it; it starts the next one.
    let mut next: Option<Job> = None;
    // Ends when every sender (the worker) is gone.
    while let Some(first) = next.take().or_else(|| jobs.recv().ok()) {
        let session = match session(&mut sessions, &first, intra_threads) {
            Ok(s) => s,
            Err(e) => {
                let _ = first.reply.send(Err(e));
                continue;
            }
        };
        let mut group = vec![first];
        while session.batchable && group.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) if job.model == group[0].model && batch::compatible(&group[0].inputs, &job.inputs) => {
                    group.push(job)
                }
                Ok(job) => {
                    next = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        run_group(&mut session.model, group);
    }
}

fn session<'a>(
    sessions: &'a mut HashMap<String, Session>,
    job: &Job,
    intra_threads: usize,
) -> Result<&'a mut Session, String> {
    if !sessions.contains_key(&job.model) {
        let bytes = std::fs::read(job.path.as_ref()).map_err(|e| format!("reading {}: {e}", job.path.display()))?;
        let model = Model::load(&bytes, intra_threads).map_err(|e| e.to_string())?;
        let batchable = batch::batchable(&model.inputs, &model.outputs);
        sessions.insert(job.model.clone(), Session { model, batchable });
    }
    Ok(sessions.get_mut(&job.model).expect("inserted above"))
}

/// Runs `inputs` once, timed.
fn run_timed(model: &mut Model, inputs: &[Tensor]) -> Result<(Vec<Tensor>, u64, u64), String> {
    let started_us = now_us();
    let started = Instant::now();
    let outputs = model.run(inputs).map_err(|e| e.to_string())?;
    Ok((outputs, started_us, started.elapsed().as_micros() as u64))
}

/// Runs a group of jobs as one batch and answers each with its own rows. If the batch
/// fails (one task's inputs can spoil it), each job runs alone so that only its own
/// failure reaches it.
fn run_group(model: &mut Model, group: Vec<Job>) {
    if group.len() > 1 {
        let inputs: Vec<&[Tensor]> = group.iter().map(|j| j.inputs.as_slice()).collect();
        let rows: Option<Vec<u64>> = group.iter().map(|j| batch::rows(&j.inputs)).collect();
        let batched = rows.and_then(|rows| {
            let (outputs, started_us, compute_us) = run_timed(model, &batch::stack(&inputs)).ok()?;
            Some((batch::split(outputs, &rows)?, started_us, compute_us))
        });
        if let Some((per_job, started_us, compute_us)) = batched {
            let n = group.len();
            for (job, outputs) in group.into_iter().zip(per_job) {
                let _ = job.reply.send(Ok(Ran { outputs, started_us, compute_us, batch: n }));
            }
            return;
        }
    }
    for job in group {
        let result = run_timed(model, &job.inputs).map(|(outputs, started_us, compute_us)| Ran {
            outputs,
            started_us,
            compute_us,
            batch: 1,
        });
        let _ = job.reply.send(result);
    }
}
