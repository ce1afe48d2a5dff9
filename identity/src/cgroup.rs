//! Cgroup membership (`/proc/PID/cgroup`) and the container it reveals.
//!
//! Pure code: [`parse_proc_cgroup`] turns the file's text into a
//! [`CgroupMembership`], [`container_from_path`] classifies one cgroup path,
//! [`container_from_membership`] picks which hierarchy to believe, and
//! [`is_namespaced`] decides whether a peer in no known cgroup is still
//! "not the host". Nothing here touches the filesystem.
//!
//! Recognised layouts (cgroup v1 and v2; systemd and cgroupfs drivers):
//!
//! | runtime | systemd driver | cgroupfs driver |
//! |---|---|---|
//! | Docker | `docker-<id>.scope` | `/docker/<id>` |
//! | Podman | `libpod-<id>.scope` (rootful and rootless) | `/libpod_parent/libpod-<id>` |
//! | containerd | `cri-containerd-<id>.scope`, `nerdctl-<id>.scope` | `/kubepods/<qos>/pod<uid>/<id>` (see below) |
//! | CRI-O | `crio-<id>.scope` | `/kubepods/<qos>/pod<uid>/crio-<id>` |
//! | LXC | `lxc.payload.<name>` | `/lxc/<name>`, `/lxc.payload/<name>` |
//! | systemd-nspawn | `machine-<name>.scope`, `systemd-nspawn@<name>.service` | — |
//!
//! `<id>` is always 64 lower-case hex digits. Host-side helpers that live
//! next to containers are deliberately not containers: Podman's and CRI-O's
//! `conmon` scopes, `lxc.monitor.<name>`, `docker.service`. (A CRI-O conmon
//! scope sits inside its pod's cgroup, so it is reported like any process
//! in a pod but in none of its containers; see below.)
//!
//! Kubernetes pods (`kubepods*` slices or the `/kubepods` tree) contribute
//! the pod UID, always reported in its dashed form. A bare 64-hex directory
//! directly under a `pod<uid>` directory (cgroupfs driver) names the
//! container but not the runtime; it is reported as
//! [`ContainerRuntime::Containerd`], the runtime that uses that layout
//! (CRI-O prefixes `crio-`, the retired dockershim is the only other user).
//! A process in a pod's cgroup but in no container below it is reported as
//! [`ContainerRuntime::Unknown`] with the pod UID.
//!
//! **Candidates.** A bare 64-hex component under any other parent is a
//! *candidate* container id, never a container by itself
//! ([`candidate_from_path`]): Docker's `--cgroup-parent` with the cgroupfs
//! driver puts a container at `/PARENT/<id>`, and a cgroup namespace shows
//! a sibling container as `/../<id>`, but anyone who may create cgroups can
//! name a directory with 64 hex digits. [`classify`] reports a candidate as
//! [`ContainerRuntime::Unknown`] (never the host) and hands its id back in
//! [`Classification::candidate`]; only a runtime that confirms the id
//! ([`crate::confirm`]) makes it a container of that runtime.

use crate::model::{Container, ContainerRuntime, Namespaces};

/// One cgroup v1 line of `/proc/PID/cgroup`: `ID:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupV1Membership {
    /// Hierarchy id (first field).
    pub hierarchy_id: u32,
    /// Controllers bound to the hierarchy (`cpu`, `cpuacct`, ...) or the
    /// hierarchy's name as `name=<name>` (e.g. `name=systemd`).
    pub controllers: Vec<String>,
    /// The process's cgroup in that hierarchy.
    pub path: String,
}

/// Everything `/proc/PID/cgroup` says, split by hierarchy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMembership {
    /// The path from the unified (v2) `0::path` line, if there is one.
    pub v2: Option<String>,
    /// The v1 hierarchies, in file order.
    pub v1: Vec<CgroupV1Membership>,
}

/// The name of systemd's named v1 hierarchy, as it appears in
/// `/proc/PID/cgroup` and in mount options.
pub const SYSTEMD_V1_HIERARCHY: &str = "name=systemd";

/// Parses the text of `/proc/PID/cgroup`. Malformed lines are skipped.
pub fn parse_proc_cgroup(text: &str) -> CgroupMembership {
    let mut membership = CgroupMembership::default();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Ok(hierarchy_id) = id.parse::<u32>() else {
            continue;
        };
        if hierarchy_id == 0 && controllers.is_empty() {
            membership.v2 = Some(path.to_owned());
        } else {
            membership.v1.push(CgroupV1Membership {
                hierarchy_id,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            });
        }
    }
    membership
}

impl CgroupMembership {
    /// The path in the v1 hierarchy that carries `controller` (a controller
    /// name or `name=<name>`).
    pub fn v1_path(&self, controller: &str) -> Option<&str> {
        self.v1
            .iter()
            .find(|line| line.controllers.iter().any(|c| c == controller))
            .map(|line| line.path.as_str())
    }

    /// The path in systemd's named v1 hierarchy (`name=systemd`).
    pub fn systemd_v1_path(&self) -> Option<&str> {
        self.v1_path(SYSTEMD_V1_HIERARCHY)
    }

    /// The one cgroup path that describes this process
    /// ([`PeerIdentity::cgroup`](crate::PeerIdentity::cgroup)).
    ///
    /// The v2 path when the `0::` line has a non-empty path, else the v1
    /// `name=systemd` path, else the empty string. One refinement: on a
    /// hybrid host, a runtime that only manages v1 hierarchies (Docker with
    /// the cgroupfs driver) leaves its processes at the v2 root `/`; when the
    /// v2 path is `/` and the `name=systemd` path is more specific, the
    /// latter is reported, since `/` would claim the peer sits at the root.
    pub fn primary_path(&self) -> String {
        let systemd = self.systemd_v1_path().filter(|path| !path.is_empty());
        match (self.v2.as_deref(), systemd) {
            (Some("/"), Some(systemd)) if systemd != "/" => systemd.to_owned(),
            (Some(v2), _) if !v2.is_empty() => v2.to_owned(),
            (_, Some(systemd)) => systemd.to_owned(),
            _ => String::new(),
        }
    }

    /// The paths worth classifying, most trusted first: the v2 path, the v1
    /// `name=systemd` path, then the other v1 hierarchies in file order.
    pub fn paths_by_preference(&self) -> Vec<&str> {
        let mut paths: Vec<&str> = self.v2.iter().map(String::as_str).collect();
        paths.extend(self.systemd_v1_path());
        paths.extend(
            self.v1
                .iter()
                .filter(|line| !line.controllers.iter().any(|c| c == SYSTEMD_V1_HIERARCHY))
                .map(|line| line.path.as_str()),
        );
        paths
    }
}

/// The container the cgroup membership reveals: the first path (in
/// [`CgroupMembership::paths_by_preference`] order) that
/// [`container_from_path`] recognises.
pub fn container_from_membership(membership: &CgroupMembership) -> Option<Container> {
    membership
        .paths_by_preference()
        .into_iter()
        .find_map(container_from_path)
}

/// Classifies one cgroup path. The innermost (deepest) recognised container
/// component wins, so a container nested in another reports the inner one.
/// `None` when no component is recognised.
pub fn container_from_path(path: &str) -> Option<Container> {
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut innermost: Option<(usize, ContainerRuntime, String)> = None;
    let mut pod: Option<(usize, String)> = None;
    let mut in_kubepods = false;
    for (depth, &component) in components.iter().enumerate() {
        let parent = depth.checked_sub(1).map(|i| components[i]);
        if component.starts_with("kubepods") || component.contains("-kubepods") {
            in_kubepods = true;
        }
        if in_kubepods {
            if let Some(uid) = pod_uid_of(component) {
                pod = Some((depth, uid));
                continue;
            }
        }
        let pod_is_parent = pod.as_ref().is_some_and(|(d, _)| d + 1 == depth);
        if let Some((runtime, id)) = recognise_component(component, parent, pod_is_parent) {
            innermost = Some((depth, runtime, id));
        }
    }
    match (innermost, pod) {
        (Some((depth, runtime, id)), pod) => Some(Container {
            runtime,
            id,
            pod_uid: pod.filter(|(d, _)| *d < depth).map(|(_, uid)| uid),
        }),
        (None, Some((_, uid))) => Some(Container {
            runtime: ContainerRuntime::Unknown,
            id: String::new(),
            pod_uid: Some(uid),
        }),
        (None, None) => None,
    }
}

/// Recognises one path component as a container, given its parent
/// component and whether the parent is a Kubernetes pod directory.
fn recognise_component(
    component: &str,
    parent: Option<&str>,
    pod_is_parent: bool,
) -> Option<(ContainerRuntime, String)> {
    use ContainerRuntime::*;
    let scoped = |prefix: &str| {
        component
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(".scope"))
            .filter(|id| is_container_id(id))
            .map(str::to_owned)
    };
    let bare = |prefix: &str| {
        component
            .strip_prefix(prefix)
            .filter(|id| is_container_id(id))
            .map(str::to_owned)
    };
    if let Some(id) = scoped("docker-") {
        return Some((Docker, id));
    }
    if let Some(id) = scoped("libpod-").or_else(|| bare("libpod-")) {
        return Some((Podman, id));
    }
    if let Some(id) = scoped("cri-containerd-").or_else(|| scoped("nerdctl-")) {
        return Some((Containerd, id));
    }
    if let Some(id) = scoped("crio-").or_else(|| bare("crio-")) {
        return Some((Crio, id));
    }
    if let Some(name) = component.strip_prefix("lxc.payload.") {
        return Some((Lxc, name.to_owned()));
    }
    if let Some(name) = component
        .strip_prefix("machine-")
        .and_then(|rest| rest.strip_suffix(".scope"))
        .map(unescape_systemd)
        .filter(|name| !is_libvirt_vm(name))
    {
        return Some((Nspawn, name));
    }
    if let Some(name) = component
        .strip_prefix("systemd-nspawn@")
        .and_then(|rest| rest.strip_suffix(".service"))
    {
        return Some((Nspawn, unescape_systemd(name)));
    }
    match parent {
        Some("docker") if is_container_id(component) => Some((Docker, component.to_owned())),
        Some("lxc" | "lxc.payload") => Some((Lxc, component.to_owned())),
        _ if pod_is_parent && is_container_id(component) => {
            Some((Containerd, component.to_owned()))
        }
        _ => None,
    }
}

/// The candidate container id in `path`: the deepest bare 64-hex
/// component, when [`container_from_path`] recognises nothing in the path.
/// `/PARENT/<id>` (Docker's `--cgroup-parent`, cgroupfs driver),
/// `/../<id>` (a sibling seen through a cgroup namespace), `/<id>`, and
/// such a directory with sub-cgroups below it (`/PARENT/<id>/init`) all
/// qualify. `None` for a path a runtime layout explains.
pub fn candidate_from_path(path: &str) -> Option<String> {
    if container_from_path(path).is_some() {
        return None;
    }
    path.split('/')
        .rfind(|component| is_container_id(component))
        .map(str::to_owned)
}

/// The candidate of the first path (in
/// [`CgroupMembership::paths_by_preference`] order) that has one, if no
/// path of `membership` reveals a container.
pub fn candidate_from_membership(membership: &CgroupMembership) -> Option<String> {
    if container_from_membership(membership).is_some() {
        return None;
    }
    membership
        .paths_by_preference()
        .into_iter()
        .find_map(candidate_from_path)
}

/// The pod UID (dashed) of a Kubernetes pod cgroup component:
/// `pod<uid>` (cgroupfs) or `<prefix>-pod<uid_with_underscores>.slice`
/// (systemd).
fn pod_uid_of(component: &str) -> Option<String> {
    let raw = if let Some(slice) = component.strip_suffix(".slice") {
        slice.rsplit_once("-pod").map(|(_, uid)| uid)?
    } else {
        component.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    let plausible = !uid.is_empty()
        && uid.bytes().any(|b| b.is_ascii_hexdigit())
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    plausible.then(|| uid.to_ascii_lowercase())
}

/// A runtime container id: exactly 64 lower-case hex digits.
fn is_container_id(candidate: &str) -> bool {
    candidate.len() == 64
        && candidate
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// libvirt registers its QEMU guests with machined as `machine-qemu-...`;
/// the process in that scope is the host-side emulator, not a container.
fn is_libvirt_vm(machine_name: &str) -> bool {
    machine_name.starts_with("qemu-")
}

/// Undoes systemd unit-name escaping (`\x2d` -> `-`). Returns the input
/// unchanged when the escapes do not decode to UTF-8.
pub fn unescape_systemd(escaped: &str) -> String {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.get(i + 1) == Some(&b'x') {
            let decoded = escaped
                .get(i + 2..i + 4)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            if let Some(byte) = decoded {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| escaped.to_owned())
}

/// True when the peer's namespaces show it is not on the host, i.e. any of
/// its pid, mount, network, user, UTS, IPC or cgroup namespaces differs from
/// the daemon's (`host`).
///
/// A namespace the daemon could not read for itself (0 in `host`) is not
/// compared. A namespace the daemon could not read for the peer (0 in
/// `peer`, e.g. a non-dumpable process of another user) counts as
/// different: the daemon cannot prove the peer shares it, and an unproven
/// peer is not the host.
pub fn is_namespaced(peer: &Namespaces, host: &Namespaces) -> bool {
    let pairs = [
        (peer.pid, host.pid),
        (peer.mnt, host.mnt),
        (peer.net, host.net),
        (peer.user, host.user),
        (peer.uts, host.uts),
        (peer.ipc, host.ipc),
        (peer.cgroup, host.cgroup),
    ];
    pairs.iter().any(|&(peer, host)| host != 0 && peer != host)
}

/// What [`classify`] concluded about a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classification {
    /// The container, as far as the cgroups and namespaces prove it.
    pub container: Container,
    /// A container id the cgroup path suggests but no runtime layout
    /// explains ([`candidate_from_path`]); `container` is then
    /// [`ContainerRuntime::Unknown`] until a runtime confirms it.
    pub candidate: Option<String>,
}

/// The container a peer is in: what its cgroups reveal, else
/// [`ContainerRuntime::Unknown`] when they hold a candidate id or its
/// namespaces differ from the host's ([`is_namespaced`]), else the host.
///
/// A candidate is unknown even in the host's namespaces: a cgroup named
/// like a container is not proof of the host either.
pub fn classify(
    membership: &CgroupMembership,
    peer: &Namespaces,
    host: &Namespaces,
) -> Classification {
    if let Some(container) = container_from_membership(membership) {
        return Classification {
            container,
            candidate: None,
        };
    }
    let candidate = candidate_from_membership(membership);
    let container = if candidate.is_some() || is_namespaced(peer, host) {
        Container {
            runtime: ContainerRuntime::Unknown,
            ..Container::default()
        }
    } else {
        Container::default()
    };
    Classification {
        container,
        candidate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ContainerRuntime::*;

    const DOCKER_ID: &str = "3f4e2a9c1b7d8e6f5a4c3b2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const PODMAN_ID: &str = "9b1e5d2c7a4f3e8d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d";
    const CTR_ID: &str = "c0ffee0123456789abcdef0123456789abcdef0123456789abcdef0123456789";
    const CRIO_ID: &str = "5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f";
    const POD_UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const POD_UID_UNDERSCORED: &str = "0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0";

    fn container(runtime: ContainerRuntime, id: &str, pod: Option<&str>) -> Option<Container> {
        Some(Container {
            runtime,
            id: id.to_owned(),
            pod_uid: pod.map(str::to_owned),
        })
    }

    #[test]
    fn classifies_cgroup_paths_of_every_runtime_and_driver() {
        let cases: Vec<(String, Option<Container>)> = vec![
            // Docker, cgroupfs driver (v1 and v2) and systemd driver.
            (format!("/docker/{DOCKER_ID}"), container(Docker, DOCKER_ID, None)),
            (
                format!("/system.slice/docker-{DOCKER_ID}.scope"),
                container(Docker, DOCKER_ID, None),
            ),
            (
                format!("/docker/{DOCKER_ID}/init.scope"),
                container(Docker, DOCKER_ID, None),
            ),
            // Rootless Docker under the user's manager.
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/docker-{DOCKER_ID}.scope"
                ),
                container(Docker, DOCKER_ID, None),
            ),
            // Docker in Docker: the inner container wins.
            (
                format!("/docker/{DOCKER_ID}/docker/{CTR_ID}"),
                container(Docker, CTR_ID, None),
            ),
            // Podman rootful, rootless, with a systemd payload, in a pod,
            // and with the cgroupfs driver.
            (
                format!("/machine.slice/libpod-{PODMAN_ID}.scope"),
                container(Podman, PODMAN_ID, None),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{PODMAN_ID}.scope"
                ),
                container(Podman, PODMAN_ID, None),
            ),
            (
                format!("/machine.slice/libpod-{PODMAN_ID}.scope/container"),
                container(Podman, PODMAN_ID, None),
            ),
            (
                format!(
                    "/machine.slice/machine-libpod_pod_{CTR_ID}.slice/libpod-{PODMAN_ID}.scope"
                ),
                container(Podman, PODMAN_ID, None),
            ),
            (
                format!("/libpod_parent/libpod-{PODMAN_ID}"),
                container(Podman, PODMAN_ID, None),
            ),
            // Kubernetes, systemd driver: containerd and CRI-O, every QoS.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_UNDERSCORED}.slice/cri-containerd-{CTR_ID}.scope"
                ),
                container(Containerd, CTR_ID, Some(POD_UID)),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_UID_UNDERSCORED}.slice/crio-{CRIO_ID}.scope"
                ),
                container(Crio, CRIO_ID, Some(POD_UID)),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-pod{POD_UID_UNDERSCORED}.slice/cri-containerd-{CTR_ID}.scope"
                ),
                container(Containerd, CTR_ID, Some(POD_UID)),
            ),
            // kind / kubelet-in-a-container layout, nested in Docker.
            (
                format!(
                    "/docker/{DOCKER_ID}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{POD_UID_UNDERSCORED}.slice/cri-containerd-{CTR_ID}.scope"
                ),
                container(Containerd, CTR_ID, Some(POD_UID)),
            ),
            // Kubernetes, cgroupfs driver.
            (
                format!("/kubepods/burstable/pod{POD_UID}/{CTR_ID}"),
                container(Containerd, CTR_ID, Some(POD_UID)),
            ),
            (
                format!("/kubepods/besteffort/pod{POD_UID}/crio-{CRIO_ID}"),
                container(Crio, CRIO_ID, Some(POD_UID)),
            ),
            (
                format!("/kubepods/pod{POD_UID}/{CTR_ID}"),
                container(Containerd, CTR_ID, Some(POD_UID)),
            ),
            // A process in the pod's cgroup, outside any container.
            (
                format!("/kubepods/burstable/pod{POD_UID}"),
                container(Unknown, "", Some(POD_UID)),
            ),
            // nerdctl (containerd without Kubernetes).
            (
                format!("/system.slice/nerdctl-{CTR_ID}.scope"),
                container(Containerd, CTR_ID, None),
            ),
            // LXC: cgroupfs, LXC 4+ payload, older payload tree.
            ("/lxc/web01".into(), container(Lxc, "web01", None)),
            ("/lxc.payload.web01".into(), container(Lxc, "web01", None)),
            ("/lxc.payload.web01/init.scope".into(), container(Lxc, "web01", None)),
            ("/lxc.payload/web01".into(), container(Lxc, "web01", None)),
            // systemd-nspawn, with escaped names and a payload subtree.
            (
                "/machine.slice/machine-build\\x2dbox.scope".into(),
                container(Nspawn, "build-box", None),
            ),
            (
                "/machine.slice/systemd-nspawn@debian\\x2dsid.service/payload".into(),
                container(Nspawn, "debian-sid", None),
            ),
            (
                "/machine.slice/systemd-nspawn@arch.service/payload/system.slice/sshd.service"
                    .into(),
                container(Nspawn, "arch", None),
            ),
            // Host paths and host-side helpers: nothing.
            ("/".into(), None),
            ("".into(), None),
            ("/user.slice/user-0.slice/session-3.scope".into(), None),
            ("/system.slice/docker.service".into(), None),
            ("/system.slice/containerd.service".into(), None),
            (format!("/machine.slice/libpod-conmon-{PODMAN_ID}.scope"), None),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_UID_UNDERSCORED}.slice/crio-conmon-{CRIO_ID}.scope"
                ),
                container(Unknown, "", Some(POD_UID)),
            ),
            ("/lxc.monitor.web01".into(), None),
            ("/lxc.monitor/web01".into(), None),
            ("/machine.slice/machine-qemu\\x2d1\\x2dwin11.scope".into(), None),
            ("/machine.slice".into(), None),
            // Look-alikes: short ids, upper case, no kubepods context.
            ("/docker/3f4e2a9c1b7d".into(), None),
            (format!("/docker/{}", DOCKER_ID.to_uppercase()), None),
            (format!("/system.slice/docker-{DOCKER_ID}.service"), None),
            (format!("/pod{POD_UID}/{CTR_ID}"), None),
            ("/process_api/e0919b67e30e5d49acfa72408425e16a".into(), None),
            ("/user.slice/user-1000.slice/user@1000.service/app.slice/podman.service".into(), None),
        ];
        for (path, expected) in cases {
            assert_eq!(container_from_path(&path), expected, "path {path:?}");
        }
    }

    #[test]
    fn bare_ids_are_candidates_never_containers() {
        let cases: Vec<(String, Option<&str>)> = vec![
            // Docker --cgroup-parent, cgroupfs driver.
            (format!("/pbus-parent/{DOCKER_ID}"), Some(DOCKER_ID)),
            (format!("/a/b/{DOCKER_ID}"), Some(DOCKER_ID)),
            (format!("/{DOCKER_ID}"), Some(DOCKER_ID)),
            // A sibling container seen through a cgroup namespace.
            (format!("/../{DOCKER_ID}"), Some(DOCKER_ID)),
            (format!("/../../parent/{DOCKER_ID}"), Some(DOCKER_ID)),
            // Sub-cgroups below the container's directory.
            (format!("/pbus-parent/{DOCKER_ID}/init"), Some(DOCKER_ID)),
            // The deepest id wins.
            (format!("/{CTR_ID}/{DOCKER_ID}"), Some(DOCKER_ID)),
            // Known layouts are containers, not candidates.
            (format!("/docker/{DOCKER_ID}"), None),
            (
                format!("/../../system.slice/docker-{DOCKER_ID}.scope"),
                None,
            ),
            (format!("/kubepods/burstable/pod{POD_UID}/{CTR_ID}"), None),
            // No 64-hex component, or a look-alike.
            ("/".into(), None),
            ("/..".into(), None),
            (
                "/../../user.slice/user-0.slice/session-3.scope".into(),
                None,
            ),
            (format!("/p/{}", &DOCKER_ID[..63]), None),
            (format!("/p/{}", DOCKER_ID.to_uppercase()), None),
            (format!("/p/{DOCKER_ID}0"), None),
        ];
        for (path, expected) in cases {
            assert_eq!(
                candidate_from_path(&path).as_deref(),
                expected,
                "path {path:?}"
            );
            if expected.is_some() {
                assert_eq!(container_from_path(&path), None, "path {path:?}");
            }
        }
    }

    #[test]
    fn a_candidate_is_unknown_even_in_host_namespaces() {
        let host = host_namespaces();
        let membership = parse_proc_cgroup(&format!("0::/pbus-parent/{DOCKER_ID}\n"));
        let classification = classify(&membership, &host, &host);
        assert_eq!(classification.container.runtime, Unknown);
        assert_eq!(classification.container.id, "");
        assert_eq!(classification.candidate.as_deref(), Some(DOCKER_ID));
        // A v1-only runtime on a hybrid host: the candidate is in name=systemd.
        let hybrid = parse_proc_cgroup(&format!(
            "4:memory:/pbus-parent/{DOCKER_ID}\n1:name=systemd:/pbus-parent/{DOCKER_ID}\n0::/\n"
        ));
        assert_eq!(
            candidate_from_membership(&hybrid).as_deref(),
            Some(DOCKER_ID)
        );
        // A recognised container anywhere wins over a candidate.
        let both = parse_proc_cgroup(&format!(
            "1:name=systemd:/p/{CTR_ID}\n0::/docker/{DOCKER_ID}\n"
        ));
        assert_eq!(candidate_from_membership(&both), None);
        assert_eq!(
            classify(&both, &host, &host).container,
            container(Docker, DOCKER_ID, None).unwrap()
        );
    }

    #[test]
    fn parses_v1_v2_and_hybrid_proc_cgroup() {
        let text = format!(
            "12:pids:/docker/{DOCKER_ID}\n\
             4:cpu,cpuacct:/docker/{DOCKER_ID}\n\
             1:name=systemd:/docker/{DOCKER_ID}\n\
             0::/\n"
        );
        let membership = parse_proc_cgroup(&text);
        assert_eq!(membership.v2.as_deref(), Some("/"));
        assert_eq!(membership.v1.len(), 3);
        assert_eq!(membership.v1[1].hierarchy_id, 4);
        assert_eq!(membership.v1[1].controllers, ["cpu", "cpuacct"]);
        let docker_path = format!("/docker/{DOCKER_ID}");
        assert_eq!(membership.v1_path("cpuacct"), Some(docker_path.as_str()));
        assert_eq!(membership.systemd_v1_path(), Some(docker_path.as_str()));
        assert_eq!(membership.v1_path("memory"), None);
        assert_eq!(
            membership.paths_by_preference(),
            [
                "/",
                docker_path.as_str(),
                docker_path.as_str(),
                docker_path.as_str()
            ]
        );
        // The v2 root says nothing; the v1-only runtime's path is reported.
        assert_eq!(membership.primary_path(), docker_path);
        assert_eq!(
            container_from_membership(&membership),
            container(Docker, DOCKER_ID, None)
        );
    }

    #[test]
    fn paths_containing_colons_and_garbage_lines() {
        let membership = parse_proc_cgroup("garbage\nx:cpu:/a\n0::/odd:name\n\n");
        assert_eq!(membership.v2.as_deref(), Some("/odd:name"));
        assert!(membership.v1.is_empty());
    }

    #[test]
    fn primary_path_prefers_v2_then_systemd() {
        let pure_v2 = parse_proc_cgroup("0::/user.slice/user-0.slice/session-3.scope\n");
        assert_eq!(
            pure_v2.primary_path(),
            "/user.slice/user-0.slice/session-3.scope"
        );
        let hybrid = parse_proc_cgroup(
            "1:name=systemd:/user.slice/user-0.slice/session-3.scope\n\
             0::/user.slice/user-0.slice/session-3.scope\n",
        );
        assert_eq!(
            hybrid.primary_path(),
            "/user.slice/user-0.slice/session-3.scope"
        );
        let legacy = parse_proc_cgroup("2:memory:/x\n1:name=systemd:/system.slice/a.service\n");
        assert_eq!(legacy.primary_path(), "/system.slice/a.service");
        let empty_v2 = parse_proc_cgroup("1:name=systemd:/s\n0::\n");
        assert_eq!(empty_v2.primary_path(), "/s");
        let both_root = parse_proc_cgroup("1:name=systemd:/\n0::/\n");
        assert_eq!(both_root.primary_path(), "/");
        assert_eq!(parse_proc_cgroup("").primary_path(), "");
    }

    #[test]
    fn hierarchy_preference_v2_then_systemd_then_controllers() {
        // v2 wins over a disagreeing v1.
        let text = format!("1:name=systemd:/lxc/old\n0::/system.slice/docker-{DOCKER_ID}.scope\n");
        assert_eq!(
            container_from_membership(&parse_proc_cgroup(&text)),
            container(Docker, DOCKER_ID, None)
        );
        // name=systemd wins over other controllers.
        let text = format!(
            "3:memory:/lxc/other\n1:name=systemd:/machine.slice/libpod-{PODMAN_ID}.scope\n0::/\n"
        );
        assert_eq!(
            container_from_membership(&parse_proc_cgroup(&text)),
            container(Podman, PODMAN_ID, None)
        );
        // Only a plain controller knows.
        let text = format!(
            "5:memory:/kubepods/besteffort/pod{POD_UID}/{CTR_ID}\n1:name=systemd:/\n0::/\n"
        );
        assert_eq!(
            container_from_membership(&parse_proc_cgroup(&text)),
            container(Containerd, CTR_ID, Some(POD_UID))
        );
        // Host everywhere.
        let text =
            "9:name=systemd:/\n4:memory:/process_api/e0919b67e30e5d49acfa72408425e16a\n0::/\n";
        assert_eq!(container_from_membership(&parse_proc_cgroup(text)), None);
    }

    #[test]
    fn unescapes_systemd_names() {
        assert_eq!(unescape_systemd("build\\x2dbox"), "build-box");
        assert_eq!(unescape_systemd("a\\x20b\\x2fc"), "a b/c");
        assert_eq!(unescape_systemd("plain"), "plain");
        assert_eq!(unescape_systemd("bad\\xZZ"), "bad\\xZZ");
        assert_eq!(unescape_systemd("short\\x2"), "short\\x2");
        assert_eq!(unescape_systemd("invalid\\xff"), "invalid\\xff");
    }

    fn host_namespaces() -> Namespaces {
        Namespaces {
            pid: 4026531836,
            mnt: 4026531841,
            net: 4026531840,
            user: 4026531837,
            ipc: 4026531839,
            uts: 4026531838,
            cgroup: 4026531835,
        }
    }

    #[test]
    fn any_differing_namespace_means_namespaced() {
        let host = host_namespaces();
        assert!(!is_namespaced(&host, &host));
        let setters: [fn(&mut Namespaces); 7] = [
            |n| n.pid = 4026532001,
            |n| n.mnt = 4026532002,
            |n| n.net = 4026532003,
            |n| n.user = 4026532004,
            |n| n.uts = 4026532005,
            |n| n.ipc = 4026532006,
            |n| n.cgroup = 4026532007,
        ];
        for (i, set) in setters.iter().enumerate() {
            let mut peer = host;
            set(&mut peer);
            assert!(is_namespaced(&peer, &host), "namespace #{i}");
        }
    }

    #[test]
    fn unreadable_namespaces_fail_closed_for_peers_only() {
        let host = host_namespaces();
        let mut peer = host;
        peer.mnt = 0;
        assert!(is_namespaced(&peer, &host));
        let mut host_without_cgroup_ns = host;
        host_without_cgroup_ns.cgroup = 0;
        let mut peer = host_without_cgroup_ns;
        peer.cgroup = 4026532007;
        assert!(!is_namespaced(&peer, &host_without_cgroup_ns));
    }

    #[test]
    fn classify_combines_cgroups_and_namespaces() {
        let host = host_namespaces();
        let mut netns_only = host;
        netns_only.net = 4026532300;
        let on_host = parse_proc_cgroup("0::/user.slice/user-0.slice/session-3.scope\n");
        assert_eq!(
            classify(&on_host, &host, &host).container,
            Container::default()
        );
        assert_eq!(
            classify(&on_host, &netns_only, &host).container,
            Container {
                runtime: Unknown,
                id: String::new(),
                pod_uid: None
            }
        );
        let in_docker = parse_proc_cgroup(&format!("0::/docker/{DOCKER_ID}\n"));
        // The cgroup is enough even when the namespaces are shared.
        assert_eq!(
            classify(&in_docker, &host, &host).container,
            container(Docker, DOCKER_ID, None).unwrap()
        );
        assert_eq!(
            classify(&in_docker, &netns_only, &host).container,
            container(Docker, DOCKER_ID, None).unwrap()
        );
    }
}
