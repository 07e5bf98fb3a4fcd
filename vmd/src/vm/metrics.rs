//! `Metrics`: the host-side counters of each VM's taps, summed into
//! `Private` (every tap but `p-*`) and `Public` (`p-*`), plus vmd's extras.
//!
//! Counters must never go backwards: a tap re-created under the same name
//! starts from zero, so the last values seen are kept per VM and a drop is
//! folded into an offset. One slow VM (a stuck API) cannot stall the call:
//! each VM gets a short deadline and the VMs are read concurrently.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmd_shim::state::ShimState;

use super::manager::{write_atomic, Manager};
use super::name::VmName;
use crate::api::{MachineMetric, MachineMetrics, NetMetric};

const PER_VM: Duration = Duration::from_millis(500);

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

async fn one(m: &Manager, name: &VmName, sys_net: &Path) -> MachineMetric {
    let layout = m.layout();
    let mut out = MachineMetric::default();
    let taps: Vec<String> = std::fs::read_to_string(layout.request(name))
        .ok()
        .and_then(|t| serde_json::from_str::<crate::api::Vm>(&t).ok())
        .map(|vm| vm.network.ifaces.into_iter().map(|i| i.tap).collect())
        .unwrap_or_default();
    let seen_path = layout.metrics(name);
    let mut seen: BTreeMap<String, Seen> = std::fs::read_to_string(&seen_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
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
        if let Ok(data) = serde_json::to_vec(&seen) {
            let _ = write_atomic(&seen_path, &data);
        }
    }
    let run = layout.run_dir(name);
    let st = ShimState::load(&run.state());
    out.restarts = Some(st.restarts);
    if let Some(vmm) = st.vmm.filter(|v| v.alive()) {
        if let Some((cpu_ms, rss)) = process_usage(vmm.pid) {
            out.cpu_time_ms = Some(cpu_ms);
            out.memory_rss = Some(rss);
        }
        if let Ok(body) =
            vmd_shim::api::expect_ok(&run.api_socket(), "GET", "vm.counters", PER_VM).await
        {
            let c: BTreeMap<String, BTreeMap<String, u64>> =
                serde_json::from_slice(&body).unwrap_or_default();
            let sum = |k: &str| -> u64 {
                c.iter()
                    .filter(|(dev, _)| dev.contains("disk"))
                    .filter_map(|(_, v)| v.get(k))
                    .sum()
            };
            out.disk_read_bytes = Some(sum("read_bytes"));
            out.disk_write_bytes = Some(sum("write_bytes"));
        }
    }
    out
}

pub async fn collect(m: &Manager) -> MachineMetrics {
    let sys_net = m.settings().sys_net.clone();
    let names = m.names();
    let futs = names.iter().map(|n| {
        let sys_net = sys_net.clone();
        async move {
            let metric = tokio::time::timeout(PER_VM, one(m, n, &sys_net)).await.ok();
            (n.as_str().to_owned(), metric)
        }
    });
    futures_util::future::join_all(futs)
        .await
        .into_iter()
        .filter_map(|(n, m)| m.map(|m| (n, m)))
        .collect()
}
