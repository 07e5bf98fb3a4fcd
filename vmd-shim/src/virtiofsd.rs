//! One virtiofsd per share, started before the VMM (which connects to them
//! at start) and killed once the VMM is gone.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::Child;

use vmd_runtime::process::say;
use vmd_runtime::spec::VmSpec;

use crate::hygiene::{describe, Hardening};

/// Starts one virtiofsd per share of `spec` and waits for its socket. Each
/// runs hardened like the VMM (own process group: zinit's stop must not take
/// a share away from a guest that is shutting down; death signal; only the
/// capabilities a file server needs; `no_new_privs`), and is killed when
/// dropped (`kill_on_drop`).
pub fn start(spec: &VmSpec) -> Result<Vec<Child>, String> {
    let mut daemons = Vec::new();
    for share in &spec.shares {
        remove_stale(&share.socket)?;
        let mut cmd = Hardening::virtiofsd().command(&spec.virtiofsd);
        cmd.arg(format!("--socket-path={}", share.socket.display()))
            .arg(format!("--shared-dir={}", share.source.display()))
            .args(["--cache=auto", "--sandbox=chroot"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start {} for share {}: {e}",
                spec.virtiofsd.display(),
                share.tag
            )
        })?;
        let t0 = std::time::Instant::now();
        while !share.socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "virtiofsd for share {} exited: {}",
                    share.tag,
                    describe(&st)
                ));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "virtiofsd for share {} did not create its socket",
                    share.tag
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
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
pub fn remove_stale(path: &std::path::Path) -> Result<(), String> {
    vmd_runtime::files::remove_file(path)
        .map_err(|e| format!("cannot remove the stale {}: {e}", path.display()))
}
