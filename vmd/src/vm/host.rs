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
}
