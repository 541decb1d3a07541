//! The validator secret's key id: how the scheduler (which signs tickets with
//! `SUNDARA_SECRET`) and the verifier (which checks them) know at start that they share it.
//!
//! A service with another secret than the rest of the stack signs, or checks, tickets that
//! nobody else accepts: every honest outcome is then refused as forged. So each of them,
//! at start, compares the key id of its secret (a hash that reveals nothing of it) with
//! the one stored in the validator's KV bucket ([`subj::VALIDATOR_BUCKET`], key
//! [`subj::SECRET_KEY_ID`]): the first to start writes its own (a KV create, so two
//! starting at once cannot both win), and any later one whose key id differs refuses to
//! start with [`SecretError::Mismatch`]. To change the secret on purpose, start one
//! service with [`Claim::Rotate`] (`--rotate-secret`): it writes its key id whatever was
//! stored, and the others must then be restarted with the new secret.

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use sundara_schemas::subjects as subj;

/// Shortest validator secret accepted: 16 bytes (128 bits).
pub const MIN_SECRET_BYTES: usize = 16;

pub use sundara_schemas::ticket::key_id;

/// What the stack has stored: whose key id, set by which service, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub key_id: String,
    /// The service that wrote it (`scheduler`, `verifier`).
    pub set_by: String,
    /// When (Unix ms).
    pub set_at_ms: u64,
}

impl StoredKey {
    /// `set_at_ms` as an RFC 3339 UTC time (to the second).
    pub fn set_at(&self) -> String {
        sundara_schemas::rfc3339_ms(self.set_at_ms)
    }
}

/// Whether a service checks the stack's key id or replaces it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Claim {
    /// Write the key id if none is stored; refuse to start if another is.
    #[default]
    Check,
    /// Write this service's key id whatever is stored: a deliberate change of secret.
    Rotate,
}

/// The validator secret: its bytes, never printed (`Debug` shows only its length).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Secret {
        Secret(bytes.into())
    }
}

impl std::ops::Deref for Secret {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// The secrets a verifier checks tickets with: the stack's, and during a rotation the one
/// being retired, so that tickets signed before the change still verify. Each ticket names
/// its signer's key id ([`sundara_schemas::Ticket::key_id`]); a ticket naming neither is
/// refused.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    current: (String, Secret),
    previous: Option<(String, Secret)>,
}

impl Keyring {
    pub fn new(current: Secret, previous: Option<Secret>) -> Keyring {
        let named = |s: Secret| (key_id(&s), s);
        Keyring { current: named(current), previous: previous.map(named) }
    }

    pub fn current(&self) -> &Secret {
        &self.current.1
    }

    /// The retiring secret, if any.
    pub fn previous(&self) -> Option<&Secret> {
        self.previous.as_ref().map(|(_, s)| s)
    }

    /// Whether `ticket` was signed by a secret of this ring: the one its key id names (an
    /// empty key id, from before key ids, names the current one). Constant time in the MAC.
    pub fn verify(&self, ticket: &sundara_schemas::Ticket) -> bool {
        let key = if ticket.key_id.is_empty() || ticket.key_id == self.current.0 {
            Some(&self.current.1)
        } else {
            self.previous.as_ref().filter(|(id, _)| *id == ticket.key_id).map(|(_, secret)| secret)
        };
        key.is_some_and(|secret| ticket.verify(secret))
    }

    /// Whether the stack's stored key id is one of this ring's.
    fn holds(&self, stored_key_id: &str) -> bool {
        self.current.0 == stored_key_id || self.previous.as_ref().is_some_and(|(id, _)| id == stored_key_id)
    }
}

/// Where `SecretArgs::secret` comes from when no file is named.
pub const SECRET_ENV: &str = "SUNDARA_SECRET";

/// The validator secret's settings, shared by `sundara scheduler` and `sundara verifier`.
/// The secret itself is never a flag (a flag's value is visible to every user in `ps`):
/// it is read from a file (`--secret-file`) or the environment (`SUNDARA_SECRET`).
#[derive(Clone, Debug, clap::Args)]
pub struct SecretArgs {
    /// A file holding the validator secret that signs assignment tickets (the same for
    /// scheduler and verifier; at least 16 bytes; a trailing newline is ignored). Without
    /// it the secret is read from the environment variable SUNDARA_SECRET. At start each
    /// service checks its key id against the one the stack stored (NATS KV `validator`) and
    /// refuses to start on a mismatch.
    #[arg(long, env = "SUNDARA_SECRET_FILE")]
    pub secret_file: Option<std::path::PathBuf>,
    /// The secret from SUNDARA_SECRET (or given in code: tests, the embedded stack).
    #[arg(skip = Secret::new(std::env::var(SECRET_ENV).unwrap_or_default()))]
    pub secret: Secret,
    /// Change the stack's secret on purpose: store this secret's key id in place of the
    /// stack's, then restart every other scheduler and verifier with the new secret.
    #[arg(long)]
    pub rotate_secret: bool,
}

impl SecretArgs {
    /// The secret given in code, with no file.
    pub fn given(secret: impl Into<Vec<u8>>) -> SecretArgs {
        SecretArgs { secret_file: None, secret: Secret::new(secret), rotate_secret: false }
    }

    /// The secret: the file's content (less a trailing newline) when a file is named, else
    /// the environment's (or the given one).
    pub fn secret(&self) -> Result<Secret, SecretError> {
        match &self.secret_file {
            Some(path) => read_secret_file(path),
            None => Ok(self.secret.clone()),
        }
    }

    /// Check the stack's key id, or (`--rotate-secret`) replace it.
    pub fn claim(&self) -> Claim {
        if self.rotate_secret { Claim::Rotate } else { Claim::Check }
    }
}

/// Where the verifier's retiring secret comes from when no file is named.
pub const PREVIOUS_SECRET_ENV: &str = "SUNDARA_PREVIOUS_SECRET";

/// The secret being retired during a rotation: `file`'s content (less a trailing newline)
/// when named, else `SUNDARA_PREVIOUS_SECRET` when set; `None` outside a rotation.
pub fn previous_secret(file: Option<&std::path::Path>) -> Result<Option<Secret>, SecretError> {
    match file {
        Some(path) => read_secret_file(path).map(Some),
        None => Ok(std::env::var(PREVIOUS_SECRET_ENV).ok().filter(|s| !s.is_empty()).map(Secret::new)),
    }
}

/// A secret file's content less a trailing newline.
fn read_secret_file(path: &std::path::Path) -> Result<Secret, SecretError> {
    let bytes =
        std::fs::read(path).map_err(|e| SecretError::File { path: path.to_path_buf(), reason: e.to_string() })?;
    let end = bytes.iter().rposition(|b| !matches!(b, b'\n' | b'\r')).map_or(0, |i| i + 1);
    Ok(Secret::new(&bytes[..end]))
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "the validator secret is {len} bytes; it must be at least {MIN_SECRET_BYTES} (e.g. SUNDARA_SECRET=$(openssl rand -hex 32), the same for scheduler and verifier)"
    )]
    TooShort { len: usize },
    #[error(
        "validator secret mismatch: this service's key id {ours}, the stack's is {stack} (set by {set_by} at {set_at}); all of scheduler and verifier must share SUNDARA_SECRET (to change it on purpose, start one of them with --rotate-secret, then restart the others with the new secret)"
    )]
    Mismatch { ours: String, stack: String, set_by: String, set_at: String },
    #[error("the stack's validator key id (KV {bucket}/{key}): {reason}", bucket = subj::VALIDATOR_BUCKET, key = subj::SECRET_KEY_ID)]
    Store { reason: String },
    #[error("the validator secret's file {}: {reason}", .path.display())]
    File { path: std::path::PathBuf, reason: String },
}

/// Connects a service that signs tickets or checks them (`service`: the scheduler, the
/// verifier): refuses a secret shorter than [`MIN_SECRET_BYTES`], provisions the streams,
/// and claims the secret's key id ([`claim`]). A scheduler and a verifier on different
/// secrets would refuse each other's tickets as forged: one refuses to start instead.
pub async fn connect_signer<E: From<crate::Error> + From<SecretError>>(
    nats: &crate::nats::NatsEndpoint,
    service: &str,
    keys: &Keyring,
    how: Claim,
    retention: &crate::nats::Retention,
) -> Result<(async_nats::Client, jetstream::Context), E> {
    check_length(keys.current())?;
    if let Some(previous) = keys.previous() {
        check_length(previous)?;
    }
    let client = crate::nats::connect(nats, &format!("sundara-{service}")).await?;
    let js = jetstream::new(client.clone());
    crate::nats::provision(&js, retention).await?;
    claim(&js, service, keys, how).await?;
    Ok((client, js))
}

/// Refuses a secret shorter than [`MIN_SECRET_BYTES`].
pub fn check_length(secret: &[u8]) -> Result<(), SecretError> {
    if secret.len() < MIN_SECRET_BYTES { Err(SecretError::TooShort { len: secret.len() }) } else { Ok(()) }
}

/// Checks `keys` against the stack's key id, storing the current secret's if there is none
/// (or replacing it with [`Claim::Rotate`]); `service` is recorded as the writer. The
/// stack's key id may be the ring's previous one: a verifier that already checks tickets of
/// the next secret starts before anyone stores it. Returns the key record now stored. The
/// bucket is created by `nats::provision`.
pub async fn claim(
    js: &jetstream::Context,
    service: &str,
    keys: &Keyring,
    how: Claim,
) -> Result<StoredKey, SecretError> {
    let secret = keys.current();
    check_length(secret)?;
    let store_err = |e: &dyn std::fmt::Display| SecretError::Store { reason: e.to_string() };
    let bucket = js.get_key_value(subj::VALIDATOR_BUCKET).await.map_err(|e| store_err(&e))?;
    let ours = StoredKey { key_id: key_id(secret), set_by: service.to_string(), set_at_ms: sundara_schemas::now_ms() };
    let value: bytes::Bytes = serde_json::to_vec(&ours).expect("a key record encodes").into();
    if how == Claim::Rotate {
        let previous = read(&bucket).await?;
        bucket.put(subj::SECRET_KEY_ID, value).await.map_err(|e| store_err(&e))?;
        if let Some(p) = previous.filter(|p| p.key_id != ours.key_id) {
            tracing::warn!(from = %p.key_id, to = %ours.key_id, "validator secret rotated: restart every scheduler and verifier with the new SUNDARA_SECRET");
        }
        return Ok(ours);
    }
    // Created only if absent: of two services starting at once, one writes and the other
    // compares.
    match bucket.create(subj::SECRET_KEY_ID, value).await {
        Ok(_) => {
            tracing::info!(key_id = %ours.key_id, "validator key id stored for the stack");
            return Ok(ours);
        }
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
        Err(e) => return Err(store_err(&e)),
    }
    let stored = read(&bucket).await?.ok_or_else(|| SecretError::Store { reason: "deleted while read".into() })?;
    if !keys.holds(&stored.key_id) {
        return Err(SecretError::Mismatch {
            ours: ours.key_id,
            set_at: stored.set_at(),
            stack: stored.key_id,
            set_by: stored.set_by,
        });
    }
    tracing::info!(key_id = %ours.key_id, set_by = %stored.set_by, "validator secret matches the stack's");
    Ok(stored)
}

/// The stored key record, if any.
async fn read(bucket: &kv::Store) -> Result<Option<StoredKey>, SecretError> {
    let store_err = |reason: String| SecretError::Store { reason };
    match bucket.get(subj::SECRET_KEY_ID).await.map_err(|e| store_err(e.to_string()))? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| store_err(format!("unreadable: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_secret_comes_from_a_file_or_the_environment_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "a-secret-of-enough-bytes\n").unwrap();
        let args = SecretArgs { secret_file: Some(file), ..SecretArgs::given("ignored") };
        assert_eq!(&*args.secret().unwrap(), b"a-secret-of-enough-bytes", "the trailing newline is dropped");
        assert_eq!(format!("{args:?}").matches("a-secret").count(), 0, "{args:?}");
        assert_eq!(format!("{:?}", args.secret().unwrap()), "Secret(24 bytes)");
        let missing = SecretArgs { secret_file: Some(dir.path().join("none")), ..SecretArgs::given("") };
        assert!(matches!(missing.secret(), Err(SecretError::File { .. })));
        // No flag takes the secret itself: it would show in `ps`.
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            secret: SecretArgs,
        }
        assert!(<Cli as clap::Parser>::try_parse_from(["x", "--secret", "s3cr3t-s3cr3t-s3cr3t"]).is_err());
    }

    #[test]
    fn key_ids_name_a_secret_without_revealing_it() {
        let a = key_id(b"0123456789abcdef-first");
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, key_id(b"0123456789abcdef-first"), "stable");
        assert_ne!(a, key_id(b"0123456789abcdef-other"));
        // Not a plain hash of the secret: the domain separation is part of it.
        assert_ne!(a, hex::encode(&Sha256::digest(b"0123456789abcdef-first")[..8]));
    }

    fn ticket() -> sundara_schemas::Ticket {
        sundara_schemas::Ticket {
            task_id: "t1".into(),
            tenant: "default".into(),
            model: sundara_schemas::ModelRef { name: "mlp".into(), version: "1".into() },
            k: 1,
            replica: 0,
            attempt: 0,
            worker: "w1".into(),
            operator: String::new(),
            slice: "w1-cpu0".into(),
            dispatched_at_us: 1,
            deadline_at_ms: 2,
            answer_by_ms: 2,
            task_seq: 3,
            key_id: String::new(),
            mac: Vec::new(),
        }
    }

    #[test]
    fn a_keyring_checks_each_ticket_with_the_secret_it_names() {
        let (old, new, third) =
            (b"the-old-secret-0123456789", b"the-new-secret-0123456789", b"a-third-secret-0123456789");
        let signed = |key: &[u8]| {
            let mut t = ticket();
            t.sign(key);
            t
        };
        let rotating = Keyring::new(Secret::new(*new), Some(Secret::new(*old)));
        assert!(rotating.verify(&signed(new)), "the current secret's");
        assert!(rotating.verify(&signed(old)), "the retiring secret's: signed before the change");
        assert!(!rotating.verify(&signed(third)), "a secret the ring does not hold");
        // The key id is signed: renaming the signer breaks the MAC.
        let mut renamed = signed(third);
        renamed.key_id = key_id(old);
        assert!(!rotating.verify(&renamed));
        // A ticket from before key ids is checked with the current secret only.
        let mut unnamed = signed(old);
        unnamed.key_id.clear();
        assert!(!rotating.verify(&unnamed), "its MAC covered the key id it had");
        let settled = Keyring::new(Secret::new(*new), None);
        assert!(!settled.verify(&signed(old)), "after the rotation the old secret's tickets are refused");
        assert!(settled.holds(&key_id(new)) && !settled.holds(&key_id(old)));
        assert!(rotating.holds(&key_id(old)), "a verifier may start before the new key id is stored");
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(check_length(b"test-secret"), Err(SecretError::TooShort { len: 11 })));
        assert!(check_length(&[7; MIN_SECRET_BYTES]).is_ok());
        let e = SecretError::TooShort { len: 3 }.to_string();
        assert!(e.contains("at least 16"), "{e}");
    }

    #[test]
    fn a_mismatch_names_both_key_ids_and_who_set_the_stacks() {
        let stored = StoredKey { key_id: "aaaa".into(), set_by: "scheduler".into(), set_at_ms: 0 };
        assert_eq!(stored.set_at(), "1970-01-01T00:00:00Z");
        let leap = StoredKey { set_at_ms: 1_709_210_096_789, ..stored.clone() };
        assert_eq!(leap.set_at(), "2024-02-29T12:34:56Z");
        let e = SecretError::Mismatch {
            ours: "bbbb".into(),
            stack: stored.key_id.clone(),
            set_by: stored.set_by.clone(),
            set_at: stored.set_at(),
        }
        .to_string();
        assert!(e.starts_with("validator secret mismatch: this service's key id bbbb, the stack's is aaaa (set by scheduler at 1970-01-01T00:00:00Z); all of scheduler and verifier must share SUNDARA_SECRET"), "{e}");
    }
}
