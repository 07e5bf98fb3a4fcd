//! The shim's side of the control socket ([`vmd_runtime::control`]): the
//! state it reports and the stops it passes to the supervisor.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use vmd_runtime::control::{self, error_reply, json_reply, Command};

use crate::lock::Locker;
use crate::shared::Shared;

/// Who asked for a stop.
pub enum StopFrom {
    /// SIGTERM/SIGINT (zinit stop): stop, then exit.
    Signal,
    /// vmd on the control socket: stop, reply, then stay idle.
    Control(oneshot::Sender<String>),
}

/// Listens on the control socket (mode 0600: vmd runs as the same user).
pub fn listen(
    shared: Shared,
    locker: Arc<Locker>,
    stops: mpsc::Sender<StopFrom>,
) -> std::io::Result<()> {
    let path = shared.run.control_socket();
    vmd_runtime::files::remove_file(&path)?;
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (shared, locker, stops) = (shared.clone(), Arc::clone(&locker), stops.clone());
            tokio::spawn(control::serve(s, move |command| async move {
                match command {
                    Command::Status => json_reply(&shared.snapshot()),
                    Command::Lock => json_reply(&locker.apply().await),
                    Command::Stop => {
                        let (tx, rx) = oneshot::channel();
                        if stops.send(StopFrom::Control(tx)).await.is_err() {
                            return error_reply("shim exiting");
                        }
                        rx.await.unwrap_or_else(|_| error_reply("shim exiting"))
                    }
                }
            }));
        }
    });
    Ok(())
}
