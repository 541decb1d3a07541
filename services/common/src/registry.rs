//! The model registry: metadata in KV bucket `models`, ONNX bytes in object store
//! `model-blobs`. Key `<name>` holds the latest version, `<name>.<version>` each version.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use bytes::Bytes;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use sundara_schemas::{ModelMeta, decode, encode, subjects as subj};
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
        self.lookup(version_key(name, version)).await
    }

    /// Stores the bytes, then the version record, then moves `latest` to it.
    pub async fn push(&self, meta: &ModelMeta, bytes: &[u8]) -> Result<(), Error> {
        let digest = hex::encode(Sha256::digest(bytes));
        if digest != meta.sha256 {
            return Err(Error::Registry(format!("sha256 of the bytes is {digest}, the record says {}", meta.sha256)));
        }
        let mut reader = bytes;
        self.blobs.put(meta.object.as_str(), &mut reader).await.map_err(js_err)?;
        let record = Bytes::from(encode(meta));
        self.kv.put(version_key(&meta.name, &meta.version), record.clone()).await.map_err(js_err)?;
        self.kv.put(meta.name.as_str(), record).await.map_err(js_err)?;
        Ok(())
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
