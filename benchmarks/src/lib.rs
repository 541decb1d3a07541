//! Shared pieces of Sundara's benchmarks: latency summaries, CPU accounting from `/proc`,
//! and the JSON record every benchmark binary prints.

pub mod baseline;
pub mod client;
pub mod cpu;
pub mod fleet;
pub mod load;
pub mod stats;

pub use stats::Summary;

/// Opens the JSON-lines results file `--out` for appending (created if missing), if given.
pub fn open_results(path: Option<&std::path::Path>) -> std::io::Result<Option<std::fs::File>> {
    path.map(|p| std::fs::OpenOptions::new().create(true).append(true).open(p)).transpose()
}
