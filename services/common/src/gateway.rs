//! The fleet gateway: workers' reports (capacity, heartbeats, hand-backs) reach Redis only
//! through here. Miners are strangers, so they hold no Redis credentials; each report
//! arrives on `sundara.report.<worker>`, which NATS permissions let only that worker's
//! credentials publish to, and the gateway applies it only if it is about that worker.
//! The scheduler and the autoscaler both serve it (one queue group), so heartbeats keep
//! arriving while either restarts: the autoscaler declares dead only silent workers.
//!
//! Reports are claims. What a report states is bounded ([`check`]: slices, slots, lanes,
//! memory), names only models in the registry (else the whole report is refused, with the
//! name), and is written only to the worker's and its slices' own keys: no report writes
//! a fleet-wide estimate. Stated service and load times are not used at all (the
//! scheduler measures service times itself, see `RELEASE`), and a slice's footprint of a
//! model only rules that slice out for admission ([`Capacity::fit`]). Reports are rate
//! limited per worker ([`RateLimits`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::metagraph::ChainStanding;
use crate::{Capacity, Error as CommonError, Registry, Shutdown, js_err};
use futures::StreamExt;
use sundara_schemas::{
    AssignmentId, FleetReply, FleetRequest, FleetUpdate, ModelRef, SliceAnnounce, WIRE_VERSION, WorkerAnnounce, decode,
    encode, subjects as subj,
};

/// Most slices one worker may announce, and models per slice: bounds what one report
/// can make the gateway write.
pub const MAX_SLICES: usize = 64;
pub const MAX_MODELS_PER_SLICE: usize = 1024;
/// Most slots (assignments held at once) one slice may announce: bounds the reservations
/// one slice can attract before any of its answers is measured. A worker's default is 16
/// per thread.
pub const MAX_SLOTS_PER_SLICE: u32 = 1024;
/// Most memory one slice may announce (4 TiB, beyond any one device), and so the largest
/// footprint or loaded size it may state: bounds what a claim can do to admission's and
/// the autoscaler's sums and to placement's tie-breaker.
pub const MAX_SLICE_MEMORY: u64 = 4 << 40;
/// Longest device name a slice may announce, and the characters of a failure reason kept.
pub const MAX_DEVICE_BYTES: usize = 128;
pub const MAX_REASON_CHARS: usize = 512;
/// Announcements per worker per second, with a burst as large: a worker sends one every
/// 500 ms and on every load, eviction and failure. One refused is retried by the next
/// heartbeat, and 20 a second keep a heartbeat (TTL 2 s) alive with room to spare.
pub const ANNOUNCES_PER_S: u32 = 20;
/// Reports of any kind per worker per second, with a burst as large: hand-backs come one
/// per assignment, so up to a slice's slots at once when its model does not fit there.
pub const REPORTS_PER_S: u32 = MAX_SLOTS_PER_SLICE;
/// Most workers whose rates the gateway tracks at once (bounded memory): past this, idle
/// ones are forgotten, and a new worker is refused while every tracked one is busy.
pub const MAX_TRACKED_WORKERS: usize = 100_000;
/// Reports that are bigger than this are refused undecoded.
pub const MAX_REPORT_BYTES: usize = 1 << 20;
/// How an applied announcement's reply (`ok`, with this `reason`) tells a quarantined
/// worker that it is, and why: it stays announced, gets no work, and its log says so.
pub const QUARANTINED_NOTE: &str = "quarantined: ";

/// Whether `update` is one `worker` may make, as far as the update itself tells: every
/// slice it names is one of the worker's (`<worker>-<name>`), the sizes are bounded
/// ([`check_slice`]) and every model named is a well-formed name (or `name@version`).
/// Pure; [`Gateway::apply`] also checks Redis' owner of each slice and the registry.
pub fn check(worker: &str, update: &FleetUpdate) -> Result<(), Refusal> {
    let own_slice = |slice: &str| {
        if subj::is_token(slice) && slice.strip_prefix(worker).is_some_and(|rest| rest.starts_with('-')) {
            Ok(())
        } else {
            Err(Refusal::Invalid(format!("slice {slice:?} is not one of worker {worker}'s")))
        }
    };
    match update {
        FleetUpdate::Announce { announce, .. } => {
            if announce.worker != worker {
                return Err(Refusal::Invalid(format!("worker {worker} cannot announce worker {:?}", announce.worker)));
            }
            if announce.operator.is_empty() || announce.operator.len() > 128 {
                return Err(Refusal::Invalid(format!("operator {:?}: 1 to 128 bytes", announce.operator)));
            }
            if announce.slices.len() > MAX_SLICES {
                return Err(Refusal::Invalid(format!(
                    "{} slices, over the limit of {MAX_SLICES}",
                    announce.slices.len()
                )));
            }
            for s in &announce.slices {
                own_slice(&s.id)?;
                let named = [s.models.len(), s.loaded.len(), s.footprints.len(), s.service_us.len(), s.load_us.len()];
                let named = named.into_iter().max().unwrap_or(0);
                if named > MAX_MODELS_PER_SLICE {
                    return Err(Refusal::Invalid(format!(
                        "slice {} names {named} models, over {MAX_MODELS_PER_SLICE}",
                        s.id
                    )));
                }
                check_slice(s)?;
            }
            Ok(())
        }
        FleetUpdate::Withdraw { slice, model } => {
            own_slice(slice)?;
            if subj::is_token(model) {
                Ok(())
            } else {
                Err(Refusal::Invalid(format!("malformed model name {model:?}")))
            }
        }
        FleetUpdate::FailSlice { slice, .. } => own_slice(slice),
        FleetUpdate::HandBack { assignment_id } => {
            // `<task>.<replica>.<attempt>` and nothing else, so it cannot name another key.
            match assignment_id.parse::<AssignmentId>() {
                Ok(_) => Ok(()),
                Err(_) => Err(Refusal::Invalid(format!("malformed assignment id {assignment_id:?}"))),
            }
        }
    }
}

/// The bounds of one announced slice: slots at most [`MAX_SLOTS_PER_SLICE`], lanes at
/// most its slots (one lane where it has none), memory at most [`MAX_SLICE_MEMORY`] with
/// free memory at most the total, each stated size (footprint, loaded bytes) at most
/// [`MAX_SLICE_MEMORY`], a short device name, and well-formed model names.
///
/// A footprint may exceed the slice's own memory: that is how a worker says a model can
/// never run on that slice (it measured it over its memory, or its file alone is larger),
/// and it only ever rules that slice out ([`Capacity::fit`]).
pub fn check_slice(s: &SliceAnnounce) -> Result<(), Refusal> {
    let id = &s.id;
    if s.slots > MAX_SLOTS_PER_SLICE {
        return Err(Refusal::Invalid(format!(
            "slice {id}: {} slots, over the limit of {MAX_SLOTS_PER_SLICE}",
            s.slots
        )));
    }
    if s.lanes > s.slots.max(1) {
        return Err(Refusal::Invalid(format!("slice {id}: {} lanes, more than its {} slots", s.lanes, s.slots)));
    }
    if s.memory_total > MAX_SLICE_MEMORY {
        return Err(Refusal::Invalid(format!(
            "slice {id}: memory {} bytes, over the limit of {MAX_SLICE_MEMORY}",
            s.memory_total
        )));
    }
    if s.memory_free > s.memory_total {
        return Err(Refusal::Invalid(format!("slice {id}: {} bytes free of {} in all", s.memory_free, s.memory_total)));
    }
    if s.device.len() > MAX_DEVICE_BYTES {
        return Err(Refusal::Invalid(format!("slice {id}: device name over {MAX_DEVICE_BYTES} bytes")));
    }
    let name = |m: &str| {
        if subj::is_token(m) {
            Ok(())
        } else {
            Err(Refusal::Invalid(format!("slice {id}: malformed model name {m:?}")))
        }
    };
    let model_ref = |key: &str| match ModelRef::split_spec(key) {
        (n, Some(v)) if subj::is_token(n) && subj::is_token(v) => Ok(()),
        _ => Err(Refusal::Invalid(format!("slice {id}: malformed model version {key:?} (name@version)"))),
    };
    for m in &s.models {
        name(m)?;
    }
    for (m, _) in s.service_us.iter().chain(&s.load_us) {
        name(m)?;
    }
    for (key, bytes) in s.loaded.iter().chain(&s.footprints) {
        model_ref(key)?;
        if *bytes > MAX_SLICE_MEMORY {
            return Err(Refusal::Invalid(format!(
                "slice {id}: {key} stated at {bytes} bytes, over {MAX_SLICE_MEMORY}"
            )));
        }
    }
    Ok(())
}

/// The models an announcement names, distinct: plain names (served, timed) and
/// `(name, version)` pairs (loaded, measured), as the registry must know them.
pub fn named_models(a: &WorkerAnnounce) -> (BTreeSet<&str>, BTreeSet<(&str, &str)>) {
    let mut names = BTreeSet::new();
    let mut versions = BTreeSet::new();
    for s in &a.slices {
        names.extend(s.models.iter().map(String::as_str));
        names.extend(s.service_us.iter().chain(&s.load_us).map(|(m, _)| m.as_str()));
        versions.extend(s.loaded.iter().chain(&s.footprints).filter_map(|(k, _)| match ModelRef::split_spec(k) {
            (n, Some(v)) => Some((n, v)),
            (_, None) => None,
        }));
    }
    (names, versions)
}

/// What the gateway writes of an announcement: as stated, less the stated service and load
/// times (the scheduler measures service times itself; keeping the wire fields lets older
/// workers report) and with failure reasons cut to [`MAX_REASON_CHARS`].
pub fn as_written(a: &WorkerAnnounce) -> WorkerAnnounce {
    let mut a = a.clone();
    for s in &mut a.slices {
        s.service_us.clear();
        s.load_us.clear();
        if let Some(why) = &mut s.failed {
            *why = why.chars().take(MAX_REASON_CHARS).collect();
        }
    }
    a
}

/// Which of a worker's rates a report counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    /// Any report, counted before it is decoded ([`REPORTS_PER_S`]).
    Any,
    /// An announcement, the costly kind to apply ([`ANNOUNCES_PER_S`]).
    Announce,
}

/// Per-worker report rates (GCRA: a theoretical arrival time per worker and kind, in µs),
/// in bounded memory: at most [`MAX_TRACKED_WORKERS`] workers, idle ones forgotten first.
/// Per gateway process: with the scheduler's and the autoscaler's gateways in one queue
/// group a worker gets at most the sum of theirs.
#[derive(Debug, Default)]
pub struct RateLimits {
    /// Worker → the theoretical arrival time of its next report of each kind (µs).
    tat: HashMap<String, [u64; 2]>,
    /// When idle workers were last forgotten (µs): at most once per 100 ms.
    pruned_at: u64,
}

impl RateLimits {
    /// Counts one report of `kind` from `worker` at `now_us`, or refuses it (then counting
    /// nothing) when it is over the worker's rate.
    pub fn admit(&mut self, worker: &str, kind: ReportKind, now_us: u64) -> Result<(), Refusal> {
        let (per_s, i) = match kind {
            ReportKind::Any => (REPORTS_PER_S, 0),
            ReportKind::Announce => (ANNOUNCES_PER_S, 1),
        };
        let interval = 1_000_000 / u64::from(per_s);
        if !self.tat.contains_key(worker) && self.tat.len() >= MAX_TRACKED_WORKERS {
            if now_us.saturating_sub(self.pruned_at) >= 100_000 {
                self.pruned_at = now_us;
                self.tat.retain(|_, tat| tat.iter().any(|t| *t > now_us));
            }
            if self.tat.len() >= MAX_TRACKED_WORKERS {
                return Err(Refusal::Busy);
            }
        }
        let tat = self.tat.entry(worker.to_string()).or_default();
        let next = tat[i].max(now_us) + interval;
        // A burst of `per_s` reports at once, then one per interval.
        if next - now_us > interval * u64::from(per_s) {
            return Err(Refusal::OverRate { per_s });
        }
        tat[i] = next;
        Ok(())
    }
}

/// Applies checked reports to Redis.
pub struct Gateway {
    pub capacity: Capacity,
    /// The OUTCOMES stream: a hand-back of an assignment its worker already answered is
    /// refused (the outcome may be stored before the scheduler has released its slot).
    pub outcomes: async_nats::jetstream::stream::Stream,
    /// The model registry (KV `models`): an announcement naming a model it does not hold
    /// is refused.
    pub registry: Registry,
    limits: Mutex<RateLimits>,
    started: Instant,
}

impl Gateway {
    pub async fn open(capacity: Capacity, js: &async_nats::jetstream::Context) -> Result<Gateway, CommonError> {
        let outcomes = js.get_stream(subj::OUTCOMES_STREAM).await.map_err(js_err)?;
        let registry = Registry::open(js).await?;
        Ok(Gateway { capacity, outcomes, registry, limits: Mutex::default(), started: Instant::now() })
    }

    fn admit(&self, worker: &str, kind: ReportKind) -> Result<(), Refusal> {
        let now_us = self.started.elapsed().as_micros() as u64;
        self.limits.lock().unwrap_or_else(|e| e.into_inner()).admit(worker, kind, now_us)
    }

    /// Refuses an announcement that names a model (or a version) the registry does not
    /// hold: such names would make Redis keys for models nobody can submit. A name the
    /// registry's cache does not hold yet is looked up, and the first one missing refuses
    /// the report, so one report costs at most one failed lookup.
    async fn registered(&self, a: &WorkerAnnounce) -> Result<(), ApplyError> {
        let (names, versions) = named_models(a);
        for name in names {
            if self.registry.latest(name).await?.is_none() {
                return Err(ApplyError::Unregistered(name.to_string()));
            }
        }
        for (name, version) in versions {
            if self.registry.version(name, version).await?.is_none() {
                return Err(ApplyError::Unregistered(ModelRef::spec(name, version)));
            }
        }
        Ok(())
    }

    /// Whether `worker` has an outcome stored for the task of assignment `aid` (a worker
    /// holds at most one replica of a task, so it is this assignment's).
    async fn answered(&self, worker: &str, aid: &str) -> bool {
        let Ok(aid) = aid.parse::<AssignmentId>() else { return false };
        self.outcomes.direct_get_last_for_subject(subj::outcome(&aid.task_id, worker)).await.is_ok()
    }
}

impl Gateway {
    /// Decodes, checks and applies one report from `subject`. `Ok` may carry a note for the
    /// worker (see [`QUARANTINED_NOTE`]).
    pub async fn handle(&self, subject: &str, payload: &[u8]) -> Result<Option<String>, Refusal> {
        let worker = subj::report_worker(subject).ok_or_else(|| Refusal::NoWorker(subject.to_string()))?;
        self.admit(worker, ReportKind::Any)?;
        let request: FleetRequest = decode(payload, MAX_REPORT_BYTES)?;
        check(worker, &request.update)?;
        if matches!(request.update, FleetUpdate::Announce { .. }) {
            self.admit(worker, ReportKind::Announce)?;
        }
        Ok(self.apply(worker, &request.update).await?)
    }

    async fn apply(&self, worker: &str, update: &FleetUpdate) -> Result<Option<String>, ApplyError> {
        let c = &self.capacity;
        match update {
            FleetUpdate::Announce { announce, fresh, heartbeat_ttl_ms } => {
                let slices: Vec<&str> = announce.slices.iter().map(|s| s.id.as_str()).collect();
                self.owned(worker, &slices).await?;
                let mut written = as_written(announce);
                written.operator = self.operator(worker, &announce.operator).await?;
                self.registered(announce).await?;
                let ttl = (*heartbeat_ttl_ms).clamp(100, 60_000);
                let quarantined = c.announce_standing(&written, *fresh, ttl).await?;
                return Ok(quarantined.map(|why| format!("{QUARANTINED_NOTE}{why}")));
            }
            FleetUpdate::Withdraw { slice, model } => {
                self.owned(worker, &[slice]).await?;
                c.withdraw(slice, model).await?;
            }
            FleetUpdate::FailSlice { slice, reason } => {
                self.owned(worker, &[slice]).await?;
                let reason: String = reason.chars().take(512).collect();
                c.fail_slice(slice, worker, &reason).await?;
            }
            FleetUpdate::HandBack { assignment_id } => {
                if self.answered(worker, assignment_id).await || !c.hand_back(assignment_id, worker).await? {
                    return Err(ApplyError::NotHeld { assignment: assignment_id.clone() });
                }
            }
        }
        Ok(None)
    }

    /// The operator `worker` counts under. On chain it is the coldkey its hotkey is
    /// registered under, whatever the worker states (so holding a task's majority takes
    /// that many registered hotkeys under distinct coldkeys), and a worker whose id is no
    /// registered hotkey is refused. Off chain it is the operator the worker stated first.
    async fn operator(&self, worker: &str, claimed: &str) -> Result<String, ApplyError> {
        match self.capacity.chain_standing(worker).await? {
            ChainStanding::Registered(neuron) => Ok(neuron.coldkey),
            ChainStanding::NotRegistered => Err(ApplyError::NotOnSubnet(worker.to_string())),
            ChainStanding::OffChain => {
                self.same_operator(worker, claimed).await?;
                Ok(claimed.to_string())
            }
        }
    }

    /// The operator is the unit of collusion (two replicas of a task never go to one
    /// operator), so a worker cannot change the operator it first announced: one that
    /// could would join another operator's tasks by claiming a new name before each
    /// reassignment.
    async fn same_operator(&self, worker: &str, claimed: &str) -> Result<(), ApplyError> {
        match self.capacity.operator_of(worker).await? {
            Some(first) if !first.is_empty() && first != claimed => {
                Err(ApplyError::OperatorChanged { first, claimed: claimed.to_string() })
            }
            _ => Ok(()),
        }
    }

    /// Refuses slices Redis knows as another worker's (a name may pass [`check`] and still
    /// be another's: `a-gpu-0` is a slice of both `a` and `a-gpu`).
    async fn owned(&self, worker: &str, slices: &[&str]) -> Result<(), ApplyError> {
        for &slice in slices {
            if let Some(owner) = self.capacity.slice_owner(slice).await?
                && owner != worker
            {
                return Err(ApplyError::NotOwned { slice: slice.to_string(), owner });
            }
        }
        Ok(())
    }
}

/// Why the gateway refused a report: told to the worker as the reply's reason.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no worker in subject {0:?}")]
    NoWorker(String),
    #[error("the gateway is tracking {MAX_TRACKED_WORKERS} busy workers; try again")]
    Busy,
    #[error("over {per_s} reports a second of this kind; try again")]
    OverRate { per_s: u32 },
    #[error("malformed report: {0}")]
    Malformed(#[from] sundara_schemas::DecodeError),
    /// The report itself is not one the worker may make ([`check`], [`check_slice`]).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// Why a checked report could not be applied: Redis failed, or what it or the registry
/// holds refuses it.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Redis(#[from] CommonError),
    #[error("slice {slice} belongs to worker {owner}")]
    NotOwned { slice: String, owner: String },
    #[error("assignment {assignment} is not a live assignment of this worker")]
    NotHeld { assignment: String },
    #[error("the worker was announced with operator {first:?} and cannot become {claimed:?}")]
    OperatorChanged { first: String, claimed: String },
    #[error("model {0} is not in the registry")]
    Unregistered(String),
    #[error("{0} is not a hotkey registered on the subnet")]
    NotOnSubnet(String),
}

/// Serves `sundara.report.*` (in queue group `sundara-gateway`, shared by every scheduler
/// and autoscaler replica) until `shutdown`.
pub async fn serve(
    client: async_nats::Client,
    gateway: Arc<Gateway>,
    shutdown: Shutdown,
    concurrency: usize,
) -> Result<(), CommonError> {
    let reports = client.queue_subscribe(subj::REPORT_ALL, "sundara-gateway".into()).await.map_err(js_err)?;
    // Each report's future owns what it uses, so the service future stays `Send`.
    reports
        .take_until(shutdown.cancelled())
        .for_each_concurrent(concurrency, |msg| {
            let (client, gateway) = (client.clone(), gateway.clone());
            async move {
                let applied = gateway.handle(&msg.subject, &msg.payload).await;
                if let Err(reason) = &applied {
                    tracing::warn!(subject = %msg.subject, %reason, "fleet report refused");
                    metrics::counter!("sundara_gateway_refused_total").increment(1);
                }
                let (ok, reason) = match applied {
                    Ok(note) => (true, note.unwrap_or_default()),
                    Err(refusal) => (false, refusal.to_string()),
                };
                let reply = FleetReply { v: WIRE_VERSION, ok, reason };
                if let Some(to) = msg.reply
                    && let Err(e) = client.publish(to, encode(&reply).into()).await
                {
                    tracing::warn!(error = %e, "fleet report reply failed");
                }
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's announce with these slices.
    fn announce(worker: &str, slices: &[&str]) -> WorkerAnnounce {
        WorkerAnnounce {
            worker: worker.into(),
            operator: worker.into(),
            slices: slices
                .iter()
                .map(|id| sundara_schemas::SliceAnnounce { id: id.to_string(), ..Default::default() })
                .collect(),
        }
    }

    fn announce_update(worker: &str, slices: &[&str]) -> FleetUpdate {
        FleetUpdate::Announce { announce: announce(worker, slices), fresh: false, heartbeat_ttl_ms: 2000 }
    }

    #[test]
    fn a_worker_reports_only_about_itself() {
        assert!(check("m1", &announce_update("m1", &["m1-cpu", "m1-gpu0"])).is_ok());
        assert!(check("m1", &announce_update("m2", &["m2-cpu"])).is_err(), "another worker");
        assert!(check("m1", &announce_update("m1", &["m2-cpu"])).is_err(), "another worker's slice");
        assert!(check("m1", &announce_update("m1", &["m1cpu"])).is_err(), "no separator");
        assert!(check("m1", &announce_update("m1", &["m1-a.b"])).is_err(), "not a token");
        let FleetUpdate::Announce { mut announce, .. } = announce_update("m1", &["m1-cpu"]) else { unreachable!() };
        announce.operator.clear();
        let nameless = FleetUpdate::Announce { announce, fresh: false, heartbeat_ttl_ms: 2000 };
        assert!(check("m1", &nameless).is_err(), "no operator");
        let fail = |slice: &str| FleetUpdate::FailSlice { slice: slice.into(), reason: String::new() };
        assert!(check("m1", &fail("m1-cpu")).is_ok());
        assert!(check("m1", &fail("m2-cpu")).is_err());
        let withdraw = FleetUpdate::Withdraw { slice: "m2-cpu".into(), model: "mlp".into() };
        assert!(check("m1", &withdraw).is_err());
    }

    #[test]
    fn reports_are_bounded() {
        let many: Vec<String> = (0..=MAX_SLICES).map(|i| format!("m1-{i}")).collect();
        let ids: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(check("m1", &announce_update("m1", &ids)).is_err());
        let hand_back = |aid: &str| FleetUpdate::HandBack { assignment_id: aid.into() };
        assert!(check("m1", &hand_back("0192abc.0.1")).is_ok());
        for bad in ["", "a..b", "a.*", "x y", &"a".repeat(201)] {
            assert!(check("m1", &hand_back(bad)).is_err(), "{bad:?}");
        }
    }

    /// An honest worker's slice: 2 threads, 32 slots, 8 GiB, mlp loaded.
    fn honest_slice() -> SliceAnnounce {
        SliceAnnounce {
            id: "m1-cpu0".into(),
            device: "cpu".into(),
            slots: 32,
            lanes: 2,
            models: vec!["mlp".into(), "magika".into()],
            memory_total: 8 << 30,
            memory_free: 7 << 30,
            loaded: vec![("mlp@1".into(), 1 << 20)],
            footprints: vec![("mlp@1".into(), 1 << 20)],
            service_us: vec![("mlp".into(), 300)],
            load_us: vec![("mlp".into(), 20_000)],
            ..Default::default()
        }
    }

    fn with_slice(f: impl FnOnce(&mut SliceAnnounce)) -> Result<(), Refusal> {
        let mut slice = honest_slice();
        f(&mut slice);
        let announce = WorkerAnnounce { worker: "m1".into(), operator: "op".into(), slices: vec![slice] };
        check("m1", &FleetUpdate::Announce { announce, fresh: false, heartbeat_ttl_ms: 2000 })
    }

    #[test]
    fn claims_are_bounded() {
        assert!(with_slice(|_| {}).is_ok());
        // Over-cap slots, more lanes than slots, memory beyond any device, free over total.
        let refused = [
            with_slice(|s| s.slots = MAX_SLOTS_PER_SLICE + 1),
            with_slice(|s| s.lanes = s.slots + 1),
            with_slice(|s| s.memory_total = MAX_SLICE_MEMORY + 1),
            with_slice(|s| s.memory_free = s.memory_total + 1),
            with_slice(|s| s.footprints[0].1 = MAX_SLICE_MEMORY + 1),
            with_slice(|s| s.loaded[0].1 = u64::MAX),
            with_slice(|s| s.device = "x".repeat(MAX_DEVICE_BYTES + 1)),
            with_slice(|s| s.models.push("no.such".into())),
            with_slice(|s| s.models.push(String::new())),
            with_slice(|s| s.loaded[0].0 = "mlp".into()),
            with_slice(|s| s.footprints[0].0 = "mlp@1@2".into()),
            with_slice(|s| s.service_us[0].0 = "a b".into()),
        ];
        for (i, r) in refused.iter().enumerate() {
            assert!(r.is_err(), "claim {i} passed");
        }
        assert!(refused[0].as_ref().unwrap_err().to_string().contains("slots"), "{:?}", refused[0]);
        // At the caps, and a footprint over the slice's own memory: how a worker says a
        // model never fits there (it only rules that slice out).
        assert!(with_slice(|s| s.slots = MAX_SLOTS_PER_SLICE).is_ok());
        assert!(with_slice(|s| s.memory_total = MAX_SLICE_MEMORY).is_ok());
        assert!(with_slice(|s| (s.slots, s.lanes) = (0, 1)).is_ok());
        assert!(with_slice(|s| s.footprints.push(("magika@1".into(), 16 << 30))).is_ok());
        let withdraw = |model: &str| FleetUpdate::Withdraw { slice: "m1-cpu0".into(), model: model.into() };
        assert!(check("m1", &withdraw("mlp")).is_ok());
        assert!(check("m1", &withdraw("mlp.>")).is_err());
    }

    #[test]
    fn stated_times_are_not_written_and_every_name_is_looked_up() {
        let mut slice = honest_slice();
        slice.failed = Some("é".repeat(2 * MAX_REASON_CHARS));
        let announce = WorkerAnnounce { worker: "m1".into(), operator: "op".into(), slices: vec![slice] };
        let written = as_written(&announce);
        let s = &written.slices[0];
        assert!(s.service_us.is_empty() && s.load_us.is_empty());
        assert_eq!(s.failed.as_ref().unwrap().chars().count(), MAX_REASON_CHARS);
        assert_eq!(
            (s.slots, &s.loaded, &s.footprints),
            (32, &announce.slices[0].loaded, &announce.slices[0].footprints)
        );
        let (names, versions) = named_models(&announce);
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["magika", "mlp"]);
        assert_eq!(versions.into_iter().collect::<Vec<_>>(), [("mlp", "1")]);
    }

    #[test]
    fn reports_are_rate_limited_per_worker() {
        let mut limits = RateLimits::default();
        let t0 = 10_000_000;
        for i in 0..ANNOUNCES_PER_S {
            assert!(limits.admit("m1", ReportKind::Announce, t0).is_ok(), "announce {i} of the burst");
        }
        let over = limits.admit("m1", ReportKind::Announce, t0);
        assert!(matches!(over, Err(Refusal::OverRate { .. })));
        // Another worker, and another kind, have rates of their own.
        assert!(limits.admit("m2", ReportKind::Announce, t0).is_ok());
        assert!(limits.admit("m1", ReportKind::Any, t0).is_ok());
        // One more every 1/20 s: a heartbeat every 500 ms is never refused.
        let step = 1_000_000 / u64::from(ANNOUNCES_PER_S);
        assert!(limits.admit("m1", ReportKind::Announce, t0 + step).is_ok());
        assert!(limits.admit("m1", ReportKind::Announce, t0 + step).is_err());
        for beat in 1..=20 {
            assert!(limits.admit("m3", ReportKind::Announce, t0 + beat * 500_000).is_ok());
        }
        // A flood is held to the rate: 1,000 tries in one second, at most 2 × 20 through.
        let through = (0..1000).filter(|i| limits.admit("m4", ReportKind::Announce, t0 + i * 1000).is_ok()).count();
        assert!((20..=40).contains(&through), "{through}");
    }

    #[test]
    fn rate_limits_use_bounded_memory() {
        let mut limits = RateLimits::default();
        let t0 = 10_000_000;
        for i in 0..MAX_TRACKED_WORKERS {
            limits.admit(&format!("w{i}"), ReportKind::Any, t0).unwrap();
        }
        // Every tracked worker is busy: a new one waits rather than growing the table.
        assert!(limits.admit("new", ReportKind::Any, t0 + 1).is_err());
        assert!(limits.admit("w1", ReportKind::Any, t0 + 1).is_ok(), "tracked ones go on");
        // Once they are idle they are forgotten.
        assert!(limits.admit("new", ReportKind::Any, t0 + 1_000_000).is_ok());
        assert!(limits.tat.len() <= 2, "{}", limits.tat.len());
    }
}
