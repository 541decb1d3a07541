//! Shared pieces of Sundara's benchmarks: latency summaries, CPU accounting from `/proc`,
//! and the JSON record every benchmark binary prints.

pub mod baseline;
pub mod client;
pub mod cpu;
pub mod fleet;
pub mod load;
pub mod stats;

pub use stats::Summary;
