//! HTTP posters: each sends its share of messages one at a time over a pooled keep-alive
//! connection, round-robin over the channels, stamping each with its send time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use tokio::time::Instant;

use crate::{now_ns, Plan};

/// Attempts per message on 429/503 (honouring Retry-After) or a transport error.
const MAX_ATTEMPTS: u32 = 8;

pub struct PostShared {
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    pub abort: AtomicBool,
}

pub struct PostResult {
    /// Acknowledged (201, or 200 for a nonce replay) by message counter.
    pub acked: Vec<bool>,
    pub status_counts: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub retries: u64,
    pub nonce_replays: u64,
    pub failed: u64,
    /// HTTP round trip of acknowledged posts, µs.
    pub rtt: Histogram<u64>,
    pub first_error: Option<String>,
    /// Why posts were refused and retried (429/503): `"<status> <error message>"` → count.
    pub retry_reasons: BTreeMap<String, u64>,
    pub done_ns: u64,
}

/// `"<status> <error>"` of an error envelope, for the report.
pub fn reason(status: u16, body: &[u8]) -> String {
    let msg = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(120).collect());
    format!("{status} {msg}")
}

pub struct PosterTask {
    pub index: usize,
    pub client: reqwest::Client,
    pub base: String,
    pub auth: HeaderValue,
    pub channels: Arc<Vec<String>>,
    pub plan: Arc<Plan>,
    pub run_tag: String,
    pub shared: Arc<PostShared>,
    pub deadline: Instant,
    pub rtt: Histogram<u64>,
}

/// The wait a 429/503 answer asks for (Retry-After, 10 ms..2 s; 100 ms without one).
pub fn retry_after(resp: &reqwest::Response) -> Duration {
    retry_wait(
        resp.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok()),
    )
}

/// How long to wait before trying again after a `Retry-After` of `secs` (given or not).
pub fn retry_wait(secs: Option<f64>) -> Duration {
    let secs = secs.filter(|s| s.is_finite()).unwrap_or(0.1);
    Duration::from_secs_f64(secs.clamp(0.01, 2.0))
}

impl PosterTask {
    pub async fn run(self) -> PostResult {
        let count = self.plan.count_of(self.index);
        let urls: Vec<String> = self
            .channels
            .iter()
            .map(|c| format!("{}/api/channels/{c}/messages", self.base))
            .collect();
        let mut out = PostResult {
            acked: vec![false; count],
            status_counts: BTreeMap::new(),
            transport_errors: 0,
            retries: 0,
            nonce_replays: 0,
            failed: 0,
            rtt: self.rtt,
            first_error: None,
            retry_reasons: BTreeMap::new(),
            done_ns: 0,
        };
        'messages: for n in 0..count {
            if self.shared.abort.load(Ordering::Relaxed) || Instant::now() >= self.deadline {
                break;
            }
            let channel = self.plan.channel_of(self.index, n);
            let stamp = format!(r#"{{"t":{},"p":{},"n":{}}}"#, now_ns(), self.index, n);
            let body = serde_json::json!({
                "data": stamp,
                "nonce": format!("{}-{}-{}", self.run_tag, self.index, n),
            })
            .to_string();
            let mut attempt = 0;
            loop {
                attempt += 1;
                let sent = Instant::now();
                let resp = tokio::time::timeout_at(
                    self.deadline,
                    self.client
                        .post(&urls[channel])
                        .header(AUTHORIZATION, self.auth.clone())
                        .header(CONTENT_TYPE, "application/json")
                        .body(body.clone())
                        .send(),
                )
                .await;
                let resp = match resp {
                    Err(_) => break 'messages,
                    Ok(Err(e)) => {
                        out.transport_errors += 1;
                        if out.first_error.is_none() {
                            out.first_error =
                                Some(format!("transport: {}", crate::api::error_chain(&e)));
                        }
                        if attempt < MAX_ATTEMPTS {
                            out.retries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        out.failed += 1;
                        self.shared.failed.fetch_add(1, Ordering::Relaxed);
                        continue 'messages;
                    }
                    Ok(Ok(r)) => r,
                };
                let status = resp.status().as_u16();
                *out.status_counts.entry(status).or_insert(0) += 1;
                let wait = retry_after(&resp);
                // Read the body so the connection goes back to the pool.
                let bytes = resp.bytes().await.unwrap_or_default();
                match status {
                    201 | 200 => {
                        let us = sent.elapsed().as_micros() as u64;
                        out.rtt.saturating_record(us.max(1));
                        if status == 200 {
                            out.nonce_replays += 1;
                        }
                        out.acked[n] = true;
                        self.shared.acked.fetch_add(1, Ordering::Relaxed);
                        continue 'messages;
                    }
                    429 | 503 if attempt < MAX_ATTEMPTS => {
                        out.retries += 1;
                        *out.retry_reasons.entry(reason(status, &bytes)).or_insert(0) += 1;
                        tokio::time::sleep(wait).await;
                    }
                    _ => {
                        if out.first_error.is_none() {
                            let text: String =
                                String::from_utf8_lossy(&bytes).chars().take(300).collect();
                            out.first_error = Some(format!("HTTP {status}: {text}"));
                        }
                        out.failed += 1;
                        self.shared.failed.fetch_add(1, Ordering::Relaxed);
                        continue 'messages;
                    }
                }
            }
        }
        out.done_ns = now_ns();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_follow_the_answer_within_bounds() {
        assert_eq!(retry_wait(Some(0.5)), Duration::from_millis(500));
        assert_eq!(retry_wait(None), Duration::from_millis(100));
        assert_eq!(retry_wait(Some(60.0)), Duration::from_secs(2));
        assert_eq!(retry_wait(Some(0.0)), Duration::from_millis(10));
        // "NaN" and "inf" parse as numbers; they must not panic the generator.
        assert_eq!(retry_wait(Some(f64::NAN)), Duration::from_millis(100));
        assert_eq!(retry_wait(Some(f64::INFINITY)), Duration::from_millis(100));
    }
}
