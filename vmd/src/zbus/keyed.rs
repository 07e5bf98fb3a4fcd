//! Per-key mutual exclusion: calls that change the same VM run one at a time,
//! calls on different VMs run concurrently.
//!
//! Guards are owned (`'static`), so whoever takes a key can hand it to a task:
//! start-up reconciliation takes the keys of the VMs it must finish before
//! vmd serves the bus, and releases each when that VM is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
pub struct KeyedLocks {
    // Entries live only while someone holds or waits for the key, so the map
    // stays as small as the number of VMs with a call in flight.
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct KeyGuard {
    locks: Arc<KeyedLocks>,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    fn entry(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(key.to_owned()).or_default())
    }

    /// Waits for `key`.
    pub async fn lock(self: &Arc<Self>, key: String) -> KeyGuard {
        let guard = self.entry(&key).lock_owned().await;
        KeyGuard {
            locks: Arc::clone(self),
            key,
            guard: Some(guard),
        }
    }

    /// Takes `key` if nobody holds it.
    pub fn try_lock(self: &Arc<Self>, key: String) -> Option<KeyGuard> {
        let entry = self.entry(&key);
        let guard = entry.try_lock_owned().ok();
        // Built even on failure, so that Drop removes the entry we added.
        let k = KeyGuard {
            locks: Arc::clone(self),
            key,
            guard,
        };
        k.guard.is_some().then_some(k)
    }

    /// Takes every key of `keys`, in sorted order: two callers sharing keys
    /// cannot each hold one the other waits for.
    pub async fn lock_all(self: &Arc<Self>, mut keys: Vec<String>) -> Vec<KeyGuard> {
        keys.sort();
        keys.dedup();
        let mut held = Vec::with_capacity(keys.len());
        for k in keys {
            held.push(self.lock(k).await);
        }
        held
    }

    /// How many keys have a holder or waiter (for tests and status).
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let mut map = self
            .locks
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drop(self.guard.take());
        // Under the map lock nobody can clone the entry, so a count of one
        // (the map's own) means no one else holds or waits for this key.
        if map
            .get(&self.key)
            .is_some_and(|e| Arc::strong_count(e) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn same_key_is_exclusive_other_keys_are_not() {
        let locks = Arc::new(KeyedLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (locks, inside, max) = (locks.clone(), inside.clone(), max.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(format!("k{}", i % 2)).await;
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Two keys: at most two holders at once, and at least once both.
        assert_eq!(max.load(Ordering::SeqCst), 2);
        assert!(locks.is_empty(), "entries must not outlive their holders");
    }

    #[tokio::test]
    async fn try_lock_fails_while_held_and_leaves_no_entry() {
        let locks = Arc::new(KeyedLocks::default());
        let held = locks.try_lock("a".into()).expect("free key");
        assert!(locks.try_lock("a".into()).is_none());
        assert!(locks.try_lock("b".into()).is_some());
        // The waiter gets the key when the holder lets go, in a task.
        let l = Arc::clone(&locks);
        let waiter = tokio::spawn(async move { drop(l.lock("a".into()).await) });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        waiter.await.unwrap();
        assert!(locks.is_empty());
    }
}
