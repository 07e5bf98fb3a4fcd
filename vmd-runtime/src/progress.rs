//! A stream worker's progress (`<runtime>/streams/<id>.progress`), written by
//! the worker and read by vmd for `Inspect`: where it is in the console stream (so a
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
    /// Console bytes the receiver refused for good (Loki's 400: lines too
    /// old or too long for its limits): dropped, and counted here.
    #[serde(default)]
    pub rejected_bytes: u64,
    pub connected: bool,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Progress {
    pub fn load(path: &Path) -> Option<Self> {
        crate::files::read_json(path)
    }

    /// Durably: a position saved is a position resumed from.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        self.save_for(path, None)
    }

    /// [`Progress::save`] for a worker that runs as `uid` (vmd, as root,
    /// records where a new stream starts): a file of root's, 0600, is one
    /// the worker cannot read, and it would start at a later tail instead.
    pub fn save_for(&self, path: &Path, uid: Option<u32>) -> std::io::Result<()> {
        let data = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        crate::files::write_atomic_as(path, &data, 0o600, uid)
    }
}
