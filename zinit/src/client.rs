//! Client of zinit's control socket (the v0.2.x line protocol).
//!
//! One command per connection: write `<command>\n`, read one JSON object
//! `{"state":"ok"|"error","body":...}` until the server closes. Every call is
//! bounded by a timeout; zinit's error texts become typed errors.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{sleep, timeout, Instant};

use crate::name::ServiceName;
use crate::state::{State, Target};

#[derive(Debug, thiserror::Error)]
pub enum ZinitError {
    #[error("cannot connect to zinit at {socket}: {source} (is zinit running?)")]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("zinit did not answer `{command}` within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("talking to zinit: {0}")]
    Io(#[from] io::Error),
    #[error("zinit sent an unreadable reply to `{command}`: {why}")]
    BadReply { command: String, why: String },
    #[error("zinit does not know service {0}")]
    UnknownService(String),
    #[error("zinit already monitors service {0}")]
    AlreadyMonitored(String),
    #[error("service {0} is up")]
    IsUp(String),
    #[error("service {0} is down")]
    IsDown(String),
    #[error("zinit is shutting down")]
    ShuttingDown,
    /// The process zinit signalled was already gone (it died, zinit has not
    /// noticed yet). After `stop` the target is down all the same.
    #[error("service {0}: its process is already gone")]
    NoSuchProcess(String),
    #[error("zinit cannot load the service file of {0}")]
    ConfigLoad(String),
    #[error("zinit: {0}")]
    Other(String),
    #[error("service {service} still has a process {waited:?} after stop and SIGKILL")]
    StopTimeout { service: String, waited: Duration },
}

impl ZinitError {
    /// Maps zinit's error text (see `shared/spec/zinit.md`) to a variant.
    fn from_message(msg: String, service: Option<&str>) -> Self {
        let quoted = |m: &str, pre: &str, post: &str| -> Option<String> {
            let inner = m.strip_prefix(pre)?.strip_suffix(post)?;
            serde_json::from_str::<String>(inner).ok()
        };
        if let Some(n) = quoted(&msg, "service name ", " unknown") {
            return ZinitError::UnknownService(n);
        }
        if let Some(n) = quoted(&msg, "service ", " already monitored") {
            return ZinitError::AlreadyMonitored(n);
        }
        if let Some(n) = quoted(&msg, "service ", " is up") {
            return ZinitError::IsUp(n);
        }
        if let Some(n) = quoted(&msg, "service ", " is down") {
            return ZinitError::IsDown(n);
        }
        if msg == "zinit is shutting down" {
            return ZinitError::ShuttingDown;
        }
        // zinit signals the pid it last knew; nix reports a dead one as
        // "ESRCH: No such process".
        if msg.starts_with("ESRCH") {
            return ZinitError::NoSuchProcess(service.unwrap_or_default().to_owned());
        }
        if msg.starts_with("failed to load service config") {
            return ZinitError::ConfigLoad(service.unwrap_or_default().to_owned());
        }
        ZinitError::Other(msg)
    }
}

/// What `status <svc>` answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    pub name: String,
    /// 0 when no process runs.
    pub pid: u32,
    pub state: State,
    pub target: Target,
    #[serde(default)]
    pub after: BTreeMap<String, State>,
}

#[derive(Deserialize)]
struct Reply {
    state: String,
    body: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

/// How often `stop_and_wait` looks at the service.
const POLL: Duration = Duration::from_millis(50);
/// How long the process group gets to die after SIGKILL.
const AFTER_KILL: Duration = Duration::from_secs(5);

impl Client {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Deadline of each call (connect, write, read).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn exchange(&self, command: &str) -> Result<Vec<u8>, ZinitError> {
        let run = async {
            let mut s =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ZinitError::Connect {
                        socket: self.socket.clone(),
                        source,
                    })?;
            s.write_all(command.as_bytes()).await?;
            s.write_all(b"\n").await?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).await?;
            Ok(out)
        };
        timeout(self.timeout, run)
            .await
            .map_err(|_| ZinitError::Timeout {
                command: command.to_owned(),
                timeout: self.timeout,
            })?
    }

    async fn command(
        &self,
        words: &[&str],
        service: Option<&str>,
    ) -> Result<serde_json::Value, ZinitError> {
        // Names are plain words by construction; quoting still keeps any
        // other argument one word through zinit's shell-word split.
        let command = shlex::try_join(words.iter().copied()).map_err(|_| ZinitError::BadReply {
            command: words.join(" "),
            why: "argument holds a NUL byte".into(),
        })?;
        let bytes = self.exchange(&command).await?;
        let bad = |why: String| ZinitError::BadReply {
            command: command.clone(),
            why,
        };
        let reply: Reply = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        match reply.state.as_str() {
            "ok" => Ok(reply.body),
            "error" => {
                let msg = match reply.body {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                Err(ZinitError::from_message(msg, service))
            }
            other => Err(bad(format!("unknown state {other:?}"))),
        }
    }

    async fn unit(&self, verb: &str, name: &ServiceName) -> Result<(), ZinitError> {
        self.command(&[verb, name.as_str()], Some(name.as_str()))
            .await
            .map(drop)
    }

    /// Every service zinit monitors, with its state.
    pub async fn list(&self) -> Result<BTreeMap<String, State>, ZinitError> {
        let body = self.command(&["list"], None).await?;
        serde_json::from_value(body).map_err(|e| ZinitError::BadReply {
            command: "list".into(),
            why: e.to_string(),
        })
    }

    pub async fn status(&self, name: &ServiceName) -> Result<Status, ZinitError> {
        let body = self
            .command(&["status", name.as_str()], Some(name.as_str()))
            .await?;
        serde_json::from_value(body).map_err(|e| ZinitError::BadReply {
            command: format!("status {name}"),
            why: e.to_string(),
        })
    }

    /// Loads `<name>.yaml` from zinit's config dir and starts managing it.
    pub async fn monitor(&self, name: &ServiceName) -> Result<(), ZinitError> {
        self.unit("monitor", name).await
    }

    pub async fn start(&self, name: &ServiceName) -> Result<(), ZinitError> {
        self.unit("start", name).await
    }

    /// Target down, stop signal to the process group. Does not wait.
    pub async fn stop(&self, name: &ServiceName) -> Result<(), ZinitError> {
        self.unit("stop", name).await
    }

    /// Drops a stopped service (target down, no process).
    pub async fn forget(&self, name: &ServiceName) -> Result<(), ZinitError> {
        self.unit("forget", name).await
    }

    /// Signals the process group; the target stays up, so zinit respawns.
    pub async fn kill(&self, name: &ServiceName, signal: Signal) -> Result<(), ZinitError> {
        self.command(
            &["kill", name.as_str(), signal.as_str()],
            Some(name.as_str()),
        )
        .await
        .map(drop)
    }

    /// The whole log ring as it is now.
    pub async fn log_snapshot(&self) -> Result<Vec<String>, ZinitError> {
        let bytes = self.exchange("log snapshot").await?;
        let text = String::from_utf8_lossy(&bytes);
        Ok(text.lines().map(str::to_owned).collect())
    }

    /// The ring lines of one service (`[+] name: ...` / `[-] name: ...`),
    /// filtered as `zinit log <name>` does.
    pub async fn service_log(&self, name: &ServiceName) -> Result<Vec<String>, ZinitError> {
        let prefix = format!("{name}:");
        Ok(self
            .log_snapshot()
            .await?
            .into_iter()
            .filter(|l| l.get(4..).is_some_and(|rest| rest.starts_with(&prefix)))
            .collect())
    }

    /// Stops `name` and waits until its process is gone, sending SIGKILL to
    /// the group once `grace` has passed. An unknown service is already stopped.
    pub async fn stop_and_wait(
        &self,
        name: &ServiceName,
        grace: Duration,
    ) -> Result<(), ZinitError> {
        match self.stop(name).await {
            // zinit set the target down before signalling a process that
            // had already died: wait for zinit to notice, as after a stop.
            Ok(()) | Err(ZinitError::NoSuchProcess(_)) => {}
            Err(ZinitError::UnknownService(_)) => return Ok(()),
            Err(e) => return Err(e),
        }
        if self.wait_gone(name, grace).await? {
            return Ok(());
        }
        tracing::warn!(service = %name, ?grace, "did not stop in time; sending SIGKILL");
        match self.kill(name, Signal::SIGKILL).await {
            Ok(())
            | Err(ZinitError::IsDown(_))
            | Err(ZinitError::NoSuchProcess(_))
            | Err(ZinitError::UnknownService(_)) => {}
            Err(e) => return Err(e),
        }
        if self.wait_gone(name, AFTER_KILL).await? {
            return Ok(());
        }
        Err(ZinitError::StopTimeout {
            service: name.to_string(),
            waited: grace + AFTER_KILL,
        })
    }

    /// `true` once zinit reports no process for `name` (or forgot it).
    async fn wait_gone(&self, name: &ServiceName, limit: Duration) -> Result<bool, ZinitError> {
        let deadline = Instant::now() + limit;
        loop {
            match self.status(name).await {
                Ok(st) if st.pid == 0 => return Ok(true),
                Ok(_) => {}
                Err(ZinitError::UnknownService(_)) => return Ok(true),
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            sleep(POLL).await;
        }
    }

    /// Stops (as [`Client::stop_and_wait`]) and forgets `name`. Removing an
    /// unknown service succeeds, so this is safe to repeat after a crash.
    pub async fn remove(&self, name: &ServiceName, grace: Duration) -> Result<(), ZinitError> {
        self.stop_and_wait(name, grace).await?;
        match self.forget(name).await {
            Ok(()) | Err(ZinitError::UnknownService(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_zinit_error_texts() {
        let m = |s: &str| ZinitError::from_message(s.into(), Some("svc"));
        assert!(
            matches!(m(r#"service name "vm:a" unknown"#), ZinitError::UnknownService(n) if n == "vm:a")
        );
        assert!(
            matches!(m(r#"service "a" already monitored"#), ZinitError::AlreadyMonitored(n) if n == "a")
        );
        assert!(matches!(m(r#"service "a" is up"#), ZinitError::IsUp(_)));
        assert!(matches!(m(r#"service "a" is down"#), ZinitError::IsDown(_)));
        assert!(matches!(
            m("zinit is shutting down"),
            ZinitError::ShuttingDown
        ));
        assert!(matches!(m("ESRCH: No such process"), ZinitError::NoSuchProcess(n) if n == "svc"));
        assert!(
            matches!(m("failed to load service config"), ZinitError::ConfigLoad(n) if n == "svc")
        );
        assert!(matches!(
            m("unknown command 'x' or wrong arguments count"),
            ZinitError::Other(_)
        ));
    }
}
