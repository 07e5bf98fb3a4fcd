//! Lifecycle events: one direction for every change of a VM. The shim
//! pushes (its control socket's `watch`), vmd listens — one [`watcher`] per
//! VM it manages — and publishes on the broker ([`publisher`]) as a zbus v1
//! stream, with a bounded history that `vmd ctl events` replays. What only
//! vmd sees (created, deleted, streams: [`streams`] follows whether they
//! deliver) goes into the same per-VM sequence.
//! Inside vmd, a `Run` waits for its guest by listening here: nothing polls.
//!
//! See `docs/events.md` for the events, their fields and the guarantees.

pub mod dirwatch;
pub mod publisher;
pub mod streams;
pub mod subscribe;
pub mod watcher;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use vmd_runtime::events::{now_ms, EventKind};
use vmd_runtime::{HostPaths, VmName};

use crate::zbus::broker::Broker;
use dirwatch::DirWatch;
use publisher::{Pending, Publisher};
pub use watcher::Seen;
use watcher::Watcher;

/// What a listener may fall behind by (a `Run` hears a few events).
const LISTEN_BACKLOG: usize = 64;

/// The host's events: the publisher, and a watcher per VM.
#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    publisher: Publisher,
    dirs: DirWatch,
    paths: HostPaths,
    rt: tokio::runtime::Handle,
    watching: Mutex<HashMap<VmName, Following>>,
}

struct Following {
    local: broadcast::Sender<Seen>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Watcher>,
}

impl Events {
    /// Publishes on `broker`, keeping the last `history` events there; the
    /// tasks run on `rt`.
    pub fn start(
        broker: Broker,
        history: usize,
        paths: HostPaths,
        rt: &tokio::runtime::Handle,
    ) -> Self {
        Events {
            inner: Arc::new(Inner {
                publisher: Publisher::start(broker, history, rt),
                dirs: DirWatch::start(rt),
                paths,
                rt: rt.clone(),
                watching: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn watching(&self) -> std::sync::MutexGuard<'_, HashMap<VmName, Following>> {
        self.inner
            .watching
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Follows `name`'s shim from now on (once: a second call listens to the
    /// same watch). `fresh`: a new VM, whose shim has recorded nothing yet;
    /// else the watch resumes after what was published.
    pub fn follow(&self, name: &VmName, fresh: bool) -> broadcast::Receiver<Seen> {
        let mut watching = self.watching();
        if let Some(f) = watching.get(name) {
            return f.local.subscribe();
        }
        let (local, rx) = broadcast::channel(LISTEN_BACKLOG);
        let (stop, stopped) = oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let (n, l) = (name.clone(), local.clone());
        let task = self.inner.rt.spawn(async move {
            let cursor = if fresh {
                0
            } else {
                inner.publisher.cursor(&n).await.shim
            };
            let mut w = Watcher {
                run: inner.paths.run_dir(&n),
                name: n,
                cursor,
                publisher: inner.publisher.clone(),
                dirs: inner.dirs.clone(),
                local: l,
            };
            w.run(stopped).await;
            w
        });
        watching.insert(name.clone(), Following { local, stop, task });
        rx
    }

    /// A new life of `name` begins (Run handed it to zinit): its numbering
    /// starts again with `created`.
    pub fn created(&self, name: &VmName) {
        self.inner.publisher.reset(name);
        self.note(name, EventKind::Created, None);
    }

    /// An event only vmd sees (streams).
    pub fn note(&self, name: &VmName, kind: EventKind, reason: Option<String>) {
        self.inner.publisher.publish(Pending {
            name: name.clone(),
            kind,
            at_secs: (now_ms() / 1000) as i64,
            reason,
            shim_seq: None,
        });
    }

    /// `name` is gone: publishes what its shim still said (the watch, then
    /// the record in `state.json`, which must still exist), then `deleted`,
    /// and forgets it. Returns once `deleted` is out (or queued while the
    /// broker is away).
    pub async fn deleted(&self, name: &VmName, reason: Option<String>) {
        let following = self.watching().remove(name);
        let mut w = match following {
            Some(f) => {
                let _ = f.stop.send(());
                match f.task.await {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::error!(vm = %name, error = %e, "the VM's watcher failed");
                        None
                    }
                }
            }
            None => None,
        };
        if w.is_none() {
            let (local, _) = broadcast::channel(1);
            w = Some(Watcher {
                run: self.inner.paths.run_dir(name),
                name: name.clone(),
                cursor: self.inner.publisher.cursor(name).await.shim,
                publisher: self.inner.publisher.clone(),
                dirs: DirWatch::none(),
                local,
            });
        }
        if let Some(mut w) = w {
            w.catch_up();
        }
        let last = Pending {
            name: name.clone(),
            kind: EventKind::Deleted,
            at_secs: (now_ms() / 1000) as i64,
            reason,
            shim_seq: None,
        };
        // Not waited for past a moment: a Delete must not hang on the broker.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.inner.publisher.forget(last),
        )
        .await;
    }

    /// Waits until everything noted so far is published.
    pub async fn flush(&self) {
        self.inner.publisher.flush().await;
    }

    /// How many VMs are watched.
    pub fn watched(&self) -> usize {
        self.watching().len()
    }
}
