//! Assignments to WORK, several per message under load.
//!
//! Every dispatch hands its assignments to one [`WorkSender`] and waits for them to be
//! stored. The sender's task publishes what is ready, grouped by subject (one worker, one
//! model), and while those publishes wait for their acks, the next assignments queue up
//! and go out together in the next round. Idle, an assignment goes out at once, alone
//! and as a plain [`Assignment`], as before. Under load, one WORK message and its acks
//! carry many tasks.

use std::collections::HashMap;

use async_nats::jetstream;
use bytes::Bytes;
use sundara_common::{Error as CommonError, JetStreamError, JetStreamErrorKind, js_err, nats};
use sundara_schemas::{Assignment, MAX_ASSIGNMENTS_PER_MESSAGE, encode, encode_assignments, subjects as subj};
use tokio::sync::{mpsc, oneshot};

/// Assignments waiting for the sender: a dispatch waits while it is full.
const QUEUED: usize = 4096;
/// Bytes of encoded assignments above which a message takes no more: well under
/// nats-server's `max_payload`, so that a batch is never refused for its size where its
/// assignments alone would not be.
const MESSAGE_BYTES: usize = 1 << 20;

/// One assignment to store in WORK.
pub struct Outgoing {
    pub subject: String,
    /// Its assignment id: the message id of an assignment sent alone.
    pub aid: String,
    pub assignment: Assignment,
    /// Its span's `traceparent` (empty when untraced).
    pub traceparent: String,
}

struct Queued {
    subject: String,
    aid: String,
    traceparent: String,
    /// The assignment, encoded once: alone it is the message, in a batch a part of it.
    encoded: Vec<u8>,
    stored: oneshot::Sender<Stored>,
}

/// How a message's publish went, for each of its assignments' dispatches: the error's
/// kind survives (a dispatch decides on it), its source as text.
type Stored = Result<(), (JetStreamErrorKind, String)>;

/// Hands assignments to the task that publishes them (see the module's docs).
#[derive(Clone)]
pub struct WorkSender {
    queue: mpsc::Sender<Queued>,
}

impl WorkSender {
    /// Starts the publishing task on `js`. It ends once every sender is dropped.
    pub fn start(js: jetstream::Context) -> WorkSender {
        let (queue, rx) = mpsc::channel(QUEUED);
        tokio::spawn(publish_rounds(js, rx));
        WorkSender { queue }
    }

    /// Stores every one of `outgoing` in WORK, or fails (then some may be stored: a
    /// dispatch tried again stores them again, and the worker takes an assignment it
    /// already answered as any redelivery).
    pub async fn send(&self, outgoing: Vec<Outgoing>) -> Result<(), CommonError> {
        let mut waits = Vec::with_capacity(outgoing.len());
        for o in outgoing {
            let (stored, wait) = oneshot::channel();
            let encoded = encode(&o.assignment);
            let queued = Queued { subject: o.subject, aid: o.aid, traceparent: o.traceparent, encoded, stored };
            self.queue.send(queued).await.map_err(|_| stopped())?;
            waits.push(wait);
        }
        for wait in waits {
            wait.await.map_err(|_| stopped())?.map_err(|(kind, e)| js_err(JetStreamError::new(kind, e)))?;
        }
        Ok(())
    }
}

fn stopped() -> CommonError {
    js_err(JetStreamError::other("the WORK sender stopped"))
}

/// Publishes rounds until every sender is gone: all that is queued, grouped by subject,
/// each group as one message; the next round starts when this one is stored.
async fn publish_rounds(js: jetstream::Context, mut rx: mpsc::Receiver<Queued>) {
    while let Some(first) = rx.recv().await {
        let mut ready = vec![first];
        while let Ok(more) = rx.try_recv() {
            ready.push(more);
        }
        let messages = group(ready, |q| (&q.subject, q.encoded.len()));
        futures::future::join_all(messages.into_iter().map(|m| publish(&js, m))).await;
    }
}

/// Splits `ready` into messages: same subject, in arrival order, at most
/// [`MAX_ASSIGNMENTS_PER_MESSAGE`] and, past the first, [`MESSAGE_BYTES`] each.
fn group<T>(ready: Vec<T>, key: impl Fn(&T) -> (&String, usize)) -> Vec<Vec<T>> {
    let mut open: HashMap<String, usize> = HashMap::new();
    let mut messages: Vec<(Vec<T>, usize)> = Vec::new();
    for item in ready {
        let (subject, bytes) = key(&item);
        let fits =
            |(m, total): &(Vec<T>, usize)| m.len() < MAX_ASSIGNMENTS_PER_MESSAGE && total + bytes <= MESSAGE_BYTES;
        match open.get(subject).copied().filter(|&i| fits(&messages[i])) {
            Some(i) => {
                messages[i].1 += bytes;
                messages[i].0.push(item);
            }
            None => {
                open.insert(subject.clone(), messages.len());
                messages.push((vec![item], bytes));
            }
        }
    }
    messages.into_iter().map(|(m, _)| m).collect()
}

/// Stores one message of assignments and tells each of their dispatches how it went.
async fn publish(js: &jetstream::Context, mut message: Vec<Queued>) {
    let mut headers = async_nats::HeaderMap::new();
    let (payload, id) = if let [one] = &mut message[..] {
        // A plain assignment, with its trace context as the headers, as any message of a
        // task carries it.
        if !one.traceparent.is_empty() {
            headers.insert(subj::TRACEPARENT, one.traceparent.as_str());
        }
        (std::mem::take(&mut one.encoded), one.aid.clone())
    } else {
        // The same assignments in the same order have the same id: a round published again
        // whole is deduplicated. (Dispatches tried again regroup, and are taken as
        // redeliveries.)
        headers.insert(subj::ASSIGNMENTS, message.len().to_string().as_str());
        let aids: Vec<&str> = message.iter().map(|q| q.aid.as_str()).collect();
        let traceparents: Vec<String> = message.iter().map(|q| q.traceparent.clone()).collect();
        (encode_assignments(message.iter().map(|q| q.encoded.as_slice()), &traceparents), batch_id(&aids))
    };
    let msg = jetstream::message::PublishMessage::build()
        .headers(headers)
        .payload(Bytes::from(payload))
        .message_id(id.as_str());
    let subject = message[0].subject.clone();
    let stored = nats::publish_built(js, subject, msg).await;
    let outcome: Stored = stored.map(|_| ()).map_err(|e| match &e {
        CommonError::JetStream(j) => (j.kind(), e.to_string()),
        _ => (JetStreamErrorKind::Other, e.to_string()),
    });
    for q in message {
        let _ = q.stored.send(outcome.clone());
    }
}

/// A message id for a batch of assignments: their ids, hashed.
fn batch_id(aids: &[&str]) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for aid in aids {
        hash.update(aid.as_bytes());
        hash.update(b"\n");
    }
    let digest = hash.finalize();
    format!("batch.{}", hex::encode(&digest[..16]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subjects(messages: &[Vec<(String, usize)>]) -> Vec<Vec<&str>> {
        messages.iter().map(|m| m.iter().map(|(s, _)| s.as_str()).collect()).collect()
    }

    #[test]
    fn ready_assignments_go_one_message_per_subject_in_arrival_order() {
        let ready: Vec<(String, usize)> =
            ["a", "b", "a", "c", "b", "a"].iter().enumerate().map(|(i, s)| (s.to_string(), 10 + i)).collect();
        let messages = group(ready, |(s, n)| (s, *n));
        assert_eq!(subjects(&messages), vec![vec!["a", "a", "a"], vec!["b", "b"], vec!["c"]]);
        assert_eq!(messages[0].iter().map(|(_, n)| *n).collect::<Vec<_>>(), vec![10, 12, 15]);
    }

    #[test]
    fn a_message_is_bounded_by_count_and_bytes_but_takes_one_large_assignment() {
        let many: Vec<(String, usize)> = (0..MAX_ASSIGNMENTS_PER_MESSAGE + 1).map(|_| ("a".into(), 1)).collect();
        let messages = group(many, |(s, n)| (s, *n));
        assert_eq!(messages.iter().map(Vec::len).collect::<Vec<_>>(), vec![MAX_ASSIGNMENTS_PER_MESSAGE, 1]);

        let large = vec![("a".into(), MESSAGE_BYTES * 3), ("a".into(), 1), ("a".into(), MESSAGE_BYTES - 1)];
        let messages = group(large, |(s, n)| (s, *n));
        assert_eq!(messages.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_batch_id_names_its_assignments_in_order() {
        assert_eq!(batch_id(&["t.0.0", "u.0.0"]), batch_id(&["t.0.0", "u.0.0"]));
        assert_ne!(batch_id(&["t.0.0", "u.0.0"]), batch_id(&["u.0.0", "t.0.0"]));
        assert_ne!(batch_id(&["t.0.0", "u.0.0"]), batch_id(&["t.0.0"]));
    }
}
