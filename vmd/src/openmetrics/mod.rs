//! The OpenMetrics endpoint (`--metrics-listen`): the host's VMs and vmd
//! itself, the way Prometheus scrapes every peer's (`GET /metrics`).
//!
//! Each scrape collects the VMs anew through the same collector as the zbus
//! `Metrics` (so both show the same counters), on the runtime that serves
//! the endpoint (vmd's pool): never on the thread that answers zbus calls. One scrape at a time; a connection that
//! sends nothing gets dropped after [`IDLE`].
//!
//! Names and units follow Prometheus' conventions: `vmd_` first, base units
//! (seconds, bytes), `_total` on counters. docs/metrics.md lists them.
//!
//! Here: the server and the formats; [`families`] is what a scrape shows
//! of the VMs.

mod families;
mod services;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::sync::Mutex;

use vmd_runtime::events::now_ms;

use crate::vm::manager::Manager;
use crate::vm::metrics::{Reading, VmSample};
use crate::zbus::server::CallStats;
use families::Vms;

/// How long a connection may wait for its request.
const IDLE: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const CONNECTIONS: usize = 16;
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as Prometheus' classic text format (0.0.4): a counter's
/// family is named as its samples (`_total`), and there is no `# UNIT` or
/// `# EOF`. The samples are the same.
pub fn classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    /// A Unix socket, mode 0600 (root's scraper, or a proxy).
    Unix(PathBuf),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some(p) if p.starts_with('/') => Ok(Listen::Unix(p.into())),
            Some(_) => Err(format!("{s:?}: unix: takes an absolute path")),
            None => s
                .parse()
                .map(Listen::Tcp)
                .map_err(|e| format!("{s:?}: expected IP:PORT or unix:/PATH ({e})")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
}

/// What a scrape shows.
#[derive(Clone)]
pub struct Exporter {
    manager: Arc<Manager>,
    calls: CallStats,
    one_at_a_time: Arc<Mutex<()>>,
}

impl Exporter {
    pub fn new(manager: Arc<Manager>, calls: CallStats) -> Self {
        Exporter {
            manager,
            calls,
            one_at_a_time: Arc::default(),
        }
    }

    /// Consoles, streams, and zinit's view of vmd's services (one `list`,
    /// bounded: a scrape never waits long on zinit).
    async fn services(&self, vms: &[VmSample]) -> services::Services {
        let m = &self.manager;
        let listed = tokio::time::timeout(Duration::from_secs(2), m.zinit().list()).await;
        let zinit = match listed {
            Ok(Ok(list)) => {
                let mut by_kind =
                    std::collections::BTreeMap::from([("vm", (0, 0)), ("stream", (0, 0))]);
                for (name, state) in list {
                    let kind = match name.split_once(':') {
                        Some(("vm", _)) => "vm",
                        Some(("stream", _)) => "stream",
                        _ => continue,
                    };
                    if let Some((up, down)) = by_kind.get_mut(kind) {
                        if matches!(state, zinit::State::Running) {
                            *up += 1;
                        } else {
                            *down += 1;
                        }
                    }
                }
                Some(by_kind)
            }
            _ => None,
        };
        services::Services {
            // The VMs this scrape collected: `present/` is not read again.
            console: m.console_written(vms.iter().map(|v| v.name.as_str())),
            streams: m.stream_samples(),
            zinit,
        }
    }

    /// The text of one scrape.
    pub async fn scrape(&self) -> String {
        let _one = self.one_at_a_time.lock().await;
        let t0 = Instant::now();
        let vms = self.manager.collect(Reading::Usage).await;
        let collect_secs = t0.elapsed().as_secs_f64();
        let services = self.services(&vms).await;
        let mut registry = Registry::default();
        self.calls.register(&mut registry);
        self.manager.telemetry().register(&mut registry);
        registry.register_collector(Box::new(Vms {
            vms,
            now: now_ms() / 1000,
            collect_secs,
        }));
        registry.register_collector(Box::new(services));
        let mut out = String::with_capacity(64 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// Binds `listen` (a plain socket: it is served on whichever runtime
    /// runs [`Exporter::serve`]).
    pub fn bind(&self, listen: &Listen) -> Result<Bound, ListenError> {
        let bound = match listen {
            Listen::Tcp(addr) => std::net::TcpListener::bind(addr).map(Bound::Tcp),
            Listen::Unix(path) => bind_unix(path).map(Bound::Unix),
        }
        .and_then(|b| {
            match &b {
                Bound::Tcp(l) => l.set_nonblocking(true)?,
                Bound::Unix(l) => l.set_nonblocking(true)?,
            }
            Ok(b)
        });
        let bound = bound.map_err(|e| ListenError::Bind(listen.to_string(), e))?;
        tracing::info!(listen = %listen, "OpenMetrics endpoint listening");
        Ok(bound)
    }

    /// Serves `GET /metrics` until the process ends, on the runtime that
    /// runs it.
    pub async fn serve(self, bound: Bound) {
        match bound {
            Bound::Tcp(l) => {
                if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                    self.accept_all(|| async { l.accept().await.map(|(c, _)| c) })
                        .await;
                }
            }
            Bound::Unix(l) => {
                if let Ok(l) = tokio::net::UnixListener::from_std(l) {
                    self.accept_all(|| async { l.accept().await.map(|(c, _)| c) })
                        .await;
                }
            }
        }
    }

    /// Serves every connection `accept` gives, [`CONNECTIONS`] at a time.
    async fn accept_all<C, A, F>(&self, mut accept: A)
    where
        C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        A: FnMut() -> F,
        F: Future<Output = std::io::Result<C>>,
    {
        let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
        loop {
            let Ok(conn) = accept().await else {
                continue;
            };
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, std::convert::Infallible>(me.answer(req).await) }
                });
                let serving = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(conn), service);
                // A scrape is answered in well under IDLE; a connection kept
                // open longer is a client that forgot it.
                let _ = tokio::time::timeout(IDLE, serving).await;
            });
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let plain = |status: StatusCode, text: &'static str| {
            let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
            *r.status_mut() = status;
            r
        };
        if req.uri().path() != "/metrics" {
            return plain(StatusCode::NOT_FOUND, "not found: try /metrics\n");
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        // Prometheus asks for OpenMetrics; a person with curl, or promtool,
        // gets Prometheus' classic text format.
        let openmetrics = req
            .headers()
            .get_all(hyper::header::ACCEPT)
            .iter()
            .any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.contains("application/openmetrics-text"))
            });
        let mut body = self.scrape().await;
        let content_type = if openmetrics {
            CONTENT_TYPE
        } else {
            body = classic_text(&body);
            CLASSIC_CONTENT_TYPE
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        r
    }
}

/// A listening socket of the endpoint.
pub enum Bound {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

fn bind_unix(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    // A socket left by an earlier vmd; anything else there is an error.
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !m.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "something other than a socket is there",
            ));
        }
        std::fs::remove_file(path)?;
    }
    // Created 0600 from the start: no moment in which others may connect.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let l = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let l = l?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_as_their_samples() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total{x=\"1\"} 3\n\
# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total{x=\"1\"} 3\n\
# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:9100".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:9100".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/vmd-metrics.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/vmd-metrics.sock".into())
        );
        assert!("unix:relative".parse::<Listen>().is_err());
        assert!("localhost".parse::<Listen>().is_err());
    }
}
