//! Daemon configuration: where to listen and every limit, with defaults that
//! need no config file. `pbusd --config FILE` reads a TOML file whose keys
//! are the field names below; every key is optional.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Hard ceiling on fds per message: the kernel's `SCM_MAX_FD`.
pub const HARD_MAX_FDS_PER_MESSAGE: u32 = 253;

/// The whole daemon configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Socket paths to listen on. Empty means the default path.
    pub listen: Vec<PathBuf>,
    /// Policy file or directory of `*.toml` files; none means the built-in
    /// default policy. Re-read on SIGHUP and `ReloadPolicy`.
    pub policy: Option<PathBuf>,
    /// Resource limits.
    pub limits: Limits,
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
        let bad = |key: &'static str, why: &'static str| Err(ConfigError::Invalid { key, why });
        if self.max_fds_per_message > HARD_MAX_FDS_PER_MESSAGE {
            return bad(
                "max_fds_per_message",
                "must be at most 253 (the kernel's SCM_MAX_FD)",
            );
        }
        if self.max_header_bytes < 1024 {
            return bad("max_header_bytes", "must be at least 1024");
        }
        if self.max_frame_bytes < self.max_header_bytes.saturating_add(12) {
            return bad("max_frame_bytes", "must be larger than max_header_bytes");
        }
        if u64::from(self.max_frame_bytes) > self.max_queued_bytes_per_receiver {
            return bad(
                "max_queued_bytes_per_receiver",
                "must hold at least one maximum-size frame",
            );
        }
        if self.max_queued_messages_per_receiver == 0 {
            return bad("max_queued_messages_per_receiver", "must be at least 1");
        }
        if self.default_reply_timeout_ms == 0
            || self.default_reply_timeout_ms > self.max_reply_timeout_ms
        {
            return bad(
                "default_reply_timeout_ms",
                "must be non-zero and at most max_reply_timeout_ms",
            );
        }
        if self.max_connections == 0 || self.max_connections_per_uid == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if self.max_queued_bytes_total < u64::from(self.max_frame_bytes) {
            return bad(
                "max_queued_bytes_total",
                "must hold at least one maximum-size frame",
            );
        }
        if self.max_incomplete_handshakes_per_uid == 0 {
            return bad("max_incomplete_handshakes_per_uid", "must be at least 1");
        }
        if self.max_incomplete_handshakes == 0 || self.handshake_timeout_ms == 0 {
            return bad(
                "max_incomplete_handshakes",
                "must be at least 1 (and the timeout non-zero)",
            );
        }
        if self.pending_fd_timeout_ms == 0 {
            return bad("pending_fd_timeout_ms", "must be non-zero");
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
        key: &'static str,
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
    fn unknown_keys_and_bad_values_are_errors() {
        assert!(toml::from_str::<Config>("[limits]\nmax_fd_per_message = 8\n").is_err());
        let config: Config = toml::from_str("[limits]\nmax_fds_per_message = 300\n").unwrap();
        assert!(matches!(
            config.limits.validate(),
            Err(ConfigError::Invalid {
                key: "max_fds_per_message",
                ..
            })
        ));
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
