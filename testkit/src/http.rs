//! The HTTP gateway on a test's stack, and a plain HTTP/1.1 client over a socket for it:
//! what a test asserts is what goes over the wire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP exchange: status, headers (lower-case names), body as JSON (null when empty).
pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// The body's bytes (a binary response's JSON header and data).
    pub raw: Vec<u8>,
}

/// Sends one request (`Connection: close`) and reads the whole answer (within 90 s).
pub async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(90), stream.read_to_end(&mut raw)).await;
    read.expect("the gateway answers within 90 s").unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head and a body");
    let (head, raw) = (String::from_utf8(raw[..split].to_vec()).unwrap(), raw[split + 4..].to_vec());
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(name, value)| (name.to_lowercase(), value.to_string()))
        .collect();
    let headers: HashMap<String, String> = headers;
    let raw = match headers.get("transfer-encoding").map(String::as_str) {
        Some("chunked") => dechunk(&raw),
        _ => raw,
    };
    if headers.get("content-type").is_some_and(|t| t.contains("ndjson")) {
        return Reply { status, headers, body: Value::Null, raw };
    }
    let json_part = match headers.get("inference-header-content-length") {
        Some(length) => &raw[..length.parse::<usize>().unwrap()],
        None => &raw[..],
    };
    let body = if json_part.is_empty() { Value::Null } else { serde_json::from_slice(json_part).unwrap() };
    Reply { status, headers, body, raw }
}

/// A chunked body's data (HTTP/1.1 chunked transfer coding, no trailers).
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    while let Some(end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        data.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
    data
}

/// An NDJSON body's lines, each as JSON.
pub fn ndjson(raw: &[u8]) -> Vec<Value> {
    raw.split(|b| *b == b'\n').filter(|l| !l.is_empty()).map(|l| serde_json::from_slice(l).unwrap()).collect()
}

/// The API key [`start_gateway`] gives tenant `test` (the harness' tenant).
pub const TEST_KEY: &str = "sk-test-0123456789abcdef";

/// A gateway on a free loopback port of `endpoints`' stack, tenant `test` holding
/// [`TEST_KEY`], its config as `tweak` leaves it; returns once it listens.
pub async fn start_gateway(
    endpoints: sundara_common::Endpoints,
    tweak: impl FnOnce(&mut sundara_gateway::Config),
) -> (SocketAddr, sundara_common::Shutdown) {
    let addr: SocketAddr = format!("127.0.0.1:{}", sundara::stack::free_port().unwrap()).parse().unwrap();
    let keys = sundara_gateway::ApiKeys::parse(&format!("test {TEST_KEY}\n")).unwrap();
    let mut config = sundara_gateway::Config::new(endpoints, addr, keys);
    tweak(&mut config);
    let shutdown = sundara_common::Shutdown::new();
    tokio::spawn(sundara_gateway::run(config, shutdown.clone()));
    crate::wait::until("the gateway to listen", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(addr).await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    (addr, shutdown)
}
