//! The shim's control socket (`<run dir>/shim.sock`, mode 0600): one
//! command line per connection, one reply line.
//!
//! * `stop` — stop the VM gracefully (power button, grace period, force);
//!   the reply `stopped` comes once the VMM is gone. The shim then stays idle
//!   and starts nothing until zinit stops it. This is how vmd drives the
//!   graceful part before asking zinit to stop the service, whatever zinit
//!   does on `stop` (v0.2.14 signals; later versions SIGKILL 500 ms after).
//! * `status` — the shim's state, as JSON.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the shim at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("shim i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the shim did not answer `{0}` within {1:?}")]
    Timeout(String, Duration),
    #[error("the shim refused `{0}`: {1}")]
    Refused(String, String),
}

/// Sends `command` and returns the reply line.
pub async fn request(
    socket: &Path,
    command: &str,
    timeout: Duration,
) -> Result<String, ControlError> {
    let run = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| ControlError::Connect(socket.display().to_string(), e))?;
        s.write_all(format!("{command}\n").as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        let line = line.trim_end().to_owned();
        match line.strip_prefix("error: ") {
            Some(e) => Err(ControlError::Refused(command.to_owned(), e.to_owned())),
            None => Ok(line),
        }
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| ControlError::Timeout(command.to_owned(), timeout))?
}
