//! WebSocket upgrades leave the HTTP/1 dispatcher (`src/http/upgrade.rs`): bytes a client
//! sends right behind its handshake reach the session, and a refused upgrade is answered
//! whole (status, length, date, SPEC §8 envelope) and its connection closed.

use std::time::Duration;

use switchboard_integration::harness::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn upgrade_request(addr: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "GET /api/realtime/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{auth}\r\n"
    )
}

/// A masked client ping carrying `payload` (< 126 bytes).
fn client_ping(payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x89, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

#[tokio::test]
async fn a_frame_sent_with_the_handshake_reaches_the_session() {
    let s = TestServer::start().await;
    let alice = s.user("alice", "human", "member").await;
    let mut tcp = TcpStream::connect(s.addr()).await.expect("connect");
    // The handshake and a ping in one write: the ping arrives with the request head.
    let mut bytes = upgrade_request(&s.addr(), Some(&alice.token)).into_bytes();
    bytes.extend_from_slice(&client_ping(b"early"));
    tcp.write_all(&bytes).await.expect("send");

    let mut seen = Vec::new();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before the pong: {seen:?}");
            seen.extend_from_slice(&chunk[..n]);
            let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&seen[..end]).to_string();
            assert!(head.starts_with("HTTP/1.1 101"), "answer: {head}");
            let mut frames = &seen[end + 4..];
            // Server frames are unmasked; skip any before the pong (short ones only here).
            while frames.len() >= 2 && frames.len() >= 2 + (frames[1] & 0x7f) as usize {
                let (op, len) = (frames[0] & 0x0f, (frames[1] & 0x7f) as usize);
                if len >= 126 {
                    break;
                }
                if op == 0xA {
                    return frames[2..2 + len].to_vec();
                }
                frames = &frames[2 + len..];
            }
        }
    })
    .await
    .expect("a pong within 5 s");
    assert_eq!(pong, b"early", "the pong echoes the early ping");
}

#[tokio::test]
async fn a_refused_upgrade_is_answered_whole_and_closed() {
    let s = TestServer::start().await;
    let mut tcp = TcpStream::connect(s.addr()).await.expect("connect");
    tcp.write_all(upgrade_request(&s.addr(), None).as_bytes())
        .await
        .expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the refused connection")
        .expect("read");
    let text = String::from_utf8(answer).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 401 "), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains(&format!("\r\ncontent-length: {}", body.len())),
        "{head}"
    );
    assert!(lower.contains("\r\ndate: "), "{head}");
    assert!(lower.contains("\r\nconnection: close"), "{head}");
    let envelope: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(envelope["code"], "auth_failed", "{body}");
    assert_eq!(envelope["status"], 401, "{body}");
}
