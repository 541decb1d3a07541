//! What every Sundara service shares: connections, stream provisioning, the model registry,
//! the Redis capacity store, shutdown, logs and traces.

pub mod admission;
pub mod capacity;
pub mod gateway;
pub mod metrics;
pub mod model_cache;
pub mod nats;
pub mod registry;
pub mod telemetry;

pub use capacity::Capacity;
pub use model_cache::ModelCache;
pub use registry::Registry;
pub use telemetry::{LogFormat, init_logging};
/// Cancelled to ask a service to stop; every `run(config, shutdown)` takes one.
pub use tokio_util::sync::CancellationToken as Shutdown;

/// Where the validator side's servers are.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub nats: nats::NatsEndpoint,
    pub redis_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to NATS at {url}: {reason} (is nats-server running? `sundara up` starts one)")]
    NatsConnect { url: String, reason: String },
    #[error("NATS credentials {path}: {reason}")]
    NatsCredentials { path: std::path::PathBuf, reason: String },
    #[error("JetStream: {0}")]
    JetStream(String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("model registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Decode(#[from] sundara_schemas::DecodeError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("OTLP trace export: {0}")]
    Telemetry(String),
}

/// Maps any JetStream client error into [`Error::JetStream`].
pub fn js_err<E: std::fmt::Display>(e: E) -> Error {
    Error::JetStream(e.to_string())
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn termination_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
