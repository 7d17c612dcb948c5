//! The chat socket's heartbeat: the server pings every `realtime.heartbeat_seconds` (the first
//! ping at a random point of the first period), a client that answers stays connected, and a
//! client that answers nothing for 3× the period is closed with 1000.

use std::time::Duration;

use switchboard_integration::harness::TestServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn pings_keep_an_answering_socket_and_close_a_silent_one() {
    let s = TestServer::builder()
        .env("SWITCHBOARD_REALTIME_HEARTBEAT_SECONDS", "1")
        .start()
        .await;
    let alice = s.user("alice", "human", "member").await;
    let bob = s.user("bob", "human", "member").await;
    let mut answering = s.ws(&alice.token, None).await;
    // A WebSocket client answers pings whenever it reads, so the silent one is a bare TCP
    // socket that completes the upgrade and then reads nothing.
    let mut silent = upgrade(&s.addr(), &bob.token).await;

    // Reading answers each ping with a pong. Over 5.5 s, past the 3 s timeout, the answering
    // socket gets a ping per second (the first within the first second) and stays open.
    let seen = answering.read_for(Duration::from_millis(5500)).await;
    assert_eq!(
        seen.closed, None,
        "an answering socket was closed: {seen:?}"
    );
    assert!(seen.pings >= 4, "pings in 5.5 s at 1 s: {seen:?}");
    // Heartbeats are WebSocket pings, not frames of the event stream (nothing else happened).
    assert_eq!(seen.texts, 0, "text frames on an idle socket: {seen:?}");

    // The silent socket sent no pong: the server closed it once 3 s passed without a word.
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut bytes))
        .await
        .expect("the silent socket is closed within 5 s")
        .expect("read the silent socket");
    let frames = server_frames(&bytes);
    let opcodes: Vec<u8> = frames.iter().map(|(op, _)| *op).collect();
    let pings = opcodes.iter().filter(|op| **op == 0x9).count();
    assert!(
        (2..=5).contains(&pings),
        "frames before the close: {opcodes:?}"
    );
    let (op, close) = frames.last().expect("a close frame");
    assert_eq!(*op, 0x8, "last frame: {opcodes:?}");
    assert_eq!(
        close.get(..2),
        Some(&1000u16.to_be_bytes()[..]),
        "close code"
    );
    assert_eq!(&close[2..], b"heartbeat timeout");
}

/// Opens `/api/realtime/ws` by hand and returns the socket after the 101.
async fn upgrade(addr: &str, token: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /api/realtime/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes())
        .await
        .expect("send upgrade");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        tcp.read_exact(&mut byte)
            .await
            .expect("read the upgrade answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade answer: {head}");
    tcp
}

/// Splits what a server sent (unmasked, unfragmented frames) into (opcode, payload).
fn server_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while bytes.len() >= 2 {
        let op = bytes[0] & 0x0f;
        let (len, header) = match bytes[1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 => panic!("a frame over 64 KiB"),
            n => (n as usize, 2),
        };
        assert!(bytes.len() >= header + len, "truncated frame");
        frames.push((op, bytes[header..header + len].to_vec()));
        bytes = &bytes[header + len..];
    }
    assert!(bytes.is_empty(), "trailing bytes");
    frames
}
