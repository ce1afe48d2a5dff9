//! sendmsg/recvmsg with SCM_RIGHTS ancillary data on Unix stream sockets.
//!
//! Two kernel behaviours matter to the callers:
//!
//! * On a stream socket the fds of one sendmsg(2) are attached to the first
//!   skb of that call's data, and a recvmsg(2) that collects fds stops right
//!   after that skb. So fds never arrive together with data sent *after*
//!   that skb, but the same read may begin with bytes of earlier sendmsgs
//!   that carried none: a reader knows the byte range the fds came in, not
//!   where their sendmsg began (pbus_proto's frame module has the rule
//!   built on that).
//! * If the receiver's control buffer is too small the kernel sets
//!   MSG_CTRUNC and closes the fds that did not fit. The message's fds are
//!   then incomplete and cannot be matched to what the sender meant, so
//!   callers must treat MSG_CTRUNC as a protocol violation and disconnect.
//!
//! All calls here are non-blocking (MSG_DONTWAIT) and never raise SIGPIPE
//! (MSG_NOSIGNAL); received fds are close-on-exec (MSG_CMSG_CLOEXEC).

use std::io::{self, IoSlice};
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::check_size;

/// The kernel's hard limit on fds in one SCM_RIGHTS message (`SCM_MAX_FD`).
pub const MAX_FDS_PER_MESSAGE: usize = 253;

/// Room for one control message carrying `MAX_FDS_PER_MESSAGE` fds, as
/// `u64`s so the buffer is aligned for `cmsghdr`.
const CMSG_BUFFER_WORDS: usize = (MAX_FDS_PER_MESSAGE * size_of::<RawFd>()) / 8 + 8;

/// What one [`recv_with_fds`] call returned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// Data bytes read into the buffer; 0 means end of stream.
    pub bytes: usize,
    /// Fds appended to the caller's vector by this call.
    pub fds: usize,
    /// Number of SCM_RIGHTS control messages seen (more than one is a
    /// violation: see `pbus_proto::frame::check_ancillary`).
    pub rights_sets: usize,
    /// MSG_CTRUNC: the kernel dropped fds that did not fit. Always a violation.
    pub control_truncated: bool,
}

/// Reads from a non-blocking stream socket, collecting any passed fds.
///
/// Fds are appended to `fds` as owned, close-on-exec descriptors, so even on
/// MSG_CTRUNC the ones that did arrive are closed when dropped. `buffer` may
/// be empty only if the caller expects nothing (it then reports 0 bytes).
/// Returns `WouldBlock` when nothing is available.
pub fn recv_with_fds(
    socket: impl AsFd,
    buffer: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    recv_with_fds_limited(socket, buffer, fds, MAX_FDS_PER_MESSAGE)
}

/// Like [`recv_with_fds`] but with room for only `max_fds` fds in the control
/// buffer; more than that sets `control_truncated`. Used by tests to provoke
/// MSG_CTRUNC and by receivers that want a lower bound than the kernel's.
pub fn recv_with_fds_limited(
    socket: impl AsFd,
    buffer: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    max_fds: usize,
) -> io::Result<Received> {
    let max_fds = max_fds.min(MAX_FDS_PER_MESSAGE);
    // Not zeroed: the kernel writes the control data and reports its length
    // in msg_controllen; only that much is ever read (CMSG_FIRSTHDR/NXTHDR
    // stay inside it). This buffer is on every read's path.
    let mut control = MaybeUninit::<[u64; CMSG_BUFFER_WORDS]>::uninit();
    // SAFETY: CMSG_SPACE is a pure size computation.
    let control_len = if max_fds == 0 {
        0
    } else {
        unsafe { libc::CMSG_SPACE((max_fds * size_of::<RawFd>()) as u32) as usize }
    };
    debug_assert!(control_len <= size_of::<[u64; CMSG_BUFFER_WORDS]>());
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid "no name, no control".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if control_len > 0 {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control_len;
    }
    // SAFETY: `msg` points at a live iovec over `buffer` and a control buffer
    // of `msg_controllen` bytes; both outlive the call.
    let bytes = check_size(unsafe {
        libc::recvmsg(
            socket.as_fd().as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    })?;
    let mut received = Received {
        bytes,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        ..Received::default()
    };
    if control_len == 0 {
        return Ok(received);
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR stay inside
    // `msg_control[..msg_controllen]` and return null past the end.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null cmsg pointers from CMSG_*HDR point at a complete
        // cmsghdr inside the control buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            received.rights_sets += 1;
            // SAFETY: pure size computation.
            let payload_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = payload_len / size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `payload_len` bytes of fd numbers.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for index in 0..count {
                // SAFETY: index < count keeps the read inside the payload;
                // the data may be unaligned.
                let raw = unsafe { data.add(index).read_unaligned() };
                // SAFETY: SCM_RIGHTS installed this fd in our table for us;
                // we are its only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                received.fds += 1;
            }
        }
        // SAFETY: see CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(received)
}

/// Writes `data` to a non-blocking stream socket with `fds` attached as one
/// SCM_RIGHTS set (none when `fds` is empty).
///
/// Returns the number of bytes written, which may be less than the total;
/// the fds are attached to the first byte, so a caller that resumes a
/// partial write must not send them again. Returns `WouldBlock` when the
/// socket buffer is full (nothing was written, fds not sent).
pub fn send_with_fds(
    socket: impl AsFd,
    data: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 253 fds in one message",
        ));
    }
    let mut control = MaybeUninit::<[u64; CMSG_BUFFER_WORDS]>::uninit();
    // SAFETY: msghdr is plain data; zeroed is a valid "no name, no control".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = data.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = data.len();
    if !fds.is_empty() {
        let payload = (fds.len() * size_of::<RawFd>()) as u32;
        // SAFETY: pure size computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        // SAFETY: `space` bytes fit in the buffer (at most 253 fds); zeroing
        // them makes every byte the kernel reads (padding included) defined.
        unsafe { control.as_mut_ptr().cast::<u8>().write_bytes(0, space) };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds `space` bytes, enough for one
        // cmsghdr with `payload` bytes of data, so FIRSTHDR is non-null and
        // the writes below stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            let out = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (index, fd) in fds.iter().enumerate() {
                out.add(index).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: IoSlice is guaranteed ABI-compatible with iovec; `msg` points
    // at live buffers for the duration of the call.
    check_size(unsafe {
        libc::sendmsg(
            socket.as_fd().as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Bytes this socket has sent that its peer has not read yet (`SIOCOUTQ`;
/// on a Unix socket the kernel counts the memory of the unread buffers,
/// so only zero is exact: zero means the peer has read everything sent so
/// far, and with it every fd passed so far).
pub fn unread_by_peer(socket: impl AsFd) -> io::Result<usize> {
    let mut pending: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int to the pointer, which
    // points at a live, writable int.
    crate::check(unsafe {
        libc::ioctl(
            socket.as_fd().as_raw_fd(),
            libc::TIOCOUTQ,
            &mut pending as *mut libc::c_int,
        )
    })?;
    Ok(usize::try_from(pending).unwrap_or(0))
}

/// True when a failed [`send_with_fds`] means the kernel refused the fds
/// rather than the socket having failed: `ETOOMANYREFS`, the per-user limit
/// on fds in flight (fds sent and not yet received count against the
/// sender's user, up to its RLIMIT_NOFILE, unless it has CAP_SYS_RESOURCE).
/// The same sendmsg without those fds would have gone through.
pub fn is_fd_refusal(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::ETOOMANYREFS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn fds_travel_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut pipe_r, mut pipe_w) = {
            let (r, w) = std::io::pipe().unwrap();
            (r, w)
        };
        let sent = send_with_fds(&a, &[IoSlice::new(b"hello")], &[pipe_w.as_fd()]).unwrap();
        assert_eq!(sent, 5);
        send_with_fds(&a, &[IoSlice::new(b"world")], &[]).unwrap();
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let got = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..got.bytes], b"hello");
        assert_eq!(got.fds, 1);
        assert_eq!(got.rights_sets, 1);
        assert!(!got.control_truncated);
        let got = recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..got.bytes], b"world");
        assert_eq!(got.fds, 0);
        let mut passed = std::fs::File::from(fds.remove(0));
        passed.write_all(b"via fd").unwrap();
        drop(passed);
        drop(pipe_w.flush());
        drop(pipe_w);
        let mut text = String::new();
        pipe_r.read_to_string(&mut text).unwrap();
        assert_eq!(text, "via fd");
    }

    #[test]
    fn too_small_control_buffer_reports_truncation_and_closes_nothing_twice() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..4)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        send_with_fds(&a, &[IoSlice::new(b"x")], &borrowed).unwrap();
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        let got = recv_with_fds_limited(&b, &mut buf, &mut fds, 2).unwrap();
        assert!(got.control_truncated);
        assert!(got.fds <= 2);
    }

    #[test]
    fn unread_bytes_drop_to_zero_once_read() {
        let (a, b) = UnixStream::pair().unwrap();
        assert_eq!(unread_by_peer(&a).unwrap(), 0);
        send_with_fds(&a, &[IoSlice::new(b"pending")], &[]).unwrap();
        assert!(unread_by_peer(&a).unwrap() > 0);
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        recv_with_fds(&b, &mut buf, &mut fds).unwrap();
        assert_eq!(unread_by_peer(&a).unwrap(), 0);
    }

    #[test]
    fn would_block_when_empty() {
        let (_a, b) = UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        let mut fds = Vec::new();
        let err = recv_with_fds(&b, &mut buf, &mut fds).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }
}
