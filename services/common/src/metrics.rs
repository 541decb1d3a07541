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
}
