//! A minimal HTTP/1.1 keep-alive client for the generator's hottest requests (ai-stream's
//! appends, 5,000 a second). The generator shares the machine's two cores with the server, so
//! its own cost per request is latency it adds to the server's: in a profile of ai-stream,
//! reqwest and hyper (a request builder, URL parsing, a hand-off to a connection task per
//! request) were about a quarter of the generator's CPU. This client writes one prepared
//! request with one `write` and reads the answer on the same task.
//!
//! It speaks only what the bench needs: `POST` with a body, answers framed by
//! `Content-Length`, persistent connections. A connection is reused only after a complete
//! answer without `Connection: close`, and never after `IDLE_LIMIT` without use (below the
//! keep-alive of the servers it measures, so a server never closes one just as a request
//! goes out on it). It never retries: a request that fails is the caller's to count.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A pooled connection unused this long is closed instead of reused (actix-web closes an
/// idle keep-alive connection after 5 s).
const IDLE_LIMIT: Duration = Duration::from_secs(4);
/// Longest answer head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest answer body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Headers parsed per answer.
const MAX_HEADERS: usize = 32;

/// One answer: its status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// `Retry-After` in seconds, when given as a number.
    pub retry_after: Option<f64>,
}

/// Connections to one `http://host:port` origin, shared by the requests of one client.
#[derive(Clone)]
pub struct Http1 {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    /// The request's `Host` header.
    host: String,
    /// Header lines sent with every request (`Name: value\r\n` each).
    headers: String,
    idle: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Http1 {
    /// A client of `base` (`http://host:port`) sending `headers` (name, value) with every
    /// request.
    pub fn new(base: &str, headers: &[(&str, &str)]) -> Result<Self, String> {
        let host = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("not an http:// URL: {base}"))?
            .trim_end_matches('/');
        let addr = host
            .to_socket_addrs()
            .map_err(|e| format!("{base}: {e}"))?
            .next()
            .ok_or_else(|| format!("{base}: no address"))?;
        let mut lines = String::new();
        for (name, value) in headers {
            if [name, value].iter().any(|s| s.contains(['\r', '\n'])) {
                return Err(format!("header {name} holds a line break"));
            }
            lines.push_str(&format!("{name}: {value}\r\n"));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                addr,
                host: host.to_string(),
                headers: lines,
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// `POST path` with a JSON `body` and the `extra` header lines (`Name: value\r\n` each).
    pub async fn post(&self, path: &str, extra: &str, body: &[u8]) -> Result<Answer, String> {
        let mut request = Vec::with_capacity(256 + body.len());
        request.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\n{}{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.inner.host,
                self.inner.headers,
                body.len()
            )
            .as_bytes(),
        );
        request.extend_from_slice(body);
        let mut conn = match self.take_idle() {
            Some(c) => c,
            None => self.connect().await?,
        };
        conn.write_all(&request)
            .await
            .map_err(|e| format!("write: {e}"))?;
        let (answer, keep) = read_answer(&mut conn).await?;
        if keep {
            if let Ok(mut idle) = self.inner.idle.lock() {
                idle.push((conn, Instant::now()));
            }
        }
        Ok(answer)
    }

    /// The most recently used idle connection still inside [`IDLE_LIMIT`]; older ones close.
    fn take_idle(&self) -> Option<TcpStream> {
        let mut idle = self.inner.idle.lock().ok()?;
        while let Some((conn, since)) = idle.pop() {
            if since.elapsed() < IDLE_LIMIT {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(&self) -> Result<TcpStream, String> {
        let conn =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.inner.addr))
                .await
                .map_err(|_| format!("connect {}: timed out", self.inner.addr))?
                .map_err(|e| format!("connect {}: {e}", self.inner.addr))?;
        conn.set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        Ok(conn)
    }
}

/// Reads one answer; `true` when the connection may carry another request.
async fn read_answer<R: AsyncReadExt + Unpin>(conn: &mut R) -> Result<(Answer, bool), String> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        if let Some(head) = parse_head(&buf)? {
            let total = head.head_len + head.content_length;
            while buf.len() < total {
                let missing = total - buf.len();
                read_more(conn, &mut buf, missing).await?;
            }
            if buf.len() > total {
                // Nothing was asked for beyond this answer.
                return Err("bytes after the answer".into());
            }
            buf.drain(..head.head_len);
            let answer = Answer {
                status: head.status,
                body: buf,
                retry_after: head.retry_after,
            };
            return Ok((answer, head.keep_alive));
        }
        if buf.len() > MAX_HEAD {
            return Err("answer head too long".into());
        }
        read_more(conn, &mut buf, 1024).await?;
    }
}

async fn read_more<R: AsyncReadExt + Unpin>(
    conn: &mut R,
    buf: &mut Vec<u8>,
    want: usize,
) -> Result<(), String> {
    buf.reserve(want.max(512));
    let n = conn.read_buf(buf).await.map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("connection closed before the answer was complete".into());
    }
    Ok(())
}

/// What an answer's head says about its framing.
#[derive(Debug, PartialEq)]
struct Head {
    status: u16,
    head_len: usize,
    content_length: usize,
    keep_alive: bool,
    retry_after: Option<f64>,
}

/// The head at the start of `buf`, `None` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad answer head: {e}")),
    };
    let status = response.code.ok_or("answer without a status")?;
    let mut content_length = None;
    let mut keep_alive = response.version == Some(1);
    let mut retry_after = None;
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or("bad Content-Length")?;
            if content_length.replace(n).is_some_and(|m| m != n) {
                return Err("conflicting Content-Length".into());
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("Transfer-Encoding answers are not supported".into());
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            retry_after = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok());
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                keep_alive = false;
            } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                keep_alive = true;
            }
        }
    }
    // 1xx, 204 and 304 carry no body; every other answer here must say its length.
    let content_length = match (status, content_length) {
        (100..=199 | 204 | 304, _) => 0,
        (_, Some(n)) if n <= MAX_BODY => n,
        (_, Some(_)) => return Err("answer body too long".into()),
        (_, None) => return Err("answer without Content-Length".into()),
    };
    Ok(Some(Head {
        status,
        head_len,
        content_length,
        keep_alive,
        retry_after,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn heads_are_framed_by_their_length_and_connection() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(
            parse_head(ok).expect("valid"),
            Some(Head {
                status: 200,
                head_len: ok.len() - 2,
                content_length: 2,
                keep_alive: true,
                retry_after: None,
            })
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le").expect("partial"),
            None
        );
        let closing =
            b"HTTP/1.1 503 Busy\r\nConnection: close\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n";
        let head = parse_head(closing).expect("valid").expect("complete");
        assert_eq!(
            (head.status, head.keep_alive, head.retry_after),
            (503, false, Some(1.0))
        );
        let old = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(
            !parse_head(old)
                .expect("valid")
                .expect("complete")
                .keep_alive
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"NOPE\r\n\r\n",
        ] {
            assert!(parse_head(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    /// A server that reads requests by their Content-Length and answers each with `answers`
    /// in turn, split into small writes; it records what it read.
    async fn serve(answers: Vec<&'static [u8]>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut answers = answers.into_iter();
            while let Some(answer) = answers.next() {
                let (mut sock, _) = listener.accept().await.expect("accept");
                let mut answer = Some(answer);
                while let Some(a) = answer.take() {
                    let mut buf = Vec::new();
                    let request = loop {
                        let mut chunk = [0u8; 256];
                        let n = sock.read(&mut chunk).await.expect("read");
                        assert!(n > 0, "client closed mid-request");
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .and_then(|v| v.parse().ok())
                                .expect("length");
                            if body.len() == len {
                                break text;
                            }
                        }
                    };
                    seen.push(request);
                    for part in a.chunks(7) {
                        sock.write_all(part).await.expect("write");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    // Keep-alive answers: the next one comes on the same connection.
                    if !String::from_utf8_lossy(a).contains("close") {
                        answer = answers.next();
                    }
                }
            }
            seen
        });
        (base, task)
    }

    #[tokio::test]
    async fn keeps_connections_alive_until_told_to_close() {
        let (base, server) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
            b"HTTP/1.1 429 Slow down\r\nContent-Length: 6\r\nConnection: close\r\n\r\nsecond",
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        ])
        .await;
        let client = Http1::new(&base, &[("Authorization", "Bearer t")]).expect("client");
        let a = client.post("/a", "", b"{\"n\":1}").await.expect("first");
        assert_eq!((a.status, a.body.as_slice()), (200, &b"first"[..]));
        let b = client
            .post("/b", "Prefer: return=minimal\r\n", b"{}")
            .await
            .expect("second, same connection");
        assert_eq!((b.status, b.body.as_slice()), (429, &b"second"[..]));
        // The server closed the second connection: the third request opens a new one.
        let c = client.post("/c", "", b"").await.expect("third");
        assert_eq!((c.status, c.body.len()), (201, 0));
        let seen = server.await.expect("server");
        assert_eq!(seen.len(), 3);
        assert!(seen[0].starts_with("POST /a HTTP/1.1\r\nHost: 127.0.0.1:"));
        assert!(seen[0].contains("\r\nAuthorization: Bearer t\r\n"));
        assert!(seen[0].ends_with("Content-Length: 7\r\n\r\n{\"n\":1}"));
        assert!(seen[1].contains("\r\nPrefer: return=minimal\r\n"));
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 512];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
                .await;
        });
        let client = Http1::new(&base, &[]).expect("client");
        let err = client.post("/", "", b"{}").await.expect_err("cut short");
        assert!(
            err.contains("closed before the answer was complete"),
            "{err}"
        );
        assert!(Http1::new("https://127.0.0.1:1", &[]).is_err());
        assert!(Http1::new("http://no-port", &[]).is_err());
        assert!(Http1::new("http://127.0.0.1:1", &[("X", "a\r\nb")]).is_err());
    }
}
