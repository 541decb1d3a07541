//! Load drivers: closed loop (C requests in flight, each waits for its answer) and open
//! loop (requests sent on a fixed schedule, whatever the answers do). The request itself
//! is a closure, so the same driver measures the pipeline and the baselines.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::stats::Summary;

/// Stage names of the pipeline breakdown, in the order a task passes them.
pub const STAGES: [&str; 8] =
    ["ingress", "capacity_wait", "dispatch", "worker_queue", "inference", "outcome", "verification", "delivery"];

/// What one request reports besides its latency: the pipeline's stage durations (µs).
pub type Stages = Option<[u64; 8]>;

#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    Closed { concurrency: usize },
    Open { rate: f64 },
}

#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
    /// After the window, how long outstanding requests may take to finish.
    pub drain: Duration,
}

/// The outcome of one measured run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunStats {
    pub duration_s: f64,
    pub completed: usize,
    pub errors: usize,
    /// Open loop only: sends that could not start because `max_in_flight` were outstanding.
    pub dropped: usize,
    pub tasks_per_s: f64,
    pub latency: Summary,
    /// p50 per stage (ms), when the requests report stages.
    pub stages_p50_ms: Vec<(String, f64)>,
    pub stages_mean_ms: Vec<(String, f64)>,
    pub first_error: Option<String>,
    /// Requests that succeeded over the whole run, warm-up and drain included (to divide
    /// server-side counters by).
    pub total_ok: u64,
}

#[derive(Default)]
struct Collector {
    latencies_us: Vec<u64>,
    stages: Vec<[u64; 8]>,
    errors: usize,
    first_error: Option<String>,
}

impl Collector {
    fn record(&mut self, latency_us: u64, result: Result<Stages, String>) {
        match result {
            Ok(stages) => {
                self.latencies_us.push(latency_us);
                if let Some(s) = stages {
                    self.stages.push(s);
                }
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    fn finish(mut self, duration: Duration, dropped: usize) -> RunStats {
        let completed = self.latencies_us.len();
        let mut stages_p50_ms = Vec::new();
        let mut stages_mean_ms = Vec::new();
        if !self.stages.is_empty() {
            for (i, name) in STAGES.iter().enumerate() {
                let mut column: Vec<u64> = self.stages.iter().map(|s| s[i]).collect();
                let summary = Summary::from_micros(&mut column);
                stages_p50_ms.push((name.to_string(), summary.p50_ms));
                stages_mean_ms.push((name.to_string(), summary.mean_ms));
            }
        }
        RunStats {
            duration_s: duration.as_secs_f64(),
            completed,
            errors: self.errors,
            dropped,
            tasks_per_s: completed as f64 / duration.as_secs_f64(),
            latency: Summary::from_micros(&mut self.latencies_us),
            stages_p50_ms,
            stages_mean_ms,
            first_error: self.first_error,
            total_ok: 0,
        }
    }
}

/// Shared state of a run: the measurement window and what fell in it.
struct Run {
    started: Instant,
    window: Window,
    stop: AtomicBool,
    total_ok: std::sync::atomic::AtomicU64,
    collector: std::sync::Mutex<Collector>,
}

impl Run {
    fn new(window: Window) -> Arc<Run> {
        Arc::new(Run {
            started: Instant::now(),
            window,
            stop: AtomicBool::new(false),
            total_ok: Default::default(),
            collector: Default::default(),
        })
    }

    fn window_end(&self) -> Instant {
        self.started + self.window.warmup + self.window.measure
    }

    /// Records a request that completed at `done`, if it falls in the measured window.
    fn record(&self, sent: Instant, done: Instant, result: Result<Stages, String>) {
        if result.is_ok() {
            self.total_ok.fetch_add(1, Ordering::Relaxed);
        }
        if sent >= self.started + self.window.warmup && done <= self.window_end() {
            let latency_us = done.duration_since(sent).as_micros() as u64;
            self.collector.lock().expect("collector lock").record(latency_us, result);
        }
    }

    fn finish(&self, dropped: usize) -> RunStats {
        let mut stats =
            std::mem::take(&mut *self.collector.lock().expect("collector lock")).finish(self.window.measure, dropped);
        stats.total_ok = self.total_ok.load(Ordering::Relaxed);
        stats
    }
}

/// Runs `op` in a closed loop with `concurrency` requests in flight.
pub async fn closed_loop<F, Fut>(concurrency: usize, window: Window, op: F) -> RunStats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Stages, String>> + Send + 'static,
{
    let run = Run::new(window);
    let op = Arc::new(op);
    let mut loops = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let (run, op) = (run.clone(), op.clone());
        loops.spawn(async move {
            let mut n = c as u64;
            while !run.stop.load(Ordering::Relaxed) && Instant::now() < run.window_end() {
                let sent = Instant::now();
                let result = op(n).await;
                run.record(sent, Instant::now(), result);
                n += concurrency as u64;
            }
        });
    }
    tokio::time::sleep_until((run.window_end()).into()).await;
    run.stop.store(true, Ordering::Relaxed);
    // Outstanding requests finish (their results fall outside the window) or are abandoned.
    let _ = tokio::time::timeout(window.drain, async { while loops.join_next().await.is_some() {} }).await;
    loops.abort_all();
    run.finish(0)
}

/// Sends `op` at `rate` per second on a fixed schedule; latency counts from the scheduled
/// send time, so a stalled system cannot hide its queueing (no coordinated omission).
pub async fn open_loop<F, Fut>(rate: f64, max_in_flight: usize, window: Window, op: F) -> RunStats
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Stages, String>> + Send + 'static,
{
    let run = Run::new(window);
    let op = Arc::new(op);
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let mut dropped = 0;
    let mut n = 0u64;
    loop {
        let scheduled = run.started + interval.mul_f64(n as f64);
        if scheduled >= run.window_end() {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        match in_flight.clone().try_acquire_owned() {
            Ok(permit) => {
                let (run, op) = (run.clone(), op.clone());
                tasks.spawn(async move {
                    let result = op(n).await;
                    run.record(scheduled, Instant::now(), result);
                    drop(permit);
                });
            }
            Err(_) => {
                if scheduled >= run.started + window.warmup {
                    dropped += 1;
                }
            }
        }
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
        n += 1;
    }
    let _ = tokio::time::timeout(window.drain, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    run.finish(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(ms: u64) -> Window {
        Window {
            warmup: Duration::from_millis(20),
            measure: Duration::from_millis(ms),
            drain: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn closed_loop_counts_completions_and_errors() {
        let stats = closed_loop(4, window(200), |n| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if n % 10 == 0 { Err(format!("request {n} failed")) } else { Ok(Some([1000; 8])) }
        })
        .await;
        assert!(stats.completed > 50, "{stats:?}");
        assert!(stats.errors > 0);
        assert!(stats.first_error.as_deref().is_some_and(|e| e.ends_with("failed")));
        // Four in flight, 5 ms each: at most 4 per 5 ms.
        assert!(stats.tasks_per_s <= 4.0 * 200.0 * 1.1, "{stats:?}");
        assert!(stats.latency.p50_ms >= 5.0);
        assert_eq!(stats.stages_p50_ms.len(), STAGES.len());
        assert_eq!(stats.stages_p50_ms[0].1, 1.0);
    }

    #[tokio::test]
    async fn open_loop_drops_what_it_cannot_start_and_counts_queueing() {
        // 1000/s offered, one in flight at a time, each taking 10 ms: most sends are dropped.
        let stats = open_loop(1000.0, 1, window(200), |_| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Ok(None)
        })
        .await;
        assert!(stats.dropped > 100, "{stats:?}");
        assert!(stats.completed < 40, "{stats:?}");
        assert!(stats.stages_p50_ms.is_empty());
    }
}
