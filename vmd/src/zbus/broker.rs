//! Broker addresses as zbus writes them, and connections to them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, RedisConnectionInfo};

/// Where the Redis broker is: `unix:///var/run/redis.sock`, `tcp://host:port`
/// (also `redis://host:port`). As in the Go client, a URL user name is the
/// password (`tcp://secret@host:6379`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    addr: Addr,
    password: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Addr {
    Unix(PathBuf),
    Tcp(String, u16),
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid broker URL {url:?}: {why}")]
    Invalid { url: String, why: &'static str },
    #[error("cannot connect to the broker at {broker}: {source}")]
    Connect {
        broker: String,
        #[source]
        source: redis::RedisError,
    },
}

impl FromStr for Broker {
    type Err = BrokerError;

    fn from_str(url: &str) -> Result<Self, BrokerError> {
        let bad = |why| BrokerError::Invalid {
            url: url.to_owned(),
            why,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected unix:///path or tcp://host:port"))?;
        match scheme {
            "unix" | "redis+unix" => {
                if rest.is_empty() || !rest.starts_with('/') {
                    return Err(bad("a unix socket path must be absolute"));
                }
                Ok(Broker {
                    addr: Addr::Unix(PathBuf::from(rest)),
                    password: None,
                })
            }
            "tcp" | "redis" => {
                let rest = rest.trim_end_matches('/');
                let (password, hostport) = match rest.rsplit_once('@') {
                    Some((user, hp)) => (Some(user.to_owned()).filter(|u| !u.is_empty()), hp),
                    None => (None, rest),
                };
                let port_of = |p: &str| p.parse::<u16>().map_err(|_| bad("invalid port"));
                let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
                    let (h, after) = r
                        .split_once(']')
                        .ok_or_else(|| bad("unterminated [host]"))?;
                    match after {
                        "" => (h, 6379),
                        _ => match after.strip_prefix(':') {
                            Some(p) => (h, port_of(p)?),
                            None => return Err(bad("garbage after [host]")),
                        },
                    }
                } else {
                    match hostport.rsplit_once(':') {
                        Some((h, p)) => (h, port_of(p)?),
                        None => (hostport, 6379),
                    }
                };
                if host.is_empty() {
                    return Err(bad("missing host"));
                }
                Ok(Broker {
                    addr: Addr::Tcp(host.to_owned(), port),
                    password,
                })
            }
            _ => Err(bad("unsupported scheme (use unix:// or tcp://)")),
        }
    }
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            Addr::Unix(p) => write!(f, "unix://{}", p.display()),
            Addr::Tcp(h, p) if h.contains(':') => write!(f, "tcp://[{h}]:{p}"),
            Addr::Tcp(h, p) => write!(f, "tcp://{h}:{p}"),
        }
    }
}

impl Broker {
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Broker {
            addr: Addr::Unix(path.into()),
            password: None,
        }
    }

    fn connection_info(&self) -> ConnectionInfo {
        ConnectionInfo {
            addr: match &self.addr {
                Addr::Unix(p) => ConnectionAddr::Unix(p.clone()),
                Addr::Tcp(h, p) => ConnectionAddr::Tcp(h.clone(), *p),
            },
            redis: RedisConnectionInfo {
                password: self.password.clone(),
                ..Default::default()
            },
        }
    }

    /// Opens a new connection. Blocking commands (`BLPOP`) need one of their
    /// own: on a shared connection they would stall every other command.
    pub async fn connect(&self) -> Result<MultiplexedConnection, BrokerError> {
        let err = |source| BrokerError::Connect {
            broker: self.to_string(),
            source,
        };
        let client = redis::Client::open(self.connection_info()).map_err(err)?;
        let config = AsyncConnectionConfig::new().set_connection_timeout(Duration::from_secs(3));
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(err)
    }
}

impl Broker {
    /// A connection for `SUBSCRIBE` (a subscribed connection takes no other
    /// command).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, BrokerError> {
        let err = |source| BrokerError::Connect {
            broker: self.to_string(),
            source,
        };
        let client = redis::Client::open(self.connection_info()).map_err(err)?;
        tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub())
            .await
            .map_err(|_| {
                err(redis::RedisError::from((
                    redis::ErrorKind::IoError,
                    "connection timed out",
                )))
            })?
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_go_forms() {
        let b: Broker = "unix:///var/run/redis.sock".parse().unwrap();
        assert_eq!(b, Broker::unix("/var/run/redis.sock"));
        let b: Broker = "tcp://localhost:6379".parse().unwrap();
        assert_eq!(b.addr, Addr::Tcp("localhost".into(), 6379));
        let b: Broker = "tcp://pass@10.0.0.1:7000".parse().unwrap();
        assert_eq!(b.password.as_deref(), Some("pass"));
        assert_eq!(b.addr, Addr::Tcp("10.0.0.1".into(), 7000));
        let b: Broker = "tcp://[::1]:6380".parse().unwrap();
        assert_eq!(b.addr, Addr::Tcp("::1".into(), 6380));
        assert_eq!(b.to_string(), "tcp://[::1]:6380");
        let b: Broker = "redis://host".parse().unwrap();
        assert_eq!(b.addr, Addr::Tcp("host".into(), 6379));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            "",
            "/var/run/redis.sock",
            "unix://relative",
            "http://x",
            "tcp://:1",
            "tcp://h:99999",
        ] {
            assert!(bad.parse::<Broker>().is_err(), "{bad} accepted");
        }
    }
}
