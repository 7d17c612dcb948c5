//! `switchboard-bench floor`: fanout's shape with no server and no protocol, to measure what
//! this machine allows before any server's own work.
//!
//! A "server" of `--senders` threads holds one end of each loopback TCP connection and, at
//! each tick, writes one pre-built frame of `--frame-bytes` (the tick's send stamp in its first
//! eight bytes) to each of its sockets in turn: one `write` per delivery, nothing else. The
//! subscribers' ends are read by `--readers` child processes (`floor-reader`), each from one
//! edge-triggered epoll loop, and every frame's send-to-read latency goes into an HDR
//! histogram. What it leaves out is everything a real server and the real generator add: the
//! publish's HTTP request, actors, WebSocket framing, JSON, the checks of order and loss.
//!
//! `--io uring` does the same through io_uring: each sender submits a tick's sends in batches
//! and each reader keeps one receive armed per socket, so the system calls per delivery go
//! (the TCP work stays).
//!
//! `--io uring-multishot` keeps one multishot receive per socket instead, into buffers lent to
//! the kernel through a provided-buffer ring. `--pin` puts sender i and reader i on CPU i and
//! gives sender i reader i's sockets; `--read-pause-us` pauses the readers between waits as
//! fanout's do. Each is a diagnostic: a design a server or generator could take.
//!
//! Its p99 is meant as a lower bound for `fanout` at the same size and rate on the same
//! machine, and was one on the Intel VMs (42–49 ms against fanout's 83–104). On the AMD VM of
//! 2026-12-07 16:00, where bare threads could not keep the rate, the ranges overlapped
//! (250–360 against 328–523). Nor is its CPU per delivery a floor for a server that has fallen
//! behind: such a server writes several queued frames at once (2.7 a write on that VM, 8.8 µs
//! a delivery against a bare send's 10.4–13.7), which the floor's one write per frame never
//! does (see `docs/performance.md`).
//!
//! Bounded: `--duration` of ticks, then every socket is closed and each reader stops at the end
//! of its sockets or 10 s later.

use std::io::{BufReader, ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::server::sample_proc;
use crate::workers::{hist_from_hex, hist_to_hex, unix_ns};

/// How long a reader waits for the rest after the senders stop.
const READ_GRACE: Duration = Duration::from_secs(10);

#[derive(Args, Clone, Debug)]
pub struct FloorArgs {
    /// Subscribed sockets (each is two descriptors: one in this process, one in a reader).
    #[arg(long, default_value_t = 10_000)]
    pub subscribers: usize,
    /// Ticks per second; each tick writes one frame to every socket.
    #[arg(long, default_value_t = 15)]
    pub rate: u32,
    /// Seconds of ticks.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Sending threads (Switchboard runs one HTTP worker per core: 2 here).
    #[arg(long, default_value_t = 2)]
    pub senders: usize,
    /// Reader processes (fanout's default for 10,000 subscribers: 2).
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// Bytes per frame (a chat-face delivery of `fanout` is about this size).
    #[arg(long, default_value_t = 400)]
    pub frame_bytes: usize,
    #[command(flatten)]
    pub both: BothEnds,
    /// Pins sender i and reader i to CPU i (modulo the CPUs) and gives sender i reader i's
    /// sockets, so both ends of a socket share one CPU's caches (a diagnostic).
    #[arg(long)]
    pub pin: bool,
}

/// What the senders and the reader processes both take (the readers are handed them).
#[derive(Args, Clone, Debug)]
pub struct BothEnds {
    /// TCP congestion control of both ends (`TCP_CONGESTION`, e.g. `reno`); default: the
    /// system's (`net.ipv4.tcp_congestion_control`).
    #[arg(long)]
    pub congestion: Option<String>,
    /// `syscalls`: a `write` per delivery, reads from an epoll loop. `uring`: sends and
    /// receives batched through io_uring (fewer system calls; the TCP work is the same).
    /// `uring-multishot`: as `uring`, with multishot receives into provided buffers.
    #[arg(long, value_enum, default_value_t = FloorIo::Syscalls)]
    pub io: FloorIo,
    /// µs a reader pauses after a wait that found fewer than 1,024 ready sockets (or
    /// completions), as fanout's readers do by default (`fanout --read-pause-us 1000`): fewer
    /// wake-ups, at most this much added latency. Default 0, no pause, as every floor recorded
    /// so far (a diagnostic: on the AMD VM of 2026-12-07 16:00 it changed neither the p99 nor
    /// the CPU per send beyond the runs' spread).
    #[arg(long, default_value_t = 0)]
    pub read_pause_us: u64,
}

impl BothEnds {
    /// These options as a reader's command line.
    fn as_args(&self) -> Vec<String> {
        let mut out = vec![
            "--io".to_string(),
            self.io.as_str().to_string(),
            "--read-pause-us".to_string(),
            self.read_pause_us.to_string(),
        ];
        if let Some(c) = &self.congestion {
            out.extend(["--congestion".to_string(), c.clone()]);
        }
        out
    }
}

/// How the floor's threads do their I/O.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FloorIo {
    #[default]
    Syscalls,
    Uring,
    /// As `uring`, but each reader keeps one multishot receive per socket, into buffers it
    /// lends the kernel through a provided-buffer ring (no re-arming per frame).
    UringMultishot,
}

impl FloorIo {
    fn as_str(self) -> &'static str {
        match self {
            Self::Syscalls => "syscalls",
            Self::Uring => "uring",
            Self::UringMultishot => "uring-multishot",
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct FloorReaderArgs {
    #[arg(long)]
    pub connect: SocketAddr,
    #[arg(long)]
    pub sockets: usize,
    #[arg(long)]
    pub frames_each: u64,
    #[arg(long)]
    pub frame_bytes: usize,
    /// Seconds after which the reader stops whatever it has.
    #[arg(long)]
    pub deadline: u64,
    #[command(flatten)]
    pub both: BothEnds,
    /// This reader's index: said in one byte on each socket after connecting.
    #[arg(long, default_value_t = 0)]
    pub index: u8,
    /// The CPU to pin this reader to.
    #[arg(long)]
    pub cpu: Option<usize>,
}

pub fn main(args: &FloorArgs) -> Result<bool, String> {
    if args.frame_bytes < 8 || args.senders == 0 || args.readers == 0 || args.rate == 0 {
        return Err("--frame-bytes ≥ 8, and --senders, --readers, --rate ≥ 1".into());
    }
    if args.readers > usize::from(u8::MAX) {
        return Err("--readers ≤ 255".into());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    widen_backlog(&listener);
    let ticks = args.duration * u64::from(args.rate);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let share = |i: usize| {
        args.subscribers / args.readers + usize::from(i < args.subscribers % args.readers)
    };
    let mut children = Readers(Vec::new());
    for i in 0..args.readers {
        let child = Command::new(&exe)
            .args(["floor-reader", "--connect", &addr.to_string()])
            .args(["--sockets", &share(i).to_string()])
            .args(["--frames-each", &ticks.to_string()])
            .args(["--frame-bytes", &args.frame_bytes.to_string()])
            .args(["--deadline", &(args.duration + 60).to_string()])
            .args(args.both.as_args())
            .args(["--index", &i.to_string()])
            .args(
                args.pin
                    .then(|| ["--cpu".to_string(), (i % cpus).to_string()])
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn reader: {e}"))?;
        children.0.push(child);
    }
    // Accepted in connect order, dealt to the senders in turn (as a server's workers share
    // their sockets); with `--pin`, each to the sender of its reader's index.
    let mut groups: Vec<Vec<TcpStream>> = (0..args.senders).map(|_| Vec::new()).collect();
    let accept_until = Instant::now() + Duration::from_secs(60);
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut accepted = 0;
    while accepted < args.subscribers {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                let mut index = [0u8];
                (&s).read_exact(&mut index)
                    .map_err(|e| format!("reader index: {e}"))?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                set_congestion(&s, args.both.congestion.as_deref())?;
                let sender = if args.pin {
                    usize::from(index[0]) % args.senders
                } else {
                    accepted % args.senders
                };
                groups[sender].push(s);
                accepted += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > accept_until {
                    return Err(format!("only {accepted} of {} connected", args.subscribers));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    let mut outs: Vec<BufReader<std::process::ChildStdout>> = children
        .0
        .iter_mut()
        .filter_map(|c| c.stdout.take().map(BufReader::new))
        .collect();
    for out in &mut outs {
        expect_line(out, "ready")?;
    }
    eprintln!(
        "floor: {} sockets up; {} ticks of {} B at {}/s from {} senders{}",
        args.subscribers,
        ticks,
        args.frame_bytes,
        args.rate,
        args.senders,
        if args.pin { ", pinned" } else { "" }
    );

    let cpu_before = sample_proc("self").map(|s| s.cpu_secs);
    let readers_cpu_before: Vec<Option<f64>> = children
        .0
        .iter()
        .map(|c| sample_proc(&c.id().to_string()).map(|s| s.cpu_secs))
        .collect();
    // One barrier crossing per tick: the tick's stamp is taken once, before any write.
    let start = Arc::new(Barrier::new(args.senders + 1));
    let stamp = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (frame_bytes, io) = (args.frame_bytes, args.both.io);
    let threads: Vec<_> = groups
        .into_iter()
        .enumerate()
        .map(|(i, mut socks)| {
            let (start, stamp) = (start.clone(), stamp.clone());
            let cpu = args.pin.then_some(i % cpus);
            std::thread::spawn(move || -> std::io::Result<()> {
                if let Some(cpu) = cpu {
                    pin_to(cpu)?;
                }
                if io != FloorIo::Syscalls {
                    return uring::send_ticks(&socks, ticks, &start, &stamp, frame_bytes);
                }
                let mut frame = vec![b'x'; frame_bytes];
                for _ in 0..ticks {
                    start.wait();
                    let sent = stamp.load(std::sync::atomic::Ordering::Acquire);
                    frame[..8].copy_from_slice(&sent.to_le_bytes());
                    for s in &mut socks {
                        s.write_all(&frame)?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    let began = Instant::now();
    let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    for t in 0..ticks {
        let due = began + period.mul_f64(t as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        stamp.store(unix_ns(), std::sync::atomic::Ordering::Release);
        start.wait();
    }
    for t in threads {
        t.join()
            .map_err(|_| "sender panicked".to_string())?
            .map_err(|e| format!("write: {e}"))?;
    }
    let sent_secs = began.elapsed().as_secs_f64();
    let cpu = cpu_before.and_then(|b| sample_proc("self").map(|s| s.cpu_secs - b));
    let readers_cpu: f64 = children
        .0
        .iter()
        .zip(&readers_cpu_before)
        .filter_map(|(c, b)| Some(sample_proc(&c.id().to_string())?.cpu_secs - (*b)?))
        .sum();

    let mut merged =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let (mut frames, mut short) = (0u64, 0u64);
    for out in &mut outs {
        let report: Value = serde_json::from_str(&expect_line(out, "report")?)
            .map_err(|e| format!("reader report: {e}"))?;
        let hist = hist_from_hex(report["hist"].as_str().unwrap_or(""))?;
        merged.add(&hist).map_err(|e| format!("merge: {e:?}"))?;
        frames += report["frames"].as_u64().unwrap_or(0);
        short += report["short_sockets"].as_u64().unwrap_or(0);
    }
    children.wait();
    let expected = ticks * args.subscribers as u64;
    let ms = |q: f64| merged.value_at_quantile(q) as f64 / 1000.0;
    let per_delivery_us = |s: f64| s * 1e6 / expected.max(1) as f64;
    println!(
        "floor: {frames} of {expected} frames in {sent_secs:.1} s; send-to-read p50 {:.1} / p90 {:.1} / p99 {:.1} / max {:.1} ms",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        merged.max() as f64 / 1000.0
    );
    println!(
        "floor: CPU per delivery: senders {:.2} µs, readers {:.2} µs",
        per_delivery_us(cpu.unwrap_or(f64::NAN)),
        per_delivery_us(readers_cpu)
    );
    println!(
        "{}",
        json!({
            "scenario": "floor",
            "subscribers": args.subscribers, "rate": args.rate, "duration_s": args.duration,
            "senders": args.senders, "readers": args.readers, "frame_bytes": args.frame_bytes,
            "io": args.both.io.as_str(), "congestion": args.both.congestion, "pinned": args.pin,
            "read_pause_us": args.both.read_pause_us,
            "frames": frames, "expected": expected, "short_sockets": short,
            "latency_ms": {"p50": ms(0.5), "p90": ms(0.9), "p99": ms(0.99), "p999": ms(0.999), "max": merged.max() as f64 / 1000.0},
            "cpu_us_per_delivery": {"senders": per_delivery_us(cpu.unwrap_or(f64::NAN)), "readers": per_delivery_us(readers_cpu)},
        })
    );
    Ok(frames == expected)
}

/// The reader processes this run started. Waited for at the end; if the run ends early with an
/// error, killed (by their own pids) rather than left to their deadline.
struct Readers(Vec<std::process::Child>);

impl Readers {
    fn wait(mut self) {
        for c in &mut self.0 {
            let _ = c.wait();
        }
        self.0.clear();
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// std listens with a backlog of 128: a reader connecting thousands of sockets at once would
/// overflow it, and each dropped SYN stalls that reader a second or more. `listen` again on
/// the listening socket raises it (the kernel caps it at `net.core.somaxconn`).
fn widen_backlog(listener: &TcpListener) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: the descriptor is the listener's own, open for the whole call.
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    if rc != 0 {
        eprintln!(
            "floor: listen backlog stays 128: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Pins the calling thread to one CPU.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it (the index is
    // below CPU_SETSIZE, checked first); sched_setaffinity(0, ..) applies to this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!("no CPU {cpu}")));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets the socket's congestion control when one is named.
fn set_congestion(s: &TcpStream, name: Option<&str>) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let Some(name) = name else { return Ok(()) };
    // SAFETY: the descriptor is the stream's own; the option value is `name`'s bytes.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(format!(
            "TCP_CONGESTION {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The next line of a reader, which must be a JSON object of `type` `want`.
fn expect_line(out: &mut impl std::io::BufRead, want: &str) -> Result<String, String> {
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| e.to_string())?;
    let v: Value =
        serde_json::from_str(line.trim()).map_err(|_| format!("reader said {line:?}"))?;
    if v["type"] == want {
        Ok(line)
    } else {
        Err(format!("reader said {line:?}, expected {want}"))
    }
}

/// A socket's frames as they come: the part of a frame a read ended in.
#[derive(Default)]
struct Partial {
    have: usize,
    stamp: [u8; 8],
    frames: u64,
    ended: bool,
}

pub fn reader_main(args: &FloorReaderArgs) -> Result<bool, String> {
    let report = read_all(args, || println!("{}", json!({"type": "ready"})))?;
    println!(
        "{}",
        json!({"type": "report", "frames": report.frames, "short_sockets": report.short_sockets, "hist": hist_to_hex(&report.hist)?})
    );
    Ok(report.short_sockets == 0)
}

/// What one reader read.
struct ReaderReport {
    frames: u64,
    /// Sockets that ended (or were still waiting at the end) with fewer frames than expected.
    short_sockets: usize,
    hist: Histogram<u64>,
}

/// Connects the reader's sockets, calls `ready`, and reads every socket until each has its
/// frames or has ended (then at most [`READ_GRACE`] more), or the deadline.
fn read_all(args: &FloorReaderArgs, ready: impl FnOnce()) -> Result<ReaderReport, String> {
    if let Some(cpu) = args.cpu {
        pin_to(cpu).map_err(|e| format!("pin to CPU {cpu}: {e}"))?;
    }
    let mut streams = Vec::with_capacity(args.sockets);
    for _ in 0..args.sockets {
        let mut s = TcpStream::connect(args.connect).map_err(|e| format!("connect: {e}"))?;
        set_congestion(&s, args.both.congestion.as_deref())?;
        s.write_all(&[args.index])
            .map_err(|e| format!("say index: {e}"))?;
        streams.push(s);
    }
    let mut parts: Vec<Partial> = (0..streams.len()).map(|_| Partial::default()).collect();
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    match args.both.io {
        FloorIo::Syscalls => {
            let mut streams = streams
                .into_iter()
                .map(|s| {
                    s.set_nonblocking(true)?;
                    Ok(mio::net::TcpStream::from_std(s))
                })
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| e.to_string())?;
            let poll = mio::Poll::new().map_err(|e| e.to_string())?;
            for (i, s) in streams.iter_mut().enumerate() {
                poll.registry()
                    .register(s, mio::Token(i), mio::Interest::READABLE)
                    .map_err(|e| e.to_string())?;
            }
            ready();
            epoll_loop(args, poll, &mut streams, &mut parts, &mut hist, deadline)?;
        }
        FloorIo::Uring => {
            // Blocking sockets: io_uring waits for data itself (a non-blocking one would
            // complete each receive at once with EAGAIN).
            ready();
            uring::read_loop(args, &streams, &mut parts, &mut hist, deadline)?;
        }
        FloorIo::UringMultishot => {
            ready();
            uring::read_multishot(args, &streams, &mut parts, &mut hist, deadline)?;
        }
    }
    let frames = parts.iter().map(|p| p.frames).sum();
    let short_sockets = parts.iter().filter(|p| p.frames < args.frames_each).count();
    Ok(ReaderReport {
        frames,
        short_sockets,
        hist,
    })
}

/// When a reader stops: every socket has its frames or has ended (then at most
/// [`READ_GRACE`] more), or the deadline passed.
struct Progress {
    open: usize,
    complete: usize,
    grace: Option<Instant>,
}

impl Progress {
    fn new(sockets: usize) -> Self {
        Self {
            open: sockets,
            complete: 0,
            grace: None,
        }
    }

    fn done(&self, sockets: usize, deadline: Instant) -> bool {
        let now = Instant::now();
        self.open == 0
            || self.complete >= sockets
            || now > deadline
            || self.grace.is_some_and(|g| now > g)
    }

    /// Bytes read from the socket of `p`.
    fn read(
        &mut self,
        p: &mut Partial,
        bytes: &[u8],
        args: &FloorReaderArgs,
        hist: &mut Histogram<u64>,
    ) {
        let before = p.frames;
        take(p, bytes, args.frame_bytes, unix_ns(), hist);
        if before < args.frames_each && p.frames >= args.frames_each {
            self.complete += 1;
        }
    }

    /// The socket of `p` reached its end.
    fn ended(&mut self, p: &mut Partial) {
        p.ended = true;
        self.open -= 1;
        self.grace
            .get_or_insert_with(|| Instant::now() + READ_GRACE);
    }
}

fn epoll_loop(
    args: &FloorReaderArgs,
    mut poll: mio::Poll,
    streams: &mut [mio::net::TcpStream],
    parts: &mut [Partial],
    hist: &mut Histogram<u64>,
    deadline: Instant,
) -> Result<(), String> {
    const EVENTS: usize = 1024;
    let mut events = mio::Events::with_capacity(EVENTS);
    let mut buf = vec![0u8; 64 << 10];
    let mut progress = Progress::new(parts.len());
    let pause = Duration::from_micros(args.both.read_pause_us);
    while !progress.done(parts.len(), deadline) {
        // A full batch means more are waiting: no pause then.
        if !pause.is_zero() && events.iter().count() < EVENTS {
            std::thread::sleep(pause);
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        for ev in &events {
            let i = ev.token().0;
            let (Some(s), Some(p)) = (streams.get_mut(i), parts.get_mut(i)) else {
                continue;
            };
            if p.ended {
                continue;
            }
            // Edge-triggered: read until the socket is empty or ended.
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        progress.ended(p);
                        break;
                    }
                    Ok(n) => {
                        progress.read(p, &buf[..n], args, hist);
                        // A short read emptied the socket (unless its end came with it).
                        if n < buf.len() && !ev.is_read_closed() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        }
    }
    Ok(())
}

/// The same two loops over io_uring: a tick's sends submitted in batches, and a receive kept
/// armed on every socket, armed again as each completes.
mod uring {
    use std::collections::VecDeque;
    use std::net::TcpStream;
    use std::os::fd::AsRawFd as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Barrier;
    use std::time::Instant;

    use hdrhistogram::Histogram;
    use io_uring::{opcode, squeue, types, IoUring};

    use super::{FloorReaderArgs, Partial, Progress};

    /// Submission queue entries (the completion queue is twice as long).
    const ENTRIES: u32 = 4096;
    /// Receive buffer per socket.
    const RECV_BUF: usize = 2048;
    /// The wake-up that lets the reader check its deadline.
    const TICK: u64 = u64::MAX;

    /// `ticks` times: waits at `start`, then sends the frame (the stamp in its first eight
    /// bytes) to every socket, in batches of one submission each.
    pub fn send_ticks(
        socks: &[TcpStream],
        ticks: u64,
        start: &Barrier,
        stamp: &AtomicU64,
        frame_bytes: usize,
    ) -> std::io::Result<()> {
        let mut frame = vec![b'x'; frame_bytes];
        let mut ring = IoUring::new(ENTRIES)?;
        let fds: Vec<_> = socks.iter().map(|s| types::Fd(s.as_raw_fd())).collect();
        let len = frame.len() as u32;
        for _ in 0..ticks {
            start.wait();
            let sent = stamp.load(Ordering::Acquire);
            frame[..8].copy_from_slice(&sent.to_le_bytes());
            let (mut next, mut pending) = (0usize, 0usize);
            while next < fds.len() || pending > 0 {
                {
                    let mut sq = ring.submission();
                    while next < fds.len() && !sq.is_full() {
                        let send = opcode::Send::new(fds[next], frame.as_ptr(), len)
                            .build()
                            .user_data(next as u64);
                        // SAFETY: `frame` is neither changed nor freed until every send of
                        // this tick has completed (reaped below, before the next tick).
                        unsafe { sq.push(&send) }
                            .map_err(|_| std::io::Error::other("submission queue full"))?;
                        next += 1;
                        pending += 1;
                    }
                }
                ring.submit_and_wait(usize::from(next >= fds.len() && pending > 0))?;
                for cqe in ring.completion() {
                    pending -= 1;
                    if cqe.result() != len as i32 {
                        return Err(std::io::Error::other(format!("send: {}", cqe.result())));
                    }
                }
            }
        }
        Ok(())
    }

    /// As the epoll reader: after a wait that found fewer than 1,024 completions, pause
    /// (`--read-pause-us`) so the next one finds a batch.
    fn pause_if_few(ring: &mut IoUring, args: &FloorReaderArgs) {
        let pause_us = args.both.read_pause_us;
        if pause_us > 0 && ring.completion().len() < 1024 {
            std::thread::sleep(std::time::Duration::from_micros(pause_us));
        }
    }

    /// Buffers lent to the kernel for multishot receives (a power of two).
    const LENT: u16 = 8192;
    /// The provided-buffer group's id.
    const GROUP: u16 = 7;

    /// A provided-buffer ring: `LENT` receive buffers the kernel picks from, handed back to it
    /// as each completion is read.
    struct BufRing {
        entries: *mut types::BufRingEntry,
        bufs: Vec<u8>,
        tail: u16,
    }

    impl BufRing {
        fn layout() -> std::alloc::Layout {
            // Page-aligned, as the kernel requires of a ring it maps.
            std::alloc::Layout::from_size_align(
                usize::from(LENT) * std::mem::size_of::<types::BufRingEntry>(),
                4096,
            )
            .expect("constant layout")
        }

        fn new() -> Result<Self, String> {
            // SAFETY: the layout has a non-zero size.
            let entries = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
            if entries.is_null() {
                return Err("buffer ring: out of memory".into());
            }
            let mut ring = Self {
                entries: entries.cast(),
                bufs: vec![0u8; usize::from(LENT) * RECV_BUF],
                tail: 0,
            };
            for bid in 0..LENT {
                ring.lend(bid);
            }
            Ok(ring)
        }

        /// Gives buffer `bid` (back) to the kernel.
        fn lend(&mut self, bid: u16) {
            let slot = usize::from(self.tail & (LENT - 1));
            // SAFETY: `slot` < LENT entries; `bid` < LENT, so its buffer lies inside `bufs`,
            // which lives as long as the ring. The tail is published after the entry is
            // written (release), as the kernel reads entries up to the tail.
            unsafe {
                let e = &mut *self.entries.add(slot);
                e.set_addr(self.bufs.as_ptr().add(usize::from(bid) * RECV_BUF) as u64);
                e.set_len(RECV_BUF as u32);
                e.set_bid(bid);
                self.tail = self.tail.wrapping_add(1);
                let tail = types::BufRingEntry::tail(self.entries).cast_mut();
                (*(tail as *const std::sync::atomic::AtomicU16))
                    .store(self.tail, Ordering::Release);
            }
        }

        fn buf(&self, bid: u16, n: usize) -> &[u8] {
            let at = usize::from(bid) * RECV_BUF;
            &self.bufs[at..at + n.min(RECV_BUF)]
        }
    }

    impl Drop for BufRing {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout; dropped after the io_uring that
            // used it (declared before it in `read_multishot`).
            unsafe { std::alloc::dealloc(self.entries.cast(), Self::layout()) }
        }
    }

    /// How receives are armed on a socket and where their bytes land.
    trait Receives {
        /// The receive to arm on socket `i`.
        fn entry(&self, fd: types::Fd, i: usize) -> squeue::Entry;
        /// The `n` bytes a completion on socket `i` brought.
        fn bytes(&self, i: usize, n: usize, flags: u32) -> Result<&[u8], String>;
        /// Those bytes are read; whether socket `i` needs its receive armed again.
        fn consumed(&mut self, i: usize, flags: u32) -> bool;
    }

    /// One receive armed per socket at a time, into that socket's own slice of `bufs`.
    struct Armed {
        /// Written by the kernel through `base` only: kept, never touched from Rust.
        _bufs: Vec<u8>,
        base: *mut u8,
    }

    impl Armed {
        fn new(sockets: usize) -> Self {
            let mut bufs = vec![0u8; sockets * RECV_BUF];
            let base = bufs.as_mut_ptr();
            Self { _bufs: bufs, base }
        }
    }

    impl Receives for Armed {
        fn entry(&self, fd: types::Fd, i: usize) -> squeue::Entry {
            // SAFETY: socket i's slice lies inside the buffers, which outlive the ring; one
            // receive per socket is in flight at a time.
            let at = unsafe { self.base.add(i * RECV_BUF) };
            opcode::Recv::new(fd, at, RECV_BUF as u32).build()
        }

        fn bytes(&self, i: usize, n: usize, _flags: u32) -> Result<&[u8], String> {
            // SAFETY: the kernel wrote `n` (≤ RECV_BUF) bytes into socket i's slice, and its
            // receive has completed, so nothing writes there until it is armed again.
            Ok(unsafe { std::slice::from_raw_parts(self.base.add(i * RECV_BUF), n.min(RECV_BUF)) })
        }

        fn consumed(&mut self, _i: usize, _flags: u32) -> bool {
            true
        }
    }

    /// One multishot receive per socket, into buffers lent through a provided-buffer ring;
    /// armed again only when the kernel ends it (e.g. when it ran out of buffers).
    impl Receives for BufRing {
        fn entry(&self, fd: types::Fd, _i: usize) -> squeue::Entry {
            opcode::RecvMulti::new(fd, GROUP).build()
        }

        fn bytes(&self, _i: usize, n: usize, flags: u32) -> Result<&[u8], String> {
            let bid = io_uring::cqueue::buffer_select(flags)
                .ok_or("a receive completed without a buffer")?;
            Ok(self.buf(bid, n))
        }

        fn consumed(&mut self, _i: usize, flags: u32) -> bool {
            if let Some(bid) = io_uring::cqueue::buffer_select(flags) {
                self.lend(bid);
            }
            !io_uring::cqueue::more(flags)
        }
    }

    /// Keeps one receive in flight on every socket until `progress` says the reader is done.
    pub fn read_loop(
        args: &FloorReaderArgs,
        streams: &[TcpStream],
        parts: &mut [Partial],
        hist: &mut Histogram<u64>,
        deadline: Instant,
    ) -> Result<(), String> {
        // Declared before the ring, so that the ring (with what it still has in flight) is
        // dropped first.
        let mut armed = Armed::new(streams.len());
        let ring = IoUring::new(ENTRIES).map_err(|e| e.to_string())?;
        receive(ring, &mut armed, args, streams, parts, hist, deadline)
    }

    /// Keeps one multishot receive on every socket until `progress` says the reader is done.
    pub fn read_multishot(
        args: &FloorReaderArgs,
        streams: &[TcpStream],
        parts: &mut [Partial],
        hist: &mut Histogram<u64>,
        deadline: Instant,
    ) -> Result<(), String> {
        // Declared before the ring: the ring is dropped first.
        let mut lent = BufRing::new()?;
        let ring = IoUring::new(ENTRIES).map_err(|e| e.to_string())?;
        // SAFETY: the entries stay allocated until `lent` drops, after `ring`.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(lent.entries as u64, LENT, GROUP, 0)
        }
        .map_err(|e| format!("register buffer ring: {e}"))?;
        receive(ring, &mut lent, args, streams, parts, hist, deadline)
    }

    /// The reading loop of both: arms what needs arming (and a timeout, so the deadline is
    /// checked), waits, and hands each completion's bytes to `progress`.
    fn receive(
        mut ring: IoUring,
        recv: &mut impl Receives,
        args: &FloorReaderArgs,
        streams: &[TcpStream],
        parts: &mut [Partial],
        hist: &mut Histogram<u64>,
        deadline: Instant,
    ) -> Result<(), String> {
        let tick = types::Timespec::new().nsec(100_000_000);
        let fds: Vec<_> = streams.iter().map(|s| types::Fd(s.as_raw_fd())).collect();
        let mut to_arm: VecDeque<usize> = (0..streams.len()).collect();
        let mut tick_armed = false;
        let mut progress = Progress::new(parts.len());
        while !progress.done(parts.len(), deadline) {
            {
                let mut sq = ring.submission();
                if !tick_armed && !sq.is_full() {
                    let t = opcode::Timeout::new(&tick).build().user_data(TICK);
                    // SAFETY: `tick` outlives the ring, which this function drops.
                    unsafe { sq.push(&t) }.map_err(|_| "submission queue full".to_string())?;
                    tick_armed = true;
                }
                while let Some(&i) = to_arm.front() {
                    if sq.is_full() {
                        break;
                    }
                    let entry = recv.entry(fds[i], i).user_data(i as u64);
                    // SAFETY: the receive writes only into memory `recv` keeps for it, which
                    // outlives the ring (see `Receives`' two kinds).
                    unsafe { sq.push(&entry) }.map_err(|_| "submission queue full".to_string())?;
                    to_arm.pop_front();
                }
            }
            ring.submit_and_wait(1).map_err(|e| e.to_string())?;
            pause_if_few(&mut ring, args);
            for cqe in ring.completion() {
                if cqe.user_data() == TICK {
                    tick_armed = false;
                    continue;
                }
                let i = cqe.user_data() as usize;
                let Some(p) = parts.get_mut(i) else { continue };
                let flags = cqe.flags();
                match cqe.result() {
                    0 => progress.ended(p),
                    n if n > 0 => {
                        progress.read(p, recv.bytes(i, n as usize, flags)?, args, hist);
                        if recv.consumed(i, flags) {
                            to_arm.push_back(i);
                        }
                    }
                    e if e == -libc::ENOBUFS || e == -libc::EINTR || e == -libc::EAGAIN => {
                        to_arm.push_back(i)
                    }
                    e => return Err(format!("recv: {}", std::io::Error::from_raw_os_error(-e))),
                }
            }
        }
        Ok(())
    }
}

/// Splits `bytes` into the socket's fixed-size frames, recording each completed frame's
/// latency (µs) from the stamp in its first eight bytes.
fn take(p: &mut Partial, mut bytes: &[u8], frame: usize, now_ns: u64, hist: &mut Histogram<u64>) {
    while !bytes.is_empty() {
        if p.have < 8 {
            let n = (8 - p.have).min(bytes.len());
            p.stamp[p.have..p.have + n].copy_from_slice(&bytes[..n]);
            p.have += n;
            bytes = &bytes[n..];
            continue;
        }
        let n = (frame - p.have).min(bytes.len());
        p.have += n;
        bytes = &bytes[n..];
        if p.have == frame {
            let sent = u64::from_le_bytes(p.stamp);
            hist.saturating_record(now_ns.saturating_sub(sent).div_ceil(1000).max(1));
            p.frames += 1;
            p.have = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial() -> Partial {
        Partial::default()
    }

    fn frame(sent_ns: u64, len: usize) -> Vec<u8> {
        let mut f = vec![b'x'; len];
        f[..8].copy_from_slice(&sent_ns.to_le_bytes());
        f
    }

    #[test]
    fn frames_split_anywhere_are_each_timed_once() {
        let mut bytes = frame(1_000_000, 20);
        bytes.extend(frame(2_000_000, 20));
        bytes.extend(frame(2_400_000, 20));
        let mut p = partial();
        let mut hist = Histogram::<u64>::new(3).expect("hist");
        // Cut inside the first stamp, inside the second frame's body, and inside the third's stamp.
        for chunk in [&bytes[..3], &bytes[3..31], &bytes[31..44], &bytes[44..]] {
            take(&mut p, chunk, 20, 2_500_000, &mut hist);
        }
        assert_eq!(p.frames, 3);
        assert_eq!(hist.len(), 3);
        // (Below 2,048 the histogram holds values exactly.)
        assert_eq!(hist.max(), 1_500, "sent at 1 ms, read at 2.5 ms");
        assert_eq!(hist.min(), 100);
        assert_eq!(p.have, 0);
    }

    /// A reader on its own thread; the test plays the senders.
    /// Whether this kernel lets the process use io_uring (some sandboxes refuse it). Where it
    /// does not, the tests check that the `uring` paths fail with an error instead.
    fn uring_here() -> bool {
        io_uring::IoUring::new(8).is_ok()
    }

    fn run_reader(
        io: FloorIo,
        read_pause_us: u64,
        sockets: usize,
        frames_each: u64,
        send: impl FnOnce(Vec<TcpStream>),
    ) -> Result<ReaderReport, String> {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let args = FloorReaderArgs {
            connect: l.local_addr().expect("addr"),
            sockets,
            frames_each,
            frame_bytes: 100,
            deadline: 20,
            both: BothEnds {
                congestion: None,
                io,
                read_pause_us,
            },
            index: 3,
            cpu: None,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || read_all(&args, || tx.send(()).expect("ready")));
        let ends: Vec<TcpStream> = (0..sockets)
            .map(|_| {
                let mut end = l.accept().expect("accept").0;
                let mut index = [0u8];
                end.read_exact(&mut index).expect("index");
                assert_eq!(index, [3], "each socket says its reader's index first");
                end
            })
            .collect();
        // No "ready": the reader failed before reading (its error is returned).
        if rx.recv().is_ok() {
            send(ends);
        }
        reader.join().expect("reader thread")
    }

    /// Each way of reading, with what it must give: a report, or (io_uring refused) an error.
    fn check_each_io(
        sockets: usize,
        frames_each: u64,
        send: impl Fn(Vec<TcpStream>),
        check: impl Fn(FloorIo, ReaderReport),
    ) {
        for io in [FloorIo::Syscalls, FloorIo::Uring, FloorIo::UringMultishot] {
            // With and without the pause between waits.
            for pause_us in [0, 500] {
                let got = run_reader(io, pause_us, sockets, frames_each, &send);
                match got {
                    Ok(report) => check(io, report),
                    Err(e) => assert!(
                        io != FloorIo::Syscalls && !uring_here(),
                        "{io:?} failed where it should work: {e}"
                    ),
                }
            }
        }
    }

    #[test]
    fn every_frame_of_every_socket_is_read_and_timed() {
        check_each_io(
            5,
            3,
            |mut ends| {
                for _ in 0..3 {
                    for e in &mut ends {
                        e.write_all(&frame(unix_ns(), 100)).expect("write");
                    }
                }
            },
            |io, report| {
                assert_eq!(report.frames, 15, "{io:?}");
                assert_eq!(report.short_sockets, 0, "{io:?}");
                assert_eq!(report.hist.len(), 15, "{io:?}");
            },
        );
    }

    #[test]
    fn io_uring_sends_reach_every_socket_once_per_tick() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let clients: Vec<TcpStream> = (0..6)
            .map(|_| TcpStream::connect(l.local_addr().expect("addr")).expect("connect"))
            .collect();
        let ends: Vec<TcpStream> = (0..6).map(|_| l.accept().expect("accept").0).collect();
        let start = Barrier::new(1);
        let stamp = std::sync::atomic::AtomicU64::new(7);
        let sent = uring::send_ticks(&ends, 2, &start, &stamp, 16);
        if !uring_here() {
            assert!(
                sent.is_err(),
                "io_uring refused here, yet the sends succeeded"
            );
            return;
        }
        sent.expect("sends");
        drop(ends);
        for mut c in clients {
            let mut got = Vec::new();
            c.read_to_end(&mut got).expect("read");
            assert_eq!(got.len(), 32);
            assert_eq!(
                u64::from_le_bytes(got[16..24].try_into().expect("8 bytes")),
                7
            );
        }
    }

    #[test]
    fn a_reader_is_handed_the_options_both_ends_take() {
        #[derive(clap::Parser)]
        struct Reader {
            #[command(flatten)]
            args: FloorReaderArgs,
        }
        let given = BothEnds {
            congestion: Some("reno".into()),
            io: FloorIo::UringMultishot,
            read_pause_us: 500,
        };
        let mut line: Vec<String> = ["reader", "--connect", "127.0.0.1:9", "--sockets", "1"]
            .into_iter()
            .chain([
                "--frames-each",
                "1",
                "--frame-bytes",
                "8",
                "--deadline",
                "1",
            ])
            .map(String::from)
            .collect();
        line.extend(given.as_args());
        let got = <Reader as clap::Parser>::try_parse_from(line)
            .expect("parses")
            .args
            .both;
        assert_eq!(got.congestion.as_deref(), Some("reno"));
        assert_eq!(got.io, FloorIo::UringMultishot);
        assert_eq!(got.read_pause_us, 500);
    }

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_only() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let last = cpus - 1;
        let ran_on = std::thread::spawn(move || {
            pin_to(last).expect("pin");
            (0..50)
                .map(|_| {
                    std::thread::yield_now();
                    // SAFETY: no arguments; returns the CPU this thread runs on.
                    unsafe { libc::sched_getcpu() }
                })
                .collect::<Vec<_>>()
        })
        .join()
        .expect("thread");
        assert!(ran_on.iter().all(|&c| c == last as i32), "{ran_on:?}");
        assert!(pin_to(libc::CPU_SETSIZE as usize).is_err());
    }

    #[test]
    fn a_socket_that_ends_early_is_counted_short() {
        check_each_io(
            3,
            2,
            |mut ends| {
                for (i, e) in ends.iter_mut().enumerate() {
                    let frames = if i == 1 { 1 } else { 2 };
                    for _ in 0..frames {
                        e.write_all(&frame(unix_ns(), 100)).expect("write");
                    }
                }
                // Dropped here: every socket ends, one of them a frame short.
            },
            |io, report| {
                assert_eq!(report.frames, 5, "{io:?}");
                assert_eq!(report.short_sockets, 1, "{io:?}");
            },
        );
    }
}
