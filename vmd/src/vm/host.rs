//! The host vmd runs on: where its state is ([`HostPaths`]), zinit, and the
//! programs it runs. Everything comes from flags, so tests (and several
//! vmds) run side by side in temp dirs.

use std::path::PathBuf;

use vmd_runtime::HostPaths;

#[derive(Debug, Clone)]
pub struct Host {
    pub paths: HostPaths,
    pub zinit_dir: PathBuf,
    pub zinit_socket: PathBuf,
    /// The vmd-shim binary zinit runs for each VM.
    pub shim: PathBuf,
    /// The cloud-hypervisor binary the shims run.
    pub hypervisor: PathBuf,
    /// The virtiofsd binary the shims run per share (absent: shares refused).
    pub virtiofsd: Option<PathBuf>,
    /// The vmd-logstream binary zinit runs per stream.
    pub logstream: PathBuf,
    /// Named network namespaces (`ip netns` keeps them in /var/run/netns).
    pub netns_dir: PathBuf,
    /// An extra CA for wss receivers (besides the system's roots).
    pub stream_ca_file: Option<PathBuf>,
    /// The web console's server and page (placed by the network module).
    pub console: ConsoleHost,
    /// Where the VMMs' REST API sockets are, `<dir>/<name>` (Zero-OS:
    /// /var/run/cloud-hypervisor, where the Go VM module looks for them).
    pub api_socket_dir: PathBuf,
    /// The Go VM module's config directory, where each VM's config is kept
    /// in its format for a roll-back (docs/zero-os-node.md); `None`: not kept.
    pub go_config_dir: Option<PathBuf>,
    /// The VMMs' jail (their own uids and mount view); `None`: off.
    pub jail: Option<vmd_runtime::spec::JailSpec>,
    /// Where the VMs' taps are, when not in vmd's own network namespace.
    pub tap_netns: Option<PathBuf>,
    /// Every interface's counters, in `/proc/net/dev`'s format, read in
    /// the taps' namespace (`/proc/thread-self/net/dev`).
    pub net_dev: PathBuf,
    /// The uid stream workers drop to; `None`: they keep vmd's.
    pub stream_uid: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct ConsoleHost {
    /// The vmd-console binary the shims run for VMs with a web console.
    pub server: PathBuf,
    /// The page's files in place of the page built into vmd-console.
    pub assets: Option<PathBuf>,
}

/// Whether `ns` can name a network namespace under `ip netns`'s directory: a
/// file name, nothing that walks elsewhere or hides in a listing.
pub fn is_netns_name(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 255
        && !ns.contains('/')
        && !ns.starts_with('.')
        && !ns
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
}
