//! Attacking miners: each a NATS client of its own that speaks the miners' wire protocol
//! as `sundara worker` does (announces itself through the fleet gateway on
//! `sundara.report.<id>`, pulls assignments from its own WORK consumer, publishes outcomes
//! on its own outcome subject), computes the real outputs with ONNX Runtime, and then lies
//! where its test says. It uses only what a miner's NATS grants allow (`tests/security.rs`
//! proves those grants); everything else it sends is a claim the validator must check.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use sundara_common::nats;
use sundara_schemas::{
    Assignment, FleetReply, FleetRequest, FleetUpdate, MAX_MESSAGE_BYTES, ModelMeta, Outcome, OutcomeResult,
    SliceAnnounce, Tensor, WIRE_VERSION, WorkTiming, WorkerAnnounce, decode, encode, now_us, subjects as subj,
};
use tokio::task::JoinHandle;

use super::{Harness, reference};

/// One attacking miner.
pub struct Miner {
    pub id: String,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    models: HashMap<String, ModelMeta>,
    heartbeat: JoinHandle<()>,
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// One assignment the miner took, with the outputs an honest miner would send.
pub struct Taken {
    pub assignment: Assignment,
    pub honest: Vec<Tensor>,
    /// The WORK message it came in, shared by the assignments it carried: acking it (as
    /// [`Miner::answer`] does) acks them all.
    pub msg: std::sync::Arc<jetstream::Message>,
}

impl Miner {
    /// Joins the fleet as `id` of `operator`, serving every demo model on one slice of
    /// `slots` slots, and keeps its heartbeat going until dropped.
    pub async fn join(h: &Harness, id: &str, operator: &str, slots: u32) -> Miner {
        let announce = WorkerAnnounce {
            worker: id.into(),
            operator: operator.into(),
            slices: vec![SliceAnnounce {
                id: format!("{id}-cpu0"),
                device: "cpu".into(),
                slots,
                models: h.models.keys().cloned().collect(),
                memory_total: 1 << 30,
                memory_free: 1 << 30,
                lanes: 1,
                ..Default::default()
            }],
        };
        Miner::join_with(h, id, announce).await
    }

    /// Joins the fleet as `id` with the announcement given (the miner's claims, sent as
    /// they are on start and with every heartbeat), which the gateway must accept.
    pub async fn join_with(h: &Harness, id: &str, announce: WorkerAnnounce) -> Miner {
        let ep = h.stack.endpoints();
        let client = nats::connect(&ep.nats, id).await.expect("the attacker connects");
        let js = jetstream::new(client.clone());
        let fresh = FleetUpdate::Announce { announce: announce.clone(), fresh: true, heartbeat_ttl_ms: 2000 };
        let reply = report(&client, id, fresh).await;
        assert!(reply.ok, "announce refused: {}", reply.reason);
        let heartbeat = {
            let (client, id) = (client.clone(), id.to_string());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let update =
                        FleetUpdate::Announce { announce: announce.clone(), fresh: false, heartbeat_ttl_ms: 2000 };
                    let _ = report(&client, &id, update).await;
                }
            })
        };
        h.wait_for_worker(id).await;
        Miner { id: id.into(), client, js, models: h.models.clone(), heartbeat }
    }

    /// The miner's assignments as they come, each with its honest outputs.
    pub async fn assignments(&self) -> futures::stream::BoxStream<'static, Taken> {
        let consumer = nats::durable_consumer(
            &self.js,
            subj::WORK_STREAM,
            &format!("worker-{}", self.id),
            &subj::work_of(&self.id),
            Duration::from_secs(30),
            256,
        )
        .await
        .expect("its own WORK consumer");
        let messages = consumer.messages().await.expect("pull");
        let models = self.models.clone();
        messages
            .filter_map(|m| async move {
                let msg = std::sync::Arc::new(m.ok()?);
                let work = nats::work_of_message(&msg).ok()?;
                Some(futures::stream::iter(work.into_iter().map(move |(a, _)| (a, msg.clone()))))
            })
            .flatten()
            .filter_map(move |(assignment, msg)| {
                let models = models.clone();
                async move {
                    let meta = models[&assignment.ticket.model.name].clone();
                    let inputs = assignment.inputs.clone();
                    let honest = tokio::task::spawn_blocking(move || reference(&meta, &inputs)).await.ok()?;
                    Some(Taken { assignment, honest, msg })
                }
            })
            .boxed()
    }

    /// Publishes `outputs` as its outcome for the assignment, under Nats-Msg-Id `id`
    /// (a well-behaved miner uses `ticket.outcome_id()`), on its own outcome subject.
    pub async fn answer_as(&self, a: &Assignment, outputs: Vec<Tensor>, id: &str) {
        let now = now_us();
        let outcome = Outcome {
            v: WIRE_VERSION,
            ticket: a.ticket.clone(),
            result: OutcomeResult::Ok { outputs },
            compute_us: 1,
            timing: WorkTiming { accepted_us: a.accepted_at_us, received_us: now, started_us: now, finished_us: now },
        };
        let subject = subj::outcome(&a.ticket.task_id, &self.id);
        nats::publish_durable(&self.js, subject, id, encode(&outcome)).await.expect("OUTCOMES stores it");
    }

    /// Publishes `outputs` as a well-behaved miner would, and acks the assignment.
    pub async fn answer(&self, taken: Taken, outputs: Vec<Tensor>) {
        self.answer_as(&taken.assignment, outputs, &taken.assignment.ticket.outcome_id()).await;
        let _ = taken.msg.ack().await;
    }

    /// Hands an assignment back through the gateway; the gateway's reply.
    pub async fn hand_back(&self, assignment_id: &str) -> FleetReply {
        report(&self.client, &self.id, FleetUpdate::HandBack { assignment_id: assignment_id.into() }).await
    }

    /// Leaves an assignment un-acked for JetStream to redeliver (not used by honest miners).
    pub async fn nak(taken: &Taken) {
        let _ = taken.msg.ack_with(AckKind::Nak(None)).await;
    }
}

/// A report through the fleet gateway and its reply.
async fn report(client: &async_nats::Client, worker: &str, update: FleetUpdate) -> FleetReply {
    let request = encode(&FleetRequest { v: WIRE_VERSION, update });
    let reply = tokio::time::timeout(Duration::from_secs(5), client.request(subj::report(worker), request.into()))
        .await
        .expect("the gateway answers")
        .expect("the gateway answers");
    decode(&reply.payload, MAX_MESSAGE_BYTES).expect("a fleet reply")
}

/// The same lie told by every member of a cartel: each float moved by +1.
pub fn falsify(outputs: &[Tensor]) -> Vec<Tensor> {
    outputs
        .iter()
        .map(|t| match t.values::<f32>() {
            Some(values) => {
                let moved: Vec<f32> = values.iter().map(|v| v + 1.0).collect();
                Tensor::from_values(&t.name, t.shape.clone(), &moved)
            }
            None => t.clone(),
        })
        .collect()
}
