//! Baselines measured in the same run as the pipeline: `ort` in-process (the compute
//! ceiling) and a bare NATS request/reply responder running `ort` (transport plus compute).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sundara_runtime::Model;
use sundara_schemas::{Tensor, encode};
use sundara_worker::{Executor, ExecutorConfig, ModelRun};

use crate::client::RESPONDER_SUBJECT;
use crate::load::{RunStats, Window};
use crate::stats::Summary;

/// Why a baseline could not run.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("{}: {source}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Runtime(#[from] sundara_runtime::RuntimeError),
    #[error("inference thread panicked")]
    Panicked,
    #[error("{0}")]
    Request(String),
    #[error("NATS: {0}")]
    Nats(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl BaselineError {
    fn nats(e: impl std::error::Error + Send + Sync + 'static) -> BaselineError {
        BaselineError::Nats(Box::new(e))
    }
}

/// `threads` threads, each with its own session (one intra-op thread), run `inputs`
/// back to back for the window. Nothing else runs: this is what the cores can compute.
pub fn ort_in_process(
    model: &Path,
    threads: usize,
    inputs: &[Vec<Tensor>],
    window: Window,
) -> Result<RunStats, BaselineError> {
    let inputs = Arc::new(inputs.to_vec());
    ort_in_process_with(model, threads, window, move |session, n| {
        session.run(&inputs[n % inputs.len()])?;
        Ok(())
    })
}

/// [`ort_in_process`] with what one request is given by `request(session, n)`: request
/// `n` (thread `t` of `threads` runs `t`, `t + threads`, ...), timed from its start, the
/// work it does before its inference (a tokenizer's, say) included.
pub fn ort_in_process_with<F>(
    model: &Path,
    threads: usize,
    window: Window,
    request: F,
) -> Result<RunStats, BaselineError>
where
    F: Fn(&mut Model, usize) -> Result<(), BaselineError> + Send + Sync + 'static,
{
    let bytes = std::fs::read(model).map_err(|source| BaselineError::Read { path: model.to_path_buf(), source })?;
    let bytes = Arc::new(bytes);
    let request = Arc::new(request);
    let start = Instant::now() + Duration::from_millis(200);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (bytes, request) = (bytes.clone(), request.clone());
            std::thread::spawn(move || -> Result<Vec<u64>, BaselineError> {
                let mut session = Model::load(&bytes, 1)?;
                let measure_from = start + window.warmup;
                let end = measure_from + window.measure;
                let mut latencies = Vec::new();
                let mut n = t;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    request(&mut session, n)?;
                    let done = Instant::now();
                    if sent >= measure_from && done <= end {
                        latencies.push(done.duration_since(sent).as_micros() as u64);
                    }
                    n += threads;
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.join().map_err(|_| BaselineError::Panicked)??);
    }
    Ok(RunStats {
        duration_s: window.measure.as_secs_f64(),
        completed: all.len(),
        tasks_per_s: all.len() as f64 / window.measure.as_secs_f64(),
        latency: Summary::from_micros(&mut all),
        ..Default::default()
    })
}

/// Serves [`RESPONDER_SUBJECT`]: decodes the input tensors, runs them on the worker's own
/// executor (`threads` inference threads) and replies with the outputs. Runs until the
/// connection closes.
pub async fn serve_responder(
    nats: &sundara_common::nats::NatsEndpoint,
    model: PathBuf,
    threads: usize,
) -> Result<(), BaselineError> {
    let nats = sundara_common::nats::connect(nats, "bench-responder").await.map_err(BaselineError::nats)?;
    let mut requests = nats.subscribe(RESPONDER_SUBJECT).await.map_err(BaselineError::nats)?;
    nats.flush().await.map_err(BaselineError::nats)?;
    let mut config = ExecutorConfig::cpu(threads, sundara_worker::default_cpu_memory(1), threads * 4);
    config.max_batch = 1;
    let executor = Executor::start("responder", config);
    let model = ModelRun::new("model", Arc::new(model));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(threads * 4));
    while let Some(msg) = requests.next().await {
        let Some(reply) = msg.reply.clone() else { continue };
        let permit = in_flight.clone().acquire_owned().await.map_err(BaselineError::nats)?;
        let (nats, executor, model) = (nats.clone(), executor.clone(), model.clone());
        tokio::spawn(async move {
            let answer: Result<Vec<Tensor>, String> = match rmp_serde::from_slice::<Vec<Tensor>>(&msg.payload) {
                Ok(inputs) => executor.run(&model, inputs).await.map(|ran| ran.outputs).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let _ = nats.publish(reply, encode(&answer).into()).await;
            drop(permit);
        });
    }
    Ok(())
}
