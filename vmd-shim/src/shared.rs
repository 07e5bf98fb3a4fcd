//! The shim's state (`state.json`), in memory and on disk: changed by the
//! supervisor, the event pump and the locker, read by the control server.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use vmd_runtime::state::ShimState;
use vmd_runtime::RunDir;

/// The shim's state, and a signal for who waits for it to change.
#[derive(Clone)]
pub struct Shared {
    pub run: RunDir,
    state: Arc<Mutex<ShimState>>,
    changes: Arc<watch::Sender<()>>,
}

impl Shared {
    pub fn new(run: RunDir, state: ShimState) -> Self {
        Shared {
            run,
            state: Arc::new(Mutex::new(state)),
            changes: Arc::new(watch::channel(()).0),
        }
    }

    /// Wakes on every change after this call (check the state after
    /// subscribing, then wait: nothing is missed).
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
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
        let mut st = self.lock();
        f(&mut st);
        if let Err(e) = st.save(&self.run.state()) {
            eprintln!("cannot save {}: {e}", self.run.state().display());
        }
        drop(st);
        self.changes.send_replace(());
    }
}
