//! A lean WebSocket client for the receive-heavy scenarios (RFC 6455, `ws://` only).
//!
//! tungstenite keeps what it read past a frame in a buffer of its own, so a socket it
//! upgraded cannot be handed to another reader without losing bytes. Here the upgrade is
//! ours: the bytes after the response head stay in [`RawWs::unread`], and once subscribed the
//! socket can leave tokio for a plain epoll loop (`fanout_rx.rs`) that reads frames straight
//! out of one shared buffer.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::Message;

use crate::subscriber::Ws;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A message larger than this ends the socket (the server's frames are small).
const MAX_MESSAGE: usize = 16 << 20;
/// The response head must fit in this.
const MAX_HEAD: usize = 16 << 10;

/// What the connect steps need of a WebSocket, whichever client reads it.
pub trait TextSocket {
    /// The next text message. Pings are answered and other non-text frames skipped; a
    /// close or the end of the stream is an error naming `waiting_for`.
    fn next_text(
        &mut self,
        waiting_for: &str,
    ) -> impl Future<Output = Result<String, String>> + Send;
    fn send_text(&mut self, text: &str) -> impl Future<Output = Result<(), String>> + Send;
}

impl TextSocket for Ws {
    async fn next_text(&mut self, waiting_for: &str) -> Result<String, String> {
        loop {
            // tungstenite queues the answer to a ping itself.
            match self.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_string()),
                Some(Ok(Message::Close(c))) => {
                    return Err(format!("closed while waiting for {waiting_for}: {c:?}"))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("ws read: {e}")),
                None => return Err(format!("ws ended while waiting for {waiting_for}")),
            }
        }
    }

    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.send(Message::text(text))
            .await
            .map_err(|e| format!("ws send: {e}"))
    }
}

/// One complete message off the wire, borrowed from the read buffer when it came whole.
#[derive(Debug, PartialEq, Eq)]
pub enum Msg<'a> {
    Text(&'a str),
    Binary,
    Ping(&'a [u8]),
    Pong,
    /// The close code, when the frame carried one.
    Close(Option<u16>),
}

/// A text or binary message arriving in fragments.
#[derive(Default)]
pub struct Fragments {
    /// The first frame's opcode and the payload so far.
    parts: Option<(u8, Vec<u8>)>,
    /// The last message completed from fragments, lent out as a [`Msg`].
    done: Vec<u8>,
}

/// The first message at the front of `data`: the bytes taken, and the message once
/// complete. `(0, None)` while the first frame is incomplete; `(n, None)` when the frame
/// taken was a fragment kept in `frags`. Frames from a server must not be masked, and no
/// extension was negotiated, so reserved bits are an error too.
pub fn next_message<'a>(
    data: &'a [u8],
    frags: &'a mut Fragments,
) -> Result<(usize, Option<Msg<'a>>), String> {
    let Some((fin, opcode, head, len)) = frame_head(data)? else {
        return Ok((0, None));
    };
    let Some(payload) = data.get(head..head + len) else {
        return Ok((0, None));
    };
    let used = head + len;
    if opcode >= OP_CLOSE {
        if !fin || len > 125 {
            return Err("fragmented or oversized control frame".into());
        }
        return Ok((used, Some(control(opcode, payload)?)));
    }
    match (opcode, frags.parts.as_mut()) {
        (OP_CONTINUATION, None) => Err("continuation without a first frame".into()),
        (OP_CONTINUATION, Some((_, parts))) => {
            if parts.len() + len > MAX_MESSAGE {
                return Err("message too large".into());
            }
            parts.extend_from_slice(payload);
            if !fin {
                return Ok((used, None));
            }
            match frags.parts.take() {
                Some((first, whole)) => {
                    frags.done = whole;
                    Ok((used, Some(data_msg(first, &frags.done)?)))
                }
                None => Ok((used, None)),
            }
        }
        (_, Some(_)) => Err("new message inside a fragmented one".into()),
        (OP_TEXT | OP_BINARY, None) if fin => Ok((used, Some(data_msg(opcode, payload)?))),
        (OP_TEXT | OP_BINARY, None) => {
            frags.parts = Some((opcode, payload.to_vec()));
            Ok((used, None))
        }
        (other, None) => Err(format!("unknown opcode {other:#x}")),
    }
}

/// Calls `on` for every complete message at the front of `data`; the bytes consumed (an
/// incomplete frame at the end is left for the next read).
pub fn drain_messages(
    data: &[u8],
    frags: &mut Fragments,
    mut on: impl FnMut(Msg<'_>) -> Result<(), String>,
) -> Result<usize, String> {
    let mut at = 0;
    loop {
        let (used, msg) = next_message(&data[at..], frags)?;
        if used == 0 {
            return Ok(at);
        }
        at += used;
        if let Some(m) = msg {
            on(m)?;
        }
    }
}

/// `(fin, opcode, head length, payload length)`, or `None` while the head is incomplete.
fn frame_head(b: &[u8]) -> Result<Option<(bool, u8, usize, usize)>, String> {
    let (Some(&b0), Some(&b1)) = (b.first(), b.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err("reserved bits set".into());
    }
    if b1 & 0x80 != 0 {
        return Err("masked frame from the server".into());
    }
    let (head, len) = match b1 & 0x7f {
        126 => match b.get(2..4) {
            Some(l) => (4, usize::from(u16::from_be_bytes([l[0], l[1]]))),
            None => return Ok(None),
        },
        127 => match b.get(2..10).and_then(|l| <[u8; 8]>::try_from(l).ok()) {
            Some(l) => (
                10,
                usize::try_from(u64::from_be_bytes(l)).unwrap_or(usize::MAX),
            ),
            None => return Ok(None),
        },
        n => (2, usize::from(n)),
    };
    if len > MAX_MESSAGE {
        return Err("frame too large".into());
    }
    Ok(Some((b0 & 0x80 != 0, b0 & 0x0f, head, len)))
}

fn control(opcode: u8, payload: &[u8]) -> Result<Msg<'_>, String> {
    Ok(match opcode {
        OP_CLOSE => Msg::Close(payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]))),
        OP_PING => Msg::Ping(payload),
        OP_PONG => Msg::Pong,
        other => return Err(format!("unknown control opcode {other:#x}")),
    })
}

fn data_msg(opcode: u8, payload: &[u8]) -> Result<Msg<'_>, String> {
    if opcode == OP_BINARY {
        return Ok(Msg::Binary);
    }
    std::str::from_utf8(payload)
        .map(Msg::Text)
        .map_err(|_| "text frame is not UTF-8".into())
}

/// Appends one client frame (masked, as RFC 6455 requires of clients) to `out`.
pub fn client_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask: [u8; 4] = rand::random();
    out.extend_from_slice(&mask);
    out.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
}

/// A close frame with `code` (no reason).
pub fn close_frame(code: u16, out: &mut Vec<u8>) {
    client_frame(OP_CLOSE, &code.to_be_bytes(), out);
}

/// TCP to `server` from `source` (one of the 127.0.0.x addresses), no Nagle.
pub async fn dial_from(server: SocketAddr, source: Ipv4Addr) -> Result<TcpStream, String> {
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::from((source, 0)))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let stream = sock
        .connect(server)
        .await
        .map_err(|e| format!("tcp connect from {source}: {e}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// An upgraded socket and what was read past the response head.
pub struct RawWs {
    pub stream: TcpStream,
    /// Received bytes not yet taken as messages.
    pub unread: Vec<u8>,
    pub frags: Fragments,
}

/// TCP connect (from `route`'s source address when given) and the upgrade to `url`
/// (`ws://host:port/path?query`), with `headers` (`"Name: value"` lines) added. The answer
/// must be `101` with the right `Sec-WebSocket-Accept`. No timeout of its own.
pub async fn upgrade(
    url: &str,
    headers: &[String],
    route: Option<(SocketAddr, Ipv4Addr)>,
) -> Result<RawWs, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = match route {
        Some((server, source)) => dial_from(server, source).await?,
        None => {
            // `ws://` without a port means 80.
            let has_port = host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
            let addr = if has_port {
                host.to_string()
            } else {
                format!("{host}:80")
            };
            let s = TcpStream::connect(&addr)
                .await
                .map_err(|e| format!("tcp connect {addr}: {e}"))?;
            let _ = s.set_nodelay(true);
            s
        }
    };
    let key = generate_key();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("ws upgrade write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    let head_len = loop {
        if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= MAX_HEAD {
            return Err("ws upgrade: response head too large".into());
        }
        let mut chunk = [0u8; 2048];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("ws upgrade read: {e}"))?;
        if n == 0 {
            return Err("ws upgrade: connection closed before the response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    check_upgrade(&buf[..head_len], &derive_accept_key(key.as_bytes()))?;
    Ok(RawWs {
        stream,
        unread: buf.split_off(head_len),
        frags: Fragments::default(),
    })
}

/// The response head must switch protocols and prove it read our key.
fn check_upgrade(head: &[u8], accept: &str) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err("ws upgrade: unreadable response head".into()),
    }
    if res.code != Some(101) {
        return Err(format!(
            "ws upgrade: HTTP {} instead of 101",
            res.code.unwrap_or(0)
        ));
    }
    let got = res
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value);
    if got != Some(accept.as_bytes()) {
        return Err("ws upgrade: wrong or missing Sec-WebSocket-Accept".into());
    }
    Ok(())
}

impl RawWs {
    /// The underlying socket and its unread bytes, for a reader outside tokio.
    pub fn into_parts(self) -> Result<(std::net::TcpStream, Vec<u8>, Fragments), String> {
        let std = self
            .stream
            .into_std()
            .map_err(|e| format!("socket out of tokio: {e}"))?;
        Ok((std, self.unread, self.frags))
    }

    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), String> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        client_frame(opcode, payload, &mut out);
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| format!("ws send: {e}"))
    }
}

/// What `next_text` does with the message at the front.
enum Step {
    Text(String),
    Ping(Vec<u8>),
    Closed(Option<u16>),
    Skip,
    Read,
}

impl TextSocket for RawWs {
    async fn next_text(&mut self, waiting_for: &str) -> Result<String, String> {
        loop {
            let (used, msg) =
                next_message(&self.unread, &mut self.frags).map_err(|e| format!("ws read: {e}"))?;
            let step = match msg {
                Some(Msg::Text(t)) => Step::Text(t.to_string()),
                Some(Msg::Ping(p)) => Step::Ping(p.to_vec()),
                Some(Msg::Close(c)) => Step::Closed(c),
                Some(Msg::Binary | Msg::Pong) => Step::Skip,
                None if used > 0 => Step::Skip,
                None => Step::Read,
            };
            self.unread.drain(..used);
            match step {
                Step::Text(t) => return Ok(t),
                Step::Ping(p) => self.write_frame(OP_PONG, &p).await?,
                Step::Closed(c) => {
                    return Err(format!("closed while waiting for {waiting_for}: {c:?}"))
                }
                Step::Skip => {}
                Step::Read => {
                    let mut chunk = [0u8; 4096];
                    let n = self
                        .stream
                        .read(&mut chunk)
                        .await
                        .map_err(|e| format!("ws read: {e}"))?;
                    if n == 0 {
                        return Err(format!("ws ended while waiting for {waiting_for}"));
                    }
                    self.unread.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.write_frame(OP_TEXT, text.as_bytes()).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// An unmasked (server) frame.
    pub(crate) fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Reads one masked (client) frame: opcode and unmasked payload.
    pub(crate) async fn read_client_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        s.read_exact(&mut head).await.expect("frame head");
        assert_eq!(head[1] & 0x80, 0x80, "client frames are masked");
        let len = usize::from(head[1] & 0x7f);
        assert!(len < 126, "the test frames are short");
        let mut mask = [0u8; 4];
        s.read_exact(&mut mask).await.expect("mask");
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.expect("payload");
        for (b, m) in payload.iter_mut().zip(mask.iter().cycle()) {
            *b ^= m;
        }
        (head[0] & 0x0f, payload)
    }

    /// Accepts one upgrade on `l`: the request head, then `101` (with `accept`, or the right
    /// one) followed by `then` in the same write.
    pub(crate) async fn accept_upgrade(
        l: &TcpListener,
        accept: Option<&str>,
        status: &str,
        then: &[u8],
    ) -> (TcpStream, String) {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut head = Vec::new();
        while memchr::memmem::find(&head, b"\r\n\r\n").is_none() {
            let mut b = [0u8; 1024];
            let n = s.read(&mut b).await.expect("request");
            assert!(n > 0, "request cut short");
            head.extend_from_slice(&b[..n]);
        }
        let head = String::from_utf8(head).expect("ascii head");
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key")
            .trim()
            .to_string();
        let accept = accept.map_or_else(|| derive_accept_key(key.as_bytes()), String::from);
        let mut answer = format!(
            "HTTP/1.1 {status}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        )
        .into_bytes();
        answer.extend_from_slice(then);
        s.write_all(&answer).await.expect("answer");
        (s, head)
    }

    fn messages(data: &[u8], frags: &mut Fragments) -> Result<(usize, Vec<String>), String> {
        let mut got = Vec::new();
        let used = drain_messages(data, frags, |m| {
            got.push(format!("{m:?}"));
            Ok(())
        })?;
        Ok((used, got))
    }

    #[test]
    fn frames_are_taken_whole_and_in_order() {
        let mut wire = server_frame(true, OP_TEXT, b"hello");
        wire.extend(server_frame(true, OP_PING, b"p"));
        wire.extend(server_frame(false, OP_TEXT, b"frag"));
        // A control frame may come between fragments.
        wire.extend(server_frame(true, OP_PONG, b""));
        wire.extend(server_frame(false, OP_CONTINUATION, b"men"));
        wire.extend(server_frame(true, OP_CONTINUATION, b"ted"));
        let long = "x".repeat(300);
        wire.extend(server_frame(true, OP_TEXT, long.as_bytes()));
        wire.extend(server_frame(true, OP_CLOSE, &1013u16.to_be_bytes()));
        let complete = wire.len();
        // Half a frame at the end stays unread.
        wire.extend(&server_frame(true, OP_TEXT, b"next")[..3]);
        let mut frags = Fragments::default();
        let (used, got) = messages(&wire, &mut frags).expect("valid frames");
        assert_eq!(used, complete);
        assert_eq!(
            got,
            vec![
                "Text(\"hello\")".to_string(),
                "Ping([112])".into(),
                "Pong".into(),
                "Text(\"fragmented\")".into(),
                format!("Text({long:?})"),
                "Close(Some(1013))".into(),
            ]
        );
        // Byte by byte, the same messages come out.
        let mut frags = Fragments::default();
        let (mut at, mut all) = (0, Vec::new());
        for end in 1..=complete {
            let (used, got) = messages(&wire[at..end], &mut frags).expect("valid prefix");
            at += used;
            all.extend(got);
        }
        assert_eq!(at, complete);
        assert_eq!(all.len(), 6);
        assert_eq!(all[3], "Text(\"fragmented\")");
    }

    #[test]
    fn protocol_violations_are_refused() {
        let masked = {
            let mut f = Vec::new();
            client_frame(OP_TEXT, b"hi", &mut f);
            f
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("masked", masked),
            ("reserved bit", vec![0xC1, 0x00]),
            ("fragmented ping", server_frame(false, OP_PING, b"")),
            (
                "lone continuation",
                server_frame(true, OP_CONTINUATION, b"x"),
            ),
            ("unknown opcode", server_frame(true, 0x3, b"")),
            ("not UTF-8", server_frame(true, OP_TEXT, &[0xff, 0xfe])),
            ("oversized", {
                let mut f = vec![0x81, 127];
                f.extend_from_slice(&(1u64 << 40).to_be_bytes());
                f
            }),
            ("new message inside a fragmented one", {
                let mut f = server_frame(false, OP_TEXT, b"a");
                f.extend(server_frame(true, OP_TEXT, b"b"));
                f
            }),
        ];
        for (what, wire) in cases {
            let mut frags = Fragments::default();
            assert!(messages(&wire, &mut frags).is_err(), "{what} was accepted");
        }
    }

    #[test]
    fn client_frames_are_masked_and_sized() {
        for len in [0usize, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut f = Vec::new();
            client_frame(OP_BINARY, &payload, &mut f);
            assert_eq!(f[0], 0x80 | OP_BINARY);
            assert_eq!(f[1] & 0x80, 0x80);
            let (head, got_len) = match f[1] & 0x7f {
                126 => (4, usize::from(u16::from_be_bytes([f[2], f[3]]))),
                127 => (
                    10,
                    u64::from_be_bytes(f[2..10].try_into().expect("8")) as usize,
                ),
                n => (2, usize::from(n)),
            };
            assert_eq!(got_len, len);
            let mask = &f[head..head + 4];
            let body: Vec<u8> = f[head + 4..]
                .iter()
                .zip(mask.iter().cycle())
                .map(|(b, m)| b ^ m)
                .collect();
            assert_eq!(body, payload);
        }
    }

    #[tokio::test]
    async fn upgrade_keeps_the_bytes_after_the_head_and_answers_pings() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/path?x=1", l.local_addr().expect("addr"));
        let mut then = server_frame(true, OP_PING, b"hb");
        then.extend(server_frame(true, OP_TEXT, b"first"));
        then.extend(server_frame(true, OP_TEXT, b"second"));
        let server = async {
            let (mut s, head) = accept_upgrade(&l, None, "101 Switching Protocols", &then).await;
            assert!(head.starts_with("GET /path?x=1 HTTP/1.1\r\n"), "{head}");
            assert!(head.contains("\r\nAuthorization: Bearer t\r\n"), "{head}");
            let pong = read_client_frame(&mut s).await;
            let sent = read_client_frame(&mut s).await;
            (pong, sent)
        };
        let client = async {
            let mut ws = upgrade(&url, &["Authorization: Bearer t".into()], None)
                .await
                .expect("upgraded");
            let first = ws.next_text("first").await.expect("first");
            ws.send_text("hi").await.expect("send");
            (first, ws)
        };
        let ((pong, sent), (first, ws)) = tokio::join!(server, client);
        assert_eq!(first, "first");
        assert_eq!(pong, (OP_PONG, b"hb".to_vec()));
        assert_eq!(sent, (OP_TEXT, b"hi".to_vec()));
        // What came with the handshake and was not asked for yet is still there.
        assert_eq!(ws.unread, server_frame(true, OP_TEXT, b"second"));
    }

    #[tokio::test]
    async fn upgrade_refuses_a_wrong_answer() {
        for (accept, status, want) in [
            (
                Some("bm90IHRoZSBrZXk="),
                "101 Switching Protocols",
                "Accept",
            ),
            (None, "200 OK", "HTTP 200"),
        ] {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let url = format!("ws://{}/", l.local_addr().expect("addr"));
            let (_, got) = tokio::join!(
                accept_upgrade(&l, accept, status, b""),
                upgrade(&url, &[], None)
            );
            let err = got.err().expect("refused");
            assert!(err.contains(want), "{err}");
        }
    }
}
