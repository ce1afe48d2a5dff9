//! Listening sockets: the default path, directory creation, refusing to
//! take over a socket a live daemon serves, replacing a stale one, and
//! removing our own socket at shutdown.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Socket path used as root when nothing else is given.
pub const SYSTEM_SOCKET_PATH: &str = "/run/pbus/bus.sock";

/// The default socket path: `/run/pbus/bus.sock` for root, otherwise
/// `$XDG_RUNTIME_DIR/pbus/bus.sock`.
pub fn default_socket_path() -> io::Result<PathBuf> {
    if pbus_sys::process::effective_uid() == 0 {
        return Ok(PathBuf::from(SYSTEM_SOCKET_PATH));
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Ok(PathBuf::from(dir).join("pbus").join("bus.sock")),
        _ => Err(io::Error::new(
            io::ErrorKind::NotFound,
            "XDG_RUNTIME_DIR is not set; pass --listen PATH",
        )),
    }
}

/// A bound listening socket and what we need to clean it up.
#[derive(Debug)]
pub struct BoundSocket {
    /// The listening socket (non-blocking).
    pub listener: UnixListener,
    /// Where it lives.
    pub path: PathBuf,
    /// Identity of the socket file we created (inode and creation time:
    /// inode numbers alone are reused), so we only ever remove our own.
    inode: FileStamp,
}

impl BoundSocket {
    /// Removes the socket file if it is still the one we created.
    pub fn remove_file(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if FileStamp::of(&meta) == self.inode => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %error, "cannot remove socket");
                }
            }
            _ => {
                tracing::debug!(path = %self.path.display(), "socket file replaced by someone else; left alone")
            }
        }
    }
}

/// Inode, device and change time of a file: what tells one socket file
/// from a later one at the same path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
        }
    }
}

/// Binds `path`: creates its directory if missing, refuses if a live daemon
/// answers there or if a non-socket file is in the way, replaces a stale
/// socket. The socket is made world-connectable (policy decides who may do
/// what); the directory's mode decides who can reach it.
pub fn bind(path: &Path) -> io::Result<BoundSocket> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            let mode = if pbus_sys::process::effective_uid() == 0 {
                0o755
            } else {
                0o700
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a live daemon is serving {}", path.display()),
                ))
            }
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(path = %path.display(), "replacing stale socket");
                std::fs::remove_file(path)?;
            }
            Err(error) => return Err(error),
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    listener.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    let inode = FileStamp::of(&std::fs::symlink_metadata(path)?);
    Ok(BoundSocket {
        listener,
        path: path.to_owned(),
        inode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pbusd-listener-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn live_socket_is_refused_and_stale_socket_replaced() {
        let dir = temp_dir();
        let path = dir.join("sub/bus.sock");
        let BoundSocket {
            listener,
            inode: first_inode,
            ..
        } = bind(&path).unwrap();
        let error = bind(&path).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        let first = BoundSocket {
            listener: UnixListener::bind(dir.join("other.sock")).unwrap(),
            path: path.clone(),
            inode: first_inode,
        };
        // The file is still there but nobody listens: stale.
        let second = bind(&path).unwrap();
        // The first owner's cleanup must not remove the second's socket.
        first.remove_file();
        assert!(path.exists());
        second.remove_file();
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn regular_file_is_not_replaced() {
        let dir = temp_dir();
        let path = dir.join("bus.sock");
        std::fs::write(&path, b"important").unwrap();
        assert_eq!(
            bind(&path).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"important");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
