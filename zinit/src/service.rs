//! The service file: one YAML document per service in zinit's config dir.
//!
//! Built as typed values and serialised by a YAML library — never by pasting
//! strings — so hostile values (quotes, newlines, `#`, `: `) stay values.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use nix::sys::signal::Signal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::name::ServiceName;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("a command needs at least a program")]
    EmptyCommand,
    #[error("a command line cannot hold a NUL byte")]
    NulInCommand,
    #[error("invalid command line {0:?}: unbalanced quotes")]
    Unsplittable(String),
    #[error("invalid environment variable name {0:?}")]
    BadEnvName(String),
    #[error("environment variable {0} holds a NUL byte")]
    NulInEnv(String),
    #[error("working directory {0:?} must be an absolute path without NUL bytes")]
    BadDir(PathBuf),
    #[error("unknown signal {0:?}")]
    BadSignal(String),
    #[error("invalid service file: {0}")]
    Yaml(String),
}

/// A command as zinit runs it: an argv. zinit splits its `exec` string with
/// shell-word rules and runs the words directly (no shell), so the argv is
/// written shell-quoted and comes back word for word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command(Vec<String>);

impl Command {
    pub fn new<I, S>(argv: I) -> Result<Self, ServiceError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let argv: Vec<String> = argv.into_iter().map(Into::into).collect();
        if argv.is_empty() {
            return Err(ServiceError::EmptyCommand);
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(ServiceError::NulInCommand);
        }
        Ok(Command(argv))
    }

    pub fn argv(&self) -> &[String] {
        &self.0
    }

    pub fn program(&self) -> &str {
        &self.0[0]
    }

    /// The line zinit will split back into [`Command::argv`].
    pub fn to_line(&self) -> String {
        // NUL is excluded by construction, the only thing quoting refuses.
        shlex::try_join(self.0.iter().map(String::as_str)).unwrap_or_default()
    }

    /// Splits a line the way zinit does.
    pub fn parse(line: &str) -> Result<Self, ServiceError> {
        let words = shlex::split(line).ok_or_else(|| ServiceError::Unsplittable(line.into()))?;
        Command::new(words)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_line())
    }
}

impl Serialize for Command {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_line())
    }
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let line = String::deserialize(d)?;
        Command::parse(&line).map_err(serde::de::Error::custom)
    }
}

/// Where a service's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Log {
    /// zinit's in-memory ring shared by all services (`zinit log`).
    #[default]
    Ring,
    /// zinit's own stdout.
    Stdout,
    None,
}

/// A signal, written as zinit reads it (`SIGTERM`; zinit upper-cases first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalName(pub Signal);

impl FromStr for SignalName {
    type Err = ServiceError;
    fn from_str(s: &str) -> Result<Self, ServiceError> {
        Signal::from_str(&s.to_uppercase())
            .map(SignalName)
            .map_err(|_| ServiceError::BadSignal(s.into()))
    }
}

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl Serialize for SignalName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for SignalName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signals {
    /// Sent to the service's process group by `zinit stop`.
    pub stop: SignalName,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn empty_is_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Command>, D::Error> {
    // zinit treats `test: ""` as no test.
    let line = Option::<String>::deserialize(d)?.unwrap_or_default();
    if line.trim().is_empty() {
        return Ok(None);
    }
    Command::parse(&line)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// One zinit service file. Keys zinit does not know are ignored by it; this
/// model writes only the ones below and ignores unknown ones when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub exec: Command,
    /// Health check polled every 2 s until it exits 0; until then the
    /// service is `Spawned`, after that `Running`.
    #[serde(
        default,
        deserialize_with = "empty_is_none",
        skip_serializing_if = "Option::is_none"
    )]
    pub test: Option<Command>,
    /// Run once, never respawn.
    #[serde(default, skip_serializing_if = "is_false")]
    pub oneshot: bool,
    /// Start only once these are `Running` (or, for oneshots, `Success`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<ServiceName>,
    #[serde(default)]
    pub log: Log,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (zinit's default: `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<Signals>,
    /// Seconds zinit waits for the service at system shutdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_timeout: Option<u64>,
}

impl Service {
    /// A service that runs `exec`, with zinit's defaults for everything else.
    pub fn new(exec: Command) -> Self {
        Service {
            exec,
            test: None,
            oneshot: false,
            after: Vec::new(),
            log: Log::Ring,
            env: BTreeMap::new(),
            dir: None,
            signal: None,
            shutdown_timeout: None,
        }
    }

    /// Checks what YAML cannot: values the kernel would refuse at exec time
    /// (zinit would then mark the service `Failure` with no explanation).
    pub fn validate(&self) -> Result<(), ServiceError> {
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ServiceError::BadEnvName(k.clone()));
            }
            if v.contains('\0') {
                return Err(ServiceError::NulInEnv(k.clone()));
            }
        }
        if let Some(dir) = &self.dir {
            let s = dir.as_os_str().as_encoded_bytes();
            if !dir.is_absolute() || s.contains(&0) {
                return Err(ServiceError::BadDir(dir.clone()));
            }
        }
        Ok(())
    }

    pub fn to_yaml(&self) -> Result<String, ServiceError> {
        self.validate()?;
        serde_yaml_ng::to_string(self).map_err(|e| ServiceError::Yaml(e.to_string()))
    }

    pub fn from_yaml(text: &str) -> Result<Self, ServiceError> {
        let s: Service =
            serde_yaml_ng::from_str(text).map_err(|e| ServiceError::Yaml(e.to_string()))?;
        s.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &[&str] = &[
        "",
        " ",
        "a b",
        "it's",
        "say \"hi\"",
        "back\\slash",
        "$(rm -rf /)",
        "`id`",
        "a\nb",
        "tab\there",
        "# not a comment",
        "key: value",
        "- item",
        "{flow}",
        "[list]",
        "yes",
        "no",
        "null",
        "~",
        "0x10",
        "1e3",
        "007",
        "*alias",
        "&anchor",
        "!tag",
        "%percent",
        "@at",
        "'single",
        "trailing ",
        "ünïcödé",
        "\u{1b}[31mred",
        "\r\n",
    ];

    #[test]
    fn argv_survives_quoting_and_splitting() {
        for w in HOSTILE {
            let argv = vec!["/bin/prog".to_owned(), (*w).to_owned(), "--x".into()];
            let cmd = Command::new(argv.clone()).unwrap();
            assert_eq!(
                Command::parse(&cmd.to_line()).unwrap().argv(),
                &argv[..],
                "{w:?}"
            );
        }
        let all = Command::new(HOSTILE.iter().copied().filter(|w| !w.is_empty())).unwrap();
        assert_eq!(Command::parse(&all.to_line()).unwrap(), all);
    }

    #[test]
    fn bad_commands_are_refused() {
        assert_eq!(
            Command::new(Vec::<String>::new()),
            Err(ServiceError::EmptyCommand)
        );
        assert_eq!(Command::new(["a\0b"]), Err(ServiceError::NulInCommand));
        assert!(Command::parse("unbalanced 'quote").is_err());
        assert_eq!(Command::parse("  "), Err(ServiceError::EmptyCommand));
    }

    fn full() -> Service {
        let mut s = Service::new(Command::new(["/usr/bin/vmd-shim", "--name", "a b"]).unwrap());
        s.test = Some(Command::new(["/usr/bin/vmd", "ctl", "status"]).unwrap());
        s.oneshot = true;
        s.after = vec!["redis".parse().unwrap(), "vm:x".parse().unwrap()];
        s.log = Log::Stdout;
        s.dir = Some("/var/run/vmd".into());
        s.signal = Some(Signals {
            stop: SignalName(Signal::SIGINT),
        });
        s.shutdown_timeout = Some(45);
        for (i, v) in HOSTILE.iter().enumerate() {
            s.env.insert(format!("V{i}"), (*v).to_owned());
        }
        s
    }

    #[test]
    fn yaml_round_trips_hostile_values() {
        let s = full();
        let yaml = s.to_yaml().unwrap();
        assert_eq!(Service::from_yaml(&yaml).unwrap(), s, "\n{yaml}");
        // Every key zinit knows, and nothing else.
        let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let keys: Vec<_> = doc
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            keys,
            [
                "exec",
                "test",
                "oneshot",
                "after",
                "log",
                "env",
                "dir",
                "signal",
                "shutdown_timeout"
            ]
        );
        // Values that look like other YAML types stay strings.
        for (i, v) in HOSTILE.iter().enumerate() {
            let got = &doc["env"][format!("V{i}").as_str()];
            assert_eq!(got.as_str(), Some(*v), "V{i} = {v:?} read back as {got:?}");
        }
    }

    #[test]
    fn minimal_file_has_only_exec_and_log() {
        let s = Service::new(Command::new(["/bin/true"]).unwrap());
        assert_eq!(s.to_yaml().unwrap(), "exec: /bin/true\nlog: ring\n");
    }

    #[test]
    fn reads_files_as_zinit_does() {
        let s = Service::from_yaml(
            "exec: vmd --broker unix:///var/run/redis.sock\ntest: ''\nafter: [boot]\n\
             signal: {stop: sigint}\nunknown_key: 1\n",
        )
        .unwrap();
        assert_eq!(
            s.exec.argv(),
            ["vmd", "--broker", "unix:///var/run/redis.sock"]
        );
        assert_eq!(s.test, None);
        assert_eq!(s.log, Log::Ring);
        assert_eq!(s.signal.unwrap().stop.0, Signal::SIGINT);
        assert!(Service::from_yaml("exec: x\nsignal: {stop: SIGNOPE}\n").is_err());
        assert!(Service::from_yaml("test: x\n").is_err(), "exec is required");
    }

    #[test]
    fn unexecutable_values_are_refused() {
        let mut s = Service::new(Command::new(["/bin/true"]).unwrap());
        s.env.insert("A=B".into(), "x".into());
        assert!(matches!(s.to_yaml(), Err(ServiceError::BadEnvName(_))));
        let mut s = Service::new(Command::new(["/bin/true"]).unwrap());
        s.env.insert("A".into(), "x\0y".into());
        assert!(matches!(s.to_yaml(), Err(ServiceError::NulInEnv(_))));
        let mut s = Service::new(Command::new(["/bin/true"]).unwrap());
        s.dir = Some("relative".into());
        assert!(matches!(s.to_yaml(), Err(ServiceError::BadDir(_))));
    }
}
