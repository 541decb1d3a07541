//! Client side of Sundara: submit tasks and follow their results.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::{FutureExt, Stream, StreamExt};
use sundara_common::nats::NatsEndpoint;
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

    /// Submits raw bytes (tests use it to send malformed payloads).
    pub async fn submit_raw(&self, payload: Vec<u8>) -> Result<SubmitOutcome, ClientError> {
        let subject = subj::submit(&self.tenant);
        let request = match sundara_common::telemetry::context_headers() {
            Some(headers) => self.nats.request_with_headers(subject, headers, payload.into()).boxed(),
            None => self.nats.request(subject, payload.into()).boxed(),
        };
        let reply = tokio::time::timeout(Duration::from_secs(30), request)
            .await
            .map_err(|_| ClientError::Request("no reply within 30 s".into()))?
            .map_err(|e| ClientError::Request(e.to_string()))?;
        Ok(decode::<SubmitReply>(&reply.payload, MAX_MESSAGE_BYTES)?.outcome)
    }

    /// This tenant's results from now on, in the order they were stored. Start following
    /// before submitting so none is missed.
    pub async fn results(&self) -> Result<impl Stream<Item = Result<ClientResult, ClientError>> + use<>, ClientError> {
        // No stream info (it could list other tenants' subjects); a named consumer, so that
        // the create request carries the filter, which the server's permissions check.
        let stream = self.js.get_stream_no_info(subj::RESULTS_STREAM).await.map_err(sundara_common::js_err)?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                name: Some(format!("results-{}-{}", self.tenant, uuid::Uuid::now_v7().simple())),
                filter_subject: subj::results_of(&self.tenant),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(sundara_common::js_err)?;
        let messages = consumer.messages().await.map_err(sundara_common::js_err)?;
        Ok(messages.map(|m| {
            let m = m.map_err(sundara_common::js_err)?;
            Ok(decode::<ClientResult>(&m.payload, MAX_MESSAGE_BYTES)?)
        }))
    }
}
