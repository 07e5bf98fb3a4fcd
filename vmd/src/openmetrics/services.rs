//! What a scrape shows besides the VMs' own figures: each VM's console, each
//! log stream's delivery, and whether zinit has the shims and workers up.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use crate::vm::streams::StreamSample;

/// Label values the crate writes as they are: VM names and stream ids are
/// already of these characters; anything else is left out.
fn plain(v: &str) -> bool {
    v.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Debug)]
pub(super) struct Services {
    /// VM name → console bytes written.
    pub console: Vec<(String, u64)>,
    pub streams: Vec<StreamSample>,
    /// `vm` or `stream` → (up, down) services in zinit; none when zinit
    /// did not answer.
    pub zinit: Option<BTreeMap<&'static str, (u64, u64)>>,
}

impl Collector for Services {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut f = e.encode_descriptor(
                "vmd_vm_console_written",
                "Bytes the VM printed on its serial console, all of its life (what the log rotated away included)",
                Some(&Unit::Bytes),
                MetricType::Counter,
            )?;
            for (vm, bytes) in self.console.iter().filter(|(vm, _)| plain(vm)) {
                ConstCounter::new(*bytes).encode(f.encode_family(&[("vm", vm.as_str())])?)?;
            }
        }
        let streams: Vec<&StreamSample> = self
            .streams
            .iter()
            .filter(|s| plain(&s.id) && plain(&s.vm))
            .collect();
        type Figure = fn(&StreamSample) -> Option<u64>;
        let counters: [(&str, &str, Figure); 4] = [
            (
                "vmd_stream_sent",
                "Console bytes the stream delivered (before compression)",
                |s| Some(s.progress.sent_bytes),
            ),
            (
                "vmd_stream_dropped",
                "Console bytes rotated out of the log before the stream sent them",
                |s| Some(s.progress.dropped_bytes),
            ),
            (
                "vmd_stream_rejected",
                "Console bytes the receiver refused for good (Loki's 400)",
                |s| Some(s.progress.rejected_bytes),
            ),
            (
                "vmd_stream_unheard",
                "Console bytes published to Redis while no subscriber listened",
                |s| Some(s.progress.unheard_bytes),
            ),
        ];
        for (name, help, value) in counters {
            let mut f = e.encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Counter)?;
            for s in &streams {
                if let Some(v) = value(s) {
                    let labels = [("stream", s.id.as_str()), ("vm", s.vm.as_str())];
                    ConstCounter::new(v).encode(f.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut f = e.encode_descriptor(
                "vmd_stream_lag",
                "Console bytes printed and not yet sent",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            for s in &streams {
                if let Some(lag) = s.lag_bytes {
                    let labels = [("stream", s.id.as_str()), ("vm", s.vm.as_str())];
                    ConstGauge::new(lag as i64).encode(f.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut f = e.encode_descriptor(
                "vmd_stream_connected",
                "1 while the stream's worker is connected to its receiver",
                None,
                MetricType::Gauge,
            )?;
            for s in &streams {
                let labels = [("stream", s.id.as_str()), ("vm", s.vm.as_str())];
                ConstGauge::new(i64::from(s.progress.connected))
                    .encode(f.encode_family(&labels)?)?;
            }
        }
        if let Some(z) = &self.zinit {
            let mut f = e.encode_descriptor(
                "vmd_services",
                "zinit services of vmd's by kind (vm: shims, stream: log stream workers), up (running) or down",
                None,
                MetricType::Gauge,
            )?;
            for (kind, (up, down)) in z {
                for (state, n) in [("up", up), ("down", down)] {
                    let labels = [("kind", *kind), ("state", state)];
                    ConstGauge::new(*n as i64).encode(f.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}
