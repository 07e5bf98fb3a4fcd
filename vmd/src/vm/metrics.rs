//! `Metrics`: the host-side counters of each VM's taps, summed into
//! `Private` (every tap but `p-*`) and `Public` (`p-*`), plus vmd's extras.
//!
//! Counters must never go backwards: a tap re-created under the same name
//! starts from zero, so the last values seen are kept per VM and a drop is
//! folded into an offset.
//!
//! Everything comes from files — vmd's own, sysfs and the VMM's `/proc`
//! entries (block I/O from `/proc/<pid>/io`) — and never from the VMM's API:
//! a slow or dead VM cannot stall the call, and a thousand VMMs are not woken
//! up to answer it. The VMs are read on every core.

use std::collections::BTreeMap;
use std::path::Path;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmd_runtime::files;
use vmd_runtime::spec::VmSpec;
use vmd_runtime::state::ShimState;
use vmd_runtime::{HostPaths, VmName};

use super::manager::Manager;
use crate::api::{MachineMetric, MachineMetrics, NetMetric};

/// rx_bytes, rx_packets, tx_bytes, tx_packets.
type Counters = [u64; 4];
const FILES: [&str; 4] = ["rx_bytes", "rx_packets", "tx_bytes", "tx_packets"];

#[derive(Default, Serialize, Deserialize)]
struct Seen {
    last: Counters,
    offset: Counters,
}

fn read_tap(sys_net: &Path, tap: &str) -> Option<Counters> {
    let dir = sys_net.join(tap).join("statistics");
    let mut c = [0u64; 4];
    for (i, f) in FILES.iter().enumerate() {
        c[i] = std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse()
            .ok()?;
    }
    Some(c)
}

fn add(m: &mut NetMetric, c: Counters) {
    m.net_rx_bytes += c[0];
    m.net_rx_packets += c[1];
    m.net_tx_bytes += c[2];
    m.net_tx_packets += c[3];
}

fn ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Bytes a process read from and wrote to storage (`/proc/<pid>/io`): for
/// a VMM, its guest's disk I/O.
fn process_io(pid: i32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("read_bytes:")?, field("write_bytes:")?))
}

/// CPU time (ms) and RSS (bytes) of a live process.
fn process_usage(pid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some((ticks * 1000 / ticks_per_sec(), rss_pages * page))
}

fn one(paths: &HostPaths, name: &VmName, sys_net: &Path) -> MachineMetric {
    let mut out = MachineMetric::default();
    let run = paths.run_dir(name);
    let taps: Vec<String> = files::read_json::<VmSpec>(&run.spec())
        .map(|spec| spec.nets.into_iter().map(|n| n.tap).collect())
        .unwrap_or_default();
    let seen_path = run.metrics();
    let mut seen: BTreeMap<String, Seen> = files::read_json(&seen_path).unwrap_or_default();
    for tap in &taps {
        let s = seen.entry(tap.clone()).or_default();
        let now = read_tap(sys_net, tap);
        let mut total = s.last;
        if let Some(now) = now {
            for i in 0..4 {
                if now[i] < s.last[i] {
                    // The tap was re-created: keep counting from where it was.
                    s.offset[i] += s.last[i];
                }
                s.last[i] = now[i];
                total[i] = now[i];
            }
        }
        let value: Counters = std::array::from_fn(|i| total[i] + s.offset[i]);
        if tap.starts_with("p-") {
            add(&mut out.public, value);
        } else {
            add(&mut out.private, value);
        }
    }
    if !taps.is_empty() {
        // Written on every call for every VM with taps: atomic for readers,
        // not synced (a thousand fsyncs would make one Metrics call take
        // seconds; after a power loss the counters restart from an older
        // `last`, which only undercounts what the taps saw meanwhile).
        let saved = serde_json::to_vec(&seen)
            .map_err(std::io::Error::other)
            .and_then(|data| files::replace(&seen_path, &data, 0o600));
        if let Err(e) = saved {
            // The counters are still right; a later drop of a tap may not be.
            tracing::warn!(vm = %name, error = %e, "cannot save the tap counters seen");
        }
    }
    let st = ShimState::load(&run.state())
        .ok()
        .flatten()
        .unwrap_or_default();
    out.restarts = Some(st.restarts);
    if let Some(vmm) = st.vmm.filter(|v| v.alive()) {
        if let Some((cpu_ms, rss)) = process_usage(vmm.pid) {
            out.cpu_time_ms = Some(cpu_ms);
            out.memory_rss = Some(rss);
        }
        if let Some((read, written)) = process_io(vmm.pid) {
            out.disk_read_bytes = Some(read);
            out.disk_write_bytes = Some(written);
        }
    }
    out
}

impl Manager {
    pub async fn metrics(&self) -> MachineMetrics {
        collect(self).await
    }
}

async fn collect(m: &Manager) -> MachineMetrics {
    let paths = Arc::new(m.paths().clone());
    let sys_net = Arc::new(m.settings().sys_net.clone());
    let names = m.names();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = names.len().div_ceil(cores).max(1);
    let tasks: Vec<_> = names
        .chunks(per)
        .map(|chunk| {
            let (chunk, paths, sys_net) =
                (chunk.to_vec(), Arc::clone(&paths), Arc::clone(&sys_net));
            tokio::task::spawn_blocking(move || {
                chunk
                    .iter()
                    .map(|n| (n.as_str().to_owned(), one(&paths, n, &sys_net)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut out = MachineMetrics::new();
    for t in tasks {
        if let Ok(part) = t.await {
            out.extend(part);
        }
    }
    out
}
