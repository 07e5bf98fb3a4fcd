//! The shim's control socket ([`crate::RunDir::control_socket`], mode 0600):
//! one command line per connection, one reply line. Both sides are here.
//!
//! * `stop` — stop the VM gracefully (power button, grace period, force);
//!   the reply `stopped` comes once the VMM is gone. The shim then stays idle
//!   and starts nothing until zinit stops it. This is how vmd drives the
//!   graceful part before asking zinit to stop the service, whatever zinit
//!   does on `stop` (v0.2.14 signals; later versions SIGKILL 500 ms after).
//! * `status` — the shim's state ([`ShimState`], JSON; also in `state.json`,
//!   which is what vmd reads).
//! * `lock` — make the VMM match the lock mark vmd keeps in the run
//!   directory: pause it when marked, resume it when not ([`LockReply`]).
//! * `watch <seq>` — the state, then every event after `<seq>` the shim
//!   retained, then each new one as it happens, one [`WatchLine`] per line,
//!   for as long as the connection stays open ([`crate::events`]).
//!
//! vmd never talks to a VMM itself: the shim is its only owner.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::events::WatchLine;
use crate::layout::RunDir;
use crate::unix::{exchange, ExchangeError};
use crate::vmm::VmState;

/// How long the shim waits for a command line once connected.
const READ_COMMAND: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Stop,
    Status,
    Lock,
    /// Events after this sequence number, then live.
    Watch(u64),
    /// A failed VM: start over, with a new restart window.
    Retry,
}

impl Command {
    pub fn word(self) -> &'static str {
        match self {
            Command::Stop => "stop",
            Command::Status => "status",
            Command::Lock => "lock",
            Command::Watch(_) => "watch",
            Command::Retry => "retry",
        }
    }

    /// The command line, without its newline.
    pub fn line(self) -> String {
        match self {
            Command::Watch(since) => format!("watch {since}"),
            c => c.word().to_owned(),
        }
    }

    pub fn parse(line: &str) -> Option<Command> {
        let mut words = line.split(' ');
        let c = match words.next()? {
            "stop" => Command::Stop,
            "status" => Command::Status,
            "lock" => Command::Lock,
            "watch" => Command::Watch(words.next()?.parse().ok()?),
            "retry" => Command::Retry,
            _ => return None,
        };
        words.next().is_none().then_some(c)
    }
}

/// The reply to `stop`.
pub const STOPPED: &str = "stopped";

/// The reply to `retry`: the shim exits, and zinit starts a new one, which
/// starts the VM again.
pub const RETRYING: &str = "retrying";

/// The reply to `lock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockReply {
    /// The VMM is now in this state (`Paused` when locked, else `Running`).
    Applied(VmState),
    /// No VMM runs a booted VM: the mark applies when one does.
    NotRunning(String),
    /// The VMM refused the pause or resume.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the shim at {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("shim i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the shim did not answer `{0}` within {1:?}")]
    Timeout(String, Duration),
    #[error("the shim refused `{0}`: {1}")]
    Refused(String, String),
    #[error("the shim answered `{0}` with {1:?}")]
    BadReply(String, String),
}

/// Sends `command` and returns the reply line (`error: …` replies are
/// [`ControlError::Refused`]).
pub async fn request(
    socket: &Path,
    command: &str,
    timeout: Duration,
) -> Result<String, ControlError> {
    let line = exchange(
        socket,
        format!("{command}\n").as_bytes(),
        timeout,
        |s| async {
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).await?;
            Ok::<_, ControlError>(line)
        },
    )
    .await?;
    let line = line.trim_end();
    match line.strip_prefix("error: ") {
        Some(e) => Err(ControlError::Refused(command.to_owned(), e.to_owned())),
        None => Ok(line.to_owned()),
    }
}

impl ExchangeError for ControlError {
    fn connect(socket: String, e: std::io::Error) -> Self {
        ControlError::Connect(socket, e)
    }
    fn timeout(request: &[u8], timeout: Duration) -> Self {
        let command = String::from_utf8_lossy(request).trim_end().to_owned();
        ControlError::Timeout(command, timeout)
    }
}

/// vmd's side: the shim of one VM.
#[derive(Debug, Clone)]
pub struct ShimClient {
    socket: PathBuf,
}

impl ShimClient {
    pub fn new(run: &RunDir) -> Self {
        ShimClient {
            socket: run.control_socket(),
        }
    }

    /// Whether a shim ever listened here (it may be restarting).
    pub fn exists(&self) -> bool {
        self.socket.exists()
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        &self,
        command: Command,
        timeout: Duration,
    ) -> Result<T, ControlError> {
        let line = request(&self.socket, &command.line(), timeout).await?;
        serde_json::from_str(&line).map_err(|_| ControlError::BadReply(command.line(), line))
    }

    /// Stops the VM gracefully; returns once its VMM is gone.
    pub async fn stop(&self, timeout: Duration) -> Result<(), ControlError> {
        let line = request(&self.socket, &Command::Stop.line(), timeout).await?;
        if line != STOPPED {
            return Err(ControlError::BadReply("stop".into(), line));
        }
        Ok(())
    }

    /// Starts a failed VM over (refused when it has not failed).
    pub async fn retry(&self, timeout: Duration) -> Result<(), ControlError> {
        let line = request(&self.socket, &Command::Retry.line(), timeout).await?;
        if line != RETRYING {
            return Err(ControlError::BadReply("retry".into(), line));
        }
        Ok(())
    }

    /// Applies the lock mark to the running VMM.
    pub async fn lock(&self, timeout: Duration) -> Result<LockReply, ControlError> {
        self.json(Command::Lock, timeout).await
    }

    /// Watches the VM: connects within `timeout`, then yields lines for as
    /// long as the shim lives.
    pub async fn watch(&self, since: u64, timeout: Duration) -> Result<Watch, ControlError> {
        let command = Command::Watch(since).line();
        let connect = async {
            let mut s = UnixStream::connect(&self.socket)
                .await
                .map_err(|e| ControlError::Connect(self.socket.display().to_string(), e))?;
            s.write_all(format!("{command}\n").as_bytes()).await?;
            Ok::<_, ControlError>(s)
        };
        let s = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| ControlError::Timeout(command.clone(), timeout))??;
        Ok(Watch {
            lines: BufReader::new(s),
            line: String::new(),
        })
    }
}

/// The shim's answer to `watch`, line by line.
pub struct Watch {
    lines: BufReader<UnixStream>,
    line: String,
}

impl Watch {
    /// The next line; `None` once the shim closed the connection (it exited,
    /// or the watcher fell too far behind and has to resume).
    pub async fn next(&mut self) -> Result<Option<WatchLine>, ControlError> {
        self.line.clear();
        if self.lines.read_line(&mut self.line).await? == 0 {
            return Ok(None);
        }
        let line = self.line.trim_end();
        if let Some(e) = line.strip_prefix("error: ") {
            return Err(ControlError::Refused("watch".into(), e.to_owned()));
        }
        serde_json::from_str(line)
            .map(Some)
            .map_err(|_| ControlError::BadReply("watch".into(), line.to_owned()))
    }
}

/// The shim's side: reads one command from `stream`. Unknown commands are
/// answered here; silent clients get nothing.
pub async fn read_command(stream: UnixStream) -> Option<(Command, UnixStream)> {
    let mut s = BufReader::new(stream);
    let mut line = String::new();
    match tokio::time::timeout(READ_COMMAND, s.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 => {}
        _ => return None,
    }
    // Nothing follows a command: the buffer holds no byte of the client's.
    let mut stream = s.into_inner();
    match Command::parse(line.trim_end_matches(['\n', '\r'])) {
        Some(c) => Some((c, stream)),
        None => {
            let reply = error_reply(format!("unknown command {:?}", line.trim()));
            let _ = stream.write_all(format!("{reply}\n").as_bytes()).await;
            None
        }
    }
}

/// Writes one reply line.
pub async fn reply(stream: &mut UnixStream, line: &str) -> std::io::Result<()> {
    stream.write_all(format!("{line}\n").as_bytes()).await
}

/// A line of the `watch` answer.
pub fn watch_line(line: &WatchLine) -> String {
    json_reply(line)
}

/// The shim's side of a one-line command: answers with what `handle` returns.
pub async fn serve<F, Fut>(command: Command, mut stream: UnixStream, handle: F)
where
    F: FnOnce(Command) -> Fut,
    Fut: Future<Output = String>,
{
    let line = handle(command).await;
    let _ = reply(&mut stream, &line).await;
}

/// A reply line carrying a value.
pub fn json_reply<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| error_reply(e.to_string()))
}

/// A reply line refusing the command.
pub fn error_reply(message: impl std::fmt::Display) -> String {
    // One line: the protocol is line-based.
    format!("error: {}", message.to_string().replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ShimState;

    #[test]
    fn replies_round_trip() {
        for r in [
            LockReply::Applied(VmState::Paused),
            LockReply::NotRunning("no VMM".into()),
            LockReply::Failed("VM is not running".into()),
        ] {
            let line = json_reply(&r);
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<LockReply>(&line).unwrap(), r);
        }
        let mut st = ShimState::new();
        st.vm = Some(VmState::Paused);
        let back: ShimState = serde_json::from_str(&json_reply(&st)).unwrap();
        assert_eq!(back, st);
        for c in [
            Command::Stop,
            Command::Status,
            Command::Lock,
            Command::Watch(0),
            Command::Watch(u64::MAX),
            Command::Retry,
        ] {
            assert_eq!(Command::parse(&c.line()), Some(c));
        }
        for bad in ["reboot", "watch", "watch -1", "watch 1 2", "stop now", ""] {
            assert_eq!(Command::parse(bad), None, "{bad:?}");
        }
    }
}
