//! What every Sundara service shares: connections, stream provisioning, the model registry,
//! the Redis capacity store, shutdown, logs and traces.

pub mod admission;
pub mod capacity;
pub mod gateway;
pub mod jetstream_error;
pub mod metagraph;
pub mod metrics;
pub mod model_cache;
pub mod nats;
pub mod registry;
pub mod retry;
pub mod telemetry;
pub mod tls;
pub mod validator_key;

pub use capacity::Capacity;
pub use jetstream_error::{JetStreamError, JetStreamErrorKind};
pub use model_cache::ModelCache;
pub use registry::Registry;
pub use telemetry::{LogFormat, init_logging};
/// Cancelled to ask a service to stop; every `run(config, shutdown)` takes one.
pub use tokio_util::sync::CancellationToken as Shutdown;

/// Where the validator side's servers are.
#[derive(Clone)]
pub struct Endpoints {
    pub nats: nats::NatsEndpoint,
    /// `redis://[user:password@]host:port/` (`rediss://` for TLS): the password never
    /// shows in `Debug` output.
    pub redis_url: String,
    /// The CA certificate (PEM) a `rediss://` server's certificate must be signed by: the
    /// only one trusted. `None`: the system's roots.
    pub redis_ca: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("nats", &self.nats)
            .field("redis_url", &redacted(&self.redis_url))
            .field("redis_ca", &self.redis_ca)
            .finish()
    }
}

/// A URL with the password of its user info, if any, replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let Some((userinfo, host)) = rest.split_once('@') else { return url.to_string() };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Whether `url` carries a password in its user info (`redis://user:password@host/`).
pub fn has_password(url: &str) -> bool {
    redacted(url) != url
}

/// `url` with `password` as its user's password (`redis://user@host/` →
/// `redis://user:password@host/`; no user: the default one), percent-encoded.
pub fn with_password(url: &str, password: &str) -> String {
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (user, host) = match rest.split_once('@') {
        Some((userinfo, host)) => (userinfo.split_once(':').map_or(userinfo, |(u, _)| u), host),
        None => ("", rest),
    };
    format!("{scheme}://{user}:{encoded}@{host}")
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to NATS at {url}: {reason} (is nats-server running? `sundara up` starts one)")]
    NatsConnect { url: String, reason: String },
    #[error("NATS credentials {path}: {reason}")]
    NatsCredentials { path: std::path::PathBuf, reason: String },
    /// A TLS file (`--nats-ca`, `--nats-cert`, `--nats-key`) cannot be used.
    #[error(transparent)]
    NatsTlsFiles(#[from] tls::TlsError),
    /// The TLS handshake with NATS failed: the server's certificate is not signed by the
    /// pinned CA (or none was pinned), or the server wanted a client certificate it did not
    /// get or did not trust, or the server does not speak TLS.
    #[error(
        "TLS with NATS at {url} failed: {failure}: {reason} (pin the server's CA with --nats-ca; a server with \
         mutual TLS also needs --nats-cert/--nats-key signed by a CA it trusts)"
    )]
    NatsTls { url: String, failure: tls::TlsFailure, reason: String },
    /// The server is there but refused the connection's user (or that it had none).
    #[error(
        "NATS at {url} refused {}: authorization violation ({})",
        .credentials.as_ref().map_or("a connection without credentials".to_string(), |p| format!("the credentials {}", p.display())),
        if .credentials.is_some() {
            "not a user of this server? `sundara auth add` adds users to a running `sundara up`"
        } else {
            "connect with --nats-creds <seed file>; a running `sundara up` prints where its seeds are and is found through its context"
        }
    )]
    NatsRefused { url: String, credentials: Option<std::path::PathBuf> },
    /// The validator's auth callout refused a miner's hotkey.
    #[error(
        "NATS at {url} refused hotkey {hotkey}: a validator lets in only hotkeys registered on its subnet, \
         joining for its own hotkey ({validator} here; --validator-hotkey) with a clock within seconds of its own"
    )]
    NatsHotkeyRefused { url: String, hotkey: String, validator: String },
    /// The server refused this user `operation` on `subject` (a permissions violation).
    #[error("not permitted: these NATS credentials may not {operation} {subject}")]
    PermissionDenied { operation: nats::Operation, subject: String },
    /// A JetStream operation failed; callers decide on its [`JetStreamError::kind`].
    #[error("JetStream: {0}")]
    JetStream(#[from] JetStreamError),
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

/// Maps a JetStream client error into [`Error::JetStream`], keeping it (as the source) and
/// what kind of failure it is (see [`JetStreamError`]).
pub fn js_err<E: Into<JetStreamError>>(e: E) -> Error {
    Error::JetStream(e.into())
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

/// How long a service may take to stop once asked (see [`stop_within`]).
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs a service's future to its end; once `shutdown` is cancelled it has at most `grace`
/// more to finish what it holds (store outcomes, ack, flush), and is then dropped. So a
/// service stops in bounded time whatever the network does: with the NATS server down,
/// flushes and acks wait for it to come back. What it held un-acked is delivered again
/// by JetStream, and its assignments are reassigned.
pub async fn stop_within<E>(
    service: &str,
    shutdown: &Shutdown,
    grace: std::time::Duration,
    run: impl Future<Output = Result<(), E>>,
) -> Result<(), E> {
    tokio::pin!(run);
    tokio::select! {
        done = &mut run => return done,
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(grace, run).await {
        Ok(done) => done,
        Err(_) => {
            tracing::warn!(service, ?grace, "not stopped within its grace (is NATS reachable?); stopping anyway");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{has_password, with_password};

    #[test]
    fn a_password_is_put_into_a_redis_url_encoded() {
        assert_eq!(with_password("redis://sundara@h:6379/", "p@ss:w/rd"), "redis://sundara:p%40ss%3Aw%2Frd@h:6379/");
        assert_eq!(with_password("rediss://h:6380/", "pw"), "rediss://:pw@h:6380/");
        assert_eq!(with_password("redis://u:old@h/", "new"), "redis://u:new@h/");
        assert!(has_password("redis://u:pw@h/") && !has_password("redis://u@h/") && !has_password("redis://h/"));
    }

    #[test]
    fn a_redis_password_never_shows_in_debug_output() {
        let e = super::Endpoints {
            nats: super::nats::NatsEndpoint::open("tls://127.0.0.1:4222"),
            redis_url: "redis://sundara:hunter2hunter2@127.0.0.1:6379/".into(),
            redis_ca: None,
        };
        let shown = format!("{e:?}");
        assert!(!shown.contains("hunter2") && shown.contains("redis://sundara:***@127.0.0.1:6379/"), "{shown}");
        assert_eq!(super::redacted("redis://127.0.0.1:6379/"), "redis://127.0.0.1:6379/");
    }
}
