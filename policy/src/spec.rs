//! Identities written on a command line, for `pbusctl policy explain`:
//! `uid=1000,gid=1000,container=docker:4f2a...,label=...,listener=/run/pbus/bus.sock`.
//!
//! This module turns such a description into a [`PeerIdentity`] so the CLI
//! only calls [`parse_identity`]. It knows nothing about rules.

use pbus_identity::{Container, ContainerRuntime, PeerIdentity};

/// Why an identity description could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identity {spec:?}: {message}")]
pub struct IdentitySpecError {
    /// The description as given.
    pub spec: String,
    /// What is wrong with it.
    pub message: String,
}

/// Keys [`parse_identity`] accepts, for error messages.
const KEYS: &str = "uid, gid, groups, pid, label, container, pod, listener, pidns, mntns, cgroup";

/// Parses `key=value` pairs separated by commas into an identity.
///
/// | key | value | default |
/// |---|---|---|
/// | `uid` | number (required) | |
/// | `gid` | number | the uid |
/// | `groups` | supplementary gids, `:`-separated (`10:27`) | none |
/// | `pid` | number | 0 |
/// | `label` | LSM label | none (no LSM) |
/// | `container` | `host`, a runtime (`docker`), or `runtime:id` | `host` |
/// | `pod` | Kubernetes pod UID | none |
/// | `listener` | socket path the peer connected through | empty |
/// | `pidns`, `mntns` | namespace inode numbers | 0 |
/// | `cgroup` | cgroup path | empty |
///
/// A comma-separated piece without `=` continues the previous value, so
/// SELinux labels with category sets read naturally:
/// `uid=0,label=system_u:system_r:container_t:s0:c1,c2`.
/// Runtimes are the names of [`ContainerRuntime::ALL`] (`docker`, `podman`,
/// `containerd`, `crio`, `lxc`, `nspawn`, `unknown`).
pub fn parse_identity(spec: &str) -> Result<PeerIdentity, IdentitySpecError> {
    let fail = |message: String| IdentitySpecError {
        spec: spec.to_owned(),
        message,
    };
    // Split into (key, value) pairs, gluing `=`-less pieces to the previous
    // value.
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for piece in spec.split(',') {
        match piece.split_once('=') {
            Some((key, value)) => {
                let key = key.trim();
                if pairs.iter().any(|(k, _)| *k == key) {
                    return Err(fail(format!("`{key}` given twice")));
                }
                pairs.push((key, value.to_owned()));
            }
            None => match pairs.last_mut() {
                Some((_, value)) => {
                    value.push(',');
                    value.push_str(piece);
                }
                None if piece.trim().is_empty() => {}
                None => return Err(fail(format!("expected key=value, found {piece:?}"))),
            },
        }
    }

    let number = |key: &str, value: &str| -> Result<u64, IdentitySpecError> {
        value
            .trim()
            .parse::<u64>()
            .map_err(|_| fail(format!("`{key}`: expected a number, found {value:?}")))
    };
    let id32 = |key: &str, value: &str| -> Result<u32, IdentitySpecError> {
        u32::try_from(number(key, value)?)
            .map_err(|_| fail(format!("`{key}`: {value} is out of range")))
    };

    let mut id = PeerIdentity::default();
    let mut uid = None;
    let mut gid = None;
    for (key, value) in &pairs {
        match *key {
            "uid" => uid = Some(id32(key, value)?),
            "gid" => gid = Some(id32(key, value)?),
            "pid" => id.pid = id32(key, value)?,
            "groups" => {
                id.groups = value
                    .split(':')
                    .filter(|g| !g.trim().is_empty())
                    .map(|g| id32(key, g))
                    .collect::<Result<_, _>>()?;
            }
            "label" => id.label = Some(value.clone()),
            "container" => {
                let (runtime, container_id) = match value.split_once(':') {
                    Some((r, i)) => (r, i),
                    None => (value.as_str(), ""),
                };
                let runtime = ContainerRuntime::from_name(runtime).ok_or_else(|| {
                    fail(format!(
                        "`container`: unknown runtime {runtime:?} (expected {})",
                        ContainerRuntime::list_names(ContainerRuntime::ALL)
                    ))
                })?;
                if !runtime.is_container() && !container_id.is_empty() {
                    return Err(fail("`container`: the host has no container id".into()));
                }
                id.container.runtime = runtime;
                id.container.id = container_id.to_owned();
            }
            "pod" => id.container.pod_uid = Some(value.clone()),
            "listener" => id.listener = value.clone(),
            "pidns" => id.namespaces.pid = number(key, value)?,
            "mntns" => id.namespaces.mnt = number(key, value)?,
            "cgroup" => id.cgroup = value.clone(),
            other => {
                return Err(fail(format!(
                    "unknown key `{other}` (expected one of: {KEYS})"
                )))
            }
        }
    }
    if id.container.pod_uid.is_some() && !id.container.is_container() {
        return Err(fail("`pod` needs a `container`".into()));
    }
    id.uid = uid.ok_or_else(|| fail("`uid` is required".into()))?;
    id.gid = gid.unwrap_or(id.uid);
    Ok(id)
}

/// Describes an identity in the form [`parse_identity`] reads (fields at
/// their defaults left out).
pub fn format_identity(id: &PeerIdentity) -> String {
    let mut parts = vec![format!("uid={}", id.uid)];
    if id.gid != id.uid {
        parts.push(format!("gid={}", id.gid));
    }
    if !id.groups.is_empty() {
        let groups: Vec<String> = id.groups.iter().map(u32::to_string).collect();
        parts.push(format!("groups={}", groups.join(":")));
    }
    if id.pid != 0 {
        parts.push(format!("pid={}", id.pid));
    }
    let Container {
        runtime,
        id: container_id,
        pod_uid,
    } = &id.container;
    if *runtime != ContainerRuntime::Host {
        if container_id.is_empty() {
            parts.push(format!("container={}", runtime.as_str()));
        } else {
            parts.push(format!("container={}:{container_id}", runtime.as_str()));
        }
    }
    if let Some(pod) = pod_uid {
        parts.push(format!("pod={pod}"));
    }
    if !id.listener.is_empty() {
        parts.push(format!("listener={}", id.listener));
    }
    if id.namespaces.pid != 0 {
        parts.push(format!("pidns={}", id.namespaces.pid));
    }
    if id.namespaces.mnt != 0 {
        parts.push(format!("mntns={}", id.namespaces.mnt));
    }
    if !id.cgroup.is_empty() {
        parts.push(format!("cgroup={}", id.cgroup));
    }
    // The label goes last: its commas would swallow the keys after it.
    if let Some(label) = &id.label {
        parts.push(format!("label={label}"));
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full() {
        let id = parse_identity(
            "uid=1000,groups=10:27,container=docker:4f2a,pod=1234-5678,\
             listener=/run/pbus/bus.sock,label=system_u:system_r:container_t:s0:c1,c2",
        )
        .unwrap();
        assert_eq!(id.uid, 1000);
        assert_eq!(id.gid, 1000);
        assert_eq!(id.groups, vec![10, 27]);
        assert_eq!(id.container.runtime, ContainerRuntime::Docker);
        assert_eq!(id.container.id, "4f2a");
        assert_eq!(id.container.pod_uid.as_deref(), Some("1234-5678"));
        assert_eq!(id.listener, "/run/pbus/bus.sock");
        assert_eq!(
            id.label.as_deref(),
            Some("system_u:system_r:container_t:s0:c1,c2")
        );
        assert_eq!(parse_identity(&format_identity(&id)).unwrap(), id);
    }

    #[test]
    fn defaults_and_errors() {
        let id = parse_identity("uid=0").unwrap();
        assert_eq!((id.uid, id.gid), (0, 0));
        assert!(!id.container.is_container());
        assert_eq!(id.label, None);
        let id = parse_identity("uid=5,gid=7,container=unknown").unwrap();
        assert_eq!(id.gid, 7);
        assert_eq!(id.container.runtime, ContainerRuntime::Unknown);
        for bad in [
            "",
            "gid=1",
            "uid=x",
            "uid=1,uid=2",
            "uid=1,color=red",
            "uid=1,container=rkt:x",
            "uid=1,container=host:x",
            "uid=1,pod=abc",
            "root",
            "uid=99999999999",
        ] {
            assert!(parse_identity(bad).is_err(), "{bad:?} accepted");
        }
        let e = parse_identity("uid=1,container=rkt").unwrap_err();
        assert!(
            e.message.ends_with(
                "(expected host, docker, podman, containerd, crio, lxc, nspawn, unknown)"
            ),
            "{e}"
        );
    }
}
