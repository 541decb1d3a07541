//! The load generator's HTTP/1.1 client for the gateway: one keep-alive connection per
//! closed-loop client (a lane), requests written in one piece, answers read by their
//! `Content-Length`. Small on purpose: like the NATS client path, it costs the load
//! generator little, so that what is measured is the gateway.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// One answer: status, the headers the benchmark reads, and the body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// `sundara-verified` (`<agreeing>/<k>`), when the gateway sent it.
    pub verified: Option<String>,
    /// `Inference-Header-Content-Length` (KServe's binary extension), when sent.
    pub json_length: Option<usize>,
    pub body: Vec<u8>,
}

/// A keep-alive connection and what has been read past the last answer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Lanes of keep-alive connections to one server; lane `i` is used by one request at a time.
pub struct HttpClient {
    addr: SocketAddr,
    lanes: Vec<Mutex<Option<Conn>>>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(addr: SocketAddr, lanes: usize, timeout: Duration) -> HttpClient {
        HttpClient { addr, lanes: (0..lanes.max(1)).map(|_| Mutex::new(None)).collect(), timeout }
    }

    /// Sends `head` (the request line and headers, each ending in CRLF, without
    /// `Host` and `Content-Length`) and `body` on lane `lane % lanes`, and reads the answer.
    /// A connection that fails is dropped (the next request opens another).
    pub async fn request(&self, lane: usize, head: &str, body: &[u8]) -> Result<Answer, String> {
        let mut slot = self.lanes[lane % self.lanes.len()].lock().await;
        let exchange = async {
            if slot.is_none() {
                let stream = TcpStream::connect(self.addr).await.map_err(|e| format!("connect: {e}"))?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                *slot = Some(Conn { stream, buf: Vec::with_capacity(16 * 1024) });
            }
            let conn = slot.as_mut().expect("connected above");
            let mut request = Vec::with_capacity(head.len() + 64 + body.len());
            request.extend_from_slice(head.as_bytes());
            request
                .extend_from_slice(format!("Host: {}\r\nContent-Length: {}\r\n\r\n", self.addr, body.len()).as_bytes());
            request.extend_from_slice(body);
            conn.stream.write_all(&request).await.map_err(|e| format!("write: {e}"))?;
            read_answer(conn).await
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok((answer, keep_alive))) => {
                if !keep_alive {
                    *slot = None;
                }
                Ok(answer)
            }
            Ok(Err(e)) => {
                *slot = None;
                Err(e)
            }
            Err(_) => {
                *slot = None;
                Err(format!("no answer within {:?}", self.timeout))
            }
        }
    }
}

/// Reads one answer off `conn` (and whether the connection stays open).
async fn read_answer(conn: &mut Conn) -> Result<(Answer, bool), String> {
    let head_end = loop {
        if let Some(i) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        fill(conn).await?;
    };
    let head = std::str::from_utf8(&conn.buf[..head_end]).map_err(|_| "a head that is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let (mut length, mut verified, mut json_length, mut keep_alive) = (None, None, None, true);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "sundara-verified" => verified = Some(value.to_string()),
            "inference-header-content-length" => json_length = value.parse::<usize>().ok(),
            "connection" => keep_alive = !value.eq_ignore_ascii_case("close"),
            "transfer-encoding" => return Err(format!("transfer-encoding {value} is not read here")),
            _ => {}
        }
    }
    let length = length.ok_or_else(|| format!("status {status} without Content-Length"))?;
    let body_start = head_end + 4;
    while conn.buf.len() < body_start + length {
        fill(conn).await?;
    }
    let body = conn.buf[body_start..body_start + length].to_vec();
    conn.buf.drain(..body_start + length);
    Ok((Answer { status, verified, json_length, body }, keep_alive))
}

async fn fill(conn: &mut Conn) -> Result<(), String> {
    let mut chunk = [0u8; 16 * 1024];
    let n = conn.stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("the server closed the connection".into());
    }
    conn.buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers every request on a connection with a fixed answer.
    async fn serve(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // Each request here is a head and a 2-byte body.
                        while let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            if buf.len() < i + 6 {
                                break;
                            }
                            buf.drain(..i + 6);
                            s.write_all(answer).await.unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn reads_answers_by_length_on_a_kept_connection() {
        let addr = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nSundara-Verified: 1/1\r\n\r\nhello").await;
        let client = HttpClient::new(addr, 2, Duration::from_secs(5));
        for lane in 0..4 {
            let a = client.request(lane, "POST /x HTTP/1.1\r\n", b"hi").await.unwrap();
            assert_eq!((a.status, a.body.as_slice(), a.verified.as_deref()), (200, &b"hello"[..], Some("1/1")));
        }
    }

    #[tokio::test]
    async fn a_chunked_answer_is_an_error_not_a_hang() {
        let addr = serve(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").await;
        let client = HttpClient::new(addr, 1, Duration::from_secs(5));
        let e = client.request(0, "POST /x HTTP/1.1\r\n", b"hi").await.unwrap_err();
        assert!(e.contains("chunked"), "{e}");
    }
}
