//! The model registry: metadata in KV bucket `models`, ONNX bytes in object store
//! `model-blobs`. Key `<name>` holds the latest version, `<name>.<version>` each version,
//! and `<name>.<version>.removed` the record of a removed version (its tombstone).
//!
//! A published version is immutable: its key is created once (KV `create`, so of two
//! concurrent pushes one wins), its bytes live under an object name of their own
//! (`<name>/<version>/<sha256>`) and are uploaded before the key exists, so a published
//! record always has its bytes and no push ever replaces the bytes of another. Pushing the
//! same bytes and policy again changes nothing; other bytes or another policy under a
//! published (or removed) version are refused with [`PushError`]. A removed version's
//! number is never given to other bytes: miners may still hold the old ones.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use sundara_schemas::{ModelMeta, ModelRef, PolicyError, decode, encode, subjects as subj};
use tokio::io::AsyncReadExt;

use crate::{Error, js_err};

/// Largest metadata record read from the bucket.
const MAX_META_BYTES: usize = 1 << 20;

/// A cached view of the registry, kept fresh by a KV watch. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
    blobs: ObjectStore,
    cache: Arc<RwLock<HashMap<String, Arc<ModelMeta>>>>,
    _watch: Arc<WatchTask>,
}

struct WatchTask(tokio::task::AbortHandle);

impl Drop for WatchTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn version_key(name: &str, version: &str) -> String {
    format!("{name}.{version}")
}

/// Suffix of a removed version's key: `<name>.<version>.removed`.
const REMOVED: &str = "removed";

fn tombstone_key(name: &str, version: &str) -> String {
    format!("{name}.{version}.{REMOVED}")
}

/// Where a version's bytes are kept: a name per version and content, so no upload ever
/// replaces bytes that a published record points to.
pub fn object_name(name: &str, version: &str, sha256: &str) -> String {
    format!("{name}/{version}/{sha256}")
}

/// What [`Registry::push`] did.
#[derive(Clone, Debug, PartialEq)]
pub enum Pushed {
    /// The version was published with this record.
    Created(ModelMeta),
    /// The version was already published with the same bytes and policy: nothing changed.
    /// The record is the one first published.
    Unchanged(ModelMeta),
}

impl Pushed {
    pub fn meta(&self) -> &ModelMeta {
        match self {
            Pushed::Created(m) | Pushed::Unchanged(m) => m,
        }
    }

    pub fn into_meta(self) -> ModelMeta {
        match self {
            Pushed::Created(m) | Pushed::Unchanged(m) => m,
        }
    }
}

/// Why a push was refused. The registry is unchanged by a refused push.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("model name and version must be 1-64 of [A-Za-z0-9_-], got {0:?}")]
    InvalidName(String),
    #[error("{name}: {source}")]
    Policy { name: String, source: PolicyError },
    #[error("sha256 of the bytes is {computed}, the record says {recorded}")]
    DigestMismatch { computed: String, recorded: String },
    #[error(
        "{name}@{version} is already published with other bytes (sha256 {existing_sha256:.12}…, these are \
         {pushed_sha256:.12}…): a published version never changes, as miners hold its bytes; push these \
         as a new version ({name}@{next})"
    )]
    VersionExists { name: String, version: String, existing_sha256: String, pushed_sha256: String, next: String },
    #[error(
        "{name}@{version} is already published with these bytes under another policy ({existing}): a \
         published version never changes; push as a new version ({name}@{next}) to change the policy"
    )]
    PolicyDiffers { name: String, version: String, existing: String, next: String },
    #[error(
        "{name}@{version} was removed, and miners may still hold its bytes (sha256 {removed_sha256:.12}…, \
         these are {pushed_sha256:.12}…): its number is never reused for other bytes; push these as a new \
         version ({name}@{next})"
    )]
    VersionRemoved { name: String, version: String, removed_sha256: String, pushed_sha256: String, next: String },
    #[error("the latest version of {name} is {latest:?}, not a number: name the new version explicitly")]
    NeedsVersion { name: String, latest: String },
    #[error(transparent)]
    Common(#[from] Error),
}

/// A version as a number, when it is one (automatic versions are 1, 2, 3…).
fn numeric(version: &str) -> Option<u64> {
    version.parse().ok()
}

/// Whether `a` supersedes `b` as a model's latest version: the higher number when both are
/// numbers, else the one pushed last.
fn supersedes(a: &ModelMeta, b: &ModelMeta) -> bool {
    match (numeric(&a.version), numeric(&b.version)) {
        (Some(x), Some(y)) => x > y,
        _ => a.pushed_at_ms >= b.pushed_at_ms,
    }
}

/// Whether two records of one version publish the same thing: bytes, policy and batching.
fn same_content(a: &ModelMeta, b: &ModelMeta) -> bool {
    a.sha256 == b.sha256 && a.policy == b.policy && a.batching == b.batching
}

/// A policy in a few words, for messages.
fn policy_text(m: &ModelMeta) -> String {
    format!(
        "k={} {} audit rate {} max batch {} max delay {} µs",
        m.policy.redundancy, m.policy.rule, m.policy.audit_rate, m.batching.max_batch, m.batching.max_delay_us
    )
}

/// A model's versions as the registry holds them: published and removed.
#[derive(Clone, Debug, Default)]
pub struct Versions {
    /// Published versions.
    pub published: Vec<String>,
    /// Removed versions (their numbers are not given to other bytes).
    pub removed: Vec<String>,
}

impl Versions {
    /// The number an automatic version takes: one above every numeric version, published
    /// or removed (1 for a model never pushed).
    pub fn next(&self) -> String {
        let top = self.published.iter().chain(&self.removed).filter_map(|v| numeric(v)).max().unwrap_or(0);
        (top + 1).to_string()
    }
}

/// Tries of a compare-and-set on the `latest` key before giving up (only concurrent pushes
/// of one model make a try fail).
const CAS_TRIES: usize = 16;

impl Registry {
    /// Opens the bucket and store (see [`crate::nats::provision`]) and starts the watch.
    pub async fn open(js: &jetstream::Context) -> Result<Registry, Error> {
        let kv = js.get_key_value(subj::MODELS_BUCKET).await.map_err(js_err)?;
        let blobs = js.get_object_store(subj::MODEL_BLOBS).await.map_err(js_err)?;
        let cache: Arc<RwLock<HashMap<String, Arc<ModelMeta>>>> = Arc::default();
        let mut watch = kv.watch_all().await.map_err(js_err)?;
        let cached = cache.clone();
        let task = tokio::spawn(async move {
            while let Some(Ok(entry)) = watch.next().await {
                if entry.key.ends_with(REMOVED) && entry.key.matches('.').count() == 2 {
                    continue; // a tombstone, never served
                }
                let mut map = cached.write().unwrap_or_else(|e| e.into_inner());
                match entry.operation {
                    kv::Operation::Put => match decode::<ModelMeta>(&entry.value, MAX_META_BYTES) {
                        Ok(meta) => {
                            map.insert(entry.key, Arc::new(meta));
                        }
                        Err(e) => tracing::warn!(key = %entry.key, error = %e, "unreadable model record"),
                    },
                    kv::Operation::Delete | kv::Operation::Purge => {
                        map.remove(&entry.key);
                    }
                }
            }
        });
        Ok(Registry { kv, blobs, cache, _watch: Arc::new(WatchTask(task.abort_handle())) })
    }

    async fn lookup(&self, key: String) -> Result<Option<Arc<ModelMeta>>, Error> {
        if let Some(hit) = self.cache.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Ok(Some(hit.clone()));
        }
        // Not yet seen by the watch (just pushed, or the watch is catching up).
        let Some(bytes) = self.kv.get(key.clone()).await.map_err(js_err)? else { return Ok(None) };
        let meta = Arc::new(decode::<ModelMeta>(&bytes, MAX_META_BYTES)?);
        self.cache.write().unwrap_or_else(|e| e.into_inner()).insert(key, meta.clone());
        Ok(Some(meta))
    }

    /// The latest version of a model.
    pub async fn latest(&self, name: &str) -> Result<Option<Arc<ModelMeta>>, Error> {
        if !subj::is_token(name) {
            return Ok(None);
        }
        self.lookup(name.to_string()).await
    }

    /// One exact version (versions are immutable).
    pub async fn version(&self, name: &str, version: &str) -> Result<Option<Arc<ModelMeta>>, Error> {
        if !subj::is_token(name) || !subj::is_token(version) {
            return Ok(None);
        }
        self.lookup(version_key(name, version)).await
    }

    /// What a client names a model by: `name` (its latest version) or `name@version`.
    pub async fn resolve(&self, spec: &str) -> Result<Option<Arc<ModelMeta>>, Error> {
        match ModelRef::split_spec(spec) {
            (name, None) => self.latest(name).await,
            (name, Some(version)) => self.version(name, version).await,
        }
    }

    /// The record stored under `key` now, read from the bucket (not the cache): what a
    /// change of the registry must be decided on.
    async fn stored(&self, key: &str) -> Result<Option<(ModelMeta, u64)>, Error> {
        match self.kv.entry(key).await.map_err(js_err)? {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some((decode::<ModelMeta>(&e.value, MAX_META_BYTES)?, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// A model's published and removed versions, read from the bucket.
    pub async fn versions(&self, name: &str) -> Result<Versions, Error> {
        let mut keys = self.kv.keys().await.map_err(js_err)?;
        let mut versions = Versions::default();
        let prefix = format!("{name}.");
        while let Some(key) = keys.next().await {
            let key = key.map_err(js_err)?;
            let Some(rest) = key.strip_prefix(&prefix) else { continue };
            match rest.split_once('.') {
                None => versions.published.push(rest.to_string()),
                Some((version, REMOVED)) => versions.removed.push(version.to_string()),
                Some(_) => {}
            }
        }
        let order = |a: &String, b: &String| numeric(a).cmp(&numeric(b)).then_with(|| a.cmp(b));
        versions.published.sort_by(order);
        versions.removed.sort_by(order);
        Ok(versions)
    }

    /// Publishes `meta.version` of a model with its bytes, then moves `latest` to it if it
    /// supersedes the latest (see the module's rules). `meta.object` is set here. The
    /// policy is validated first, so no path registers one that cannot work.
    pub async fn push(&self, meta: &ModelMeta, bytes: &[u8]) -> Result<Pushed, PushError> {
        for n in [&meta.name, &meta.version] {
            if !subj::is_token(n) {
                return Err(PushError::InvalidName(n.clone()));
            }
        }
        let policy_error = |source| PushError::Policy { name: meta.name.clone(), source };
        meta.policy.validate().map_err(policy_error)?;
        meta.batching.validate().map_err(policy_error)?;
        let computed = hex::encode(Sha256::digest(bytes));
        if computed != meta.sha256 {
            return Err(PushError::DigestMismatch { computed, recorded: meta.sha256.clone() });
        }
        let mut meta = meta.clone();
        meta.object = object_name(&meta.name, &meta.version, &meta.sha256);
        let key = version_key(&meta.name, &meta.version);
        if let Some((existing, _)) = self.stored(&key).await? {
            return self.unchanged_or_refused(existing, &meta).await;
        }
        if let Some((removed, _)) = self.stored(&tombstone_key(&meta.name, &meta.version)).await?
            && removed.sha256 != meta.sha256
        {
            return Err(PushError::VersionRemoved {
                next: self.versions(&meta.name).await?.next(),
                name: meta.name,
                version: meta.version,
                removed_sha256: removed.sha256,
                pushed_sha256: computed,
            });
        }
        // Bytes first: a record is only ever published with its bytes in place. An object
        // of this name already holds these very bytes (its name is their sha256).
        let present = self.blobs.info(meta.object.as_str()).await.is_ok_and(|i| !i.deleted && i.size == bytes.len());
        if !present {
            let mut reader = bytes;
            self.blobs.put(meta.object.as_str(), &mut reader).await.map_err(js_err)?;
        }
        let record = Bytes::from(encode(&meta));
        if let Err(e) = self.kv.create(&key, record.clone()).await {
            // Another push of this version won the race (or the bucket is unreachable).
            let existing = self.stored(&key).await;
            let winner = existing.as_ref().ok().and_then(|e| e.as_ref()).map(|(m, _)| m.object.as_str());
            if !present && winner.is_some_and(|w| w != meta.object) {
                // Another version won: no record can point to what this push uploaded (when
                // the bucket could not be read, it stays: a concurrent push of the same
                // bytes may yet publish it).
                let _ = self.blobs.delete(meta.object.as_str()).await;
            }
            let Some((existing, _)) = existing? else { return Err(js_err(e).into()) };
            return self.unchanged_or_refused(existing, &meta).await;
        }
        self.advance_latest(&meta, record).await?;
        Ok(Pushed::Created(meta))
    }

    /// A version exists already: the same bytes and policy change nothing; anything else
    /// is refused.
    async fn unchanged_or_refused(&self, existing: ModelMeta, pushed: &ModelMeta) -> Result<Pushed, PushError> {
        if same_content(&existing, pushed) {
            return Ok(Pushed::Unchanged(existing));
        }
        let next = self.versions(&pushed.name).await?.next();
        let (name, version) = (pushed.name.clone(), pushed.version.clone());
        if existing.sha256 == pushed.sha256 {
            return Err(PushError::PolicyDiffers { name, version, existing: policy_text(&existing), next });
        }
        Err(PushError::VersionExists {
            name,
            version,
            existing_sha256: existing.sha256,
            pushed_sha256: pushed.sha256.clone(),
            next,
        })
    }

    /// Publishes the bytes as the model's next version, unless they are its latest version
    /// already (same bytes and policy: [`Pushed::Unchanged`]). The next version is one above
    /// every numeric version ever published, removed ones included; a model whose latest
    /// version is not a number needs its versions named ([`PushError::NeedsVersion`]).
    /// `meta.version` is set here.
    pub async fn push_next(&self, meta: &ModelMeta, bytes: &[u8]) -> Result<Pushed, PushError> {
        let mut meta = meta.clone();
        for _ in 0..CAS_TRIES {
            if let Some((latest, _)) = self.stored(&meta.name).await? {
                if same_content(&latest, &meta) {
                    return Ok(Pushed::Unchanged(latest));
                }
                if numeric(&latest.version).is_none() {
                    return Err(PushError::NeedsVersion { name: meta.name, latest: latest.version });
                }
            }
            meta.version = self.versions(&meta.name).await?.next();
            match self.push(&meta, bytes).await {
                // A concurrent push took that number: take the next.
                Err(
                    PushError::VersionExists { .. }
                    | PushError::PolicyDiffers { .. }
                    | PushError::VersionRemoved { .. },
                ) => {
                    continue;
                }
                pushed => return pushed,
            }
        }
        Err(Error::Registry(format!("{}: too many concurrent pushes; try again", meta.name)).into())
    }

    /// Moves `latest` to `meta` unless the latest supersedes it, by compare-and-set, so
    /// concurrent pushes never move it backwards.
    async fn advance_latest(&self, meta: &ModelMeta, record: Bytes) -> Result<(), Error> {
        for _ in 0..CAS_TRIES {
            let moved = match self.kv.entry(meta.name.as_str()).await.map_err(js_err)? {
                Some(e) if e.operation == kv::Operation::Put => {
                    if let Ok(current) = decode::<ModelMeta>(&e.value, MAX_META_BYTES)
                        && (current.version == meta.version || !supersedes(meta, &current))
                    {
                        return Ok(());
                    }
                    self.kv.update(meta.name.as_str(), record.clone(), e.revision).await.is_ok()
                }
                _ => self.kv.create(meta.name.as_str(), record.clone()).await.is_ok(),
            };
            if moved {
                return Ok(());
            }
        }
        Err(Error::Registry(format!("{}: could not move its latest version; try again", meta.name)))
    }

    /// Removes one version of a model, or every version (`None`): each version's record
    /// becomes its tombstone (so its number is never given to other bytes), its key and
    /// its bytes are deleted, and `latest` moves to the newest version left (or goes).
    /// Tasks of a removed version still in flight fail. Returns what was removed, oldest
    /// first; nothing when there was nothing to remove.
    pub async fn remove(&self, name: &str, version: Option<&str>) -> Result<Vec<ModelMeta>, Error> {
        let versions = self.versions(name).await?;
        let doomed: Vec<String> = match version {
            Some(v) => versions.published.iter().filter(|p| *p == v).cloned().collect(),
            None => versions.published.clone(),
        };
        let mut removed = Vec::new();
        for v in &doomed {
            let key = version_key(name, v);
            let Some((meta, _)) = self.stored(&key).await? else { continue };
            // Tombstone first: a crash half-way leaves the number reserved, never free.
            self.kv.put(tombstone_key(name, v), Bytes::from(encode(&meta))).await.map_err(js_err)?;
            self.kv.purge(&key).await.map_err(js_err)?;
            removed.push(meta);
        }
        if removed.is_empty() {
            return Ok(removed);
        }
        let latest = self.stored(name).await?.map(|(m, _)| m.version);
        if latest.is_some_and(|l| !doomed.contains(&l)) {
            return Ok(self.delete_bytes(removed).await);
        }
        let mut newest: Option<ModelMeta> = None;
        for v in versions.published.iter().filter(|p| !doomed.contains(p)) {
            if let Some((meta, _)) = self.stored(&version_key(name, v)).await?
                && newest.as_ref().is_none_or(|n| supersedes(&meta, n))
            {
                newest = Some(meta);
            }
        }
        match newest {
            Some(meta) => {
                self.kv.put(name, Bytes::from(encode(&meta))).await.map_err(js_err)?;
            }
            None => self.kv.purge(name).await.map_err(js_err)?,
        }
        Ok(self.delete_bytes(removed).await)
    }

    /// Deletes the bytes of removed versions (last: no record points to them any more).
    async fn delete_bytes(&self, removed: Vec<ModelMeta>) -> Vec<ModelMeta> {
        for meta in &removed {
            if let Err(e) = self.blobs.delete(meta.object.as_str()).await {
                tracing::warn!(object = %meta.object, error = %e, "could not delete a removed version's bytes");
            }
        }
        removed
    }

    /// Names of the models the watch has seen so far (no I/O): a model pushed while a
    /// service runs shows up here within moments.
    pub fn known_names(&self) -> Vec<String> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = cache.keys().filter(|k| !k.contains('.')).cloned().collect();
        names.sort();
        names
    }

    /// The latest version of every model, by name.
    pub async fn list(&self) -> Result<Vec<ModelMeta>, Error> {
        let mut keys = self.kv.keys().await.map_err(js_err)?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(js_err)?;
            if !key.contains('.') {
                names.push(key);
            }
        }
        names.sort();
        let mut models = Vec::new();
        for name in names {
            if let Some(meta) = self.latest(&name).await? {
                models.push((*meta).clone());
            }
        }
        Ok(models)
    }

    /// The model's ONNX bytes, checked against the recorded sha256.
    pub async fn fetch(&self, meta: &ModelMeta) -> Result<Vec<u8>, Error> {
        let mut object = self.blobs.get(meta.object.as_str()).await.map_err(js_err)?;
        let mut bytes = Vec::with_capacity(meta.size.min(1 << 30) as usize);
        object.read_to_end(&mut bytes).await.map_err(|e| Error::Registry(format!("reading {}: {e}", meta.object)))?;
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != meta.sha256 {
            return Err(Error::Registry(format!(
                "{}@{}: blob sha256 {digest} does not match the registry's {}",
                meta.name, meta.version, meta.sha256
            )));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(published: &[&str], removed: &[&str]) -> Versions {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Versions { published: own(published), removed: own(removed) }
    }

    #[test]
    fn the_next_version_skips_every_number_ever_used() {
        assert_eq!(versions(&[], &[]).next(), "1");
        assert_eq!(versions(&["1", "2"], &[]).next(), "3");
        assert_eq!(versions(&["1"], &["2", "7"]).next(), "8", "removed numbers stay taken");
        assert_eq!(versions(&["beta", "3"], &[]).next(), "4");
    }

    #[test]
    fn the_latest_is_the_highest_number_else_the_last_pushed() {
        let meta = |version: &str, at: u64| ModelMeta {
            v: 1,
            name: "m".into(),
            version: version.into(),
            sha256: String::new(),
            size: 0,
            object: String::new(),
            inputs: vec![],
            outputs: vec![],
            policy: Default::default(),
            pushed_at_ms: at,
            batching: Default::default(),
            lineage: None,
        };
        assert!(supersedes(&meta("10", 1), &meta("9", 2)), "numbers, not push times or text");
        assert!(!supersedes(&meta("2", 5), &meta("3", 1)));
        assert!(supersedes(&meta("beta", 5), &meta("3", 1)));
        assert!(!supersedes(&meta("beta", 1), &meta("3", 5)));
    }
}
