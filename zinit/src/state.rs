//! Service states and targets as zinit prints them (Rust `Debug` style).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a service process ended, from zinit's `Error(<wait status>)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitStatus {
    /// `Exited(Pid(123), 1)`
    Exited { pid: i32, code: i32 },
    /// `Signaled(Pid(123), SIGKILL, false)`
    Signaled {
        pid: i32,
        signal: String,
        core_dumped: bool,
    },
    /// Anything else zinit may print, kept verbatim.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Unknown,
    /// Waiting for services in `after`.
    Blocked,
    /// Started; its `test` has not passed yet.
    Spawned,
    /// Started and its `test` passed (or there is none); for a oneshot,
    /// started and not yet exited.
    Running,
    /// Exited 0.
    Success,
    /// Exited otherwise; respawned 2 s later unless it is a oneshot or stopped.
    Error(WaitStatus),
    TestFailure,
    /// Could not be spawned at all (bad command, missing program).
    Failure,
    /// A state this client does not know, kept verbatim.
    Other(String),
}

impl State {
    /// Whether a process of the service may exist.
    pub fn is_alive(&self) -> bool {
        matches!(self, State::Spawned | State::Running)
    }
}

fn parse_wait_status(s: &str) -> WaitStatus {
    let other = || WaitStatus::Other(s.to_owned());
    let pid_of = |p: &str| {
        p.trim()
            .strip_prefix("Pid(")
            .and_then(|p| p.strip_suffix(')'))
            .and_then(|p| p.parse::<i32>().ok())
    };
    if let Some(inner) = s.strip_prefix("Exited(").and_then(|r| r.strip_suffix(')')) {
        if let Some((pid, code)) = inner.rsplit_once(',') {
            if let (Some(pid), Ok(code)) = (pid_of(pid), code.trim().parse()) {
                return WaitStatus::Exited { pid, code };
            }
        }
        return other();
    }
    if let Some(inner) = s
        .strip_prefix("Signaled(")
        .and_then(|r| r.strip_suffix(')'))
    {
        let parts: Vec<&str> = inner.rsplitn(3, ',').collect();
        if let [core, signal, pid] = parts[..] {
            if let (Some(pid), Ok(core_dumped)) = (pid_of(pid), core.trim().parse()) {
                return WaitStatus::Signaled {
                    pid,
                    signal: signal.trim().to_owned(),
                    core_dumped,
                };
            }
        }
    }
    other()
}

impl FromStr for State {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "Unknown" => State::Unknown,
            "Blocked" => State::Blocked,
            "Spawned" => State::Spawned,
            "Running" => State::Running,
            "Success" => State::Success,
            "TestFailure" => State::TestFailure,
            "Failure" => State::Failure,
            _ => match s.strip_prefix("Error(").and_then(|r| r.strip_suffix(')')) {
                Some(inner) => State::Error(parse_wait_status(inner)),
                None => State::Other(s.to_owned()),
            },
        })
    }
}

impl fmt::Display for WaitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitStatus::Exited { pid, code } => write!(f, "Exited(Pid({pid}), {code})"),
            WaitStatus::Signaled {
                pid,
                signal,
                core_dumped,
            } => write!(f, "Signaled(Pid({pid}), {signal}, {core_dumped})"),
            WaitStatus::Other(s) => f.write_str(s),
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Unknown => f.write_str("Unknown"),
            State::Blocked => f.write_str("Blocked"),
            State::Spawned => f.write_str("Spawned"),
            State::Running => f.write_str("Running"),
            State::Success => f.write_str("Success"),
            State::Error(w) => write!(f, "Error({w})"),
            State::TestFailure => f.write_str("TestFailure"),
            State::Failure => f.write_str("Failure"),
            State::Other(s) => f.write_str(s),
        }
    }
}

impl Serialize for State {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.parse().unwrap_or(State::Unknown))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Up,
    Down,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_zinit_states() {
        let cases = [
            ("Running", State::Running),
            ("Spawned", State::Spawned),
            (
                "Error(Exited(Pid(123), 1))",
                State::Error(WaitStatus::Exited { pid: 123, code: 1 }),
            ),
            (
                "Error(Signaled(Pid(77), SIGKILL, false))",
                State::Error(WaitStatus::Signaled {
                    pid: 77,
                    signal: "SIGKILL".into(),
                    core_dumped: false,
                }),
            ),
            (
                "Error(Stopped(Pid(1), SIGSTOP))",
                State::Error(WaitStatus::Other("Stopped(Pid(1), SIGSTOP)".into())),
            ),
            ("Weird", State::Other("Weird".into())),
        ];
        for (text, state) in cases {
            let parsed: State = text.parse().unwrap();
            assert_eq!(parsed, state, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }
}
