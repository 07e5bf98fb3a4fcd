//! vmd-logstream: one worker per log stream, shipping a VM's console log to
//! a receiver.
//!
//! * [`output`] — the output URLs receivers accept;
//! * [`follow`] — following the rotated console log in absolute offsets;
//! * [`sink`] — Redis PUBLISH, WebSocket binary messages, stdout;
//! * [`progress`] — what the worker persists and reports.

pub mod follow;
pub mod output;
pub mod progress;
pub mod sink;

/// gzip, one complete member per chunk (what receivers gunzip one by one).
pub fn gzip(chunk: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(
        Vec::with_capacity(chunk.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    let _ = e.write_all(chunk);
    e.finish().unwrap_or_default()
}
