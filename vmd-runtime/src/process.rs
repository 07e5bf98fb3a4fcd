//! What every vmd binary run by zinit does at start.

use std::io::Write;

/// One lifecycle line on stdout, flushed at once: zinit keeps a process's
/// stdout in its ring (`zinit log <service>`), which is where operators look.
pub fn say(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", msg.as_ref());
    let _ = out.flush();
}

/// A single-threaded runtime: the shim and the stream worker wait on a few
/// fds each, and one thread keeps their memory small (and the VMM's death
/// signal tied to the thread that forks it). The error's text is the line
/// to print.
pub fn current_thread_runtime() -> Result<tokio::runtime::Runtime, RuntimeError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RuntimeError)
}

/// The runtime could not be built (out of fds or memory, typically).
#[derive(Debug, thiserror::Error)]
#[error("cannot start: {0}")]
pub struct RuntimeError(#[source] pub std::io::Error);
