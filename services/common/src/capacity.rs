//! Device capacity in Redis: slices, heartbeats, atomic reservations and in-flight
//! assignments. Every multi-key change is one Lua script, so concurrent schedulers never
//! double-book a slot.
//!
//! Keys (all under `sundara:`):
//! - `workers` set of worker ids; `worker:<w>` hash {operator, state, slices}; `hb:<w>` heartbeat (PX TTL)
//! - `slice:<s>` hash {worker, operator, device, slots_total, slots_free, state, reason,
//!   memory_total, memory_free, loads, evictions, lanes}; `slice:<s>:models` set of models it serves;
//!   `slice:<s>:loaded` hash `name@version` → bytes its sessions there hold now
//! - `slicemem` sorted set of live slices by memory_total (the largest slice in the fleet)
//! - `footprint` hash `name@version` → measured bytes of one loaded session
//! - `quarantined` hash worker → why: never chosen again (RESERVE skips them)
//! - `timeouts` hash worker → assignments it let time out while alive
//! - `cand:<model>` sorted set of live slices with a free slot that serve the model, scored
//!   by expected completion time of one more task (see `RESCORE_FN`): fastest first
//! - `slice:<s>:svc` hash model → measured µs per task there (models loaded now); `svc` and
//!   `loadus` hashes model → the fleet's latest service and load times; `reputation` hash
//!   worker → share of its outcomes that agreed (written by the rewarder)
//! - `asg:<task>.<replica>.<attempt>` hash {slice, worker, ticket, handed}: a reserved slot
//!   (`handed`: made due by a hand-back, failure, death or quarantine, not a timeout)
//! - `taskw:<task>` set of workers that hold or held a replica of the task (kept distinct)
//! - `inflight` sorted set of assignment ids by timeout deadline (ms); `inflight:w:<w>` per worker
//!
//! Scripts touch keys they derive from their arguments: this needs a standalone Redis
//! (not Redis Cluster), which is what Sundara deploys.

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};

pub use sundara_schemas::{SliceAnnounce, WorkerAnnounce};

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

const WORKERS: &str = "sundara:workers";
const SLICEMEM: &str = "sundara:slicemem";
const FOOTPRINT: &str = "sundara:footprint";
const QUARANTINED: &str = "sundara:quarantined";
const INFLIGHT: &str = "sundara:inflight";
const SERVICE: &str = "sundara:svc";
const LOAD_US: &str = "sundara:loadus";
const REPUTATION: &str = "sundara:reputation";

/// Lua shared by the scripts that change a slice's load: `rescore(s)` puts the slice in
/// the candidate set of each model it serves, scored by the expected completion time (µs)
/// of one more task of that model there, or takes it out when it is not alive or full.
///
/// expected = cold + service × (1 + in use / lanes), where service is the slice's own
/// measured time per task of the model when the model is loaded there, else the fleet's
/// latest measurement (10 ms unknown) plus cold = the model's measured load time (1 s
/// unknown). The product is scaled by (2 − reputation), reputation being the worker's
/// share of agreeing outcomes (1 when unknown), and the slice's memory in GiB is added as a
/// tie-breaker (1 µs per GiB): among equals the smallest device that fits is chosen.
const RESCORE_FN: &str = r#"
local function rescore(s)
  local key = 'sundara:slice:' .. s
  local h = redis.call('HMGET', key, 'state', 'slots_total', 'slots_free', 'lanes', 'memory_total', 'worker')
  local models = redis.call('SMEMBERS', key .. ':models')
  local free = tonumber(h[3])
  if h[1] ~= 'alive' or not free or free <= 0 then
    for _, m in ipairs(models) do redis.call('ZREM', 'sundara:cand:' .. m, s) end
    return
  end
  local in_use = math.max((tonumber(h[2]) or free) - free, 0)
  local lanes = math.max(tonumber(h[4]) or 1, 1)
  local gib = (tonumber(h[5]) or 0) / 1073741824
  local rep = h[6] and tonumber(redis.call('HGET', 'sundara:reputation', h[6])) or 1
  for _, m in ipairs(models) do
    local service = tonumber(redis.call('HGET', key .. ':svc', m))
    local cold = 0
    if not service then
      service = tonumber(redis.call('HGET', 'sundara:svc', m)) or 10000
      cold = tonumber(redis.call('HGET', 'sundara:loadus', m)) or 1000000
    end
    local expected = cold + service * (1 + in_use / lanes)
    redis.call('ZADD', 'sundara:cand:' .. m, expected * (2 - rep) + gib, s)
  end
end
"#;

/// Reserves one slot on each of up to k distinct workers for the given assignment ids, or
/// nothing. Ids already reserved (a redelivered task) keep their slot.
/// KEYS: cand:<model>, taskw:<task>. ARGV: n, scan, timeout_at_ms, ttl_ms, random (1: pick
/// among candidates at random, the baseline placement), aid_1..aid_n.
/// Returns {slice_1, worker_1, ...} in aid order, or {} when not enough capacity.
const RESERVE: &str = r#"
local n = tonumber(ARGV[1])
local scan = tonumber(ARGV[2])
local timeout_at = ARGV[3]
local ttl = tonumber(ARGV[4])
local random = ARGV[5] == '1'
local used, usedop = {}, {}
for _, w in ipairs(redis.call('SMEMBERS', KEYS[2])) do used[w] = true end
local result, need = {}, {}
for i = 1, n do
  local aid = ARGV[5 + i]
  local held = redis.call('HMGET', 'sundara:asg:' .. aid, 'slice', 'worker')
  if held[1] then result[i] = {held[1], held[2]} else table.insert(need, i) end
end
if #need > 0 then
  -- The candidate set holds only live slices with a free slot, ordered by expected
  -- completion time, so walking it in order and taking the first eligible slices picks
  -- the fastest: one look per replica when nothing is excluded (O(log N) for the range).
  -- At most 4 windows of `scan` are read (slices of workers that already hold the task,
  -- or of an operator already picked, or quarantined, are skipped).
  local picks = {}
  local seen = 0
  while #picks < #need and seen < scan * 4 do
    local cands
    if random then
      cands = redis.call('ZRANDMEMBER', KEYS[1], scan)
    else
      cands = redis.call('ZRANGE', KEYS[1], seen, seen + scan - 1)
    end
    if #cands == 0 then break end
    for _, s in ipairs(cands) do
      seen = seen + 1
      local h = redis.call('HMGET', 'sundara:slice:' .. s, 'worker', 'slots_free', 'state', 'operator')
      local w, free, op = h[1], tonumber(h[2]), h[4]
      local op_known = op and op ~= ''
      if w and h[3] == 'alive' and free and free > 0 and not used[w] and not (op_known and usedop[op])
          and redis.call('HEXISTS', 'sundara:quarantined', w) == 0 then
        used[w] = true
        if op_known then usedop[op] = true end
        table.insert(picks, {s, w})
        if #picks == #need then break end
      end
    end
  end
  if #picks < #need then return {} end
  for j, i in ipairs(need) do
    local s, w, aid = picks[j][1], picks[j][2], ARGV[5 + i]
    redis.call('HINCRBY', 'sundara:slice:' .. s, 'slots_free', -1)
    rescore(s)
    redis.call('HSET', 'sundara:asg:' .. aid, 'slice', s, 'worker', w, 'answer_by', timeout_at)
    redis.call('PEXPIRE', 'sundara:asg:' .. aid, ttl)
    redis.call('ZADD', 'sundara:inflight', timeout_at, aid)
    redis.call('SADD', 'sundara:inflight:w:' .. w, aid)
    redis.call('SADD', KEYS[2], w)
    redis.call('PEXPIRE', KEYS[2], ttl)
    result[i] = {s, w}
  end
end
local flat = {}
for i = 1, n do table.insert(flat, result[i][1]); table.insert(flat, result[i][2]) end
return flat
"#;

/// After a worker's announcement: sets each slice's models (a model it no longer serves
/// leaves that model's candidate set) and rescores it.
/// ARGV: per slice, its id, the number of its models n, then the n models.
const RESCORE: &str = r#"
local i = 1
while i <= #ARGV do
  local s, n = ARGV[i], tonumber(ARGV[i + 1])
  local key = 'sundara:slice:' .. s .. ':models'
  local serves = {}
  for j = 1, n do serves[ARGV[i + 1 + j]] = true end
  for _, m in ipairs(redis.call('SMEMBERS', key)) do
    if not serves[m] then redis.call('ZREM', 'sundara:cand:' .. m, s) end
  end
  redis.call('DEL', key)
  if n > 0 then redis.call('SADD', key, unpack(ARGV, i + 2, i + 1 + n)) end
  rescore(s)
  i = i + 2 + n
end
return 1
"#;

/// Frees an assignment's slot. Idempotent: a second release of the same id does nothing.
/// ARGV: aid, and optionally the worker that must hold it (else nothing is freed) and when
/// its answer was stored (ms): an answer after the assignment's deadline frees nothing, so
/// the sweep still gives the replica to another miner.
/// Returns 1 if it freed a slot.
const RELEASE: &str = r#"
local key = 'sundara:asg:' .. ARGV[1]
local h = redis.call('HMGET', key, 'slice', 'worker', 'answer_by')
if not h[1] then return 0 end
if ARGV[2] and ARGV[2] ~= h[2] then return 0 end
if ARGV[3] and h[3] and tonumber(ARGV[3]) > tonumber(h[3]) then return 0 end
redis.call('DEL', key)
redis.call('ZREM', 'sundara:inflight', ARGV[1])
redis.call('SREM', 'sundara:inflight:w:' .. h[2], ARGV[1])
local slice = 'sundara:slice:' .. h[1]
if redis.call('EXISTS', slice) == 1 then
  local free = redis.call('HINCRBY', slice, 'slots_free', 1)
  local total = tonumber(redis.call('HGET', slice, 'slots_total'))
  if total and free > total then
    redis.call('HSET', slice, 'slots_free', total)
  end
  -- A dead, failed or quarantined slice stays out of the candidate sets.
  rescore(h[1])
end
return 1
"#;

/// Claims in-flight assignments whose timeout has passed, leasing each for `lease_ms`
/// so that another scheduler replica does not claim it too.
/// ARGV: now_ms, lease_ms, limit. Returns the claimed ids.
const CLAIM_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', 'sundara:inflight', '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local lease = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, aid in ipairs(due) do redis.call('ZADD', 'sundara:inflight', lease, aid) end
return due
"#;

/// Declares a worker dead unless its heartbeat came back: its slices leave the candidate
/// sets and its in-flight assignments fall due at once (the scheduler reassigns them).
/// ARGV: worker. Returns the number of assignments made due, or -1 if not dead.
const MARK_DEAD: &str = r#"
local w = ARGV[1]
if redis.call('EXISTS', 'sundara:hb:' .. w) == 1 then return -1 end
local wkey = 'sundara:worker:' .. w
if redis.call('HGET', wkey, 'state') == 'dead' then return -1 end
redis.call('HSET', wkey, 'state', 'dead')
local slices = redis.call('HGET', wkey, 'slices') or ''
for s in string.gmatch(slices, '[^,]+') do
  redis.call('HSET', 'sundara:slice:' .. s, 'state', 'dead')
  redis.call('ZREM', 'sundara:slicemem', s)
  for _, m in ipairs(redis.call('SMEMBERS', 'sundara:slice:' .. s .. ':models')) do
    redis.call('ZREM', 'sundara:cand:' .. m, s)
  end
end
local aids = redis.call('SMEMBERS', 'sundara:inflight:w:' .. w)
for _, aid in ipairs(aids) do
  redis.call('ZADD', 'sundara:inflight', 0, aid)
  redis.call('HSET', 'sundara:asg:' .. aid, 'handed', 1)
end
return #aids
"#;

/// Takes one slice of a live worker out of service: it leaves the candidate sets, and
/// its in-flight assignments fall due at once (the scheduler sends them elsewhere).
/// The worker becomes eligible again for those tasks (another of its slices may run them).
/// KEYS: slice:<s>. ARGV: slice, worker, reason. Returns the number of assignments made due.
const FAIL_SLICE: &str = r#"
local s, w = ARGV[1], ARGV[2]
redis.call('HSET', KEYS[1], 'state', 'failed', 'reason', ARGV[3])
redis.call('ZREM', 'sundara:slicemem', s)
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1] .. ':models')) do
  redis.call('ZREM', 'sundara:cand:' .. m, s)
end
local n = 0
for _, aid in ipairs(redis.call('SMEMBERS', 'sundara:inflight:w:' .. w)) do
  if redis.call('HGET', 'sundara:asg:' .. aid, 'slice') == s then
    redis.call('ZADD', 'sundara:inflight', 0, aid)
    redis.call('HSET', 'sundara:asg:' .. aid, 'handed', 1)
    -- The worker gave no outcome for it: another of its slices may take the replica.
    redis.call('SREM', 'sundara:taskw:' .. string.match(aid, '^[^.]+'), w)
    n = n + 1
  end
end
return n
"#;

/// Hands one assignment back: due now, and its worker (which gave no outcome for it) is
/// eligible again for the replica, on another of its slices.
/// ARGV: aid, worker.
const HAND_BACK: &str = r#"
local holder = redis.call('HGET', 'sundara:asg:' .. ARGV[1], 'worker')
if holder and holder ~= ARGV[2] then return 0 end
redis.call('ZADD', 'sundara:inflight', 'XX', 0, ARGV[1])
if redis.call('EXISTS', 'sundara:asg:' .. ARGV[1]) == 1 then redis.call('HSET', 'sundara:asg:' .. ARGV[1], 'handed', 1) end
redis.call('SREM', 'sundara:taskw:' .. string.match(ARGV[1], '^[^.]+'), ARGV[2])
return 1
"#;

/// Quarantines a worker: it is never chosen again, its slices leave the candidate sets,
/// and its in-flight assignments fall due at once (the scheduler sends them elsewhere).
/// ARGV: worker, reason. Returns 1 if it was not quarantined before; 0 (changing nothing,
/// so the first reason stands) if it was.
const QUARANTINE: &str = r#"
local w = ARGV[1]
if redis.call('HSETNX', 'sundara:quarantined', w, ARGV[2]) == 0 then return 0 end
redis.call('HSET', 'sundara:worker:' .. w, 'state', 'quarantined')
local slices = redis.call('HGET', 'sundara:worker:' .. w, 'slices') or ''
for s in string.gmatch(slices, '[^,]+') do
  redis.call('HSET', 'sundara:slice:' .. s, 'state', 'quarantined', 'reason', ARGV[2])
  redis.call('ZREM', 'sundara:slicemem', s)
  for _, m in ipairs(redis.call('SMEMBERS', 'sundara:slice:' .. s .. ':models')) do
    redis.call('ZREM', 'sundara:cand:' .. m, s)
  end
end
for _, aid in ipairs(redis.call('SMEMBERS', 'sundara:inflight:w:' .. w)) do
  redis.call('ZADD', 'sundara:inflight', 0, aid)
  redis.call('HSET', 'sundara:asg:' .. aid, 'handed', 1)
end
return 1
"#;

/// Counts a timed-out assignment against its worker: one that its worker neither answered
/// nor handed back while alive (dead workers, failed slices, quarantines and hand-backs
/// mark theirs `handed`). ARGV: aid, worker. Returns the worker's timeouts so far, or 0
/// when this one does not count.
const TIMEOUT_STRIKE: &str = r#"
local h = redis.call('HMGET', 'sundara:asg:' .. ARGV[1], 'handed', 'worker')
if h[1] or h[2] ~= ARGV[2] then return 0 end
if redis.call('EXISTS', 'sundara:hb:' .. ARGV[2]) == 0 then return 0 end
-- Counted once, however often its reassignment is retried.
redis.call('HSET', 'sundara:asg:' .. ARGV[1], 'handed', 1)
return redis.call('HINCRBY', 'sundara:timeouts', ARGV[2], 1)
"#;

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
    hand_back: Script,
    timeout_strike: Script,
    rescore: Script,
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

impl Capacity {
    pub async fn connect(url: &str) -> Result<Capacity, Error> {
        let client = redis::Client::open(url)?;
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
            hand_back: Script::new(HAND_BACK),
            timeout_strike: Script::new(TIMEOUT_STRIKE),
            rescore: Script::new(&format!("{RESCORE_FN}{RESCORE}")),
        })
    }

    /// Announces a worker and its slices and refreshes its heartbeat, atomically.
    /// `fresh` (a worker's start) resets free slots to the total; a heartbeat only sets
    /// them where Redis lost them (a restart), so it never undoes reservations.
    pub async fn announce(&self, a: &WorkerAnnounce, fresh: bool, heartbeat_ttl_ms: u64) -> Result<(), Error> {
        let mut con = self.con.clone();
        // A quarantined worker stays announced (operators see it) but never a candidate.
        let quarantined: Option<String> = con.hget(QUARANTINED, &a.worker).await?;
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
            let key = slice_key(&s.id);
            let alive = s.failed.is_none() && quarantined.is_none();
            let (state, reason) = match (&quarantined, &s.failed) {
                (Some(why), _) => ("quarantined", why.as_str()),
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
            pipe.del(format!("{key}:svc")).ignore();
            if !s.service_us.is_empty() {
                pipe.hset_multiple(format!("{key}:svc"), &s.service_us).ignore();
                // The fleet's latest measurement: the estimate where a model is not loaded.
                pipe.hset_multiple(SERVICE, &s.service_us).ignore();
            }
            if !s.load_us.is_empty() {
                pipe.hset_multiple(LOAD_US, &s.load_us).ignore();
            }
            if !s.footprints.is_empty() {
                pipe.hset_multiple(FOOTPRINT, &s.footprints).ignore();
            }
            if alive {
                pipe.zadd(SLICEMEM, &s.id, s.memory_total).ignore();
            } else {
                pipe.zrem(SLICEMEM, &s.id).ignore();
            }
        }
        pipe.pset_ex(hb_key(&a.worker), 1, heartbeat_ttl_ms).ignore();
        pipe.query_async::<()>(&mut con).await?;
        // The models each slice serves, and its place in their candidate sets.
        let mut rescore = self.rescore.prepare_invoke();
        for s in &a.slices {
            rescore.arg(&s.id).arg(s.models.len()).arg(&s.models);
        }
        rescore.invoke_async::<()>(&mut con).await?;
        Ok(())
    }

    /// Reserves slots for `aids` (one per replica) on distinct workers serving `model`.
    /// Returns `(slice, worker)` per aid, or `None` when capacity is short (nothing reserved).
    pub async fn reserve(
        &self,
        model: &str,
        task_id: &str,
        aids: &[String],
        terms: ReserveTerms,
    ) -> Result<Option<Vec<(String, String)>>, Error> {
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
        Ok(Some(flat.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone())).collect()))
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

    /// Hands an assignment back for reassignment (see HAND_BACK).
    pub async fn hand_back(&self, aid: &str, worker: &str) -> Result<(), Error> {
        let mut con = self.con.clone();
        self.hand_back.arg(aid).arg(worker).invoke_async::<i64>(&mut con).await?;
        Ok(())
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

    /// The fleet's latest measured inference time per task (µs), by model name.
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

    /// Quarantined workers and why.
    pub async fn quarantined(&self) -> Result<std::collections::BTreeMap<String, String>, Error> {
        let mut con = self.con.clone();
        Ok(con.hgetall(QUARANTINED).await?)
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

    /// Measured footprints (bytes of one session) per `name@version`.
    pub async fn footprints(&self) -> Result<std::collections::BTreeMap<String, u64>, Error> {
        let mut con = self.con.clone();
        Ok(con.hgetall(FOOTPRINT).await?)
    }

    /// For admission: the measured footprint of a model version (`name@version`), if any
    /// worker has loaded it, and the memory of the largest live slice, if any.
    pub async fn fit(&self, model_key: &str) -> Result<(Option<u64>, Option<u64>), Error> {
        let mut con = self.con.clone();
        let (footprint, largest): (Option<u64>, Vec<(String, u64)>) =
            redis::pipe().hget(FOOTPRINT, model_key).zrange_withscores(SLICEMEM, -1, -1).query_async(&mut con).await?;
        Ok((footprint, largest.first().map(|(_, m)| *m)))
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

    /// Number of assignments in flight.
    pub async fn inflight(&self) -> Result<u64, Error> {
        let mut con = self.con.clone();
        Ok(con.zcard(INFLIGHT).await?)
    }
}
