//! TLS on NATS: the embedded stack's nats-server speaks only TLS on its client port, with
//! a certificate of its own throwaway CA. A client that pins that CA connects; one that
//! speaks plain text, trusts only the system's roots or pins another CA is refused, and
//! with mutual TLS on so is one without a certificate the CA signed. Refusals are read
//! from the error's kind ([`TlsFailure`]), never its text. Redis over TLS (`rediss://`,
//! `up --redis-tls`) serves the whole pipeline and refuses clients that do not pin its CA.

use sundara_testkit as support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sundara::stack::{LocalStack, ServerOptions, project_root};
use sundara_common::Error;
use sundara_common::nats::{self, NatsEndpoint};
use sundara_common::tls::{NatsTls, TlsFailure};

fn stack(mutual_tls: bool) -> LocalStack {
    LocalStack::start_with(&project_root(), None, &ServerOptions { mutual_tls, ..Default::default() })
        .expect("servers start (run scripts/setup)")
}

/// The stack's NATS URL with `tls`.
fn endpoint(stack: &LocalStack, tls: Option<NatsTls>) -> NatsEndpoint {
    NatsEndpoint::open(stack.endpoints().nats.url).with_tls(tls)
}

/// How connecting with `endpoint` failed, when it was a TLS failure.
async fn refusal(endpoint: &NatsEndpoint) -> TlsFailure {
    match nats::connect(endpoint, "tls-test").await {
        Err(Error::NatsTls { failure, .. }) => failure,
        Err(other) => panic!("refused, but not by TLS: {other}"),
        Ok(_) => panic!("{endpoint:?} was let in"),
    }
}

/// A client that pins the CA works end to end (a request answered over the connection).
async fn works(endpoint: &NatsEndpoint) {
    let client = nats::connect(endpoint, "tls-test").await.unwrap_or_else(|e| panic!("{endpoint:?}: {e}"));
    let mut sub = client.subscribe("tls.echo").await.unwrap();
    let responder = client.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        if let Some(m) = sub.next().await {
            responder.publish(m.reply.unwrap(), m.payload).await.unwrap();
        }
    });
    let answer = client.request("tls.echo", "hello".into()).await.unwrap();
    assert_eq!(&answer.payload[..], b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_client_pinning_the_ca_gets_in() {
    let stack = stack(false);
    assert!(stack.endpoints().nats.url.starts_with("tls://"), "{}", stack.endpoints().nats.url);
    works(&stack.endpoints().nats).await;

    // Plain text: the server announces that TLS is required and answers nothing else; a
    // client that goes on in plain text gets no PONG, and its connection is closed.
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", stack.nats.port)).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut info = String::new();
    BufReader::new(&plain).read_line(&mut info).unwrap();
    let info: serde_json::Value = serde_json::from_str(info.trim_start_matches("INFO ").trim()).unwrap();
    assert_eq!(info["tls_required"], true, "{info}");
    plain.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"tls_required\":false}\r\nPING\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest); // EOF (closed) or reset; either way no PONG.
    assert!(!String::from_utf8_lossy(&rest).contains("PONG"), "a plain-text client was answered");

    // A nats:// URL without a CA: the client upgrades (the server requires it) but trusts
    // only the system's roots, which do not hold the stack's CA.
    let plain_url = NatsEndpoint::open(format!("nats://127.0.0.1:{}", stack.nats.port));
    assert_eq!(refusal(&plain_url).await, TlsFailure::ServerNotTrusted);
    // tls:// without a CA: the same.
    assert_eq!(refusal(&endpoint(&stack, None)).await, TlsFailure::ServerNotTrusted);

    // Pinning another CA.
    let other = tempfile::tempdir().unwrap();
    let other = sundara::tls::init(other.path(), &[], false).unwrap();
    assert_eq!(refusal(&endpoint(&stack, Some(other.client_tls()))).await, TlsFailure::ServerNotTrusted);

    // The right CA on a nats:// URL works too (TLS required by the client).
    works(&plain_url.with_tls(Some(stack.pki.client_tls()))).await;

    // A CA file that is not one fails by name, before connecting.
    let not_pem = endpoint(&stack, Some(NatsTls::pinned(stack.pki.server_key())));
    assert!(matches!(nats::connect(&not_pem, "tls-test").await, Err(Error::NatsTlsFiles(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mutual_tls_only_clients_with_a_certificate_of_the_ca_get_in() {
    let stack = stack(true);
    // The stack's own endpoints present its `validator` certificate.
    works(&stack.endpoints().nats).await;
    // A miner's certificate signed by the stack's CA.
    let miner = sundara::tls::client(&stack.pki.dir, "m1", false).unwrap();
    works(&endpoint(&stack, Some(miner))).await;

    // The CA pinned, but no client certificate.
    assert_eq!(refusal(&endpoint(&stack, Some(stack.pki.client_tls()))).await, TlsFailure::ClientRefused);
    // A client certificate of another CA.
    let other = tempfile::tempdir().unwrap();
    sundara::tls::init(other.path(), &[], false).unwrap();
    let stranger = sundara::tls::client(other.path(), "m1", false).unwrap();
    let (cert, key) = stranger.client_cert.clone().unwrap();
    let forged = stack.pki.client_tls().with_client_cert(cert, key);
    assert_eq!(refusal(&endpoint(&stack, Some(forged))).await, TlsFailure::ClientRefused);

    // A miner's own key, never on the validator's host: its request signed by the CA.
    let host = tempfile::tempdir().unwrap();
    let csr = sundara::tls::request(host.path(), "m2", false).unwrap();
    let cert = sundara::tls::sign_request(&stack.pki.dir, "m2", &csr, false).unwrap();
    let (_, own_key) = sundara::tls::DevPki { dir: host.path().into() }.client_files("m2");
    works(&endpoint(&stack, Some(stack.pki.client_tls().with_client_cert(cert.clone(), own_key)))).await;
    // That certificate with another key (the CA's signature on it, the key not its own).
    let (_, other_key) = stranger.client_cert.clone().unwrap();
    let mismatched = stack.pki.client_tls().with_client_cert(cert, other_key);
    assert!(nats::connect(&endpoint(&stack, Some(mismatched)), "tls-test").await.is_err());
}

/// `sundara` with no connection settings but `args`: nothing from the environment or a context.
fn sundara(context: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(support::sundara_binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("SUNDARA_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).env("SUNDARA_CONTEXT", context).env("RUST_LOG", "warn").stdin(Stdio::null());
    cmd.output().expect("sundara runs")
}

/// The command line: `--nats-ca` (or `SUNDARA_NATS_CA`) is what lets a command in; without
/// it the command fails saying so. `sundara tls init` and `tls client` make what a server
/// with mutual TLS and its clients need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_pins_the_ca_it_is_given() {
    let stack = stack(false);
    let state = tempfile::tempdir().unwrap();
    let context = state.path().join("none.json");
    let url = stack.endpoints().nats.url;
    let ca = stack.pki.ca();
    let ca = ca.to_str().unwrap();
    // The registry exists, as on any running deployment.
    let js = async_nats::jetstream::new(nats::connect(&stack.endpoints().nats, "test").await.unwrap());
    nats::provision(&js, &nats::Retention::default()).await.unwrap();

    let out = sundara(&context, &["models", "list", "--nats", &url, "--nats-ca", ca]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = sundara(&context, &["models", "list", "--nats", &url]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a command without the CA got in");
    assert!(said.contains("--nats-ca"), "the error says what to pass: {said}");

    // `tls init` refuses to replace a CA; `tls client` signs with it.
    let dir = state.path().join("pki");
    let d = dir.to_str().unwrap();
    let out = sundara(&context, &["tls", "init", "--dir", d, "--host", "nats.example"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!sundara(&context, &["tls", "init", "--dir", d]).status.success(), "an existing CA was replaced");
    let out = sundara(&context, &["tls", "client", "--dir", d, "--name", "m1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pki = sundara::tls::DevPki { dir: dir.clone() };
    let (cert, key) = pki.client_files("m1");
    pki.client_tls().with_client_cert(cert, key).check().unwrap();
}

/// redis-server speaking TLS only: the pipeline runs on it (every Redis client of every
/// service over `rediss://`, pinning the stack's CA), and a plain client, one trusting only
/// the system's roots and one pinning another CA are refused; a CA given with a plain
/// `redis://` URL is a configuration error, not a silent plain connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_over_tls_serves_the_pipeline_and_refuses_clients_without_its_ca() {
    use sundara_common::Capacity;
    let options = ServerOptions { redis_tls: true, ..Default::default() };
    let stack = LocalStack::start_with(&project_root(), None, &options).expect("servers start (run scripts/setup)");
    let endpoints = stack.endpoints();
    assert!(endpoints.redis_url.starts_with("rediss://"), "{}", sundara_common::redacted(&endpoints.redis_url));
    assert_eq!(endpoints.redis_ca, Some(stack.pki.ca()));

    let plain = endpoints.redis_url.replacen("rediss://", "redis://", 1);
    assert!(Capacity::connect(&plain).await.is_err(), "a plain-text client was served");
    assert!(Capacity::connect(&endpoints.redis_url).await.is_err(), "the system's roots trusted the stack's CA");
    let other = tempfile::tempdir().unwrap();
    let other = sundara::tls::init(other.path(), &[], false).unwrap();
    assert!(Capacity::connect_with(&endpoints.redis_url, Some(&other.ca())).await.is_err(), "another CA trusted");
    let misconfigured = Capacity::connect_with(&plain, Some(&stack.pki.ca())).await;
    assert!(
        matches!(&misconfigured, Err(Error::Redis(e)) if e.kind() == redis::ErrorKind::InvalidClientConfig),
        "a CA with redis://: {:?}",
        misconfigured.err()
    );
    Capacity::open(&endpoints).await.expect("the stack's own endpoints pin its CA");

    let workers = vec![support::honest("w1", 1), support::honest("w2", 1)];
    let policy = sundara_schemas::Policy { redundancy: 2, rule: support::RULE, audit_rate: 0.0 };
    let mut h = support::Harness::start_on(stack, workers, policy, Duration::from_secs(10), |_| {}).await;
    let requests = h.sample_requests(6, "rediss", 5, |_| "mlp");
    let results = h.run_tasks(&requests).await;
    h.assert_correct(&requests, &results);
    h.stop().await;
}
