//! The worker's progress, persisted: where it is in the console stream (so a
//! restarted worker resumes without loss or repeats) and what it did.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Absolute console offset up to which everything was sent.
    pub pos: u64,
    /// Console bytes sent (before compression).
    pub sent_bytes: u64,
    /// Console bytes lost: rotated away while the receiver was unreachable.
    pub dropped_bytes: u64,
    /// Console bytes PUBLISHed while no subscriber listened (Redis only: a
    /// WebSocket receiver acknowledges nothing, so its losses cannot be seen).
    #[serde(default)]
    pub unheard_bytes: u64,
    pub connected: bool,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Progress {
    pub fn load(path: &Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default())?;
        std::fs::rename(&tmp, path)
    }
}
