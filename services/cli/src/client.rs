//! Client side of Sundara: submit tasks and follow their results.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
};
use futures::{FutureExt, Stream, StreamExt};
use sundara_common::nats::{Denial, NatsEndpoint, unless_denied};
use sundara_common::retry::Backoff;
use sundara_schemas::{
    ClientResult, MAX_MESSAGE_BYTES, SubmitOutcome, SubmitReply, SubmitRequest, decode, encode, subjects as subj,
};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("submit failed: {0}")]
    Request(String),
    #[error("bad reply from ingress: {0}")]
    Reply(#[from] sundara_schemas::DecodeError),
    #[error(transparent)]
    Common(#[from] sundara_common::Error),
}

/// One tenant's client. The tenant is who the NATS credentials say it is: the server lets
/// it publish only on its own submit subject and read only its own results.
#[derive(Clone)]
pub struct Client {
    pub nats: async_nats::Client,
    js: jetstream::Context,
    tenant: String,
}

impl Client {
    pub async fn connect(endpoint: &NatsEndpoint, tenant: &str) -> Result<Client, ClientError> {
        Ok(Client::new(sundara_common::nats::connect(endpoint, "sundara-client").await?, tenant))
    }

    /// A client of `tenant` on an existing connection.
    pub fn new(nats: async_nats::Client, tenant: &str) -> Client {
        let js = jetstream::new(nats.clone());
        Client { nats, js, tenant: tenant.to_string() }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Submits one task; the reply says accepted (with the task id) or rejected (with a code).
    /// With tracing on, the submission starts the task's trace.
    pub async fn submit(&self, req: &SubmitRequest) -> Result<SubmitOutcome, ClientError> {
        let span = tracing::info_span!(
            target: sundara_common::telemetry::SPANS,
            "client submit",
            otel.kind = "client",
            messaging.system = "nats",
            "messaging.operation.type" = "send",
            messaging.destination.name = subj::submit(&self.tenant),
            sundara.model = %req.model,
            sundara.tenant = %self.tenant,
            sundara.task_id = tracing::field::Empty,
        );
        let outcome = self.submit_raw(encode(req)).instrument(span.clone()).await;
        if let Ok(SubmitOutcome::Accepted { task_id, .. }) = &outcome {
            span.record("sundara.task_id", task_id.as_str());
        }
        outcome
    }

    /// Submits raw bytes (tests use it to send malformed payloads). Credentials that may
    /// not submit as this tenant fail at once with [`sundara_common::Error::PermissionDenied`].
    pub async fn submit_raw(&self, payload: Vec<u8>) -> Result<SubmitOutcome, ClientError> {
        let subject = subj::submit(&self.tenant);
        let refused = |d: &Denial| d.subject == subject;
        let request = match sundara_common::telemetry::context_headers() {
            Some(headers) => self.nats.request_with_headers(subject.clone(), headers, payload.into()).boxed(),
            None => self.nats.request(subject.clone(), payload.into()).boxed(),
        };
        let reply = unless_denied(&self.nats, refused, tokio::time::timeout(Duration::from_secs(30), request))
            .await
            .map_err(sundara_common::Error::from)?
            .map_err(|_| ClientError::Request("no reply within 30 s".into()))?
            .map_err(|e| ClientError::Request(e.to_string()))?;
        Ok(decode::<SubmitReply>(&reply.payload, MAX_MESSAGE_BYTES)?.outcome)
    }

    /// This tenant's results from now on, in the order they were stored. Start following
    /// before submitting so none is missed.
    ///
    /// Each follower holds one of the tenant's [`RESULT_FOLLOWERS`] RESULTS consumers,
    /// [`results_consumer`]: names the server's permissions list one by one, so a tenant can
    /// reach only its own consumers (see `auth`). Like an ordered consumer, it starts again
    /// after the last result it delivered when its consumer goes away or skips a message,
    /// and it deletes its consumer when dropped. Fails if every slot is in use.
    pub async fn results(&self) -> Result<impl Stream<Item = Result<ClientResult, ClientError>> + use<>, ClientError> {
        // No stream info (it could list other tenants' subjects).
        let stream = self.js.get_stream_no_info(subj::RESULTS_STREAM).await.map_err(sundara_common::js_err)?;
        let mut follower = Follower {
            nats: self.nats.clone(),
            stream,
            tenant: self.tenant.clone(),
            mark: format!("follower {}", uuid::Uuid::now_v7().simple()),
            slot: rand::random_range(0..RESULT_FOLLOWERS),
            stream_seq: 0,
            consumer_seq: 0,
            missed_heartbeat: false,
            messages: None,
        };
        follower.claim(DeliverPolicy::New).await?;
        let followed = futures::stream::unfold(follower, |mut f| async move {
            let item = f.next().await;
            Some((item, f))
        });
        Ok(Box::pin(followed))
    }
}

/// How many result followers ([`Client::results`]) one tenant may have at once.
pub const RESULT_FOLLOWERS: usize = 16;

/// The name of tenant `tenant`'s RESULTS consumer in `slot` (below [`RESULT_FOLLOWERS`]).
/// Distinct for every (tenant, slot): the slot is the digits after the last `-`.
pub fn results_consumer(tenant: &str, slot: usize) -> String {
    format!("results-{tenant}-{slot}")
}

/// One follower of a tenant's results, on the consumer in its slot.
struct Follower {
    /// The connection, whose permission errors it watches.
    nats: async_nats::Client,
    stream: jetstream::stream::Stream<()>,
    tenant: String,
    /// In its consumer's description: tells this follower's consumer from another's.
    mark: String,
    slot: usize,
    /// The stream sequence of the last result delivered (or before the first).
    stream_seq: u64,
    /// The consumer sequence of the last message, to notice one skipped.
    consumer_seq: u64,
    missed_heartbeat: bool,
    messages: Option<pull::Stream>,
}

impl Follower {
    fn config(&self, slot: usize, deliver_policy: DeliverPolicy) -> pull::Config {
        // An ordered consumer's settings: no acks, in memory, gone 30 s after its last pull.
        pull::Config {
            name: Some(results_consumer(&self.tenant, slot)),
            description: Some(self.mark.clone()),
            filter_subject: subj::results_of(&self.tenant),
            deliver_policy,
            ack_policy: AckPolicy::None,
            max_deliver: 1,
            inactive_threshold: Duration::from_secs(30),
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        }
    }

    /// Creates this follower's consumer in the first free slot from its own. A slot holds
    /// the consumer of another follower when a create with this follower's mark finds a
    /// consumer of that name (a create request is also an update, so only a strict create
    /// can tell).
    async fn claim(&mut self, deliver_policy: DeliverPolicy) -> Result<(), ClientError> {
        use async_nats::jetstream::stream::ConsumerCreateStrictErrorKind;
        // Credentials that are not this tenant's are refused the create at once.
        let creates = format!("$JS.API.CONSUMER.CREATE.{}.", subj::RESULTS_STREAM);
        let refused = |d: &Denial| d.subject.starts_with(&creates);
        for i in 0..RESULT_FOLLOWERS {
            let slot = (self.slot + i) % RESULT_FOLLOWERS;
            let create = self.stream.create_consumer_strict(self.config(slot, deliver_policy));
            let created = unless_denied(&self.nats, refused, create).await.map_err(sundara_common::Error::from)?;
            match created {
                Ok(consumer) => {
                    // The stream sequence before its first message: for `New`, the stream's
                    // last message when the consumer was created.
                    self.stream_seq = consumer.cached_info().delivered.stream_sequence;
                    self.slot = slot;
                    self.consumer_seq = 0;
                    self.missed_heartbeat = false;
                    self.messages = Some(consumer.messages().await.map_err(sundara_common::js_err)?);
                    return Ok(());
                }
                Err(e) if e.kind() == ConsumerCreateStrictErrorKind::AlreadyExists => continue,
                Err(e) => return Err(sundara_common::js_err(e).into()),
            }
        }
        Err(ClientError::Request(format!(
            "tenant {} already follows its results {RESULT_FOLLOWERS} times at once; \
             drop a follower (or wait 30 s for a crashed one's to lapse)",
            self.tenant
        )))
    }

    /// Replaces the consumer, starting after the last result delivered. Retries until it
    /// succeeds, as an ordered consumer does.
    async fn recreate(&mut self) {
        self.messages = None;
        release(&self.stream, &self.tenant, self.slot, &self.mark).await;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let from = DeliverPolicy::ByStartSequence { start_sequence: self.stream_seq + 1 };
            match self.claim(from).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(tenant = %self.tenant, error = %e, "cannot follow results again; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// The next result, in stream order.
    async fn next(&mut self) -> Result<ClientResult, ClientError> {
        use async_nats::jetstream::consumer::pull::MessagesErrorKind;
        loop {
            let Some(messages) = self.messages.as_mut() else {
                self.recreate().await;
                continue;
            };
            match messages.next().await {
                Some(Ok(m)) => {
                    self.missed_heartbeat = false;
                    let info = m.info().map_err(|e| ClientError::Request(e.to_string()))?;
                    if info.consumer_sequence != self.consumer_seq + 1 {
                        self.messages = None;
                        continue;
                    }
                    (self.stream_seq, self.consumer_seq) = (info.stream_sequence, info.consumer_sequence);
                    return Ok(decode::<ClientResult>(&m.payload, MAX_MESSAGE_BYTES)?);
                }
                Some(Err(e)) => match e.kind() {
                    // A second missed heartbeat in a row: the consumer or the connection is gone.
                    MessagesErrorKind::MissingHeartbeat if !self.missed_heartbeat => self.missed_heartbeat = true,
                    MessagesErrorKind::MissingHeartbeat
                    | MessagesErrorKind::ConsumerDeleted
                    | MessagesErrorKind::NoResponders
                    | MessagesErrorKind::RequestLimitExceeded => self.messages = None,
                    _ => return Err(sundara_common::js_err(e).into()),
                },
                None => self.messages = None,
            }
        }
    }
}

impl Drop for Follower {
    /// Frees the slot at once rather than when the consumer lapses.
    fn drop(&mut self) {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (stream, tenant, slot, mark) = (self.stream.clone(), self.tenant.clone(), self.slot, self.mark.clone());
            runtime.spawn(async move { release(&stream, &tenant, slot, &mark).await });
        }
    }
}

/// Deletes the consumer in `slot` if it is the one marked `mark` (the slot may have lapsed
/// and been claimed by another follower since).
async fn release(stream: &jetstream::stream::Stream<()>, tenant: &str, slot: usize, mark: &str) {
    let name = results_consumer(tenant, slot);
    if let Ok(info) = stream.consumer_info(&name).await
        && info.config.description.as_deref() == Some(mark)
    {
        let _ = stream.delete_consumer(&name).await;
    }
}
