//! Scheduler: turns accepted tasks into k signed assignments on k distinct workers,
//! frees slots as outcomes arrive, and reassigns assignments that time out or whose
//! worker died.
//!
//! Three loops share one Redis capacity handle:
//! - dispatch: TASKS (one consumer per priority class) → reserve k slots atomically → WORK
//!   (one assignment per replica; what is ready for one worker and model at once shares a
//!   message, see [`work`]) → ack the task; higher priority first under contention;
//! - release: OUTCOMES → free the slot of each outcome's assignment (idempotent);
//! - sweep: claim assignments past their timeout → reassign to another worker, or give up
//!   on that replica with an `Abandoned` outcome once attempts or the deadline run out.

pub mod waiting;
pub mod work;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, Message, stream::Stream};
use futures::StreamExt;
use sundara_common::capacity::{Answer, Pick, Placement, ReserveTerms};
use sundara_common::retry::Backoff;
use sundara_common::telemetry;
use sundara_common::{Capacity, Endpoints, Error as CommonError, Shutdown, js_err, nats, validator_key};
use sundara_schemas::{
    Assignment, AssignmentId, ClientResult, DeadLetter, FailureCode, Outcome, OutcomeResult, Priority, ResultStatus,
    Task, Ticket, WIRE_VERSION, decode, encode, now_ms, now_us, subjects as subj,
};
use tracing::Instrument;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    /// Validator secret that signs tickets (shared with the verifier; at least 16 bytes).
    pub secret: validator_key::Secret,
    /// Whether to check the secret's key id against the stack's at start (and refuse to
    /// start on a mismatch), or replace it (`--rotate-secret`): see [`validator_key`].
    pub secret_claim: validator_key::Claim,
    /// How long a worker has to return an outcome before its assignment is reassigned.
    pub assignment_timeout: Duration,
    /// Dispatches per replica, the first included.
    pub max_attempts: u16,
    /// Candidate slices read per window of the fastest-first candidate set (RESERVE reads
    /// up to 4 windows while too few slices are eligible).
    pub scan: usize,
    /// Tasks dispatched at once.
    pub concurrency: usize,
    pub sweep_interval: Duration,
    /// Longest wait of a task that found no capacity before it tries again (a slot freed
    /// by this scheduler wakes it sooner).
    pub capacity_retry: Duration,
    pub max_task_bytes: usize,
    /// Assignments a live worker may let time out in a row (an answer in time clears the
    /// count) before it is quarantined.
    pub quarantine_after_timeouts: u64,
    /// How slices are chosen (the random baseline exists for benchmarks).
    pub placement: Placement,
    pub retention: nats::Retention,
}

/// `sundara scheduler`'s flags: what an operator sets; [`Config::from_args`] adds the rest.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub secret: validator_key::SecretArgs,
    /// Milliseconds a worker has to return an outcome before its assignment is reassigned.
    #[arg(long, env = "SUNDARA_ASSIGNMENT_TIMEOUT_MS", default_value_t = DEFAULT_ASSIGNMENT_TIMEOUT_MS)]
    pub assignment_timeout_ms: u64,
}

/// `--assignment-timeout-ms`' default.
pub const DEFAULT_ASSIGNMENT_TIMEOUT_MS: u64 = 10_000;

impl Args {
    /// The defaults of every flag, with this secret.
    pub fn new(secret: impl Into<String>) -> Args {
        Args {
            secret: validator_key::SecretArgs::given(secret.into()),
            assignment_timeout_ms: DEFAULT_ASSIGNMENT_TIMEOUT_MS,
        }
    }
}

impl Config {
    /// The config of `sundara scheduler` with these flags (the secret read from its file
    /// or the environment).
    pub fn from_args(args: Args, endpoints: Endpoints) -> Result<Config, validator_key::SecretError> {
        let mut config = Config::new(endpoints, args.secret.secret()?);
        config.secret_claim = args.secret.claim();
        config.assignment_timeout = Duration::from_millis(args.assignment_timeout_ms);
        Ok(config)
    }

    /// The defaults, as `sundara scheduler` with no flags but the secret.
    pub fn new(endpoints: Endpoints, secret: validator_key::Secret) -> Config {
        Config {
            endpoints,
            secret,
            secret_claim: validator_key::Claim::Check,
            assignment_timeout: Duration::from_millis(DEFAULT_ASSIGNMENT_TIMEOUT_MS),
            max_attempts: 3,
            scan: 16,
            concurrency: 64,
            sweep_interval: Duration::from_millis(100),
            capacity_retry: Duration::from_millis(50),
            max_task_bytes: 64 << 20,
            quarantine_after_timeouts: 3,
            placement: Placement::ExpectedCompletion,
            retention: nats::Retention::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Common(#[from] CommonError),
    /// The validator secret is too short, or not the one the rest of the stack uses.
    #[error(transparent)]
    Secret(#[from] validator_key::SecretError),
}

/// How long a delivered task may go without an ack (or progress) before JetStream
/// redelivers it. Short, because a delivery can be lost: one in flight from a cluster node
/// as it dies is still counted as delivered by the consumer's new leader, so the task comes
/// again only after this wait. At 30 s a task with a 15 s deadline expired that way
/// (`tests/faults.rs::cluster_losing_the_leading_node_loses_no_task`). A task waiting for
/// capacity sends a progress ack every third of it.
const TASK_ACK_WAIT: Duration = Duration::from_secs(10);

/// Id of one dispatch of one replica ([`AssignmentId`] as a string).
pub fn assignment_id(task_id: &str, replica: u8, attempt: u16) -> String {
    AssignmentId::new(task_id, replica, attempt).to_string()
}

struct Scheduler {
    config: Config,
    js: jetstream::Context,
    tasks: Stream,
    verdicts: Stream,
    results: Stream,
    /// Read by the sweep only: whether a due assignment's answer is stored after all.
    outcomes: Stream,
    capacity: Capacity,
    /// Tasks waiting for capacity; a slot this scheduler frees wakes one of them.
    waiting: waiting::Waiting,
    /// Stops tasks waiting for capacity: they go back to TASKS for the next scheduler.
    shutdown: Shutdown,
    /// Stores assignments in WORK, several per message under load.
    work: work::WorkSender,
}

/// Which dispatch of which copy of a task, and when its answer is due.
struct Replica {
    replica: u8,
    attempt: u16,
    answer_by_ms: u64,
}

/// What became of one task delivery.
enum Dispatch {
    Sent,
    Expired,
    /// The task already had its result: delivered again after it ended (its ack was lost
    /// with a scheduler or a server), it has nothing left to do.
    Ended,
    /// The scheduler is stopping while the task waited for capacity: it goes back to
    /// TASKS (NAK) for another scheduler, or this one started again.
    HandedBack,
}

impl Scheduler {
    fn terms(&self, timeout_at_ms: u64, ttl_ms: u64) -> ReserveTerms {
        ReserveTerms { timeout_at_ms, ttl_ms, scan: self.config.scan, placement: self.config.placement }
    }

    fn reservation_ttl_ms(&self, deadline_at_ms: u64) -> u64 {
        // Reservations outlive the task's deadline so that the sweep always finds them.
        deadline_at_ms.saturating_sub(now_ms()) + 3_600_000
    }

    /// Reserves k slots for the task, waiting (un-acked, with progress acks so JetStream
    /// does not redeliver it) until capacity frees up or the deadline passes. Waiting here
    /// rather than NAKing keeps arrival order and costs nothing while nothing changes.
    /// While a task of higher priority waits for the same model, this one does not try.
    async fn dispatch(&self, task: &Task, task_seq: u64, msg: &Message) -> Result<Dispatch, CommonError> {
        let aids: Vec<String> = (0..task.k).map(|r| assignment_id(&task.task_id, r, 0)).collect();
        let mut last_progress = tokio::time::Instant::now();
        let mut waiter = None;
        let (picks, answer_by_ms) = loop {
            if now_ms() >= task.deadline_at_ms {
                // Never expire (and dead-letter) a task that ended: its result stands.
                if self.ended(task).await {
                    return Ok(Dispatch::Ended);
                }
                self.expire(task, task_seq).await?;
                return Ok(Dispatch::Expired);
            }
            // Registered before the attempt, so a release in between is not missed.
            let freed = self.waiting.freed(task.priority);
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.waiting.outranked(&task.model.name, task.priority) {
                let timeout_at = now_ms() + self.config.assignment_timeout.as_millis() as u64;
                let ttl = self.reservation_ttl_ms(task.deadline_at_ms);
                let terms = self.terms(timeout_at, ttl);
                let reserved = self.capacity.reserve(&task.model.name, &task.task_id, &aids, terms).await?;
                if let Some(picks) = reserved {
                    break (picks, timeout_at);
                }
            }
            // No capacity: a task delivered again after it ended finds none when its first
            // dispatch's workers are excluded, and would wait for its deadline; look once.
            if waiter.is_none() && self.ended(task).await {
                return Ok(Dispatch::Ended);
            }
            waiter.get_or_insert_with(|| self.waiting.enter(&task.model.name, task.priority));
            let until_deadline = Duration::from_millis(task.deadline_at_ms.saturating_sub(now_ms()));
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Dispatch::HandedBack),
                _ = tokio::time::timeout(self.config.capacity_retry.min(until_deadline), freed) => {}
            }
            if last_progress.elapsed() > TASK_ACK_WAIT / 3 {
                let _ = msg.ack_with(AckKind::Progress).await;
                last_progress = tokio::time::Instant::now();
            }
        };
        drop(waiter);
        metrics::counter!("sundara_scheduler_dispatched_total", "priority" => task.priority.as_str()).increment(1);
        let replicas = picks
            .into_iter()
            .enumerate()
            .map(|(replica, pick)| (Replica { replica: replica as u8, attempt: 0, answer_by_ms }, pick))
            .collect();
        self.send(task, task_seq, replicas).await?;
        Ok(Dispatch::Sent)
    }

    /// Whether the task has its result already (verified, failed or expired).
    async fn ended(&self, task: &Task) -> bool {
        let subject = subj::result(&task.tenant, &task.task_id);
        self.results.direct_get_last_for_subject(subject).await.is_ok()
    }

    /// Signs and sends the task's assignments: every ticket is stored in Redis before any
    /// assignment is published. A send that fails on Redis has then published nothing, and
    /// its retry may reserve anew. Were an assignment published first, a Redis that lost its
    /// reservations (restarted empty) would let the retry reserve its aid on another worker,
    /// whose WORK message JetStream drops as a duplicate, and put another replica of the
    /// task on the worker that did get it: the verifier counts one replica per worker, and
    /// nobody would answer the other.
    async fn send(&self, task: &Task, task_seq: u64, replicas: Vec<(Replica, Pick)>) -> Result<(), CommonError> {
        let mut sends = Vec::with_capacity(replicas.len());
        let mut spans = Vec::with_capacity(replicas.len());
        for (Replica { replica, attempt, answer_by_ms }, Pick { slice, worker, operator }) in replicas {
            let mut ticket = Ticket {
                task_id: task.task_id.clone(),
                tenant: task.tenant.clone(),
                model: task.model.clone(),
                k: task.k,
                replica,
                attempt,
                worker,
                operator,
                slice,
                dispatched_at_us: now_us(),
                deadline_at_ms: task.deadline_at_ms,
                answer_by_ms,
                task_seq,
                key_id: String::new(),
                mac: Vec::new(),
            };
            ticket.sign(&self.config.secret);
            let aid = ticket.assignment_id();
            // Read back only by the sweep, long after this returns; stored again
            // (idempotently) when the task is redelivered.
            self.capacity.store_ticket(&aid, &encode(&ticket)).await?;
            let subject = subj::work(&task.model.name, &ticket.worker);
            let span = tracing::info_span!(
                target: sundara_common::telemetry::SPANS,
                "scheduler assign",
                otel.kind = "producer",
                messaging.system = "nats",
                "messaging.operation.type" = "send",
                messaging.destination.name = %subject,
                sundara.miner = %ticket.worker,
                sundara.replica = replica,
                sundara.attempt = attempt,
            );
            let assignment = Assignment {
                v: WIRE_VERSION,
                ticket,
                inputs: task.inputs.clone(),
                seed: task.seed,
                accepted_at_us: task.accepted_at_us,
            };
            let traceparent = telemetry::traceparent(&span);
            sends.push(work::Outgoing { subject, aid, assignment, traceparent });
            spans.push(span);
        }
        // All at once: if one fails, all are sent again (WORK deduplicates an assignment
        // sent alone by its id, the worker takes one sent again as a redelivery, and Redis
        // still holds their reservations).
        // Each span lasts until its assignment is stored.
        let stored = self.work.send(sends).await;
        drop(spans);
        stored
    }

    /// The deadline passed before the task could be dispatched: the client is told, and
    /// the task goes to DEAD (from where an operator can resubmit it).
    async fn expire(&self, task: &Task, task_seq: u64) -> Result<(), CommonError> {
        tracing::info!(task = %task.task_id, "deadline passed before dispatch");
        metrics::counter!("sundara_scheduler_expired_total", "priority" => task.priority.as_str()).increment(1);
        let reason =
            expiry_reason(&task.model.name, task.k, self.capacity.live_operators(Some(&task.model.name)).await);
        let result = ClientResult {
            v: WIRE_VERSION,
            task_id: task.task_id.clone(),
            model: task.model.clone(),
            status: ResultStatus::Failed { code: FailureCode::Expired, reason: reason.clone() },
            completed_at_ms: now_ms(),
            timing: None,
        };
        let dead = DeadLetter {
            v: WIRE_VERSION,
            task_id: task.task_id.clone(),
            tenant: task.tenant.clone(),
            model: task.model.clone(),
            reason,
            evidence: Vec::new(),
            dead_at_ms: now_ms(),
            task_seq,
        };
        // Once per task, like the verifier's decisions: whichever is stored first stands.
        // The task's copy first: the letter's existence promises it can be resubmitted.
        nats::keep_dead_task(&self.js, &self.tasks, &task.task_id, task_seq).await?;
        nats::publish_once(&self.js, subj::dead(&task.task_id), &task.task_id, encode(&dead)).await?;
        let subject = subj::result(&task.tenant, &task.task_id);
        nats::publish_once(&self.js, subject, &task.task_id, encode(&result)).await?;
        Ok(())
    }

    async fn on_task(&self, msg: Message) {
        let task = match decode::<Task>(&msg.payload, self.config.max_task_bytes) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "undecodable task in TASKS; terminating it");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let span = sundara_common::consumer_span!("scheduler dispatch", msg.subject,
            sundara.task_id = %task.task_id,
            sundara.model = %task.model,
            sundara.priority = task.priority.as_str(),
            sundara.k = task.k,
            sundara.dispatch = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::follow(&span, msg.headers.as_ref());
        // A dispatch that fails (JetStream or Redis briefly unreachable: a server restarting,
        // a cluster electing leaders) is tried again here rather than NAKed at once: a NAK
        // sent while the server is unreachable is lost, and the task would then wait out its
        // whole ack wait, often past its deadline. Dispatching again is idempotent
        // (reservations per assignment id, WORK deduplicated by it), and a deadline that
        // passes meanwhile expires the task.
        let retry_until = tokio::time::Instant::now() + TASK_ACK_WAIT;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).until(retry_until);
        let dispatched = loop {
            match self.dispatch(&task, seq, &msg).instrument(span.clone()).await {
                Err(e) => match backoff.delay_before(tokio::time::Instant::now()) {
                    Some(_) if self.shutdown.is_cancelled() => break Ok(Dispatch::HandedBack),
                    Some(delay) => {
                        tracing::warn!(task = %task.task_id, error = %e, "dispatch failed; trying again");
                        tokio::time::sleep(delay).await;
                        let _ = msg.ack_with(AckKind::Progress).await;
                    }
                    None => break Err(e),
                },
                dispatched => break dispatched,
            }
        };
        span.record(
            "sundara.dispatch",
            match &dispatched {
                Ok(Dispatch::Sent) => "sent",
                Ok(Dispatch::Expired) => "expired",
                Ok(Dispatch::Ended) => "ended",
                Ok(Dispatch::HandedBack) => "handed back",
                Err(_) => "retry",
            },
        );
        match dispatched {
            Ok(Dispatch::Sent | Dispatch::Expired | Dispatch::Ended) => {
                // A lost ack only means a redelivery: the reservation is idempotent per
                // assignment id and WORK deduplicates by it, so no confirmation is awaited.
                if let Err(e) = msg.ack().await {
                    tracing::warn!(task = %task.task_id, error = %e, "task ack failed; it will be redelivered");
                }
            }
            Ok(Dispatch::HandedBack) => {
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
            Err(e) => {
                tracing::warn!(task = %task.task_id, error = %e, "dispatch failed; retrying");
                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500)))).await;
            }
        }
    }

    /// Until shutdown, every sweep interval: claims the assignments whose answer is overdue
    /// (or whose worker died) and reassigns them.
    async fn sweep(&self, shutdown: &Shutdown) {
        let mut tick = tokio::time::interval(self.config.sweep_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lease_ms = self.config.assignment_timeout.as_millis() as u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let due = match self.capacity.claim_due(now_ms(), lease_ms, 256).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "sweep");
                    continue;
                }
            };
            futures::stream::iter(due)
                .for_each_concurrent(32, |aid| async move {
                    if let Err(e) = self.reassign(&aid).await {
                        tracing::warn!(assignment = %aid, error = %e, "reassignment failed; will retry");
                    }
                })
                .await;
        }
    }

    /// An assignment timed out (or its worker died): send the replica elsewhere, or give up on it.
    async fn reassign(&self, aid: &str) -> Result<(), CommonError> {
        let Some(bytes) = self.capacity.ticket(aid).await? else {
            // Reserved but never sent (a scheduler died in between): the task was not acked,
            // so its redelivery dispatches it again.
            self.release(aid, None).await?;
            return Ok(());
        };
        let old = Ticket::from_bytes(&bytes)?;
        // Answered in time after all, its release never applied: `scheduler-release` acks
        // cumulatively, so a delivery lost in flight (a cluster node dying with it) can be
        // covered by a later ack. Freed as the answer it was: no strike, no reassignment.
        if let Some(stored_at_us) = self.stored_answer(aid, &old).await
            && stored_at_us / 1000 <= old.answer_by_ms
        {
            tracing::info!(assignment = aid, worker = %old.worker, "answered in time; its release was lost");
            self.release_answer(aid, &old.worker, stored_at_us).await?;
            return Ok(());
        }
        self.count_timeout(aid, &old.worker).await;
        // Decided already (a late answer completed it): nothing left to run.
        if self.verdicts.direct_get_last_for_subject(subj::verdict(&old.task_id)).await.is_ok() {
            self.release(aid, None).await?;
            return Ok(());
        }
        let exhausted = old.attempt + 1 >= self.config.max_attempts;
        if exhausted || now_ms() >= old.deadline_at_ms {
            let reason = if exhausted { "attempts exhausted" } else { "deadline passed" };
            tracing::info!(assignment = aid, worker = %old.worker, reason, "giving up on replica");
            metrics::counter!("sundara_scheduler_abandoned_total").increment(1);
            let outcome = Outcome {
                v: WIRE_VERSION,
                ticket: old.clone(),
                result: OutcomeResult::Abandoned { reason: reason.into() },
                compute_us: 0,
                timing: Default::default(),
            };
            let subject = subj::outcome(&old.task_id, &old.worker);
            nats::publish_durable(&self.js, subject, &old.abandoned_id(), encode(&outcome)).await?;
            self.release(aid, None).await?;
            return Ok(());
        }
        let attempt = old.attempt + 1;
        let new_aid = assignment_id(&old.task_id, old.replica, attempt);
        let timeout_at = now_ms() + self.config.assignment_timeout.as_millis() as u64;
        let ttl = self.reservation_ttl_ms(old.deadline_at_ms);
        let picked = self
            .capacity
            .reserve(&old.model.name, &old.task_id, std::slice::from_ref(&new_aid), self.terms(timeout_at, ttl))
            .await?;
        let Some(mut picks) = picked else {
            // No other worker free now: due again on the next sweep (not after the claim's
            // whole lease, which is an assignment timeout).
            self.capacity.defer(aid, now_ms() + self.config.sweep_interval.as_millis() as u64).await?;
            return Ok(());
        };
        let pick = picks.remove(0);
        let raw = self.tasks.get_raw_message(old.task_seq).await.map_err(js_err)?;
        let task = decode::<Task>(&raw.payload, self.config.max_task_bytes)?;
        // In the task's own trace: the TASKS message still carries the trace context.
        let span = tracing::info_span!(
            target: sundara_common::telemetry::SPANS,
            "scheduler reassign",
            sundara.task_id = %task.task_id,
            sundara.model = %task.model,
            sundara.from = %old.worker,
            trace_id = tracing::field::Empty,
        );
        telemetry::follow(&span, Some(&raw.headers));
        tracing::info!(parent: &span, assignment = aid, from = %old.worker, to = %pick.worker, attempt, "reassigning");
        metrics::counter!("sundara_scheduler_reassigned_total").increment(1);
        let replica = Replica { replica: old.replica, attempt, answer_by_ms: timeout_at };
        self.send(&task, old.task_seq, vec![(replica, pick)]).instrument(span).await?;
        self.release(aid, None).await?;
        Ok(())
    }

    /// When the holder of assignment `aid` stored its outcome, if it did: the last message
    /// on its outcome subject, under that assignment's outcome id (an abandonment of the
    /// scheduler's own has another id).
    async fn stored_answer(&self, aid: &str, ticket: &Ticket) -> Option<u64> {
        let subject = subj::outcome(&ticket.task_id, &ticket.worker);
        let stored = self.outcomes.direct_get_last_for_subject(subject).await.ok()?;
        let id = stored.headers.get(async_nats::header::NATS_MESSAGE_ID)?;
        let answered = sundara_schemas::assignment_of_outcome_id(id.as_str())?;
        let at_us = u64::try_from(stored.time.unix_timestamp_nanos() / 1_000).ok()?;
        (answered.to_string() == aid).then_some(at_us)
    }

    /// A live worker let an assignment time out (accepted it and never answered): a strike;
    /// enough of them in a row (an answer in time clears them) quarantine it.
    async fn count_timeout(&self, aid: &str, worker: &str) {
        match self.capacity.timeout_strike(aid, worker).await {
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!("sundara_scheduler_timeout_strikes_total").increment(1);
                if n >= self.config.quarantine_after_timeouts {
                    let reason = format!("{n} assignments not answered in time");
                    if let Ok(true) = self.capacity.quarantine(worker, &reason).await {
                        metrics::counter!("sundara_quarantines_total", "by" => "scheduler").increment(1);
                        tracing::warn!(worker, %reason, "miner quarantined");
                    }
                }
            }
            Err(e) => tracing::warn!(worker, error = %e, "could not count a timeout"),
        }
    }

    /// Frees an assignment's slot (idempotent); a freed slot wakes one task waiting for
    /// capacity (the longest waiting), not all of them.
    async fn release(&self, aid: &str, holder: Option<Answer<'_>>) -> Result<(), CommonError> {
        if self.capacity.release(aid, holder).await? {
            self.waiting.wake_one();
        }
        Ok(())
    }

    /// [`Scheduler::release`] for an answer `worker` stored at `stored_at_us`: RELEASE
    /// then also measures the slice's service time from it (the validator side's measure,
    /// which placement uses instead of what the worker states).
    async fn release_answer(&self, aid: &str, worker: &str, stored_at_us: u64) -> Result<(), CommonError> {
        if self.capacity.release_answer(aid, worker, stored_at_us).await? {
            self.waiting.wake_one();
        }
        Ok(())
    }

    /// An outcome arrived (headers only: the release needs no outputs). Its Nats-Msg-Id
    /// names the assignment ([`Ticket::outcome_id`]; an abandonment is this scheduler's own
    /// and `reassign` released it) and its subject names the worker. Both are the miner's
    /// claims: the slot is freed only if that worker holds it, so an outcome published
    /// under one worker's name cannot free another's slot, and only if it was stored in
    /// time: a late answer leaves the replica to the sweep's reassignment. Idempotent (a
    /// freed slot is not freed twice), as [`nats::consume_acking_all`] needs.
    async fn on_outcome(&self, msg: Message) -> Result<(), CommonError> {
        let id = msg.headers.as_ref().and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID)).map(|v| v.as_str());
        let aid = id.and_then(sundara_schemas::assignment_of_outcome_id);
        let stored_at_us = nats::stored_at_us(&msg).unwrap_or_else(now_us);
        match (aid, subj::outcome_worker(&msg.subject)) {
            (Some(aid), Some(worker)) => self.release_answer(&aid.to_string(), worker, stored_at_us).await,
            _ => Ok(()),
        }
    }
}

/// Why a task expired before dispatch, for its client and its dead letter: a task needs k
/// workers of k distinct operators serving its model at once, so when fewer operators
/// serve it at all (`serving`, as [`Capacity::live_operators`] read it at expiry) it could
/// never have run, and the reason says so; otherwise they were busy. A fleet that could
/// not be read gives the general reason.
pub fn expiry_reason(model: &str, k: u8, serving: Result<Vec<String>, CommonError>) -> String {
    match serving {
        Ok(ops) if ops.len() < usize::from(k) => {
            let who = if ops.is_empty() {
                "none serve it".to_string()
            } else {
                format!("only {} serve it ({})", ops.len(), ops.join(", "))
            };
            format!("expired: model {model} needs {k} distinct operators per task, {who}")
        }
        Ok(ops) => format!(
            "expired: the deadline passed before {k} workers of distinct operators serving {model} were free \
             ({} operators serve it; all were busy)",
            ops.len()
        ),
        Err(_) => "expired: the deadline passed before enough workers were free".to_string(),
    }
}

/// Runs the scheduler until `shutdown`; once asked to stop, it stops within
/// [`sundara_common::SHUTDOWN_GRACE`] whatever NATS and Redis do (tasks it held un-acked
/// are delivered again).
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), SchedulerError> {
    let grace = sundara_common::SHUTDOWN_GRACE;
    sundara_common::stop_within("scheduler", &shutdown.clone(), grace, run_until_stopped(config, shutdown)).await
}

async fn run_until_stopped(config: Config, shutdown: Shutdown) -> Result<(), SchedulerError> {
    let (client, js) = validator_key::connect_signer::<SchedulerError>(
        &config.endpoints.nats,
        "scheduler",
        &validator_key::Keyring::new(config.secret.clone(), None),
        config.secret_claim,
        &config.retention,
    )
    .await?;
    let capacity = Capacity::open(&config.endpoints).await?;
    let tasks = js.get_stream(subj::TASKS_STREAM).await.map_err(js_err)?;
    // One consumer per priority class, each with its own dispatch concurrency: a backlog of
    // low-priority tasks never holds back the delivery of a high-priority one.
    let mut task_consumers = Vec::new();
    for priority in Priority::ALL {
        let durable = format!("scheduler-{}", priority.as_str());
        let max_pending = (config.concurrency * 16) as i64;
        let consumer = nats::durable_consumer(
            &js,
            subj::TASKS_STREAM,
            &durable,
            &subj::tasks_of(priority),
            TASK_ACK_WAIT,
            max_pending,
        )
        .await?;
        task_consumers.push(consumer);
    }
    // Headers only: freeing a slot needs the assignment id and the worker, not the outputs.
    // Acked a chunk at a time: a release is idempotent.
    let release_config = nats::acking_all(async_nats::jetstream::consumer::pull::Config {
        headers_only: true,
        ..nats::consumer_config("scheduler-release", subj::OUTCOME_ALL, Duration::from_secs(30), 4096)
    });
    let outcome_consumer = nats::ensure_consumer(&js, subj::OUTCOMES_STREAM, release_config).await?;
    let verdicts = js.get_stream(subj::VERDICTS_STREAM).await.map_err(js_err)?;
    let results = js.get_stream(subj::RESULTS_STREAM).await.map_err(js_err)?;
    let outcomes = js.get_stream(subj::OUTCOMES_STREAM).await.map_err(js_err)?;
    let gateway = Arc::new(sundara_common::gateway::Gateway::open(capacity.clone(), &js).await?);
    let reports = sundara_common::gateway::serve(client.clone(), gateway, shutdown.clone(), config.concurrency);
    let scheduler = Scheduler {
        config: config.clone(),
        tasks,
        verdicts,
        results,
        outcomes,
        capacity,
        waiting: Default::default(),
        shutdown: shutdown.clone(),
        work: work::WorkSender::start(js.clone()),
        js,
    };
    let s = &scheduler;
    tracing::info!("scheduler running");

    let dispatch = futures::future::try_join_all(
        task_consumers.iter().map(|c| nats::consume(c, &shutdown, config.concurrency, |msg| s.on_task(msg))),
    );
    let release =
        nats::consume_acking_all(&outcome_consumer, &shutdown, config.concurrency, "scheduler-release", |msg| {
            s.on_outcome(msg)
        });
    let sweep = async {
        s.sweep(&shutdown).await;
        Ok::<(), CommonError>(())
    };
    tokio::try_join!(dispatch, release, sweep, reports)?;
    tracing::info!("scheduler stopped");
    Ok(())
}

#[cfg(test)]
mod expiry_tests {
    use super::*;

    #[test]
    fn an_expiry_names_the_missing_operators_when_too_few_serve_the_model() {
        let ops = |names: &[&str]| Ok(names.iter().map(|n| n.to_string()).collect());
        assert_eq!(
            expiry_reason("m", 3, ops(&["alice", "bob"])),
            "expired: model m needs 3 distinct operators per task, only 2 serve it (alice, bob)"
        );
        assert_eq!(
            expiry_reason("m", 2, ops(&[])),
            "expired: model m needs 2 distinct operators per task, none serve it"
        );
        let busy = expiry_reason("m", 2, ops(&["alice", "bob"]));
        assert!(busy.contains("were free") && busy.contains("all were busy"), "{busy}");
        let unread = expiry_reason("m", 2, Err(CommonError::Registry("down".into())));
        assert!(unread.contains("enough workers were free"), "{unread}");
    }
}
