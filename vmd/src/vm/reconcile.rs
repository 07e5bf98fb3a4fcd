//! Start-up reconciliation: make what is on disk, what zinit runs and what
//! vmd wants agree again after a crash of anything.
//!
//! vmd serves the bus at once, whatever there is to reconcile: [`start`]
//! only looks at the files (a few `stat`s per VM, so 1 000 VMs take
//! milliseconds), takes the key of every VM that needs finishing (an
//! interrupted Delete, a Run to roll back) and hands the work to background
//! tasks, one per VM. A change of such a VM waits for its key, i.e. for that
//! VM's reconciliation and no other; reads answer from disk meanwhile (a VM
//! whose Delete was interrupted is already gone for callers: Delete removes
//! its `present/` entry first). Whatever needs zinit (is every VM's service
//! still monitored, services nobody owns) runs in the background too, each
//! step under the key it touches.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use vmd_runtime::VmName;

use super::manager::{service_of, Manager};
use crate::telemetry::{Reconciled, Work};
use crate::zbus::keyed::{KeyGuard, KeyedLocks};

/// What reconciliation did, logged when it is over.
#[derive(Debug, Default)]
pub struct Report {
    pub adopted: Vec<String>,
    pub completed_deletes: Vec<String>,
    pub rolled_back: Vec<String>,
    pub orphans_removed: Vec<String>,
    pub remonitored: Vec<String>,
    /// Steps that failed; each was logged with its VM and cause.
    pub failed: Vec<String>,
}

impl Report {
    /// Adds what was done to the endpoint's counters.
    fn count(&self, work: &Work) {
        for (action, done) in [
            (Reconciled::Adopted, &self.adopted),
            (Reconciled::CompletedDelete, &self.completed_deletes),
            (Reconciled::RolledBack, &self.rolled_back),
            (Reconciled::OrphanRemoved, &self.orphans_removed),
            (Reconciled::Remonitored, &self.remonitored),
            (Reconciled::Failed, &self.failed),
        ] {
            work.reconciled(action, done.len());
        }
    }
}

/// What a VM directory found at start-up needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// Delete had begun: finish it, letting the guest power off.
    Delete,
    /// Run had not committed: its caller never got a success.
    RollBack,
    /// Present, but its service file is gone: nothing can run it.
    Orphan,
}

/// The VMs found at start-up, classified from disk alone.
pub struct Plan {
    /// VMs to finish, each with its key already held.
    finish: Vec<(VmName, Finish, KeyGuard)>,
    /// Present VMs whose service zinit should be running.
    adopt: Vec<VmName>,
    /// Names of removed directories that were not VMs.
    junk: Vec<String>,
}

impl Plan {
    /// How many VMs wait for their reconciliation.
    pub fn pending(&self) -> usize {
        self.finish.len()
    }
}

/// Looks at the disk and takes the keys of the VMs to finish. Call it before
/// the server pops its first request, so that no change of such a VM can
/// run before its reconciliation.
pub fn plan(m: &Manager, locks: &Arc<KeyedLocks>) -> Plan {
    let paths = m.paths();
    let mut plan = Plan {
        finish: Vec::new(),
        adopt: Vec::new(),
        junk: Vec::new(),
    };
    if let Err(e) = m.services().sweep_temp_files() {
        tracing::warn!(error = %e, "cannot sweep temp files of the zinit config dir");
    }
    let entries = match std::fs::read_dir(paths.vms_dir()) {
        Ok(d) => d.flatten().collect::<Vec<_>>(),
        Err(e) => {
            tracing::error!(dir = %paths.vms_dir().display(), error = %e, "cannot read the VM directory");
            Vec::new()
        }
    };
    for e in entries {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Ok(name) = VmName::new(&file_name) else {
            tracing::warn!(entry = %file_name, "not a VM directory; removing it");
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::error!(entry = %file_name, error = %err, "cannot remove it");
            }
            plan.junk.push(file_name);
            continue;
        };
        let run = paths.run_dir(&name);
        let finish = if run.deleted_mark().exists() {
            Some(Finish::Delete)
        } else if run.creating_mark().exists() || !run.spec().exists() {
            Some(Finish::RollBack)
        } else if !m.present(&name) {
            // Delete had begun (the index entry goes first) but not marked yet.
            Some(Finish::Delete)
        } else if !m.services().exists(&service_of(&name)) {
            Some(Finish::Orphan)
        } else {
            None
        };
        match finish {
            None => plan.adopt.push(name),
            Some(f) => match locks.try_lock(name.as_str().to_owned()) {
                Some(key) => plan.finish.push((name, f, key)),
                // Only before serving is every key free; a later caller of
                // `plan` leaves a VM in use alone (its call will finish it).
                None => tracing::warn!(vm = %name, "in use; not reconciled now"),
            },
        }
    }
    plan
}

/// Runs the plan in the background on `runtime`; the task's result is the
/// report.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    m: Arc<Manager>,
    locks: Arc<KeyedLocks>,
    plan: Plan,
) -> tokio::task::JoinHandle<Report> {
    runtime.spawn(async move {
        let t0 = std::time::Instant::now();
        m.telemetry().work.pending().set(plan.pending() as i64);
        let report = run(&m, &locks, plan).await;
        report.count(&m.telemetry().work);
        tracing::info!(
            took = ?t0.elapsed(),
            adopted = report.adopted.len(),
            completed_deletes = ?report.completed_deletes,
            rolled_back = ?report.rolled_back,
            orphans_removed = ?report.orphans_removed,
            remonitored = ?report.remonitored,
            failed = ?report.failed,
            "reconciled"
        );
        report
    })
}

async fn run(m: &Arc<Manager>, locks: &Arc<KeyedLocks>, plan: Plan) -> Report {
    let mut r = Report {
        orphans_removed: plan.junk,
        ..Report::default()
    };
    // Each VM on its own: a graceful Delete waits for its guest, and 300
    // interrupted Deletes must not wait for each other.
    let mut finishing = JoinSet::new();
    let being_finished: std::collections::HashSet<String> = plan
        .finish
        .iter()
        .map(|(n, _, _)| n.as_str().to_owned())
        .collect();
    for (name, finish, key) in plan.finish {
        let m = Arc::clone(m);
        finishing.spawn(async move {
            let outcome = match finish {
                Finish::Delete => m.remove(&name, true).await,
                Finish::RollBack | Finish::Orphan => m.remove(&name, false).await,
            };
            drop(key);
            if let Err(e) = &outcome {
                tracing::error!(vm = %name, error = %e, ?finish, "reconciliation failed for this VM");
            }
            (name, finish, outcome.is_ok())
        });
    }

    // What zinit monitors, asked once for every step below (not a status
    // call per VM). Steps act under keys and re-check, so a listing that
    // ages meanwhile only costs an idempotent remove.
    let monitored = m.zinit().list().await;
    // Present VMs: zinit must monitor their service (it forgets everything
    // when it restarts).
    match &monitored {
        Ok(monitored) => {
            for name in plan.adopt {
                let service = service_of(&name);
                if monitored.contains_key(service.as_str()) {
                    r.adopted.push(name.as_str().to_owned());
                    continue;
                }
                let _key = locks.lock(name.as_str().to_owned()).await;
                // A Delete may have run meanwhile.
                if !m.present(&name) || !m.services().exists(&service) {
                    continue;
                }
                match m.zinit().monitor(&service).await {
                    Ok(()) | Err(zinit::ZinitError::AlreadyMonitored(_)) => {
                        r.remonitored.push(name.as_str().to_owned())
                    }
                    Err(e) => {
                        tracing::error!(vm = %name, error = %e, "cannot monitor the VM's service again");
                        r.failed.push(name.as_str().to_owned());
                    }
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot list zinit's services; VMs are not re-monitored");
            r.failed.push("zinit list".to_owned());
        }
    }

    let monitored = monitored.ok();
    r.orphans_removed
        .extend(m.reconcile_streams(locks, monitored.as_ref()).await);

    // Index entries of VMs whose directory is gone.
    let paths = m.paths();
    for e in std::fs::read_dir(paths.present_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        let Ok(name) = VmName::new(&n) else {
            remove_index_entry(&e.path(), &n, &mut r);
            continue;
        };
        // Checked again under the key: a Run may be creating it.
        if being_finished.contains(&n) || paths.run_dir(&name).exists() {
            continue;
        }
        let _key = locks.lock(n.clone()).await;
        if !paths.run_dir(&name).exists() {
            remove_index_entry(&e.path(), &n, &mut r);
        }
    }

    // Services of VMs that are not (or no longer) there.
    for s in m.known_services(monitored.as_ref()) {
        let Some(vm) = s.strip_prefix("vm:") else {
            continue;
        };
        let Ok(service) = zinit::ServiceName::new(s.clone()) else {
            continue;
        };
        let _key = match VmName::new(vm) {
            Ok(n) if being_finished.contains(n.as_str()) || paths.run_dir(&n).exists() => continue,
            Ok(n) => {
                let key = locks.lock(n.as_str().to_owned()).await;
                // Checked under the key: a Run may have created it meanwhile.
                if paths.run_dir(&n).exists() {
                    continue;
                }
                Some(key)
            }
            Err(_) => None,
        };
        r.orphans_removed.push(s.clone());
        if let Err(e) = m.zinit().remove(&service, Duration::from_secs(10)).await {
            tracing::error!(service = %s, error = %e, "cannot remove an orphan service");
            r.failed.push(s.clone());
        }
        if let Err(e) = m.services().remove(&service) {
            tracing::error!(service = %s, error = %e, "cannot remove an orphan service file");
        }
    }

    while let Some(done) = finishing.join_next().await {
        let Ok((name, finish, ok)) = done else {
            tracing::error!("a reconciliation task panicked");
            continue;
        };
        m.telemetry().work.pending().dec();
        let n = name.as_str().to_owned();
        if !ok {
            r.failed.push(n.clone());
        }
        match finish {
            Finish::Delete => r.completed_deletes.push(n),
            Finish::RollBack => r.rolled_back.push(n),
            Finish::Orphan => r.orphans_removed.push(n),
        }
    }
    r
}

fn remove_index_entry(path: &std::path::Path, name: &str, r: &mut Report) {
    r.orphans_removed.push(format!("present/{name}"));
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::error!(entry = %name, error = %e, "cannot remove an index entry");
        }
    }
}
