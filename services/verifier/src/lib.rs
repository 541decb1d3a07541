//! Verifier: gathers the k outcomes of each task, compares them under the model's rule,
//! and publishes the accepted result to the client, a verdict for the rewarder, and a
//! dead letter with all evidence when there is no majority.
//!
//! Outcomes stay un-acked until the task's result and verdict are stored, so a verifier
//! that dies loses nothing: JetStream redelivers the outcomes and the task is decided
//! again (results and verdicts are deduplicated by task id).

pub mod compare;
pub mod quorum;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt;
use sundara_common::{Endpoints, Error as CommonError, Registry, Shutdown, js_err, nats};
use sundara_schemas::{
    ClientResult, CompareRule, DeadLetter, FailureCode, MAX_MESSAGE_BYTES, MinerVerdict, Outcome, OutcomeResult,
    ResultStatus, Standing, TaskTiming, Verdict, WIRE_VERSION, decode, encode, now_ms, now_us, subjects as subj,
};
use tokio::sync::Semaphore;

#[derive(Clone, Debug)]
pub struct Config {
    pub endpoints: Endpoints,
    /// Validator secret that the scheduler signs tickets with.
    pub secret: Vec<u8>,
    /// Outcomes held un-acked at most (JetStream max_ack_pending of the consumer).
    pub max_held: usize,
    /// How long after a task's deadline a partial set of outcomes is decided as it is.
    pub grace: Duration,
    /// Decisions being published at once.
    pub concurrency: usize,
    pub retention: nats::Retention,
}

impl Config {
    pub fn new(endpoints: Endpoints, secret: Vec<u8>) -> Config {
        Config {
            endpoints,
            secret,
            max_held: 20_000,
            grace: Duration::from_secs(30),
            concurrency: 256,
            retention: nats::Retention::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error(transparent)]
    Common(#[from] CommonError),
}

/// One replica's outcome as the verifier saw it.
pub struct Received {
    pub outcome: Outcome,
    /// Assignment sent → outcome stored, both on validator-side clocks.
    pub latency_us: u64,
    /// When OUTCOMES stored it (Unix µs, validator side).
    pub stored_at_us: u64,
}

/// Outcomes of one task gathered so far, by replica (the first outcome of a replica counts).
#[derive(Default)]
pub struct Gathering {
    pub replicas: BTreeMap<u8, Received>,
    pub held: Vec<Message>,
    pub first_seen: Option<Instant>,
}

impl Gathering {
    fn k(&self) -> u8 {
        self.replicas.values().next().map_or(0, |r| r.outcome.ticket.k)
    }

    fn deadline_at_ms(&self) -> u64 {
        self.replicas.values().next().map_or(0, |r| r.outcome.ticket.deadline_at_ms)
    }

    fn complete(&self) -> bool {
        self.replicas.len() >= self.k() as usize
    }
}

/// Builds what a decision publishes: the client's result, the verdict, and (without a
/// majority) the dead letter. Pure.
pub fn conclude(rule: CompareRule, g: &Gathering) -> (ClientResult, Verdict, Option<DeadLetter>) {
    let first = &g.replicas.values().next().expect("a gathering has at least one outcome").outcome.ticket;
    let received: Vec<&Received> = g.replicas.values().collect();
    let results: Vec<&OutcomeResult> = received.iter().map(|r| &r.outcome.result).collect();
    let decision = quorum::decide(&rule, first.k, &results);
    let miners: Vec<MinerVerdict> = received
        .iter()
        .zip(&decision.standings)
        .map(|(r, &standing)| MinerVerdict {
            worker: r.outcome.ticket.worker.clone(),
            replica: r.outcome.ticket.replica,
            attempt: r.outcome.ticket.attempt,
            standing,
            latency_us: (standing != Standing::Missing).then_some(r.latency_us),
        })
        .collect();
    let agreeing = decision.standings.iter().filter(|s| **s == Standing::Agreed).count() as u8;
    let now = now_ms();
    let (status, dead, timing) = match decision.winner {
        Some(i) => {
            let OutcomeResult::Ok { outputs } = &received[i].outcome.result else {
                unreachable!("winners have outputs")
            };
            let fastest = received
                .iter()
                .zip(&decision.standings)
                .filter(|(_, s)| **s == Standing::Agreed)
                .map(|(r, _)| *r)
                .min_by_key(|r| r.latency_us)
                .unwrap_or(received[i]);
            let w = fastest.outcome.timing;
            let timing = TaskTiming {
                accepted_us: w.accepted_us,
                dispatched_us: fastest.outcome.ticket.dispatched_at_us,
                received_us: w.received_us,
                started_us: w.started_us,
                finished_us: w.finished_us,
                outcome_stored_us: fastest.stored_at_us,
                decided_us: now_us(),
            };
            (ResultStatus::Verified { outputs: outputs.clone(), agreeing, k: first.k }, None, Some(timing))
        }
        None => {
            let reason = format!(
                "no majority of {} under {rule}: agreeing groups {:?}, {} failed, {} missing",
                first.k,
                decision.group_sizes,
                decision.standings.iter().filter(|s| **s == Standing::Failed).count(),
                // Abandoned replicas, and replicas that never reported before the deadline.
                miners.iter().filter(|m| m.standing == Standing::Missing).count() + first.k as usize - received.len(),
            );
            let dead = DeadLetter {
                v: WIRE_VERSION,
                task_id: first.task_id.clone(),
                tenant: first.tenant.clone(),
                model: first.model.clone(),
                reason: reason.clone(),
                evidence: received.iter().map(|r| r.outcome.clone()).collect(),
                dead_at_ms: now,
            };
            (ResultStatus::Failed { code: FailureCode::NoConsensus, reason }, Some(dead), None)
        }
    };
    let result = ClientResult {
        v: WIRE_VERSION,
        task_id: first.task_id.clone(),
        model: first.model.clone(),
        status,
        completed_at_ms: now,
        timing,
    };
    let verdict = Verdict {
        v: WIRE_VERSION,
        task_id: first.task_id.clone(),
        tenant: first.tenant.clone(),
        model: first.model.clone(),
        k: first.k,
        rule,
        accepted: decision.winner.is_some(),
        miners,
        decided_at_ms: now,
    };
    (result, verdict, dead)
}

/// Task ids decided recently, so late outcomes (a slow replica that was reassigned) are
/// recognised and dropped. Bounded: the oldest are forgotten first.
struct Decided {
    order: VecDeque<String>,
    set: HashSet<String>,
    cap: usize,
}

impl Decided {
    fn insert(&mut self, task: String) {
        if self.set.insert(task.clone()) {
            self.order.push_back(task);
            if self.order.len() > self.cap
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

struct Publisher {
    js: jetstream::Context,
    verdicts: jetstream::stream::Stream,
    registry: Registry,
}

impl Publisher {
    async fn publish(&self, g: Gathering) {
        let first = &g.replicas.values().next().expect("non-empty").outcome.ticket;
        let task_id = first.task_id.clone();
        let tenant = first.tenant.clone();
        let rule = match self.registry.version(&first.model.name, &first.model.version).await {
            Ok(Some(meta)) => meta.policy.rule,
            _ => CompareRule::default(),
        };
        let (result, verdict, dead) = conclude(rule, &g);
        let stored = async {
            if let Some(dead) = &dead {
                nats::publish_durable(&self.js, subj::dead(&task_id), &task_id, encode(dead)).await?;
            }
            nats::publish_durable(&self.js, subj::result(&tenant, &task_id), &task_id, encode(&result)).await?;
            nats::publish_durable(&self.js, subj::verdict(&task_id), &task_id, encode(&verdict)).await?;
            Ok::<(), CommonError>(())
        };
        match stored.await {
            Ok(()) => {
                tracing::debug!(task = %task_id, accepted = verdict.accepted, "decided");
                for m in g.held {
                    let _ = m.ack().await;
                }
            }
            Err(e) => {
                // Un-acked: the outcomes come back and the task is decided again.
                tracing::warn!(task = %task_id, error = %e, "decision not stored; outcomes will be redelivered");
                for m in g.held {
                    let _ = m.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                }
            }
        }
    }

    /// Whether a verdict for the task is already stored (a verifier restart lost our memory of it).
    async fn already_decided(&self, task_id: &str) -> bool {
        self.verdicts.direct_get_last_for_subject(subj::verdict(task_id)).await.is_ok()
    }
}

/// Runs the verifier until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> Result<(), VerifierError> {
    let client = nats::connect(&config.endpoints.nats_url, "sundara-verifier").await?;
    let js = jetstream::new(client.clone());
    nats::provision(&js, &config.retention).await?;
    let registry = Registry::open(&js).await?;
    let verdicts = js.get_stream(subj::VERDICTS_STREAM).await.map_err(js_err)?;
    let consumer = nats::durable_consumer(
        &js,
        subj::OUTCOMES_STREAM,
        "verifier",
        "sundara.outcome.>",
        Duration::from_secs(30),
        config.max_held as i64,
    )
    .await?;
    let mut messages = consumer.messages().await.map_err(js_err)?;
    let publisher = Arc::new(Publisher { js, verdicts, registry });
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut gathering: HashMap<String, Gathering> = HashMap::new();
    let mut decided = Decided { order: VecDeque::new(), set: HashSet::new(), cap: 200_000 };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tracing::info!("verifier running");

    let finish = |g: Gathering, permits: &Arc<Semaphore>, publisher: &Arc<Publisher>| {
        let permits = permits.clone();
        let publisher = publisher.clone();
        async move {
            let permit = permits.acquire_owned().await.expect("semaphore never closes");
            tokio::spawn(async move {
                publisher.publish(g).await;
                drop(permit);
            });
        }
    };

    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {
                // Keep held outcomes from being redelivered while their siblings run, and
                // decide tasks whose deadline has long passed with what arrived.
                let now = now_ms();
                let stale: Vec<String> = gathering
                    .iter()
                    .filter(|(_, g)| g.deadline_at_ms() + config.grace.as_millis() as u64 <= now)
                    .map(|(t, _)| t.clone())
                    .collect();
                for task in stale {
                    let g = gathering.remove(&task).expect("listed above");
                    decided.insert(task.clone());
                    if publisher.already_decided(&task).await {
                        for m in g.held {
                            let _ = m.ack().await;
                        }
                    } else {
                        finish(g, &permits, &publisher).await;
                    }
                }
                for g in gathering.values() {
                    if g.first_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(10)) {
                        for m in &g.held {
                            let _ = m.ack_with(AckKind::Progress).await;
                        }
                    }
                }
                continue;
            }
            next = messages.next() => match next {
                Some(Ok(msg)) => msg,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "outcome consumer");
                    continue;
                }
                None => break,
            },
        };
        let outcome = match decode::<Outcome>(&msg.payload, MAX_MESSAGE_BYTES) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable outcome; dropping");
                let _ = msg.ack_with(AckKind::Term).await;
                continue;
            }
        };
        if !outcome.ticket.verify(&config.secret) {
            tracing::warn!(worker = %outcome.ticket.worker, task = %outcome.ticket.task_id, "forged ticket; dropping");
            let _ = msg.ack_with(AckKind::Term).await;
            continue;
        }
        let task = outcome.ticket.task_id.clone();
        if decided.set.contains(&task) {
            let _ = msg.ack().await;
            continue;
        }
        let stored_at = nats::stored_at_us(&msg).unwrap_or_else(sundara_schemas::now_us);
        let latency_us = stored_at.saturating_sub(outcome.ticket.dispatched_at_us);
        let g = gathering.entry(task.clone()).or_default();
        g.first_seen.get_or_insert_with(Instant::now);
        if g.replicas.contains_key(&outcome.ticket.replica) {
            let _ = msg.ack().await; // a second outcome for a replica (late original after a reassignment)
            continue;
        }
        g.replicas.insert(outcome.ticket.replica, Received { outcome, latency_us, stored_at_us: stored_at });
        g.held.push(msg);
        if g.complete() {
            let g = gathering.remove(&task).expect("present");
            decided.insert(task);
            finish(g, &permits, &publisher).await;
        }
    }
    // Let in-flight decisions finish storing before the process goes.
    let _ = permits.acquire_many(config.concurrency as u32).await;
    let _ = client.flush().await;
    tracing::info!("verifier stopped");
    Ok(())
}
