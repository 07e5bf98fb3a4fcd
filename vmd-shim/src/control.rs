//! The shim's side of the control socket ([`vmd_runtime::control`]).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use vmd_runtime::control::{self, error_reply, json_reply, Command, Status};
use vmd_runtime::state::Phase;
use vmd_runtime::vmm::VmmApi;

use crate::lock::Locker;
use crate::supervisor::{Shared, StopFrom};

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
    let api = VmmApi::new(shared.run.api_socket());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (shared, locker, stops, api) = (
                shared.clone(),
                Arc::clone(&locker),
                stops.clone(),
                api.clone(),
            );
            tokio::spawn(control::serve(s, move |command| async move {
                match command {
                    Command::Status => {
                        let shim = shared.snapshot();
                        // Only a live VMM is asked (a dead one would cost a timeout).
                        let vm = match shim.vmm {
                            Some(v) if shim.phase == Phase::Running && v.alive() => {
                                api.state(Duration::from_millis(400)).await
                            }
                            _ => None,
                        };
                        json_reply(&Status { shim, vm })
                    }
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
