//! Prometheus metrics. Services count through the `metrics` facade; one recorder per
//! process holds them (the embedded stack runs every service in one process), and with a
//! listen address it is served at `http://<addr>/metrics`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Error;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Buckets of every `*_seconds` histogram: 0.5 ms to 30 s, from a small model's inference
/// to a task that waited for capacity.
pub const SECONDS_BUCKETS: [f64; 15] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Buckets of `sundara_worker_batch_size`.
pub const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Histograms are exported as histograms with these buckets (the exporter's default would
/// be summaries, which cannot be aggregated across instances).
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("sundara_worker_batch_size".into()), &BATCH_BUCKETS)
}

/// What kind of series a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the services export, with its `# HELP` line. `docs/operations.md` lists
/// the same names with their labels (a test keeps the two in step).
pub const METRICS: &[(&str, Kind, &str)] = &[
    (
        "sundara_task_stage_seconds",
        Kind::Histogram,
        "Time of each stage of a verified task, from the fastest agreeing miner's timings.",
    ),
    ("sundara_ingress_accepted_total", Kind::Counter, "Tasks accepted (stored in TASKS)."),
    ("sundara_ingress_rejected_total", Kind::Counter, "Submissions refused, by the typed code the client got."),
    ("sundara_gateway_refused_total", Kind::Counter, "Worker reports the fleet gateway refused."),
    ("sundara_http_requests_total", Kind::Counter, "HTTP requests the gateway answered, by status."),
    ("sundara_http_request_seconds", Kind::Histogram, "Time the HTTP gateway took to answer a request."),
    ("sundara_http_waiting", Kind::Gauge, "HTTP requests waiting for their task's result."),
    ("sundara_jobs", Kind::Gauge, "Unfinished batch jobs the jobs service holds, by state."),
    ("sundara_job_shards", Kind::Gauge, "Shards of the unfinished jobs, by state (queued, running, verified)."),
    ("sundara_job_shards_total", Kind::Counter, "Shard tasks of jobs that ended, by how (verified, retried, failed)."),
    ("sundara_jobs_ended_total", Kind::Counter, "Jobs that ended, by their final state."),
    ("sundara_job_requests_total", Kind::Counter, "Requests the jobs service answered, by answer (ok, refused)."),
    (
        "sundara_job_output_cache_bytes",
        Kind::Gauge,
        "Bytes of verified shards' outputs the jobs service keeps in memory.",
    ),
    (
        "sundara_chain_joins_total",
        Kind::Counter,
        "Connections the auth callout answered, by outcome (allowed, refused).",
    ),
    (
        "sundara_chain_metagraph_age_seconds",
        Kind::Gauge,
        "Age of the metagraph the validator holds (since it was read).",
    ),
    ("sundara_chain_neurons", Kind::Gauge, "Neurons in the metagraph the validator holds."),
    ("sundara_chain_weights_total", Kind::Counter, "Weight settings sent to the chain, by the chain's answer."),
    (
        "sundara_queue_depth",
        Kind::Gauge,
        "Backlog per queue: tasks not yet taken, assignments queued, outcomes and verdicts not yet read.",
    ),
    ("sundara_fleet_workers", Kind::Gauge, "Workers known to Redis, by state."),
    ("sundara_fleet_slots", Kind::Gauge, "Slots of the serving slices of alive workers."),
    ("sundara_fleet_slots_in_use", Kind::Gauge, "Slots of alive workers reserved for assignments."),
    ("sundara_worker_slots", Kind::Gauge, "A worker's slots per slice."),
    ("sundara_worker_slots_in_use", Kind::Gauge, "Assignments a worker is running per slice."),
    ("sundara_worker_loaded_models", Kind::Gauge, "Models loaded on the slice."),
    ("sundara_worker_memory_used_bytes", Kind::Gauge, "Memory the slice's loaded models hold, in bytes."),
    ("sundara_worker_batch_size", Kind::Histogram, "Tasks per inference, counted per task."),
    ("sundara_worker_inference_seconds", Kind::Histogram, "Inference time of the batch each task ran in."),
    ("sundara_verifier_verdicts_total", Kind::Counter, "Decided tasks."),
    ("sundara_verifier_reference_runs_total", Kind::Counter, "The verifier's own runs, by what they showed."),
    (
        "sundara_verifier_reference_skipped_total",
        Kind::Counter,
        "Optional reference runs skipped because the verifier was busy.",
    ),
    ("sundara_verifier_rejected_total", Kind::Counter, "Rejected outcomes by what they looked like."),
    (
        "sundara_verifier_refused_outcomes_total",
        Kind::Counter,
        "Outcomes refused before judging (forged, duplicate or misaddressed).",
    ),
    ("sundara_rewarder_outcomes_total", Kind::Counter, "Each miner's standing in each scored task."),
    ("sundara_rewarder_epoch_weight", Kind::Gauge, "The miner's u16 weight at the last epoch close."),
    ("sundara_rewarder_epochs_total", Kind::Counter, "Epochs closed."),
    ("sundara_rewarder_proven_wrong_total", Kind::Counter, "Outcomes proven wrong by a reference run."),
    ("sundara_quarantines_total", Kind::Counter, "Miners quarantined."),
    ("sundara_scheduler_dispatched_total", Kind::Counter, "Tasks dispatched."),
    ("sundara_scheduler_waiting_tasks", Kind::Gauge, "Tasks waiting for capacity in this scheduler."),
    ("sundara_scheduler_expired_total", Kind::Counter, "Tasks expired before dispatch."),
    ("sundara_scheduler_timeout_strikes_total", Kind::Counter, "Assignments a live worker let time out."),
    ("sundara_scheduler_reassigned_total", Kind::Counter, "Replicas sent elsewhere."),
    ("sundara_scheduler_abandoned_total", Kind::Counter, "Replicas given up."),
    ("sundara_autoscaler_demand_lanes", Kind::Gauge, "Busy inference lanes the arriving tasks ask for."),
    ("sundara_autoscaler_target_workers", Kind::Gauge, "The pool size the autoscaler aims for."),
    ("sundara_autoscaler_model_copies", Kind::Gauge, "Loaded copies of each model in demand."),
    ("sundara_autoscaler_preloads_total", Kind::Counter, "Model copies preloaded."),
    ("sundara_autoscaler_replaced_total", Kind::Counter, "Workers replaced."),
];

/// Gives the installed recorder every metric's help text (`# HELP` lines).
fn describe_all() {
    for &(name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// Installs the process's recorder, serving it on `listen` if given. Later calls return
/// the same handle (and serve nothing more). Must run inside a Tokio runtime.
pub fn install(listen: Option<SocketAddr>) -> Result<PrometheusHandle, Error> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let metrics_err = |e: &dyn std::fmt::Display| Error::Metrics(e.to_string());
    let handle = match listen {
        Some(addr) => {
            let (recorder, exporter) = builder()
                .map_err(|e| metrics_err(&e))?
                .with_http_listener(addr)
                .build()
                .map_err(|e| metrics_err(&e))?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| metrics_err(&e))?;
            tokio::spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::warn!(error = ?e, "metrics endpoint stopped");
                }
            });
            tracing::info!(%addr, "metrics at http://{addr}/metrics");
            handle
        }
        None => builder().map_err(|e| metrics_err(&e))?.install_recorder().map_err(|e| metrics_err(&e))?,
    };
    describe_all();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Sum of a metric's samples in Prometheus text whose labels include every `(name, value)`
/// of `labels` (0 when there are none).
pub fn sum(rendered: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    rendered
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = name == metric && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_the_matching_series() {
        let text =
            "# TYPE x counter\nx{class=\"far\",model=\"m\"} 3\nx{class=\"late\",model=\"m\"} 2\nx_other 7\nx 1\n";
        assert_eq!(super::sum(text, "x", &[("class", "far")]), 3.0);
        assert_eq!(super::sum(text, "x", &[]), 6.0);
        assert_eq!(super::sum(text, "x", &[("model", "n")]), 0.0);
    }

    /// Every metric the code records is described, and docs/operations.md lists each.
    #[test]
    fn every_metric_has_help_and_docs() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let docs = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
        let described: std::collections::HashSet<&str> = super::METRICS.iter().map(|m| m.0).collect();
        for (name, _, help) in super::METRICS {
            assert!(docs.contains(&format!("`{name}`")), "{name} is not in docs/operations.md");
            assert!(help.ends_with('.'), "{name}: {help}");
        }
        let mut used = Vec::new();
        for dir in ["services", "schemas"] {
            collect_metric_names(&root.join(dir), &mut used);
        }
        assert!(used.len() > 20, "found {used:?}");
        for name in used {
            assert!(described.contains(name.as_str()), "{name} is recorded but has no help text in METRICS");
        }
    }

    fn collect_metric_names(dir: &std::path::Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                collect_metric_names(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                    for (i, _) in text.match_indices(macro_name) {
                        let rest = text[i + macro_name.len()..].trim_start();
                        if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                            && name.starts_with("sundara_")
                        {
                            out.push(name.to_string());
                        }
                    }
                }
            }
        }
    }
}
