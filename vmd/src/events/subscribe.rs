//! Reading the events back: the history the broker keeps, then the live
//! channel, without a gap between the two and without a repeat — what
//! `vmd ctl events` prints, like `virsh event --loop` or `incus monitor`.

use std::collections::{HashMap, VecDeque};

use futures_util::StreamExt;

use crate::api::{events_channel, VmEvent};
use crate::zbus::broker::{Broker, BrokerError};
use crate::zbus::codec;

use super::publisher::{HISTORY_FIELD, HISTORY_KEY};

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot subscribe to {channel}: {source}")]
    Subscribe {
        channel: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("cannot read the event history: {0}")]
    History(#[source] redis::RedisError),
}

/// Which events.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// One VM's, or every VM's.
    pub name: Option<String>,
    /// Only those after this `Seq` of their VM.
    pub since: u64,
}

impl Filter {
    fn wants(&self, e: &VmEvent) -> bool {
        self.name.as_deref().is_none_or(|n| n == e.name) && e.seq > self.since
    }
}

/// The history, then (when following) every event as it is published.
pub struct Subscription {
    replay: VecDeque<VmEvent>,
    live: Option<std::pin::Pin<Box<dyn futures_util::Stream<Item = redis::Msg> + Send>>>,
    /// The last `Seq` given out per VM: what the live channel repeats of the
    /// history is skipped.
    last: HashMap<String, u64>,
    filter: Filter,
}

impl Subscription {
    pub async fn start(
        broker: &Broker,
        filter: Filter,
        follow: bool,
    ) -> Result<Self, SubscribeError> {
        // Subscribed before the history is read: what is published in
        // between is in both, and given out once.
        let live = if follow {
            let channel = events_channel();
            let mut ps = broker.pubsub().await?;
            ps.subscribe(&channel)
                .await
                .map_err(|source| SubscribeError::Subscribe { channel, source })?;
            Some(Box::pin(ps.into_on_message()) as _)
        } else {
            None
        };
        let mut conn = broker.connect().await?;
        let entries: redis::streams::StreamRangeReply = match redis::cmd("XRANGE")
            .arg(HISTORY_KEY)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
        {
            Ok(r) => r,
            // No streams (Redis < 5.0): no history, only what comes.
            Err(e)
                if e.to_string()
                    .to_ascii_lowercase()
                    .contains("unknown command") =>
            {
                Default::default()
            }
            Err(e) => return Err(SubscribeError::History(e)),
        };
        let replay = entries
            .ids
            .iter()
            .filter_map(|id| match id.map.get(HISTORY_FIELD) {
                Some(redis::Value::BulkString(b)) => codec::decode::<VmEvent>(b.as_slice()).ok(),
                _ => None,
            })
            .filter(|e| filter.wants(e))
            .collect();
        Ok(Subscription {
            replay,
            live,
            last: HashMap::new(),
            filter,
        })
    }

    /// The next event; `None` at the end of the history when not following,
    /// or when the broker went away.
    pub async fn next(&mut self) -> Option<VmEvent> {
        loop {
            let e = match self.replay.pop_front() {
                Some(e) => e,
                None => {
                    let msg = self.live.as_mut()?.next().await?;
                    match codec::decode::<VmEvent>(msg.get_payload_bytes()) {
                        Ok(e) if self.filter.wants(&e) => e,
                        _ => continue,
                    }
                }
            };
            // A new life numbers from 1 again (`created`).
            let seen = if e.seq == 1 {
                0
            } else {
                self.last.get(&e.name).copied().unwrap_or(0)
            };
            if e.seq <= seen {
                continue;
            }
            self.last.insert(e.name.clone(), e.seq);
            return Some(e);
        }
    }
}
