//! The VM module's part towards the provisioning engine: one pass over the
//! VMs every period, which reaps VMs whose workload provisiond deleted and
//! reports VMs vmd gave up on ([`report`]).
//!
//! Reaping: a VM whose workload provisiond deleted is deleted too.
//!
//! provisiond deletes a VM through `Delete` only when `Inspect` answers, and
//! a node may miss a `Delete` (vmd away, a deprovision that failed half way).
//! The Go module's monitor is the safety net: every 10 s it asks
//! `GetWorkloadStatus` of every running VM and kills those whose workload
//! does not exist or is `deleted` (`shared/spec/zos-node.md` §A). vmd does
//! the same with its own rules:
//!
//! * only names that are workload ids (`<twin>-<contract>-<name>`), never
//!   `healthcheck-vm*` — provisiond errors on the others, and the Go module
//!   never kills those either;
//! * `error` is kept: a VM vmd gave up on is reported as `error`, and its
//!   user wants to see why (PR #96's rule);
//! * asked at start and then every period, spread over the period and at
//!   most [`MAX_RATE`] asks a second, never holding anything while waiting
//!   for provisiond (a dead provisiond costs one timed-out call per pass,
//!   then a growing pause);
//! * the deletion is the normal graceful `Delete`, under the VM's key, and
//!   only if the VM is the one that was asked about: a `Delete` and `Run`
//!   of the same name meanwhile win.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use vmd_runtime::VmName;

use super::manager::Manager;
use crate::provision::{Provision, ProvisionError, WorkloadId};
use crate::telemetry::WorkloadAction;
use crate::zbus::keyed::{KeyGuard, KeyedLocks};
use report::Due;

pub mod report;

/// Asks per second, at most: 1 000 VMs take 10 s, the Go module's period.
pub const MAX_RATE: u32 = 100;

/// The longest pause after provisiond could not be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Which life of a VM: its `present/` entry is made by the Run that
/// committed it, so a Delete and a Run meanwhile give another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Incarnation {
    ino: u64,
    made: Option<SystemTime>,
}

fn incarnation(m: &Manager, name: &VmName) -> Option<Incarnation> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(m.paths().present_mark(name)).ok()?;
    Some(Incarnation {
        ino: md.ino(),
        made: md.modified().ok(),
    })
}

/// Starts reaping on `pool`; the first pass begins at once.
pub fn spawn(
    pool: &tokio::runtime::Handle,
    manager: Arc<Manager>,
    locks: Arc<KeyedLocks>,
    provision: Arc<Provision>,
    period: Duration,
    retry_after: Duration,
) -> tokio::task::JoinHandle<()> {
    pool.spawn(async move {
        let mut backoff = Duration::ZERO;
        loop {
            let started = Instant::now();
            let reached = pass(&manager, &locks, &provision, period, retry_after).await;
            manager.telemetry().work.pass(reached, started.elapsed());
            let pause = if reached {
                backoff = Duration::ZERO;
                period.saturating_sub(started.elapsed())
            } else {
                backoff = (backoff * 2).clamp(period, MAX_BACKOFF);
                backoff
            };
            tokio::time::sleep(pause).await;
        }
    })
}

/// One pass over the VMs; `false` if provisiond could not be reached.
async fn pass(
    m: &Arc<Manager>,
    locks: &Arc<KeyedLocks>,
    p: &Provision,
    period: Duration,
    retry_after: Duration,
) -> bool {
    let vms: Vec<(VmName, WorkloadId)> = m
        .names()
        .into_iter()
        .filter_map(|n| WorkloadId::of_vm(n.as_str()).map(|id| (n, id)))
        .collect();
    if vms.is_empty() {
        return true;
    }
    let gap = (period / vms.len() as u32).max(Duration::from_secs(1) / MAX_RATE);
    for (name, id) in vms {
        let Some(asked) = incarnation(m, &name) else {
            continue;
        };
        let reached = match p.workload_status(&id).await {
            Ok(s) if s.gone() => {
                let why = if s.exists {
                    format!("its workload is {}", s.state)
                } else {
                    "its workload does not exist".to_owned()
                };
                reap(m, locks, &name, asked, &why).await;
                Ok(())
            }
            Err(e @ ProvisionError::Unreachable(_)) => Err(e),
            status => {
                if let Err(e) = status {
                    tracing::warn!(vm = %name, error = %e, "provisiond cannot say whether the VM's workload exists; left running");
                }
                tell(m, locks, p, &name, &id, asked, retry_after).await
            }
        };
        if let Err(e) = reached {
            tracing::warn!(error = %e, "cannot reach provisiond; trying again later");
            return false;
        }
        tokio::time::sleep(gap).await;
    }
    true
}

/// The VM's key, if the VM is still the one provisiond was asked about: a
/// Delete and Run of the same name meanwhile win.
async fn same_vm(
    m: &Manager,
    locks: &Arc<KeyedLocks>,
    name: &VmName,
    asked: Incarnation,
) -> Option<KeyGuard> {
    let key = locks.lock(name.as_str().to_owned()).await;
    (incarnation(m, name) == Some(asked)).then_some(key)
}

/// provisiond's answer: `Ok(None)` when it refused (said, and tried again
/// next pass), `Err` only when it could not be reached.
fn answered<T>(
    r: Result<T, ProvisionError>,
    name: &VmName,
    what: &str,
) -> Result<Option<T>, ProvisionError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e @ ProvisionError::Unreachable(_)) => Err(e),
        Err(e) => {
            tracing::warn!(vm = %name, error = %e, "provisiond refused {what}; trying again next pass");
            Ok(None)
        }
    }
}

/// Tells provisiond what is due of one VM (see [`report`]); `Err` only when
/// it could not be reached (the pass stops there).
async fn tell(
    m: &Arc<Manager>,
    locks: &Arc<KeyedLocks>,
    p: &Provision,
    name: &VmName,
    id: &WorkloadId,
    asked: Incarnation,
    retry_after: Duration,
) -> Result<(), ProvisionError> {
    let reported = m.run_dir(name).reported();
    match report::due(m, name, retry_after) {
        Due::Nothing => {}
        Due::Failure { failure, state } => {
            let sent = report::report(p, id, failure, &state).await;
            let Some(record) = answered(sent, name, "the report of the VM's failure")? else {
                return Ok(());
            };
            tracing::warn!(vm = %name, how = ?record.how, message = %record.message,
                           "told provisiond that the VM failed");
            m.telemetry().work.workload(WorkloadAction::ReportedFailed);
            if let Some(_key) = same_vm(m, locks, name, asked).await {
                if let Err(e) = vmd_runtime::files::write_json(&reported, &record, 0o600) {
                    tracing::error!(vm = %name, error = %e, "cannot record the report; it will be sent again");
                }
            }
        }
        Due::Retry => {
            if let Some(_key) = same_vm(m, locks, name, asked).await {
                let shim = vmd_runtime::control::ShimClient::new(&m.run_dir(name));
                match shim.retry(Duration::from_secs(5)).await {
                    Ok(()) => {
                        tracing::warn!(vm = %name, "starting the failed VM again after its cooldown");
                        m.telemetry().work.workload(WorkloadAction::Retried);
                    }
                    Err(e) => {
                        tracing::warn!(vm = %name, error = %e, "cannot start the failed VM again; trying next pass")
                    }
                }
            }
        }
        Due::Recovered => {
            if answered(p.set_ok(id).await, name, "SetWorkloadOk")?.is_none() {
                return Ok(());
            }
            tracing::info!(vm = %name, "told provisiond that the VM runs again");
            m.telemetry().work.workload(WorkloadAction::ReportedOk);
            if let Some(_key) = same_vm(m, locks, name, asked).await {
                if let Err(e) = vmd_runtime::files::remove_state(&reported) {
                    tracing::error!(vm = %name, error = %e, "cannot remove the report record");
                }
            }
        }
    }
    Ok(())
}

async fn reap(
    m: &Arc<Manager>,
    locks: &Arc<KeyedLocks>,
    name: &VmName,
    asked: Incarnation,
    why: &str,
) {
    let Some(_key) = same_vm(m, locks, name, asked).await else {
        tracing::info!(vm = %name, "changed while provisiond was asked; left alone");
        return;
    };
    tracing::warn!(vm = %name, reason = %why, "deleting the VM of a gone workload");
    match m.delete(name.as_str()).await {
        Ok(()) => m.telemetry().work.workload(WorkloadAction::Reaped),
        Err(e) => {
            tracing::error!(vm = %name, error = %e, "cannot delete the VM of a deleted workload; trying again next pass")
        }
    }
}
