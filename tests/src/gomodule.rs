//! The Go VM module's view of a node, as its monitor takes it
//! (`shared/spec/zos-node.md` §A): the configured VMs are the non-directory
//! entries of its config directory; the running ones are the processes
//! whose argv[0] is exactly `cloud-hypervisor`, each named by the last part
//! of the value after `--api-socket`; every running VM without a config is
//! killed ("machine is running but not configured").
//!
//! For the roll-back tests: what the Go module would adopt and what it would
//! kill if it ran on this node now. Unlike the Go module, the scan is scoped
//! to VMMs whose API socket is under `socket_dir`, so that the VMs of tests
//! running alongside are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

#[derive(Debug, Default)]
pub struct GoView {
    pub configured: BTreeSet<String>,
    /// Running VMMs by name: pid.
    pub running: BTreeMap<String, i32>,
}

impl GoView {
    pub fn read(config_dir: &Path, socket_dir: &Path) -> GoView {
        let configured = std::fs::read_dir(config_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let mut running = BTreeMap::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let argv: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if argv.first().map(String::as_str) != Some("cloud-hypervisor") {
                continue;
            }
            let Some(value) = argv
                .iter()
                .position(|a| a == "--api-socket")
                .and_then(|i| argv.get(i + 1))
            else {
                continue;
            };
            // Go: filepath.Base of the value, whatever form it has.
            let sock = value.strip_prefix("path=").unwrap_or(value);
            if !Path::new(sock).starts_with(socket_dir) {
                continue;
            }
            if let Some(name) = value.rsplit('/').next() {
                running.insert(name.to_owned(), pid);
            }
        }
        GoView {
            configured,
            running,
        }
    }

    /// Running VMs it would kill: no config.
    pub fn would_kill(&self) -> Vec<String> {
        self.running
            .keys()
            .filter(|n| !self.configured.contains(*n))
            .cloned()
            .collect()
    }

    /// Running VMs it would adopt.
    pub fn adopted(&self) -> Vec<String> {
        self.running
            .keys()
            .filter(|n| self.configured.contains(*n))
            .cloned()
            .collect()
    }
}
