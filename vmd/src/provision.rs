//! The Zero-OS provisioning engine (provisiond), as the VM module asks it
//! about its VMs' workloads: the Rust counterpart of the Go `ProvisionStub`
//! calls the VM monitor makes (`provision.provision@0.0.1`;
//! `shared/spec/zos-node.md` §B).
//!
//! A peer on the bus like the network module: every call has a deadline and
//! fails with a clear error, never hangs and never panics (the Go monitor
//! waits forever for a dead provisiond while holding the lock `Run` needs,
//! and a Go stub of PR #96 panics when provisiond lacks `SetWorkloadError`).
//! Which of the optional methods the running provisiond has is learnt from
//! its answer ("not a function") and remembered for a while: provisiond is
//! upgraded in place like any module.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::telemetry::PeerCalls;
use crate::zbus::broker::Broker;
use crate::zbus::client::{arg, unit, value, Client, ClientError};
use crate::zbus::wire::ObjectId;

pub const OBJECT: &str = "provision";
pub const VERSION: &str = "0.0.1";

/// How long "provisiond lacks this method" is believed before it is asked
/// again (an upgrade of provisiond restarts it, not vmd).
const LACK_REMEMBERED: Duration = Duration::from_secs(3600);

/// A workload id as provisiond parses a VM name: `<twin>-<contract>-<name>`
/// (Go: `Sscanf(id, "%d-%d-%s")`). Names that do not parse are not
/// workloads provisiond knows: vmd never asks about them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadId(String);

/// The prefix of Zero-OS's health-check VMs: never reported, never reaped.
pub const HEALTHCHECK_PREFIX: &str = "healthcheck-vm";

impl WorkloadId {
    /// The workload a VM of this name belongs to, if any.
    pub fn of_vm(name: &str) -> Option<WorkloadId> {
        if name.starts_with(HEALTHCHECK_PREFIX) {
            return None;
        }
        let mut parts = name.splitn(3, '-');
        let twin = parts.next()?;
        let contract = parts.next()?;
        let rest = parts.next()?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(twin) || !digits(contract) {
            return None;
        }
        // The widths of Go's `WorkloadID` parts: twin uint32, contract uint64.
        twin.parse::<u32>().ok()?;
        contract.parse::<u64>().ok()?;
        // `%s` takes what follows up to white space; it must take something.
        if rest.is_empty() || rest.starts_with(char::is_whitespace) {
            return None;
        }
        Some(WorkloadId(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What `GetWorkloadStatus` says of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadStatus {
    /// `init`, `unchanged`, `error`, `ok`, `deleted`, `paused` (empty when
    /// it does not exist).
    pub state: String,
    pub exists: bool,
}

impl WorkloadStatus {
    /// Its VM has no reason to run: the workload does not exist or was
    /// deleted. `error` is not gone: a VM vmd gave up on is reported as
    /// `error` and kept (PR #96's rule, which does not fight the report).
    pub fn gone(&self) -> bool {
        !self.exists || self.state == "deleted"
    }
}

/// One call to provisiond: its method and arguments, each encoded on its
/// own as the Go client does.
#[derive(Debug, Clone, Copy)]
pub enum Call<'a> {
    Status(&'a WorkloadId),
    Decommission(&'a WorkloadId, &'a str),
    SetError(&'a WorkloadId, &'a str),
    SetOk(&'a WorkloadId),
}

impl Call<'_> {
    pub fn method(&self) -> &'static str {
        match self {
            Call::Status(_) => "GetWorkloadStatus",
            Call::Decommission(..) => "DecommissionCached",
            Call::SetError(..) => "SetWorkloadError",
            Call::SetOk(_) => "SetWorkloadOk",
        }
    }

    pub fn inputs(&self) -> Result<Vec<Vec<u8>>, ClientError> {
        Ok(match self {
            Call::Status(id) | Call::SetOk(id) => vec![arg(id.as_str())?],
            Call::Decommission(id, text) | Call::SetError(id, text) => {
                vec![arg(id.as_str())?, arg(*text)?]
            }
        })
    }

    /// Whether the method is one provisiond may lack (PR #96, not merged).
    fn optional(&self) -> bool {
        matches!(self, Call::SetError(..) | Call::SetOk(_))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// provisiond could not be asked or did not answer in time.
    #[error("provisiond: {0}")]
    Unreachable(ClientError),
    /// The running provisiond has no such method (zosbase `main` lacks
    /// `SetWorkloadError` and `SetWorkloadOk`).
    #[error("provisiond has no method {0}")]
    Lacks(&'static str),
    /// provisiond refused the call itself (any other protocol error).
    #[error("provisiond refused {method}: {message}")]
    Refused {
        method: &'static str,
        message: String,
    },
    /// The method ran and failed, e.g. `deployment not found: deployment
    /// does not exist`.
    #[error("provisiond: {0}")]
    Failed(String),
}

impl ProvisionError {
    /// The workload's deployment is gone (the text provisiond wraps its
    /// not-found errors in; PR #96's monitor looks for the same).
    pub fn deployment_gone(&self) -> bool {
        matches!(self, ProvisionError::Failed(m) if m.contains("deployment does not exist"))
    }
}

/// The provisioning engine on one bus.
pub struct Provision {
    client: Client,
    object: ObjectId,
    /// When provisiond last said it lacks the optional methods.
    lacks_since: Mutex<Option<Instant>>,
}

impl Provision {
    /// The module named `module` (Zero-OS: `provision`) on `broker`, each
    /// call bounded by `timeout`.
    pub fn new(broker: Broker, module: &str, timeout: Duration, stats: PeerCalls) -> Self {
        Provision {
            client: Client::new(broker, module)
                .with_timeout(timeout)
                .with_stats(stats),
            object: ObjectId::new(OBJECT, VERSION),
            lacks_since: Mutex::new(None),
        }
    }

    /// Whether provisiond is believed to lack `SetWorkloadError` and
    /// `SetWorkloadOk` (it said so less than an hour ago).
    pub fn lacks_set_methods(&self) -> bool {
        let since = self.lacks_since.lock().unwrap_or_else(|e| e.into_inner());
        since.is_some_and(|t| t.elapsed() < LACK_REMEMBERED)
    }

    async fn call(&self, call: Call<'_>) -> Result<crate::zbus::wire::Output, ProvisionError> {
        let method = call.method();
        if call.optional() && self.lacks_set_methods() {
            return Err(ProvisionError::Lacks(method));
        }
        let inputs = call.inputs().map_err(ProvisionError::Unreachable)?;
        match self.client.call(&self.object, method, inputs).await {
            Ok(out) => Ok(out),
            // The Go server's answer to a method its object does not have.
            Err(ClientError::Protocol(m)) if call.optional() && m.contains("not a function") => {
                *self.lacks_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                Err(ProvisionError::Lacks(method))
            }
            Err(ClientError::Protocol(message)) => Err(ProvisionError::Refused { method, message }),
            Err(e) => Err(ProvisionError::Unreachable(e)),
        }
    }

    /// `GetWorkloadStatus(id) (state, exists, error)`.
    pub async fn workload_status(&self, id: &WorkloadId) -> Result<WorkloadStatus, ProvisionError> {
        let out = self.call(Call::Status(id)).await?;
        let (state, exists): (String, bool) = value(out).map_err(failed)?;
        Ok(WorkloadStatus { state, exists })
    }

    /// `DecommissionCached(id, reason) error`: provisiond uninstalls the
    /// workload, telling its user `reason`.
    pub async fn decommission(&self, id: &WorkloadId, reason: &str) -> Result<(), ProvisionError> {
        let out = self.call(Call::Decommission(id, reason)).await?;
        unit(out).map_err(failed)
    }

    /// `SetWorkloadError(id, message) error` (PR #96): the workload shows
    /// `error` with `message`, and is kept.
    pub async fn set_error(&self, id: &WorkloadId, message: &str) -> Result<(), ProvisionError> {
        let out = self.call(Call::SetError(id, message)).await?;
        unit(out).map_err(failed)
    }

    /// `SetWorkloadOk(id) error` (PR #96).
    pub async fn set_ok(&self, id: &WorkloadId) -> Result<(), ProvisionError> {
        let out = self.call(Call::SetOk(id)).await?;
        unit(out).map_err(failed)
    }
}

fn failed(e: ClientError) -> ProvisionError {
    match e {
        ClientError::Method(m) => ProvisionError::Failed(m),
        other => ProvisionError::Unreachable(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_workloads_as_provisiond_parses_them() {
        for ok in ["12-345-vm1", "1-2-a", "4294967295-18446744073709551615-x_y"] {
            assert!(WorkloadId::of_vm(ok).is_some(), "{ok}");
        }
        for not in [
            "vm1",
            "12-345",
            "12-345-",
            "-345-vm",
            "12--vm",
            "a-345-vm",
            "12-3a-vm",
            "4294967296-1-vm",
            "1-18446744073709551616-vm",
            "healthcheck-vm-1764800000",
            "healthcheck-vm",
        ] {
            assert!(WorkloadId::of_vm(not).is_none(), "{not}");
        }
    }

    #[test]
    fn gone_means_missing_or_deleted_never_error() {
        let s = |state: &str, exists| WorkloadStatus {
            state: state.into(),
            exists,
        };
        assert!(s("", false).gone());
        assert!(s("deleted", true).gone());
        for kept in ["ok", "error", "init", "paused", "unchanged"] {
            assert!(!s(kept, true).gone(), "{kept}");
        }
    }
}
