//! On-disk model cache: each model version is fetched from the registry once, checked
//! against its sha256, and kept as `<name>-<version>-<sha12>.onnx`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::{Error as CommonError, Registry};
use sha2::{Digest, Sha256};
use sundara_schemas::{ModelMeta, ModelRef};
use tokio::sync::{Mutex, OnceCell};

pub struct ModelCache {
    dir: PathBuf,
    registry: Registry,
    entries: Mutex<HashMap<String, Arc<OnceCell<Arc<PathBuf>>>>>,
}

impl ModelCache {
    pub fn new(dir: PathBuf, registry: Registry) -> ModelCache {
        ModelCache { dir, registry, entries: Mutex::default() }
    }

    /// Path of the model's verified file, fetching it on first need. Concurrent callers
    /// for the same model share one fetch.
    pub async fn path(&self, meta: &ModelMeta) -> Result<Arc<PathBuf>, CommonError> {
        let key = ModelRef::spec(&meta.name, &meta.version);
        let cell = self.entries.lock().await.entry(key).or_default().clone();
        cell.get_or_try_init(|| self.materialise(meta)).await.cloned()
    }

    async fn materialise(&self, meta: &ModelMeta) -> Result<Arc<PathBuf>, CommonError> {
        let sha = &meta.sha256[..meta.sha256.len().min(12)];
        let path = self.dir.join(format!("{}-{}-{sha}.onnx", meta.name, meta.version));
        let io = |e: std::io::Error| CommonError::Registry(format!("model cache {}: {e}", path.display()));
        if let Ok(bytes) = tokio::fs::read(&path).await
            && hex::encode(Sha256::digest(&bytes)) == meta.sha256
        {
            return Ok(Arc::new(path));
        }
        let bytes = self.registry.fetch(meta).await?;
        tokio::fs::create_dir_all(&self.dir).await.map_err(io)?;
        // Unique per writer: several workers (processes or tasks) may share one cache dir.
        let partial = path.with_extension(format!("partial-{}-{:016x}", std::process::id(), rand::random::<u64>()));
        tokio::fs::write(&partial, &bytes).await.map_err(io)?;
        tokio::fs::rename(&partial, &path).await.map_err(io)?;
        tracing::info!(model = %meta.name, version = %meta.version, bytes = bytes.len(), "model cached");
        Ok(Arc::new(path))
    }
}
