//! A VM's lifecycle events: the kinds every process agrees on, and what a
//! shim pushes to whoever watches it (`watch` on its control socket).
//!
//! The shim numbers the changes of its VM ([`ShimEvent::seq`]) and keeps the
//! last [`RETAINED`] of them in `state.json`, written with the change itself:
//! a watcher that comes back — vmd restarted, or the shim did — asks for
//! what followed the last one it saw and gets it, without a gap and without
//! a repeat. vmd turns each into the event it publishes on the bus
//! (`vmd::api::VmEvent`), numbered in a per-VM sequence of its own that also
//! holds what only vmd sees (created, deleted, streams). See `docs/events.md`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::state::ShimState;

/// Events a shim keeps for watchers that come back.
pub const RETAINED: usize = 64;

/// What happened to a VM. The wire text ([`EventKind::as_str`]) is what
/// subscribers match on: kinds may be added, never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// vmd: Run accepted the VM and handed it to zinit.
    Created,
    /// shim: the first VMM of this VM is starting.
    Starting,
    /// shim: a later VMM is starting; the reason says which attempt.
    Restarting,
    /// shim: the VMM booted the guest.
    Booted,
    /// shim: the guest was paused (locked).
    Paused,
    /// shim: the guest runs again (unlocked).
    Resumed,
    /// shim: the guest powered itself off.
    PoweredOff,
    /// shim: the VMM exited otherwise; the reason is its exit status.
    Crashed,
    /// shim: the VM is given up on (crash loop, or it cannot start at all).
    Failed,
    /// shim: a stop began (power button, grace period, then force).
    Stopping,
    /// shim: stopped; the reason says how.
    Stopped,
    /// vmd: the VM and its files are gone.
    Deleted,
    /// vmd: a log stream of the VM was created, or delivers again after it
    /// failed (reason: its id).
    StreamStarted,
    /// vmd: a log stream cannot deliver: its worker lost or cannot reach its
    /// receiver (reason: its id and why).
    StreamFailing,
    /// vmd: a log stream was deleted (reason: its id).
    StreamStopped,
}

impl EventKind {
    pub const ALL: [EventKind; 15] = [
        EventKind::Created,
        EventKind::Starting,
        EventKind::Restarting,
        EventKind::Booted,
        EventKind::Paused,
        EventKind::Resumed,
        EventKind::PoweredOff,
        EventKind::Crashed,
        EventKind::Failed,
        EventKind::Stopping,
        EventKind::Stopped,
        EventKind::Deleted,
        EventKind::StreamStarted,
        EventKind::StreamFailing,
        EventKind::StreamStopped,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Created => "created",
            EventKind::Starting => "starting",
            EventKind::Restarting => "restarting",
            EventKind::Booted => "booted",
            EventKind::Paused => "paused",
            EventKind::Resumed => "resumed",
            EventKind::PoweredOff => "powered-off",
            EventKind::Crashed => "crashed",
            EventKind::Failed => "failed",
            EventKind::Stopping => "stopping",
            EventKind::Stopped => "stopped",
            EventKind::Deleted => "deleted",
            EventKind::StreamStarted => "stream-started",
            EventKind::StreamFailing => "stream-failing",
            EventKind::StreamStopped => "stream-stopped",
        }
    }

    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change of a VM, as its shim recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimEvent {
    /// 1, 2, 3… for the life of the VM's run directory.
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A line of the shim's answer to `watch <seq>`: first its whole state, then
/// every event after `<seq>` it retained, then each new one as it happens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchLine {
    State(Box<ShimState>),
    Event(ShimEvent),
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The events a shim keeps, oldest first, and how it numbers the next.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    /// The number of the last event recorded (0: none yet).
    pub seq: u64,
    /// The last [`RETAINED`] events.
    pub recent: VecDeque<ShimEvent>,
}

impl EventLog {
    /// Records an event and returns it.
    pub fn record(&mut self, kind: EventKind, reason: Option<String>) -> ShimEvent {
        self.seq += 1;
        let ev = ShimEvent {
            seq: self.seq,
            at_ms: now_ms(),
            kind,
            reason,
        };
        self.recent.push_back(ev.clone());
        while self.recent.len() > RETAINED {
            self.recent.pop_front();
        }
        ev
    }

    /// What follows event `since`. A watcher ahead of the log (the shim's
    /// record was lost and it counts from 1 again) gets everything retained.
    /// `missed` counts events after `since` that are no longer retained.
    pub fn after(&self, since: u64) -> (Vec<ShimEvent>, u64) {
        let since = if since > self.seq { 0 } else { since };
        let out: Vec<ShimEvent> = self
            .recent
            .iter()
            .filter(|e| e.seq > since)
            .cloned()
            .collect();
        let first = out.first().map_or(self.seq + 1, |e| e.seq);
        (out, first.saturating_sub(since + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_by_their_wire_text() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{}\"", k.as_str()));
        }
        assert_eq!(EventKind::parse("rebooted"), None);
    }

    #[test]
    fn a_watcher_resumes_after_the_last_event_it_saw() {
        let mut log = EventLog::default();
        for _ in 0..5 {
            log.record(EventKind::Booted, None);
        }
        let (evs, missed) = log.after(3);
        assert_eq!(evs.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(missed, 0);
        assert!(log.after(5).0.is_empty());
        // Ahead of the log: the shim's count restarted.
        assert_eq!(log.after(9).0.len(), 5);
    }

    #[test]
    fn only_the_last_events_are_kept_and_a_gap_is_counted() {
        let mut log = EventLog::default();
        for _ in 0..RETAINED + 10 {
            log.record(EventKind::Crashed, Some("signal 9".into()));
        }
        assert_eq!(log.recent.len(), RETAINED);
        let (evs, missed) = log.after(0);
        assert_eq!(evs.len(), RETAINED);
        assert_eq!(missed, 10);
        assert_eq!(evs[0].seq, 11);
    }
}
