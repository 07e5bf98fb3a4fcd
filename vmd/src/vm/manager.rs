//! The VM module's state: none in memory. The desired state is the files of
//! a VM's run directory (`vmd_runtime::layout`), the live state comes from
//! zinit and the shim. Every change is ordered so that a vmd killed at any
//! instant leaves a state that start-up reconciliation completes or rolls
//! back:
//!
//! * A VM exists exactly while `<runtime>/present/<name>` does: Run creates
//!   it as its last step, Delete removes it as its first.
//! * Run writes `creating` first; a VM directory that is not present
//!   (`creating` left behind) is rolled back: its caller never got a success.
//! * Delete writes `deleted` (a shim respawned by zinit then starts nothing)
//!   and removes the directory last; whatever is left is deleted to the end.
//!
//! The operations are `impl Manager` blocks of their own files: `run`,
//! `delete`, `lock`, `inspect`, `metrics`, `streams`, `reconcile`.

use std::collections::BTreeMap;
use std::time::Duration;

use vmd_runtime::files;
use vmd_runtime::vmm::VersionCache;
use vmd_runtime::{HostPaths, RunDir, VmName};

use super::error::{IoContext, VmError};
use super::host::Host;
use super::plan::Settings;
use crate::api::Vm;

pub struct Manager {
    host: Host,
    settings: Settings,
    zinit: zinit::Client,
    services: zinit::ConfigDir,
    /// The release of the node's cloud-hypervisor, by file identity.
    versions: VersionCache,
    /// The network module, which places web consoles (none: no web console).
    network: Option<crate::network::Networker>,
    /// What every VM's shim pushes, and what vmd publishes.
    events: crate::events::Events,
    /// The VMs' counters, shared by every reader.
    collector: super::metrics::Collector,
    /// What vmd counts of its calls to peers and its reconciliations.
    telemetry: crate::telemetry::Telemetry,
}

/// The zinit service of a VM.
pub fn service_of(name: &VmName) -> zinit::ServiceName {
    // Valid by construction: `vm:` and a plain word within zinit's rules.
    zinit::ServiceName::new(name.service()).expect("vm service name")
}

/// The stream workers' own directory, theirs once they dropped root; what
/// workers of an earlier vmd saved beside the records is moved in, so they
/// resume where they were.
fn prepare_progress_dir(p: &vmd_runtime::HostPaths, uid: Option<u32>) -> std::io::Result<()> {
    let dir = p.progress_dir();
    files::create_dir(&dir, 0o700)?;
    let is_progress = |e: &std::fs::DirEntry| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(".progress"))
    };
    for e in std::fs::read_dir(p.streams_dir())?.flatten() {
        if is_progress(&e) {
            std::fs::rename(e.path(), dir.join(e.file_name()))?;
        }
    }
    let Some(uid) = uid else {
        return Ok(());
    };
    std::os::unix::fs::chown(&dir, Some(uid), None)?;
    // What was moved in, and where a new stream starts as an earlier vmd
    // recorded it, as root's own file: its worker could not read it (see
    // `Progress::save_for`).
    for e in std::fs::read_dir(&dir)?.flatten() {
        if is_progress(&e) {
            std::os::unix::fs::chown(e.path(), Some(uid), None)?;
        }
    }
    Ok(())
}

impl Manager {
    /// Creates vmd's directories (private: they hold requests and sockets).
    pub fn new(
        host: Host,
        settings: Settings,
        events: crate::events::Events,
    ) -> std::io::Result<Self> {
        let p = &host.paths;
        files::create_dir(&p.vms_dir(), 0o700)?;
        // Searchable, not listable: a stream worker (no longer root) opens
        // its VM's log by name; each log is readable by its VM's group only.
        files::create_dir(&p.logs_dir(), 0o711)?;
        std::fs::set_permissions(
            p.logs_dir(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )?;
        files::create_dir(&p.present_dir(), 0o700)?;
        files::create_dir(&p.seeds_dir(), 0o700)?;
        files::create_dir(&p.streams_dir(), 0o700)?;
        prepare_progress_dir(p, host.stream_uid)?;
        // Only root (the shims, the Go module after a roll-back) uses them.
        files::create_dir(&host.api_socket_dir, 0o700)?;
        if let Some(d) = &host.go_config_dir {
            files::create_dir(d, 0o700)?;
        }
        let services = zinit::ConfigDir::open(&host.zinit_dir).map_err(std::io::Error::other)?;
        let zinit = zinit::Client::new(&host.zinit_socket).with_timeout(Duration::from_secs(10));
        Ok(Manager {
            host,
            settings,
            zinit,
            services,
            versions: VersionCache::new(),
            network: None,
            events,
            collector: Default::default(),
            telemetry: Default::default(),
        })
    }

    /// Asks `network` where VMs on private networks get their web console.
    pub fn with_network(mut self, network: crate::network::Networker) -> Self {
        self.network = Some(network);
        self
    }

    pub fn network(&self) -> Option<&crate::network::Networker> {
        self.network.as_ref()
    }

    pub fn telemetry(&self) -> &crate::telemetry::Telemetry {
        &self.telemetry
    }

    pub fn collector(&self) -> &super::metrics::Collector {
        &self.collector
    }

    pub fn events(&self) -> &crate::events::Events {
        &self.events
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn versions(&self) -> &VersionCache {
        &self.versions
    }

    pub fn paths(&self) -> &HostPaths {
        &self.host.paths
    }

    pub fn run_dir(&self, name: &VmName) -> RunDir {
        self.host.paths.run_dir(name)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn zinit(&self) -> &zinit::Client {
        &self.zinit
    }

    pub fn services(&self) -> &zinit::ConfigDir {
        &self.services
    }

    /// A VM is present once Run completed and until Delete starts.
    pub fn present(&self, name: &VmName) -> bool {
        self.host.paths.present_mark(name).exists()
    }

    /// The VM `name` names, if it is present: what reads and Lock act on.
    pub fn existing(&self, name: &str) -> Result<VmName, VmError> {
        VmName::new(name)
            .ok()
            .filter(|n| self.present(n))
            .ok_or_else(|| VmError::NotFound(name.to_owned()))
    }

    /// The VM as its caller sent it.
    pub fn request(&self, name: &VmName) -> Option<Vm> {
        files::read_json(&self.run_dir(name).request())
    }

    /// Names of the VMs present, sorted.
    pub fn names(&self) -> Vec<VmName> {
        let mut out: Vec<VmName> = std::fs::read_dir(self.host.paths.present_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| VmName::new(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort();
        out
    }

    /// Every service zinit runs (`monitored`, its listing) or has a file
    /// for, sorted: what start-up reconciliation checks against vmd's own
    /// records.
    pub fn known_services(
        &self,
        monitored: Option<&BTreeMap<String, zinit::State>>,
    ) -> Vec<String> {
        let mut services: Vec<String> = self
            .services
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(list) = monitored {
            services.extend(list.keys().cloned());
        }
        services.sort();
        services.dedup();
        services
    }

    /// Writes an empty mark durably.
    pub(super) fn mark(&self, path: &std::path::Path) -> Result<(), VmError> {
        files::write_mark(path).what(|| format!("cannot write {}", path.display()))
    }

    /// Removes a file, which may be gone already.
    pub(super) fn unlink(&self, path: &std::path::Path) -> Result<(), VmError> {
        files::remove_file(path).what(|| format!("cannot remove {}", path.display()))
    }
}
