//! What the shim remembers across its own restarts (`state.json`), and the
//! restart policy that decides what happens after the VMM exits.
//!
//! zinit respawns the shim forever, every 2 s; without a memory of earlier
//! exits a crash-looping VM would be restarted forever too. The exits of the
//! current window are kept on disk, so the policy holds across shim crashes.

use std::fs;
use std::io;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::RestartPolicy;

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
    pub shim_pid: u32,
    /// Unix seconds of the last change.
    pub updated_at: u64,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ShimState {
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
            shim_pid: std::process::id(),
            updated_at: now_secs(),
        }
    }

    /// The saved state, or a fresh one when there is none or it is unreadable.
    pub fn load(path: &Path) -> Self {
        fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<ShimState>(&t).ok())
            .filter(|s| s.version == STATE_VERSION)
            .unwrap_or_default()
    }

    /// Written whole (temp + rename): readers never see half a state.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        self.updated_at = now_secs();
        self.shim_pid = std::process::id();
        let tmp = path.with_extension("json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(io::Error::other)?,
        )?;
        fs::rename(&tmp, path)
    }
}

impl Default for ShimState {
    fn default() -> Self {
        ShimState::new()
    }
}

/// What to do after the VMM exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Restart {
        after: Duration,
    },
    /// The guest powered off and the VM is not kept alive.
    StayOff,
    GiveUp {
        reason: String,
    },
}

/// Records `exit` in `exits` (dropping those outside the window) and decides.
pub fn decide(
    policy: &RestartPolicy,
    keep_alive: bool,
    exits: &mut Vec<Exit>,
    exit: Exit,
) -> Decision {
    let horizon = exit.at.saturating_sub(policy.window_secs);
    exits.retain(|e| e.at > horizon);
    exits.push(exit.clone());
    if exit.clean && !keep_alive {
        return Decision::StayOff;
    }
    let n = exits.len() as u32;
    if n >= policy.max_exits {
        return Decision::GiveUp {
            reason: format!(
                "the VM stopped {n} times within {} s (last: {}); not restarting it",
                policy.window_secs, exit.status
            ),
        };
    }
    // A lone clean power-off restarts at once; repeated exits back off
    // 1 s, 2 s, 4 s … up to the cap.
    if exit.clean && n == 1 {
        return Decision::Restart {
            after: Duration::ZERO,
        };
    }
    let secs = 1u64
        .checked_shl(n.saturating_sub(1))
        .unwrap_or(u64::MAX)
        .min(policy.max_backoff_secs);
    Decision::Restart {
        after: Duration::from_secs(secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(at: u64, clean: bool) -> Exit {
        Exit {
            at,
            status: if clean {
                "exit 0".into()
            } else {
                "exit 1".into()
            },
            clean,
        }
    }

    #[test]
    fn crashes_back_off_then_give_up() {
        let p = RestartPolicy::default();
        let mut exits = Vec::new();
        let mut delays = Vec::new();
        for i in 0..4 {
            match decide(&p, true, &mut exits, exit(1000 + i, false)) {
                Decision::Restart { after } => delays.push(after.as_secs()),
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(delays, [1, 2, 4, 8]);
        let d = decide(&p, true, &mut exits, exit(1010, false));
        assert!(
            matches!(d, Decision::GiveUp { ref reason } if reason.contains("5 times")),
            "{d:?}"
        );
    }

    #[test]
    fn old_exits_leave_the_window() {
        let p = RestartPolicy::default();
        let mut exits = Vec::new();
        for i in 0..4 {
            decide(&p, true, &mut exits, exit(i * 10, false));
        }
        // Ten minutes later only this exit counts: a short back-off again.
        let d = decide(&p, true, &mut exits, exit(1000, false));
        assert_eq!(
            d,
            Decision::Restart {
                after: Duration::from_secs(1)
            }
        );
        assert_eq!(exits.len(), 1);
    }

    #[test]
    fn power_off_restarts_at_once_unless_not_kept_alive() {
        let p = RestartPolicy::default();
        let mut exits = Vec::new();
        assert_eq!(
            decide(&p, true, &mut exits, exit(5, true)),
            Decision::Restart {
                after: Duration::ZERO
            }
        );
        let mut exits = Vec::new();
        assert_eq!(
            decide(&p, false, &mut exits, exit(5, true)),
            Decision::StayOff
        );
    }

    #[test]
    fn backoff_is_capped() {
        let p = RestartPolicy {
            max_exits: 100,
            window_secs: 10_000,
            max_backoff_secs: 30,
        };
        let mut exits = Vec::new();
        let mut last = Decision::StayOff;
        for i in 0..70 {
            last = decide(&p, true, &mut exits, exit(i, false));
        }
        assert_eq!(
            last,
            Decision::Restart {
                after: Duration::from_secs(30)
            }
        );
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
