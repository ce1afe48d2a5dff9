//! Daemon configuration: where to listen and every limit, with defaults that
//! need no config file. `pbusd --config FILE` reads a TOML file whose keys
//! are the field names below; every key is optional.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Hard ceiling on fds per message: the kernel's `SCM_MAX_FD`.
pub const HARD_MAX_FDS_PER_MESSAGE: u32 = 253;

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Socket paths to listen on. Empty means the default path.
    pub listen: Vec<PathBuf>,
    /// Policy file or directory of `*.toml` files; none means the built-in
    /// default policy. Re-read on SIGHUP and `ReloadPolicy`.
    pub policy: Option<PathBuf>,
    /// Whose namespaces are the host's: `host` (pbusd's own, the default)
    /// or `broker` (pid 1 of the initial pid namespace). `--broker`
    /// overrides.
    pub mode: Mode,
    /// The Docker Engine API socket, asked to confirm container ids that a
    /// cgroup path only suggests (`--cgroup-parent`, `/../<id>`). Empty:
    /// ask nobody, such peers stay `unknown`.
    pub docker_socket: PathBuf,
    /// Resource limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: Vec::new(),
            policy: None,
            mode: Mode::default(),
            docker_socket: PathBuf::from(DEFAULT_DOCKER_SOCKET),
            limits: Limits::default(),
        }
    }
}

/// The Docker Engine's API socket, where it listens by default.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// How pbusd decides which namespaces are the host's.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// pbusd's own namespaces are the host's.
    #[default]
    Host,
    /// pbusd serves containers from the host's pid namespace (on the host
    /// or as a sidecar): the host's namespaces are those of pid 1 of the
    /// initial pid namespace, and pbusd refuses to start where it cannot
    /// read them.
    Broker,
}

impl Mode {
    /// The configuration value (`host`, `broker`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Broker => "broker",
        }
    }
}

/// Every bound on what a client can make the daemon hold or do.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame (prefix + header + body) in bytes. Bigger payloads
    /// belong in memfds. Default 8 MiB.
    pub max_frame_bytes: u32,
    /// Largest frame header in bytes. Default 64 KiB.
    pub max_header_bytes: u32,
    /// Fds per message, at most 253 (the kernel's limit). Default 64.
    pub max_fds_per_message: u32,
    /// Memfd payloads per message. Default 16.
    pub max_memfds_per_message: u32,
    /// Connections in total. Default 16384.
    pub max_connections: u32,
    /// Connections per uid. Default 4096.
    pub max_connections_per_uid: u32,
    /// Connections that have not finished their handshake. Default 256.
    pub max_incomplete_handshakes: u32,
    /// Time a client has to complete the handshake, in ms. Default 5000.
    pub handshake_timeout_ms: u64,
    /// Well-known names a connection may own or queue for. Default 256.
    pub max_names_per_connection: u32,
    /// Match rules per connection. Default 4096.
    pub max_matches_per_connection: u32,
    /// Calls a connection may have waiting for replies. Default 4096.
    pub max_pending_calls_per_connection: u32,
    /// Reply timeout when the caller gives none, in ms. Default 25000.
    pub default_reply_timeout_ms: u32,
    /// Longest reply timeout a caller may ask for, in ms. Default 600000.
    pub max_reply_timeout_ms: u32,
    /// Bytes queued for one receiver. Default 64 MiB.
    pub max_queued_bytes_per_receiver: u64,
    /// Fds queued for one receiver. Default 1024.
    pub max_queued_fds_per_receiver: u32,
    /// Messages queued for one receiver. Default 16384.
    pub max_queued_messages_per_receiver: u32,
    /// Bytes queued for all receivers together; each sender uid may hold a
    /// fair share. Default 1 GiB.
    pub max_queued_bytes_total: u64,
    /// Fds the daemon may hold for peers (their sockets and queued fds);
    /// each uid may hold a fair share. 0 means RLIMIT_NOFILE minus 64.
    /// Default 0.
    pub max_fds_total: u64,
    /// Incomplete handshakes of one uid. Default 32.
    pub max_incomplete_handshakes_per_uid: u32,
    /// Fds the daemon may have sent to receivers that they have not read
    /// yet; each sender uid may hold a fair share. The kernel refuses to
    /// pass more than RLIMIT_NOFILE fds in flight for a user without
    /// CAP_SYS_RESOURCE. 0 means RLIMIT_NOFILE minus 64. Default 0.
    pub max_fds_in_flight: u64,
    /// How long a connection may keep fds tied up without progress: fds
    /// queued for it (or in flight to it) that it does not read, or fds it
    /// sent with a frame it does not finish. Then it is disconnected, which
    /// also breaks a connection kept alive by its own socket. In ms;
    /// default 60000.
    pub pending_fd_timeout_ms: u64,
}

/// Every limit by name: the key in the `[limits]` table and in
/// [`Limits`], which errors name in their `detail` so a client can tell
/// which one it hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// `max_frame_bytes`.
    MaxFrameBytes,
    /// `max_header_bytes`.
    MaxHeaderBytes,
    /// `max_fds_per_message`.
    MaxFdsPerMessage,
    /// `max_memfds_per_message`.
    MaxMemfdsPerMessage,
    /// `max_connections`.
    MaxConnections,
    /// `max_connections_per_uid`.
    MaxConnectionsPerUid,
    /// `max_incomplete_handshakes`.
    MaxIncompleteHandshakes,
    /// `handshake_timeout_ms`.
    HandshakeTimeoutMs,
    /// `max_names_per_connection`.
    MaxNamesPerConnection,
    /// `max_matches_per_connection`.
    MaxMatchesPerConnection,
    /// `max_pending_calls_per_connection`.
    MaxPendingCallsPerConnection,
    /// `default_reply_timeout_ms`.
    DefaultReplyTimeoutMs,
    /// `max_reply_timeout_ms`.
    MaxReplyTimeoutMs,
    /// `max_queued_bytes_per_receiver`.
    MaxQueuedBytesPerReceiver,
    /// `max_queued_fds_per_receiver`.
    MaxQueuedFdsPerReceiver,
    /// `max_queued_messages_per_receiver`.
    MaxQueuedMessagesPerReceiver,
    /// `max_queued_bytes_total`.
    MaxQueuedBytesTotal,
    /// `max_fds_total`.
    MaxFdsTotal,
    /// `max_incomplete_handshakes_per_uid`.
    MaxIncompleteHandshakesPerUid,
    /// `max_fds_in_flight`.
    MaxFdsInFlight,
    /// `pending_fd_timeout_ms`.
    PendingFdTimeoutMs,
}

impl Limit {
    /// Every limit.
    pub const ALL: [Limit; 21] = [
        Self::MaxFrameBytes,
        Self::MaxHeaderBytes,
        Self::MaxFdsPerMessage,
        Self::MaxMemfdsPerMessage,
        Self::MaxConnections,
        Self::MaxConnectionsPerUid,
        Self::MaxIncompleteHandshakes,
        Self::HandshakeTimeoutMs,
        Self::MaxNamesPerConnection,
        Self::MaxMatchesPerConnection,
        Self::MaxPendingCallsPerConnection,
        Self::DefaultReplyTimeoutMs,
        Self::MaxReplyTimeoutMs,
        Self::MaxQueuedBytesPerReceiver,
        Self::MaxQueuedFdsPerReceiver,
        Self::MaxQueuedMessagesPerReceiver,
        Self::MaxQueuedBytesTotal,
        Self::MaxFdsTotal,
        Self::MaxIncompleteHandshakesPerUid,
        Self::MaxFdsInFlight,
        Self::PendingFdTimeoutMs,
    ];

    /// The configuration key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxFrameBytes => "max_frame_bytes",
            Self::MaxHeaderBytes => "max_header_bytes",
            Self::MaxFdsPerMessage => "max_fds_per_message",
            Self::MaxMemfdsPerMessage => "max_memfds_per_message",
            Self::MaxConnections => "max_connections",
            Self::MaxConnectionsPerUid => "max_connections_per_uid",
            Self::MaxIncompleteHandshakes => "max_incomplete_handshakes",
            Self::HandshakeTimeoutMs => "handshake_timeout_ms",
            Self::MaxNamesPerConnection => "max_names_per_connection",
            Self::MaxMatchesPerConnection => "max_matches_per_connection",
            Self::MaxPendingCallsPerConnection => "max_pending_calls_per_connection",
            Self::DefaultReplyTimeoutMs => "default_reply_timeout_ms",
            Self::MaxReplyTimeoutMs => "max_reply_timeout_ms",
            Self::MaxQueuedBytesPerReceiver => "max_queued_bytes_per_receiver",
            Self::MaxQueuedFdsPerReceiver => "max_queued_fds_per_receiver",
            Self::MaxQueuedMessagesPerReceiver => "max_queued_messages_per_receiver",
            Self::MaxQueuedBytesTotal => "max_queued_bytes_total",
            Self::MaxFdsTotal => "max_fds_total",
            Self::MaxIncompleteHandshakesPerUid => "max_incomplete_handshakes_per_uid",
            Self::MaxFdsInFlight => "max_fds_in_flight",
            Self::PendingFdTimeoutMs => "pending_fd_timeout_ms",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 8 << 20,
            max_header_bytes: 64 << 10,
            max_fds_per_message: 64,
            max_memfds_per_message: 16,
            max_connections: 16384,
            max_connections_per_uid: 4096,
            max_incomplete_handshakes: 256,
            handshake_timeout_ms: 5000,
            max_names_per_connection: 256,
            max_matches_per_connection: 4096,
            max_pending_calls_per_connection: 4096,
            default_reply_timeout_ms: 25_000,
            max_reply_timeout_ms: 600_000,
            max_queued_bytes_per_receiver: 64 << 20,
            max_queued_fds_per_receiver: 1024,
            max_queued_messages_per_receiver: 16384,
            max_queued_bytes_total: 1 << 30,
            max_fds_total: 0,
            max_incomplete_handshakes_per_uid: 32,
            max_fds_in_flight: 0,
            pending_fd_timeout_ms: 60_000,
        }
    }
}

impl Limits {
    /// The handshake timeout as a `Duration`.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Checks values that would make the daemon unusable or dangerous.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: Limit, why: &'static str| Err(ConfigError::Invalid { key, why });
        if self.max_fds_per_message > HARD_MAX_FDS_PER_MESSAGE {
            return bad(
                Limit::MaxFdsPerMessage,
                "must be at most 253 (the kernel's SCM_MAX_FD)",
            );
        }
        if self.max_header_bytes < 1024 {
            return bad(Limit::MaxHeaderBytes, "must be at least 1024");
        }
        if self.max_frame_bytes < self.max_header_bytes.saturating_add(12) {
            return bad(Limit::MaxFrameBytes, "must be larger than max_header_bytes");
        }
        if u64::from(self.max_frame_bytes) > self.max_queued_bytes_per_receiver {
            return bad(
                Limit::MaxQueuedBytesPerReceiver,
                "must hold at least one maximum-size frame",
            );
        }
        if self.max_queued_messages_per_receiver == 0 {
            return bad(Limit::MaxQueuedMessagesPerReceiver, "must be at least 1");
        }
        if self.default_reply_timeout_ms == 0
            || self.default_reply_timeout_ms > self.max_reply_timeout_ms
        {
            return bad(
                Limit::DefaultReplyTimeoutMs,
                "must be non-zero and at most max_reply_timeout_ms",
            );
        }
        if self.max_connections == 0 || self.max_connections_per_uid == 0 {
            return bad(Limit::MaxConnections, "must be at least 1");
        }
        if self.max_queued_bytes_total < u64::from(self.max_frame_bytes) {
            return bad(
                Limit::MaxQueuedBytesTotal,
                "must hold at least one maximum-size frame",
            );
        }
        if self.max_incomplete_handshakes_per_uid == 0 {
            return bad(Limit::MaxIncompleteHandshakesPerUid, "must be at least 1");
        }
        if self.max_incomplete_handshakes == 0 || self.handshake_timeout_ms == 0 {
            return bad(
                Limit::MaxIncompleteHandshakes,
                "must be at least 1 (and the timeout non-zero)",
            );
        }
        if self.pending_fd_timeout_ms == 0 {
            return bad(Limit::PendingFdTimeoutMs, "must be non-zero");
        }
        Ok(())
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error, with line and column.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid {key}: {why}")]
    Invalid {
        /// The offending key.
        key: Limit,
        /// What is wrong.
        why: &'static str,
    },
}

impl Config {
    /// Reads and validates a TOML configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.limits.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let config: Config = toml::from_str("[limits]\nmax_fds_per_message = 8\n").unwrap();
        assert_eq!(config.limits.max_fds_per_message, 8);
        assert_eq!(config.limits.max_names_per_connection, 256);
        config.limits.validate().unwrap();
    }

    #[test]
    fn mode_and_docker_socket() {
        let config = Config::default();
        assert_eq!(config.mode, Mode::Host);
        assert_eq!(config.docker_socket, Path::new(DEFAULT_DOCKER_SOCKET));
        let config: Config = toml::from_str("mode = \"broker\"\ndocker_socket = \"\"\n").unwrap();
        assert_eq!(config.mode, Mode::Broker);
        assert_eq!(config.mode.as_str(), "broker");
        assert_eq!(config.docker_socket, Path::new(""));
        assert!(toml::from_str::<Config>("mode = \"sidecar\"\n").is_err());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<Config>("[limits]\nmax_fd_per_message = 8\n").is_err());
        let config: Config = toml::from_str("[limits]\nmax_fds_per_message = 300\n").unwrap();
        assert!(matches!(
            config.limits.validate(),
            Err(ConfigError::Invalid {
                key: Limit::MaxFdsPerMessage,
                ..
            })
        ));
    }

    /// Each [`Limit`] names a key of [`Limits`], and each key has one.
    #[test]
    fn limit_names_are_the_config_keys() {
        let table = toml::Value::try_from(Limits::default()).unwrap();
        let mut keys: Vec<&str> = table
            .as_table()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut names: Vec<&str> = Limit::ALL.iter().map(|limit| limit.as_str()).collect();
        keys.sort_unstable();
        names.sort_unstable();
        assert_eq!(keys, names);
    }
}

#[cfg(test)]
mod documented_defaults {
    use super::*;

    /// docs/pbusd.toml documents every key with its default; keep it true.
    #[test]
    fn the_documented_file_is_exactly_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/pbusd.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config, Config::default());
        let text = std::fs::read_to_string(&path).unwrap();
        let documented: toml::Table = toml::from_str(&text).unwrap();
        for key in ["listen", "mode", "docker_socket"] {
            assert!(
                documented.contains_key(key),
                "docs/pbusd.toml does not document {key}"
            );
        }
        let limits = documented["limits"].as_table().unwrap();
        let defaults = toml::Table::try_from(Limits::default()).unwrap();
        for key in defaults.keys() {
            assert!(
                limits.contains_key(key),
                "docs/pbusd.toml does not document {key}"
            );
        }
    }
}
