//! Requests taken but not yet answered, kept in Redis.
//!
//! A request is never popped: it is moved, atomically, from its queue to an
//! in-flight list, and the write that pushes its reply removes it.
//! Whatever a process held when it died is still in Redis, and the next one
//! serves it (see [`Entry::age`] for how long that is worth doing).
//!
//! Each take has a list of its own, named after the queue, the time the take
//! began and a token unique to the take:
//!
//! ```text
//!  <module>.<object>@<version>                         the queue callers RPUSH to
//!  <module>.<object>@<version>:inflight:<ms>:<token>   the requests one take moved, as sent
//! ```
//!
//! The name carries what an entry would otherwise have to: when it was taken
//! (for the age bound of a replay) and by which take (so a take whose answer
//! was lost with its connection is found again by its name alone). So the
//! take needs no script: `BLMOVE queue <list> LEFT RIGHT` waits and moves in
//! one command, and `LMOVE`s behind it in the same pipeline move the rest of
//! a batch. Redis drops a list when its last element goes, so nothing is
//! left to clean up once every reply is pushed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What every in-flight list of `queue` starts with. Queues always contain
/// `@`; nothing a caller could name ends with this by accident.
fn prefix_of(queue: &str) -> String {
    format!("{queue}{INFLIGHT}")
}

/// What follows the queue's name in the name of each of its in-flight lists.
const INFLIGHT: &str = ":inflight:";

/// The `SCAN MATCH` pattern of the in-flight lists of `queue`: its name with
/// the glob's special characters escaped, then anything.
pub(super) fn pattern_of(queue: &str) -> String {
    let mut p = String::with_capacity(queue.len() + 16);
    for c in prefix_of(queue).chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('*');
    p
}

/// Moves up to `ARGV[1]` requests from the queue `KEYS[1]` to the end of the
/// in-flight list `KEYS[2]` and returns them. Only for brokers without
/// `LMOVE` (Redis < 6.2), whose `RPOPLPUSH` takes from the wrong end: one
/// script, run whole or not at all. `LPOP` and `RPUSH` without counts exist
/// in every Redis with scripting.
pub(super) const TAKE: &str = r"
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local p = redis.call('LPOP', KEYS[1])
  if not p then break end
  redis.call('RPUSH', KEYS[2], p)
  out[i] = p
end
return out
";

/// Names each take of this process uniquely: a take whose answer was lost
/// with its connection is found again by its list's name, which nothing
/// else uses.
pub(super) struct Takes {
    process: String,
    seq: AtomicU64,
}

impl Takes {
    pub(super) fn new() -> Self {
        // Unique across restarts of the process as well: pid and start time.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        Takes {
            process: format!("{:x}.{:x}", std::process::id(), now & 0xffff_ffff_ffff),
            seq: AtomicU64::new(0),
        }
    }

    /// The in-flight list of the next take from `queue`.
    pub(super) fn next(&self, queue: &str) -> TakeList {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let taken_ms = unix_millis(SystemTime::now());
        // `<queue>:inflight:<ms>:<process>.<seq>`, written piece by piece:
        // `format!` was 5 % of the work of an `Exists` (callgrind).
        let (mut ms, mut sq) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (ms, sq) = (ms.format(taken_ms), sq.format(seq));
        let mut name = String::with_capacity(
            queue.len() + INFLIGHT.len() + ms.len() + self.process.len() + sq.len() + 2,
        );
        for part in [queue, INFLIGHT, ms, ":", &self.process, ".", sq] {
            name.push_str(part);
        }
        TakeList {
            name: name.into(),
            taken_ms,
        }
    }
}

/// The in-flight list of one take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TakeList {
    name: Arc<str>,
    /// When the take began, as its name says (kept apart so that serving a
    /// take does not parse its own name again).
    taken_ms: u64,
}

impl TakeList {
    /// The list of `queue` called `name`, if it is one (found by a scan).
    pub(super) fn parse(queue: &str, name: &str) -> Option<TakeList> {
        let taken_ms = taken_ms(queue, name)?;
        Some(TakeList {
            name: name.into(),
            taken_ms,
        })
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Its elements as entries: every one is a request as its caller sent it.
    pub(super) fn entries(&self, stored: Vec<Vec<u8>>) -> Vec<Entry> {
        let taken_ms = self.taken_ms;
        stored
            .into_iter()
            .map(|stored| Entry {
                list: Arc::clone(&self.name),
                stored,
                taken_ms,
            })
            .collect()
    }
}

/// When the take of the list `name` of `queue` began, from its name.
fn taken_ms(queue: &str, name: &str) -> Option<u64> {
    let rest = name.strip_prefix(&prefix_of(queue))?;
    let (ms, token) = rest.split_once(':')?;
    if token.is_empty() {
        return None;
    }
    ms.parse().ok()
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One request in flight: the list it is in and its bytes, which are both
/// what its caller sent and what removes it (`LREM`).
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// The in-flight list it is in.
    pub(super) list: Arc<str>,
    stored: Vec<u8>,
    taken_ms: u64,
}

impl Entry {
    /// The request as its caller sent it.
    pub(super) fn payload(&self) -> &[u8] {
        &self.stored
    }

    /// The element as stored: `LREM` takes exactly these bytes.
    pub(super) fn stored(&self) -> &[u8] {
        &self.stored
    }

    /// How long ago it was taken (zero if the clock went back). Counted from
    /// when its take began to wait, so it may be older than the request by
    /// the wait (at most the pop timeout, when the queue was empty): a bound
    /// on the safe side of a replay.
    pub(super) fn age(&self, now: SystemTime) -> Duration {
        Duration::from_millis(unix_millis(now).saturating_sub(self.taken_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: &str = "vmd.manager@0.0.1";

    #[test]
    fn a_take_list_is_named_by_its_queue_time_and_token() {
        let takes = Takes::new();
        let a = takes.next(Q);
        let b = takes.next(Q);
        assert_ne!(a, b, "each take has its own list");
        assert!(a.name().starts_with("vmd.manager@0.0.1:inflight:"));
        assert_eq!(TakeList::parse(Q, a.name()), Some(a.clone()));
        // A payload may hold any byte, ':' and ' ' included.
        let payload = b"\x85\xa2ID: x y\x00:".to_vec();
        let e = a.entries(vec![payload.clone()]).remove(0);
        assert_eq!(e.payload(), &payload[..]);
        assert_eq!(e.stored(), &payload[..]);
        assert_eq!(&*e.list, a.name());
        assert!(e.age(SystemTime::now()) < Duration::from_secs(5));
        let later = SystemTime::now() + Duration::from_secs(600);
        assert!(e.age(later) >= Duration::from_secs(599));
    }

    #[test]
    fn what_no_take_named_is_not_a_take_list() {
        for bad in [
            "vmd.manager@0.0.1:inflight",
            "vmd.manager@0.0.1:inflight:",
            "vmd.manager@0.0.1:inflight:12",
            "vmd.manager@0.0.1:inflight:12:",
            "vmd.manager@0.0.1:inflight:abc:tok",
            "vmd.vmd@0.0.1:inflight:12:tok",
        ] {
            assert!(TakeList::parse(Q, bad).is_none(), "{bad:?}");
        }
        assert!(TakeList::parse(Q, "vmd.manager@0.0.1:inflight:12:tok").is_some());
    }

    #[test]
    fn the_scan_pattern_matches_only_the_queue_s_lists() {
        assert_eq!(pattern_of(Q), "vmd.manager@0.0.1:inflight:*");
        assert_eq!(pattern_of("a*b[1]?\\"), "a\\*b\\[1\\]\\?\\\\:inflight:*");
    }
}
