//! Test-only echo WebSocket at `/test/echo`, the target of the Autobahn conformance run
//! (`integration/tests/autobahn.rs`). It exists only with `testing.echo_route` on: otherwise
//! its guard fails and the request falls through to the 404 envelope like any unknown route.
//!
//! actix-web-actors (the realtime socket) hands fragments over raw and reports invalid
//! UTF-8 as a generic I/O error, so a conformance target cannot pick the close code RFC 6455
//! §7.4.1 asks for. This route reads frames with actix-http's `Parser` instead and keeps the
//! little state the RFC needs: the message being reassembled and how much of it is known to
//! be valid UTF-8 (checked per fragment, so a bad sequence fails the connection as soon as the
//! frame holding it arrives, not at the end of the message).

use std::convert::Infallible;
use std::time::Duration;

use actix_http::ws::{CloseCode, CloseReason, OpCode, Parser, ProtocolError};
use actix_web::guard::GuardContext;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;

use super::State;

/// Largest message, and frame, echoed: Autobahn's section 9 sends up to 16 MiB.
pub const MAX_MESSAGE: usize = 16 << 20;
/// Longest frame header (2 + 8-byte length + 4-byte mask), for the input-buffer bound.
const MAX_HEADER: usize = 14;
/// A peer silent this long is dropped, so an abandoned test socket does not linger.
const IDLE: Duration = Duration::from_secs(60);

/// The route guard: true only when the server was started with the echo route on.
pub fn enabled(ctx: &GuardContext<'_>) -> bool {
    ctx.app_data::<State>().is_some_and(|s| s.config.echo_route)
}

pub async fn echo(req: HttpRequest, payload: web::Payload) -> actix_web::Result<HttpResponse> {
    let mut res = actix_web_actors::ws::handshake(&req)?;
    let session = Session {
        payload,
        input: BytesMut::new(),
        partial: None,
        closed: false,
    };
    // The response body pulls the socket's input: nothing is read until the previous output
    // was taken, which is all the backpressure a 16 MiB echo needs. When the body ends (after
    // our close frame) actix closes the TCP connection, as the server should (RFC 6455 §7.1.1).
    let body = futures_util::stream::unfold(session, |mut s| async move {
        let out = s.next_output().await?;
        Some((Ok::<_, Infallible>(out), s))
    });
    Ok(res.streaming(body))
}

struct Session {
    payload: web::Payload,
    input: BytesMut,
    partial: Option<Partial>,
    closed: bool,
}

/// A text or binary message arriving in fragments.
struct Partial {
    text: bool,
    data: BytesMut,
    /// Prefix of `data` known to be valid UTF-8 (text only): a code point may straddle
    /// fragments, so only the tail after it is checked again.
    valid: usize,
}

impl Session {
    /// The next bytes to send (an echo, a pong or a close frame); `None` ends the connection.
    async fn next_output(&mut self) -> Option<Bytes> {
        if self.closed {
            return None;
        }
        loop {
            match Parser::parse(&mut self.input, true, MAX_MESSAGE) {
                Ok(Some((fin, op, data))) => {
                    let data = data.map(BytesMut::freeze).unwrap_or_default();
                    match self.frame(fin, op, data) {
                        Ok(Some(out)) => return Some(out),
                        Ok(None) => continue,
                        Err(code) => return Some(self.close(Some(code.into()))),
                    }
                }
                Ok(None) => {}
                Err(ProtocolError::Overflow) => {
                    return Some(self.close(Some(CloseCode::Size.into())))
                }
                // Reserved bits or opcodes, an unmasked frame, an oversized control frame.
                Err(_) => return Some(self.close(Some(CloseCode::Protocol.into()))),
            }
            // The parser waits for a whole frame before checking its size: bound what it holds.
            if self.input.len() > MAX_MESSAGE + MAX_HEADER {
                return Some(self.close(Some(CloseCode::Size.into())));
            }
            match tokio::time::timeout(IDLE, self.payload.next()).await {
                Ok(Some(Ok(chunk))) => self.input.extend_from_slice(&chunk),
                // The peer went away (or stayed silent): drop the connection without a close.
                _ => return None,
            }
        }
    }

    /// Handles one frame: `Ok(Some)` is a reply, `Err` the code to fail the connection with.
    fn frame(&mut self, fin: bool, op: OpCode, data: Bytes) -> Result<Option<Bytes>, CloseCode> {
        match op {
            // Control frames must not be fragmented (RFC 6455 §5.5).
            OpCode::Ping | OpCode::Pong | OpCode::Close if !fin => Err(CloseCode::Protocol),
            OpCode::Ping => Ok(Some(encode(OpCode::Pong, &data))),
            OpCode::Pong => Ok(None),
            OpCode::Close => {
                if data.len() > 2 && std::str::from_utf8(&data[2..]).is_err() {
                    return Err(CloseCode::Invalid);
                }
                // Rejects a 1-byte payload and codes that must not be sent (1004-1006, 1015,
                // below 1000, unassigned ranges).
                let reason =
                    Parser::try_parse_close_payload(&data).map_err(|_| CloseCode::Protocol)?;
                // Echo the peer's code, as RFC 6455 §5.5.1 suggests; the reason is optional.
                let reply = reason.map(|r| CloseReason::from(r.code));
                Ok(Some(self.close(reply)))
            }
            OpCode::Text | OpCode::Binary | OpCode::Continue => {
                let mut p = match (op, self.partial.take()) {
                    (OpCode::Continue, Some(p)) => p,
                    (OpCode::Continue, None) => return Err(CloseCode::Protocol), // nothing open
                    (_, Some(_)) => return Err(CloseCode::Protocol), // a fragmented one is open
                    (_, None) => Partial {
                        text: op == OpCode::Text,
                        data: BytesMut::new(),
                        valid: 0,
                    },
                };
                p.push(&data, fin)?;
                if fin {
                    Ok(Some(p.echo()))
                } else {
                    self.partial = Some(p);
                    Ok(None)
                }
            }
            OpCode::Bad => Err(CloseCode::Protocol),
        }
    }

    /// A close frame, after which the session sends nothing more.
    fn close(&mut self, reason: Option<CloseReason>) -> Bytes {
        self.closed = true;
        let mut out = BytesMut::new();
        Parser::write_close(&mut out, reason, false);
        out.freeze()
    }
}

impl Partial {
    fn push(&mut self, fragment: &[u8], fin: bool) -> Result<(), CloseCode> {
        if self.data.len() + fragment.len() > MAX_MESSAGE {
            return Err(CloseCode::Size);
        }
        self.data.extend_from_slice(fragment);
        if self.text {
            match std::str::from_utf8(&self.data[self.valid..]) {
                Ok(_) => self.valid = self.data.len(),
                // Only a truncated code point at the end, and more fragments to come.
                Err(e) if e.error_len().is_none() && !fin => self.valid += e.valid_up_to(),
                Err(_) => return Err(CloseCode::Invalid),
            }
        }
        Ok(())
    }

    fn echo(self) -> Bytes {
        encode(
            if self.text {
                OpCode::Text
            } else {
                OpCode::Binary
            },
            &self.data,
        )
    }
}

/// One unfragmented, unmasked (server-to-client) frame.
fn encode(op: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + MAX_HEADER);
    Parser::write_message(&mut out, payload, op, true, false);
    out.freeze()
}
