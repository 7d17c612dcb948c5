//! WebSocket connections without the HTTP/1 dispatcher's buffers.
//!
//! actix-http's dispatcher holds an 8 KiB read buffer and an 8 KiB write buffer for as long
//! as a connection lives. Server RSS per idle socket measured 14.2 KiB with them, 10.0 KiB
//! with 2 KiB ones, and 5.7 KiB with this module (`docs/performance.md`, "2026-12-07,
//! 02:18–"). So the dispatcher hands every upgrade request
//! here together with its connection. The app answers it exactly as it answers any request
//! (routing, middleware, authentication, the handshake), with a request body read straight
//! from the socket; a 101 is then followed by frames moved between the socket and the
//! session with no buffer kept between reads, in a task of its own that outlives the
//! dispatcher (an idle socket 5.6 → 3.0–3.4 KiB), and any other answer closes the
//! connection.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_codec::{Framed, FramedParts};
use actix_http::body::{BoxBody, MessageBody};
use actix_http::error::PayloadError;
use actix_http::{h1, Payload, Request, Response, StatusCode};
use actix_web::dev::{Service, ServiceResponse};
use bytes::Bytes;
use futures_util::future::poll_fn;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The largest read from the socket at once (on the stack: nothing is kept between reads).
const READ_CHUNK: usize = 4096;

/// WebSockets still being served. They run as tasks of their own, which the server's
/// graceful stop does not wait for; shutdown waits for this count instead
/// ([`all_closed`]), so that every socket writes its close frame before the process ends.
static SERVING: AtomicUsize = AtomicUsize::new(0);

/// Counts one served WebSocket while it lives.
struct Serving;

impl Serving {
    fn start() -> Self {
        SERVING.fetch_add(1, Ordering::AcqRel);
        Serving
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        SERVING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits until every WebSocket has ended or `within` has passed; whether they all ended.
pub async fn all_closed(within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while SERVING.load(Ordering::Acquire) > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// Answers one upgrade request with `app` and, after a 101, serves the WebSocket. A socket
/// error ends the connection: peers vanish all the time, so it is no server error.
pub async fn serve<S, B>(
    app: Rc<S>,
    req: Request,
    framed: Framed<TcpStream, h1::Codec>,
) -> Result<(), actix_web::Error>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    // The handshake's state (the app's future, the response head) is boxed and freed once it
    // is answered. The WebSocket then runs as a task of its own on this worker: the
    // dispatcher and its service futures end here instead of being polled on every wake-up
    // of the socket, and what stays for the connection's life is the state of `pump_out`.
    match Box::pin(handshake(app, req, framed)).await {
        Ok(Some((body, write))) => {
            let serving = Serving::start();
            actix_web::rt::spawn(async move {
                let _serving = serving;
                if let Err(e) = pump_out(body, write).await {
                    log::debug!("upgraded connection ended: {e}");
                }
            });
        }
        Ok(None) => {}
        Err(e) => log::debug!("upgrade request ended: {e}"),
    }
    Ok(())
}

/// The app's answer: after a 101 the session's frames and the socket to write them to;
/// any other answer is written whole and the connection closed (`None`).
async fn handshake<S, B>(
    app: Rc<S>,
    req: Request,
    framed: Framed<TcpStream, h1::Codec>,
) -> io::Result<Option<(BoxBody, OwnedWriteHalf)>>
where
    S: Service<Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody + 'static,
{
    // The dispatcher's buffers and codec are dropped here, at the end of this statement (a
    // binding would keep them to the end of the connection); only the bytes it read past the
    // request head are kept.
    let FramedParts { io, read_buf, .. } = framed.into_parts();
    let (read, mut write) = io.into_split();
    let early = (!read_buf.is_empty()).then(|| read_buf.freeze());
    let reader = SocketReader { read, early };
    let payload: actix_http::BoxedPayloadStream = Box::pin(reader);
    let (req, _) = req.replace_payload(Payload::Stream { payload });
    let res: Response<BoxBody> = match app.call(req).await {
        Ok(res) => res.map_into_boxed_body().into(),
        Err(e) => e.into(),
    };
    let (head, body) = res.into_parts();
    if head.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Not an upgrade after all (refused, or not a WebSocket route): answer and close.
        let body = actix_http::body::to_bytes(body)
            .await
            .map_err(|_| io::Error::other("response body failed"))?;
        // One write: a client that reads the refusal once must see its body too.
        let mut out = head_bytes(&head, Some(body.len()));
        out.extend_from_slice(&body);
        write.write_all(&out).await?;
        write.shutdown().await?;
        return Ok(None);
    }
    write.write_all(&head_bytes(&head, None)).await?;
    Ok(Some((body, write)))
}

/// Writes what the session sends until it ends (the body is the session's frames).
async fn pump_out(mut body: BoxBody, mut write: OwnedWriteHalf) -> io::Result<()> {
    while let Some(chunk) = poll_fn(|cx| Pin::new(&mut body).poll_next(cx)).await {
        match chunk {
            Ok(bytes) => write.write_all(&bytes).await?,
            Err(_) => break,
        }
    }
    write.shutdown().await
}

/// The response head as HTTP/1.1 text: the date, the app's headers, and the framing this
/// connection uses (`connection: upgrade` after a 101, a length and `connection: close`
/// otherwise).
fn head_bytes(head: &Response<()>, content_length: Option<usize>) -> Vec<u8> {
    let status = head.status();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .as_bytes(),
    );
    let date = actix_http::header::HttpDate::from(std::time::SystemTime::now());
    out.extend_from_slice(format!("date: {date}\r\n").as_bytes());
    for (name, value) in head.headers().iter() {
        use actix_http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
        if name == CONNECTION || name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == DATE
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match content_length {
        None => out.extend_from_slice(b"connection: upgrade\r\n"),
        Some(n) => out
            .extend_from_slice(format!("content-length: {n}\r\nconnection: close\r\n").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The request body as the socket delivers it: what the dispatcher read past the head first,
/// then each read copied out of a stack buffer.
struct SocketReader {
    read: OwnedReadHalf,
    early: Option<Bytes>,
}

impl Stream for SocketReader {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(early) = self.early.take() {
            return Poll::Ready(Some(Ok(early)));
        }
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        match ready!(Pin::new(&mut self.read).poll_read(cx, &mut buf)) {
            Ok(()) if buf.filled().is_empty() => Poll::Ready(None),
            Ok(()) => Poll::Ready(Some(Ok(Bytes::copy_from_slice(buf.filled())))),
            Err(e) => Poll::Ready(Some(Err(PayloadError::Io(e)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_switch_keeps_the_apps_headers_and_says_upgrade() {
        let mut head = Response::with_body(StatusCode::SWITCHING_PROTOCOLS, ());
        head.headers_mut().insert(
            actix_http::header::UPGRADE,
            actix_http::header::HeaderValue::from_static("websocket"),
        );
        head.headers_mut().insert(
            actix_http::header::CONTENT_LENGTH,
            actix_http::header::HeaderValue::from_static("0"),
        );
        let text = String::from_utf8(head_bytes(&head, None)).expect("ascii");
        assert!(
            text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{text}"
        );
        assert!(text.contains("upgrade: websocket\r\n"), "{text}");
        assert!(text.contains("connection: upgrade\r\n"), "{text}");
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }

    #[test]
    fn a_refusal_carries_its_length_and_closes() {
        let head = Response::with_body(StatusCode::UNAUTHORIZED, ());
        let text = String::from_utf8(head_bytes(&head, Some(42))).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        assert!(text.contains("content-length: 42\r\n"), "{text}");
        assert!(
            text.contains("\r\ndate: ") && text.contains(" GMT\r\n"),
            "{text}"
        );
        assert!(text.contains("connection: close\r\n"), "{text}");
    }
}
