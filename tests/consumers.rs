//! Consumers that ack a chunk at a time (`nats::consume_acking_all`, the scheduler's
//! releases and ingress' finishes): one ack covers a chunk, a handling that fails is tried
//! again and never acked over, and a consumer made before (acking one by one) is made
//! anew after its ack floor. Real nats-server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, stream};
use futures::StreamExt;
use sundara::stack::{LocalStack, project_root};
use sundara_common::{Shutdown, nats};

const DEADLINE: Duration = Duration::from_secs(20);

async fn stream_of(js: &jetstream::Context, name: &str, messages: u64) -> jetstream::stream::Stream {
    let config = stream::Config { name: name.into(), subjects: vec![format!("{name}.>")], ..Default::default() };
    let stream = js.create_stream(config).await.unwrap();
    for i in 1..=messages {
        nats::publish_durable(js, format!("{name}.m"), &i.to_string(), i.to_string().into_bytes()).await.unwrap();
    }
    stream
}

fn config(durable: &str, filter: &str) -> jetstream::consumer::pull::Config {
    nats::acking_all(nats::consumer_config(durable, filter, Duration::from_secs(30), 1024))
}

/// Waits until `done` holds of the consumer's info.
async fn until(stream: &jetstream::stream::Stream, durable: &str, done: impl Fn(&jetstream::consumer::Info) -> bool) {
    let watched = async {
        loop {
            let info = stream.consumer_info(durable).await;
            if info.as_ref().is_ok_and(&done) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, watched).await.expect("the consumer got there in time");
}

/// Tries of each message's handling so far, by its number (the payload).
type Handled = Arc<Mutex<HashMap<u64, u32>>>;

/// Consumes in chunks of `chunk`, counting each handling; a handling fails where
/// `fails(message, tries so far)`. Returns the counts, the shutdown and the consuming task.
fn consume(
    consumer: jetstream::consumer::PullConsumer,
    chunk: usize,
    fails: fn(u64, u32) -> bool,
) -> (Handled, Shutdown, tokio::task::JoinHandle<Result<(), sundara_common::Error>>) {
    let (handled, shutdown) = (Handled::default(), Shutdown::new());
    let consuming = {
        let (handled, shutdown) = (handled.clone(), shutdown.clone());
        tokio::spawn(async move {
            nats::consume_acking_all(&consumer, &shutdown, chunk, "test", |msg| {
                let handled = handled.clone();
                async move {
                    let n: u64 = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
                    let mut handled = handled.lock().unwrap();
                    let tries = handled.entry(n).or_default();
                    *tries += 1;
                    if fails(n, *tries) { Err(format!("message {n} failed")) } else { Ok(()) }
                }
            })
            .await
        })
    };
    (handled, shutdown, consuming)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_is_acked_once_handled_and_a_failing_message_is_never_acked_over() {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let js = jetstream::new(nats::connect(&stack.endpoints().nats, "test").await.unwrap());
    let stream = stream_of(&js, "CHUNKS", 40).await;
    let consumer = nats::ensure_consumer(&js, "CHUNKS", config("chunks", "CHUNKS.>")).await.unwrap();
    assert_eq!(consumer.cached_info().config.ack_policy, AckPolicy::All);

    // Message 7 fails its first two handlings, then succeeds: every message is handled,
    // 7 three times, and everything ends acked.
    let (handled, shutdown, consuming) = consume(consumer, 16, |n, tries| n == 7 && tries <= 2);
    until(&stream, "chunks", |i| i.ack_floor.stream_sequence == 40 && i.num_ack_pending == 0).await;
    {
        let handled = handled.lock().unwrap();
        assert_eq!(handled.len(), 40);
        assert_eq!(handled[&7], 3, "a failed handling is tried again in place");
    }
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, consuming).await.expect("stops at shutdown").unwrap().unwrap();

    // A message that keeps failing holds the ack floor below it, however many after it
    // are handled; at shutdown it stays un-acked, to be delivered again.
    let stream = stream_of(&js, "STUCK", 30).await;
    let consumer = nats::ensure_consumer(&js, "STUCK", config("stuck", "STUCK.>")).await.unwrap();
    let (handled, shutdown, consuming) = consume(consumer, 4, |n, _| n == 10);
    let failing_twice = async {
        while handled.lock().unwrap().get(&10).copied().unwrap_or(0) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(DEADLINE, failing_twice).await.expect("message 10 was tried again");
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, consuming).await.expect("stops at shutdown").unwrap().unwrap();
    let info = stream.consumer_info("stuck").await.unwrap();
    assert!(info.ack_floor.stream_sequence < 10, "acked over a message never handled: {:?}", info.ack_floor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_acked_one_by_one_is_made_anew_after_its_ack_floor() {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let js = jetstream::new(nats::connect(&stack.endpoints().nats, "test").await.unwrap());
    let stream = stream_of(&js, "OLD", 10).await;
    // As the services made it before: explicit acks. 4 acked, 2 more delivered and not.
    let explicit = nats::consumer_config("old", "OLD.>", Duration::from_secs(30), 1024);
    let consumer = nats::ensure_consumer(&js, "OLD", explicit).await.unwrap();
    let mut messages = consumer.fetch().max_messages(6).messages().await.unwrap();
    let mut n = 0;
    while let Some(msg) = tokio::time::timeout(DEADLINE, messages.next()).await.expect("delivered") {
        let msg = msg.unwrap();
        n += 1;
        if n <= 4 {
            msg.double_ack().await.unwrap();
        }
    }
    assert_eq!(n, 6);

    let consumer = nats::ensure_consumer(&js, "OLD", config("old", "OLD.>")).await.unwrap();
    assert_eq!(stream.consumer_info("old").await.unwrap().config.ack_policy, AckPolicy::All);
    let mut messages = consumer.messages().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 6 {
        let msg = tokio::time::timeout(DEADLINE, messages.next()).await.expect("delivered").unwrap().unwrap();
        got.push(std::str::from_utf8(&msg.payload).unwrap().parse::<u64>().unwrap());
        msg.ack().await.unwrap();
    }
    assert_eq!(got, (5..=10).collect::<Vec<_>>(), "from the first message not acked, and nothing acked before");
}

/// A consumer whose ack wait a release changed (the scheduler's TASKS consumers went from
/// 30 s to 10 s) is updated in place: what it had delivered and not acked stays delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_ack_wait_changed_is_updated_in_place() {
    let stack = LocalStack::start(&project_root()).expect("servers start (run scripts/setup)");
    let js = jetstream::new(nats::connect(&stack.endpoints().nats, "test").await.unwrap());
    let stream = stream_of(&js, "WAIT", 4).await;
    let before = nats::consumer_config("wait", "WAIT.>", Duration::from_secs(30), 1024);
    let consumer = nats::ensure_consumer(&js, "WAIT", before).await.unwrap();
    let mut messages = consumer.fetch().max_messages(2).messages().await.unwrap();
    while let Some(msg) = tokio::time::timeout(DEADLINE, messages.next()).await.expect("delivered") {
        msg.unwrap();
    }
    let after = nats::consumer_config("wait", "WAIT.>", Duration::from_secs(10), 1024);
    nats::ensure_consumer(&js, "WAIT", after).await.unwrap();
    let info = stream.consumer_info("wait").await.unwrap();
    assert_eq!(info.config.ack_wait, Duration::from_secs(10));
    assert_eq!((info.delivered.stream_sequence, info.num_ack_pending), (2, 2), "its deliveries are kept");
}
