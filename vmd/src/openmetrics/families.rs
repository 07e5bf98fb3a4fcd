//! What a scrape shows of the host's VMs: one family per figure, one
//! series per VM (and per tap for the network), from one collection.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use vmd_runtime::name::is_word_char;

use crate::vm::metrics::{is_public, VmSample};

/// The VMs of one scrape, encoded family by family. VM names are
/// `VmName`s (word characters), safe as label values unescaped.
#[derive(Debug)]
pub(super) struct Vms {
    pub vms: Vec<VmSample>,
    /// Unix seconds of the scrape.
    pub now: u64,
    pub collect_secs: f64,
}

/// Every state a VM is shown in (one series each, 1 for the current one).
const STATES: [&str; 9] = [
    "starting",
    "running",
    "paused",
    "backing_off",
    "failed",
    "powered_off",
    "stopping",
    "stopped",
    "unknown",
];

impl Vms {
    /// One family with one series per VM (`vm` label), skipping VMs for
    /// which `value` has nothing.
    fn per_vm<M: EncodeMetric>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        kind: MetricType,
        value: impl Fn(&VmSample) -> Option<M>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit, kind)?;
        for vm in &self.vms {
            if let Some(v) = value(vm) {
                v.encode(family.encode_family(&[("vm", vm.name.as_str())])?)?;
            }
        }
        Ok(())
    }

    fn per_tap(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        index: usize,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for vm in &self.vms {
            // The crate writes label values as they are: only names of
            // word characters (a tap from a file vmd did not check is left
            // out rather than let it break the format).
            for (tap, c) in vm.taps.iter().filter(|(t, _)| t.chars().all(is_word_char)) {
                let network = if is_public(tap) { "public" } else { "private" };
                let labels = [
                    ("vm", vm.name.as_str()),
                    ("interface", tap.as_str()),
                    ("network", network),
                ];
                ConstCounter::new(c[index]).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for Vms {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = MetricType::Gauge;
        let counter = MetricType::Counter;
        {
            let mut family = e.encode_descriptor(
                "vmd_vm_state",
                "The VM's state: 1 for the one it is in",
                None,
                gauge,
            )?;
            for vm in &self.vms {
                for state in STATES {
                    let labels = [("vm", vm.name.as_str()), ("state", state)];
                    let v = i64::from(vm.state_name() == state);
                    ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        self.per_vm(
            &mut e,
            "vmd_vm_restarts",
            "VMM starts after the first one",
            None,
            counter,
            |vm| Some(ConstCounter::new(vm.restarts)),
        )?;
        self.per_vm(
            &mut e,
            "vmd_vm_uptime",
            "Time since the running VMM started",
            Some(&Unit::Seconds),
            gauge,
            |vm| {
                let started = vm.vmm.and(vm.vmm_started_at)?;
                Some(ConstGauge::new(self.now.saturating_sub(started) as i64))
            },
        )?;
        self.per_vm(
            &mut e,
            "vmd_vm_cpu",
            "CPU time of the running VMM and all its threads (vCPUs included)",
            Some(&Unit::Seconds),
            counter,
            |vm| Some(ConstCounter::new(vm.vmm?.cpu_ms? as f64 / 1000.0)),
        )?;
        self.per_vm(
            &mut e,
            "vmd_vm_memory_rss",
            "Resident memory of the running VMM (the guest's touched memory included)",
            Some(&Unit::Bytes),
            gauge,
            |vm| Some(ConstGauge::new(vm.vmm?.rss_bytes? as i64)),
        )?;
        self.per_vm(
            &mut e,
            "vmd_vm_disk_read",
            "Bytes the running VMM made the host read from storage (/proc/<pid>/io)",
            Some(&Unit::Bytes),
            counter,
            |vm| Some(ConstCounter::new(vm.vmm?.read_bytes?)),
        )?;
        self.per_vm(
            &mut e,
            "vmd_vm_disk_written",
            "Bytes the running VMM made the host write to storage (/proc/<pid>/io)",
            Some(&Unit::Bytes),
            counter,
            |vm| Some(ConstCounter::new(vm.vmm?.write_bytes?)),
        )?;
        let taps = [
            (
                "vmd_vm_network_receive",
                "Bytes the host received from the VM's tap (its rx_bytes)",
                Some(&Unit::Bytes),
                0,
            ),
            (
                "vmd_vm_network_receive_packets",
                "Packets the host received from the VM's tap (its rx_packets)",
                None,
                1,
            ),
            (
                "vmd_vm_network_transmit",
                "Bytes the host sent into the VM's tap (its tx_bytes)",
                Some(&Unit::Bytes),
                2,
            ),
            (
                "vmd_vm_network_transmit_packets",
                "Packets the host sent into the VM's tap (its tx_packets)",
                None,
                3,
            ),
        ];
        for (name, help, unit, i) in taps {
            self.per_tap(&mut e, name, help, unit, i)?;
        }
        let vms = ConstGauge::new(self.vms.len() as i64);
        vms.encode(e.encode_descriptor("vmd_vms", "VMs present", None, gauge)?)?;
        let took = ConstGauge::new(self.collect_secs);
        took.encode(e.encode_descriptor(
            "vmd_scrape_collect",
            "Time this scrape took to read the VMs",
            Some(&Unit::Seconds),
            gauge,
        )?)?;
        Ok(())
    }
}
