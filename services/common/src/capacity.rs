//! Device capacity in Redis: slices, heartbeats, atomic reservations and in-flight
//! assignments. Every multi-key change is one Lua script, so concurrent schedulers never
//! double-book a slot.
//!
//! Keys (all under `sundara:`):
//! - `workers` set of worker ids; `worker:<w>` hash {operator, state, slices}; `hb:<w>` heartbeat (PX TTL)
//! - `slice:<s>` hash {worker, operator, device, slots_total, slots_free, state, reason,
//!   memory_total, memory_free, loads, evictions, lanes, cold_from, cold_to (the last load
//!   RELEASE measured there, µs)}; `slice:<s>:models` set of models it serves;
//!   `slice:<s>:loaded` hash `name@version` → bytes its sessions there hold now;
//!   `slice:<s>:warm` set of model names loaded there now (from `loaded`);
//!   `slice:<s>:footprint` hash `name@version` → bytes of one session as the slice measured it
//!   (the miner's claim: it only ever rules that slice out, see [`Capacity::fit`])
//! - `slicemem` sorted set of live slices by memory_total (the largest slice in the fleet)
//! - `quarantined` hash worker → why: never chosen again (RESERVE skips them);
//!   `quarantined_ops` hash operator → why: none of its workers is chosen, whatever their
//!   names. [`Capacity::release_quarantine`] lifts both (`sundara fleet release`)
//! - `timeouts` hash worker → assignments it let time out while alive
//! - `cand:<model>` sorted set of live slices with a free slot that serve the model, scored
//!   by expected completion time of one more task (see `RESCORE_FN`): fastest first
//! - `slice:<s>:svc` hash model → µs per task there, a moving average measured on the
//!   validator side by RELEASE (reserved → answer stored, over the queue ahead of it);
//!   `svc` hash model → the same over the whole fleet (slower average); `slice:<s>:load`
//!   and `loadus` hashes model → the load time measured the same way from reservations made
//!   where the model was not loaded (per slice, fleet). No miner's claim writes any of them;
//!   `reputation` hash worker → share of its outcomes that agreed (written by the rewarder)
//! - `asg:<task>.<replica>.<attempt>` hash {slice, worker, answer_by, ticket, handed, model,
//!   at (µs), queue (in use ahead / lanes), cold (the slice did not report the model
//!   loaded)}: a reserved slot (`handed`: made due by a hand-back, failure, death or quarantine, not a
//!   timeout)
//! - `taskw:<task>` set of workers that hold or held a replica of the task (kept distinct)
//! - `inflight` sorted set of assignment ids by timeout deadline (ms); `inflight:w:<w>` per worker
//!
//! Scripts touch keys they derive from their arguments: this needs a standalone Redis
//! (not Redis Cluster), which is what Sundara deploys.

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

pub use sundara_schemas::{SliceAnnounce, WorkerAnnounce};

use sundara_schemas::ModelRef;

use crate::Error;

pub const PREFIX: &str = "sundara:";

pub fn hb_key(worker: &str) -> String {
    format!("sundara:hb:{worker}")
}
pub fn slice_key(slice: &str) -> String {
    format!("sundara:slice:{slice}")
}
pub fn cand_key(model: &str) -> String {
    format!("sundara:cand:{model}")
}
fn asg_key(aid: &str) -> String {
    format!("sundara:asg:{aid}")
}
/// Who answered an assignment and when OUTCOMES stored the answer: [`Capacity::release`]
/// frees the slot only if that worker holds it and answered in time.
#[derive(Clone, Copy, Debug)]
pub struct Answer<'a> {
    pub worker: &'a str,
    pub stored_at_ms: u64,
}

fn footprint_key(slice: &str) -> String {
    format!("sundara:slice:{slice}:footprint")
}

/// Most live slices [`Capacity::fit`] reads, largest first, before it admits.
const FIT_SCAN: usize = 256;
const WORKERS: &str = "sundara:workers";
const SLICEMEM: &str = "sundara:slicemem";
const QUARANTINED: &str = "sundara:quarantined";
const QUARANTINED_OPERATORS: &str = "sundara:quarantined_ops";
const INFLIGHT: &str = "sundara:inflight";
const SERVICE: &str = "sundara:svc";
const REPUTATION: &str = "sundara:reputation";

/// Lua shared by the scripts that change a slice's load: `rescore(s)` puts the slice in
/// the candidate set of each model it serves, scored by the expected completion time (µs)
/// of one more task of that model there, or takes it out when it is not alive or full.
///
/// expected = cold + service × (1 + in use / lanes), where service is the slice's own
/// time per task of the model as the validator side measured it (RELEASE), else the
/// fleet's (10 ms unknown), and cold = 0 where the slice reports the model loaded, else
/// the load time measured the same way, the slice's own or the fleet's (1 s unknown). The product is scaled by (2 − reputation), reputation being
/// the worker's share of agreeing outcomes (1 when unknown), and the slice's memory in GiB
/// is added as a tie-breaker (1 µs per GiB): among equals the smallest device that fits is
/// chosen. Also `measure_fields`: what RESERVE keeps in `asg:<aid>` for RELEASE to measure.
const RESCORE_FN: &str = include_str!("lua/rescore_fn.lua");

/// Reserves one slot on each of up to k distinct workers for the given assignment ids, or
/// nothing. Ids already reserved (a redelivered task) keep their slot.
/// KEYS: cand:<model>, taskw:<task>. ARGV: n, scan, timeout_at_ms, ttl_ms, random (1: pick
/// among candidates at random, the baseline placement), aid_1..aid_n.
/// Returns {slice_1, worker_1, ...} in aid order, or {} when not enough capacity.
const RESERVE: &str = include_str!("lua/reserve.lua");

/// After a worker's announcement: sets each slice's models (a model it no longer serves
/// leaves that model's candidate set) and rescores it.
/// ARGV: per slice, its id, the number of its models n, then the n models.
const RESCORE: &str = include_str!("lua/rescore.lua");

/// Frees an assignment's slot. Idempotent: a second release of the same id does nothing.
/// ARGV: aid, and optionally the worker that must hold it (else nothing is freed), when
/// its answer was stored (ms): an answer after the assignment's deadline frees nothing, so
/// the sweep still gives the replica to another miner; and the same in µs (optional).
/// An answer that frees the slot also updates the slice's measured service time (`svc`).
/// Returns 1 if it freed a slot.
const RELEASE: &str = include_str!("lua/release.lua");

/// Claims in-flight assignments whose timeout has passed, leasing each for `lease_ms`
/// so that another scheduler replica does not claim it too.
/// ARGV: now_ms, lease_ms, limit. Returns the claimed ids.
const CLAIM_DUE: &str = include_str!("lua/claim_due.lua");

/// For admission: whether a model version fits a live slice (see the script).
/// ARGV: `name@version`, scan. Returns {footprint or -1, memory} or {}.
const FIT: &str = include_str!("lua/fit.lua");

/// Declares a worker dead unless its heartbeat came back: its slices leave the candidate
/// sets and its in-flight assignments fall due at once (the scheduler reassigns them).
/// ARGV: worker. Returns the number of assignments made due, or -1 if not dead.
const MARK_DEAD: &str = include_str!("lua/mark_dead.lua");

/// Takes one slice of a live worker out of service: it leaves the candidate sets, and
/// its in-flight assignments fall due at once (the scheduler sends them elsewhere).
/// The worker becomes eligible again for those tasks (another of its slices may run them).
/// KEYS: slice:<s>. ARGV: slice, worker, reason. Returns the number of assignments made due.
const FAIL_SLICE: &str = include_str!("lua/fail_slice.lua");

/// Hands one assignment back, only from its holder while it is live: due now, and the
/// worker (which gave no outcome for it) is eligible again for the replica, on another of
/// its slices. ARGV: aid, worker. Returns 1 if accepted.
const HAND_BACK: &str = include_str!("lua/hand_back.lua");

/// Quarantines a worker: it is never chosen again, its slices leave the candidate sets,
/// and its in-flight assignments fall due at once (the scheduler sends them elsewhere).
/// ARGV: worker, reason. Returns 1 if it was not quarantined before; 0 (changing nothing,
/// so the first reason stands) if it was.
const QUARANTINE: &str = include_str!("lua/quarantine.lua");

/// Lifts the quarantine of an operator and of its workers (see the script).
/// ARGV: operator (or worker). Returns {1 if the operator was quarantined, else 0, workers released...}.
const RELEASE_QUARANTINE: &str = include_str!("lua/release_quarantine.lua");

/// Counts a timed-out assignment against its worker: one that its worker neither answered
/// nor handed back while alive (dead workers, failed slices, quarantines and hand-backs
/// mark theirs `handed`). ARGV: aid, worker. Returns the worker's timeouts so far, or 0
/// when this one does not count.
const TIMEOUT_STRIKE: &str = include_str!("lua/timeout_strike.lua");

/// What [`Capacity::release_quarantine`] lifted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// The operator itself was quarantined.
    pub operator: bool,
    /// Its workers that were.
    pub workers: Vec<String>,
}

/// A slice as Redis has it.
#[derive(Clone, Debug, Default)]
pub struct SliceState {
    pub id: String,
    pub worker: String,
    pub device: String,
    pub state: String,
    pub reason: String,
    pub slots_total: u32,
    pub slots_free: u32,
    pub memory_total: u64,
    pub memory_free: u64,
    pub loaded: Vec<(String, u64)>,
    pub loads: u64,
    pub evictions: u64,
}

impl SliceState {
    /// Slots reserved for assignments (never more than it has).
    pub fn slots_in_use(&self) -> u32 {
        self.slots_total - self.slots_free.min(self.slots_total)
    }

    /// Bytes its loaded models hold (never more than it has).
    pub fn memory_in_use(&self) -> u64 {
        self.memory_total - self.memory_free.min(self.memory_total)
    }
}

/// Handle on the capacity store. Clones share one multiplexed, reconnecting connection.
#[derive(Clone)]
pub struct Capacity {
    pub(crate) con: ConnectionManager,
    reserve: Script,
    release: Script,
    claim_due: Script,
    mark_dead: Script,
    fail_slice: Script,
    quarantine: Script,
    release_quarantine: Script,
    hand_back: Script,
    timeout_strike: Script,
    rescore: Script,
    fit: Script,
}

/// Where one replica of a task was reserved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pick {
    pub slice: String,
    pub worker: String,
    /// The worker's operator (the worker's own id when it named none).
    pub operator: String,
}

/// The terms of a reservation.
#[derive(Clone, Copy, Debug)]
pub struct ReserveTerms {
    /// When its assignments time out (Unix ms).
    pub timeout_at_ms: u64,
    /// How long the reservation itself lives.
    pub ttl_ms: u64,
    /// Candidates read per window.
    pub scan: usize,
    pub placement: Placement,
}

/// How RESERVE chooses among candidates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// The live slices with a free slot and the lowest expected completion time (see
    /// `RESCORE_FN`).
    #[default]
    ExpectedCompletion,
    /// Any live slices with a free slot, at random: the original Sundara's choice, kept as
    /// the benchmarks' baseline.
    Random,
}

/// A Redis client for `url`, over TLS pinned to `ca` where given (see
/// [`Capacity::connect_with`]).
pub fn redis_client(url: &str, ca: Option<&std::path::Path>) -> Result<redis::Client, redis::RedisError> {
    let invalid = |what: String| redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "Redis TLS", what));
    match ca {
        None => redis::Client::open(url),
        Some(_) if !url.starts_with("rediss://") => {
            Err(invalid(format!("a CA is given for {}, which is not a rediss:// URL", crate::redacted(url))))
        }
        Some(ca) => {
            let root_cert = std::fs::read(ca).map_err(|e| invalid(format!("the CA {}: {e}", ca.display())))?;
            let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert) };
            redis::Client::build_with_tls(url, certificates)
        }
    }
}

impl Capacity {
    pub async fn connect(url: &str) -> Result<Capacity, Error> {
        Capacity::connect_with(url, None).await
    }

    /// Connects to the Redis of `endpoints`: over TLS for a `rediss://` URL, trusting only
    /// its CA when it names one.
    pub async fn open(endpoints: &crate::Endpoints) -> Result<Capacity, Error> {
        Capacity::connect_with(&endpoints.redis_url, endpoints.redis_ca.as_deref()).await
    }

    /// Connects to `url`; a `rediss://` server's certificate must be signed by `ca` if given
    /// (else by one of the system's roots). A CA for a plain `redis://` URL is refused: TLS
    /// was meant and would silently not be used.
    pub async fn connect_with(url: &str, ca: Option<&std::path::Path>) -> Result<Capacity, Error> {
        let client = redis_client(url, ca)?;
        let con = tokio::time::timeout(std::time::Duration::from_secs(10), ConnectionManager::new(client))
            .await
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "timed out connecting to Redis")))??;
        Ok(Capacity {
            con,
            reserve: Script::new(&format!("{RESCORE_FN}{RESERVE}")),
            release: Script::new(&format!("{RESCORE_FN}{RELEASE}")),
            claim_due: Script::new(CLAIM_DUE),
            mark_dead: Script::new(MARK_DEAD),
            fail_slice: Script::new(FAIL_SLICE),
            quarantine: Script::new(QUARANTINE),
            release_quarantine: Script::new(RELEASE_QUARANTINE),
            hand_back: Script::new(HAND_BACK),
            timeout_strike: Script::new(TIMEOUT_STRIKE),
            rescore: Script::new(&format!("{RESCORE_FN}{RESCORE}")),
            fit: Script::new(FIT),
        })
    }

    /// Announces a worker and its slices and refreshes its heartbeat, atomically.
    /// `fresh` (a worker's start) resets free slots to the total; a heartbeat only sets
    /// them where Redis lost them (a restart), so it never undoes reservations.
    ///
    /// Everything in `a` is written as stated: miners' announcements reach here only
    /// through the fleet gateway ([`crate::gateway`]), which bounds them, refuses models
    /// not in the registry and clears `service_us` and `load_us`. Writes only the worker's
    /// and its slices' own keys (and `slicemem`), never a fleet-wide estimate.
    pub async fn announce(&self, a: &WorkerAnnounce, fresh: bool, heartbeat_ttl_ms: u64) -> Result<(), Error> {
        self.announce_standing(a, fresh, heartbeat_ttl_ms).await.map(drop)
    }

    /// [`Capacity::announce`], returning why the worker is quarantined, if it is: what the
    /// fleet gateway tells the worker, so that a quarantined miner's log says so.
    pub async fn announce_standing(
        &self,
        a: &WorkerAnnounce,
        fresh: bool,
        heartbeat_ttl_ms: u64,
    ) -> Result<Option<String>, Error> {
        let mut con = self.con.clone();
        let quarantined = self.quarantine_of(a).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let slice_ids: Vec<&str> = a.slices.iter().map(|s| s.id.as_str()).collect();
        pipe.sadd(WORKERS, &a.worker).ignore();
        let worker_state = if quarantined.is_some() { "quarantined" } else { "alive" };
        pipe.hset_multiple(
            format!("sundara:worker:{}", a.worker),
            &[("operator", a.operator.as_str()), ("state", worker_state), ("slices", &slice_ids.join(","))],
        )
        .ignore();
        for s in &a.slices {
            write_slice(&mut pipe, a, s, fresh, quarantined.as_deref());
        }
        pipe.pset_ex(hb_key(&a.worker), 1, heartbeat_ttl_ms).ignore();
        pipe.query_async::<()>(&mut con).await?;
        // The models each slice serves, and its place in their candidate sets.
        let mut rescore = self.rescore.prepare_invoke();
        for s in &a.slices {
            rescore.arg(&s.id).arg(s.models.len()).arg(&s.models);
        }
        rescore.invoke_async::<()>(&mut con).await?;
        Ok(quarantined)
    }

    /// Why `a`'s worker is quarantined, if it is: itself, or (on its first announce) as a
    /// name of a quarantined operator, which quarantines it now.
    async fn quarantine_of(&self, a: &WorkerAnnounce) -> Result<Option<String>, Error> {
        let mut con = self.con.clone();
        // A quarantined worker stays announced (operators see it) but never a candidate.
        if let Some(why) = con.hget::<_, _, Option<String>>(QUARANTINED, &a.worker).await? {
            return Ok(Some(why));
        }
        match con.hget::<_, _, Option<String>>(QUARANTINED_OPERATORS, &a.operator).await? {
            Some(why) => {
                self.quarantine(&a.worker, &why).await?;
                Ok(Some(why))
            }
            None => Ok(None),
        }
    }

    /// Reserves slots for `aids` (one per replica) on distinct workers of distinct
    /// operators serving `model`. Returns a [`Pick`] per aid, or `None` when capacity is
    /// short (nothing reserved).
    pub async fn reserve(
        &self,
        model: &str,
        task_id: &str,
        aids: &[String],
        terms: ReserveTerms,
    ) -> Result<Option<Vec<Pick>>, Error> {
        let mut inv = self.reserve.prepare_invoke();
        inv.key(cand_key(model)).key(format!("sundara:taskw:{task_id}"));
        let random = u8::from(terms.placement == Placement::Random);
        inv.arg(aids.len()).arg(terms.scan).arg(terms.timeout_at_ms).arg(terms.ttl_ms).arg(random);
        for aid in aids {
            inv.arg(aid);
        }
        let mut con = self.con.clone();
        let flat: Vec<String> = inv.invoke_async(&mut con).await?;
        if flat.is_empty() {
            return Ok(None);
        }
        let pick = |p: &[String]| Pick { slice: p[0].clone(), worker: p[1].clone(), operator: p[2].clone() };
        Ok(Some(flat.chunks_exact(3).map(pick).collect()))
    }

    /// Keeps the signed ticket beside the reservation (to reassign it later).
    pub async fn store_ticket(&self, aid: &str, ticket: &[u8]) -> Result<(), Error> {
        let mut con = self.con.clone();
        con.hset::<_, _, _, ()>(asg_key(aid), "ticket", ticket).await?;
        Ok(())
    }

    pub async fn ticket(&self, aid: &str) -> Result<Option<Vec<u8>>, Error> {
        let mut con = self.con.clone();
        Ok(con.hget(asg_key(aid), "ticket").await?)
    }

    /// Frees the slot of an assignment, when given only if `holder` is the worker that
    /// holds it (an outcome names its worker in its subject); `true` if this call freed it.
    pub async fn release(&self, aid: &str, holder: Option<Answer<'_>>) -> Result<bool, Error> {
        let mut con = self.con.clone();
        let mut inv = self.release.prepare_invoke();
        inv.arg(aid);
        if let Some(answer) = holder {
            inv.arg(answer.worker).arg(answer.stored_at_ms);
        }
        let freed: i64 = inv.invoke_async(&mut con).await?;
        Ok(freed == 1)
    }

    /// [`Capacity::release`] for an answer from `worker` that OUTCOMES stored at
    /// `stored_at_us` (Unix µs): frees the slot only if that worker holds it and answered
    /// in time, and then measures the slice's service time from it (reserved → stored, over
    /// the queue that was ahead of it), in µs rather than the ms of an [`Answer`].
    pub async fn release_answer(&self, aid: &str, worker: &str, stored_at_us: u64) -> Result<bool, Error> {
        let mut con = self.con.clone();
        let mut inv = self.release.prepare_invoke();
        inv.arg(aid).arg(worker).arg(stored_at_us / 1000).arg(stored_at_us);
        let freed: i64 = inv.invoke_async(&mut con).await?;
        Ok(freed == 1)
    }

    /// Claims up to `limit` assignments whose timeout has passed.
    pub async fn claim_due(&self, now_ms: u64, lease_ms: u64, limit: usize) -> Result<Vec<String>, Error> {
        let mut con = self.con.clone();
        Ok(self.claim_due.arg(now_ms).arg(lease_ms).arg(limit).invoke_async(&mut con).await?)
    }

    /// Makes a claimed in-flight assignment due at `at_ms` (if it is still in flight).
    pub async fn defer(&self, aid: &str, at_ms: u64) -> Result<(), Error> {
        let mut con = self.con.clone();
        redis::cmd("ZADD").arg(INFLIGHT).arg("XX").arg(at_ms).arg(aid).query_async::<()>(&mut con).await?;
        Ok(())
    }

    /// All workers ever announced since Redis last started.
    pub async fn workers(&self) -> Result<Vec<String>, Error> {
        let mut con = self.con.clone();
        let mut ws: Vec<String> = con.smembers(WORKERS).await?;
        ws.sort();
        Ok(ws)
    }

    /// Per worker: `(heartbeat present, state)`.
    pub async fn health(&self, workers: &[String]) -> Result<Vec<(bool, Option<String>)>, Error> {
        if workers.is_empty() {
            // Redis refuses an empty pipeline.
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for w in workers {
            pipe.exists(hb_key(w));
            pipe.hget(format!("sundara:worker:{w}"), "state");
        }
        let mut con = self.con.clone();
        let flat: Vec<redis::Value> = pipe.query_async(&mut con).await?;
        let mut out = Vec::with_capacity(workers.len());
        for pair in flat.chunks_exact(2) {
            let alive: bool = redis::from_redis_value(pair[0].clone()).map_err(redis::RedisError::from)?;
            let state: Option<String> = redis::from_redis_value(pair[1].clone()).map_err(redis::RedisError::from)?;
            out.push((alive, state));
        }
        Ok(out)
    }

    /// Declares `worker` dead (see MARK_DEAD). `Some(n)` with the number of its in-flight
    /// assignments made due; `None` if it is alive again or already dead.
    pub async fn mark_dead(&self, worker: &str) -> Result<Option<u64>, Error> {
        let mut con = self.con.clone();
        let n: i64 = self.mark_dead.arg(worker).invoke_async(&mut con).await?;
        Ok(u64::try_from(n).ok())
    }

    /// Takes a slice out of service (see FAIL_SLICE); returns how many of its assignments
    /// were made due for reassignment.
    pub async fn fail_slice(&self, slice: &str, worker: &str, reason: &str) -> Result<u64, Error> {
        let mut con = self.con.clone();
        let mut inv = self.fail_slice.key(slice_key(slice));
        inv.arg(slice).arg(worker).arg(reason);
        Ok(inv.invoke_async(&mut con).await?)
    }

    /// Hands an assignment back for reassignment (see HAND_BACK); `false` when `worker`
    /// does not hold it live (another's, answered, released or unknown): nothing changes.
    pub async fn hand_back(&self, aid: &str, worker: &str) -> Result<bool, Error> {
        let mut con = self.con.clone();
        let accepted: i64 = self.hand_back.arg(aid).arg(worker).invoke_async(&mut con).await?;
        Ok(accepted == 1)
    }

    /// The operator a worker was first announced with, if it was.
    pub async fn operator_of(&self, worker: &str) -> Result<Option<String>, Error> {
        let mut con = self.con.clone();
        Ok(con.hget(format!("sundara:worker:{worker}"), "operator").await?)
    }

    /// Counts a timed-out assignment against `worker` (see TIMEOUT_STRIKE); returns its
    /// timeouts so far, or 0 if this one does not count.
    pub async fn timeout_strike(&self, aid: &str, worker: &str) -> Result<u64, Error> {
        let mut con = self.con.clone();
        Ok(self.timeout_strike.arg(aid).arg(worker).invoke_async(&mut con).await?)
    }

    /// Quarantines `worker` (see QUARANTINE); `true` the first time.
    pub async fn quarantine(&self, worker: &str, reason: &str) -> Result<bool, Error> {
        let mut con = self.con.clone();
        let fresh: i64 = self.quarantine.arg(worker).arg(reason).invoke_async(&mut con).await?;
        Ok(fresh == 1)
    }

    /// The fleet's time per task (µs), by model name: a moving average of every answered
    /// assignment as the validator side measured it (RELEASE), not what workers state.
    pub async fn service_times(&self) -> Result<std::collections::HashMap<String, u64>, Error> {
        let mut con = self.con.clone();
        Ok(con.hgetall(SERVICE).await?)
    }

    /// Sets workers' reputations (their share of agreeing outcomes, 0 to 1), which scale
    /// their slices' candidate scores from their next change on.
    pub async fn set_reputation(&self, reputations: &[(String, f64)]) -> Result<(), Error> {
        if reputations.is_empty() {
            return Ok(());
        }
        let mut con = self.con.clone();
        con.hset_multiple::<_, _, _, ()>(REPUTATION, reputations).await?;
        Ok(())
    }

    /// Quarantines an operator: `RESERVE` never picks a slice of it again, whatever the
    /// worker's name. The rewarder also quarantines each of its workers it knows.
    pub async fn quarantine_operator(&self, operator: &str, reason: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        con.hset_nx::<_, _, _, ()>(QUARANTINED_OPERATORS, operator, reason).await?;
        Ok(())
    }

    /// Quarantined workers and why.
    pub async fn quarantined(&self) -> Result<std::collections::BTreeMap<String, String>, Error> {
        let mut con = self.con.clone();
        Ok(con.hgetall(QUARANTINED).await?)
    }

    /// Quarantined operators and why (the rewarder's, once enough of an operator's outputs
    /// are proven wrong).
    pub async fn quarantined_operators(&self) -> Result<std::collections::BTreeMap<String, String>, Error> {
        let mut con = self.con.clone();
        Ok(con.hgetall(QUARANTINED_OPERATORS).await?)
    }

    /// Lifts the quarantine of `operator` and of every worker announced with it (a worker
    /// id works too: a worker names itself as operator when it names none), forgetting
    /// their timeouts (see `RELEASE_QUARANTINE`). The workers get work again from their
    /// next heartbeat. The rewarder keeps its proofs: one more proven-wrong output
    /// quarantines them again.
    pub async fn release_quarantine(&self, operator: &str) -> Result<Released, Error> {
        let mut con = self.con.clone();
        let out: Vec<redis::Value> = self.release_quarantine.arg(operator).invoke_async(&mut con).await?;
        fn value<T: redis::FromRedisValue>(v: &redis::Value) -> Result<T, redis::RedisError> {
            redis::from_redis_value(v.clone()).map_err(redis::RedisError::from)
        }
        let operator_was: i64 = out.first().map(value).transpose()?.unwrap_or(0);
        let workers = out.iter().skip(1).map(value).collect::<Result<Vec<String>, _>>()?;
        Ok(Released { operator: operator_was == 1, workers })
    }

    /// The worker a slice belongs to, if Redis knows the slice.
    pub async fn slice_owner(&self, slice: &str) -> Result<Option<String>, Error> {
        let mut con = self.con.clone();
        Ok(con.hget(slice_key(slice), "worker").await?)
    }

    /// Stops offering `model` on a slice (it cannot hold it).
    pub async fn withdraw(&self, slice: &str, model: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        redis::pipe()
            .atomic()
            .srem(format!("{}:models", slice_key(slice)), model)
            .ignore()
            .zrem(cand_key(model), slice)
            .ignore()
            .query_async::<()>(&mut con)
            .await?;
        Ok(())
    }

    /// Footprints (bytes of one session) per `name@version`: for each, the median (the
    /// lower one of an even count) of what the live slices that measured it report, so no
    /// single miner's claim sets it while most slices are honest. Reads every live slice.
    pub async fn footprints(&self) -> Result<std::collections::BTreeMap<String, u64>, Error> {
        let mut con = self.con.clone();
        let live: Vec<String> = con.zrange(SLICEMEM, 0, -1).await?;
        if live.is_empty() {
            return Ok(Default::default());
        }
        let mut pipe = redis::pipe();
        for s in &live {
            pipe.hgetall(footprint_key(s));
        }
        let per_slice: Vec<std::collections::HashMap<String, u64>> = pipe.query_async(&mut con).await?;
        let mut all: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for (model, bytes) in per_slice.into_iter().flatten() {
            all.entry(model).or_default().push(bytes);
        }
        Ok(all
            .into_iter()
            .map(|(model, mut sizes)| {
                sizes.sort_unstable();
                (model, sizes[(sizes.len() - 1) / 2])
            })
            .collect())
    }

    /// For admission: a footprint of a model version (`name@version`) and a slice memory
    /// to hold it against, such that the model fits when the footprint (its file size when
    /// `None`) is at most the memory; `(None, None)` admits (no live slice, or more slices
    /// ruling themselves out than one call reads).
    ///
    /// Footprints are the miners' claims, so a slice's footprint only ever rules out that
    /// slice: the memory is that of the largest live slice that does not report the model
    /// larger than itself, and the footprint its own (at most that memory) or none. So no
    /// miner can make a model too large for the fleet by claiming a giant footprint (a
    /// denial of service for every client of the model); a miner can make ingress admit
    /// tasks no slice can run (a tiny footprint or a huge memory), which then wait and
    /// expire with a reason, as they would in a fleet that is busy. When every live slice
    /// rules itself out, the largest one's footprint and memory (which refuse).
    pub async fn fit(&self, model_key: &str) -> Result<(Option<u64>, Option<u64>), Error> {
        let mut con = self.con.clone();
        let found: Vec<i64> = self.fit.arg(model_key).arg(FIT_SCAN).invoke_async(&mut con).await?;
        Ok(match found[..] {
            [footprint, memory] => (u64::try_from(footprint).ok(), u64::try_from(memory).ok()),
            _ => (None, None),
        })
    }

    /// Every slice of the given worker, as stored.
    pub async fn slices_of(&self, worker: &str) -> Result<Vec<SliceState>, Error> {
        let mut con = self.con.clone();
        let list: Option<String> = con.hget(format!("sundara:worker:{worker}"), "slices").await?;
        let mut out = Vec::new();
        for id in list.unwrap_or_default().split(',').filter(|s| !s.is_empty()) {
            let h: std::collections::HashMap<String, String> = con.hgetall(slice_key(id)).await?;
            let num = |k: &str| h.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
            let text = |k: &str| h.get(k).cloned().unwrap_or_default();
            let loaded: std::collections::BTreeMap<String, u64> =
                con.hgetall(format!("{}:loaded", slice_key(id))).await?;
            let loaded = loaded.into_iter().collect();
            out.push(SliceState {
                id: id.to_string(),
                worker: text("worker"),
                device: text("device"),
                state: text("state"),
                reason: text("reason"),
                slots_total: num("slots_total") as u32,
                slots_free: num("slots_free") as u32,
                memory_total: num("memory_total"),
                memory_free: num("memory_free"),
                loaded,
                loads: num("loads"),
                evictions: num("evictions"),
            });
        }
        Ok(out)
    }

    /// The distinct operators (sorted) that have a live worker now (announced `alive`, with
    /// a heartbeat, neither it nor its operator quarantined) with a live slice, serving
    /// `model` when one is given: how many replicas of a task of that model RESERVE could
    /// place at once. Read-only, three round trips whatever the fleet's size.
    pub async fn live_operators(&self, model: Option<&str>) -> Result<Vec<String>, Error> {
        let mut con = self.con.clone();
        let workers: Vec<String> = con.smembers(WORKERS).await?;
        if workers.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for w in &workers {
            pipe.cmd("HMGET").arg(format!("sundara:worker:{w}")).arg("operator").arg("state").arg("slices");
            pipe.exists(hb_key(w));
            pipe.hexists(QUARANTINED, w);
        }
        let flat: Vec<redis::Value> = pipe.query_async(&mut con).await?;
        fn value<T: redis::FromRedisValue>(v: &redis::Value) -> Result<T, redis::RedisError> {
            redis::from_redis_value(v.clone()).map_err(redis::RedisError::from)
        }
        // (operator, slice) of every slice of a live worker.
        let mut slices = Vec::new();
        for (w, row) in workers.iter().zip(flat.chunks_exact(3)) {
            let fields: Vec<Option<String>> = value(&row[0])?;
            let (alive, quarantined): (bool, bool) = (value(&row[1])?, value(&row[2])?);
            let [operator, state, list] = [0, 1, 2].map(|i| fields.get(i).cloned().flatten().unwrap_or_default());
            if !alive || quarantined || state != "alive" {
                continue;
            }
            let operator = if operator.is_empty() { w.clone() } else { operator };
            for s in list.split(',').filter(|s| !s.is_empty()) {
                slices.push((operator.clone(), s.to_string()));
            }
        }
        if slices.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (operator, s) in &slices {
            pipe.hget(slice_key(s), "state");
            match model {
                Some(m) => pipe.sismember(format!("{}:models", slice_key(s)), m),
                None => pipe.exists(slice_key(s)),
            };
            pipe.hexists(QUARANTINED_OPERATORS, operator);
        }
        let flat: Vec<redis::Value> = pipe.query_async(&mut con).await?;
        let mut operators = std::collections::BTreeSet::new();
        for ((operator, _), row) in slices.iter().zip(flat.chunks_exact(3)) {
            let state: Option<String> = value(&row[0])?;
            let (serves, banned): (bool, bool) = (value(&row[1])?, value(&row[2])?);
            if state.as_deref() == Some("alive") && serves && !banned {
                operators.insert(operator.clone());
            }
        }
        Ok(operators.into_iter().collect())
    }

    /// Number of assignments in flight.
    pub async fn inflight(&self) -> Result<u64, Error> {
        let mut con = self.con.clone();
        Ok(con.zcard(INFLIGHT).await?)
    }
}

/// Adds to `pipe` the writes of one announced slice: its state, sizes, loaded and warm
/// models, stated service times, footprints and its place in the memory index.
fn write_slice(
    pipe: &mut redis::Pipeline,
    a: &WorkerAnnounce,
    s: &SliceAnnounce,
    fresh: bool,
    quarantined: Option<&str>,
) {
    let key = slice_key(&s.id);
    let alive = s.failed.is_none() && quarantined.is_none();
    let (state, reason) = match (quarantined, &s.failed) {
        (Some(why), _) => ("quarantined", why),
        (None, Some(why)) => ("failed", why.as_str()),
        (None, None) => ("alive", ""),
    };
    pipe.hset_multiple(
        &key,
        &[
            ("worker", a.worker.as_str()),
            ("operator", a.operator.as_str()),
            ("device", s.device.as_str()),
            ("state", state),
            ("reason", reason),
        ],
    )
    .ignore();
    pipe.hset_multiple(
        &key,
        &[
            ("slots_total", s.slots as u64),
            ("memory_total", s.memory_total),
            ("memory_free", s.memory_free),
            ("loads", s.loads),
            ("evictions", s.evictions),
            ("lanes", s.lanes.max(1) as u64),
        ],
    )
    .ignore();
    if fresh {
        pipe.hset(&key, "slots_free", s.slots).ignore();
    } else {
        pipe.hset_nx(&key, "slots_free", s.slots).ignore();
    }
    pipe.del(format!("{key}:loaded")).ignore();
    if !s.loaded.is_empty() {
        pipe.hset_multiple(format!("{key}:loaded"), &s.loaded).ignore();
    }
    // Models loaded there now, by name: no load before their next task. A named
    // service time also says so (as the worker reports one only for those).
    let warm: std::collections::BTreeSet<&str> = s
        .loaded
        .iter()
        .map(|(k, _)| ModelRef::spec_name(k))
        .chain(s.service_us.iter().map(|(m, _)| m.as_str()))
        .collect();
    pipe.del(format!("{key}:warm")).ignore();
    if !warm.is_empty() {
        pipe.sadd(format!("{key}:warm"), warm.into_iter().collect::<Vec<_>>()).ignore();
    }
    // A stated service time only seeds a slice's measured one (RELEASE then moves
    // it); the fleet gateway clears miners' statements, so for them it is measured
    // from the first answer on. Load times are not used.
    for (model, us) in &s.service_us {
        pipe.hset_nx(format!("{key}:svc"), model, *us).ignore();
    }
    // Per slice, never fleet-wide: one slice's footprint only rules that slice out.
    pipe.del(footprint_key(&s.id)).ignore();
    if !s.footprints.is_empty() {
        pipe.hset_multiple(footprint_key(&s.id), &s.footprints).ignore();
    }
    if alive {
        pipe.zadd(SLICEMEM, &s.id, s.memory_total).ignore();
    } else {
        pipe.zrem(SLICEMEM, &s.id).ignore();
    }
}
