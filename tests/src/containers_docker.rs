//! The real Docker engine, for tests that want a container made by an
//! actual runtime rather than by [`containers`](crate::containers).
//!
//! No registry is reachable, so images are assembled locally:
//! [`DockerImage::from_binaries`] copies the given binaries (debug info
//! stripped), the shared libraries `ldd` lists for them and the dynamic
//! loader into a staging tree and `docker import`s it as a one-layer image
//! with a unique name. [`DockerContainer`] names a container the test
//! runs. Both remove what they created (by that unique name or id) on
//! drop, even when the test fails. [`require_docker`] decides whether a
//! Docker test runs: it does when `docker info` answers; otherwise it says
//! loudly why not and skips, unless `PBUS_REQUIRE_DOCKER=1` makes that a
//! failure.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::unique_suffix;

/// Environment variable that turns "Docker is unavailable" into a failure.
pub const REQUIRE_DOCKER_ENV: &str = "PBUS_REQUIRE_DOCKER";

/// Runs `docker ARGS`; its trimmed stdout, or why it failed.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run docker {args:?}: {error}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {args:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// `None` when the Docker engine answers `docker info`; else why not.
pub fn docker_unavailable() -> Option<String> {
    match docker(&["info", "--format", "{{.ServerVersion}}"]) {
        Ok(version) if !version.is_empty() => None,
        Ok(_) => Some("`docker info` reported no server version".into()),
        Err(why) => Some(why),
    }
}

/// True if a Docker test (`what`) may run. When the engine does not answer,
/// prints a loud notice and returns false, or panics if
/// `PBUS_REQUIRE_DOCKER=1`.
pub fn require_docker(what: &str) -> bool {
    let Some(why) = docker_unavailable() else {
        return true;
    };
    if std::env::var(REQUIRE_DOCKER_ENV).is_ok_and(|value| value == "1") {
        panic!("{what} needs Docker, which is unavailable ({why}), and {REQUIRE_DOCKER_ENV}=1");
    }
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         !!! DOCKER IS UNAVAILABLE: {what} did NOT run.\n\
         !!! why: {why}\n\
         !!! (set {REQUIRE_DOCKER_ENV}=1 to make this a failure)\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    false
}

/// The absolute paths of the shared libraries and loader `ldd` lists for
/// `binary` (none for a static binary).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let output = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run ldd: {error}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(format!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`,
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`, `linux-vdso.so.1 (0x...)`.
        let target = line.split_once("=>").map_or(line, |(_, target)| target);
        let Some(path) = target.split_whitespace().next() else {
            continue;
        };
        if path == "not" {
            return Err(format!("ldd cannot resolve a library: {line}"));
        }
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// A local image built for one test; removed on drop.
#[derive(Debug)]
pub struct DockerImage {
    reference: String,
    id: String,
}

impl DockerImage {
    /// Builds an image holding `binaries` at `/<file name>` (debug info
    /// stripped when `strip` is available), the libraries they need at the
    /// paths `ldd` names, and nothing else.
    pub fn from_binaries(binaries: &[&Path]) -> Result<Self, String> {
        let staging = tempfile::Builder::new()
            .prefix("pbus-image-")
            .tempdir()
            .map_err(|error| format!("cannot create a staging directory: {error}"))?;
        let root = staging.path();
        let copy = |from: &Path, to: &Path| -> Result<(), String> {
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|error| format!("mkdir {}: {error}", parent.display()))?;
            }
            std::fs::copy(from, to)
                .map(|_| ())
                .map_err(|error| format!("copy {} -> {}: {error}", from.display(), to.display()))
        };
        for binary in binaries {
            let name = binary
                .file_name()
                .ok_or_else(|| format!("{} has no file name", binary.display()))?;
            let target = root.join(name);
            copy(binary, &target)?;
            // Only to keep the image small; an unstripped binary works too.
            let _ = Command::new("strip")
                .arg("--strip-debug")
                .arg(&target)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
            for library in shared_libraries(binary)? {
                let relative = library.strip_prefix("/").expect("absolute path");
                let target = root.join(relative);
                if !target.exists() {
                    copy(&library, &target)?;
                }
            }
        }
        let reference = format!("pbus-test-image-{}:latest", unique_suffix());
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(root)
            .args(["-c", "."])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|error| format!("cannot run tar: {error}"))?;
        let archive = tar.stdout.take().expect("piped stdout");
        let import = Command::new("docker")
            .args(["import", "-", &reference])
            .stdin(Stdio::from(archive))
            .output()
            .map_err(|error| format!("cannot run docker import: {error}"))?;
        let tar_status = tar
            .wait()
            .map_err(|error| format!("waiting for tar: {error}"))?;
        if !import.status.success() || !tar_status.success() {
            // It may exist anyway; remove it by the name we gave it.
            let _ = docker(&["rmi", "--force", &reference]);
            return Err(format!(
                "docker import failed ({}; tar {}): {}",
                import.status,
                tar_status,
                String::from_utf8_lossy(&import.stderr).trim()
            ));
        }
        let id = String::from_utf8_lossy(&import.stdout).trim().to_owned();
        Ok(Self { reference, id })
    }

    /// The unique `name:tag` the image was imported as.
    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// The image id `docker import` printed.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for DockerImage {
    fn drop(&mut self) {
        if let Err(why) = docker(&["rmi", "--force", &self.reference]) {
            eprintln!("warning: removing image {}: {why}", self.reference);
        }
    }
}

/// A container the test runs under a unique name; force-removed by that
/// name on drop (whether or not it still exists).
#[derive(Debug)]
pub struct DockerContainer {
    name: String,
}

impl DockerContainer {
    /// A fresh unique container name to pass to `docker run --name`.
    pub fn unique() -> Self {
        Self {
            name: format!("pbus-test-{}", unique_suffix()),
        }
    }

    /// The container's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `docker inspect --format FORMAT NAME`.
    pub fn inspect(&self, format: &str) -> Result<String, String> {
        docker(&["inspect", "--format", format, &self.name])
    }
}

impl Drop for DockerContainer {
    fn drop(&mut self) {
        if let Err(why) = docker(&["rm", "--force", &self.name]) {
            if !why.contains("No such container") {
                eprintln!("warning: removing container {}: {why}", self.name);
            }
        }
    }
}
