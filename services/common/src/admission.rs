//! Admission: per-tenant limits (rate, tasks in flight, payload size, highest priority) and
//! the fleet-wide bound on tasks in flight. The counts are kept in Redis so that every
//! ingress replica enforces the same numbers. A task counts as in flight from its admission until its result is stored or
//! its deadline passes, whichever comes first, so a lost release never leaks a slot for
//! longer than the task's own deadline.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use sundara_schemas::Priority;

use crate::{Capacity, Error};

/// [`TenantLimits::max_stored_bytes`]' default: an eighth of TASKS' default size, so a few
/// tenants at their quota still leave room for the others.
pub const DEFAULT_MAX_STORED_BYTES: u64 = 512 << 20;

/// One tenant's limits.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantLimits {
    /// Sustained submissions per second; `None` for no rate limit.
    pub rate_per_s: Option<f64>,
    /// Submissions accepted at once before the rate applies (at least 1).
    pub burst: u32,
    /// Tasks admitted and not yet finished.
    pub max_in_flight: u32,
    /// Largest submission, in bytes (ingress' own maximum applies above it).
    pub max_payload_bytes: usize,
    /// Bytes its tasks may take in TASKS at once. A task's bytes count from its admission
    /// until it leaves TASKS (its deadline plus the linger), not until its result: what
    /// the broker stores is what this bounds, so that no tenant can fill TASKS for others.
    pub max_stored_bytes: u64,
    /// The highest priority its tasks may ask for: an entitlement, `normal` unless `high`
    /// is granted. A request above it is refused, not lowered.
    pub max_priority: Priority,
}

impl Default for TenantLimits {
    fn default() -> Self {
        TenantLimits {
            rate_per_s: None,
            burst: 100,
            max_in_flight: 10_000,
            max_payload_bytes: sundara_schemas::MAX_SUBMISSION_BYTES,
            max_stored_bytes: DEFAULT_MAX_STORED_BYTES,
            max_priority: Priority::Normal,
        }
    }
}

impl TenantLimits {
    /// Whether a task may ask for `priority`.
    pub fn permits(&self, priority: Priority) -> bool {
        priority <= self.max_priority
    }
}

/// Limits for every tenant: a default and per-tenant overrides.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantPolicy {
    pub default: TenantLimits,
    pub tenants: HashMap<String, TenantLimits>,
}

impl TenantPolicy {
    pub fn limits(&self, tenant: &str) -> &TenantLimits {
        self.tenants.get(tenant).unwrap_or(&self.default)
    }

    /// Reads a policy from JSON: `{"default": {...}, "tenants": {"acme": {...}}}`; fields
    /// left out take their defaults.
    pub fn from_json(text: &str) -> Result<TenantPolicy, PolicyError> {
        let policy: TenantPolicy = serde_json::from_str(text)?;
        for (name, limits) in
            std::iter::once(("default", &policy.default)).chain(policy.tenants.iter().map(|(n, l)| (n.as_str(), l)))
        {
            if limits.rate_per_s.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                return Err(PolicyError::RatePerS { tenant: name.to_string() });
            }
        }
        Ok(policy)
    }
}

/// Why a tenant policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("{tenant}: rate_per_s must be a positive number")]
    RatePerS { tenant: String },
}

/// Why a task was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the tenant's rate: it may submit again after this long.
    RateLimited { retry_after: Duration },
    /// The tenant has `max_in_flight` tasks in flight.
    TenantInFlight { max: u32 },
    /// The fleet has `max` tasks in flight.
    FleetInFlight { max: u64 },
    /// The tenant's tasks still in TASKS take `max` bytes, its quota.
    StoredBytes { max: u64 },
}

/// `lua/admit.lua`: the tenant's and the fleet's counts, checked and updated at once.
static ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/admit.lua")));

/// One task asking to be admitted.
#[derive(Clone, Copy, Debug)]
pub struct Admission<'a> {
    pub tenant: &'a str,
    pub task: &'a str,
    /// Its deadline (Unix ms): it counts as in flight until then at most.
    pub deadline_ms: u64,
    /// Its size as stored in TASKS.
    pub bytes: u64,
    /// When it leaves TASKS (Unix ms): its bytes count against the tenant until then.
    pub stored_until_ms: u64,
}

impl Capacity {
    /// Admits a task under its tenant's `limits` and the fleet's `fleet_max` tasks in
    /// flight, or says why not. Idempotent per task.
    pub async fn admit(
        &self,
        task: &Admission<'_>,
        limits: &TenantLimits,
        fleet_max: u64,
    ) -> Result<Result<(), Refusal>, Error> {
        let mut con = self.con.clone();
        let mut call = ADMIT.prepare_invoke();
        call.arg(task.tenant)
            .arg(task.task)
            .arg(sundara_schemas::now_ms())
            .arg(task.deadline_ms)
            .arg(limits.rate_per_s.unwrap_or(0.0))
            .arg(limits.burst.max(1))
            .arg(limits.max_in_flight)
            .arg(fleet_max)
            .arg(task.bytes)
            .arg(task.stored_until_ms)
            .arg(limits.max_stored_bytes);
        let answer: Vec<u64> = call.invoke_async(&mut con).await?;
        Ok(match answer.as_slice() {
            [0] => Ok(()),
            [1, after] => Err(Refusal::RateLimited { retry_after: Duration::from_millis(*after) }),
            [2] => Err(Refusal::TenantInFlight { max: limits.max_in_flight }),
            [3] => Err(Refusal::FleetInFlight { max: fleet_max }),
            _ => Err(Refusal::StoredBytes { max: limits.max_stored_bytes }),
        })
    }

    /// A task admitted but never stored (TASKS refused it): its bytes no longer count
    /// against its tenant. [`Capacity::finish`] releases the rest.
    pub async fn unstore(&self, tenant: &str, task: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        let prefix = format!("sundara:tenant:{tenant}");
        let bytes: Option<i64> =
            redis::cmd("HGET").arg(format!("{prefix}:stored_bytes")).arg(task).query_async(&mut con).await?;
        let Some(bytes) = bytes else { return Ok(()) };
        redis::pipe()
            .atomic()
            .hdel(format!("{prefix}:stored_bytes"), task)
            .ignore()
            .zrem(format!("{prefix}:stored"), task)
            .ignore()
            .decr(format!("{prefix}:stored_total"), bytes)
            .ignore()
            .query_async::<()>(&mut con)
            .await?;
        Ok(())
    }

    /// Bytes of `tenant`'s tasks still in TASKS, as its quota counts them.
    pub async fn stored_bytes(&self, tenant: &str) -> Result<u64, Error> {
        let mut con = self.con.clone();
        let total: Option<i64> =
            redis::cmd("GET").arg(format!("sundara:tenant:{tenant}:stored_total")).query_async(&mut con).await?;
        Ok(total.unwrap_or(0).max(0) as u64)
    }

    /// A task of `tenant` is finished (its result is stored) or was never stored: it no
    /// longer counts against any limit, and the record of which workers held it (kept
    /// for an hour past its deadline otherwise) goes, so Redis holds per-task state only
    /// for tasks in flight.
    pub async fn finish(&self, tenant: &str, task: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        redis::pipe()
            .zrem(format!("sundara:tenant:{tenant}:inflight"), task)
            .ignore()
            .zrem("sundara:inflight:tasks", task)
            .ignore()
            .del(format!("sundara:taskw:{task}"))
            .ignore()
            .query_async::<()>(&mut con)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_from_json_with_defaults_and_overrides() {
        let p =
            TenantPolicy::from_json(r#"{"default": {"max_in_flight": 5}, "tenants": {"acme": {"rate_per_s": 2.5}}}"#)
                .unwrap();
        assert_eq!(p.limits("other").max_in_flight, 5);
        assert_eq!(p.limits("other").rate_per_s, None);
        assert_eq!(p.limits("acme").rate_per_s, Some(2.5));
        assert_eq!(p.limits("acme").max_in_flight, TenantLimits::default().max_in_flight, "fields left out default");
        assert!(TenantPolicy::from_json(r#"{"default": {"rate_per_s": 0}}"#).is_err());
        assert!(TenantPolicy::from_json(r#"{"default": {"rate": 1}}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn priority_is_an_entitlement_normal_unless_granted() {
        let p = TenantPolicy::from_json(
            r#"{"tenants": {"vip": {"max_priority": "high"}, "batch": {"max_priority": "low"}}}"#,
        )
        .unwrap();
        let asks = |tenant: &str| Priority::ALL.map(|priority| p.limits(tenant).permits(priority));
        // [high, normal, low]
        assert_eq!(asks("vip"), [true, true, true]);
        assert_eq!(asks("other"), [false, true, true], "the default is normal");
        assert_eq!(asks("batch"), [false, false, true]);
        assert!(TenantPolicy::from_json(r#"{"default": {"max_priority": "urgent"}}"#).is_err());
    }
}
