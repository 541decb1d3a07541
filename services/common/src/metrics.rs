//! Prometheus metrics. Services count through the `metrics` facade; one recorder per
//! process holds them (the embedded stack runs every service in one process), and with a
//! listen address it is served at `http://<addr>/metrics`.

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::Error;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process's recorder, serving it on `listen` if given. Later calls return
/// the same handle (and serve nothing more). Must run inside a Tokio runtime.
pub fn install(listen: Option<SocketAddr>) -> Result<PrometheusHandle, Error> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let metrics_err = |e: &dyn std::fmt::Display| Error::Metrics(e.to_string());
    let handle = match listen {
        Some(addr) => {
            let (recorder, exporter) =
                PrometheusBuilder::new().with_http_listener(addr).build().map_err(|e| metrics_err(&e))?;
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
        None => PrometheusBuilder::new().install_recorder().map_err(|e| metrics_err(&e))?,
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
