//! Keeping a locked VM locked. vmd records the lock as a mark in the run
//! directory ([`vmd_runtime::RunDir::locked_mark`]) and asks the shim to
//! apply it; the shim applies it again to every VMM it (re)starts, once the
//! guest has booted, so neither a VMM crash nor a shim restart unlocks a VM.
//! Applications run one at a time, each reading the mark afresh: a lock and
//! an unlock racing with a boot end in the state of the last mark.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use vmd_runtime::control::LockReply;
use vmd_runtime::process::say;
use vmd_runtime::vmm::{VmState, VmmApi};
use vmd_runtime::RunDir;

use crate::shared::Shared;

const CALL: Duration = Duration::from_secs(5);
/// How long a boot is waited for before the lock is left to the next VMM.
const BOOT_WATCH: Duration = Duration::from_secs(600);

pub struct Locker {
    run: RunDir,
    api: VmmApi,
    /// Where the guest's state is recorded (vmd reads it for Inspect).
    shared: Shared,
    one_at_a_time: Mutex<()>,
}

impl Locker {
    /// `api`: where the VMM's REST API listens.
    pub fn new(shared: Shared, api: std::path::PathBuf) -> Self {
        Locker {
            api: VmmApi::new(api),
            run: shared.run.clone(),
            shared,
            one_at_a_time: Mutex::new(()),
        }
    }

    /// Makes the VMM match the mark: paused when locked, running when not.
    pub async fn apply(&self) -> LockReply {
        let _one = self.one_at_a_time.lock().await;
        let state = match self.api.info(CALL).await {
            Ok(info) if info.state.is_booted() => info.state,
            Ok(info) => return LockReply::NotRunning(format!("the VM is {:?}", info.state)),
            Err(e) => return LockReply::NotRunning(e.to_string()),
        };
        let (want, action) = if self.run.is_locked() {
            (VmState::Paused, "vm.pause")
        } else {
            (VmState::Running, "vm.resume")
        };
        if state == want {
            return LockReply::Applied(want);
        }
        match self.api.put(action, CALL).await {
            Ok(()) => {
                // Recorded before the reply (the VMM's event may come a
                // moment later): an Inspect right after Lock sees it.
                self.shared.set_vm(want);
                LockReply::Applied(want)
            }
            Err(e) => LockReply::Failed(e.to_string()),
        }
    }

    /// Once a new VMM has booted the guest (its `booted` event, recorded by
    /// the event pump), applies the mark (a VMM starts its guest running).
    pub async fn keep_locked(self: Arc<Self>) {
        let mut changes = self.shared.subscribe();
        let boot = async {
            while !self.shared.snapshot().vm.is_some_and(VmState::is_booted) {
                if changes.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        if !matches!(tokio::time::timeout(BOOT_WATCH, boot).await, Ok(true)) {
            return;
        }
        if !self.run.is_locked() {
            say("the guest booted (the VM is not locked)");
            return;
        }
        match self.apply().await {
            LockReply::Applied(_) => say("the guest booted; the VM is locked: paused it"),
            LockReply::NotRunning(e) | LockReply::Failed(e) => say(format!(
                "the guest booted; the VM is locked but could not be paused: {e}"
            )),
        }
    }
}
