//! Bus addresses: `unix:path=/run/pbus/bus.sock`, from an argument, the
//! `PBUS_ADDRESS` environment variable, or the same defaults `pbusd` uses.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::Error;

/// Environment variable naming the bus address.
pub const ADDRESS_ENV: &str = "PBUS_ADDRESS";

/// Where the bus listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    path: PathBuf,
}

impl Address {
    /// A Unix socket path.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Parses `unix:path=PATH` (or a bare absolute path).
    pub fn parse(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("unix:") {
            for pair in rest.split(',') {
                if let Some(path) = pair.strip_prefix("path=") {
                    if path.is_empty() {
                        break;
                    }
                    return Ok(Self::unix(path));
                }
            }
            return Err(Error::Address(format!("{text:?} has no path=")));
        }
        if text.starts_with('/') {
            return Ok(Self::unix(text));
        }
        Err(Error::Address(format!(
            "{text:?} is not a pbus address (expected unix:path=/path/to/bus.sock)"
        )))
    }

    /// `PBUS_ADDRESS` if set, otherwise the default: `/run/pbus/bus.sock` as
    /// root, `$XDG_RUNTIME_DIR/pbus/bus.sock` otherwise.
    pub fn from_env_or_default() -> Result<Self, Error> {
        match std::env::var(ADDRESS_ENV) {
            Ok(value) if !value.is_empty() => Self::parse(&value),
            _ => Self::default_address(),
        }
    }

    /// The default address, as `pbusd` picks it with no arguments.
    pub fn default_address() -> Result<Self, Error> {
        if pbus_sys::process::effective_uid() == 0 {
            return Ok(Self::unix("/run/pbus/bus.sock"));
        }
        match std::env::var_os("XDG_RUNTIME_DIR") {
            Some(dir) if !dir.is_empty() => {
                Ok(Self::unix(PathBuf::from(dir).join("pbus/bus.sock")))
            }
            _ => Err(Error::Address(format!(
                "{ADDRESS_ENV} and XDG_RUNTIME_DIR are both unset; set {ADDRESS_ENV}=unix:path=..."
            ))),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix:path={}", self.path.display())
    }
}

impl std::str::FromStr for Address {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self, Error> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_paths() {
        assert_eq!(
            Address::parse("unix:path=/tmp/x.sock").unwrap().path(),
            Path::new("/tmp/x.sock")
        );
        assert_eq!(
            Address::parse("unix:guid=1,path=/tmp/y").unwrap().path(),
            Path::new("/tmp/y")
        );
        assert_eq!(Address::parse("/abs").unwrap().path(), Path::new("/abs"));
        assert!(Address::parse("tcp:host=x").is_err());
        assert!(Address::parse("unix:path=").is_err());
        assert_eq!(Address::unix("/a").to_string(), "unix:path=/a");
    }
}
