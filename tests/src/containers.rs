//! Containers for real: cgroup directories shaped exactly like each
//! container runtime's, with real processes in them, optionally in new
//! namespaces, so the daemon's identity code is tested against the kernel
//! rather than against strings.
//!
//! * [`FakeContainer`] creates the cgroup directories of one container of
//!   a given [`Shape`] (Docker, Podman, Kubernetes with containerd or
//!   CRI-O, LXC, systemd-nspawn, or a plain directory no runtime uses) in
//!   the cgroup v2 hierarchy, in systemd's named v1 hierarchy
//!   (`name=systemd`), or in both ([`Placement`]). The hierarchies are
//!   found in the mount table ([`pbus_identity::CgroupMounts`]), never
//!   assumed. Ids are unique per test run (test pid + counter) and look
//!   like the real thing (64 hex digits, dashed pod UIDs).
//! * [`FakeContainer::spawn_peer`] starts the `pbus-test-peer` helper
//!   inside it: a small `sh` moves itself into the container's cgroups
//!   (writing `0` to `cgroup.procs` moves the writer) and then `exec`s the
//!   peer, through `unshare` when [`Isolation`] asks for new pid, mount,
//!   user, network, UTS, IPC or cgroup namespaces, so the peer is in the
//!   container *before* it connects. [`FakeContainer::spawn_joining`]
//!   starts a second peer in the namespaces of a first one (`nsenter`),
//!   or in a pid namespace nested below them.
//! * [`ContainerPeer`] is the spawned peer: its host pid, its pid in each
//!   pid namespace (`NSpid`), and a line protocol over stdin/stdout
//!   ([`PeerProcess`]) to make it call other peers ([`ContainerPeer::who_is`]),
//!   ask the bus about identities ([`ContainerPeer::identity_of`]), and
//!   emit and receive broadcast signals (the helper's `interact`
//!   subcommand). [`ContainerPeer::on_host`] starts the same helper on the
//!   host, for the other side of a test.
//! * [`FakeContainer::expected`] is what the bus must report for it
//!   ([`ContainerView`]: runtime, id, pod UID); [`check_pbusctl_status`]
//!   checks the operator's view (`pbusctl --json status`) when pbusctl is
//!   built.
//! * Dropping a [`FakeContainer`] kills every process in its cgroups (by
//!   the pids listed in its own, unique `cgroup.procs`, never by name),
//!   waits until they are gone, and removes its directories deepest
//!   first; parents it had to create (`/kubepods.slice`, ...) are removed
//!   once no container of this test process uses them. It does so even
//!   when the test fails. [`FakeContainer::remove`] does the same and
//!   reports what could not be removed.
//!
//! Everything here needs root (creating cgroups, moving processes,
//! `unshare`); call [`require_root`](crate::require_root) first. Nothing
//! here knows about the daemon's internals.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use pbus::{Connection, Outgoing, SenderInfo};
use pbus_identity::{CgroupMount, CgroupMounts};
use pbus_proto::v1::{ContainerInfo, ContainerRuntime};

use crate::messages::{Identity, Text};
use crate::{
    pbusctl_binary, signal_pid, test_peer_binary, unique_suffix, PeerProcess, TestBus, TIMEOUT,
};

/// The cgroup layout of one kind of container, as its runtime creates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Docker, cgroupfs driver: `/docker/<id>`.
    DockerCgroupfs,
    /// Docker, systemd driver: `/system.slice/docker-<id>.scope`.
    DockerSystemd,
    /// Podman, rootful: `/machine.slice/libpod-<id>.scope`.
    Podman,
    /// Podman, rootless, under the user's systemd instance:
    /// `/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-<id>.scope`.
    PodmanRootless,
    /// Podman's conmon monitor next to a container
    /// (`/machine.slice/libpod-conmon-<id>.scope`): a host process, not a
    /// container.
    PodmanConmon,
    /// Kubernetes with containerd, systemd driver, burstable pod:
    /// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`.
    KubeContainerd,
    /// Kubernetes with containerd, systemd driver, guaranteed pod (no QoS
    /// slice): `/kubepods.slice/kubepods-pod<uid_>.slice/cri-containerd-<id>.scope`.
    KubeContainerdGuaranteed,
    /// Kubernetes with CRI-O, systemd driver, best-effort pod:
    /// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/crio-<id>.scope`.
    KubeCrio,
    /// CRI-O's conmon scope in a pod's slice
    /// (`.../kubepods-besteffort-pod<uid_>.slice/crio-conmon-<id>.scope`):
    /// in the pod, but not the container.
    KubeCrioConmon,
    /// Kubernetes, cgroupfs driver (containerd): `/kubepods/besteffort/pod<uid>/<id>`.
    KubeCgroupfs,
    /// LXC 4+: `/lxc.payload.<name>`.
    LxcPayload,
    /// Older LXC: `/lxc/<name>`.
    Lxc,
    /// LXC's monitor process (`/lxc.monitor.<name>`): a host process.
    LxcMonitor,
    /// systemd-nspawn registered with machined:
    /// `/machine.slice/machine-<escaped name>.scope` (`-` escaped as `\x2d`).
    Nspawn,
    /// A directory no runtime uses (`/pbus-test-<suffix>`): the cgroup says
    /// nothing, only namespaces can.
    Plain,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 15] = [
        Shape::DockerCgroupfs,
        Shape::DockerSystemd,
        Shape::Podman,
        Shape::PodmanRootless,
        Shape::PodmanConmon,
        Shape::KubeContainerd,
        Shape::KubeContainerdGuaranteed,
        Shape::KubeCrio,
        Shape::KubeCrioConmon,
        Shape::KubeCgroupfs,
        Shape::LxcPayload,
        Shape::Lxc,
        Shape::LxcMonitor,
        Shape::Nspawn,
        Shape::Plain,
    ];
}

/// Which cgroup hierarchies a container's processes are placed in. A
/// process's v2 path and its v1 `name=systemd` path are independent; the
/// other one stays wherever the test process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Only the cgroup v2 (unified) hierarchy.
    Unified,
    /// Only systemd's named v1 hierarchy (`name=systemd`).
    SystemdV1,
    /// Both, at the same path (what runtimes do on a hybrid host).
    Both,
}

impl Placement {
    /// Every placement.
    pub const ALL: [Placement; 3] = [Placement::Unified, Placement::SystemdV1, Placement::Both];

    fn unified(self) -> bool {
        matches!(self, Self::Unified | Self::Both)
    }

    fn systemd_v1(self) -> bool {
        matches!(self, Self::SystemdV1 | Self::Both)
    }
}

/// A fake container of `shape` in the first of `placements` this machine
/// offers. `None` when it offers none: the calling test skips (or fails,
/// see [`privilege::skip`](crate::privilege::skip)) with every reason.
pub fn container_or_skip(shape: Shape, placements: &[Placement]) -> Option<FakeContainer> {
    let mut reasons = Vec::new();
    for &placement in placements {
        match FakeContainer::create(shape, placement) {
            Ok(container) => return Some(container),
            Err(why) => reasons.push(format!("{placement:?}: {why}")),
        }
    }
    crate::privilege::skip(&format!(
        "no cgroup hierarchy for a {shape:?} container: {reasons:?}"
    ));
    None
}

/// A container as the bus reports it: runtime, id, pod UID (empty when
/// none). Compared with what the bus stamps and answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerView {
    /// The runtime (`Host` when not in a container).
    pub runtime: ContainerRuntime,
    /// Container id or name; empty on the host or when unknown.
    pub id: String,
    /// Kubernetes pod UID (dashed), empty outside a pod.
    pub pod_uid: String,
}

impl ContainerView {
    /// Not in a container.
    pub fn host() -> Self {
        Self::new(ContainerRuntime::Host, "", "")
    }

    /// In namespaces of its own but in no known cgroup.
    pub fn unknown() -> Self {
        Self::new(ContainerRuntime::Unknown, "", "")
    }

    /// A view from its parts.
    pub fn new(runtime: ContainerRuntime, id: &str, pod_uid: &str) -> Self {
        Self {
            runtime,
            id: id.to_owned(),
            pod_uid: pod_uid.to_owned(),
        }
    }

    /// The view of a wire `ContainerInfo` (absent means the host).
    pub fn of(info: Option<&ContainerInfo>) -> Self {
        let info = info.cloned().unwrap_or_default();
        Self {
            runtime: ContainerRuntime::try_from(info.runtime).unwrap_or_else(|_| {
                panic!("the bus sent an unknown container runtime {}", info.runtime)
            }),
            id: info.id,
            pod_uid: info.pod_uid,
        }
    }

    /// From the `runtime=... id=... pod=...` words of the helper's output.
    fn from_words(words: &Words) -> Self {
        let runtime = words.get("runtime");
        Self {
            runtime: ContainerRuntime::from_str_name(runtime)
                .unwrap_or_else(|| panic!("unknown runtime {runtime:?} in {:?}", words.line)),
            id: words.value("id"),
            pod_uid: words.value("pod"),
        }
    }
}

/// New namespaces for a spawned peer (made with `unshare`). The default is
/// none: the peer shares the test's namespaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Isolation {
    /// A new pid namespace (the peer is its pid 1), with a new mount
    /// namespace and its own `/proc` (`--pid --fork --mount-proc`).
    pub pid: bool,
    /// A new mount namespace (implied by `pid`).
    pub mount: bool,
    /// A new user namespace mapping the caller to root inside.
    pub user: bool,
    /// A new network namespace.
    pub net: bool,
    /// A new UTS namespace.
    pub uts: bool,
    /// A new IPC namespace.
    pub ipc: bool,
    /// A new cgroup namespace rooted at the container's cgroup.
    pub cgroup: bool,
}

impl Isolation {
    /// No new namespaces.
    pub fn none() -> Self {
        Self::default()
    }

    /// A new pid namespace (and with it a mount namespace and `/proc`).
    pub fn pid() -> Self {
        Self {
            pid: true,
            mount: true,
            ..Self::default()
        }
    }

    /// What a container runtime gives a container: new pid, mount, network,
    /// UTS, IPC and cgroup namespaces (no user namespace).
    pub fn container() -> Self {
        Self {
            pid: true,
            mount: true,
            net: true,
            uts: true,
            ipc: true,
            cgroup: true,
            user: false,
        }
    }

    /// Adds a user namespace.
    pub fn with_user(mut self) -> Self {
        self.user = true;
        self
    }

    /// Adds a network namespace.
    pub fn with_net(mut self) -> Self {
        self.net = true;
        self
    }

    /// Adds UTS and IPC namespaces.
    pub fn with_uts_ipc(mut self) -> Self {
        self.uts = true;
        self.ipc = true;
        self
    }

    /// True when any new namespace is asked for.
    pub fn is_namespaced(&self) -> bool {
        self.pid || self.mount || self.user || self.net || self.uts || self.ipc || self.cgroup
    }

    /// The `unshare` command line (without the program), or nothing when no
    /// namespace is asked for.
    fn unshare_args(&self) -> Vec<String> {
        if !self.is_namespaced() {
            return Vec::new();
        }
        let mut args = vec!["unshare".to_owned()];
        if self.user {
            args.extend(["--user".into(), "--map-root-user".into()]);
        }
        if self.pid {
            args.extend([
                "--pid".into(),
                "--fork".into(),
                "--kill-child".into(),
                "--mount-proc".into(),
            ]);
        } else if self.mount {
            args.push("--mount".into());
        }
        for (wanted, flag) in [
            (self.net, "--net"),
            (self.uts, "--uts"),
            (self.ipc, "--ipc"),
            (self.cgroup, "--cgroup"),
        ] {
            if wanted {
                args.push(flag.into());
            }
        }
        args.push("--".into());
        args
    }

    /// The `nsenter` command line entering `target`'s namespaces of the
    /// kinds this isolation made.
    fn nsenter_args(&self, target: u32) -> Vec<String> {
        let mut args = vec!["nsenter".to_owned(), format!("--target={target}")];
        for (wanted, flag) in [
            (self.user, "--user"),
            (self.pid, "--pid"),
            (self.mount || self.pid, "--mount"),
            (self.net, "--net"),
            (self.uts, "--uts"),
            (self.ipc, "--ipc"),
            (self.cgroup, "--cgroup"),
        ] {
            if wanted {
                args.push(flag.into());
            }
        }
        args.push("--".into());
        args
    }
}

/// Where a peer joining another one runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// In the same namespaces as the target.
    Same,
    /// In a new pid namespace (with its own mount namespace and `/proc`)
    /// nested below the target's.
    NestedPid,
}

/// Directories of cgroup hierarchies this test process created, with the
/// number of containers using each. Shared parents (`/kubepods.slice`,
/// `/machine.slice`, ...) are removed when the last user is gone; a
/// directory that already existed is never ours and never removed.
static CREATED_DIRECTORIES: Mutex<BTreeMap<PathBuf, usize>> = Mutex::new(BTreeMap::new());

fn created_directories() -> std::sync::MutexGuard<'static, BTreeMap<PathBuf, usize>> {
    CREATED_DIRECTORIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates (or takes a reference on) every directory from `mount_point`
/// down to `leaf` except the mount point itself; returns the directories
/// held, shallowest first. The leaf must be new.
fn acquire_directories(mount_point: &Path, leaf: &Path) -> Result<Vec<PathBuf>, String> {
    let relative = leaf
        .strip_prefix(mount_point)
        .map_err(|_| format!("{} is not under {}", leaf.display(), mount_point.display()))?;
    let mut registry = created_directories();
    let mut held = Vec::new();
    let mut dir = mount_point.to_path_buf();
    let components: Vec<_> = relative.components().collect();
    for (index, component) in components.iter().enumerate() {
        dir.push(component);
        let is_leaf = index + 1 == components.len();
        if let Some(users) = registry.get_mut(&dir) {
            if is_leaf {
                release_directories(&mut registry, &held);
                return Err(format!("{} is already in use", dir.display()));
            }
            *users += 1;
            held.push(dir.clone());
            continue;
        }
        match std::fs::create_dir(&dir) {
            Ok(()) => {
                registry.insert(dir.clone(), 1);
                held.push(dir.clone());
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && !is_leaf => {}
            Err(error) => {
                release_directories(&mut registry, &held);
                return Err(format!("cannot create {}: {error}", dir.display()));
            }
        }
    }
    Ok(held)
}

/// Drops one reference on each of `held` (deepest first) and removes the
/// directories nobody uses any more. Returns what could not be removed.
fn release_directories(registry: &mut BTreeMap<PathBuf, usize>, held: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for dir in held.iter().rev() {
        let Some(users) = registry.get_mut(dir) else {
            continue;
        };
        *users -= 1;
        if *users > 0 {
            continue;
        }
        registry.remove(dir);
        if let Err(error) = remove_cgroup_dir(dir) {
            failures.push(format!("{}: {error}", dir.display()));
        }
    }
    failures
}

/// rmdir(2) of a cgroup directory, retried for a moment while the kernel
/// finishes tearing down processes that just died (EBUSY).
fn remove_cgroup_dir(dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error)
                if error.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => return Err(error),
        }
    }
}

/// Deterministic, random-looking hex derived from `seed`.
fn hex_digits(seed: &str, count: usize) -> String {
    let mut out = String::new();
    let mut round = 0u64;
    while out.len() < count {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (seed, round).hash(&mut hasher);
        out.push_str(&format!("{:016x}", hasher.finish()));
        round += 1;
    }
    out.truncate(count);
    out
}

/// One hierarchy a container lives in: its mount and the container's
/// directory there.
#[derive(Debug)]
struct Hierarchy {
    /// `"cgroup v2"` or `"name=systemd"`, for messages.
    label: &'static str,
    /// The container's directory.
    directory: PathBuf,
    /// Directories held in the registry, shallowest first (the leaf last).
    held: Vec<PathBuf>,
}

/// The cgroup directories of one fake container; see the module docs.
#[derive(Debug)]
pub struct FakeContainer {
    shape: Shape,
    placement: Placement,
    id: String,
    name: String,
    pod_uid: String,
    cgroup_path: String,
    hierarchies: Vec<Hierarchy>,
    removed: bool,
}

impl FakeContainer {
    /// Creates the cgroup directories of a new container of `shape` in the
    /// hierarchies `placement` names. `Err` says why it cannot (a hierarchy
    /// is not mounted, or lies outside what this process's mount shows):
    /// the caller skips with that reason. Panics when creating a directory
    /// fails for another reason (not root?).
    pub fn create(shape: Shape, placement: Placement) -> Result<Self, String> {
        let mounts = CgroupMounts::detect().map_err(|error| format!("mountinfo: {error}"))?;
        let suffix = unique_suffix();
        let seed = format!("pbus-test {suffix} {shape:?}");
        let id = hex_digits(&format!("{seed} id"), 64);
        let uid_hex = hex_digits(&format!("{seed} pod"), 32);
        let pod_uid = format!(
            "{}-{}-{}-{}-{}",
            &uid_hex[0..8],
            &uid_hex[8..12],
            &uid_hex[12..16],
            &uid_hex[16..20],
            &uid_hex[20..32]
        );
        let name = format!("pbus-{suffix}");
        let mut container = Self {
            shape,
            placement,
            id,
            name,
            pod_uid,
            cgroup_path: String::new(),
            hierarchies: Vec::new(),
            removed: false,
        };
        container.cgroup_path = container.path_for_shape();
        let mut wanted: Vec<(&'static str, Option<&CgroupMount>)> = Vec::new();
        if placement.unified() {
            wanted.push(("cgroup v2", mounts.v2.as_ref()));
        }
        if placement.systemd_v1() {
            wanted.push((
                "name=systemd",
                mounts.v1_hierarchy(pbus_identity::cgroup::SYSTEMD_V1_HIERARCHY),
            ));
        }
        let mut plan = Vec::new();
        for (label, mount) in wanted {
            let mount = mount.ok_or_else(|| format!("the {label} hierarchy is not mounted"))?;
            let directory = mount.directory_for(&container.cgroup_path).ok_or_else(|| {
                format!(
                    "{} lies outside the {label} mount at {} (root {})",
                    container.cgroup_path,
                    mount.mount_point.display(),
                    mount.root
                )
            })?;
            plan.push((label, mount.mount_point.clone(), directory));
        }
        for (label, mount_point, directory) in plan {
            let held = acquire_directories(&mount_point, &directory)
                .unwrap_or_else(|error| panic!("creating the {shape:?} container: {error}"));
            container.hierarchies.push(Hierarchy {
                label,
                directory,
                held,
            });
        }
        Ok(container)
    }

    fn path_for_shape(&self) -> String {
        let (id, name, pod) = (&self.id, &self.name, &self.pod_uid);
        let pod_underscored = pod.replace('-', "_");
        match self.shape {
            Shape::DockerCgroupfs => format!("/docker/{id}"),
            Shape::DockerSystemd => format!("/system.slice/docker-{id}.scope"),
            Shape::Podman => format!("/machine.slice/libpod-{id}.scope"),
            Shape::PodmanRootless => format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{id}.scope"
            ),
            Shape::PodmanConmon => format!("/machine.slice/libpod-conmon-{id}.scope"),
            Shape::KubeContainerd => format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_underscored}.slice/cri-containerd-{id}.scope"
            ),
            Shape::KubeContainerdGuaranteed => format!(
                "/kubepods.slice/kubepods-pod{pod_underscored}.slice/cri-containerd-{id}.scope"
            ),
            Shape::KubeCrio => format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_underscored}.slice/crio-{id}.scope"
            ),
            Shape::KubeCrioConmon => format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod_underscored}.slice/crio-conmon-{id}.scope"
            ),
            Shape::KubeCgroupfs => format!("/kubepods/besteffort/pod{pod}/{id}"),
            Shape::LxcPayload => format!("/lxc.payload.{name}"),
            Shape::Lxc => format!("/lxc/{name}"),
            Shape::LxcMonitor => format!("/lxc.monitor.{name}"),
            Shape::Nspawn => format!("/machine.slice/machine-{}.scope", name.replace('-', "\\x2d")),
            Shape::Plain => format!("/pbus-test-{}", name.trim_start_matches("pbus-")),
        }
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The placement.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The cgroup path (as in `/proc/PID/cgroup`), the same in every
    /// hierarchy the container is placed in.
    pub fn cgroup_path(&self) -> &str {
        &self.cgroup_path
    }

    /// The container's directories, one per hierarchy it is placed in.
    pub fn directories(&self) -> Vec<&Path> {
        self.hierarchies
            .iter()
            .map(|hierarchy| hierarchy.directory.as_path())
            .collect()
    }

    /// The 64-hex id used by the runtimes that have one.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name used by LXC and nspawn shapes (unescaped).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod UID (dashed) used by the Kubernetes shapes.
    pub fn pod_uid(&self) -> &str {
        &self.pod_uid
    }

    /// What the bus must report for a peer in this container that shares
    /// the host's namespaces.
    pub fn expected(&self) -> ContainerView {
        use ContainerRuntime as R;
        let (id, name, pod) = (self.id.as_str(), self.name.as_str(), self.pod_uid.as_str());
        match self.shape {
            Shape::DockerCgroupfs | Shape::DockerSystemd => ContainerView::new(R::Docker, id, ""),
            Shape::Podman | Shape::PodmanRootless => ContainerView::new(R::Podman, id, ""),
            Shape::KubeContainerd | Shape::KubeContainerdGuaranteed | Shape::KubeCgroupfs => {
                ContainerView::new(R::Containerd, id, pod)
            }
            Shape::KubeCrio => ContainerView::new(R::Crio, id, pod),
            Shape::KubeCrioConmon => ContainerView::new(R::Unknown, "", pod),
            Shape::LxcPayload | Shape::Lxc => ContainerView::new(R::Lxc, name, ""),
            Shape::Nspawn => ContainerView::new(R::Nspawn, name, ""),
            Shape::PodmanConmon | Shape::LxcMonitor | Shape::Plain => ContainerView::host(),
        }
    }

    /// What the bus must report for a peer in this container with
    /// `isolation`: [`expected`](Self::expected), except that a
    /// namespaced peer whose cgroup names no container is `unknown`.
    pub fn expected_with(&self, isolation: Isolation) -> ContainerView {
        let expected = self.expected();
        if expected.runtime == ContainerRuntime::Host && isolation.is_namespaced() {
            ContainerView::unknown()
        } else {
            expected
        }
    }

    /// The `cgroup.procs` files a process writes `0` to in order to join.
    fn procs_files(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|hierarchy| hierarchy.directory.join("cgroup.procs"))
            .collect()
    }

    /// A command that moves itself into this container's cgroups and then
    /// execs `argv`.
    fn command_in_cgroups(&self, argv: &[OsString]) -> Command {
        const SCRIPT: &str = "n=$1; shift; \
            while [ \"$n\" -gt 0 ]; do echo 0 > \"$1\" || exit 97; shift; n=$((n - 1)); done; \
            exec \"$@\"";
        let files = self.procs_files();
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(SCRIPT)
            .arg("sh")
            .arg(files.len().to_string())
            .args(&files)
            .args(argv);
        command
    }

    /// Starts `pbus-test-peer SOCKET args...` in this container, in new
    /// namespaces per `isolation`. Returns once the peer process exists
    /// (it may not have connected yet: read its first line).
    pub async fn spawn_peer(
        &self,
        bus: &TestBus,
        isolation: Isolation,
        args: &[&str],
    ) -> ContainerPeer {
        self.start_peer(bus, isolation.unshare_args(), isolation, args)
            .await
    }

    /// Starts a second peer in this container, in `target`'s namespaces
    /// (`nsenter`), or in a pid namespace nested below them.
    pub async fn spawn_joining(
        &self,
        bus: &TestBus,
        target: &ContainerPeer,
        join: Join,
        args: &[&str],
    ) -> ContainerPeer {
        let mut wrapper = target.isolation.nsenter_args(target.host_pid());
        let mut isolation = target.isolation;
        if join == Join::NestedPid {
            let nested = Isolation::pid();
            wrapper.extend(nested.unshare_args());
            isolation.pid = true;
            isolation.mount = true;
        }
        self.start_peer(bus, wrapper, isolation, args).await
    }

    /// Starts `wrapper... pbus-test-peer SOCKET args...` in this
    /// container's cgroups; `isolation` is what the wrapper makes.
    async fn start_peer(
        &self,
        bus: &TestBus,
        wrapper: Vec<String>,
        isolation: Isolation,
        args: &[&str],
    ) -> ContainerPeer {
        let binary = test_peer_binary();
        let mut argv: Vec<OsString> = wrapper.into_iter().map(OsString::from).collect();
        argv.push(binary.clone().into());
        argv.push(bus.socket_path().into());
        argv.extend(args.iter().map(OsString::from));
        let command = self.command_in_cgroups(&argv);
        ContainerPeer::start(command, &binary, Some(self), isolation).await
    }

    /// Pids listed in this container's own `cgroup.procs` files.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .procs_files()
            .iter()
            .filter_map(|file| std::fs::read_to_string(file).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|line| line.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills every process in the container (SIGKILL to each pid in its
    /// own `cgroup.procs`) until none is left. Returns false on timeout.
    fn kill_all(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            for pid in pids {
                let _ = signal_pid(pid, Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills what is left in the container and removes its directories
    /// (and shared parents nobody else uses). Returns what could not be
    /// cleaned up; empty means everything is gone.
    pub fn remove(mut self) -> Vec<String> {
        self.cleanup()
    }

    /// Like [`remove`](Self::remove), and panics (naming `what`) unless
    /// everything is gone: no process left, none of the container's
    /// directories left.
    pub fn remove_or_panic(self, what: &str) {
        let directories: Vec<PathBuf> = self
            .hierarchies
            .iter()
            .map(|hierarchy| hierarchy.directory.clone())
            .collect();
        let failures = self.remove();
        assert!(failures.is_empty(), "{what}: cleanup: {failures:?}");
        for directory in directories {
            assert!(
                !directory.exists(),
                "{what}: {} left behind",
                directory.display()
            );
        }
    }

    fn cleanup(&mut self) -> Vec<String> {
        if self.removed {
            return Vec::new();
        }
        self.removed = true;
        let mut failures = Vec::new();
        if !self.kill_all() {
            failures.push(format!(
                "processes {:?} survived SIGKILL in {}",
                self.pids(),
                self.cgroup_path
            ));
        }
        let mut registry = created_directories();
        for hierarchy in &self.hierarchies {
            failures.extend(
                release_directories(&mut registry, &hierarchy.held)
                    .into_iter()
                    .map(|failure| format!("{}: {failure}", hierarchy.label)),
            );
        }
        failures
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        for failure in self.cleanup() {
            eprintln!("warning: cleaning up a fake container: {failure}");
        }
    }
}

/// One `/proc/PID/stat` line's parent pid and command name.
fn process_table() -> Vec<(u32, u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let open = stat.find('(')?;
            let close = stat.rfind(')')?;
            let comm = stat.get(open + 1..close)?.to_owned();
            let ppid = stat
                .get(close + 2..)?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid, comm))
        })
        .collect()
}

/// `root` and its descendants, with their command names.
fn descendants(root: u32) -> Vec<(u32, String)> {
    let table = process_table();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    let mut names: HashMap<u32, String> = HashMap::new();
    for (pid, ppid, name) in table {
        children.entry(ppid).or_default().push(pid);
        names.insert(pid, name);
    }
    let mut found = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if let Some(name) = names.remove(&pid) {
            found.push((pid, name));
        }
        stack.extend(children.get(&pid).into_iter().flatten().copied());
    }
    found
}

/// `root` and its descendants whose command name is `comm`.
fn descendants_named(root: u32, comm: &str) -> Vec<u32> {
    descendants(root)
        .into_iter()
        .filter(|(_, name)| name == comm)
        .map(|(pid, _)| pid)
        .collect()
}

/// The `NSpid` line of `/proc/PID/status`: the pid in each pid namespace,
/// the test's (host) first, the process's own last.
pub fn nspids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The inode of `/proc/PID/ns/KIND` (0 if unreadable).
pub fn namespace_inode(pid: u32, kind: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .map(|metadata| metadata.ino())
        .unwrap_or(0)
}

/// The v2 path (`0::` line) and the `name=systemd` path of process `pid`,
/// as this process sees `/proc/PID/cgroup`.
pub fn cgroup_paths(pid: u32) -> (Option<String>, Option<String>) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut v2 = None;
    let mut systemd = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "name=systemd") {
            systemd = Some(path.to_owned());
        }
    }
    (v2, systemd)
}

/// `key=value` words of one answer line from the helper.
#[derive(Debug)]
struct Words {
    line: String,
    values: HashMap<String, String>,
}

impl Words {
    fn parse(line: &str) -> Self {
        let values = line
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        Self {
            line: line.to_owned(),
            values,
        }
    }

    fn get(&self, key: &str) -> &str {
        self.values
            .get(key)
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.line))
    }

    /// The value, with the helper's `-` for empty turned back into "".
    fn value(&self, key: &str) -> String {
        match self.get(key) {
            "-" => String::new(),
            value => value.to_owned(),
        }
    }

    fn pid(&self, key: &str) -> u32 {
        self.get(key)
            .parse()
            .unwrap_or_else(|_| panic!("{key}= is not a number in {:?}", self.line))
    }
}

/// A failure the helper reported: `error <code> <name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperError {
    /// The wire error code (0 for local failures).
    pub code: i32,
    /// The error name.
    pub name: String,
}

impl HelperError {
    fn parse(line: &str) -> Option<Self> {
        let rest = line.strip_prefix("error ")?;
        let (code, name) = rest.split_once(' ').unwrap_or((rest, ""));
        Some(Self {
            code: code.parse().ok()?,
            name: name.to_owned(),
        })
    }
}

/// What one peer learned by calling another's `WhoAmI`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoIs {
    /// The callee's unique name as stamped on its reply.
    pub sender: String,
    /// The callee's pid stamped on its reply, as the caller sees it.
    pub sender_pid: u32,
    /// The callee's own `getpid()` (in its own pid namespace).
    pub own_pid: u32,
    /// The caller's unique name as stamped on the call.
    pub caller: String,
    /// The caller's pid stamped on the call, as the callee saw it.
    pub caller_pid: u32,
    /// The callee's container as stamped on its reply.
    pub container: ContainerView,
}

/// A broadcast signal as one peer received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalSeen {
    /// The sender's unique name as stamped.
    pub sender: String,
    /// The sender's pid as stamped for this receiver.
    pub sender_pid: u32,
    /// The signal's text.
    pub text: String,
    /// The sender's container as stamped.
    pub container: ContainerView,
}

/// A `GetPeerIdentity` answer as one peer got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityView {
    /// The unique name.
    pub unique_name: String,
    /// The pid as seen from the asker's pid namespace.
    pub pid: u32,
    /// The pid in the daemon's pid namespace, if the bus showed it.
    pub host_pid: u32,
    /// The container.
    pub container: ContainerView,
    /// The cgroup path.
    pub cgroup: String,
}

/// A `pbus-test-peer` process, possibly in a fake container and in new
/// namespaces. Derefs to its [`PeerProcess`] for the line protocol.
#[derive(Debug)]
pub struct ContainerPeer {
    process: PeerProcess,
    host_pid: u32,
    nspids: Vec<u32>,
    isolation: Isolation,
    unique_name: String,
}

impl Deref for ContainerPeer {
    type Target = PeerProcess;

    fn deref(&self) -> &PeerProcess {
        &self.process
    }
}

impl DerefMut for ContainerPeer {
    fn deref_mut(&mut self) -> &mut PeerProcess {
        &mut self.process
    }
}

impl ContainerPeer {
    /// Starts `pbus-test-peer SOCKET args...` on the host: no container
    /// cgroup, no new namespaces.
    pub async fn on_host(bus: &TestBus, args: &[&str]) -> Self {
        let binary = test_peer_binary();
        let mut command = Command::new(&binary);
        command.arg(bus.socket_path()).args(args);
        Self::start(command, &binary, None, Isolation::none()).await
    }

    async fn start(
        command: Command,
        binary: &Path,
        container: Option<&FakeContainer>,
        isolation: Isolation,
    ) -> Self {
        let comm: String = binary
            .file_name()
            .expect("binary has a file name")
            .to_string_lossy()
            .chars()
            .take(15)
            .collect();
        let mut process = PeerProcess::spawn(command);
        let deadline = Instant::now() + TIMEOUT;
        let host_pid = loop {
            let found = descendants_named(process.pid(), &comm);
            if let [pid] = found.as_slice() {
                break *pid;
            }
            assert!(
                found.len() < 2,
                "more than one {comm} below pid {}: {found:?}",
                process.pid()
            );
            if !process.is_running() || Instant::now() > deadline {
                panic!(
                    "the peer process did not start (wrapper pid {} running: {}); stderr:\n{}",
                    process.pid(),
                    process.is_running(),
                    process.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let nspids = nspids(host_pid);
        assert!(!nspids.is_empty(), "no NSpid for pid {host_pid}");
        assert_eq!(nspids[0], host_pid, "NSpid of {host_pid} starts elsewhere");
        if let Some(container) = container {
            let (v2, systemd) = cgroup_paths(host_pid);
            if container.placement.unified() {
                assert_eq!(
                    v2.as_deref(),
                    Some(container.cgroup_path()),
                    "pid {host_pid} is not in the container's v2 cgroup"
                );
            }
            if container.placement.systemd_v1() {
                assert_eq!(
                    systemd.as_deref(),
                    Some(container.cgroup_path()),
                    "pid {host_pid} is not in the container's name=systemd cgroup"
                );
            }
        }
        Self {
            process,
            host_pid,
            nspids,
            isolation,
            unique_name: String::new(),
        }
    }

    /// Waits for the helper's `ready <unique-name>` line (the `interact`
    /// and `serve` subcommands) and returns the unique name.
    pub async fn ready(&mut self) -> String {
        let name = self.process.expect_line("ready", TIMEOUT).await;
        self.unique_name = name.clone();
        name
    }

    /// The unique name from [`ready`](Self::ready) (empty before).
    pub fn unique_name(&self) -> &str {
        &self.unique_name
    }

    /// The peer's pid in the test's (host) pid namespace.
    pub fn host_pid(&self) -> u32 {
        self.host_pid
    }

    /// The peer's pid in its own pid namespace.
    pub fn ns_pid(&self) -> u32 {
        *self.nspids.last().expect("NSpid is never empty")
    }

    /// The peer's pid in each pid namespace, the host's first.
    pub fn nspids(&self) -> &[u32] {
        &self.nspids
    }

    /// The namespaces it was started in.
    pub fn isolation(&self) -> Isolation {
        self.isolation
    }

    /// Inode of the peer's namespace of `kind` (`pid`, `mnt`, ...).
    pub fn namespace(&self, kind: &str) -> u64 {
        namespace_inode(self.host_pid, kind)
    }

    /// Makes the peer call `destination`'s `WhoAmI`: `Ok` with what both
    /// sides saw, or the error the call ended with.
    pub async fn who_is(&mut self, destination: &str) -> Result<WhoIs, HelperError> {
        let line = self.process.ask(&format!("whoami {destination}")).await;
        if let Some(error) = HelperError::parse(&line) {
            return Err(error);
        }
        assert!(line.starts_with("whoami "), "unexpected answer {line:?}");
        let words = Words::parse(&line);
        Ok(WhoIs {
            sender: words.value("sender"),
            sender_pid: words.pid("sender_pid"),
            own_pid: words.pid("own_pid"),
            caller: words.value("caller"),
            caller_pid: words.pid("caller_pid"),
            container: ContainerView::from_words(&words),
        })
    }

    /// Makes the peer ask the bus for `name`'s identity (`""` for itself).
    pub async fn identity_of(&mut self, name: &str) -> Result<IdentityView, HelperError> {
        let name = if name.is_empty() { "-" } else { name };
        let line = self.process.ask(&format!("identity {name}")).await;
        if let Some(error) = HelperError::parse(&line) {
            return Err(error);
        }
        assert!(line.starts_with("identity "), "unexpected answer {line:?}");
        let words = Words::parse(&line);
        Ok(IdentityView {
            unique_name: words.value("name"),
            pid: words.pid("pid"),
            host_pid: words.pid("host_pid"),
            container: ContainerView::from_words(&words),
            cgroup: words.value("cgroup"),
        })
    }

    /// Makes the peer subscribe to broadcast signals named `member`.
    pub async fn listen(&mut self, member: &str) {
        let line = self.process.ask(&format!("listen {member}")).await;
        assert_eq!(line, format!("listening {member}"), "pid {}", self.host_pid);
    }

    /// Makes the peer broadcast signal `member` carrying `text` (one word).
    pub async fn emit(&mut self, member: &str, text: &str) {
        let line = self.process.ask(&format!("emit {member} {text}")).await;
        assert_eq!(line, format!("emitted {member}"), "pid {}", self.host_pid);
    }

    /// The next `member` signal the peer received (after
    /// [`listen`](Self::listen)); `Err` on timeout (10 s).
    pub async fn next_signal(&mut self, member: &str) -> Result<SignalSeen, HelperError> {
        self.process.send(&format!("next-signal {member}"));
        let line = self.process.next_line(TIMEOUT * 2).await;
        if let Some(error) = HelperError::parse(&line) {
            return Err(error);
        }
        assert!(line.starts_with("signal "), "unexpected answer {line:?}");
        let words = Words::parse(&line);
        Ok(SignalSeen {
            sender: words.value("sender"),
            sender_pid: words.pid("sender_pid"),
            text: words.value("text"),
            container: ContainerView::from_words(&words),
        })
    }

    /// Makes the peer ping the bus; panics unless it answers.
    pub async fn ping(&mut self) {
        let line = self.process.ask("ping").await;
        assert_eq!(line, "pong", "ping from pid {}", self.host_pid);
    }
}

impl Drop for ContainerPeer {
    fn drop(&mut self) {
        // The peer first, by pid, while it is still below its wrapper (so
        // the pid cannot have been recycled): the wrappers (unshare,
        // nsenter) then reap it and exit on their own, instead of leaving
        // an orphan for init. Then the wrapper, killed if need be and
        // reaped by the PeerProcess. Whatever is left in a container is
        // killed by the container's cleanup.
        let child = self.process.pid();
        let below_wrapper = descendants(child)
            .iter()
            .any(|(pid, _)| *pid == self.host_pid);
        if self.host_pid != child && below_wrapper {
            let _ = signal_pid(self.host_pid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while self.process.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.process.kill();
    }
}

/// Calls `name`'s `WhoAmI` (a `pbus-test-peer` serving it) from
/// `observer`: the reply's sender stamp as `observer` sees it, and what the
/// peer said about itself (and about `observer`, stamped on the call).
pub async fn who_am_i(observer: &Connection, name: &str) -> (SenderInfo, Identity) {
    let reply = observer
        .method_call(name, "WhoAmI")
        .send(Outgoing::new(&Text::new("who")))
        .await
        .unwrap_or_else(|error| panic!("WhoAmI on {name}: {error}"))
        .expect("a reply");
    let identity: Identity = reply.decode().expect("an Identity");
    (reply.sender().clone(), identity)
}

/// `pbusctl --json status NAME` against `bus`: its stdout. Panics if
/// pbusctl is not built or fails.
pub fn pbusctl_status_json(bus: &TestBus, name: &str) -> String {
    let binary = pbusctl_binary();
    let output = Command::new(&binary)
        .arg("--address")
        .arg(bus.address().to_string())
        .args(["--json", "status", name])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()));
    assert!(
        output.status.success(),
        "pbusctl status {name} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Checks that `pbusctl --json status NAME` (the operator's view) reports
/// the container `expected` and the pid `pid`.
pub fn check_pbusctl_status(bus: &TestBus, name: &str, expected: &ContainerView, pid: u32) {
    let json = pbusctl_status_json(bus, name);
    let runtime = expected
        .runtime
        .as_str_name()
        .trim_start_matches("CONTAINER_RUNTIME_")
        .to_ascii_lowercase();
    let pod = if expected.pod_uid.is_empty() {
        "\"pod_uid\": null".to_owned()
    } else {
        format!("\"pod_uid\": \"{}\"", expected.pod_uid)
    };
    for needle in [
        format!("\"runtime\": \"{runtime}\""),
        format!("\"id\": \"{}\"", expected.id),
        pod,
        format!("\"pid\": {pid},"),
    ] {
        assert!(
            json.contains(&needle),
            "pbusctl status {name}: no `{needle}` in\n{json}"
        );
    }
}
