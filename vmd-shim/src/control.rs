//! The shim's side of the control socket ([`vmd_runtime::control`]): the
//! state it reports, the events it pushes and the stops it passes to the
//! supervisor.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, oneshot};

use vmd_runtime::control::{self, error_reply, json_reply, watch_line, Command};
use vmd_runtime::events::WatchLine;

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
/// A retry asked on the control socket: where its reply goes, and word
/// that the reply was written (the shim exits right after a retry).
pub struct RetryAsked {
    pub reply: oneshot::Sender<String>,
    pub written: oneshot::Receiver<()>,
}

pub fn listen(
    shared: Shared,
    locker: Arc<Locker>,
    stops: mpsc::Sender<StopFrom>,
    retries: mpsc::Sender<RetryAsked>,
) -> std::io::Result<()> {
    let path = shared.run.control_socket();
    vmd_runtime::files::remove_file(&path)?;
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (shared, locker, stops) = (shared.clone(), Arc::clone(&locker), stops.clone());
            let retries = retries.clone();
            tokio::spawn(async move {
                let Some((command, stream)) = control::read_command(s).await else {
                    return;
                };
                if let Command::Watch(since) = command {
                    return watch(shared, since, stream).await;
                }
                if command == Command::Retry {
                    return retry(&shared, &retries, stream).await;
                }
                control::serve(command, stream, move |command| async move {
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
                        Command::Watch(_) | Command::Retry => unreachable!("answered above"),
                    }
                })
                .await
            });
        }
    });
    Ok(())
}

/// Answers `retry`: only a failed shim, idle, takes one; it exits once the
/// reply is written.
async fn retry(shared: &Shared, retries: &mpsc::Sender<RetryAsked>, stream: UnixStream) {
    let (reply, rx) = oneshot::channel();
    let (done, written) = oneshot::channel();
    let failed = shared.snapshot().phase == vmd_runtime::state::Phase::Failed;
    let asked = failed && retries.send(RetryAsked { reply, written }).await.is_ok();
    control::serve(Command::Retry, stream, |_| async move {
        if !failed {
            return error_reply("the VM has not failed");
        }
        if !asked {
            return error_reply("shim exiting");
        }
        rx.await.unwrap_or_else(|_| error_reply("shim exiting"))
    })
    .await;
    let _ = done.send(());
}

/// Answers `watch <since>`: the state, what followed `since`, then each
/// event as it is recorded, until the watcher leaves or falls behind.
async fn watch(shared: Shared, since: u64, stream: UnixStream) {
    // Subscribed before the state is read: an event recorded in between is
    // in both, and sent once (by its seq).
    let mut live = shared.events();
    let st = shared.snapshot();
    // A watcher ahead of the record (which was lost) gets all of it.
    let since = if since > st.events.seq { 0 } else { since };
    let (missed_before, missed) = st.events.after(since);
    let mut last = missed_before.last().map_or(since, |e| e.seq);
    if missed > 0 {
        vmd_runtime::process::say(format!(
            "a watcher resumed after event {since}: {missed} events since are no longer kept"
        ));
    }
    let (mut rd, mut wr) = stream.into_split();
    let mut out = String::new();
    out.push_str(&watch_line(&WatchLine::State(Box::new(st))));
    out.push('\n');
    for ev in missed_before {
        out.push_str(&watch_line(&WatchLine::Event(ev)));
        out.push('\n');
    }
    if tokio::io::AsyncWriteExt::write_all(&mut wr, out.as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut scratch = [0u8; 64];
    loop {
        let ev = tokio::select! {
            ev = live.recv() => ev,
            // The watcher sends nothing more: any read end is its going away.
            _ = rd.read(&mut scratch) => return,
        };
        match ev {
            Ok(ev) if ev.seq > last => {
                last = ev.seq;
                let mut line = watch_line(&WatchLine::Event(ev));
                line.push('\n');
                if tokio::io::AsyncWriteExt::write_all(&mut wr, line.as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            // Too far behind: closing makes it come back and resume from the
            // record in `state.json`, without a gap.
            Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
        }
    }
}
