//! The kernel's receive timestamp of a TCP read (`SO_TIMESTAMPNS`).
//!
//! Why: fanout's latency is taken when the generator parses a frame, so it includes the
//! generator's own queue on the cores it shares with the server. The kernel stamps each
//! packet as it enters the receive path; on loopback that is inside the server's `send`.
//! A read returns the stamp of the last packet it consumed, so a frame that arrived with an
//! earlier packet of the same read gets a later (never an earlier) arrival: the arrival
//! latency can only be overstated. The clock is `CLOCK_REALTIME`, the clock of the send
//! stamps in the payloads (`workers::unix_ns`).

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::RawFd;

/// Asks the kernel to stamp what `fd` receives.
pub fn enable(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `on` outlives the call and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Room for one `SCM_TIMESTAMPNS` message (a `cmsghdr` and a `timespec`), 8-byte aligned.
type ControlBuf = [u64; 8];

/// One `recvmsg` into `buf`: the bytes read and, when the kernel stamped them, the arrival
/// time of the last of them in nanoseconds since the Unix epoch.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u64>)> {
    let mut control = MaybeUninit::<ControlBuf>::zeroed();
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero `msghdr` is valid (no name, no buffers).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<ControlBuf>();
    // SAFETY: `iov` points into `buf` and `msg_control` into `control`, both alive and as
    // long as the lengths given; the kernel writes at most those lengths.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n as usize, stamp_of(&msg)))
}

/// The `SCM_TIMESTAMPNS` control message the kernel left in `msg`, if any.
fn stamp_of(msg: &libc::msghdr) -> Option<u64> {
    // SAFETY: `msg` was filled by `recvmsg`; the CMSG macros stay within `msg_controllen`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                let ns = u64::try_from(ts.tv_sec).ok()? * 1_000_000_000
                    + u64::try_from(ts.tv_nsec).ok()?;
                return (ns > 0).then_some(ns);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::unix_ns;
    use std::io::Write as _;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        (a, b)
    }

    #[test]
    fn a_stamped_read_carries_the_time_the_bytes_arrived() {
        let (mut tx, rx) = pair();
        enable(rx.as_raw_fd()).expect("SO_TIMESTAMPNS");
        let before = unix_ns();
        tx.write_all(b"hello").expect("write");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut buf = [0u8; 64];
        let (n, stamp) = recv(rx.as_raw_fd(), &mut buf).expect("recv");
        let read_at = unix_ns();
        assert_eq!(&buf[..n], b"hello");
        let arrived = stamp.expect("the kernel stamped the read");
        assert!(arrived >= before, "{arrived} < {before}");
        // The bytes waited ~30 ms in the socket: the stamp is their arrival, not the read.
        assert!(read_at - arrived >= 25_000_000, "{}", read_at - arrived);
    }

    #[test]
    fn without_the_option_a_read_has_no_stamp() {
        let (mut tx, rx) = pair();
        tx.write_all(b"x").expect("write");
        let mut buf = [0u8; 8];
        let mut got = 0;
        let mut stamp = Some(0);
        while got == 0 {
            (got, stamp) = recv(rx.as_raw_fd(), &mut buf).expect("recv");
        }
        assert_eq!(stamp, None);
    }
}
