//! The log ring shared by all services, with followers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

#[derive(Clone)]
pub struct Ring {
    lines: Arc<Mutex<VecDeque<Arc<String>>>>,
    cap: usize,
    tx: broadcast::Sender<Arc<String>>,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        let (tx, _) = broadcast::channel(100);
        Ring {
            lines: Arc::new(Mutex::new(VecDeque::with_capacity(cap))),
            cap: cap.max(1),
            tx,
        }
    }

    pub fn push(&self, line: String) {
        let line = Arc::new(line);
        {
            let mut l = self.lines.lock().unwrap();
            if l.len() == self.cap {
                l.pop_front();
            }
            l.push_back(Arc::clone(&line));
        }
        let _ = self.tx.send(line);
    }

    /// The lines now in the ring, and (if `follow`) every later one.
    pub fn stream(&self) -> (Vec<Arc<String>>, broadcast::Receiver<Arc<String>>) {
        let l = self.lines.lock().unwrap();
        (l.iter().cloned().collect(), self.tx.subscribe())
    }
}
