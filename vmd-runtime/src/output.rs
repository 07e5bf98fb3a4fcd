//! Stream outputs as Zero-OS receivers expect them (`shared/spec/logstream.md`):
//! `redis://[user][:password@]host[:port]/<channel>`, `ws://…`, `wss://…`,
//! `http(s)://[user:password@]host[:port][/prefix][?tenant_id=…&job=…]`
//! (Grafana Loki's push API), `console://`. IPv6 hosts in brackets.

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
    /// Grafana Loki's push API, one entry per console line.
    Loki(Loki),
    Console,
}

/// Where and how a Loki stream pushes (`http://` or `https://`, as Zero-OS'
/// tailstream takes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loki {
    /// The URL as given, for [`fmt::Display`] (shown redacted).
    pub given: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query of the push request: the URL's path as a prefix of
    /// `/loki/api/v1/push` (a reverse proxy's), or the push path itself;
    /// query parameters other than ours passed on (a proxy's token).
    pub target: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `?tenant_id=` (or tailstream's `?tenant=`): sent as `X-Scope-OrgID`.
    pub tenant: Option<String>,
    /// `?job=`: the `job` label of every entry; `tailstream` by default, so
    /// that queries written for a Zero-OS node find a vmd node's logs.
    pub job: String,
}

/// The push path of Loki's HTTP API.
pub const LOKI_PUSH_PATH: &str = "/loki/api/v1/push";

/// The `job` label when the URL names none (what tailstream sends).
pub const LOKI_DEFAULT_JOB: &str = "tailstream";

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
            "http" | "https" => loki(&u, s).map_err(|why| bad(&why)),
            other => Err(bad(&format!(
                "unsupported scheme {other:?} (use redis, ws, wss, http or https)"
            ))),
        }
    }
}

fn percent_decoded(v: &str) -> String {
    url::form_urlencoded::parse(format!("v={v}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn loki(u: &url::Url, given: &str) -> Result<Output, String> {
    let host = u
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or("missing host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tls = u.scheme() == "https";
    let prefix = u.path().trim_end_matches('/');
    let path = if prefix.ends_with(LOKI_PUSH_PATH) {
        prefix.to_owned()
    } else {
        format!("{prefix}{LOKI_PUSH_PATH}")
    };
    let (mut tenant, mut job) = (None, None);
    let mut passed = url::form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (k, v) in u.query_pairs() {
        match &*k {
            "tenant_id" | "tenant" => tenant = Some(v.into_owned()),
            "job" => job = Some(v.into_owned()),
            _ => {
                passed.append_pair(&k, &v);
                any = true;
            }
        }
    }
    // A header value must be visible ASCII; Loki takes any such tenant.
    if let Some(t) = &tenant {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("tenant_id must be printable ASCII without spaces".into());
        }
    }
    let job = job.unwrap_or_else(|| LOKI_DEFAULT_JOB.to_owned());
    if job.is_empty() || job.len() > 1024 || job.chars().any(char::is_control) {
        return Err("job must be 1 to 1024 bytes of text".into());
    }
    let target = if any {
        format!("{path}?{}", passed.finish())
    } else {
        path
    };
    Ok(Output::Loki(Loki {
        given: given.to_owned(),
        tls,
        port: u
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 }),
        host,
        target,
        username: Some(u.username())
            .filter(|x| !x.is_empty())
            .map(percent_decoded),
        password: u.password().map(percent_decoded),
        tenant,
        job,
    }))
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
            Output::Loki(l) => f.write_str(&redact_url(&l.given)),
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
    fn loki_urls_as_tailstream_takes_them() {
        let Output::Loki(l) = "http://u:p%40ss@10.1.1.1:3100?tenant_id=t1"
            .parse::<Output>()
            .unwrap()
        else {
            panic!("not loki")
        };
        assert_eq!((l.host.as_str(), l.port, l.tls), ("10.1.1.1", 3100, false));
        assert_eq!(l.target, "/loki/api/v1/push");
        assert_eq!(l.username.as_deref(), Some("u"));
        assert_eq!(l.password.as_deref(), Some("p@ss"));
        assert_eq!(l.tenant.as_deref(), Some("t1"));
        assert_eq!(l.job, "tailstream");
        for (url, host, port, target) in [
            (
                "https://logs.example",
                "logs.example",
                443,
                "/loki/api/v1/push",
            ),
            (
                "https://[2a02::1]/loki/api/v1/push/?tenant=x&job=vms",
                "2a02::1",
                443,
                "/loki/api/v1/push",
            ),
            (
                "http://h/proxy/?token=a%26b&tenant_id=t",
                "h",
                80,
                "/proxy/loki/api/v1/push?token=a%26b",
            ),
        ] {
            let Output::Loki(l) = url.parse::<Output>().unwrap() else {
                panic!("{url}: not loki")
            };
            assert_eq!(
                (l.host.as_str(), l.port, l.target.as_str()),
                (host, port, target)
            );
        }
        let shown = "https://u:pw@h/?tenant_id=t".parse::<Output>().unwrap();
        assert_eq!(shown.to_string(), "https://***@h/?***");
    }

    #[test]
    fn refuses_the_rest() {
        for bad in [
            "redis://host:6379",
            "redis://host:6379/",
            "redis:///ch",
            "redis://h:99999/c",
            "redis://h:abc/c",
            "http://",
            "https://h/?tenant_id=a%20b",
            "http://h/?job=",
            "http://h/?job=a%0Ab",
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
