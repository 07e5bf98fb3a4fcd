//! What the shim remembers across its own restarts and reports to vmd
//! (`state.json`).
//!
//! zinit respawns the shim forever, every 2 s; without a memory of earlier
//! exits a crash-looping VM would be restarted forever too. The exits of the
//! current window are kept here, so the restart policy (the shim's `policy`)
//! holds across shim crashes; vmd reads the phase for `Run` and `Inspect`.

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::events::EventLog;
use crate::vmm::VmState;

/// Why a saved state could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {0}: {1}")]
    Read(String, #[source] io::Error),
    #[error("{0} is corrupt: {1}")]
    Corrupt(String, String),
    #[error("{0} has version {1}; this build reads version {2}")]
    Version(String, u32, u32),
}

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// VMM being started.
    Starting,
    /// VMM process running.
    Running,
    /// VMM exited; waiting before the next start.
    BackingOff,
    /// Too many exits: the shim no longer starts the VMM.
    Failed,
    /// The guest powered off and the VM is not kept alive.
    PoweredOff,
    /// A stop is in progress.
    Stopping,
    /// Stopped on request; the VMM is gone.
    Stopped,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::BackingOff => "backing-off",
            Phase::Failed => "failed",
            Phase::PoweredOff => "powered-off",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

/// One exit of the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// Unix seconds.
    pub at: u64,
    /// `exit 1`, `signal 9`, `exit 0 (vcpu error)`…
    pub status: String,
    /// A guest power-off (exit 0 after the VM reported its shutdown).
    pub clean: bool,
}

/// A process told apart from a later one that reuses its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
    pub start_ticks: u64,
}

impl ProcessIdentity {
    pub fn of(pid: i32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: skip past the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let start_ticks = rest.split(' ').nth(19)?.parse().ok()?;
        Some(ProcessIdentity { pid, start_ticks })
    }

    /// Whether this very process still exists (not a pid reused since).
    pub fn alive(&self) -> bool {
        ProcessIdentity::of(self.pid).is_some_and(|now| now == *self)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub version: u32,
    pub phase: Phase,
    /// Why the VM failed, or why the last VMM exited.
    #[serde(default)]
    pub reason: Option<String>,
    /// The end of the console log when the VM failed.
    #[serde(default)]
    pub last_console: Option<String>,
    /// VMM starts after the first one.
    pub restarts: u64,
    /// Exits inside the policy window, oldest first.
    #[serde(default)]
    pub exits: Vec<Exit>,
    #[serde(default)]
    pub vmm: Option<ProcessIdentity>,
    /// Unix seconds at which the current VMM started.
    #[serde(default)]
    pub vmm_started_at: Option<u64>,
    /// The state of the guest in the current VMM, from the VMM's events:
    /// `None` until it booted, `Running` or `Paused` after.
    #[serde(default)]
    pub vm: Option<VmState>,
    pub shim_pid: u32,
    /// Unix seconds of the last change.
    pub updated_at: u64,
    /// The web console, for a VM that has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_console: Option<WebConsoleState>,
    /// The VM's lifecycle events: how many, and the last few (what a
    /// watcher that comes back resumes from).
    #[serde(default)]
    pub events: EventLog,
}

/// Whether the web console listens, and why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebConsoleState {
    /// `10.20.2.1:20005`.
    pub url: String,
    pub listening: bool,
    #[serde(default)]
    pub error: Option<String>,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ShimState {
    /// A VMM of this shim runs a booted guest (running or paused).
    pub fn booted(&self) -> bool {
        self.phase == Phase::Running
            && self.vm.is_some_and(VmState::is_booted)
            && self.vmm.is_some_and(|v| v.alive())
    }

    pub fn new() -> Self {
        ShimState {
            version: STATE_VERSION,
            phase: Phase::Starting,
            reason: None,
            last_console: None,
            restarts: 0,
            exits: Vec::new(),
            vmm: None,
            vmm_started_at: None,
            vm: None,
            shim_pid: std::process::id(),
            updated_at: now_secs(),
            web_console: None,
            events: EventLog::default(),
        }
    }

    /// The saved state; `None` when there is none yet (a VM that never
    /// started). A state that exists but cannot be read is an error: it may
    /// hold a failed VM or a crash count, which must not silently turn into
    /// a fresh start.
    pub fn load(path: &Path) -> Result<Option<Self>, StateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Read(path.display().to_string(), e)),
        };
        let st: ShimState = serde_json::from_slice(&bytes)
            .map_err(|e| StateError::Corrupt(path.display().to_string(), e.to_string()))?;
        if st.version != STATE_VERSION {
            return Err(StateError::Version(
                path.display().to_string(),
                st.version,
                STATE_VERSION,
            ));
        }
        Ok(Some(st))
    }

    /// Written whole and durably: readers never see half a state.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        self.updated_at = now_secs();
        self.shim_pid = std::process::id();
        crate::files::write_json(path, self, 0o600)
    }
}

impl Default for ShimState {
    fn default() -> Self {
        ShimState::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_state_is_none_and_a_corrupt_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        assert!(ShimState::load(&p).unwrap().is_none());
        let mut st = ShimState::new();
        st.phase = Phase::Failed;
        st.events
            .record(crate::events::EventKind::Failed, Some("crash loop".into()));
        st.save(&p).unwrap();
        let back = ShimState::load(&p).unwrap().unwrap();
        assert_eq!(back.phase, Phase::Failed);
        assert_eq!(back.events.seq, 1);
        std::fs::write(&p, b"{\"version\":1,\"phase\":\"fail").unwrap();
        let e = ShimState::load(&p).unwrap_err();
        assert!(matches!(e, StateError::Corrupt(..)), "{e}");
        std::fs::write(
            &p,
            serde_json::to_vec(&serde_json::json!({
                "version": 99, "phase": "running", "restarts": 0, "shim_pid": 1, "updated_at": 0
            }))
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(
            ShimState::load(&p).unwrap_err(),
            StateError::Version(..)
        ));
    }

    #[test]
    fn identity_tells_reused_pids_apart() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let other = ProcessIdentity {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!other.alive());
    }
}
