//! The shim's state (`state.json`), in memory and on disk: changed by the
//! supervisor, the event pump and the locker, read by the control server.
//! A change that is an event of the VM's life is recorded with the change,
//! in the same write, and pushed to every watcher.

use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};
use vmd_runtime::events::{EventKind, ShimEvent};
use vmd_runtime::process::say;
use vmd_runtime::state::ShimState;
use vmd_runtime::vmm::VmState;
use vmd_runtime::RunDir;

/// Events a slow watcher may fall behind by before it is cut off (it then
/// comes back and resumes from `state.json`'s record).
const WATCH_BACKLOG: usize = 256;

/// The shim's state, and signals for who waits for it to change.
#[derive(Clone)]
pub struct Shared {
    pub run: RunDir,
    state: Arc<Mutex<ShimState>>,
    changes: Arc<watch::Sender<()>>,
    events: broadcast::Sender<ShimEvent>,
}

impl Shared {
    pub fn new(run: RunDir, state: ShimState) -> Self {
        Shared {
            run,
            state: Arc::new(Mutex::new(state)),
            changes: Arc::new(watch::channel(()).0),
            events: broadcast::channel(WATCH_BACKLOG).0,
        }
    }

    /// Wakes on every change after this call (check the state after
    /// subscribing, then wait: nothing is missed).
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Every event recorded after this call (subscribe, then read the
    /// state's record: nothing is missed, what is seen twice has the same
    /// `seq`).
    pub fn events(&self) -> broadcast::Receiver<ShimEvent> {
        self.events.subscribe()
    }

    /// The state, locked (a panic elsewhere does not poison it for good).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, ShimState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> ShimState {
        self.lock().clone()
    }

    /// Changes the state and saves it.
    pub fn set(&self, f: impl FnOnce(&mut ShimState)) {
        self.update(f, |_| None);
    }

    /// Changes the state and records `kind` with it, in one save.
    pub fn emit(&self, kind: EventKind, reason: Option<String>, f: impl FnOnce(&mut ShimState)) {
        self.update(f, |_| Some((kind, reason)));
    }

    /// Records the guest's state as the VMM reports it (or as the locker
    /// made it): booted, paused, resumed — each once, whoever saw it first.
    pub fn set_vm(&self, now: VmState) {
        self.update(
            |s| s.vm = Some(now),
            |s| {
                let kind = match (s.vm, now) {
                    (was, now) if was == Some(now) => return None,
                    (None, _) => EventKind::Booted,
                    (Some(_), VmState::Paused) => EventKind::Paused,
                    (Some(_), _) => EventKind::Resumed,
                };
                Some((kind, None))
            },
        );
    }

    /// Changes the state; `event` (which sees the state before the change)
    /// says whether that is an event.
    pub fn update(
        &self,
        f: impl FnOnce(&mut ShimState),
        event: impl FnOnce(&ShimState) -> Option<(EventKind, Option<String>)>,
    ) {
        let mut st = self.lock();
        let happened = event(&st);
        f(&mut st);
        let recorded = happened.map(|(kind, reason)| st.events.record(kind, reason));
        if let Err(e) = st.save(&self.run.state()) {
            say(format!("cannot save {}: {e}", self.run.state().display()));
        }
        drop(st);
        // Sent after the save: what a watcher hears is on disk.
        if let Some(ev) = recorded {
            let _ = self.events.send(ev);
        }
        self.changes.send_replace(());
    }
}
