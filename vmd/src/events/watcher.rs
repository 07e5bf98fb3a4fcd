//! One VM's watch on its shim: the events it pushes go to the publisher
//! and to whoever in vmd listens (a `Run` waiting for the boot).
//!
//! Connected, it costs nothing until the shim has something to say. When
//! the shim goes away (it exited, or was killed) the watcher waits for its
//! control socket to be bound again — inotify on the run directory, with a
//! slow clock only as a safety net — and resumes after the last event it
//! published.

use std::time::Duration;

use tokio::sync::{broadcast, oneshot};

use vmd_runtime::control::{ShimClient, Watch};
use vmd_runtime::events::{ShimEvent, WatchLine};
use vmd_runtime::state::ShimState;
use vmd_runtime::{RunDir, VmName};

use super::dirwatch::DirWatch;
use super::publisher::{Pending, Publisher};

/// How long connecting to a shim may take.
const CONNECT: Duration = Duration::from_secs(2);
/// While a shim is away: how often its socket is tried even without a
/// notification (a missed one, or a host without inotify).
const RECHECK: Duration = Duration::from_secs(30);
/// At the end of a VM: how long what its shim still has to say is read.
const DRAIN: Duration = Duration::from_secs(2);

/// What vmd's listeners hear of a VM.
#[derive(Debug, Clone)]
pub enum Seen {
    /// The shim's whole state, each time the watch (re)connects.
    State(Box<ShimState>),
    Event(ShimEvent),
    /// The shim went away.
    Gone,
}

pub struct Watcher {
    pub name: VmName,
    pub run: RunDir,
    /// The last shim event published.
    pub cursor: u64,
    pub publisher: Publisher,
    pub dirs: DirWatch,
    pub local: broadcast::Sender<Seen>,
}

impl Watcher {
    /// Watches until `stop`, then reads what the shim still says.
    pub async fn run(&mut self, mut stop: oneshot::Receiver<()>) {
        // Watched before the first try: a socket bound in between still wakes.
        let appeared = self.dirs.watch(self.run.path());
        let shim = ShimClient::new(&self.run);
        loop {
            if let Ok(mut w) = shim.watch(self.cursor, CONNECT).await {
                tracing::debug!(vm = %self.name, after = self.cursor, "watching the shim");
                loop {
                    tokio::select! {
                        line = w.next() => match line {
                            Ok(Some(line)) => self.take(line),
                            Ok(None) | Err(_) => break,
                        },
                        _ = &mut stop => {
                            self.drain(&mut w).await;
                            return;
                        }
                    }
                }
            }
            let _ = self.local.send(Seen::Gone);
            let woken = async {
                match &appeared {
                    Some(g) => g.notify.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(RECHECK) => {}
                _ = &mut stop => return,
            }
        }
    }

    fn take(&mut self, line: WatchLine) {
        match line {
            WatchLine::State(st) => {
                if st.events.seq < self.cursor {
                    // The shim's record was lost: it counts from 1 again and
                    // sends all it has.
                    tracing::warn!(vm = %self.name, was = self.cursor, now = st.events.seq,
                                   "the shim's event count went back; following its new count");
                    self.cursor = 0;
                }
                let _ = self.local.send(Seen::State(st));
            }
            WatchLine::Event(ev) => {
                if ev.seq <= self.cursor {
                    return;
                }
                self.cursor = ev.seq;
                self.publisher.publish(Pending {
                    name: self.name.clone(),
                    kind: ev.kind,
                    at_secs: (ev.at_ms / 1000) as i64,
                    reason: ev.reason.clone(),
                    shim_seq: Some(ev.seq),
                });
                let _ = self.local.send(Seen::Event(ev));
            }
        }
    }

    /// What the shim still sends before it exits.
    async fn drain(&mut self, w: &mut Watch) {
        let _ = tokio::time::timeout(DRAIN, async {
            while let Ok(Some(line)) = w.next().await {
                self.take(line);
            }
        })
        .await;
    }

    /// The events `state.json` records after the cursor, for a shim that
    /// is gone: the file is the durable record.
    pub fn catch_up(&mut self) {
        let Ok(Some(st)) = ShimState::load(&self.run.state()) else {
            return;
        };
        if st.events.seq < self.cursor {
            self.cursor = 0;
        }
        let (events, _) = st.events.after(self.cursor);
        for ev in events {
            self.take(WatchLine::Event(ev));
        }
    }
}
