//! Reporting: a VM vmd gave up on is told to provisiond, once per failure,
//! so that its user sees why and is not billed for a dead VM.
//!
//! Where provisiond has `SetWorkloadError` (PR #96), the workload is marked
//! `error` with the shim's reason and the console's last lines, and the VM
//! and its log are kept; once the VM runs again, `SetWorkloadOk`. Where it
//! does not (zosbase `main`), `DecommissionCached` with the Go module's own
//! reason texts: provisiond then uninstalls the workload (and deletes the
//! VM through `Delete`).
//!
//! The failure is the shim's durable record (`state.json`: phase `failed`,
//! its event number); what was reported is vmd's (`reported.json` in the
//! run directory). A report is due while the two disagree, so one that
//! could not be delivered (provisiond dead, vmd killed before writing its
//! record) is delivered by a later pass, also after a restart of vmd.
//! provisiond's methods are idempotent (a second `SetWorkloadError` or a
//! decommission of a deleted workload changes nothing).

use serde::{Deserialize, Serialize};
use vmd_runtime::state::{now_secs, Phase, ShimState};
use vmd_runtime::{files, VmName};

use super::super::manager::Manager;
use crate::provision::{Provision, ProvisionError, WorkloadId};

/// How a failure was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reported {
    /// `SetWorkloadError`: the workload shows `error` and is kept.
    Error,
    /// `DecommissionCached`: provisiond uninstalls the workload.
    Decommissioned,
}

/// `reported.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The shim's event number when it failed: which failure.
    pub failure: u64,
    pub how: Reported,
    /// Unix seconds of the report.
    pub at: u64,
    /// What provisiond was told.
    pub message: String,
}

/// What a report tells provisiond at most: its user reads it.
const MESSAGE_MAX: usize = 1024;
/// Of which the console's last lines, at most.
const CONSOLE_MAX: usize = 512;

/// The Go module's reason after its 4th crash in a row (`monitor.go`).
pub const GO_CRASH_LOOP: &str = "deleting vm due to so many crashes";

/// What is due for one VM, from its shim's record and vmd's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    Nothing,
    /// It failed and this failure was not reported.
    Failure {
        failure: u64,
        state: Box<ShimState>,
    },
    /// It was reported `error` and runs again.
    Recovered,
    /// It was reported `error` at least `retry_after` ago: start it again
    /// (PR #96 tries a failed VM again after 6 h).
    Retry,
}

pub fn due(m: &Manager, name: &VmName, retry_after: std::time::Duration) -> Due {
    let run = m.run_dir(name);
    let Ok(Some(state)) = ShimState::load(&run.state()) else {
        return Due::Nothing;
    };
    let record: Option<Record> = files::read_json(&run.reported());
    match state.phase {
        Phase::Failed => {
            let failure = state.events.seq;
            if let Some(r) = record.filter(|r| r.failure == failure) {
                let waited = now_secs().saturating_sub(r.at);
                if r.how == Reported::Error && waited >= retry_after.as_secs() {
                    Due::Retry
                } else {
                    Due::Nothing
                }
            } else {
                Due::Failure {
                    failure,
                    state: Box::new(state),
                }
            }
        }
        Phase::Running if state.vm.is_some() => match record {
            Some(r) if r.how == Reported::Error => Due::Recovered,
            _ => Due::Nothing,
        },
        _ => Due::Nothing,
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut from = text.len().saturating_sub(max);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    &text[from..]
}

/// What `SetWorkloadError` says: the shim's reason, then the console's end.
pub fn error_message(state: &ShimState) -> String {
    let reason = state.reason.as_deref().unwrap_or("the VM failed");
    let mut msg = reason.to_owned();
    if let Some(console) = state.last_console.as_deref().map(str::trim_end) {
        if !console.is_empty() {
            msg.push_str("; console: ");
            msg.push_str(tail(console, CONSOLE_MAX));
        }
    }
    tail(&msg, MESSAGE_MAX).to_owned()
}

/// What `DecommissionCached` says, as the Go module words it: its crash-loop
/// text, or `"<log tail>: <error>"` for a VM that cannot start.
pub fn decommission_reason(state: &ShimState) -> String {
    let reason = state.reason.as_deref().unwrap_or_default();
    match reason.strip_prefix("the VM cannot start: ") {
        Some(err) => {
            let console = state.last_console.as_deref().unwrap_or_default();
            let console = tail(console.trim_end(), CONSOLE_MAX);
            if console.is_empty() {
                format!("no logs available: {err}")
            } else {
                format!("{console}: {err}")
            }
        }
        None => GO_CRASH_LOOP.to_owned(),
    }
}

/// Reports a failure; the record is written by the caller, under the VM's
/// key. `Err` is for a later pass.
pub async fn report(
    p: &Provision,
    id: &WorkloadId,
    failure: u64,
    state: &ShimState,
) -> Result<Record, ProvisionError> {
    let message = error_message(state);
    let (how, message) = match p.set_error(id, &message).await {
        Ok(()) => (Reported::Error, message),
        // Already gone: nothing left to tell.
        Err(e) if e.deployment_gone() => (Reported::Error, message),
        Err(ProvisionError::Lacks(_)) => {
            let reason = decommission_reason(state);
            match p.decommission(id, &reason).await {
                Ok(()) => {}
                Err(e) if e.deployment_gone() => {}
                Err(e) => return Err(e),
            }
            (Reported::Decommissioned, reason)
        }
        Err(e) => return Err(e),
    };
    Ok(Record {
        failure,
        how,
        at: now_secs(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(reason: &str, console: &str) -> ShimState {
        let mut s = ShimState::new();
        s.phase = Phase::Failed;
        s.reason = Some(reason.into());
        s.last_console = Some(console.into());
        s
    }

    #[test]
    fn messages_say_why_and_show_the_console_bounded() {
        let s = failed(
            "the VM stopped 5 times within 300 s (last: killed)",
            "boot\npanic: oops\n",
        );
        assert_eq!(
            error_message(&s),
            "the VM stopped 5 times within 300 s (last: killed); console: boot\npanic: oops"
        );
        assert_eq!(decommission_reason(&s), GO_CRASH_LOOP);
        let s = failed("the VM cannot start: kernel /k: no such file", "");
        assert_eq!(
            decommission_reason(&s),
            "no logs available: kernel /k: no such file"
        );
        let long = "é".repeat(5000);
        let s = failed("the VM cannot start: x", &long);
        assert!(decommission_reason(&s).len() <= CONSOLE_MAX + 3);
        assert!(error_message(&s).len() <= MESSAGE_MAX);
    }
}
