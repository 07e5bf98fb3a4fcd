//! Waking whoever waits for a file to appear in a directory (a shim's
//! control socket, bound afresh by every shim), from one inotify instance
//! for the whole host: no polling, and no instance per VM (the kernel
//! allows 128 per user by default; watches are plentiful).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::Notify;

/// The host's directory watch. Without inotify (no kernel support, limits
/// reached), [`DirWatch::watch`] says so and callers wait by the clock.
#[derive(Clone)]
pub struct DirWatch {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    watches: Mutex<Watches>,
    waiting: Mutex<HashMap<WatchDescriptor, Arc<Notify>>>,
}

/// Woken when something is created in (or moved into) the directory; the
/// watch ends when this is dropped.
pub struct DirGuard {
    pub notify: Arc<Notify>,
    wd: WatchDescriptor,
    inner: Arc<Inner>,
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        self.inner
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.wd);
        // Gone with the directory already, in which case this fails.
        let _ = self
            .inner
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.wd.clone());
    }
}

impl DirWatch {
    /// Starts the reader on `rt`.
    pub fn start(rt: &tokio::runtime::Handle) -> Self {
        let _entered = rt.enter();
        let inotify = match Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "no inotify: waits for restarted shims go by the clock");
                return DirWatch { inner: None };
            }
        };
        let watches = inotify.watches();
        let stream = match inotify.into_event_stream(vec![0u8; 16 * 1024]) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no inotify stream: waits for restarted shims go by the clock");
                return DirWatch { inner: None };
            }
        };
        let inner = Arc::new(Inner {
            watches: Mutex::new(watches),
            waiting: Mutex::new(HashMap::new()),
        });
        let reader = Arc::clone(&inner);
        rt.spawn(async move {
            let mut stream = stream;
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let n = reader
                    .waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&ev.wd)
                    .cloned();
                if let Some(n) = n {
                    // A permit is kept if nobody waits right now.
                    n.notify_one();
                }
            }
        });
        DirWatch { inner: Some(inner) }
    }

    /// A watch that never fires (tests, or a host without inotify).
    pub fn none() -> Self {
        DirWatch { inner: None }
    }

    /// Watches `dir` until the guard is dropped; `None` when it cannot.
    pub fn watch(&self, dir: &Path) -> Option<DirGuard> {
        let inner = self.inner.as_ref()?;
        let wd = inner
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(
                dir,
                WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ATTRIB,
            )
            .map_err(|e| {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch");
            })
            .ok()?;
        let notify = Arc::new(Notify::new());
        inner
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(wd.clone(), Arc::clone(&notify));
        Some(DirGuard {
            notify,
            wd,
            inner: Arc::clone(inner),
        })
    }
}
