//! Where the cgroup hierarchies are mounted, from `/proc/self/mountinfo`.
//!
//! [`parse_mountinfo`] is pure; [`CgroupMounts::detect`] reads the calling
//! process's mount table. Nothing in pbus assumes `/sys/fs/cgroup`: a
//! hierarchy is wherever the mount table says it is, and a cgroup path from
//! `/proc/PID/cgroup` becomes a directory through
//! [`CgroupMount::directory_for`].

use std::io;
use std::path::{Path, PathBuf};

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMount {
    /// Where the hierarchy is mounted.
    pub mount_point: PathBuf,
    /// The cgroup the mount shows at `mount_point` (mountinfo's root field):
    /// `/` for a whole hierarchy, a subtree for a bind mount or a mount made
    /// inside a cgroup namespace's view.
    pub root: String,
    /// For v1: the controllers the hierarchy carries (`cpu`, `memory`, ...)
    /// and its name as `name=<name>` for named hierarchies (e.g.
    /// `name=systemd`). Empty for v2.
    pub controllers: Vec<String>,
}

impl CgroupMount {
    /// The directory of cgroup `cgroup_path` (as written in
    /// `/proc/PID/cgroup`) under this mount, or `None` when the cgroup lies
    /// outside the mounted subtree.
    pub fn directory_for(&self, cgroup_path: &str) -> Option<PathBuf> {
        let root = self.root.trim_end_matches('/');
        let relative = if root.is_empty() {
            cgroup_path
        } else {
            let rest = cgroup_path.strip_prefix(root)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        };
        let relative = relative.trim_start_matches('/');
        if relative.split('/').any(|component| component == "..") {
            return None;
        }
        Some(if relative.is_empty() {
            self.mount_point.clone()
        } else {
            self.mount_point.join(relative)
        })
    }

    fn is_whole_hierarchy(&self) -> bool {
        self.root == "/"
    }
}

/// How the host arranges its cgroup hierarchies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupLayout {
    /// Only cgroup v2.
    Unified,
    /// v1 controllers plus a v2 hierarchy (systemd's "hybrid" mode).
    Hybrid,
    /// Only cgroup v1.
    Legacy,
    /// No cgroup filesystem is mounted.
    None,
}

/// The cgroup hierarchies visible in a mount table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// The unified (v2) hierarchy, if mounted.
    pub v2: Option<CgroupMount>,
    /// The v1 hierarchies, one entry per hierarchy, in mount-table order.
    pub v1: Vec<CgroupMount>,
}

impl CgroupMounts {
    /// Reads `/proc/self/mountinfo`.
    pub fn detect() -> io::Result<Self> {
        Ok(parse_mountinfo(&std::fs::read_to_string(
            "/proc/self/mountinfo",
        )?))
    }

    /// The v1 hierarchy carrying `controller` (a controller name such as
    /// `memory`, or `name=systemd` for a named hierarchy).
    pub fn v1_hierarchy(&self, controller: &str) -> Option<&CgroupMount> {
        self.v1
            .iter()
            .find(|mount| mount.controllers.iter().any(|c| c == controller))
    }

    /// Mount point of the v2 hierarchy, if mounted.
    pub fn v2_mount_point(&self) -> Option<&Path> {
        self.v2.as_ref().map(|mount| mount.mount_point.as_path())
    }

    /// Which cgroup layout the mount table shows.
    pub fn layout(&self) -> CgroupLayout {
        match (self.v2.is_some(), self.v1.is_empty()) {
            (true, true) => CgroupLayout::Unified,
            (true, false) => CgroupLayout::Hybrid,
            (false, false) => CgroupLayout::Legacy,
            (false, true) => CgroupLayout::None,
        }
    }
}

/// Mount options of a v1 cgroup mount that are not controllers or names.
const V1_NON_CONTROLLER_OPTIONS: &[&str] = &[
    "rw",
    "ro",
    "none",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "favordynmods",
];

/// Parses the text of a `/proc/PID/mountinfo` file and collects the cgroup
/// mounts. Lines that are not cgroup mounts or are malformed are skipped.
///
/// When a hierarchy is mounted more than once, the first mount showing the
/// whole hierarchy (root `/`) is kept, else the first mount.
pub fn parse_mountinfo(text: &str) -> CgroupMounts {
    let mut mounts = CgroupMounts::default();
    for line in text.lines() {
        let Some((fs_type, mount)) = parse_mountinfo_line(line) else {
            continue;
        };
        match fs_type {
            CgroupVersion::V2 => {
                let replace = match &mounts.v2 {
                    None => true,
                    Some(kept) => !kept.is_whole_hierarchy() && mount.is_whole_hierarchy(),
                };
                if replace {
                    mounts.v2 = Some(mount);
                }
            }
            CgroupVersion::V1 => {
                let same_hierarchy = mounts.v1.iter_mut().find(|kept| {
                    let mut a = kept.controllers.clone();
                    let mut b = mount.controllers.clone();
                    a.sort();
                    b.sort();
                    a == b
                });
                match same_hierarchy {
                    None => mounts.v1.push(mount),
                    Some(kept) => {
                        if !kept.is_whole_hierarchy() && mount.is_whole_hierarchy() {
                            *kept = mount;
                        }
                    }
                }
            }
        }
    }
    mounts
}

enum CgroupVersion {
    V1,
    V2,
}

/// One mountinfo line:
/// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_mountinfo_line(line: &str) -> Option<(CgroupVersion, CgroupMount)> {
    let fields: Vec<&str> = line.split(' ').collect();
    let separator = fields.iter().position(|&field| field == "-")?;
    if separator < 6 {
        return None;
    }
    let root = unescape_mountinfo(fields[3]);
    let mount_point = PathBuf::from(unescape_mountinfo(fields[4]));
    let fs_type = *fields.get(separator + 1)?;
    let super_options = fields.get(separator + 3).copied().unwrap_or("");
    match fs_type {
        "cgroup2" => Some((
            CgroupVersion::V2,
            CgroupMount {
                mount_point,
                root,
                controllers: Vec::new(),
            },
        )),
        "cgroup" => {
            let controllers: Vec<String> = super_options
                .split(',')
                .filter(|option| !option.is_empty())
                .filter(|option| !V1_NON_CONTROLLER_OPTIONS.contains(option))
                .filter(|option| option.starts_with("name=") || !option.contains('='))
                .map(str::to_owned)
                .collect();
            Some((
                CgroupVersion::V1,
                CgroupMount {
                    mount_point,
                    root,
                    controllers,
                },
            ))
        }
        _ => None,
    }
}

/// Undoes the octal escapes mountinfo uses for space, tab, newline and
/// backslash (`\040`, `\011`, `\012`, `\134`).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let octal = field
                .get(i + 1..i + 4)
                .filter(|digits| digits.bytes().all(|b| (b'0'..=b'7').contains(&b)))
                .and_then(|digits| u8::from_str_radix(digits, 8).ok());
            if let Some(byte) = octal {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's layout: v1 controllers, a named systemd hierarchy and
    /// v2 at `unified`, under a tmpfs.
    const HYBRID: &str = "\
22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_hybrid_hierarchies() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.layout(), CgroupLayout::Hybrid);
        assert_eq!(
            mounts.v2_mount_point(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(mounts.v1.len(), 5);
        assert_eq!(
            mounts.v1_hierarchy("name=systemd").unwrap().mount_point,
            Path::new("/sys/fs/cgroup/systemd")
        );
        assert_eq!(
            mounts.v1_hierarchy("memory").unwrap().controllers,
            ["memory"]
        );
        assert!(mounts.v1_hierarchy("blkio").is_none());
    }

    #[test]
    fn systemd_style_mounts_with_optional_fields_and_flags() {
        let text = "\
25 0 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:25 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:6 master:1 - cgroup cgroup rw,xattr,name=systemd
30 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,cpu,cpuacct
31 25 0:29 / /sys/fs/cgroup/cpuset rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,cpuset,clone_children
32 25 0:30 / /sys/fs/cgroup/net_cls rw,relatime shared:12 - cgroup cgroup rw,net_cls,release_agent=/sbin/agent
";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts.v2_mount_point(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        let controllers: Vec<Vec<String>> =
            mounts.v1.iter().map(|m| m.controllers.clone()).collect();
        assert_eq!(
            controllers,
            vec![
                vec!["name=systemd".to_owned()],
                vec!["cpu".to_owned(), "cpuacct".to_owned()],
                vec!["cpuset".to_owned()],
                vec!["net_cls".to_owned()],
            ]
        );
        assert_eq!(
            mounts.v1_hierarchy("cpuacct").unwrap().mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
    }

    #[test]
    fn unified_only_with_escaped_mount_point() {
        let text = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
88 30 0:26 / /srv/my\\040cgroups\\134x rw shared:4 - cgroup2 cgroup2 rw
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.layout(), CgroupLayout::Unified);
        // The first whole-hierarchy mount is kept.
        assert_eq!(mounts.v2_mount_point(), Some(Path::new("/sys/fs/cgroup")));
        let escaped = "77 24 0:26 / /srv/my\\040cgroups\\134x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(escaped).v2_mount_point(),
            Some(Path::new("/srv/my cgroups\\x"))
        );
    }

    #[test]
    fn malformed_escapes_stay_literal() {
        assert_eq!(unescape_mountinfo("a\\040b\\011c"), "a b\tc");
        // Not three octal digits, or not a byte: kept as written.
        assert_eq!(unescape_mountinfo("x\\04"), "x\\04");
        assert_eq!(unescape_mountinfo("x\\089y"), "x\\089y");
        assert_eq!(unescape_mountinfo("x\\777"), "x\\777");
        assert_eq!(unescape_mountinfo("x\\"), "x\\");
        assert_eq!(unescape_mountinfo("\\\\134"), "\\\\");
    }

    #[test]
    fn prefers_whole_hierarchy_over_subtree_bind_mount() {
        let text = "\
50 24 0:26 /docker/abc /mnt/sub rw - cgroup2 cgroup2 rw
51 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
52 24 0:31 /docker/abc /mnt/mem rw - cgroup cgroup rw,memory
53 24 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.v2_mount_point(), Some(Path::new("/sys/fs/cgroup")));
        assert_eq!(mounts.v1.len(), 1);
        assert_eq!(mounts.v1[0].mount_point, Path::new("/sys/fs/cgroup/memory"));
    }

    #[test]
    fn no_cgroups_and_malformed_lines() {
        let mounts = parse_mountinfo("garbage\n1 2 3\n22 1 0:21 / / rw - ext4 /dev/sda1 rw\n");
        assert_eq!(mounts, CgroupMounts::default());
        assert_eq!(mounts.layout(), CgroupLayout::None);
    }

    #[test]
    fn directories_for_cgroup_paths() {
        let whole = CgroupMount {
            mount_point: "/sys/fs/cgroup/unified".into(),
            root: "/".into(),
            controllers: vec![],
        };
        assert_eq!(
            whole.directory_for("/system.slice/a.service"),
            Some(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/a.service"
            ))
        );
        assert_eq!(
            whole.directory_for("/"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(whole.directory_for("/../../escape"), None);
        let subtree = CgroupMount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/docker/abc".into(),
            controllers: vec![],
        };
        assert_eq!(
            subtree.directory_for("/docker/abc/child"),
            Some(PathBuf::from("/sys/fs/cgroup/child"))
        );
        assert_eq!(
            subtree.directory_for("/docker/abc"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(subtree.directory_for("/docker/abcd"), None);
        assert_eq!(subtree.directory_for("/other"), None);
    }

    #[test]
    fn detect_matches_this_process_view() {
        let mounts = CgroupMounts::detect().unwrap();
        let own = crate::cgroup::parse_proc_cgroup(
            &std::fs::read_to_string("/proc/self/cgroup").unwrap(),
        );
        if mounts.layout() == CgroupLayout::None {
            println!("skipped: no cgroup filesystem is mounted here");
            return;
        }
        // Our own cgroup directory exists under every mounted hierarchy we
        // are a member of.
        let mut checked = 0;
        if let (Some(path), Some(v2)) = (own.v2.as_deref(), mounts.v2.as_ref()) {
            let dir = v2.directory_for(path).unwrap();
            assert!(dir.join("cgroup.procs").exists(), "{dir:?}");
            checked += 1;
        }
        for line in &own.v1 {
            let controller = &line.controllers[0];
            let Some(mount) = mounts.v1_hierarchy(controller) else {
                continue;
            };
            let dir = mount.directory_for(&line.path).unwrap();
            assert!(dir.join("cgroup.procs").exists(), "{dir:?}");
            checked += 1;
        }
        assert!(checked > 0, "no hierarchy of ours found in {mounts:?}");
    }
}
