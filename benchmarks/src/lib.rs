//! Shared pieces of Sundara's benchmarks: latency summaries, CPU accounting from `/proc`,
//! and the JSON record every benchmark binary prints.

pub mod baseline;
pub mod client;
pub mod cpu;
pub mod embeddings;
pub mod fleet;
pub mod http;
pub mod load;
pub mod pipeline;
pub mod stats;

pub use stats::Summary;

/// Opens the JSON-lines results file `--out` for appending (created if missing), if given.
pub fn open_results(path: Option<&std::path::Path>) -> std::io::Result<Option<std::fs::File>> {
    path.map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)).transpose()
}

/// Bytes in MiB, as the benchmarks print memory.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Awaits `f` for at most `limit`; past it, an error naming `what`.
pub async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    f: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .map_err(|_| anyhow::anyhow!("{what}: timed out after {} s", limit.as_secs()))?
}
