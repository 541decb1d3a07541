//! The service against a real nats-server (`.venv/bin/nats-server` from scripts/setup, or
//! `$SUNDARA_NATS_SERVER`); skipped with a note when none is installed.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use sundara_common::{Endpoints, Shutdown, nats};
use sundara_schemas::{
    CompareRule, EpochWeights, MAX_MESSAGE_BYTES, MinerVerdict, ModelRef, Standing, Verdict, WIRE_VERSION, decode,
    encode, subjects as subj,
};

use crate::{CLOSE_EPOCH_SUBJECT, CONSUMER, Config, Ledger, RewarderError, read_ledger, read_weights, run};

struct Server {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nats_server_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SUNDARA_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/nats-server");
    if venv.is_file() {
        return Some(venv);
    }
    let on_path = std::env::var_os("PATH")?;
    std::env::split_paths(&on_path).map(|d| d.join("nats-server")).find(|p| p.is_file())
}

fn start_server() -> Option<Server> {
    let Some(bin) = nats_server_binary() else {
        eprintln!("nats-server not found (run scripts/setup); skipping");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("sundara-rewarder-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let server = Server { child, dir, url: format!("nats://127.0.0.1:{port}") };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

fn verdict(i: u64) -> Verdict {
    let standings = [Standing::Agreed, Standing::Agreed, Standing::Disagreed, Standing::Missing];
    let miners = (0..3u64)
        .map(|r| {
            let standing = standings[((i + r) % 4) as usize];
            MinerVerdict {
                operator: String::new(),
                worker: format!("miner-{}", (i + r) % 5),
                replica: r as u8,
                attempt: 0,
                standing,
                latency_us: (standing != Standing::Missing).then_some((i * 31 + r * 17) % 997),
            }
        })
        .collect();
    Verdict {
        v: WIRE_VERSION,
        task_id: format!("task-{i}"),
        tenant: "t".into(),
        model: ModelRef { name: "mlp".into(), version: "1".into() },
        k: 3,
        rule: CompareRule::Exact,
        accepted: true,
        miners,
        decided_at_ms: 0,
        reference: None,
    }
}

async fn publish_verdict(js: &jetstream::Context, i: u64) -> u64 {
    let v = verdict(i);
    nats::publish_durable(js, subj::verdict(&v.task_id), &v.task_id, encode(&v)).await.unwrap().sequence
}

fn config(url: &str) -> Config {
    let mut config = Config::new(Endpoints {
        nats: sundara_common::nats::NatsEndpoint::open(url),
        redis_url: "redis://unused".into(),
        redis_ca: None,
    });
    config.epoch_length = Duration::from_secs(3600);
    config.flush_interval = Duration::from_millis(20);
    config.quarantine_after = 0; // no Redis here
    config
}

/// Waits until the consumer has delivered `seq` and holds nothing un-acked.
async fn caught_up(js: &jetstream::Context, seq: u64) {
    let stream = js.get_stream(subj::VERDICTS_STREAM).await.unwrap();
    let started = Instant::now();
    loop {
        if let Ok(info) = stream.consumer_info(CONSUMER).await
            && info.delivered.stream_sequence >= seq
            && info.num_ack_pending == 0
        {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "rewarder did not catch up to {seq}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn close_epoch(client: &async_nats::Client) -> EpochWeights {
    let reply = tokio::time::timeout(Duration::from_secs(10), client.request(CLOSE_EPOCH_SUBJECT, "".into()))
        .await
        .expect("close answered")
        .unwrap();
    decode(&reply.payload, MAX_MESSAGE_BYTES).unwrap()
}

fn spawn(config: Config) -> (Shutdown, tokio::task::JoinHandle<Result<(), RewarderError>>) {
    let shutdown = Shutdown::new();
    (shutdown.clone(), tokio::spawn(run(config, shutdown)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_verdicts_once_and_recovers_after_a_crash() {
    let Some(server) = start_server() else { return };
    let client = nats::connect(&sundara_common::nats::NatsEndpoint::open(&server.url), "test").await.unwrap();
    let js = jetstream::new(client.clone());
    nats::provision(&js, &nats::Retention::default()).await.unwrap();

    let mut expected = Ledger::new(0.1, 0);
    let mut last = 0;
    for i in 0..40 {
        let seq = publish_verdict(&js, i).await;
        expected.apply(&verdict(i), seq).unwrap();
        last = seq;
    }
    // Garbage is terminated, not applied.
    let bad = nats::publish_durable(&js, subj::verdict("bad"), "bad", b"\xc1nonsense".to_vec()).await.unwrap();
    last = last.max(bad.sequence);

    let (shutdown, task) = spawn(config(&server.url));
    caught_up(&js, last).await;
    let weights = close_epoch(&client).await;
    assert_eq!(weights.epoch, 1);
    assert_eq!(weights.weights.iter().map(|w| u32::from(w.weight)).sum::<u32>(), 65535);
    let mut replay = expected.clone();
    let want = replay.close_epoch(weights.closed_at_ms, &Default::default());
    assert_eq!(weights, want, "service weights equal a local replay");
    assert_eq!(read_weights(&js, None).await.unwrap().as_ref(), Some(&weights));
    assert_eq!(read_weights(&js, Some(1)).await.unwrap().as_ref(), Some(&weights));
    assert_eq!(read_weights(&js, Some(2)).await.unwrap(), None);
    let stored = read_ledger(&js).await.unwrap().unwrap();
    assert_eq!((stored.epoch(), stored.last_seq()), (2, expected.last_seq()));
    // The closed ledger: the epoch's work counts restarted.
    assert!(stored.miners().map(|(_, s)| s).eq(replay.miners().map(|(_, s)| s)));

    // Traces and the epoch are in REWARDS.
    let rewards = js.get_stream(subj::REWARDS_STREAM).await.unwrap();
    let traces = crate::read_traces(&js).await.unwrap();
    let trace = traces.iter().find(|t| t.task_id == "task-7").expect("task-7's trace");
    assert_eq!((trace.epoch, trace.entries.len()), (1, 3));
    // One per verdict, stored a flush per message rather than a message per task.
    let per_task: Vec<u64> = traces.iter().map(|t| t.verdict_seq).collect();
    assert_eq!(per_task.len(), per_task.iter().collect::<std::collections::HashSet<_>>().len());
    let messages = rewards.cached_info().state.messages;
    assert!(messages < traces.len() as u64, "{messages} REWARDS messages for {} traces", traces.len());
    let epoch = rewards.get_last_raw_message_by_subject(subj::REWARD_EPOCH).await.unwrap();
    assert_eq!(decode::<EpochWeights>(&epoch.payload, MAX_MESSAGE_BYTES).unwrap(), weights);

    shutdown.cancel();
    task.await.unwrap().unwrap();

    // A "crashed" rewarder took three verdicts and never acked them; two more follow.
    let mut fresh = Vec::new();
    for i in 40..43 {
        fresh.push((i, publish_verdict(&js, i).await));
    }
    let consumer = js
        .get_stream(subj::VERDICTS_STREAM)
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>(CONSUMER)
        .await
        .unwrap();
    // Take all three without acking. A pull request the stopped rewarder left on the server
    // may still catch some of them; those count as taken by the crashed rewarder too.
    let crashed_to = fresh.last().unwrap().1;
    let started = Instant::now();
    loop {
        let info = consumer.clone().info().await.unwrap().clone();
        if info.delivered.stream_sequence >= crashed_to {
            assert_eq!(info.num_ack_pending, 3, "the three verdicts are delivered and un-acked");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the three verdicts were not delivered");
        let mut batch = consumer.batch().max_messages(3).expires(Duration::from_millis(500)).messages().await.unwrap();
        while let Some(m) = batch.next().await {
            m.unwrap();
        }
    }
    for i in 43..45 {
        fresh.push((i, publish_verdict(&js, i).await));
    }
    let mut expected = replay;
    for &(i, seq) in &fresh {
        expected.apply(&verdict(i), seq).unwrap();
    }
    let (shutdown, task) = spawn(config(&server.url));
    let last = fresh.last().unwrap().1;
    caught_up(&js, last).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let stored = read_ledger(&js).await.unwrap().unwrap();
    assert_eq!(stored.last_seq(), last);
    assert!(stored.miners().map(|(_, s)| s).eq(expected.miners().map(|(_, s)| s)), "no verdict lost or doubled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_epoch_closes_by_itself() {
    let Some(server) = start_server() else { return };
    let client = nats::connect(&sundara_common::nats::NatsEndpoint::open(&server.url), "test").await.unwrap();
    let js = jetstream::new(client.clone());
    nats::provision(&js, &nats::Retention::default()).await.unwrap();
    publish_verdict(&js, 0).await;
    let mut config = config(&server.url);
    config.epoch_length = Duration::from_millis(300);
    let (shutdown, task) = spawn(config);
    // The verdict counts in whichever epoch was open when it was applied; the next one is idle.
    let started = Instant::now();
    let trace = loop {
        if let Some(t) = crate::read_traces(&js).await.unwrap().into_iter().find(|t| t.task_id == "task-0") {
            break t;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the verdict was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let js = &js;
    let closed = |epoch| async move {
        let started = Instant::now();
        loop {
            if let Some(w) = read_weights(js, Some(epoch)).await.unwrap() {
                return w;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "epoch {epoch} did not close");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let worked = closed(trace.epoch).await;
    assert_eq!(worked.weights.iter().map(|w| u32::from(w.weight)).sum::<u32>(), 65535);
    let idle = closed(trace.epoch + 1).await;
    assert!(idle.weights.iter().all(|w| w.weight == 0), "no verified work, no weight: {idle:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

fn start_redis() -> Option<Server> {
    let bin = std::env::var_os("SUNDARA_REDIS_SERVER").map(PathBuf::from).or_else(|| {
        let on_path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&on_path)
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
    });
    let Some(bin) = bin else {
        eprintln!("redis-server not found (run scripts/setup); skipping");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("sundara-rewarder-redis-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let server = Server { child, dir, url: format!("redis://127.0.0.1:{port}") };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

/// Task `i` of three miners: a and b agree; c disagrees on the first three, which an audit
/// judged (proofs against c), and agrees on the others (votes it happened to win).
fn audited_verdict(i: u64) -> Verdict {
    let c = if i < 3 { Standing::Disagreed } else { Standing::Agreed };
    let miners = [("miner-a", Standing::Agreed), ("miner-b", Standing::Agreed), ("miner-c", c)]
        .into_iter()
        .enumerate()
        .map(|(r, (worker, standing))| MinerVerdict {
            operator: String::new(),
            worker: worker.into(),
            replica: r as u8,
            attempt: 0,
            standing,
            latency_us: Some(100 + r as u64),
        })
        .collect();
    let mut v = verdict(i);
    v.miners = miners;
    v.reference = (i < 3).then_some(sundara_schemas::ReferenceCheck::AuditFailed);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_miners_weigh_nothing_even_when_redis_is_gone() {
    let Some(server) = start_server() else { return };
    let Some(redis) = start_redis() else { return };
    let client = nats::connect(&sundara_common::nats::NatsEndpoint::open(&server.url), "test").await.unwrap();
    let js = jetstream::new(client.clone());
    nats::provision(&js, &nats::Retention::default()).await.unwrap();
    // The scheduler quarantined b for timeouts.
    let capacity = sundara_common::Capacity::connect(&redis.url).await.unwrap();
    assert!(capacity.quarantine("miner-b", "3 assignments timed out").await.unwrap());
    let mut last = 0;
    for i in 0..12 {
        let v = audited_verdict(i);
        last = nats::publish_durable(&js, subj::verdict(&v.task_id), &v.task_id, encode(&v)).await.unwrap().sequence;
    }
    let mut config = config(&server.url);
    config.endpoints.redis_url = redis.url.clone();
    config.quarantine_after = 3;
    let (shutdown, task) = spawn(config);
    caught_up(&js, last).await;
    let first = close_epoch(&client).await;
    let weight = |w: &EpochWeights, m: &str| w.weights.iter().find(|x| x.miner == m).unwrap().weight;
    assert_eq!(first.quarantined, ["miner-b", "miner-c"], "the scheduler's and the rewarder's own");
    assert_eq!((weight(&first, "miner-a"), weight(&first, "miner-b"), weight(&first, "miner-c")), (65535, 0, 0));
    assert!(capacity.quarantined().await.unwrap().contains_key("miner-c"), "c quarantined on proof");

    // Redis goes away: the close still happens, on the ledger's proofs alone.
    drop(redis);
    for i in 12..20 {
        let v = audited_verdict(i);
        last = nats::publish_durable(&js, subj::verdict(&v.task_id), &v.task_id, encode(&v)).await.unwrap().sequence;
    }
    caught_up(&js, last).await;
    let second = close_epoch(&client).await;
    assert_eq!(second.quarantined, ["miner-c"]);
    assert_eq!(weight(&second, "miner-c"), 0);
    assert!(weight(&second, "miner-a") > 0 && weight(&second, "miner-b") > 0, "{second:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}
