//! What the VMs use, for a person: `vmd ctl metrics` (totals since each
//! VM's VMM started, and its network counters) and `vmd ctl top` (rates
//! between two `Usage` calls, refreshed like `top`). `Usage` is vmd's
//! `Metrics` with what each VMM uses.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

use vmd::api::{MachineMetric, MachineMetrics};
use vmd::stub::VmdStub;
use vmd::zbus::client::ClientError;

/// `1.5K`, `20.0M`, `3.1G` (powers of 1024, as `top` and `free -h`).
pub fn human(bytes: f64) -> String {
    let units = ["B", "K", "M", "G", "T", "P"];
    let mut v = bytes;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0}{}", units[i])
    } else {
        format!("{v:.1}{}", units[i])
    }
}

fn opt(v: Option<u64>, f: impl Fn(u64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// The `vmd ctl metrics` table.
pub fn print_totals(m: &MachineMetrics) {
    println!(
        "{:<24} {:>4} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "NAME",
        "RST",
        "CPU S",
        "MEM",
        "DISK RD",
        "DISK WR",
        "PRIV RX",
        "PRIV TX",
        "PUB RX",
        "PUB TX"
    );
    for (name, v) in m {
        println!(
            "{:<24} {:>4} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            name,
            opt(v.restarts, |r| r.to_string()),
            opt(v.cpu_time_ms, |ms| format!("{:.1}", ms as f64 / 1000.0)),
            opt(v.memory_rss, |b| human(b as f64)),
            opt(v.disk_read_bytes, |b| human(b as f64)),
            opt(v.disk_write_bytes, |b| human(b as f64)),
            human(v.private.net_rx_bytes as f64),
            human(v.private.net_tx_bytes as f64),
            human(v.public.net_rx_bytes as f64),
            human(v.public.net_tx_bytes as f64),
        );
    }
}

/// One VM over an interval: rates per second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rates {
    pub name: String,
    /// Percent of one core (a VM with 4 busy vCPUs shows 400).
    pub cpu_percent: Option<f64>,
    pub memory_rss: Option<u64>,
    pub disk_read_per_sec: Option<f64>,
    pub disk_write_per_sec: Option<f64>,
    /// Private and public together.
    pub net_rx_per_sec: f64,
    pub net_tx_per_sec: f64,
}

/// Rates between two snapshots `secs` apart. A counter that went back (the
/// VMM restarted: its CPU and disk counters start again) gives no rate for
/// that interval rather than a wrong one. VMs in only one snapshot are
/// left out, VMs that came since show once they are in both.
pub fn rates(before: &MachineMetrics, now: &MachineMetrics, secs: f64) -> Vec<Rates> {
    let per_sec = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b >= a && secs > 0.0 => Some((b - a) as f64 / secs),
        _ => None,
    };
    let net = |m: &MachineMetric| {
        (
            m.private.net_rx_bytes + m.public.net_rx_bytes,
            m.private.net_tx_bytes + m.public.net_tx_bytes,
        )
    };
    let mut out: Vec<Rates> = now
        .iter()
        .filter_map(|(name, b)| {
            let a = before.get(name)?;
            let ((arx, atx), (brx, btx)) = (net(a), net(b));
            Some(Rates {
                name: name.clone(),
                cpu_percent: per_sec(a.cpu_time_ms, b.cpu_time_ms).map(|ms| ms / 10.0),
                memory_rss: b.memory_rss,
                disk_read_per_sec: per_sec(a.disk_read_bytes, b.disk_read_bytes),
                disk_write_per_sec: per_sec(a.disk_write_bytes, b.disk_write_bytes),
                // Network counters only grow (vmd keeps them across restarts).
                net_rx_per_sec: brx.saturating_sub(arx) as f64 / secs.max(f64::EPSILON),
                net_tx_per_sec: btx.saturating_sub(atx) as f64 / secs.max(f64::EPSILON),
            })
        })
        .collect();
    // The busiest first, as top sorts.
    out.sort_by(|x, y| {
        y.cpu_percent
            .unwrap_or(-1.0)
            .total_cmp(&x.cpu_percent.unwrap_or(-1.0))
            .then_with(|| x.name.cmp(&y.name))
    });
    out
}

fn print_rates(rows: &[Rates], interval: Duration, vms: usize) {
    let now = time::OffsetDateTime::now_utc();
    let total_cpu: f64 = rows.iter().filter_map(|r| r.cpu_percent).sum();
    let total_mem: u64 = rows.iter().filter_map(|r| r.memory_rss).sum();
    println!(
        "vmd top - {:02}:{:02}:{:02} UTC, {vms} VMs, every {:.1} s, CPU {total_cpu:.1} % of a core, memory {}",
        now.hour(),
        now.minute(),
        now.second(),
        interval.as_secs_f64(),
        human(total_mem as f64)
    );
    println!(
        "{:<24} {:>7} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "NAME", "CPU %", "MEM", "DISK RD/s", "DISK WR/s", "NET RX/s", "NET TX/s"
    );
    let f = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), human);
    for r in rows {
        println!(
            "{:<24} {:>7} {:>8} {:>10} {:>10} {:>10} {:>10}",
            r.name,
            r.cpu_percent
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}")),
            opt(r.memory_rss, |b| human(b as f64)),
            f(r.disk_read_per_sec),
            f(r.disk_write_per_sec),
            human(r.net_rx_per_sec),
            human(r.net_tx_per_sec),
        );
    }
}

/// `vmd ctl top`: a new table every `interval`, `iterations` times (0:
/// until interrupted). On a terminal the screen is redrawn; otherwise the
/// tables follow one another (as `top -b`), or JSON lines with `--json`.
pub async fn top(
    stub: &VmdStub,
    interval: Duration,
    iterations: u64,
    json: bool,
) -> Result<(), ClientError> {
    let redraw = !json && std::io::stdout().is_terminal();
    let mut before: MachineMetrics = BTreeMap::new();
    let mut at = Instant::now();
    let mut shown = 0;
    // The first snapshot only starts the first interval.
    let mut first = true;
    loop {
        let now = stub.usage().await?;
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        if !first {
            let rows = rates(&before, &now, secs);
            if json {
                let line =
                    serde_json::to_string(&rows).map_err(|e| ClientError::Method(e.to_string()))?;
                println!("{line}");
            } else {
                if redraw {
                    print!("\x1b[H\x1b[2J");
                }
                print_rates(&rows, interval, now.len());
                if !redraw {
                    println!();
                }
            }
            let _ = std::io::stdout().flush();
            shown += 1;
            if iterations > 0 && shown >= iterations {
                return Ok(());
            }
        }
        first = false;
        before = now;
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(cpu: u64, disk: u64, rx: u64) -> MachineMetric {
        let mut v = MachineMetric {
            cpu_time_ms: Some(cpu),
            memory_rss: Some(64 << 20),
            disk_read_bytes: Some(disk),
            disk_write_bytes: Some(0),
            ..Default::default()
        };
        v.public.net_rx_bytes = rx;
        v.private.net_rx_bytes = rx;
        v
    }

    #[test]
    fn rates_over_an_interval() {
        let before = BTreeMap::from([
            ("a".to_owned(), m(1_000, 0, 0)),
            ("b".to_owned(), m(5_000, 1 << 20, 100)),
            ("gone".to_owned(), m(0, 0, 0)),
        ]);
        let now = BTreeMap::from([
            ("a".to_owned(), m(3_000, 2 << 20, 1000)),
            // Its VMM restarted: CPU and disk start again.
            ("b".to_owned(), m(100, 0, 150)),
            ("new".to_owned(), m(0, 0, 0)),
        ]);
        let r = rates(&before, &now, 2.0);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].name, "a");
        assert_eq!(r[0].cpu_percent, Some(100.0));
        assert_eq!(r[0].disk_read_per_sec, Some(1048576.0));
        assert_eq!(r[0].net_rx_per_sec, 1000.0);
        assert_eq!(r[1].name, "b");
        assert_eq!((r[1].cpu_percent, r[1].disk_read_per_sec), (None, None));
        assert_eq!(r[1].net_rx_per_sec, 50.0);
    }

    #[test]
    fn sizes_read_as_people_read_them() {
        assert_eq!(human(512.0), "512B");
        assert_eq!(human(1536.0), "1.5K");
        assert_eq!(human(64.0 * 1024.0 * 1024.0), "64.0M");
    }
}
