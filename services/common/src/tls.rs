//! TLS on NATS connections: the CA a client pins (never the system's roots) and, for a
//! server that asks for one (mutual TLS, as for miners), the client's certificate.
//! `sundara tls init` makes a development CA and certificates (docs/deployment.md, "TLS").

use std::path::{Path, PathBuf};

/// Why a TLS file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("NATS TLS {what} {path}: {reason}")]
    Unreadable { what: &'static str, path: PathBuf, reason: String },
    #[error("NATS TLS {what} {path} holds no PEM {expected}")]
    NotPem { what: &'static str, path: PathBuf, expected: &'static str },
}

/// A client's TLS settings for NATS: the CA the server's certificate must chain to, and the
/// client certificate with its key where the server verifies clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsTls {
    /// PEM file of the CA (or CAs) trusted for the server's certificate; the only roots.
    pub ca: PathBuf,
    /// PEM certificate and PEM private key presented to a server that asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl NatsTls {
    /// Trusting only `ca`, without a client certificate.
    pub fn pinned(ca: impl Into<PathBuf>) -> NatsTls {
        NatsTls { ca: ca.into(), client_cert: None }
    }

    /// With `cert` and `key` presented to the server (mutual TLS).
    pub fn with_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> NatsTls {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Checks that every file is readable PEM of the right kind, so that a wrong path fails
    /// here by name rather than as a handshake error.
    pub fn check(&self) -> Result<(), TlsError> {
        check_pem("CA", &self.ca, "CERTIFICATE")?;
        if let Some((cert, key)) = &self.client_cert {
            check_pem("client certificate", cert, "CERTIFICATE")?;
            check_pem("client key", key, "PRIVATE KEY")?;
        }
        Ok(())
    }

    /// `options` with TLS required, the CA pinned and the client certificate (if any) added.
    pub fn apply(&self, options: async_nats::ConnectOptions) -> Result<async_nats::ConnectOptions, TlsError> {
        self.check()?;
        let mut options = options.require_tls(true).add_root_certificates(self.ca.clone());
        if let Some((cert, key)) = &self.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }

    /// The environment variables that give a `sundara` process these settings
    /// (`SUNDARA_NATS_CA`, and `SUNDARA_NATS_CERT`/`SUNDARA_NATS_KEY` with a client certificate).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut vars = vec![(ENV_CA.to_string(), self.ca.display().to_string())];
        if let Some((cert, key)) = &self.client_cert {
            vars.push((ENV_CERT.to_string(), cert.display().to_string()));
            vars.push((ENV_KEY.to_string(), key.display().to_string()));
        }
        vars
    }
}

/// Why a TLS connection to NATS failed, as the handshake said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// The server's certificate is not signed by a trusted CA (none pinned, or another),
    /// or is not for the host connected to.
    ServerNotTrusted,
    /// The server refused this client: it wants a client certificate (mutual TLS) and got
    /// none, or one it does not trust.
    ClientRefused,
    /// The client's own TLS setup failed (its files, the platform's roots).
    Setup,
    /// Another failure in the handshake (e.g. the server does not speak TLS).
    Handshake,
}

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsFailure::ServerNotTrusted => "the server's certificate is not signed by the pinned CA",
            TlsFailure::ClientRefused => "the server refused this client's certificate (or that it had none)",
            TlsFailure::Setup => "the TLS setup failed",
            TlsFailure::Handshake => "the TLS handshake failed",
        })
    }
}

/// Whether `error` (a failed connect) is a TLS failure, and which: from async-nats' error
/// kind and the rustls error it carries, never from text.
pub fn failure_of(error: &async_nats::ConnectError) -> Option<TlsFailure> {
    use async_nats::rustls::{AlertDescription, Error as Rustls};
    use std::error::Error as _;
    let rustls = error
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<Rustls>());
    match (error.kind(), rustls) {
        (_, Some(Rustls::InvalidCertificate(_))) => Some(TlsFailure::ServerNotTrusted),
        (
            _,
            Some(Rustls::AlertReceived(
                AlertDescription::CertificateRequired
                | AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied,
            )),
        ) => Some(TlsFailure::ClientRefused),
        (_, Some(_)) => Some(TlsFailure::Handshake),
        (async_nats::ConnectErrorKind::Tls, None) => Some(TlsFailure::Setup),
        _ => None,
    }
}

/// The CA a `sundara` process pins (`--nats-ca`).
pub const ENV_CA: &str = "SUNDARA_NATS_CA";
/// Its client certificate (`--nats-cert`).
pub const ENV_CERT: &str = "SUNDARA_NATS_CERT";
/// Its client key (`--nats-key`).
pub const ENV_KEY: &str = "SUNDARA_NATS_KEY";

fn check_pem(what: &'static str, path: &Path, expected: &'static str) -> Result<(), TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| TlsError::Unreadable {
        what,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    // `-----BEGIN CERTIFICATE-----`, `-----BEGIN PRIVATE KEY-----`, `… EC PRIVATE KEY…`, `… RSA PRIVATE KEY…`.
    let found =
        text.lines().any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{expected}-----")));
    if found { Ok(()) } else { Err(TlsError::NotPem { what, path: path.to_path_buf(), expected }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_checked_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(NatsTls::pinned(&ca).check().is_ok());
        assert!(NatsTls::pinned(&ca).with_client_cert(&ca, &key).check().is_ok());
        assert!(matches!(NatsTls::pinned(&key).check(), Err(TlsError::NotPem { what: "CA", .. })));
        let missing = NatsTls::pinned(dir.path().join("nope.pem"));
        assert!(matches!(missing.check(), Err(TlsError::Unreadable { what: "CA", .. })));
        let swapped = NatsTls::pinned(&ca).with_client_cert(&ca, &ca);
        assert!(matches!(swapped.check(), Err(TlsError::NotPem { what: "client key", .. })));
    }

    #[test]
    fn the_environment_carries_every_file() {
        let tls = NatsTls::pinned("/c/ca.pem").with_client_cert("/c/m.pem", "/c/m-key.pem");
        let names: Vec<_> = tls.env().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, [ENV_CA, ENV_CERT, ENV_KEY]);
    }
}
