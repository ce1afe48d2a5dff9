//! Rendering for people (aligned tables, labelled fields) and machines
//! (JSON values built from the wire types).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pbus_proto::v1::{ContainerRuntime, GetStatsReply, PeerIdentity};
use serde_json::{json, Value};

/// Prints rows under headers, columns padded to their widest cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// The identity crate's runtime for a wire value (unknown values read as
/// `Unknown`); its [`as_str`](pbus_identity::ContainerRuntime::as_str) is
/// the name printed, as in policy files.
pub fn runtime_of(runtime: i32) -> pbus_identity::ContainerRuntime {
    use pbus_identity::ContainerRuntime as R;
    match ContainerRuntime::try_from(runtime).unwrap_or(ContainerRuntime::Unknown) {
        ContainerRuntime::Host => R::Host,
        ContainerRuntime::Unknown => R::Unknown,
        ContainerRuntime::Docker => R::Docker,
        ContainerRuntime::Podman => R::Podman,
        ContainerRuntime::Containerd => R::Containerd,
        ContainerRuntime::Crio => R::Crio,
        ContainerRuntime::Lxc => R::Lxc,
        ContainerRuntime::Nspawn => R::Nspawn,
    }
}

/// How the daemon runs, as `pbusctl status` names it: the mode (`host`,
/// `broker`), the host reference's short name (`own-namespaces`,
/// `init-process`) and its description. A daemon too old to say reads as
/// `unknown`.
pub fn bus_mode_of(identity: &PeerIdentity) -> (&'static str, &'static str, &'static str) {
    use pbus_proto::v1::{BusMode, HostReference};
    let mode = match BusMode::try_from(identity.bus_mode) {
        Ok(BusMode::Host) => "host",
        Ok(BusMode::Broker) => "broker",
        _ => "unknown",
    };
    let (reference, description) = match HostReference::try_from(identity.host_reference) {
        Ok(HostReference::OwnNamespaces) => (
            "own-namespaces",
            pbus_identity::HostReference::Own.describe(),
        ),
        Ok(HostReference::InitProcess) => (
            "init-process",
            pbus_identity::HostReference::InitProcess.describe(),
        ),
        _ => ("unknown", "not reported by this pbusd"),
    };
    (mode, reference, description)
}

/// "3m 12s"-style durations.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..=59 => format!("{}.{:03}s", secs, duration.subsec_millis()),
        60..=3599 => format!("{}m {}s", secs / 60, secs % 60),
        3600..=86399 => format!("{}h {}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d {}h", secs / 86400, (secs % 86400) / 3600),
    }
}

/// The identity as JSON.
pub fn identity_json(identity: &PeerIdentity) -> Value {
    let container = identity.container.clone().unwrap_or_default();
    let namespaces = identity.namespaces.unwrap_or_default();
    json!({
        "unique_name": identity.unique_name,
        "uid": identity.uid,
        "gid": identity.gid,
        "pid": identity.pid,
        "host_pid": identity.host_pid,
        "groups": identity.groups,
        "label": identity.label,
        "container": {
            "runtime": runtime_of(container.runtime).as_str(),
            "id": container.id,
            "pod_uid": if container.pod_uid.is_empty() { Value::Null } else { Value::from(container.pod_uid) },
        },
        "cgroup": identity.cgroup,
        "namespaces": {
            "pid": namespaces.pid,
            "mnt": namespaces.mnt,
            "net": namespaces.net,
            "user": namespaces.user,
            "ipc": namespaces.ipc,
            "uts": namespaces.uts,
            "cgroup": namespaces.cgroup,
        },
        "listener": identity.listener,
        "owned_names": identity.owned_names,
        "connected_at_unix": identity.connected_at_unix,
        "features": identity.features,
        "bus_mode": bus_mode_of(identity).0,
        "host_reference": bus_mode_of(identity).1,
    })
}

/// The identity as labelled lines.
pub fn print_identity(identity: &PeerIdentity) {
    let container = identity.container.clone().unwrap_or_default();
    let namespaces = identity.namespaces.unwrap_or_default();
    let groups: Vec<String> = identity.groups.iter().map(u32::to_string).collect();
    let runtime = runtime_of(container.runtime);
    let container_text = if !runtime.is_container() {
        "none (host)".to_owned()
    } else {
        let mut text = runtime.as_str().to_owned();
        if !container.id.is_empty() {
            text.push(' ');
            text.push_str(&container.id);
        }
        if !container.pod_uid.is_empty() {
            text.push_str(&format!(" (pod {})", container.pod_uid));
        }
        text
    };
    let pid = if identity.pid == 0 {
        "0 (not visible from this pid namespace)".to_owned()
    } else {
        identity.pid.to_string()
    };
    let connected = UNIX_EPOCH + Duration::from_secs(identity.connected_at_unix);
    let age = SystemTime::now()
        .duration_since(connected)
        .unwrap_or_default();
    let names = if identity.owned_names.is_empty() {
        "-".to_owned()
    } else {
        identity.owned_names.join(", ")
    };
    let fields = [
        ("Unique name", identity.unique_name.clone()),
        ("UID", identity.uid.to_string()),
        ("GID", identity.gid.to_string()),
        ("PID", pid),
        (
            "Groups",
            if groups.is_empty() {
                "-".into()
            } else {
                groups.join(", ")
            },
        ),
        (
            "Label",
            identity
                .label
                .clone()
                .unwrap_or_else(|| "none (no LSM label)".into()),
        ),
        ("Container", container_text),
        ("Cgroup", identity.cgroup.clone()),
        (
            "Namespaces",
            format!(
                "pid:{} mnt:{} net:{} user:{} ipc:{} uts:{} cgroup:{}",
                namespaces.pid,
                namespaces.mnt,
                namespaces.net,
                namespaces.user,
                namespaces.ipc,
                namespaces.uts,
                namespaces.cgroup
            ),
        ),
        ("Listener", identity.listener.clone()),
        ("Owns", names),
        ("Connected", format!("{} ago", human_duration(age))),
        ("Bus mode", {
            let (mode, _, reference) = bus_mode_of(identity);
            format!("{mode} (host reference: {reference})")
        }),
    ];
    for (label, value) in fields {
        println!("{:<12} {value}", format!("{label}:"));
    }
}

/// One monitored message: a line for people, a JSON object for machines.
pub fn print_message(message: &pbus::Incoming, json: bool) {
    use pbus_proto::v1::MessageKind;
    let header = message.header();
    let kind = match MessageKind::try_from(header.kind).unwrap_or(MessageKind::Unspecified) {
        MessageKind::MethodCall => "call",
        MessageKind::MethodReturn => "return",
        MessageKind::Error => "error",
        MessageKind::Signal => "signal",
        _ => "other",
    };
    let sender = message.sender();
    let destination = if header.destination.is_empty() {
        "*"
    } else {
        header.destination.as_str()
    };
    let error = header.error.as_ref().map(|e| e.name.as_str()).unwrap_or("");
    if json {
        println!(
            "{}",
            json!({
                "kind": kind,
                "sender": sender.unique_name,
                "uid": sender.uid,
                "pid": sender.pid,
                "destination": destination,
                "path": header.path,
                "member": header.member,
                "serial": header.serial,
                "reply_serial": header.reply_serial,
                "payload_type": header.payload_type,
                "body_bytes": message.body().len(),
                "args": header.args,
                "error": error,
            })
        );
    } else {
        let what = match kind {
            "return" | "error" => format!("reply to #{} {error}", header.reply_serial),
            _ => format!("{} {}", header.path, header.member),
        };
        println!(
            "{kind:<6} {} (uid {} pid {}) -> {destination} #{} {what} [{} {} bytes]",
            sender.unique_name,
            sender.uid,
            sender.pid,
            header.serial,
            header.payload_type,
            message.body().len()
        );
    }
}

/// Stats as JSON.
pub fn stats_json(stats: &GetStatsReply) -> Value {
    let peers: Vec<Value> = stats
        .peers
        .iter()
        .map(|peer| {
            let by_uid: Vec<Value> = peer
                .queued_by_uid
                .iter()
                .map(|usage| {
                    json!({
                        "uid": usage.uid,
                        "bytes": usage.bytes,
                        "fds": usage.fds,
                        "messages": usage.messages,
                    })
                })
                .collect();
            json!({
                "unique_name": peer.unique_name,
                "uid": peer.uid,
                "pid": peer.pid,
                "names": peer.names,
                "queued": {
                    "bytes": peer.queued_bytes,
                    "fds": peer.queued_fds,
                    "messages": peer.queued_messages,
                },
                "limits": {
                    "bytes": peer.max_queued_bytes,
                    "fds": peer.max_queued_fds,
                    "messages": peer.max_queued_messages,
                },
                "queued_by_uid": by_uid,
                "pending_calls": peer.pending_calls,
                "match_rules": peer.match_rules,
                "sent": peer.sent,
                "received": peer.received,
                "dropped_signals": peer.dropped_signals,
            })
        })
        .collect();
    let uids: Vec<Value> = stats
        .uids
        .iter()
        .map(|uid| {
            json!({
                "uid": uid.uid,
                "connections": uid.connections,
                "queued_bytes": uid.queued_bytes,
                "fds": uid.fds,
            })
        })
        .collect();
    json!({
        "peers": peers,
        "uids": uids,
        "totals": {
            "connections": stats.connections,
            "names": stats.names,
            "match_rules": stats.match_rules,
            "pending_calls": stats.pending_calls,
            "queued_bytes": stats.queued_bytes_total,
            "max_queued_bytes": stats.max_queued_bytes_total,
            "fds": stats.fds_total,
            "max_fds": stats.max_fds_total,
        },
    })
}

/// Stats as tables: peers, then uids, then totals.
pub fn print_stats(stats: &GetStatsReply) {
    let percent = |used: u64, max: u64| (used * 100).checked_div(max).unwrap_or(0);
    let rows: Vec<Vec<String>> = stats
        .peers
        .iter()
        .map(|peer| {
            let quota: Vec<String> = peer
                .queued_by_uid
                .iter()
                .map(|usage| {
                    format!(
                        "{}:{}B/{}fd/{}msg",
                        usage.uid, usage.bytes, usage.fds, usage.messages
                    )
                })
                .collect();
            vec![
                peer.unique_name.clone(),
                peer.uid.to_string(),
                peer.pid.to_string(),
                format!(
                    "{}B {}fd {}msg ({}%)",
                    peer.queued_bytes,
                    peer.queued_fds,
                    peer.queued_messages,
                    percent(peer.queued_bytes, peer.max_queued_bytes)
                        .max(percent(peer.queued_fds, peer.max_queued_fds))
                        .max(percent(peer.queued_messages, peer.max_queued_messages))
                ),
                if quota.is_empty() {
                    "-".into()
                } else {
                    quota.join(" ")
                },
                peer.pending_calls.to_string(),
                peer.match_rules.to_string(),
                peer.sent.to_string(),
                peer.received.to_string(),
                peer.dropped_signals.to_string(),
                if peer.names.is_empty() {
                    "-".into()
                } else {
                    peer.names.join(",")
                },
            ]
        })
        .collect();
    print_table(
        &[
            "PEER", "UID", "PID", "QUEUED", "BY-UID", "PENDING", "MATCHES", "SENT", "RECEIVED",
            "DROPPED", "NAMES",
        ],
        &rows,
    );
    println!();
    let rows: Vec<Vec<String>> = stats
        .uids
        .iter()
        .map(|uid| {
            vec![
                uid.uid.to_string(),
                uid.connections.to_string(),
                uid.queued_bytes.to_string(),
                uid.fds.to_string(),
            ]
        })
        .collect();
    print_table(&["UID", "CONNECTIONS", "QUEUED-BYTES", "FDS"], &rows);
    println!();
    println!(
        "connections {}  names {}  match rules {}  pending calls {}",
        stats.connections, stats.names, stats.match_rules, stats.pending_calls
    );
    println!(
        "queued bytes {} of {}  fds {} of {}",
        stats.queued_bytes_total,
        stats.max_queued_bytes_total,
        stats.fds_total,
        stats.max_fds_total
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(1500)), "1.500s");
        assert_eq!(human_duration(Duration::from_secs(192)), "3m 12s");
        assert_eq!(human_duration(Duration::from_secs(7300)), "2h 1m");
        assert_eq!(human_duration(Duration::from_secs(90000)), "1d 1h");
    }

    #[test]
    fn identity_json_has_every_field() {
        let identity = PeerIdentity {
            unique_name: ":1.7".into(),
            uid: 4_000_000_000,
            label: Some("system_u:system_r:app_t".into()),
            ..PeerIdentity::default()
        };
        let value = identity_json(&identity);
        assert_eq!(value["uid"], 4_000_000_000u64);
        assert_eq!(value["label"], "system_u:system_r:app_t");
        assert_eq!(value["container"]["runtime"], "host");
        assert!(value["container"]["pod_uid"].is_null());
    }

    #[test]
    fn bus_mode_and_host_reference_are_named() {
        use pbus_proto::v1::{BusMode, HostReference};
        let broker = PeerIdentity {
            bus_mode: BusMode::Broker as i32,
            host_reference: HostReference::InitProcess as i32,
            ..PeerIdentity::default()
        };
        assert_eq!(
            bus_mode_of(&broker),
            (
                "broker",
                "init-process",
                "pid 1 of the initial pid namespace"
            )
        );
        let value = identity_json(&broker);
        assert_eq!(value["bus_mode"], "broker");
        assert_eq!(value["host_reference"], "init-process");
        let host = PeerIdentity {
            bus_mode: BusMode::Host as i32,
            host_reference: HostReference::OwnNamespaces as i32,
            ..PeerIdentity::default()
        };
        assert_eq!(
            bus_mode_of(&host),
            ("host", "own-namespaces", "pbusd's own namespaces")
        );
        assert_eq!(bus_mode_of(&PeerIdentity::default()).0, "unknown");
    }

    #[test]
    fn wire_runtimes_print_by_their_policy_names() {
        // Each wire value maps to the identity runtime of the same name
        // (`CONTAINER_RUNTIME_DOCKER` prints as `docker`).
        for wire in 0..=7 {
            let name = ContainerRuntime::try_from(wire).unwrap().as_str_name();
            let printed = runtime_of(wire).as_str();
            assert_eq!(
                name,
                format!("CONTAINER_RUNTIME_{}", printed.to_uppercase())
            );
        }
        assert_eq!(runtime_of(99).as_str(), "unknown");
    }
}
