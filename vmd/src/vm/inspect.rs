//! The reads: `Inspect`, `Exists`, `List`, `Logs`, `LogsFull`. They read
//! files every change replaces atomically — the VM's state too: the shim
//! records what its VMM reports — so they never wait for a change nor for a
//! process.

use vmd_runtime::state::{now_secs, Phase, ShimState};
use vmd_runtime::vmm::VmState;
use vmd_runtime::{console, VmName};

use super::error::VmError;
use super::manager::Manager;
use crate::api::VmInfo;

/// Zero-OS's `Logs`: the last 2 KiB.
const LOGS_TAIL: u64 = 2048;
/// What `LogsFull` returns at most (the log is rotated at 8 MiB anyway).
const LOGS_FULL_MAX: u64 = 16 << 20;
/// Zero-OS's answer for a VM without a console log.
const NO_LOGS: &str = "no logs available";

/// The state of a VM as `Inspect` reports it.
pub struct Live {
    pub state: String,
    pub reason: Option<String>,
    pub restarts: u64,
    pub pid: Option<i64>,
    pub uptime: Option<u64>,
    /// The web console's address while it listens…
    pub console_url: Option<String>,
    /// …or why it does not.
    pub console_error: Option<String>,
}

impl Manager {
    pub async fn inspect(&self, name: &str) -> Result<VmInfo, VmError> {
        let n = self.existing(name)?;
        let vm = self
            .request(&n)
            .ok_or_else(|| VmError::NotFound(name.to_owned()))?;
        let live = self.live(&n);
        Ok(VmInfo {
            ht_enabled: false,
            memory: (vm.memory >> 20) as i64,
            cpu: i64::from(vm.cpu),
            state: Some(live.state),
            reason: live.reason,
            restarts: Some(live.restarts),
            pid: live.pid,
            uptime_secs: live.uptime,
            streams: Some(self.stream_statuses(&n)).filter(|s| !s.is_empty()),
            console_url: live.console_url,
            console_error: live.console_error,
        })
    }

    pub fn exists(&self, name: &str) -> bool {
        self.existing(name).is_ok()
    }

    pub fn list(&self) -> Vec<String> {
        self.names().into_iter().map(|n| n.to_string()).collect()
    }

    /// The last 2 KiB of the console (`full`: up to 16 MiB).
    pub fn logs(&self, name: &str, full: bool) -> String {
        let Ok(n) = VmName::new(name) else {
            return NO_LOGS.into();
        };
        let log = self.paths().log(&n);
        if !log.exists() {
            return NO_LOGS.into();
        }
        console::tail_of(&log, if full { LOGS_FULL_MAX } else { LOGS_TAIL })
    }

    /// What `Inspect` adds to Zero-OS's fields.
    pub fn live(&self, name: &VmName) -> Live {
        let st = match ShimState::load(&self.run_dir(name).state()) {
            Ok(Some(st)) => st,
            // Its shim has not written anything yet.
            Ok(None) => ShimState::new(),
            Err(e) => {
                return Live {
                    state: "unknown".into(),
                    reason: Some(e.to_string()),
                    restarts: 0,
                    pid: None,
                    uptime: None,
                    console_url: None,
                    console_error: None,
                }
            }
        };
        let vmm_alive = st.vmm.is_some_and(|v| v.alive());
        let mut state = st.phase.as_str().to_owned();
        if st.phase == Phase::Running {
            if !vmm_alive {
                state = "restarting".into();
            } else if st.vm == Some(VmState::Paused) {
                state = "paused".into();
            }
        }
        let reason = match st.phase {
            Phase::Failed | Phase::PoweredOff | Phase::BackingOff | Phase::Stopped => {
                st.reason.clone()
            }
            _ => None,
        };
        let (console_url, console_error) = match st.web_console {
            Some(w) if w.listening => (Some(w.url), None),
            Some(w) => (None, w.error.or(Some("not listening".into()))),
            None => (None, None),
        };
        Live {
            state,
            reason,
            restarts: st.restarts,
            pid: st.vmm.filter(|_| vmm_alive).map(|v| i64::from(v.pid)),
            uptime: st
                .vmm_started_at
                .filter(|_| vmm_alive)
                .map(|t| now_secs().saturating_sub(t)),
            console_url,
            console_error,
        }
    }
}
