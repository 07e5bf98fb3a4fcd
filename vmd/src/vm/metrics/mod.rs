//! `Metrics`: the host-side counters of each VM's taps, summed into
//! `Private` (every tap but `p-*`) and `Public` (`p-*`), and the VM's
//! restarts; vmd's `Usage` adds the VMM's CPU time, memory and disk I/O
//! (which `Metrics`' Go callers would only throw away).
//!
//! Counters must never go backwards for a caller: a tap re-created under
//! the same name starts from zero, so the last values seen are kept per tap
//! and a drop is folded into an offset. What was seen is saved (one file for
//! the host, written only when a value changed) before the reply leaves, so
//! a vmd killed and restarted still never reports less than it did.
//!
//! The cost is bounded for a host of a thousand VMs (BENCHMARKS.md):
//! * every tap's counters come from one read of `--net-dev` (the kernel's
//!   `/proc/net/dev`: the same counters as `/sys/class/net/<tap>/statistics`,
//!   which the Go module reads four files a tap at a time);
//! * a VM's spec and its shim's state are parsed again only when its state
//!   file is a new one (one `fstatat` otherwise);
//! * the VMM's `/proc/<pid>/stat` and `/io` are read on every core, and
//!   only for `Usage` and scrapes.
//!
//! Nothing comes from the VMM's API: a slow or dead VM cannot stall the
//! call, and a thousand VMMs are not woken up to answer it.
//!
//! Here: the samples and the collector; [`kernel`] is what it reads (the
//! taps' counters, a VMM's `/proc`, file stamps).

pub mod kernel;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use vmd_runtime::files;
use vmd_runtime::spec::VmSpec;
use vmd_runtime::state::{Phase, ShimState};
use vmd_runtime::vmm::VmState;
use vmd_runtime::{HostPaths, VmName};

use super::manager::Manager;
use crate::api::{MachineMetric, MachineMetrics, NetMetric};
pub use kernel::{parse_net_dev, VmmUsage};
use kernel::{read_net_dev, vmm_usage, Dirs, ProcBudget, ProcFiles, Stamp};

/// rx_bytes, rx_packets, tx_bytes, tx_packets.
pub type Counters = [u64; 4];

#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Seen {
    last: Counters,
    offset: Counters,
}

impl Seen {
    /// Takes the tap's counters now (if it exists) and returns the value a
    /// caller sees: never below the one before.
    fn advance(&mut self, now: Option<Counters>) -> Counters {
        if let Some(now) = now {
            // All four count from the tap's creation: any of them lower
            // means a new tap, which counts on from where the old one was.
            if (0..4).any(|i| now[i] < self.last[i]) {
                for i in 0..4 {
                    self.offset[i] += self.last[i];
                }
            }
            self.last = now;
        }
        std::array::from_fn(|i| self.last[i] + self.offset[i])
    }
}

/// One VM as the collector saw it.
#[derive(Debug, Clone, Default)]
pub struct VmSample {
    pub name: String,
    /// Each tap with the value a caller sees (never decreasing).
    pub taps: Vec<(String, Counters)>,
    pub restarts: u64,
    /// The shim's phase; `None`: its state is unknown yet.
    pub phase: Option<Phase>,
    /// The guest is paused (locked).
    pub paused: bool,
    /// Unix seconds at which the current VMM started.
    pub vmm_started_at: Option<u64>,
    /// The VMM is running: what `/proc` says of it.
    pub vmm: Option<VmmUsage>,
}

impl VmSample {
    /// The state operators see (`vmd_vm_state`).
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            None => "unknown",
            Some(Phase::Running) if self.paused => "paused",
            Some(Phase::Running) => "running",
            Some(Phase::Starting) => "starting",
            Some(Phase::BackingOff) => "backing_off",
            Some(Phase::Failed) => "failed",
            Some(Phase::PoweredOff) => "powered_off",
            Some(Phase::Stopping) => "stopping",
            Some(Phase::Stopped) => "stopped",
        }
    }

    /// `Private` (all but `p-*`) and `Public` (`p-*`), as Zero-OS splits them.
    pub fn machine_metric(&self) -> MachineMetric {
        let mut out = MachineMetric::default();
        for (tap, c) in &self.taps {
            let m = if is_public(tap) {
                &mut out.public
            } else {
                &mut out.private
            };
            add(m, *c);
        }
        out.restarts = Some(self.restarts);
        if let Some(u) = self.vmm {
            out.cpu_time_ms = u.cpu_ms;
            out.memory_rss = u.rss_bytes;
            out.disk_read_bytes = u.read_bytes;
            out.disk_write_bytes = u.write_bytes;
        }
        out
    }
}

/// Zero-OS names public taps `p-*`; billing counts only those.
pub fn is_public(tap: &str) -> bool {
    tap.starts_with("p-")
}

fn add(m: &mut NetMetric, c: Counters) {
    m.net_rx_bytes += c[0];
    m.net_rx_packets += c[1];
    m.net_tx_bytes += c[2];
    m.net_tx_packets += c[3];
}

/// What is kept of one VM between calls: what its files said when they
/// were last read.
#[derive(Debug, Default)]
struct Known {
    taps: Vec<String>,
    state_stamp: Option<Stamp>,
    /// What the metrics need of the shim's state (not all of it: a
    /// thousand VMs' event logs would be megabytes).
    state: Option<Brief>,
    /// Whether this VM was seen by an earlier call of this vmd.
    met: bool,
    /// Its VMM's `/proc` files, kept open.
    proc: Option<ProcFiles>,
}

impl Known {
    fn refresh(&mut self, dirs: &Dirs, run: &vmd_runtime::RunDir) {
        // Run writes the spec before the shim's first state, and a VM made
        // again has a new shim, whose state is a new file: while the state
        // file is the same one, so is the spec.
        let st = dirs.stamp(&run.state());
        if st.is_some() && st == self.state_stamp {
            return;
        }
        self.taps = files::read_json::<VmSpec>(&run.spec())
            .map(|spec| spec.nets.into_iter().map(|n| n.tap).collect())
            .unwrap_or_default();
        self.state = ShimState::load(&run.state())
            .ok()
            .flatten()
            .map(|st| Brief {
                phase: st.phase,
                paused: st.vm == Some(VmState::Paused),
                restarts: st.restarts,
                vmm: st.vmm.map(|v| (v.pid, v.start_ticks)),
                vmm_started_at: st.vmm_started_at,
            });
        self.state_stamp = st;
    }
}

#[derive(Debug, Clone, Copy)]
struct Brief {
    phase: Phase,
    paused: bool,
    restarts: u64,
    /// The VMM's pid and start time (`ProcessIdentity`).
    vmm: Option<(i32, u64)>,
    vmm_started_at: Option<u64>,
}

/// The collector's memory: what each VM's files said, and the tap counters
/// seen (as saved in `<runtime>/tap-counters.json`).
struct Cache {
    loaded: bool,
    known: HashMap<VmName, Known>,
    /// By VM, by tap.
    seen: BTreeMap<String, BTreeMap<String, Seen>>,
    budget: ProcBudget,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            loaded: false,
            known: HashMap::new(),
            seen: BTreeMap::new(),
            budget: ProcBudget::from_limit(),
        }
    }
}

/// The metrics of a host's VMs, from one collector so that every reader
/// (the zbus `Metrics`, the OpenMetrics endpoint) sees the same counters.
#[derive(Clone, Default)]
pub struct Collector {
    cache: Arc<Mutex<Cache>>,
}

/// Where the collector reads.
#[derive(Clone)]
struct Sources {
    paths: HostPaths,
    net_dev: PathBuf,
    tap_netns: Option<PathBuf>,
}

/// What a collection reads of each VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Its taps' counters and its shim's state: what the Go type of
    /// `Metrics` holds (and its restarts). Billing asks for these, on every
    /// node, for every VM: they cost no `/proc` read.
    Counters,
    /// Also its VMM's CPU time, memory and disk I/O from `/proc`.
    Usage,
}

impl Manager {
    /// The zbus `Metrics`: each VM's network counters and restarts.
    pub async fn metrics(&self) -> MachineMetrics {
        self.machine_metrics(Reading::Counters).await
    }

    /// vmd's `Usage`: [`Manager::metrics`] and what the VMM uses.
    pub async fn usage(&self) -> MachineMetrics {
        self.machine_metrics(Reading::Usage).await
    }

    async fn machine_metrics(&self, reading: Reading) -> MachineMetrics {
        self.collect(reading)
            .await
            .into_iter()
            .map(|s| {
                let m = s.machine_metric();
                (s.name, m)
            })
            .collect()
    }

    /// Every VM present, sorted by name.
    pub async fn collect(&self, reading: Reading) -> Vec<VmSample> {
        let sources = Sources {
            paths: self.paths().clone(),
            net_dev: self.host().net_dev.clone(),
            tap_netns: self.host().tap_netns.clone(),
        };
        self.collector()
            .collect(sources, self.names(), reading)
            .await
    }
}

impl Collector {
    async fn collect(&self, src: Sources, names: Vec<VmName>, reading: Reading) -> Vec<VmSample> {
        // One collection at a time: the counters seen advance in order.
        let mut cache = self.cache.lock().await;
        if !cache.loaded {
            cache.seen = files::read_json(&src.paths.tap_counters()).unwrap_or_default();
            cache.loaded = true;
        }
        let net = {
            let (path, ns) = (src.net_dev.clone(), src.tap_netns.clone());
            tokio::task::spawn_blocking(move || read_net_dev(&path, ns.as_deref()))
                .await
                .unwrap_or_else(|_| Err("the reading thread failed".into()))
        };
        let net = net.unwrap_or_else(|e| {
            // The counters stay where they were (they never go back).
            tracing::warn!(path = %src.net_dev.display(), error = %e, "cannot read the taps' counters");
            HashMap::new()
        });

        // The files and /proc of every VM, read on every core.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = names.len().div_ceil(cores).max(1);
        let mut parts = Vec::new();
        for chunk in names.chunks(per) {
            let work: Vec<(VmName, Known)> = chunk
                .iter()
                .map(|n| (n.clone(), cache.known.remove(n).unwrap_or_default()))
                .collect();
            let paths = src.paths.clone();
            let budget = cache.budget.clone();
            parts.push(tokio::task::spawn_blocking(move || {
                let dirs = Dirs::open(&paths);
                let mut buf = String::with_capacity(1024);
                work.into_iter()
                    .map(|(name, mut known)| {
                        known.refresh(&dirs, &paths.run_dir(&name));
                        let usage = match known.state.and_then(|st| st.vmm) {
                            // Its files stay open for the next reading
                            // that wants them.
                            Some(_) if reading == Reading::Counters => None,
                            Some((pid, start)) => {
                                vmm_usage(&dirs, &budget, &mut known.proc, &mut buf, pid, start)
                            }
                            None => {
                                known.proc = None;
                                None
                            }
                        };
                        (name, known, usage)
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let mut read = Vec::with_capacity(names.len());
        for p in parts {
            // A reading thread that panicked loses its VMs for this call only.
            if let Ok(part) = p.await {
                read.extend(part);
            }
        }

        // Whether what is saved must be written again.
        let mut changed = false;
        let mut seen = std::mem::take(&mut cache.seen);
        let mut out = Vec::with_capacity(read.len());
        for (name, known, usage) in read {
            let mut vm_seen = match seen.remove(name.as_str()) {
                Some(s) => s,
                // A VM of a vmd from before the host's file: its own file.
                None if !known.met => {
                    files::read_json(&src.paths.run_dir(&name).metrics()).unwrap_or_default()
                }
                None => BTreeMap::new(),
            };
            let had = vm_seen.len();
            vm_seen.retain(|tap, _| known.taps.contains(tap));
            changed |= vm_seen.len() != had;
            let taps = known
                .taps
                .iter()
                .map(|t| {
                    let s = vm_seen.entry(t.clone()).or_default();
                    let was = *s;
                    let v = s.advance(net.get(t).copied());
                    changed |= *s != was;
                    (t.clone(), v)
                })
                .collect();
            let st = known.state;
            out.push(VmSample {
                name: name.as_str().to_owned(),
                taps,
                restarts: st.map_or(0, |s| s.restarts),
                phase: st.map(|s| s.phase),
                paused: st.is_some_and(|s| s.paused),
                vmm_started_at: st.and_then(|s| s.vmm_started_at),
                vmm: usage,
            });
            if !vm_seen.is_empty() {
                cache.seen.insert(name.as_str().to_owned(), vm_seen);
            }
            cache.known.insert(name, Known { met: true, ..known });
        }
        // VMs deleted since: forgotten. VMs present but not read this time
        // (a reading thread failed) keep what was seen.
        let present: std::collections::HashSet<&str> = names.iter().map(|n| n.as_str()).collect();
        cache.known.retain(|n, _| present.contains(n.as_str()));
        for (vm, s) in seen {
            if present.contains(vm.as_str()) {
                cache.seen.insert(vm, s);
            } else {
                changed = true;
            }
        }
        if changed {
            // Before the reply: what a caller is told must survive a kill.
            // Atomic, not synced: the file is on the runtime tmpfs, and after
            // a power loss the VMs and their taps are new anyway.
            let saved = serde_json::to_vec(&cache.seen)
                .map_err(std::io::Error::other)
                .and_then(|data| files::replace(&src.paths.tap_counters(), &data, 0o600));
            if let Err(e) = saved {
                tracing::warn!(error = %e, "cannot save the tap counters seen");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recreated_tap_keeps_counting_up() {
        let mut s = Seen::default();
        assert_eq!(s.advance(Some([100, 1, 200, 2])), [100, 1, 200, 2]);
        // Gone for a moment: the last value stays.
        assert_eq!(s.advance(None), [100, 1, 200, 2]);
        // Back from zero.
        assert_eq!(s.advance(Some([10, 1, 0, 0])), [110, 2, 200, 2]);
        assert_eq!(s.advance(Some([20, 2, 5, 1])), [120, 3, 205, 3]);
    }
}
