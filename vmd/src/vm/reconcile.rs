//! Start-up reconciliation: make what is on disk, what zinit runs and what
//! vmd wants agree again after a crash of anything.

use std::time::Duration;

use super::layout::CREATING_MARK;
use super::manager::Manager;
use super::name::VmName;

#[derive(Debug, Default)]
pub struct Report {
    pub adopted: Vec<String>,
    pub completed_deletes: Vec<String>,
    pub rolled_back: Vec<String>,
    pub orphans_removed: Vec<String>,
    pub remonitored: Vec<String>,
}

pub async fn reconcile(m: &Manager) -> Report {
    let mut r = Report::default();
    let layout = m.layout();
    if let Err(e) = m.services().sweep_temp_files() {
        tracing::warn!(error = %e, "cannot sweep temp files of the zinit config dir");
    }
    let entries: Vec<_> = std::fs::read_dir(layout.vms())
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    for e in entries {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Ok(name) = VmName::new(&file_name) else {
            tracing::warn!(entry = %file_name, "not a VM directory; removing it");
            let _ = std::fs::remove_dir_all(e.path());
            continue;
        };
        let run = layout.run_dir(&name);
        let service = name.service();
        let outcome = if run.deleted_mark().exists() {
            r.completed_deletes.push(file_name.clone());
            m.remove(&name, true).await
        } else if run.0.join(CREATING_MARK).exists() || !run.spec().exists() {
            r.rolled_back.push(file_name.clone());
            m.remove(&name, false).await
        } else if !m.present(&name) {
            // Delete had begun (the index entry goes first) but not marked yet.
            r.completed_deletes.push(file_name.clone());
            m.remove(&name, true).await
        } else if !m.services().exists(&service) {
            r.orphans_removed.push(file_name.clone());
            m.remove(&name, false).await
        } else {
            match m.zinit().status(&service).await {
                Ok(_) => r.adopted.push(file_name.clone()),
                Err(zinit::ZinitError::UnknownService(_)) => {
                    r.remonitored.push(file_name.clone());
                    if let Err(e) = m.zinit().monitor(&service).await {
                        tracing::error!(vm = %name, error = %e, "cannot monitor the VM's service again");
                    }
                }
                Err(e) => tracing::error!(vm = %name, error = %e, "cannot ask zinit about the VM"),
            }
            Ok(())
        };
        if let Err(e) = outcome {
            tracing::error!(vm = %name, error = %e, "reconciliation failed for this VM");
        }
    }
    r.orphans_removed.extend(m.reconcile_streams().await);
    // Index entries of VMs whose directory is gone.
    for e in std::fs::read_dir(layout.present_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if VmName::new(&n).map_or(true, |n| !layout.run_dir(&n).0.exists()) {
            r.orphans_removed.push(format!("present/{n}"));
            let _ = std::fs::remove_file(e.path());
        }
    }
    // Services of VMs that are not (or no longer) there.
    let services = m.known_services().await;
    for s in services {
        let Some(vm) = s.strip_prefix("vm:") else {
            continue;
        };
        let present = VmName::new(vm).is_ok_and(|n| layout.run_dir(&n).0.exists());
        if present {
            continue;
        }
        let Ok(service) = zinit::ServiceName::new(s.clone()) else {
            continue;
        };
        r.orphans_removed.push(s.clone());
        if let Err(e) = m.zinit().remove(&service, Duration::from_secs(10)).await {
            tracing::error!(service = %s, error = %e, "cannot remove an orphan service");
        }
        let _ = m.services().remove(&service);
    }
    r
}
