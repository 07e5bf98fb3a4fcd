//! Requests taken but not yet answered, kept in Redis.
//!
//! A request is never popped: one atomic script moves it from its queue to
//! the queue's in-flight list, stamped with when it was taken and by which
//! take, and the transaction that pushes its reply removes it. Whatever a
//! process held when it died is still in the list, and the next one serves
//! it (see [`Entry::age`] for how long that is worth doing).
//!
//! ```text
//!  <module>.<object>@<version>            the queue callers RPUSH to
//!  <module>.<object>@<version>:inflight   "<taken ms> <take>:<payload>" …
//! ```
//!
//! Waiting for a request takes nothing: `BLMOVE q q LEFT LEFT` hands back
//! the head of the queue and leaves it there (a rotation of one element onto
//! itself), so a wait may be cancelled at any instant — at shutdown, on a
//! lost connection — without losing what arrived meanwhile. The take script
//! that follows in the same pipeline runs as soon as the wait returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The in-flight list of a queue. Queues always contain `@`; nothing a
/// caller could name ends with this suffix by accident.
pub(super) fn list_of(queue: &str) -> String {
    format!("{queue}:inflight")
}

/// Moves up to `ARGV[1]` requests from the queue `KEYS[1]` to the end of the
/// in-flight list `KEYS[2]`, each prefixed with `ARGV[2]` (its stamp), and
/// returns them as stored. One script: Redis runs it whole or not at all.
/// `LPOP` and `RPUSH` without counts exist in every Redis with scripting.
pub(super) const TAKE: &str = r"
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local p = redis.call('LPOP', KEYS[1])
  if not p then break end
  local e = ARGV[2] .. p
  redis.call('RPUSH', KEYS[2], e)
  out[i] = e
end
return out
";

/// Names each take of this process uniquely, so that a take whose answer was
/// lost with its connection can be found in the list again (nothing else
/// carries its token, and nothing else serves it).
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

    /// The stamp of the next take: `"<now ms> <token>:"`.
    pub(super) fn next(&self) -> Stamp {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Stamp(format!(
            "{} {}.{seq:x}:",
            unix_millis(SystemTime::now()),
            self.process
        ))
    }
}

/// What a take puts in front of each request it moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Stamp(String);

impl Stamp {
    pub(super) fn as_str(&self) -> &str {
        &self.0
    }
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One element of an in-flight list: the stored bytes (what removes it) and
/// where the request starts in them.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    /// The in-flight list it is in.
    pub(super) list: Arc<str>,
    stored: Vec<u8>,
    /// Length of the stamp; the request follows.
    header: usize,
    taken_ms: u64,
}

impl Entry {
    /// Parses a stored element. `Err` gives it back: not something a take
    /// wrote (only vmd writes these lists; such an element is removed, not
    /// served).
    pub(super) fn parse(list: Arc<str>, stored: Vec<u8>) -> Result<Entry, Vec<u8>> {
        match stamp_of(&stored) {
            Some((header, taken_ms)) => Ok(Entry {
                list,
                header,
                taken_ms,
                stored,
            }),
            None => Err(stored),
        }
    }

    /// The request as its caller sent it.
    pub(super) fn payload(&self) -> &[u8] {
        &self.stored[self.header..]
    }

    /// The element as stored: `LREM` takes exactly these bytes.
    pub(super) fn stored(&self) -> &[u8] {
        &self.stored
    }

    /// Whether a take with this stamp wrote it.
    pub(super) fn taken_by(&self, stamp: &Stamp) -> bool {
        self.stored.starts_with(stamp.0.as_bytes())
    }

    /// How long ago it was taken (zero if the clock went back).
    pub(super) fn age(&self, now: SystemTime) -> Duration {
        Duration::from_millis(unix_millis(now).saturating_sub(self.taken_ms))
    }
}

/// The length of a stored element's stamp and the time it holds.
fn stamp_of(stored: &[u8]) -> Option<(usize, u64)> {
    let colon = stored.iter().position(|&b| b == b':')?;
    let head = std::str::from_utf8(&stored[..colon]).ok()?;
    let (ms, token) = head.split_once(' ')?;
    if token.is_empty() || token.contains(' ') {
        return None;
    }
    Some((colon + 1, ms.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_its_stamp_and_the_request_untouched() {
        let takes = Takes::new();
        let stamp = takes.next();
        // A payload may hold any byte, ':' and ' ' included.
        let payload = b"\x85\xa2ID: x y\x00:".to_vec();
        let mut stored = stamp.as_str().as_bytes().to_vec();
        stored.extend_from_slice(&payload);
        let e = Entry::parse("q:inflight".into(), stored.clone()).expect("parses");
        assert_eq!(e.payload(), &payload[..]);
        assert_eq!(e.stored(), &stored[..]);
        assert!(e.taken_by(&stamp));
        assert!(!e.taken_by(&takes.next()), "each take has its own token");
        assert!(e.age(SystemTime::now()) < Duration::from_secs(5));
        let later = SystemTime::now() + Duration::from_secs(600);
        assert!(e.age(later) >= Duration::from_secs(599));
    }

    #[test]
    fn what_no_take_wrote_is_not_an_entry() {
        for bad in [
            &b"no stamp"[..],
            b"12:x",
            b"abc tok:x",
            b" tok:x",
            b"12 :x",
            b"",
        ] {
            assert!(Entry::parse("l".into(), bad.to_vec()).is_err(), "{bad:?}");
        }
    }
}
