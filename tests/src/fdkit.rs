//! Real kernel objects for fd-passing tests, and ways to prove what
//! happened to them.
//!
//! * [`FdBundle`]: one pipe, one socketpair, one regular file and one
//!   memfd. The test sends one end of each and keeps the other, then checks
//!   that the receiver really wrote and read through them.
//! * [`use_received_fd`]: what a receiver does with such an fd: it finds
//!   out what the fd is (from `fstat` and `/proc/self/fd`), reads what the
//!   sender put there and writes a token back.
//! * [`PipeProbe`]: a pipe whose write end is sent. While any copy of the
//!   write end is open (the receiver's, or one the daemon kept) the read
//!   end reports "open"; once every copy is closed it reads EOF. That is how
//!   a test proves that the daemon and the receiver let go of an fd.
//! * [`memfd_with`] and friends: memfds sealed exactly as a test wants,
//!   including wrongly, and a regular file to pass off as one.
//!
//! Nothing here knows about the bus.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};
use pbus_sys::memfd::{add_seals, memfd_create, seal};

use crate::TIMEOUT;

/// What the socket end of an [`FdBundle`] has waiting for the receiver.
pub const SOCKET_GREETING: &[u8] = b"hello through the socket";
/// What the regular file of an [`FdBundle`] holds.
pub const FILE_CONTENT: &[u8] = b"content of the regular file\n";
/// What the memfd of an [`FdBundle`] holds.
pub const MEMFD_CONTENT: &[u8] = b"content of the memfd\n";

/// What an fd refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A pipe (either end).
    Pipe,
    /// A socket.
    Socket,
    /// A regular file that is not a memfd.
    File,
    /// A memfd.
    Memfd,
    /// Anything else.
    Other,
}

/// Finds out what `fd` refers to.
pub fn fd_kind(fd: BorrowedFd<'_>) -> FdKind {
    let stat = fstat(fd).expect("fstat a received fd");
    let format = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if format == SFlag::S_IFIFO {
        FdKind::Pipe
    } else if format == SFlag::S_IFSOCK {
        FdKind::Socket
    } else if format == SFlag::S_IFREG {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .expect("readlink /proc/self/fd/N");
        if link.to_string_lossy().starts_with("/memfd:") {
            FdKind::Memfd
        } else {
            FdKind::File
        }
    } else {
        FdKind::Other
    }
}

/// True if `a` and `b` are the same open file object's inode (same device
/// and inode number): a passed fd that arrives is the sender's file, not a
/// copy.
pub fn same_inode(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    let a = fstat(a).expect("fstat");
    let b = fstat(b).expect("fstat");
    (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
}

/// What a receiver does with a received fd, by its kind: writes `token`
/// into a pipe; reads the greeting from a socket and answers `token`;
/// reads a file's or memfd's whole content and appends `token`. Returns
/// the kind and what it read.
pub fn use_received_fd(fd: BorrowedFd<'_>, token: &str) -> io::Result<(FdKind, Vec<u8>)> {
    let kind = fd_kind(fd);
    let owned = fd.try_clone_to_owned()?;
    let mut read = Vec::new();
    match kind {
        FdKind::Pipe => File::from(owned).write_all(token.as_bytes())?,
        FdKind::Socket => {
            let mut socket = UnixStream::from(owned);
            socket.set_read_timeout(Some(TIMEOUT))?;
            read.resize(SOCKET_GREETING.len(), 0);
            socket.read_exact(&mut read)?;
            socket.write_all(token.as_bytes())?;
        }
        FdKind::File | FdKind::Memfd => {
            let file = File::from(owned);
            let len = file.metadata()?.len();
            read.resize(usize::try_from(len).expect("small file"), 0);
            file.read_exact_at(&mut read, 0)?;
            file.write_all_at(token.as_bytes(), len)?;
        }
        FdKind::Other => {
            return Err(io::Error::other("received an fd of an unexpected kind"));
        }
    }
    Ok((kind, read))
}

/// One pipe, one socketpair, one regular file and one memfd: the test
/// keeps one side of each, [`FdBundle::new`] returns the fds to send.
#[derive(Debug)]
pub struct FdBundle {
    pipe: PipeProbe,
    socket: UnixStream,
    file: File,
    memfd: File,
    _dir: tempfile::TempDir,
}

/// The kinds of the fds [`FdBundle::new`] returns, in order.
pub const BUNDLE_KINDS: [FdKind; 4] = [FdKind::Pipe, FdKind::Socket, FdKind::File, FdKind::Memfd];

impl FdBundle {
    /// A fresh bundle and the four fds to send, in [`BUNDLE_KINDS`] order:
    /// the pipe's write end, one end of the socketpair (with
    /// [`SOCKET_GREETING`] waiting in it), the regular file (read-write,
    /// holding [`FILE_CONTENT`]) and the memfd (unsealed, read-write,
    /// holding [`MEMFD_CONTENT`]).
    pub fn new() -> (Self, Vec<OwnedFd>) {
        let (pipe, pipe_write) = PipeProbe::new();
        let (mut socket, far_socket) = UnixStream::pair().expect("socketpair");
        socket
            .write_all(SOCKET_GREETING)
            .expect("write the greeting");
        socket
            .set_read_timeout(Some(TIMEOUT))
            .expect("socket timeout");
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("passed-file");
        std::fs::write(&path, FILE_CONTENT).expect("write the regular file");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the regular file");
        let memfd = File::from(memfd_create("pbus-test-bundle").expect("memfd_create"));
        memfd
            .write_all_at(MEMFD_CONTENT, 0)
            .expect("fill the memfd");
        let fds = vec![
            pipe_write,
            OwnedFd::from(far_socket),
            file.try_clone().expect("dup the file").into(),
            memfd.try_clone().expect("dup the memfd").into(),
        ];
        let bundle = Self {
            pipe,
            socket,
            file,
            memfd,
            _dir: dir,
        };
        (bundle, fds)
    }

    /// Asserts that a receiver used every fd with `token` as
    /// [`use_received_fd`] does: the token came out of the pipe and the
    /// socket, and was appended to the file and the memfd.
    pub fn assert_used(&mut self, token: &str, what: &str) {
        let from_pipe = self.pipe.read_exact_within(token.len(), TIMEOUT);
        assert_eq!(from_pipe, token.as_bytes(), "{what}: the pipe");
        let mut from_socket = vec![0u8; token.len()];
        self.socket
            .read_exact(&mut from_socket)
            .unwrap_or_else(|error| panic!("{what}: nothing came back on the socket: {error}"));
        assert_eq!(from_socket, token.as_bytes(), "{what}: the socket");
        for (file, content, name) in [
            (&self.file, FILE_CONTENT, "the regular file"),
            (&self.memfd, MEMFD_CONTENT, "the memfd"),
        ] {
            let mut appended = vec![0u8; token.len()];
            file.read_exact_at(&mut appended, content.len() as u64)
                .unwrap_or_else(|error| panic!("{what}: nothing appended to {name}: {error}"));
            assert_eq!(appended, token.as_bytes(), "{what}: {name}");
        }
    }
}

/// Asserts what a receiver reported after [`use_received_fd`] on the fds
/// of an [`FdBundle`]: the right kinds, in order, and the right content.
pub fn assert_bundle_seen(seen: &[(FdKind, Vec<u8>)], what: &str) {
    let kinds: Vec<FdKind> = seen.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(kinds, BUNDLE_KINDS, "{what}: kinds of the received fds");
    assert_eq!(seen[0].1, b"", "{what}: nothing is read from the pipe");
    assert_eq!(seen[1].1, SOCKET_GREETING, "{what}: read from the socket");
    assert_eq!(seen[2].1, FILE_CONTENT, "{what}: read from the file");
    assert_eq!(seen[3].1, MEMFD_CONTENT, "{what}: read from the memfd");
}

/// The read end of a pipe (non-blocking) whose write end is handed out.
#[derive(Debug)]
pub struct PipeProbe {
    read: OwnedFd,
}

/// What a [`PipeProbe`] sees right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipeState {
    /// Bytes were waiting.
    Data(Vec<u8>),
    /// Nothing waiting, but some write end is still open.
    Open,
    /// Every write end is closed (EOF).
    Closed,
}

impl PipeProbe {
    /// A probe and the write end to send.
    pub fn new() -> (Self, OwnedFd) {
        let (read, write) = std::io::pipe().expect("pipe");
        let read = OwnedFd::from(read);
        fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
        (Self { read }, OwnedFd::from(write))
    }

    /// `count` probes and their write ends.
    pub fn many(count: usize) -> (Vec<Self>, Vec<OwnedFd>) {
        (0..count).map(|_| Self::new()).unzip()
    }

    /// Reads what is there without waiting.
    pub fn poll(&self) -> PipeState {
        let mut buffer = [0u8; 4096];
        match nix::unistd::read(&self.read, &mut buffer) {
            Ok(0) => PipeState::Closed,
            Ok(n) => PipeState::Data(buffer[..n].to_vec()),
            Err(nix::errno::Errno::EAGAIN) => PipeState::Open,
            Err(error) => panic!("read from a pipe probe: {error}"),
        }
    }

    /// Reads exactly `len` bytes, waiting up to `timeout`; panics if they do
    /// not come (or the pipe closes first).
    pub fn read_exact_within(&self, len: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < len {
            match self.poll() {
                PipeState::Data(bytes) => got.extend(bytes),
                PipeState::Closed => panic!("pipe closed after {got:?}, wanted {len} bytes"),
                PipeState::Open => {
                    assert!(
                        Instant::now() < deadline,
                        "only {got:?} came out of the pipe within {timeout:?}, wanted {len} bytes"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        got
    }
}

/// Waits until every probe reads EOF (every copy of every write end is
/// closed, ours included); panics naming `what` after `timeout`, and at
/// once if a probe has unread bytes: a write end was used that should not
/// have been (or more was written than the test read).
pub async fn wait_all_closed(probes: &[PipeProbe], what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut open = 0;
        for (index, probe) in probes.iter().enumerate() {
            match probe.poll() {
                PipeState::Closed => {}
                PipeState::Open => open += 1,
                PipeState::Data(bytes) => {
                    panic!("{what}: write end {index} was written to: {bytes:?}")
                }
            }
        }
        if open == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {open} of {} write ends are still open somewhere after {timeout:?}",
            probes.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A memfd holding `content` with exactly `seals` added (0: none).
pub fn memfd_with(content: &[u8], seals: u32) -> OwnedFd {
    let fd = memfd_create("pbus-test").expect("memfd_create");
    let mut file = File::from(fd);
    file.write_all(content).expect("fill the memfd");
    let fd = OwnedFd::from(file);
    if seals != 0 {
        add_seals(&fd, seals).expect("add seals");
    }
    fd
}

/// A memfd holding `content`, sealed as pbus requires.
pub fn sealed_memfd(content: &[u8]) -> OwnedFd {
    memfd_with(content, seal::REQUIRED)
}

/// A regular file in `dir` holding `content`, opened read-only.
pub fn regular_file(dir: &Path, content: &[u8]) -> OwnedFd {
    let path = dir.join(format!("regular-{}", crate::unique_suffix()));
    std::fs::write(&path, content).expect("write a regular file");
    let file = File::open(&path).expect("open the regular file");
    std::fs::remove_file(&path).expect("unlink the regular file");
    OwnedFd::from(file)
}

/// Opens `/dev/null` `count` times: cheap fds to fill a message.
pub fn dev_nulls(count: usize) -> Vec<OwnedFd> {
    (0..count)
        .map(|_| OwnedFd::from(File::open("/dev/null").expect("open /dev/null")))
        .collect()
}

/// Borrows every fd of a slice (for the raw client's send functions).
pub fn borrow_all(fds: &[OwnedFd]) -> Vec<BorrowedFd<'_>> {
    fds.iter().map(AsFd::as_fd).collect()
}
