//! Registering models (published versions are immutable), removing them, and making
//! inputs for them.

use std::path::Path;

use sha2::{Digest, Sha256};
use sundara_common::registry::{PushError, Pushed};
use sundara_common::{Capacity, Registry};
use sundara_schemas::{
    Batching, Lineage, ModelMeta, ModelRef, Policy, TensorSpec, WIRE_VERSION, now_ms, subjects as subj,
};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("model name and version must be 1-64 of [A-Za-z0-9_-], got {0:?}")]
    InvalidName(String),
    #[error("no model {0} to remove")]
    NotFound(String),
    #[error(transparent)]
    Push(#[from] PushError),
    #[error(transparent)]
    Runtime(#[from] sundara_runtime::RuntimeError),
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// Reads an ONNX file, learns its inputs and outputs by loading it, and registers it as
/// `name@version`. Pushing the same bytes and policy again is a no-op that returns the
/// record first published; other bytes or another policy are refused ([`PushError`]).
pub async fn push(
    registry: &Registry,
    file: &Path,
    name: &str,
    version: &str,
    policy: Policy,
    batching: Batching,
) -> Result<ModelMeta, ModelError> {
    Ok(publish(registry, file, name, Some(version), policy, batching).await?.into_meta())
}

/// As [`push`]; without a version, the next one (see [`Registry::push_next`]): the same
/// bytes and policy as the latest version change nothing, others become a new version.
pub async fn publish(
    registry: &Registry,
    file: &Path,
    name: &str,
    version: Option<&str>,
    policy: Policy,
    batching: Batching,
) -> Result<Pushed, ModelError> {
    let bytes = std::fs::read(file).map_err(|source| ModelError::Read { path: file.display().to_string(), source })?;
    publish_bytes(registry, &bytes, Published { name, version, policy, batching, lineage: None }).await
}

/// What a version is published as.
pub struct Published<'a> {
    pub name: &'a str,
    /// `None`: the next version.
    pub version: Option<&'a str>,
    pub policy: Policy,
    pub batching: Batching,
    pub lineage: Option<Lineage>,
}

/// As [`publish`], for ONNX bytes made in this process (a trained version's).
pub async fn publish_bytes(registry: &Registry, bytes: &[u8], what: Published<'_>) -> Result<Pushed, ModelError> {
    let Published { name, version, policy, batching, lineage } = what;
    for n in std::iter::once(name).chain(version) {
        if !subj::is_token(n) {
            return Err(ModelError::InvalidName(n.to_string()));
        }
    }
    let model = sundara_runtime::Model::load(bytes, 1)?;
    let meta = ModelMeta {
        v: WIRE_VERSION,
        name: name.to_string(),
        version: version.unwrap_or_default().to_string(),
        sha256: hex::encode(Sha256::digest(bytes)),
        size: bytes.len() as u64,
        // Set by the registry.
        object: String::new(),
        inputs: model.inputs.clone(),
        outputs: model.outputs.clone(),
        policy,
        pushed_at_ms: now_ms(),
        batching,
        lineage,
    };
    Ok(match version {
        Some(_) => registry.push(&meta, bytes).await?,
        None => registry.push_next(&meta, bytes).await?,
    })
}

/// What `models push` says about a policy that works but checks little: k=1 means no
/// cross-check between miners, only audits (and with no audits, no check at all).
pub fn policy_warnings(meta: &ModelMeta) -> Vec<String> {
    let (name, p) = (&meta.name, &meta.policy);
    match (p.redundancy, p.audit_rate) {
        (1, rate) if rate <= 0.0 => vec![format!(
            "warning: {name} has k=1 and no audits: nothing checks its results (a miner's answer goes to the \
             client as it is)"
        )],
        (1, rate) => vec![format!(
            "warning: {name} has k=1: no miner's answer is cross-checked by another; only audits ({}% of tasks) \
             check them",
            rate * 100.0
        )],
        _ => Vec::new(),
    }
}

/// What `models push` says about a policy the fleet cannot serve now: a task needs k
/// distinct operators (`operators`: those with a live worker now, see
/// [`Capacity::live_operators`]). `None` when there are enough.
pub fn fleet_warning(meta: &ModelMeta, operators: &[String]) -> Option<String> {
    let k = usize::from(meta.policy.redundancy);
    if operators.len() >= k {
        return None;
    }
    if k == 1 {
        return Some(format!(
            "warning: {} needs a live worker; the fleet has none now: its tasks will wait",
            meta.name
        ));
    }
    let now = if operators.is_empty() {
        "none now".to_string()
    } else {
        format!("{} now ({})", operators.len(), operators.join(", "))
    };
    Some(format!(
        "warning: {} needs {k} distinct operators per task; the fleet has {now}: its tasks will wait until more join",
        meta.name
    ))
}

/// The live operators of the fleet, for [`fleet_warning`]; `Err` with why when Redis
/// cannot be read within 2 s (a client machine often cannot reach it).
pub async fn fleet_operators(endpoints: &sundara_common::Endpoints) -> Result<Vec<String>, FleetUnread> {
    let read = async {
        let capacity = Capacity::open(endpoints).await?;
        capacity.live_operators(None).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
        Ok(Ok(operators)) => Ok(operators),
        Ok(Err(e)) => Err(FleetUnread::Redis(e)),
        Err(_) => Err(FleetUnread::TimedOut),
    }
}

/// Why [`fleet_operators`] could not read the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetUnread {
    #[error(transparent)]
    Redis(sundara_common::Error),
    #[error("timed out")]
    TimedOut,
}

/// Removes `name@version`, or every version of `name` (see [`Registry::remove`]).
pub async fn remove(registry: &Registry, spec: &str) -> Result<Vec<ModelMeta>, ModelError> {
    let (name, version) = ModelRef::split_spec(spec);
    for n in std::iter::once(name).chain(version) {
        if !subj::is_token(n) {
            return Err(ModelError::InvalidName(n.to_string()));
        }
    }
    let removed = registry.remove(name, version).await?;
    if removed.is_empty() {
        return Err(ModelError::NotFound(spec.to_string()));
    }
    Ok(removed)
}

/// One line per model for `sundara models list`.
pub fn describe(m: &ModelMeta) -> String {
    let specs = |s: &[TensorSpec]| {
        s.iter()
            .map(|t| format!("{}:{}{}", t.name, t.dtype, sundara_schemas::model::shape_text(&t.shape)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut line = format!(
        "{:<12} {:<8} k={} {:<34} {:>9} B  sha256 {}…  in: {}  out: {}",
        m.name,
        m.version,
        m.policy.redundancy,
        m.policy.rule.to_string(),
        m.size,
        &m.sha256[..12],
        specs(&m.inputs),
        specs(&m.outputs)
    );
    if let Some(l) = &m.lineage {
        line.push_str(&format!(
            "  trained: run {} by {}, from {}, {} steps, {} verified tasks since{}",
            l.run,
            l.trained_with,
            l.parent.as_deref().unwrap_or("seed"),
            l.steps,
            l.tasks.len(),
            l.test_accuracy.map_or(String::new(), |a| format!(", held-out accuracy {:.2} %", 100.0 * a)),
        ));
    }
    line
}

/// Random inputs that fit a model (see [`sundara_runtime::example_inputs`]).
pub use sundara_runtime::example_inputs as sample_inputs;
