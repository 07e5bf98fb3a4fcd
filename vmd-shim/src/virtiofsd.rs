//! One virtiofsd per share, started before the VMM (which connects to them
//! at start) and killed once the VMM is gone.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Child;
use tokio::time::Instant;

use vmd_runtime::process::say;
use vmd_runtime::spec::VmSpec;

use crate::error::StartError;
use crate::hygiene::{describe, Hardening};

/// How long a virtiofsd may take to create its socket.
const SOCKET_WITHIN: Duration = Duration::from_secs(10);
/// How often its socket is looked for meanwhile.
const SOCKET_LOOK: Duration = Duration::from_millis(5);

/// Starts one virtiofsd per share of `spec` and waits for its socket. Each
/// runs hardened like the VMM (own process group: zinit's stop must not take
/// a share away from a guest that is shutting down; death signal; only the
/// capabilities a file server needs; `no_new_privs`), and is killed when
/// dropped (`kill_on_drop`). The wait yields to the shim's other tasks: the
/// control and console sockets answer meanwhile.
pub async fn start(spec: &VmSpec) -> Result<Vec<Child>, StartError> {
    let mut daemons = Vec::new();
    for share in &spec.shares {
        remove_stale(&share.socket)?;
        let mut cmd = Hardening::virtiofsd().command(&spec.virtiofsd);
        cmd.arg(format!("--socket-path={}", share.socket.display()))
            .arg(format!("--shared-dir={}", share.source.display()))
            .args(["--cache=auto", "--sandbox=chroot"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|source| StartError::VirtiofsdSpawn {
            program: spec.virtiofsd.clone(),
            tag: share.tag.clone(),
            source,
        })?;
        let deadline = Instant::now() + SOCKET_WITHIN;
        while !share.socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(StartError::VirtiofsdExited {
                    tag: share.tag.clone(),
                    status: describe(&st),
                });
            }
            if Instant::now() > deadline {
                return Err(StartError::VirtiofsdTimeout {
                    tag: share.tag.clone(),
                    after: SOCKET_WITHIN,
                });
            }
            tokio::time::sleep(SOCKET_LOOK).await;
        }
        say(format!(
            "virtiofsd for share {} running pid={}",
            share.tag,
            child.id().unwrap_or(0)
        ));
        daemons.push(child);
    }
    Ok(daemons)
}

/// Removes a socket an earlier run left (a new daemon binds it afresh).
pub fn remove_stale(path: &std::path::Path) -> Result<(), StartError> {
    vmd_runtime::files::remove_file(path).map_err(|source| StartError::Stale {
        path: path.to_owned(),
        source,
    })
}
