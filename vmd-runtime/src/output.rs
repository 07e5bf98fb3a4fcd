//! Stream outputs as Zero-OS receivers expect them (`shared/spec/logstream.md`):
//! `redis://[user][:password@]host[:port]/<channel>`, `ws://…`, `wss://…`,
//! `console://`. IPv6 hosts in brackets.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Redis {
        host: String,
        port: u16,
        username: Option<String>,
        password: Option<String>,
        channel: String,
    },
    WebSocket {
        /// The URL as given (normalised), `ws://` or `wss://`.
        url: String,
        tls: bool,
    },
    Console,
}

/// An invalid output. Its text shows the URL without credentials: it is
/// logged, and a receiver's password is no one else's business.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid stream output {:?}: {why}", redact_url(url))]
pub struct OutputError {
    pub url: String,
    pub why: String,
}

/// A URL as it may be shown: user and password (`***@`) and the query
/// (`?***`, where tokens go) replaced, the fragment dropped. Works on any
/// text, valid URL or not.
pub fn redact_url(s: &str) -> String {
    let (scheme, rest) = match s.find("://") {
        Some(i) => (&s[..i + 3], &s[i + 3..]),
        None => ("", s),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rfind('@') {
        Some(at) => format!("***{}", &authority[at..]),
        None => authority.to_owned(),
    };
    let tail = tail.split('#').next().unwrap_or_default();
    let tail = match tail.find('?') {
        Some(q) => format!("{}?***", &tail[..q]),
        None => tail.to_owned(),
    };
    format!("{scheme}{authority}{tail}")
}

impl FromStr for Output {
    type Err = OutputError;

    fn from_str(s: &str) -> Result<Self, OutputError> {
        let bad = |why: &str| OutputError {
            url: s.to_owned(),
            why: why.to_owned(),
        };
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("contains spaces or control characters"));
        }
        let u = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
        match u.scheme() {
            "console" => Ok(Output::Console),
            "redis" => {
                let host = u
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad("missing host"))?;
                let channel = u.path().trim_start_matches('/');
                if channel.is_empty() {
                    return Err(bad("missing channel (redis://host:port/<channel>)"));
                }
                let channel = url::form_urlencoded::parse(format!("c={channel}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
                    .unwrap_or_default();
                let decode = |v: &str| {
                    url::form_urlencoded::parse(format!("v={v}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                };
                Ok(Output::Redis {
                    host: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port: u.port().unwrap_or(6379),
                    username: Some(u.username())
                        .filter(|x| !x.is_empty())
                        .and_then(decode),
                    password: u.password().and_then(decode),
                    channel,
                })
            }
            "ws" | "wss" => {
                if u.host_str().is_none_or(str::is_empty) {
                    return Err(bad("missing host"));
                }
                Ok(Output::WebSocket {
                    tls: u.scheme() == "wss",
                    url: u.to_string(),
                })
            }
            other => Err(bad(&format!(
                "unsupported scheme {other:?} (use redis, ws or wss)"
            ))),
        }
    }
}

/// Shown without credentials (see [`redact_url`]): this is what logs,
/// `Inspect` and `vmd ctl` show of a stream.
impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Redis {
                host,
                port,
                channel,
                username,
                password,
            } => {
                let creds = if username.is_some() || password.is_some() {
                    "***@"
                } else {
                    ""
                };
                if host.contains(':') {
                    write!(f, "redis://{creds}[{host}]:{port}/{channel}")
                } else {
                    write!(f, "redis://{creds}{host}:{port}/{channel}")
                }
            }
            Output::WebSocket { url, .. } => f.write_str(&redact_url(url)),
            Output::Console => f.write_str("console://"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_receivers_use() {
        assert_eq!(
            "redis://10.20.2.7:6379/logs".parse::<Output>().unwrap(),
            Output::Redis {
                host: "10.20.2.7".into(),
                port: 6379,
                username: None,
                password: None,
                channel: "logs".into()
            }
        );
        assert_eq!(
            "redis://user:p%40ss@[2a02::1]/ch"
                .parse::<Output>()
                .unwrap(),
            Output::Redis {
                host: "2a02::1".into(),
                port: 6379,
                username: Some("user".into()),
                password: Some("p@ss".into()),
                channel: "ch".into()
            }
        );
        assert_eq!(
            "redis://:secret@h:7000/c".parse::<Output>().unwrap(),
            Output::Redis {
                host: "h".into(),
                port: 7000,
                username: None,
                password: Some("secret".into()),
                channel: "c".into()
            }
        );
        assert!(matches!(
            "ws://10.20.2.7:8883/logs".parse::<Output>().unwrap(),
            Output::WebSocket { tls: false, .. }
        ));
        assert!(matches!(
            "wss://[::1]:9443/x".parse::<Output>().unwrap(),
            Output::WebSocket { tls: true, .. }
        ));
        assert_eq!("console://".parse::<Output>().unwrap(), Output::Console);
    }

    #[test]
    fn credentials_and_tokens_are_never_shown() {
        for (url, shown) in [
            (
                "redis://user:p%40ss@[2a02::1]/ch",
                "redis://***@[2a02::1]:6379/ch",
            ),
            ("redis://:secret@h:7000/c", "redis://***@h:7000/c"),
            ("redis://h/c", "redis://h:6379/c"),
            (
                "wss://u:pw@logs.example:9443/in?token=abc#x",
                "wss://***@logs.example:9443/in?***",
            ),
            ("ws://10.0.0.1:8883/logs", "ws://10.0.0.1:8883/logs"),
        ] {
            assert_eq!(url.parse::<Output>().unwrap().to_string(), shown, "{url}");
        }
        // Invalid ones too: the error says what was wrong, not the secret.
        let e = "redis://u:hunter2@h:99999/c".parse::<Output>().unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        assert_eq!(redact_url("no scheme, a@b?c"), "***@b?***");
    }

    #[test]
    fn refuses_the_rest() {
        for bad in [
            "redis://host:6379",
            "redis://host:6379/",
            "redis:///ch",
            "redis://h:99999/c",
            "redis://h:abc/c",
            "http://h/x",
            "ftp://h",
            "ws://",
            "nonsense",
            "",
            "ws://h/a b",
            "redis://h/c\n",
        ] {
            assert!(bad.parse::<Output>().is_err(), "{bad:?} accepted");
        }
    }
}
