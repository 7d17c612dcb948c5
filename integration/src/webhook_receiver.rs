//! A webhook receiver for tests: a tiny HTTP/1.1 server on 127.0.0.1 that records every
//! request and answers queued statuses.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::FRAME_TIMEOUT;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Hooked {
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Hooked {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("webhook body is JSON ({e}): {}", self.body))
    }

    pub fn events(&self) -> Vec<Value> {
        let body = self.json();
        body["events"]
            .as_array()
            .unwrap_or_else(|| panic!("events is an array: {body}"))
            .clone()
    }
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that records every request and answers the queued
/// statuses in order (200 once they are used up), `Connection: close` each time.
#[derive(Clone)]
pub struct Receiver {
    base: String,
    got: Arc<Mutex<Vec<Hooked>>>,
    statuses: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    pub async fn start(statuses: &[u16]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let rx = Receiver {
            base: format!("http://{addr}"),
            got: Arc::new(Mutex::new(Vec::new())),
            statuses: Arc::new(Mutex::new(statuses.iter().copied().collect())),
        };
        let shared = rx.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let rx = shared.clone();
                tokio::spawn(async move { rx.serve(stream).await });
            }
        });
        rx
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn serve(&self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let path = request_line
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        let status = {
            let mut got = self.got.lock().expect("receiver lock");
            got.push(Hooked {
                path,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            self.statuses
                .lock()
                .expect("receiver lock")
                .pop_front()
                .unwrap_or(200)
        };
        let answer =
            format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    }

    pub fn requests(&self) -> Vec<Hooked> {
        self.got.lock().expect("receiver lock").clone()
    }

    /// Requests to `path`, in arrival order.
    pub fn to(&self, path: &str) -> Vec<Hooked> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Every event POSTed to `path`, in arrival order.
    pub fn events(&self, path: &str) -> Vec<Value> {
        self.to(path).iter().flat_map(Hooked::events).collect()
    }

    /// Waits until the events POSTed to `path` satisfy `pred`; answers them.
    pub async fn wait_events(&self, path: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        self.wait_events_within(FRAME_TIMEOUT, path, pred).await
    }

    /// As [`Receiver::wait_events`], waiting at most `timeout`.
    pub async fn wait_events_within(
        &self,
        timeout: Duration,
        path: &str,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.events(path);
            if pred(&events) {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "webhook {path} never got the expected events; got: {events:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
