//! Whether each log stream delivers, pushed by its worker: a worker saves
//! its progress file (by rename) when it connects, sends, or loses its
//! receiver; inotify on the streams directory says which file changed, and
//! a change of `connected` becomes `stream-failing` (with the worker's
//! error) or `stream-started` again (it delivers again) in the VM's events.
//! Nothing is read while no worker writes.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};

use vmd_runtime::events::EventKind;
use vmd_runtime::progress::Progress;
use vmd_runtime::{HostPaths, StreamId, VmName};

use super::Events;

/// Saves of one file within this window are read once: a busy worker saves
/// after every batch it sends.
const SETTLE: Duration = Duration::from_millis(200);

/// What a stream last looked like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delivery {
    Unknown,
    Connected,
    Failing,
}

fn delivery(p: &Progress) -> Delivery {
    match (p.connected, &p.last_error) {
        (true, _) => Delivery::Connected,
        (false, Some(_)) => Delivery::Failing,
        (false, None) => Delivery::Unknown,
    }
}

/// The stream's VM, from its record.
fn vm_of(paths: &HostPaths, id: &StreamId) -> Option<VmName> {
    #[derive(serde::Deserialize)]
    struct Record {
        vm: String,
    }
    let r: Record = vmd_runtime::files::read_json(&paths.stream_spec(id))?;
    VmName::new(&r.vm).ok()
}

/// Follows the streams' progress files on `rt` until vmd exits.
pub fn spawn(events: Events, paths: HostPaths, rt: &tokio::runtime::Handle) {
    let _entered = rt.enter();
    let dir = paths.progress_dir();
    let watched = Inotify::init().and_then(|i| {
        i.watches()
            .add(&dir, WatchMask::MOVED_TO | WatchMask::CLOSE_WRITE)?;
        i.into_event_stream(vec![0u8; 16 * 1024])
    });
    let mut changes = match watched {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e,
                           "cannot watch the streams' progress: no stream-failing events");
            return;
        }
    };
    rt.spawn(async move {
        // What every stream looks like now: only changes are events.
        let mut seen: HashMap<String, Delivery> = HashMap::new();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Some(id) = progress_id(&e.file_name()) {
                if let Ok(sid) = StreamId::new(&id) {
                    let d = Progress::load(&paths.stream_progress(&sid))
                        .map_or(Delivery::Unknown, |p| delivery(&p));
                    seen.insert(id, d);
                }
            }
        }
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        loop {
            let ev = if dirty.is_empty() {
                changes.next().await
            } else {
                match tokio::time::timeout(SETTLE, changes.next()).await {
                    Ok(ev) => ev,
                    Err(_) => {
                        for id in std::mem::take(&mut dirty) {
                            check(&events, &paths, &mut seen, id);
                        }
                        continue;
                    }
                }
            };
            let Some(Ok(ev)) = ev else { return };
            if let Some(id) = ev.name.as_deref().and_then(|n| progress_id(&n.to_owned())) {
                dirty.insert(id);
            }
        }
    });
}

fn progress_id(name: &OsString) -> Option<String> {
    name.to_str()?.strip_suffix(".progress").map(str::to_owned)
}

fn check(events: &Events, paths: &HostPaths, seen: &mut HashMap<String, Delivery>, id: String) {
    let Ok(sid) = StreamId::new(&id) else { return };
    let Some(p) = Progress::load(&paths.stream_progress(&sid)) else {
        // Removed with its stream (`stream-stopped` says so).
        seen.remove(&id);
        return;
    };
    let now = delivery(&p);
    let was = seen.insert(id.clone(), now).unwrap_or(Delivery::Unknown);
    if now == was {
        return;
    }
    let Some(vm) = vm_of(paths, &sid) else { return };
    match now {
        Delivery::Failing => {
            let why = p.last_error.unwrap_or_default();
            events.note(&vm, EventKind::StreamFailing, Some(format!("{id}: {why}")));
        }
        // Delivering again after it failed (a first connection is what
        // `stream-started` at StreamCreate already said).
        Delivery::Connected if was == Delivery::Failing => {
            events.note(
                &vm,
                EventKind::StreamStarted,
                Some(format!("{id}: delivering again")),
            );
        }
        _ => {}
    }
}
