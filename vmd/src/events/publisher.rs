//! Publishing on the broker, in order, exactly once per change.
//!
//! One task owns the per-VM numbering and the connection. Each event is
//! numbered (the VM's last `Seq` + 1) and written in one `MULTI`/`EXEC`:
//! `XADD` to the bounded history, `PUBLISH` on the channel, and `HSET` of
//! the VM's cursor — its last `Seq` and the last shim event it came from.
//! A vmd killed at any instant has published an event with its cursor or
//! neither; the next vmd resumes each shim's watch after the cursor, so a
//! change is published once. While Redis is away events wait, in order,
//! and go out when it is back.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::{mpsc, oneshot};

use vmd_runtime::events::EventKind;
use vmd_runtime::VmName;

use crate::api::VmEvent;
use crate::zbus::broker::{Broker, BrokerError};
use crate::zbus::codec;

/// Redis keys of the events (channel: [`crate::api::events_channel`]).
pub const HISTORY_KEY: &str = "vmd.events.history";
pub const CURSORS_KEY: &str = "vmd.events.cursors";
/// The history entry's one field: the published bytes.
pub const HISTORY_FIELD: &str = "e";

/// Events written in one transaction, at most.
const BATCH: usize = 128;
/// Events kept while the broker is away; older ones are dropped past it
/// (said in the log), so a long outage costs bounded memory.
const QUEUE_MAX: usize = 100_000;

/// Why a round with the broker failed (it is retried).
#[derive(Debug, thiserror::Error)]
enum PublishError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("broker error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Where a VM's numbering stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The last `Seq` published for the VM.
    pub seq: u64,
    /// The last shim event published (what its watch resumes after).
    pub shim: u64,
}

impl Cursor {
    fn encode(self) -> String {
        format!("{} {}", self.seq, self.shim)
    }

    fn decode(s: &str) -> Option<Cursor> {
        let (seq, shim) = s.split_once(' ')?;
        Some(Cursor {
            seq: seq.parse().ok()?,
            shim: shim.parse().ok()?,
        })
    }
}

/// An event to publish.
#[derive(Debug)]
pub struct Pending {
    pub name: VmName,
    pub kind: EventKind,
    pub at_secs: i64,
    pub reason: Option<String>,
    /// The shim event it came from.
    pub shim_seq: Option<u64>,
}

enum Job {
    Publish(Pending),
    /// A new life of the VM: its numbering starts again.
    Reset(VmName),
    /// The VM is gone: publish its last event and drop its cursor.
    Forget(Pending, oneshot::Sender<()>),
    Cursor(VmName, oneshot::Sender<Cursor>),
    /// Answered once everything queued before it is published.
    Flush(oneshot::Sender<()>),
}

/// Queues events for the publishing task.
#[derive(Clone)]
pub struct Publisher {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Publisher {
    /// Starts the task on `rt`; `history` is how many events the broker keeps.
    pub fn start(broker: Broker, history: usize, rt: &tokio::runtime::Handle) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        rt.spawn(run(broker, history, rx));
        Publisher { jobs }
    }

    pub fn publish(&self, ev: Pending) {
        let _ = self.jobs.send(Job::Publish(ev));
    }

    pub fn reset(&self, name: &VmName) {
        let _ = self.jobs.send(Job::Reset(name.clone()));
    }

    /// Publishes `last` and forgets the VM; returns once it is out (or the
    /// task is gone).
    pub async fn forget(&self, last: Pending) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Forget(last, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The VM's cursor as published (once the broker was read).
    pub async fn cursor(&self, name: &VmName) -> Cursor {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Cursor(name.clone(), tx)).is_err() {
            return Cursor::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Waits until what was queued before is published.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.jobs.send(Job::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

struct State {
    broker: Broker,
    history: usize,
    /// Without streams (Redis < 5.0) events are published, not kept.
    keep_history: bool,
    conn: Option<MultiplexedConnection>,
    cursors: HashMap<VmName, Cursor>,
    channel: String,
}

async fn run(broker: Broker, history: usize, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut st = State {
        broker,
        history,
        keep_history: history > 0,
        conn: None,
        cursors: HashMap::new(),
        channel: crate::api::events_channel(),
    };
    let mut backoff = Duration::from_millis(50);
    // Nothing is numbered before the cursors are known.
    loop {
        match st.load_cursors().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the event cursors; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    let mut queue: VecDeque<Job> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match rx.recv().await {
                Some(j) => queue.push_back(j),
                None => return,
            }
        }
        while let Ok(j) = rx.try_recv() {
            queue.push_back(j);
        }
        if queue.len() > QUEUE_MAX {
            let n = queue.len() - QUEUE_MAX;
            tracing::error!(
                dropped = n,
                "the broker has been away too long: dropping the oldest events"
            );
            queue.drain(..n);
        }
        match st.step(&mut queue).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, waiting = queue.len(), "cannot publish events; retrying");
                st.conn = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl State {
    async fn conn(&mut self) -> Result<&mut MultiplexedConnection, PublishError> {
        if self.conn.is_none() {
            self.conn = Some(self.broker.connect().await?);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    async fn load_cursors(&mut self) -> Result<(), PublishError> {
        let conn = self.conn().await?;
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(CURSORS_KEY)
            .query_async(conn)
            .await?;
        self.cursors = all
            .into_iter()
            .filter_map(|(k, v)| Some((VmName::new(&k).ok()?, Cursor::decode(&v)?)))
            .collect();
        Ok(())
    }

    /// Answers what needs no broker, then publishes one batch of events.
    /// The queue keeps what could not be published.
    async fn step(&mut self, queue: &mut VecDeque<Job>) -> Result<(), PublishError> {
        // Numbered on a copy: only what the broker took is committed.
        let mut cursors = HashMap::new();
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut taken = 0;
        let mut publishes = 0;
        for job in queue.iter() {
            if publishes >= BATCH {
                break;
            }
            match job {
                Job::Publish(ev) | Job::Forget(ev, _) => {
                    let mut c = *cursors
                        .get(&ev.name)
                        .or_else(|| self.cursors.get(&ev.name))
                        .unwrap_or(&Cursor::default());
                    c.seq += 1;
                    if let Some(s) = ev.shim_seq {
                        c.shim = s;
                    }
                    let payload = encode(ev, c.seq);
                    if self.keep_history {
                        pipe.cmd("XADD")
                            .arg(HISTORY_KEY)
                            .arg("MAXLEN")
                            .arg("~")
                            .arg(self.history)
                            .arg("*")
                            .arg(HISTORY_FIELD)
                            .arg(&payload)
                            .ignore();
                    }
                    pipe.cmd("PUBLISH")
                        .arg(&self.channel)
                        .arg(&payload)
                        .ignore();
                    if matches!(job, Job::Forget(..)) {
                        pipe.cmd("HDEL")
                            .arg(CURSORS_KEY)
                            .arg(ev.name.as_str())
                            .ignore();
                        c = Cursor::default();
                    } else {
                        pipe.cmd("HSET")
                            .arg(CURSORS_KEY)
                            .arg(ev.name.as_str())
                            .arg(c.encode())
                            .ignore();
                    }
                    cursors.insert(ev.name.clone(), c);
                    publishes += 1;
                }
                Job::Reset(name) => {
                    pipe.cmd("HDEL")
                        .arg(CURSORS_KEY)
                        .arg(name.as_str())
                        .ignore();
                    cursors.insert(name.clone(), Cursor::default());
                }
                // Answered below, in order: everything before them is in
                // this batch.
                Job::Cursor(..) | Job::Flush(_) => {}
            }
            taken += 1;
        }
        if !cursors.is_empty() {
            let history = self.keep_history;
            let conn = self.conn().await?;
            let sent: redis::RedisResult<()> = pipe.query_async(conn).await;
            if let Err(e) = sent {
                let text = e.to_string().to_ascii_lowercase();
                if history && text.contains("unknown command") {
                    tracing::warn!(error = %e, "the broker has no streams (Redis < 5.0): events are published without a history");
                    self.keep_history = false;
                }
                return Err(e.into());
            }
        }
        for (name, c) in cursors {
            if c == Cursor::default() {
                self.cursors.remove(&name);
            } else {
                self.cursors.insert(name, c);
            }
        }
        for job in queue.drain(..taken) {
            match job {
                Job::Forget(_, done) | Job::Flush(done) => {
                    let _ = done.send(());
                }
                Job::Cursor(name, tx) => {
                    let _ = tx.send(self.cursors.get(&name).copied().unwrap_or_default());
                }
                Job::Publish(_) | Job::Reset(_) => {}
            }
        }
        Ok(())
    }
}

fn encode(ev: &Pending, seq: u64) -> Vec<u8> {
    let e = VmEvent {
        name: ev.name.to_string(),
        event: ev.kind.as_str().to_owned(),
        seq,
        at: ev.at_secs,
        reason: ev.reason.clone().unwrap_or_default(),
    };
    // Our own type of strings and integers: encoding cannot fail; if it
    // ever did, nil decodes into a Go subscriber's zero value, not a panic.
    codec::encode(&e).unwrap_or_else(|_| vec![0xc0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c = Cursor { seq: 7, shim: 5 };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("7"), None);
        assert_eq!(Cursor::decode("x 1"), None);
    }
}
