//! `Lock`: pause or resume a VM, durably. The lock is a mark in the run
//! directory, written here before the shim is asked to apply it, so it holds
//! across VMM crashes and shim restarts (the shim applies the mark to every
//! VMM it starts; see the shim's `lock`).

use std::time::Duration;

use vmd_runtime::control::{LockReply, ShimClient};
use vmd_runtime::files;

use super::error::VmError;
use super::manager::Manager;

impl Manager {
    pub async fn lock(&self, name: &str, lock: bool) -> Result<(), VmError> {
        let n = self.existing(name)?;
        let run = self.run_dir(&n);
        let mark = run.locked_mark();
        let recorded = if lock {
            files::write_mark(&mark)
        } else {
            files::remove_file(&mark)
        };
        recorded.map_err(|source| VmError::LockRecord {
            name: name.to_owned(),
            source,
        })?;
        let deferred = |why: String| VmError::LockDeferred {
            name: name.to_owned(),
            lock,
            why,
        };
        match ShimClient::new(&run).lock(Duration::from_secs(10)).await {
            Ok(LockReply::Applied(_)) => Ok(()),
            Ok(LockReply::NotRunning(why)) => Err(deferred(why)),
            Ok(LockReply::Failed(why)) => Err(VmError::LockFailed {
                name: name.to_owned(),
                lock,
                why,
            }),
            // No shim to ask (restarting): the mark applies when it is back.
            Err(e) => Err(deferred(e.to_string())),
        }
    }
}
