//! Where a running `sundara up` is: its context file, which the other commands read when
//! their connection settings are not given (`--nats`, `--nats-creds`, `--redis` and their
//! environment variables win over it).
//!
//! The file is `$SUNDARA_CONTEXT`, else `$XDG_STATE_HOME/sundara/up.json`, else
//! `~/.local/state/sundara/up.json`. `up` keeps its NATS users' seeds in the directory next
//! to it named after it (`…/sundara/up/`, mode 0700, seeds 0600), and removes both when it
//! exits: they hold secrets and describe servers that are gone.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::Role;

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path} is not a sundara context: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("no place for the context file: set SUNDARA_CONTEXT (or HOME or XDG_STATE_HOME)")]
    NoPath,
    #[error(
        "another `sundara up` (pid {pid}) is running with the context {path}; stop it, or run this one \
         with SUNDARA_CONTEXT set to another file"
    )]
    InUse { path: PathBuf, pid: u32 },
}

/// A running embedded stack, as the other commands connect to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub nats_url: String,
    pub redis_url: String,
    /// The CA a `rediss://` redis-server's certificate is signed by (`up --redis-tls`).
    #[serde(default)]
    pub redis_ca: Option<PathBuf>,
    /// Every NATS user's seed (`validator.nk`, `tenant-<t>.nk`, `miner-<w>.nk`); `None` when
    /// NATS runs without auth.
    pub credentials_dir: Option<PathBuf>,
    /// The seed commands connect with unless told otherwise: the validator's.
    pub nats_credentials: Option<PathBuf>,
    /// The CA the stack's nats-server certificate is signed by (`--nats-ca`); `None`:
    /// plain TCP (a context from before TLS).
    #[serde(default)]
    pub nats_ca: Option<PathBuf>,
    /// The client certificate and key commands present, where the server verifies clients
    /// (mutual TLS).
    #[serde(default)]
    pub nats_client_cert: Option<(PathBuf, PathBuf)>,
    pub nats_server_pid: u32,
    /// nats-server's config file.
    pub nats_config: PathBuf,
    /// The `authorization` block it includes (rewritten by `sundara auth add`); `None` without auth.
    pub nats_auth_config: Option<PathBuf>,
    /// nats-server's HTTP monitoring port (`/varz` shows when it reloaded its config).
    pub nats_monitor_port: u16,
    /// Where `up` serves Prometheus metrics, when it does.
    pub metrics_addr: Option<SocketAddr>,
    /// The `sundara up` process.
    pub up_pid: u32,
}

/// NATS when neither given nor in a context.
pub const DEFAULT_NATS: &str = "nats://127.0.0.1:4222";
/// Redis when neither given nor in a context.
pub const DEFAULT_REDIS: &str = "redis://127.0.0.1:6379/";

/// Connection settings as the command line or the environment gave them.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub nats: Option<String>,
    pub nats_creds: Option<PathBuf>,
    /// `--nats-ca`: the CA to pin.
    pub nats_ca: Option<PathBuf>,
    /// `--nats-cert` and `--nats-key`: the client certificate for mutual TLS.
    pub nats_client_cert: Option<(PathBuf, PathBuf)>,
    pub redis: Option<String>,
    /// `--redis-ca`: the CA a `rediss://` Redis must present a certificate of.
    pub redis_ca: Option<PathBuf>,
}

impl Settings {
    /// Where to connect: what was given, the rest from `context` (unless NATS was given
    /// and is another server than the context's: then nothing comes from it), the rest
    /// the defaults. The context's credentials are `acting_as`'s seed when its directory
    /// has one (`worker --id w` connects as miner `w`), else its default (the validator's).
    /// TLS is on where a CA is given or the context has one; a client certificate without
    /// a CA to pin is not used.
    pub fn resolve(self, context: Option<&Context>, acting_as: Option<&Role>) -> sundara_common::Endpoints {
        let context = context.filter(|c| self.nats.as_deref().is_none_or(|url| url == c.nats_url));
        let url = self.nats.or_else(|| context.map(|c| c.nats_url.clone())).unwrap_or_else(|| DEFAULT_NATS.into());
        let credentials = self.nats_creds.or_else(|| context.and_then(|c| c.credentials_for(acting_as)));
        let ca = self.nats_ca.or_else(|| context.and_then(|c| c.nats_ca.clone()));
        let client_cert = self.nats_client_cert.or_else(|| context.and_then(|c| c.nats_client_cert.clone()));
        let tls = ca.map(|ca| sundara_common::tls::NatsTls { ca, client_cert });
        // The context's CA goes with the context's Redis only.
        let (redis_url, redis_ca) = match (self.redis, context) {
            (Some(url), _) => (url, self.redis_ca),
            (None, Some(c)) => (c.redis_url.clone(), self.redis_ca.or_else(|| c.redis_ca.clone())),
            (None, None) => (DEFAULT_REDIS.into(), self.redis_ca),
        };
        let nats = sundara_common::nats::NatsEndpoint { url, credentials, tls, hotkey: None };
        sundara_common::Endpoints { nats, redis_url, redis_ca }
    }
}

/// The context file's path (see the module's doc).
pub fn path() -> Result<PathBuf, ContextError> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = var("SUNDARA_CONTEXT") {
        return Ok(p);
    }
    let state =
        var("XDG_STATE_HOME").or_else(|| var("HOME").map(|h| h.join(".local/state"))).ok_or(ContextError::NoPath)?;
    Ok(state.join("sundara/up.json"))
}

/// Where `up` keeps the seeds of the stack whose context is at `context`: beside it, named
/// after it without its extension (`up.json` → `up/`).
pub fn credentials_dir(context: &Path) -> PathBuf {
    let stem = context.file_stem().map_or_else(|| "up".into(), |s| s.to_string_lossy().into_owned());
    let name = if context.extension().is_some() { stem } else { format!("{stem}.credentials") };
    context.with_file_name(name)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ContextError + '_ {
    move |e| ContextError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

/// Creates `dir` (and its missing parents), readable by its owner only.
pub fn create_private_dir(dir: &Path) -> Result<(), ContextError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    Ok(())
}

/// Whether process `pid` is alive.
pub fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if proc.is_dir() {
        return proc.join(pid.to_string()).exists();
    }
    std::process::Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Context {
    /// The context at `path`; `None` when there is no file.
    pub fn load(path: &Path) -> Result<Option<Context>, ContextError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(path)(e)),
        };
        let context = serde_json::from_str(&text)
            .map_err(|e| ContextError::Invalid { path: path.to_path_buf(), reason: e.to_string() })?;
        Ok(Some(context))
    }

    /// Writes the context to `path` (mode 0600; its directory is made, 0700, if missing),
    /// whole or not at all: readers never see half a file.
    pub fn write(&self, path: &Path) -> Result<(), ContextError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            create_private_dir(parent)?;
        }
        let text = serde_json::to_string_pretty(self).expect("a context serialises");
        let partial = path.with_extension("partial");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&partial).map_err(io(&partial))?;
        std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io(&partial))?;
        std::fs::rename(&partial, path).map_err(io(path))
    }

    /// The seed to connect with as `role` (when its directory has it), else the default.
    pub fn credentials_for(&self, role: Option<&Role>) -> Option<PathBuf> {
        let own = match (role, &self.credentials_dir) {
            (Some(role), Some(dir)) => Some(dir.join(role.file_name())).filter(|p| p.is_file()),
            _ => None,
        };
        own.or_else(|| self.nats_credentials.clone())
    }

    /// The context at [`path`] of a `sundara up` that still runs; `None` when there is
    /// none (a context whose `up` is gone is left alone, with a note on stderr).
    pub fn current() -> Option<(PathBuf, Context)> {
        let path = path().ok()?;
        match Context::load(&path) {
            Ok(Some(context)) if context.is_live() => Some((path, context)),
            Ok(Some(context)) => {
                eprintln!(
                    "note: ignoring {}: the `sundara up` that wrote it (pid {}) is gone",
                    path.display(),
                    context.up_pid
                );
                None
            }
            Ok(None) => None,
            Err(e) => {
                eprintln!("note: ignoring the context: {e}");
                None
            }
        }
    }

    /// Whether the `sundara up` that wrote it still runs.
    pub fn is_live(&self) -> bool {
        process_alive(self.up_pid)
    }
}

/// Claims `path` for this process's stack: fails if a live `up` holds it, clears what a
/// dead one left (its context and seeds). Dropping the claim removes the context and the
/// seeds directory.
pub fn claim(path: &Path) -> Result<Claim, ContextError> {
    let credentials_dir = credentials_dir(path);
    if let Some(old) = Context::load(path).unwrap_or(None) {
        if old.is_live() && old.up_pid != std::process::id() {
            return Err(ContextError::InUse { path: path.to_path_buf(), pid: old.up_pid });
        }
        if let Some(dir) = old.credentials_dir.filter(|d| *d != credentials_dir) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    let _ = std::fs::remove_file(path);
    match std::fs::remove_dir_all(&credentials_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&credentials_dir)(e)),
        _ => {}
    }
    Ok(Claim { path: path.to_path_buf(), credentials_dir })
}

/// A context path and its seeds directory, removed when dropped.
#[derive(Debug)]
pub struct Claim {
    pub path: PathBuf,
    pub credentials_dir: PathBuf,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Only this process's context: never one another `up` wrote since.
        let ours = Context::load(&self.path).ok().flatten().is_none_or(|c| c.up_pid == std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
        let _ = std::fs::remove_dir_all(&self.credentials_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_live_beside_the_context_named_after_it() {
        assert_eq!(credentials_dir(Path::new("/s/sundara/up.json")), PathBuf::from("/s/sundara/up"));
        assert_eq!(credentials_dir(Path::new("/t/ctx")), PathBuf::from("/t/ctx.credentials"));
    }

    fn sample(dir: &Path) -> Context {
        Context {
            nats_url: "nats://127.0.0.1:1".into(),
            redis_url: "redis://127.0.0.1:2/".into(),
            redis_ca: None,
            credentials_dir: Some(dir.to_path_buf()),
            nats_credentials: Some(dir.join("validator.nk")),
            nats_ca: Some(dir.join("ca.pem")),
            nats_client_cert: None,
            nats_server_pid: 1,
            nats_config: "nats.conf".into(),
            nats_auth_config: None,
            nats_monitor_port: 3,
            metrics_addr: None,
            up_pid: 1,
        }
    }

    #[test]
    fn given_settings_win_and_the_context_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("miner-m1.nk"), "SU").unwrap();
        let c = sample(dir.path());
        let none = Settings::default();
        let e = none.clone().resolve(Some(&c), None);
        assert_eq!((e.nats.url.as_str(), e.redis_url.as_str()), ("nats://127.0.0.1:1", "redis://127.0.0.1:2/"));
        assert_eq!(e.nats.credentials, Some(dir.path().join("validator.nk")));
        let miner = none.clone().resolve(Some(&c), Some(&Role::Miner("m1".into())));
        assert_eq!(miner.nats.credentials, Some(dir.path().join("miner-m1.nk")), "its own seed");
        let other = none.clone().resolve(Some(&c), Some(&Role::Miner("m2".into())));
        assert_eq!(other.nats.credentials, Some(dir.path().join("validator.nk")), "no seed of its own");
        let creds = Settings { nats_creds: Some("mine.nk".into()), ..Settings::default() }.resolve(Some(&c), None);
        assert_eq!((creds.nats.url.as_str(), creds.nats.credentials), ("nats://127.0.0.1:1", Some("mine.nk".into())));
        let elsewhere = Settings { nats: Some("nats://h:4222".into()), ..Settings::default() }.resolve(Some(&c), None);
        assert_eq!(elsewhere.nats.credentials, None, "another server: nothing from the context");
        assert_eq!(elsewhere.redis_url, DEFAULT_REDIS);
        assert_eq!(elsewhere.nats.tls, None, "another server: not the context's CA either");
        assert_eq!(
            e.nats.tls,
            Some(sundara_common::tls::NatsTls::pinned(dir.path().join("ca.pem"))),
            "the context's CA"
        );
        let pinned = Settings { nats_ca: Some("mine.pem".into()), ..Settings::default() }.resolve(Some(&c), None);
        assert_eq!(pinned.nats.tls, Some(sundara_common::tls::NatsTls::pinned("mine.pem")), "a given CA wins");
        let bare = none.resolve(None, None);
        assert_eq!((bare.nats.url.as_str(), bare.redis_url.as_str()), (DEFAULT_NATS, DEFAULT_REDIS));
        assert_eq!(bare.nats.tls, None);
    }

    #[test]
    fn a_claim_clears_a_dead_ups_leftovers_and_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/up.json");
        let mut context = Context {
            credentials_dir: Some(credentials_dir(&path)),
            nats_credentials: None,
            nats_ca: None,
            // No process has this pid (above Linux's pid_max).
            up_pid: u32::MAX - 1,
            ..sample(dir.path())
        };
        context.write(&path).unwrap();
        create_private_dir(&credentials_dir(&path)).unwrap();
        std::fs::write(credentials_dir(&path).join("validator.nk"), "SU…").unwrap();
        assert_eq!(Context::load(&path).unwrap().as_ref(), Some(&context));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            let dir_mode = std::fs::metadata(credentials_dir(&path)).unwrap().permissions().mode();
            assert_eq!(dir_mode & 0o777, 0o700);
        }

        let claimed = claim(&path).unwrap();
        assert!(!path.exists() && !credentials_dir(&path).exists(), "a dead up's context and seeds are cleared");
        context.up_pid = std::process::id();
        context.write(&path).unwrap();
        create_private_dir(&claimed.credentials_dir).unwrap();
        drop(claimed);
        assert!(!path.exists() && !credentials_dir(&path).exists(), "dropping the claim removes both");

        // A live up's context is not taken over.
        context.up_pid = std::process::id();
        context.write(&path).unwrap();
        let mut other = context.clone();
        other.up_pid = 1; // init: alive
        other.write(&path).unwrap();
        assert!(matches!(claim(&path), Err(ContextError::InUse { pid: 1, .. })));
        assert!(path.exists());
    }
}
