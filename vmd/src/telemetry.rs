//! What vmd counts of its own work beyond the calls it answers (those are
//! `zbus::server::CallStats`): its calls to peer modules (the network
//! module, provisiond) by outcome, and what its reconciliations did. The
//! OpenMetrics endpoint shows them (docs/metrics.md).
//!
//! Labels come from vmd's own code (module names given by flags, method
//! names and actions written here), never from a caller: the series are a
//! fixed, small set.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::zbus::client::ClientError;
use crate::zbus::wire::Response;

/// How a call to a peer module ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum PeerOutcome {
    /// Answered without an error.
    Ok,
    /// The method ran and failed (its `error`).
    Error,
    /// The peer refused the call itself (a protocol error: "not a
    /// function", malformed arguments).
    Refused,
    /// No reply within the call's deadline.
    Timeout,
    /// The broker could not be reached or failed.
    Unreachable,
    /// A reply vmd cannot decode.
    Undecodable,
}

impl PeerOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerOutcome::Ok => "ok",
            PeerOutcome::Error => "error",
            PeerOutcome::Refused => "refused",
            PeerOutcome::Timeout => "timeout",
            PeerOutcome::Unreachable => "unreachable",
            PeerOutcome::Undecodable => "undecodable",
        }
    }

    /// The outcome of a request; `None` when it never left (it could not be
    /// encoded): that is no call to the peer.
    pub fn of(result: &Result<Response, ClientError>) -> Option<Self> {
        Some(match result {
            Ok(r) if r.error.as_ref().is_some_and(|e| !e.is_empty()) => PeerOutcome::Refused,
            Ok(r)
                if r.output
                    .error
                    .as_ref()
                    .is_some_and(|e| !e.message.is_empty()) =>
            {
                PeerOutcome::Error
            }
            Ok(_) => PeerOutcome::Ok,
            Err(ClientError::Timeout { .. }) => PeerOutcome::Timeout,
            Err(ClientError::Broker(_) | ClientError::Redis(_)) => PeerOutcome::Unreachable,
            Err(ClientError::Decode(_) | ClientError::MissingData) => PeerOutcome::Undecodable,
            Err(ClientError::Encode(_)) => return None,
            // Not made by `request`; counted as what they mean.
            Err(ClientError::Protocol(_)) => PeerOutcome::Refused,
            Err(ClientError::Method(_)) => PeerOutcome::Error,
        })
    }
}

impl EncodeLabelValue for PeerOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerCallLabels {
    module: String,
    method: String,
    outcome: PeerOutcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerMethodLabels {
    module: String,
    method: String,
}

fn peer_latency() -> Histogram {
    // 100 µs to 60 s: a live module answers in well under a millisecond; a
    // dead one costs the call's whole deadline (2 s by default, up to the
    // 30 s a flag allows).
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 30.0, 60.0,
    ])
}

/// vmd's calls to other modules on the bus. Cheap to clone (shared
/// counters).
#[derive(Debug, Clone)]
pub struct PeerCalls {
    calls: Family<PeerCallLabels, Counter>,
    latency: Family<PeerMethodLabels, Histogram, fn() -> Histogram>,
}

impl Default for PeerCalls {
    fn default() -> Self {
        PeerCalls {
            calls: Family::default(),
            latency: Family::new_with_constructor(peer_latency),
        }
    }
}

impl PeerCalls {
    pub fn record(&self, module: &str, method: &str, outcome: PeerOutcome, took: Duration) {
        self.latency
            .get_or_create(&PeerMethodLabels {
                module: module.to_owned(),
                method: method.to_owned(),
            })
            .observe(took.as_secs_f64());
        self.calls
            .get_or_create(&PeerCallLabels {
                module: module.to_owned(),
                method: method.to_owned(),
                outcome,
            })
            .inc();
    }
}

/// What the start-up reconciliation did to a VM or service.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Reconciled {
    /// Found running under zinit: nothing to do.
    Adopted,
    /// Its service was monitored again (zinit had forgotten it).
    Remonitored,
    /// An interrupted Delete was finished.
    CompletedDelete,
    /// A Run that never committed was rolled back.
    RolledBack,
    /// A service, file or index entry nobody owns was removed.
    OrphanRemoved,
    /// A step failed (logged with its cause).
    Failed,
}

/// What a pass towards provisiond did to a VM.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum WorkloadAction {
    /// Deleted: its workload is gone.
    Reaped,
    /// Its failure was told to provisiond.
    ReportedFailed,
    /// Told provisiond it runs again.
    ReportedOk,
    /// Started again after its cooldown.
    Retried,
}

macro_rules! label_value {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
        }
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                use std::fmt::Write;
                encoder.write_str(self.as_str())
            }
        }
    };
}

label_value!(Reconciled {
    Adopted => "adopted",
    Remonitored => "remonitored",
    CompletedDelete => "completed_delete",
    RolledBack => "rolled_back",
    OrphanRemoved => "orphan_removed",
    Failed => "failed",
});

label_value!(WorkloadAction {
    Reaped => "reaped",
    ReportedFailed => "reported_failed",
    ReportedOk => "reported_ok",
    Retried => "retried",
});

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconciledLabel {
    action: Reconciled,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadActionLabel {
    action: WorkloadAction,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassLabel {
    /// `done`, or `unreachable` (provisiond could not be reached: the pass
    /// stopped there).
    outcome: &'static str,
}

/// The reconciliations' work. Cheap to clone (shared counters).
#[derive(Debug, Clone, Default)]
pub struct Work {
    reconciled: Family<ReconciledLabel, Counter>,
    pending: Gauge,
    passes: Family<PassLabel, Counter>,
    pass_seconds: Counter<f64>,
    workload_actions: Family<WorkloadActionLabel, Counter>,
}

impl Work {
    pub fn reconciled(&self, action: Reconciled, n: usize) {
        self.reconciled
            .get_or_create(&ReconciledLabel { action })
            .inc_by(n as u64);
    }

    /// VMs whose start-up reconciliation is under way.
    pub fn pending(&self) -> &Gauge {
        &self.pending
    }

    /// A pass towards provisiond ended after `took`.
    pub fn pass(&self, reached: bool, took: Duration) {
        let outcome = if reached { "done" } else { "unreachable" };
        self.passes.get_or_create(&PassLabel { outcome }).inc();
        self.pass_seconds.inc_by(took.as_secs_f64());
    }

    pub fn workload(&self, action: WorkloadAction) {
        self.workload_actions
            .get_or_create(&WorkloadActionLabel { action })
            .inc();
    }
}

/// Everything here, as one handle the manager carries.
#[derive(Debug, Clone, Default)]
pub struct Telemetry {
    pub peers: PeerCalls,
    pub work: Work,
}

impl Telemetry {
    /// Adds these families to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vmd_peer_calls",
            "zbus calls vmd made to other modules (network, provisiond), by outcome",
            self.peers.calls.clone(),
        );
        registry.register_with_unit(
            "vmd_peer_call_duration",
            "Time from sending a call to another module to its reply or deadline",
            Unit::Seconds,
            self.peers.latency.clone(),
        );
        let w = &self.work;
        registry.register(
            "vmd_reconcile_actions",
            "What start-up reconciliation did, by action",
            w.reconciled.clone(),
        );
        registry.register(
            "vmd_reconcile_pending_vms",
            "VMs whose start-up reconciliation (a Delete to finish, a Run to roll back) is under way",
            w.pending.clone(),
        );
        registry.register(
            "vmd_workload_passes",
            "Passes over the VMs asking provisiond about their workloads, by outcome",
            w.passes.clone(),
        );
        registry.register_with_unit(
            "vmd_workload_pass",
            "Time spent in passes over the VMs asking provisiond",
            Unit::Seconds,
            w.pass_seconds.clone(),
        );
        registry.register(
            "vmd_workload_actions",
            "What passes towards provisiond did to VMs, by action",
            w.workload_actions.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zbus::wire::{Output, RemoteError};

    fn response(protocol: Option<&str>, method: Option<&str>) -> Result<Response, ClientError> {
        Ok(Response {
            id: "x".into(),
            output: Output {
                data: None,
                error: method.map(|m| RemoteError { message: m.into() }),
            },
            error: protocol.map(str::to_owned),
        })
    }

    #[test]
    fn outcomes_as_the_peer_answered() {
        assert_eq!(
            PeerOutcome::of(&response(None, None)),
            Some(PeerOutcome::Ok)
        );
        // Go leaves empty strings where there is no error.
        assert_eq!(
            PeerOutcome::of(&response(Some(""), Some(""))),
            Some(PeerOutcome::Ok)
        );
        assert_eq!(
            PeerOutcome::of(&response(None, Some("deployment not found"))),
            Some(PeerOutcome::Error)
        );
        assert_eq!(
            PeerOutcome::of(&response(Some("not a function"), None)),
            Some(PeerOutcome::Refused)
        );
        let timeout = Err(ClientError::Timeout {
            queue: "q".into(),
            timeout: Duration::from_secs(2),
        });
        assert_eq!(PeerOutcome::of(&timeout), Some(PeerOutcome::Timeout));
    }

    #[test]
    fn a_scrape_shows_the_work() {
        let t = Telemetry::default();
        t.peers.record(
            "provision",
            "GetWorkloadStatus",
            PeerOutcome::Timeout,
            Duration::from_secs(2),
        );
        t.work.reconciled(Reconciled::CompletedDelete, 3);
        t.work.workload(WorkloadAction::Reaped);
        t.work.pass(false, Duration::from_millis(1500));
        let mut reg = Registry::default();
        t.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for line in [
            r#"vmd_peer_calls_total{module="provision",method="GetWorkloadStatus",outcome="timeout"} 1"#,
            r#"vmd_peer_call_duration_seconds_count{module="provision",method="GetWorkloadStatus"} 1"#,
            r#"vmd_reconcile_actions_total{action="completed_delete"} 3"#,
            "vmd_reconcile_pending_vms 0",
            r#"vmd_workload_passes_total{outcome="unreachable"} 1"#,
            "vmd_workload_pass_seconds_total 1.5",
            r#"vmd_workload_actions_total{action="reaped"} 1"#,
        ] {
            assert!(out.contains(line), "{line} not in\n{out}");
        }
    }
}
