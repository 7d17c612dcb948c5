//! `switchboard-bench probe`: what this machine's kernel charges for the two things every
//! scenario is built on, measured without Switchboard.
//!
//! - A 64-byte `write` to a loopback TCP socket with `TCP_NODELAY`, a reader thread draining
//!   the other end: the floor of one delivery (one send per frame per socket). The same
//!   measurement as `../shared/reference/performance.md` §1 (2.30 µs on the machine it names).
//! - The same write spread over many sockets (a fan-out's shape: one write to each socket in
//!   turn, the reader draining them from one epoll loop): what a delivery costs the kernel
//!   once the sockets no longer fit in the caches.
//! - A 4 KiB `pwrite` + `fdatasync` in the temporary directory (where the bench's servers keep
//!   their databases): the floor of one durable commit.
//!
//! Both take about a second. `make bench` runs it before and after the scenarios, because this
//! VM's speed changes from minute to minute; the JSON line goes into the results' `host`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

#[derive(Args, Clone, Debug)]
pub struct ProbeArgs {
    /// Writes per loopback round (three rounds).
    #[arg(long, default_value_t = 100_000)]
    pub writes: u32,
    /// Socket pairs of the fan-out round (two descriptors each; this process may open 20,000).
    #[arg(long, default_value_t = 5_000)]
    pub sockets: u32,
    /// `pwrite` + `fdatasync` pairs.
    #[arg(long, default_value_t = 200)]
    pub syncs: u32,
    /// Directory for the fsync file (default: the temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub fn main(args: &ProbeArgs) -> Result<(), String> {
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut rounds = Vec::new();
    for _ in 0..3 {
        rounds.push(loopback_write_us(args.writes).map_err(|e| format!("loopback write: {e}"))?);
    }
    let spread = loopback_fanout_us(args.sockets, (args.writes / args.sockets.max(1)).max(1))
        .map_err(|e| format!("loopback fan-out: {e}"))?;
    let sync = fdatasync_us(&dir, args.syncs)
        .map_err(|e| format!("fdatasync in {}: {e}", dir.display()))?;
    let rounded: Vec<f64> = rounds.iter().map(|v| round2(*v)).collect();
    println!("loopback 64 B write, TCP_NODELAY (µs, 3 rounds)  {rounded:?}");
    println!(
        "the same over {} sockets in turn (µs)            {}",
        args.sockets,
        round2(spread)
    );
    println!(
        "4 KiB pwrite + fdatasync p50 / p99 / max (µs)    {} / {} / {}",
        sync.value_at_quantile(0.5),
        sync.value_at_quantile(0.99),
        sync.max()
    );
    println!(
        "{}",
        json!({
            "scenario": "probe",
            "loopback_write_us": rounded,
            "loopback_fanout_us": round2(spread),
            "fanout_sockets": args.sockets,
            "fdatasync_us": {
                "p50": sync.value_at_quantile(0.5),
                "p99": sync.value_at_quantile(0.99),
                "max": sync.max(),
            },
        })
    );
    Ok(())
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Mean wall-clock µs per 64-byte write over `count` writes, the reader on its own thread.
pub fn loopback_write_us(count: u32) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let writer = TcpStream::connect(listener.local_addr()?)?;
    let (mut reader, _) = listener.accept()?;
    writer.set_nodelay(true)?;
    let expected = u64::from(count) * 64;
    let drain = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        loop {
            match reader.read(&mut buf)? {
                0 => return Ok(got),
                n => got += n as u64,
            }
        }
    });
    timed_writes(vec![writer], count, drain, expected)
}

/// Mean wall-clock µs per 64-byte write when `pairs` sockets are written in turn, `rounds`
/// times each, while one thread reads them all from an edge-triggered epoll loop.
pub fn loopback_fanout_us(pairs: u32, rounds: u32) -> std::io::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(pairs as usize);
    let mut readers = Vec::with_capacity(pairs as usize);
    for _ in 0..pairs {
        let w = TcpStream::connect(addr)?;
        let (r, _) = listener.accept()?;
        r.set_nonblocking(true)?;
        writers.push(w);
        readers.push(mio::net::TcpStream::from_std(r));
    }
    let expected = u64::from(pairs) * u64::from(rounds) * 64;
    let drain = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut poll = mio::Poll::new()?;
        for (i, r) in readers.iter_mut().enumerate() {
            poll.registry()
                .register(r, mio::Token(i), mio::Interest::READABLE)?;
        }
        let mut events = mio::Events::with_capacity(1024);
        let mut buf = vec![0u8; 64 * 1024];
        let (mut got, mut open) = (0u64, readers.len());
        // A socket at its end can be reported again (a hang-up after the read side closed):
        // each is counted closed once.
        let mut closed = vec![false; readers.len()];
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while open > 0 && Instant::now() < deadline {
            poll.poll(&mut events, Some(std::time::Duration::from_millis(100)))?;
            for ev in &events {
                let i = ev.token().0;
                let Some(r) = readers.get_mut(i).filter(|_| !closed[i]) else {
                    continue;
                };
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => {
                            closed[i] = true;
                            open -= 1;
                            break;
                        }
                        Ok(n) => got += n as u64,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(got)
    });
    timed_writes(writers, rounds, drain, expected)
}

/// Writes 64 bytes to each socket in turn, `rounds` times, then closes them and waits for
/// the reader to count every byte: mean wall-clock µs per write.
fn timed_writes(
    mut writers: Vec<TcpStream>,
    rounds: u32,
    drain: std::thread::JoinHandle<std::io::Result<u64>>,
    expected: u64,
) -> std::io::Result<f64> {
    let frame = [b'x'; 64];
    let started = Instant::now();
    for _ in 0..rounds {
        for w in &mut writers {
            w.write_all(&frame)?;
        }
    }
    let elapsed = started.elapsed();
    let writes = writers.len() as f64 * f64::from(rounds);
    drop(writers);
    let got = drain
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))??;
    if got != expected {
        return Err(std::io::Error::other(format!(
            "reader got {got} bytes of {expected}"
        )));
    }
    Ok(elapsed.as_secs_f64() * 1e6 / writes.max(1.0))
}

/// µs per 4 KiB `pwrite` at a rotating offset followed by `fdatasync`, as a histogram.
pub fn fdatasync_us(dir: &Path, count: u32) -> Result<Histogram<u64>, String> {
    let file = tempfile::Builder::new()
        .prefix("switchboard-probe")
        .tempfile_in(dir)
        .map_err(|e| e.to_string())?;
    let f = OpenOptions::new()
        .write(true)
        .open(file.path())
        .map_err(|e| e.to_string())?;
    let page = [7u8; 4096];
    let mut hist = Histogram::<u64>::new(3).map_err(|e| e.to_string())?;
    for i in 0..u64::from(count) {
        let started = Instant::now();
        f.write_all_at(&page, (i % 16) * 4096)
            .map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        hist.record(started.elapsed().as_micros().max(1) as u64)
            .map_err(|e| e.to_string())?;
    }
    Ok(hist)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_writes_all_arrive_and_take_time() {
        let us = loopback_write_us(2_000).expect("loopback probe");
        assert!(us.is_finite() && us > 0.0, "{us}");
    }

    #[test]
    fn fanned_out_writes_all_arrive() {
        let us = loopback_fanout_us(50, 20).expect("fan-out probe");
        assert!(us.is_finite() && us > 0.0, "{us}");
    }

    #[test]
    fn every_fdatasync_is_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hist = fdatasync_us(dir.path(), 5).expect("fsync probe");
        assert_eq!(hist.len(), 5);
        assert!(hist.min() >= 1);
    }
}
