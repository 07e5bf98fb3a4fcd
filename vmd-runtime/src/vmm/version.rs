//! Which cloud-hypervisor a binary is, and what that version can do.
//!
//! Nodes run whatever release they were built with (Zero-OS ships v39) and
//! upgrade the binary in place, so the version is probed from the binary
//! itself (`--version`), cached by path *and* file identity, and probed
//! again when the file changes. The differences vmd relies on, with their
//! evidence, are in `docs/cloud-hypervisor-versions.md`.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The oldest and newest major versions vmd drives (both checked against
/// real builds; the ones between by their source).
pub const OLDEST: u16 = 39;
pub const NEWEST: u16 = 53;

/// How long `--version` may take (it prints and exits; a binary that hangs
/// is not a cloud-hypervisor vmd can drive).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A cloud-hypervisor release, `v<major>.<minor>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}", self.major, self.minor)
    }
}

impl Version {
    pub const fn new(major: u16, minor: u16) -> Self {
        Version { major, minor }
    }

    /// The first line of `cloud-hypervisor --version`: `cloud-hypervisor
    /// v39.0`, `cloud-hypervisor v53.0` (then a `Migration Protocol
    /// Versions` line), or a build's `git describe`, e.g. `v39.0-dirty` or
    /// `v53.0-12-gabcdef`; without git, the crate version `53.0.0`.
    pub fn parse(output: &str) -> Option<Version> {
        let first = output.lines().next()?.trim();
        let word = first.strip_prefix("cloud-hypervisor")?.trim();
        let word = word.strip_prefix('v').unwrap_or(word);
        let mut nums = word
            .split(|c: char| !c.is_ascii_digit())
            .take(2)
            .map(|n| n.parse::<u16>().ok());
        let major = nums.next()??;
        let minor = nums.next().flatten().unwrap_or(0);
        Some(Version { major, minor })
    }

    pub fn is_supported(self) -> bool {
        (OLDEST..=NEWEST).contains(&self.major)
    }

    /// `--disk …,image_type=` exists (v51; older releases refuse the
    /// option). Since the same release a raw image *detected* as raw gets
    /// sector-0 writes refused, so a raw disk must be declared raw.
    pub fn has_disk_image_type(self) -> bool {
        self.major >= 51
    }

    /// API errors are a JSON array of the error chain (v47); before, one
    /// plain-text line.
    pub fn has_json_error_chain(self) -> bool {
        self.major >= 47
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("cannot run {path} --version: {source}")]
    Run {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} --version did not finish within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("{path} --version printed {output:?}: not a cloud-hypervisor version")]
    Unrecognised { path: String, output: String },
    #[error(
        "cloud-hypervisor {version} at {path} is not supported: vmd drives v{OLDEST} to v{NEWEST}"
    )]
    Unsupported { path: String, version: Version },
}

/// What tells one file from its replacement at the same path: an upgrade
/// in place (`cp` over it, or a rename onto it) changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Identity {
    fn of(path: &Path) -> std::io::Result<Identity> {
        // Follows symlinks: switching a link to a new release is an upgrade.
        let m = std::fs::metadata(path)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

/// Runs `path --version` (no shell, empty environment) and parses it.
pub async fn probe(path: &Path) -> Result<Version, VersionError> {
    let shown = path.display().to_string();
    let child = tokio::process::Command::new(path)
        .arg("--version")
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| VersionError::Run {
            path: shown.clone(),
            source,
        })?;
    let out = tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| VersionError::Timeout {
            path: shown.clone(),
            timeout: PROBE_TIMEOUT,
        })?
        .map_err(|source| VersionError::Run {
            path: shown.clone(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = Version::parse(&text)
        .filter(|_| out.status.success())
        .ok_or_else(|| VersionError::Unrecognised {
            path: shown.clone(),
            output: text.chars().take(200).collect(),
        })?;
    Ok(version)
}

/// A binary's release as probed, with the identity of the file probed:
/// vmd records it in the VM's description, and the shim trusts it while
/// the file is the same (one `--version` run less per VM start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub version: Version,
    identity: Identity,
}

/// Versions of the binaries seen so far, by path and identity.
#[derive(Debug, Default)]
pub struct VersionCache {
    known: Mutex<HashMap<PathBuf, Release>>,
}

impl VersionCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The version of `path`, probed only when this file was not seen
    /// before; an unsupported version is an error.
    pub async fn supported(&self, path: &Path) -> Result<Version, VersionError> {
        self.supported_release(path).await.map(|r| r.version)
    }

    /// [`Self::supported`], with the identity of the file it is about.
    pub async fn supported_release(&self, path: &Path) -> Result<Release, VersionError> {
        let r = self.release(path).await?;
        if !r.version.is_supported() {
            return Err(VersionError::Unsupported {
                path: path.display().to_string(),
                version: r.version,
            });
        }
        Ok(r)
    }

    async fn release(&self, path: &Path) -> Result<Release, VersionError> {
        let run_error = |source| VersionError::Run {
            path: path.display().to_string(),
            source,
        };
        let before = Identity::of(path).map_err(run_error)?;
        if let Some(known) = self.lock().get(path).filter(|r| r.identity == before) {
            return Ok(*known);
        }
        let release = Release {
            version: probe(path).await?,
            identity: before,
        };
        // Cached only if the file did not change while it was probed.
        if Identity::of(path).ok() == Some(before) {
            self.lock().insert(path.to_owned(), release);
        }
        Ok(release)
    }

    /// Takes a release probed elsewhere (vmd, at Run) as known; it is used
    /// only while `path` is still that file.
    pub fn remember(&self, path: &Path, release: Release) {
        self.lock().insert(path.to_owned(), release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Release>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_releases_and_builds_print() {
        let v = |s| Version::parse(s);
        assert_eq!(v("cloud-hypervisor v39.0\n"), Some(Version::new(39, 0)));
        assert_eq!(
            v("cloud-hypervisor v53.0\nMigration Protocol Versions: 0\n"),
            Some(Version::new(53, 0))
        );
        assert_eq!(v("cloud-hypervisor v39.0-dirty"), Some(Version::new(39, 0)));
        assert_eq!(
            v("cloud-hypervisor v50.2-12-gabcdef"),
            Some(Version::new(50, 2))
        );
        assert_eq!(v("cloud-hypervisor 53.0.0"), Some(Version::new(53, 0)));
        assert_eq!(v("cloud-hypervisor v41"), Some(Version::new(41, 0)));
        assert_eq!(v("qemu-system-x86_64 8.2"), None);
        assert_eq!(v("cloud-hypervisor"), None);
        assert_eq!(v(""), None);
    }

    #[test]
    fn the_range_and_the_features() {
        assert!(!Version::new(38, 0).is_supported());
        assert!(Version::new(39, 0).is_supported());
        assert!(Version::new(53, 9).is_supported());
        assert!(!Version::new(54, 0).is_supported());
        assert!(!Version::new(50, 2).has_disk_image_type());
        assert!(Version::new(51, 0).has_disk_image_type());
        assert!(!Version::new(46, 0).has_json_error_chain());
        assert!(Version::new(47, 0).has_json_error_chain());
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        // The body is written here but the executable by `install`, in a
        // process of its own: a test of this binary that forks while this
        // thread holds a file open for writing gives the child that
        // descriptor until it execs, and executing the file meanwhile fails
        // with ETXTBSY (CI saw it). The executable is renamed into place, as
        // upgrades land: a running one cannot be opened for writing.
        let src = dir.join(format!(".{name}.body"));
        std::fs::write(&src, format!("#!/bin/sh\n{body}\n")).unwrap();
        let tmp = dir.join(format!(".{name}.tmp"));
        let status = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&src)
            .arg(&tmp)
            .status()
            .unwrap();
        assert!(status.success(), "install: {status}");
        std::fs::rename(&tmp, &p).unwrap();
        p
    }

    #[tokio::test]
    async fn probed_once_per_file_and_again_after_an_upgrade() {
        let d = tempfile::tempdir().unwrap();
        let calls = d.path().join("calls");
        let body = |v: &str| format!("echo x >> {}\necho 'cloud-hypervisor {v}'", calls.display());
        let ch = script(d.path(), "ch", &body("v39.0"));
        let cache = VersionCache::new();
        assert_eq!(cache.supported(&ch).await.unwrap(), Version::new(39, 0));
        assert_eq!(cache.supported(&ch).await.unwrap(), Version::new(39, 0));
        let probes = || std::fs::read_to_string(&calls).unwrap().lines().count();
        assert_eq!(probes(), 1);
        script(d.path(), "ch", &body("v53.0"));
        assert_eq!(cache.supported(&ch).await.unwrap(), Version::new(53, 0));
        assert_eq!(probes(), 2);
        script(d.path(), "ch", &body("v38.0"));
        let e = cache.supported(&ch).await.unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "cloud-hypervisor v38.0 at {} is not supported: vmd drives v39 to v53",
                ch.display()
            )
        );
    }

    #[tokio::test]
    async fn a_release_probed_elsewhere_is_trusted_while_the_file_is_the_same() {
        let d = tempfile::tempdir().unwrap();
        let calls = d.path().join("calls");
        let body = |v: &str| format!("echo x >> {}\necho 'cloud-hypervisor {v}'", calls.display());
        let ch = script(d.path(), "ch", &body("v39.0"));
        let release = VersionCache::new().supported_release(&ch).await.unwrap();
        let shim = VersionCache::new();
        shim.remember(&ch, release);
        assert_eq!(shim.supported(&ch).await.unwrap(), Version::new(39, 0));
        let probes = || std::fs::read_to_string(&calls).unwrap().lines().count();
        assert_eq!(probes(), 1, "the remembered release was probed again");
        script(d.path(), "ch", &body("v53.0"));
        assert_eq!(shim.supported(&ch).await.unwrap(), Version::new(53, 0));
        assert_eq!(probes(), 2);
    }

    #[tokio::test]
    async fn what_is_not_a_cloud_hypervisor_says_so() {
        let d = tempfile::tempdir().unwrap();
        let other = script(d.path(), "other", "echo 'qemu 8.2'");
        let e = VersionCache::new().supported(&other).await.unwrap_err();
        assert!(matches!(e, VersionError::Unrecognised { .. }), "{e}");
        let missing = d.path().join("missing");
        let e = VersionCache::new().supported(&missing).await.unwrap_err();
        assert!(e.to_string().starts_with("cannot run "), "{e}");
        let failing = script(d.path(), "failing", "echo 'cloud-hypervisor v53.0'; exit 3");
        let e = VersionCache::new().supported(&failing).await.unwrap_err();
        assert!(matches!(e, VersionError::Unrecognised { .. }), "{e}");
    }
}
