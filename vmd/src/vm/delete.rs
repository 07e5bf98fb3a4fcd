//! `Delete`, and the removal every rollback and reconciliation shares.

use std::time::{Duration, Instant};

use vmd_runtime::control::ShimClient;
use vmd_runtime::{console, files, VmName};

use super::error::{IoContext, VmError};
use super::manager::{service_of, Manager};

impl Manager {
    pub async fn delete(&self, name: &str) -> Result<(), VmError> {
        let n = VmName::new(name).map_err(VmError::InvalidName)?;
        let t0 = Instant::now();
        self.remove(&n, true).await?;
        tracing::info!(vm = %n, took = ?t0.elapsed(), "vm deleted");
        Ok(())
    }

    /// Removes every trace of `name`: graceful stop through the shim (when
    /// `graceful`), the zinit service, the files, the log. Safe to repeat at
    /// any point.
    pub async fn remove(&self, name: &VmName, graceful: bool) -> Result<(), VmError> {
        let paths = self.paths();
        // First: from now on the VM does not exist for callers, nor for the
        // Go VM module after a roll-back.
        self.unlink(&paths.present_mark(name))?;
        if let Some(d) = &self.host().go_config_dir {
            self.unlink(&d.join(name.as_str()))?;
        }
        self.remove_streams_of(name).await?;
        let run = self.run_dir(name);
        let service = service_of(name);
        if !run.exists() && !self.services().exists(&service) {
            // Nothing of it on disk, so nothing vmd ever started: no need to
            // ask zinit (which may be down).
            return files::remove_state(&paths.seed(name))
                .what(|| format!("cannot remove the cloud-init image of vm {name}"));
        }
        // Read before its files go: a VM taken over from the Go module has
        // a VMM that is not its shim's child, and the Go module's seed.
        let spec: Option<vmd_runtime::spec::VmSpec> = files::read_json(&run.spec());
        if run.exists() {
            // From here on a shim respawned by zinit starts nothing.
            self.mark(&run.deleted_mark())?;
        }
        let shim = ShimClient::new(&run);
        if graceful && shim.exists() {
            let wait = Duration::from_secs(self.settings().grace_secs + 15);
            if let Err(e) = shim.stop(wait).await {
                tracing::warn!(vm = %name, error = %e, "graceful stop through the shim failed; zinit will stop it");
            }
        }
        match self.zinit().remove(&service, Duration::from_secs(10)).await {
            Ok(()) => {}
            // Rolling back a Run that zinit could not take: there is no
            // service to stop (zinit never had it or is gone), and leaving
            // the files would leak them. Reconciliation removes a service
            // zinit still had once it is back.
            Err(e @ zinit::ZinitError::Connect { .. }) if !graceful => {
                tracing::warn!(vm = %name, error = %e, "zinit unreachable; removing the files of the failed Run anyway");
            }
            Err(source) => {
                return Err(VmError::ServiceRemove {
                    service: service.to_string(),
                    source,
                })
            }
        }
        self.services()
            .remove(&service)
            .what(|| format!("cannot remove the service file of {service}"))?;
        if let Some(spec) = &spec {
            self.remove_adopted(name, spec)?;
        }
        if run.exists() {
            self.keep_log_of_decommissioned(name);
        }
        console::remove(&paths.log(name))
            .what(|| format!("cannot remove the console log of vm {name}"))?;
        files::remove_state(&paths.seed(name))
            .what(|| format!("cannot remove the cloud-init image of vm {name}"))?;
        // The VMM's API socket (and the lock file v53 leaves beside it).
        let api = self.host().api_socket_dir.join(name.as_str());
        let lock = self.host().api_socket_dir.join(format!("{name}.lock"));
        for p in [api, lock] {
            files::remove_file(&p).what(|| format!("cannot remove {}", p.display()))?;
        }
        // Before the run directory goes: the shim's record in it is what is
        // published of its last moments.
        let why = (!graceful).then(|| "the VM was rolled back or cleaned up".to_owned());
        self.events().deleted(name, why).await;
        files::remove_dir_all(run.path())
            .what(|| format!("cannot remove the run directory of vm {name}"))
    }
}

impl Manager {
    /// What a VM taken over from the Go module leaves that vmd's own do
    /// not: its first VMM, if it still runs (its shim stopped it, unless the
    /// shim was gone: no death signal ties that VMM to it), and the Go
    /// module's cloud-init image, `cloud-init/<name>`.
    fn remove_adopted(
        &self,
        name: &VmName,
        spec: &vmd_runtime::spec::VmSpec,
    ) -> Result<(), VmError> {
        let Some(vmm) = spec.adopted else {
            return Ok(());
        };
        if vmm.alive() {
            tracing::warn!(vm = %name, pid = vmm.pid, "the VMM taken over from the Go module outlived its shim: killing it");
            // SAFETY: kill has no memory effects; the pid is identity-checked.
            unsafe {
                libc::kill(vmm.pid, libc::SIGKILL);
            }
        }
        let seed = self.paths().seeds_dir().join(name.as_str());
        // `cloud-init/x.img` is also vmd's own seed of a VM `x`: never that.
        let others = name
            .as_str()
            .strip_suffix(".img")
            .and_then(|stem| VmName::new(stem).ok())
            .is_some_and(|stem| self.run_dir(&stem).exists());
        if !others && spec.disks.iter().any(|d| d.path == seed) {
            files::remove_state(&seed)
                .what(|| format!("cannot remove the Go module's cloud-init image of vm {name}"))?;
        }
        Ok(())
    }
}

/// Console logs kept of decommissioned VMs, at most: the oldest go first.
const FAILED_LOGS_KEPT: usize = 64;

impl Manager {
    /// A VM that vmd reported as failed with `DecommissionCached` is deleted
    /// by provisiond soon after: its console log, which says why it failed,
    /// is kept for operators (`<root>/failed/<name>/console.log`, with the
    /// reason provisiond was given), where the Go module deletes it.
    fn keep_log_of_decommissioned(&self, name: &VmName) {
        use super::workloads::report::{Record, Reported};
        let Some(record) = files::read_json::<Record>(&self.run_dir(name).reported()) else {
            return;
        };
        if record.how != Reported::Decommissioned {
            return;
        }
        let dir = self.paths().root().join("failed");
        let kept = dir.join(name.as_str());
        let keep = || -> std::io::Result<()> {
            files::create_dir(&kept, 0o750)?;
            files::replace(&kept.join("reason"), record.message.as_bytes(), 0o640)?;
            std::fs::rename(self.paths().log(name), kept.join("console.log"))
        };
        match keep() {
            Ok(()) => {
                tracing::info!(vm = %name, kept = %kept.display(), "kept the console log of the decommissioned VM")
            }
            Err(e) => {
                tracing::warn!(vm = %name, error = %e, "cannot keep the console log of the decommissioned VM")
            }
        }
        // Bounded: the oldest kept logs go.
        let mut all: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if all.len() > FAILED_LOGS_KEPT {
            all.sort();
            for (_, old) in &all[..all.len() - FAILED_LOGS_KEPT] {
                let _ = std::fs::remove_dir_all(old);
            }
        }
    }
}
