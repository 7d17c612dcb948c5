//! The subscribers' receive loop: all of a worker's sockets in one epoll set, read on one
//! thread into one shared buffer, frames parsed in place (`rawws.rs`).
//!
//! Why not a tokio task and a tungstenite stream per socket, as before: in a fanout run that
//! path cost the generator more CPU per delivery than the kernel's receive did (task wake-ups,
//! a timer per socket, a zero-filled read buffer per socket, a second `read` that finds
//! nothing), on the same two cores the server needs. Here a socket woken by epoll is read
//! once (edge-triggered: a short read means the socket is empty, and new data raises a new
//! edge), and every check is the same `Check::frame` as before.
//!
//! Reading starts once every socket of the worker is connected (seconds, and no publish is
//! sent before that); a server ping that comes meanwhile waits in the kernel and is
//! answered then, well within any heartbeat timeout (60 s for `/api/realtime/ws`).

use std::io::{ErrorKind, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Check, Drain, Phase, SockCtx, SockEnd, MAX_RECONNECTS, TICK};
use crate::idle;
use crate::pusher::{self, Face};
use crate::rawws::{self, Fragments, Msg, RawWs};
use crate::rxstamp;

/// How long a socket we close waits for the server's close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Ready sockets taken per epoll wait.
const EVENTS: usize = 1024;
/// The shared read buffer; a partial frame left at its end is kept by its socket.
const READ_BUF: usize = 64 << 10;

/// A subscribed socket handed over by the connect phase.
pub(super) struct Subscriber {
    pub node: usize,
    pub ws: RawWs,
    /// The chat face's `realtime.ready` cursor (Pusher: empty).
    pub cursor: String,
    /// Pusher V2: the serial `subscription_succeeded` announced.
    pub last_seq: Option<i64>,
    pub url: Arc<String>,
    pub token: Arc<String>,
    pub route: Option<(SocketAddr, Ipv4Addr)>,
}

#[derive(PartialEq)]
enum State {
    Open,
    /// We sent a close frame; the server's answer (or the wait running out) ends it.
    Closing(Instant),
    Ended,
}

struct Live {
    node: usize,
    /// Its index among the worker's sockets, and its epoll token.
    token: Token,
    stream: TcpStream,
    unread: Vec<u8>,
    frags: Fragments,
    /// Frames to send (pongs, the close), not yet taken by the kernel.
    out: Vec<u8>,
    check: Check,
    last_frame: Instant,
    url: Arc<String>,
    /// The chat face's bearer token (for a reconnect).
    auth: Arc<String>,
    route: Option<(SocketAddr, Ipv4Addr)>,
    state: State,
    error: Option<String>,
    complete: bool,
    timed_out: bool,
}

/// What one read turned up besides the frames already checked.
enum Turn {
    More,
    /// A short read: the socket held no more data when it was read.
    Done,
    /// Nothing to read (`EAGAIN`).
    Empty,
    /// The server's close frame, with its code when it sent one.
    Closed(Option<u16>),
    Ended(Option<String>),
}

/// Reads every subscriber until the drain completes, they go idle, abort, or the deadline;
/// one [`SockEnd`] each. Blocking: run it on its own thread. `rt` makes the (rare)
/// reconnects after an overflow close.
pub(super) fn run(
    subs: Vec<Subscriber>,
    ctx: Arc<SockCtx>,
    phase: watch::Receiver<Phase>,
    rt: tokio::runtime::Handle,
) -> Result<Vec<SockEnd>, String> {
    if ctx.reader_nice != 0 {
        set_thread_nice(ctx.reader_nice).map_err(|e| format!("nice: {e}"))?;
    }
    let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut socks = Vec::with_capacity(subs.len());
    for (i, s) in subs.into_iter().enumerate() {
        let (stream, unread, frags) = s.ws.into_parts()?;
        rxstamp::enable(stream.as_raw_fd()).map_err(|e| format!("SO_TIMESTAMPNS: {e}"))?;
        socks.push(Live {
            node: s.node,
            token: Token(i),
            stream: TcpStream::from_std(stream),
            unread,
            frags,
            out: Vec::new(),
            check: Check::new(ctx.slots, s.cursor, s.last_seq),
            last_frame: Instant::now(),
            url: s.url,
            auth: s.token,
            route: s.route,
            state: State::Open,
            error: None,
            complete: false,
            timed_out: false,
        });
    }
    ctx.open.fetch_add(socks.len() as u64, Ordering::Relaxed);
    let mut rx = Receiver {
        poll,
        scratch: vec![0; READ_BUF],
        ctx,
        drain: None,
        aborted: false,
        rt,
        open: socks.len(),
    };
    for s in socks.iter_mut() {
        rx.poll
            .registry()
            .register(
                &mut s.stream,
                s.token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| format!("epoll add: {e}"))?;
        // Bytes read with the handshake, and whatever came since.
        rx.read_ready(s, false);
    }
    rx.note_phase(&phase);
    let mut events = Events::with_capacity(EVENTS);
    let mut next_tick = Instant::now() + TICK;
    let pause = rx.ctx.read_pause;
    // Sockets that ended early still wait for the drain, so their loss is counted.
    while rx.open > 0 || (rx.drain.is_none() && !rx.aborted && Instant::now() < rx.ctx.deadline) {
        // A full batch means more are waiting: no pause then.
        if !pause.is_zero() && events.iter().count() < EVENTS {
            std::thread::sleep(pause);
        }
        let wait = next_tick.saturating_duration_since(Instant::now());
        match poll_once(&mut rx.poll, &mut events, wait) {
            Ok(()) => {}
            Err(e) => return Err(format!("epoll wait: {e}")),
        }
        for ev in events.iter() {
            let Some(s) = socks.get_mut(ev.token().0) else {
                continue;
            };
            if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                rx.read_ready(s, ev.is_read_closed() || ev.is_error());
            }
            if ev.is_writable() && s.state != State::Ended {
                rx.flush(s);
            }
        }
        if Instant::now() >= next_tick {
            next_tick = Instant::now() + TICK;
            rx.tick(&mut socks, &phase);
        }
    }
    let drain = rx.drain.clone();
    Ok(socks
        .into_iter()
        .map(|mut s| {
            s.check.finish(drain.as_deref());
            let t = &mut s.check.tally;
            t.timed_out += u64::from(s.timed_out);
            if s.error.is_some() {
                t.socket_errors += 1;
            }
            t.complete +=
                u64::from(s.complete || (drain.is_some() && t.missing == 0 && s.error.is_none()));
            SockEnd {
                node: s.node,
                tally: s.check.tally,
                error: s.error,
                first_ns: s.check.first_ns,
                last_ns: s.check.last_ns,
            }
        })
        .collect())
}

/// Sets the calling thread's nice value (on Linux `setpriority` with id 0 applies to the
/// calling thread only), so the generator's reader yields the cores to the server first.
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: a plain syscall on the calling thread, no pointers.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn poll_once(poll: &mut Poll, events: &mut Events, wait: Duration) -> std::io::Result<()> {
    match poll.poll(events, Some(wait)) {
        Err(e) if e.kind() == ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        other => other,
    }
}

struct Receiver {
    poll: Poll,
    scratch: Vec<u8>,
    ctx: Arc<SockCtx>,
    drain: Option<Arc<Drain>>,
    aborted: bool,
    rt: tokio::runtime::Handle,
    /// Sockets not yet ended.
    open: usize,
}

impl Receiver {
    /// Reads `s` until the kernel has nothing more, checking every message. `to_end`: the
    /// peer has closed (its FIN may have come with the last data, in the same edge), so a
    /// short read is followed by one more, which finds the end of the stream.
    fn read_ready(&mut self, s: &mut Live, to_end: bool) {
        loop {
            if s.state == State::Ended {
                return;
            }
            match self.read_once(s) {
                Turn::More => continue,
                Turn::Done if to_end => continue,
                Turn::Done | Turn::Empty => break,
                Turn::Closed(code) => return self.on_close(s, code),
                // After our close frame, the end of the stream is the end we asked for.
                Turn::Ended(_) if matches!(s.state, State::Closing(_)) => return self.end(s, None),
                Turn::Ended(error) => return self.end(s, error),
            }
        }
        if !s.out.is_empty() {
            self.flush(s);
        }
        if s.state == State::Open
            && self
                .drain
                .as_ref()
                .is_some_and(|d| s.check.unique >= d.expected)
        {
            s.complete = true;
            self.close(s);
        }
    }

    /// One `read` after the bytes a socket kept; every complete message goes to the checks.
    fn read_once(&mut self, s: &mut Live) -> Turn {
        let carried = s.unread.len();
        if carried + 4096 > self.scratch.len() {
            self.scratch.resize(carried + READ_BUF, 0);
        }
        self.scratch[..carried].copy_from_slice(&s.unread);
        s.unread.clear();
        let space = self.scratch.len() - carried;
        let mut arrived = None;
        let (n, mut turn) = match rxstamp::recv(s.stream.as_raw_fd(), &mut self.scratch[carried..])
        {
            Ok((0, _)) => (0, Turn::Ended(Some("ws ended".into()))),
            Ok((n, stamp)) => {
                arrived = stamp;
                (n, if n == space { Turn::More } else { Turn::Done })
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => (0, Turn::Empty),
            Err(e) if e.kind() == ErrorKind::Interrupted => (0, Turn::More),
            Err(e) => (0, Turn::Ended(Some(format!("ws read: {e}")))),
        };
        let total = carried + n;
        if total == 0 {
            return turn;
        }
        if n > 0 {
            s.last_frame = Instant::now();
        }
        let ctx = &self.ctx;
        let (check, out) = (&mut s.check, &mut s.out);
        let mut closed = None;
        let used = rawws::drain_messages(&self.scratch[..total], &mut s.frags, |m| {
            if closed.is_some() {
                // Nothing is read after a close frame.
                return Ok(());
            }
            match m {
                Msg::Text(t) => {
                    if check.frame(t, ctx, arrived) {
                        rawws::client_frame(rawws::OP_TEXT, pusher::PONG.as_bytes(), out);
                    }
                }
                Msg::Ping(p) => rawws::client_frame(rawws::OP_PONG, p, out),
                Msg::Close(code) => closed = Some(code),
                Msg::Pong | Msg::Binary => {}
            }
            Ok(())
        });
        match used {
            Ok(used) => s.unread.extend_from_slice(&self.scratch[used..total]),
            Err(e) => turn = Turn::Ended(Some(format!("ws read: {e}"))),
        }
        match closed {
            Some(code) => Turn::Closed(code),
            None => turn,
        }
    }

    /// Sends what `s` has queued; the rest waits for the socket to be writable again.
    fn flush(&mut self, s: &mut Live) {
        while !s.out.is_empty() {
            match s.stream.write(&s.out) {
                Ok(n) => {
                    s.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.end(s, Some(format!("ws send: {e}"))),
            }
        }
    }

    /// The server closed: our own close answered, an overflow to resume after, or the end.
    fn on_close(&mut self, s: &mut Live, code: Option<u16>) {
        if matches!(s.state, State::Closing(_)) {
            return self.end(s, None);
        }
        let overflow = match self.ctx.face {
            Face::Chat => code == Some(1013),
            Face::Pusher => code == Some(pusher::OVERFLOW_CLOSE),
        };
        if overflow {
            s.check.tally.overflow_closes += 1;
        }
        // The Pusher face does not resume (yet): its socket fails.
        if !overflow
            || self.ctx.face == Face::Pusher
            || s.check.tally.reconnects >= MAX_RECONNECTS
            || Instant::now() >= self.ctx.deadline
        {
            return self.end(s, Some(format!("server closed the socket: {code:?}")));
        }
        // Resume from the last cursor. This thread waits for it: overflow is the rare case.
        let again = format!("{}?after_cursor={}", s.url, s.check.cursor);
        let within = self.ctx.reconnect_within;
        let attempt = self
            .rt
            .block_on(idle::connect_once_raw(&again, &s.auth, s.route, within))
            .and_then(|(ws, _)| ws.into_parts());
        let (stream, unread, frags) = match attempt {
            Ok(parts) => parts,
            Err(e) => return self.end(s, Some(format!("reconnect after 1013: {e}"))),
        };
        if let Err(e) = rxstamp::enable(stream.as_raw_fd()) {
            return self.end(s, Some(format!("SO_TIMESTAMPNS: {e}")));
        }
        let _ = self.poll.registry().deregister(&mut s.stream);
        s.stream = TcpStream::from_std(stream);
        s.unread = unread;
        s.frags = frags;
        s.out.clear();
        s.check.tally.reconnects += 1;
        if let Err(e) = self.poll.registry().register(
            &mut s.stream,
            s.token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            return self.end(s, Some(format!("epoll add: {e}")));
        }
        self.read_ready(s, false);
    }

    /// Starts the close handshake: our close frame, then at most [`CLOSE_WAIT`].
    fn close(&mut self, s: &mut Live) {
        if s.state != State::Open {
            return;
        }
        rawws::close_frame(1000, &mut s.out);
        s.state = State::Closing(Instant::now() + CLOSE_WAIT);
        self.flush(s);
    }

    fn end(&mut self, s: &mut Live, error: Option<String>) {
        if s.state == State::Ended {
            return;
        }
        if error.is_some() && s.error.is_none() {
            s.error = error;
            self.ctx.errors.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.poll.registry().deregister(&mut s.stream);
        let _ = s.stream.shutdown(std::net::Shutdown::Both);
        s.state = State::Ended;
        s.out = Vec::new();
        s.unread = Vec::new();
        self.open -= 1;
        self.ctx.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// The coordinator's word: the drain (which publishes were acknowledged), or abort.
    fn note_phase(&mut self, phase: &watch::Receiver<Phase>) {
        match &*phase.borrow() {
            Phase::Run => {}
            Phase::Drain(d) => self.drain = Some(d.clone()),
            Phase::Abort => self.aborted = true,
        }
    }

    /// Every [`TICK`]: the coordinator's phase, the drain's end, idle sockets, the deadline.
    fn tick(&mut self, socks: &mut [Live], phase: &watch::Receiver<Phase>) {
        let now = Instant::now();
        self.note_phase(phase);
        let abort = self.aborted;
        let past_deadline = now >= self.ctx.deadline;
        let drain_idle = self.ctx.drain_idle;
        // The drain closes sockets only once every open one has all it expects or has gone
        // idle: closing the finished ones while the last publish still reaches the others
        // would have the server handle thousands of closes during that burst, and measure
        // that instead of the delivery.
        let drained = self.drain.as_ref().is_some_and(|d| {
            socks.iter().all(|s| {
                !matches!(s.state, State::Open)
                    || s.check.unique >= d.expected
                    || now.duration_since(s.last_frame) >= drain_idle
            })
        });
        for s in socks.iter_mut() {
            match s.state {
                State::Ended => continue,
                State::Closing(until) => {
                    if now >= until {
                        self.end(s, None);
                    }
                    continue;
                }
                State::Open => {}
            }
            if abort {
                self.close(s);
                continue;
            }
            // Drained: every open socket is complete or idle (see above).
            if let Some(d) = self.drain.as_ref().filter(|_| drained) {
                s.complete = s.check.unique >= d.expected;
                self.close(s);
                continue;
            }
            if past_deadline {
                s.timed_out = true;
                self.close(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rawws::tests::{accept_upgrade, read_client_frame, server_frame};
    use crate::rawws::{OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};
    use crate::workers::unix_ns;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    fn ctx(slots: usize) -> Arc<SockCtx> {
        let mut c = super::super::tests::ctx_of(Face::Chat, slots);
        c.drain_idle = Duration::from_secs(5);
        c.reconnect_within = Duration::from_secs(5);
        c.deadline = Instant::now() + Duration::from_secs(20);
        c.read_pause = Duration::from_micros(500);
        Arc::new(c)
    }

    fn ready(cursor: u32) -> Vec<u8> {
        let t = format!(r#"{{"type":"realtime.ready","cursor":"{cursor}"}}"#);
        server_frame(true, OP_TEXT, t.as_bytes())
    }

    /// Publish `n` as the server delivers it, at `cursor` and `seq`.
    fn message(n: usize, cursor: u32, seq: i64) -> String {
        format!(
            r#"{{"type":"message.created","cursor":"{cursor}","channel_id":"c","seq":{seq},"payload":{{"data":"{n}:{}"}}}}"#,
            unix_ns()
        )
    }

    fn drain(expected: u64) -> watch::Receiver<Phase> {
        let acked = vec![true; expected as usize];
        let (tx, rx) = watch::channel(Phase::Drain(Arc::new(Drain { expected, acked })));
        // The receiver only reads the phase; the sender may go.
        drop(tx);
        rx
    }

    async fn subscriber(url: &str) -> Subscriber {
        let (ws, cursor) = idle::connect_once_raw(url, "t", None, Duration::from_secs(5))
            .await
            .expect("connected");
        Subscriber {
            node: 0,
            ws,
            cursor,
            last_seq: None,
            url: Arc::new(url.to_string()),
            token: Arc::new("t".into()),
            route: None,
        }
    }

    fn receive(
        subs: Vec<Subscriber>,
        ctx: Arc<SockCtx>,
        phase: watch::Receiver<Phase>,
    ) -> tokio::task::JoinHandle<Result<Vec<SockEnd>, String>> {
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || run(subs, ctx, phase, rt))
    }

    /// A chat subscriber connected to a scripted server (which sent `first` with its
    /// upgrade) and its receive loop running with a drain of `slots` publishes: the server's
    /// side of the socket, the listener (for reconnects), the context and the loop.
    async fn started(
        slots: usize,
        first: &[u8],
    ) -> (
        tokio::net::TcpStream,
        TcpListener,
        Arc<SockCtx>,
        tokio::task::JoinHandle<Result<Vec<SockEnd>, String>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/api/realtime/ws", l.local_addr().expect("addr"));
        let ((s, _), sub) = tokio::join!(
            accept_upgrade(&l, None, "101 Switching Protocols", first),
            subscriber(&url)
        );
        let ctx = ctx(slots);
        let rx = receive(vec![sub], ctx.clone(), drain(slots as u64));
        // The loop counts its sockets open once each has its receive stamps turned on:
        // what the server side writes from here on is stamped.
        let until = Instant::now() + Duration::from_secs(5);
        while ctx.open.load(Ordering::Relaxed) == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        (s, l, ctx, rx)
    }

    #[test]
    fn the_reader_nice_applies_to_its_own_thread_only() {
        let before = unsafe_getpriority();
        let inside = std::thread::spawn(|| {
            set_thread_nice(7).expect("nice");
            unsafe_getpriority()
        })
        .join()
        .expect("joined");
        assert_eq!(inside, 7);
        assert_eq!(unsafe_getpriority(), before);
    }

    fn unsafe_getpriority() -> i32 {
        // SAFETY: a plain syscall about the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_delivery_is_checked_pings_answered_and_the_socket_closed() {
        // Publish 0 comes with the handshake, so it sits in the bytes the upgrade kept.
        let mut first = ready(0);
        first.extend(server_frame(true, OP_TEXT, message(0, 1, 1).as_bytes()));
        let (mut s, _l, ctx, rx) = started(4, &first).await;
        let m3 = message(3, 5, 5);
        let (m3a, m3b) = m3.as_bytes().split_at(10);
        let mut wire = server_frame(true, OP_TEXT, message(1, 2, 2).as_bytes());
        wire.extend(server_frame(true, OP_PING, b"hb"));
        wire.extend(server_frame(true, OP_TEXT, message(1, 3, 3).as_bytes()));
        wire.extend(server_frame(true, OP_TEXT, message(2, 4, 4).as_bytes()));
        wire.extend(server_frame(false, OP_TEXT, m3a));
        wire.extend(server_frame(true, OP_CONTINUATION, m3b));
        // Split mid-frame, so a socket keeps a partial frame between reads.
        let (a, b) = wire.split_at(wire.len() / 2 + 3);
        s.write_all(a).await.expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.write_all(b).await.expect("write");
        assert_eq!(read_client_frame(&mut s).await, (OP_PONG, b"hb".to_vec()));
        let (op, code) = read_client_frame(&mut s).await;
        assert_eq!((op, code), (OP_CLOSE, 1000u16.to_be_bytes().to_vec()));
        s.write_all(&server_frame(true, OP_CLOSE, &1000u16.to_be_bytes()))
            .await
            .expect("close");
        let ends = rx.await.expect("joined").expect("ran");
        let t = &ends[0].tally;
        assert_eq!(ends[0].error, None);
        assert_eq!(
            (t.message_frames, t.duplicates, t.missing, t.complete),
            (5, 1, 0, 1)
        );
        assert_eq!(
            (t.out_of_order, t.seq_gaps, t.cursor_regressions),
            (0, 0, 0)
        );
        assert_eq!(ctx.delivered.load(Ordering::Relaxed), 5);
        assert_eq!(ctx.open.load(Ordering::Relaxed), 0);
        // Every message read from the socket carries the kernel's stamp; only publish 0
        // may have come without one, in the bytes the handshake kept.
        let stamped = ctx.arrival_hist.lock().expect("lock").len();
        assert_eq!(stamped + t.unstamped, 5);
        assert!(stamped >= 4, "{stamped} stamped");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_drain_closes_no_socket_while_another_still_waits() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/api/realtime/ws", l.local_addr().expect("addr"));
        let (switch, hello) = ("101 Switching Protocols", ready(0));
        let ((mut a, _), sub_a) =
            tokio::join!(accept_upgrade(&l, None, switch, &hello), subscriber(&url));
        let ((mut b, _), sub_b) =
            tokio::join!(accept_upgrade(&l, None, switch, &hello), subscriber(&url));
        let rx = receive(vec![sub_a, sub_b], ctx(2), drain(2));
        let mut both = server_frame(true, OP_TEXT, message(0, 1, 1).as_bytes());
        both.extend(server_frame(true, OP_TEXT, message(1, 2, 2).as_bytes()));
        a.write_all(&both).await.expect("write a");
        let first = server_frame(true, OP_TEXT, message(0, 1, 1).as_bytes());
        b.write_all(&first).await.expect("write b");
        // Three ticks: a has all it expects, b does not yet, so neither is closed.
        let early = tokio::time::timeout(Duration::from_millis(800), read_client_frame(&mut a));
        assert!(early.await.is_err(), "a was closed while b still waited");
        let last = server_frame(true, OP_TEXT, message(1, 2, 2).as_bytes());
        b.write_all(&last).await.expect("write b");
        for s in [&mut a, &mut b] {
            let (op, code) = read_client_frame(s).await;
            assert_eq!((op, code), (OP_CLOSE, 1000u16.to_be_bytes().to_vec()));
            s.write_all(&server_frame(true, OP_CLOSE, &1000u16.to_be_bytes()))
                .await
                .expect("close");
        }
        let ends = rx.await.expect("joined").expect("ran");
        assert_eq!(ends.len(), 2);
        for e in &ends {
            assert_eq!((e.error.as_deref(), e.tally.complete), (None, 1));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_overflow_close_resumes_after_the_last_cursor() {
        let (mut s, l, _ctx, rx) = started(2, &ready(0)).await;
        let mut wire = server_frame(true, OP_TEXT, message(0, 7, 1).as_bytes());
        wire.extend(server_frame(true, OP_CLOSE, &1013u16.to_be_bytes()));
        s.write_all(&wire).await.expect("write");
        let mut again = ready(7);
        again.extend(server_frame(true, OP_TEXT, message(1, 8, 2).as_bytes()));
        let (mut s2, head) = accept_upgrade(&l, None, "101 Switching Protocols", &again).await;
        assert!(
            head.starts_with("GET /api/realtime/ws?after_cursor=7 HTTP/1.1"),
            "{head}"
        );
        let (op, _) = read_client_frame(&mut s2).await;
        assert_eq!(op, OP_CLOSE);
        drop(s2);
        let ends = rx.await.expect("joined").expect("ran");
        let t = &ends[0].tally;
        assert_eq!(ends[0].error, None);
        assert_eq!(
            (
                t.message_frames,
                t.missing,
                t.overflow_closes,
                t.reconnects,
                t.complete
            ),
            (2, 0, 1, 1, 1)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_socket_the_server_ends_counts_as_an_error_and_loss() {
        let (mut s, _l, ctx, rx) = started(3, &ready(0)).await;
        s.write_all(&server_frame(true, OP_TEXT, message(0, 1, 1).as_bytes()))
            .await
            .expect("write");
        drop(s);
        let ends = rx.await.expect("joined").expect("ran");
        let t = &ends[0].tally;
        assert!(ends[0].error.is_some());
        assert_eq!(
            (t.message_frames, t.missing, t.socket_errors, t.complete),
            (1, 2, 1, 0)
        );
        assert_eq!(ctx.errors.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pusher_ping_is_answered_with_a_pong() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("ws://{}/app/key", l.local_addr().expect("addr"));
        let (server, ws) = tokio::join!(
            accept_upgrade(&l, None, "101 Switching Protocols", b""),
            rawws::upgrade(&url, &[], None)
        );
        let (mut s, _) = server;
        let sub = Subscriber {
            node: 0,
            ws: ws.expect("upgraded"),
            cursor: String::new(),
            last_seq: None,
            url: Arc::new(url),
            token: Arc::new(String::new()),
            route: None,
        };
        let mut c = super::super::tests::ctx_of(Face::Pusher, 1);
        c.deadline = Instant::now() + Duration::from_secs(20);
        let ctx = Arc::new(c);
        let rx = receive(vec![sub], ctx.clone(), drain(1));
        let ping = br#"{"event":"pusher:ping","data":{}}"#;
        let event = format!(
            r#"{{"event":"bench","channel":"c","data":"0:{}"}}"#,
            unix_ns()
        );
        let mut wire = server_frame(true, OP_TEXT, ping);
        wire.extend(server_frame(true, OP_TEXT, event.as_bytes()));
        s.write_all(&wire).await.expect("write");
        assert_eq!(
            read_client_frame(&mut s).await,
            (OP_TEXT, pusher::PONG.as_bytes().to_vec())
        );
        assert_eq!(read_client_frame(&mut s).await.0, OP_CLOSE);
        drop(s);
        let ends = rx.await.expect("joined").expect("ran");
        let t = &ends[0].tally;
        assert_eq!(ends[0].error, None);
        assert_eq!(
            (t.pings, t.message_frames, t.missing, t.complete),
            (1, 1, 0, 1)
        );
    }
}
