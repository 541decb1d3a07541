//! Development certificates for TLS on NATS (`sundara tls init`, `sundara tls client`, and
//! the embedded stack's throwaway CA): a local CA, a server certificate it signs, and
//! client certificates it signs for mutual TLS. Keys are ECDSA P-256, written 0600.
//!
//! In a directory `D`: `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, and per
//! client `N`: `client-N.pem`, `client-N-key.pem`. A miner keeps its key to itself: it makes
//! the key and a signing request (`tls request`, `client-N.csr`) on its own host, and the
//! validator signs only the request's public key (`tls client --csr`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use sundara_common::tls::NatsTls;

#[derive(Debug, thiserror::Error)]
pub enum TlsInitError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path} already exists; pass --force to replace it (every certificate it signed stops being trusted)")]
    Exists { path: PathBuf },
    #[error("no CA in {dir} (ca.pem and ca-key.pem): create one with `sundara tls init --dir {dir}`")]
    NoCa { dir: PathBuf },
    #[error("{0:?} is not a valid client name (1-64 of [A-Za-z0-9_.-])")]
    InvalidName(String),
    #[error("{0:?} is not a valid host name or IP address for a certificate")]
    InvalidHost(String),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A signing request that does not parse, or whose signature is not by the key it holds.
    #[error("{path}: not a valid certificate signing request: {reason}")]
    BadRequest { path: PathBuf, reason: rcgen::Error },
}

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// The CA's subject. Fixed, so that `sundara tls client` can sign with a CA made earlier
/// from its key alone.
const CA_NAME: &str = "Sundara development CA";

/// The names every server certificate holds besides those given.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A directory of development certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join(SERVER_CERT)
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join(SERVER_KEY)
    }

    /// Client `name`'s certificate and key.
    pub fn client_files(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("client-{name}.pem")), self.dir.join(format!("client-{name}-key.pem")))
    }

    /// What a client pins: the CA only.
    pub fn client_tls(&self) -> NatsTls {
        NatsTls::pinned(self.ca())
    }

    /// nats-server's `tls` block for its client port: this server certificate, clients
    /// verified against the CA when `mutual` (each must present a certificate it signed).
    pub fn server_block(&self, mutual: bool) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: {mutual}\n  timeout: 5\n}}\n",
            self.server_cert(),
            self.server_key(),
            self.ca()
        )
    }
}

/// Creates a CA in `dir` and a server certificate it signs, for localhost, 127.0.0.1, ::1
/// and `hosts` (DNS names or IP addresses). Refuses to replace an existing CA unless `force`.
pub fn init(dir: &Path, hosts: &[String], force: bool) -> Result<DevPki, TlsInitError> {
    let pki = DevPki { dir: dir.to_path_buf() };
    if let Some(bad) = hosts.iter().find(|h| !valid_host(h)) {
        return Err(TlsInitError::InvalidHost(bad.clone()));
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for existing in [pki.ca(), dir.join(CA_KEY)] {
        if existing.exists() && !force {
            return Err(TlsInitError::Exists { path: existing });
        }
    }
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params().self_signed(&ca_key)?;
    write_file(&dir.join(CA_KEY), &ca_key.serialize_pem(), true)?;
    write_file(&pki.ca(), &ca_cert.pem(), false)?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|s| s.to_string()).collect();
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let mut server = CertificateParams::new(names)?;
    server.distinguished_name = named(hosts.first().map_or("localhost", String::as_str));
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    // ClientAuth too: a cluster's servers present the same certificate to each other on routes.
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &issuer)?;
    write_file(&pki.server_key(), &server_key.serialize_pem(), true)?;
    write_file(&pki.server_cert(), &server_cert.pem(), false)?;
    Ok(pki)
}

/// Signs a client certificate for `name` with the CA in `dir` (mutual TLS: a miner's
/// connection to a server that verifies clients), with a key made here: for a client on
/// the CA's own host. Refuses to replace one unless `force`.
pub fn client(dir: &Path, name: &str, force: bool) -> Result<NatsTls, TlsInitError> {
    let (pki, issuer, cert_path) = client_issuer(dir, name, force)?;
    let key = KeyPair::generate()?;
    let cert = client_params(name).signed_by(&key, &issuer)?;
    let (_, client_key_path) = pki.client_files(name);
    write_file(&client_key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(pki.client_tls().with_client_cert(cert_path, client_key_path))
}

/// The client's side of a certificate of its own key: makes the key (DIR/client-NAME-key.pem,
/// 0600) and a signing request for it (DIR/client-NAME.csr) to hand the validator, who
/// signs it with [`sign_request`]. Returns the request's path.
pub fn request(dir: &Path, name: &str, force: bool) -> Result<PathBuf, TlsInitError> {
    check_name(name)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let pki = DevPki { dir: dir.to_path_buf() };
    let (_, key_path) = pki.client_files(name);
    let request_path = dir.join(format!("client-{name}.csr"));
    if key_path.exists() && !force {
        return Err(TlsInitError::Exists { path: key_path });
    }
    let key = KeyPair::generate()?;
    let request = client_params(name).serialize_request(&key)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&request_path, &request.pem()?, false)?;
    Ok(request_path)
}

/// Signs the public key of the signing request at `request` as client `name`'s certificate
/// (DIR/client-NAME.pem) with the CA in `dir`. Only the key is taken from the request, once
/// its signature shows the requester holds it: the name, the validity and what the
/// certificate may do are the CA's (a request cannot ask for a server certificate or
/// another name). Returns the certificate's path.
pub fn sign_request(dir: &Path, name: &str, request: &Path, force: bool) -> Result<PathBuf, TlsInitError> {
    let (_, issuer, cert_path) = client_issuer(dir, name, force)?;
    let pem = std::fs::read_to_string(request).map_err(io(request))?;
    let bad = |reason| TlsInitError::BadRequest { path: request.to_path_buf(), reason };
    let asked = CertificateSigningRequestParams::from_pem(&pem).map_err(bad)?;
    let cert = client_params(name).signed_by(&asked.public_key, &issuer)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// A client's name: 1-64 of `[A-Za-z0-9_.-]` (it names files).
fn check_name(name: &str) -> Result<(), TlsInitError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if valid { Ok(()) } else { Err(TlsInitError::InvalidName(name.to_string())) }
}

/// The CA of `dir` as an issuer, and where client `name`'s certificate goes (refused if it
/// exists, unless `force`).
fn client_issuer(
    dir: &Path,
    name: &str,
    force: bool,
) -> Result<(DevPki, Issuer<'static, KeyPair>, PathBuf), TlsInitError> {
    check_name(name)?;
    let pki = DevPki { dir: dir.to_path_buf() };
    let key_path = dir.join(CA_KEY);
    if !pki.ca().is_file() || !key_path.is_file() {
        return Err(TlsInitError::NoCa { dir: dir.to_path_buf() });
    }
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).map_err(io(&key_path))?)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let (cert_path, _) = pki.client_files(name);
    if cert_path.exists() && !force {
        return Err(TlsInitError::Exists { path: cert_path });
    }
    Ok((pki, issuer, cert_path))
}

/// A client certificate's parameters: `name` as its subject, for client authentication only.
fn client_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

fn named(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// An IP address, or a DNS name (labels of letters, digits and `-`; `*.` first for a wildcard).
fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsInitError + '_ {
    move |e| TlsInitError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

/// Writes `text` to `path` (replacing it), readable by its owner only when `private`.
fn write_file(path: &Path, text: &str, private: bool) -> Result<(), TlsInitError> {
    let _ = std::fs::remove_file(path);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if private { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(io(path))?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData;

    #[test]
    fn init_writes_the_ca_and_server_and_keeps_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = init(dir.path(), &["nats.example".into(), "10.0.0.7".into()], false).unwrap();
        for f in [pki.ca(), dir.path().join(CA_KEY), pki.server_cert(), pki.server_key()] {
            assert!(f.is_file(), "{}", f.display());
        }
        pki.client_tls().check().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(dir.path().join(CA_KEY)), 0o600);
            assert_eq!(mode(pki.server_key()), 0o600);
        }
        let ca = std::fs::read_to_string(pki.ca()).unwrap();
        assert!(matches!(init(dir.path(), &[], false), Err(TlsInitError::Exists { .. })));
        assert_eq!(std::fs::read_to_string(pki.ca()).unwrap(), ca, "the CA is kept");
        init(dir.path(), &[], true).unwrap();
        assert_ne!(std::fs::read_to_string(pki.ca()).unwrap(), ca, "--force replaces it");
        assert!(
            matches!(init(dir.path(), &["bad host!".into()], true), Err(TlsInitError::InvalidHost(h)) if h == "bad host!")
        );
    }

    #[test]
    fn clients_are_signed_by_an_existing_ca() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(client(dir.path(), "m1", false), Err(TlsInitError::NoCa { .. })));
        init(dir.path(), &[], false).unwrap();
        let tls = client(dir.path(), "m1", false).unwrap();
        tls.check().unwrap();
        assert!(matches!(client(dir.path(), "m1", false), Err(TlsInitError::Exists { .. })));
        assert!(matches!(client(dir.path(), "../m1", false), Err(TlsInitError::InvalidName(_))));
    }

    #[test]
    fn a_request_is_signed_for_its_key_alone_and_a_forged_one_is_refused() {
        let (ca, miner) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        init(ca.path(), &[], false).unwrap();
        let csr = request(miner.path(), "m7", false).unwrap();
        assert!(matches!(request(miner.path(), "m7", false), Err(TlsInitError::Exists { .. })));
        // The validator signs under the name it chooses; the key never left the miner.
        let cert = sign_request(ca.path(), "miner-7", &csr, false).unwrap();
        let (_, key) = DevPki { dir: miner.path().into() }.client_files("m7");
        let tls = NatsTls::pinned(ca.path().join(CA_CERT)).with_client_cert(cert.clone(), key.clone());
        tls.check().unwrap();
        assert!(!ca.path().join("client-miner-7-key.pem").exists());
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key).unwrap()).unwrap();
        let signed = rcgen::CertificateSigningRequestParams::from_pem(&std::fs::read_to_string(&csr).unwrap()).unwrap();
        assert_eq!(signed.public_key.der_bytes(), PublicKeyData::der_bytes(&key));

        // A request whose signature does not match its key (bytes changed in transit).
        // The signature ends the request: change a character of the last line of base64.
        let mut lines: Vec<String> = std::fs::read_to_string(&csr).unwrap().lines().map(String::from).collect();
        let last = lines.len() - 2;
        let body = &mut lines[last];
        let at = body.trim_end_matches('=').len() - 2;
        let swapped = if &body[at..=at] == "A" { "B" } else { "A" };
        body.replace_range(at..=at, swapped);
        let forged = miner.path().join("forged.csr");
        std::fs::write(&forged, lines.join("\n") + "\n").unwrap();
        assert!(matches!(sign_request(ca.path(), "m8", &forged, false), Err(TlsInitError::BadRequest { .. })));
        let garbage = miner.path().join("garbage.csr");
        std::fs::write(&garbage, "not a request").unwrap();
        assert!(matches!(sign_request(ca.path(), "m8", &garbage, false), Err(TlsInitError::BadRequest { .. })));
    }
}
