//! Where chunks go: one Redis PUBLISH, one binary WebSocket message, or
//! stdout, per chunk; or one Loki push for many.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use vmd_runtime::output::Output;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub enum Sink {
    Redis(redis::aio::MultiplexedConnection, String),
    WebSocket(Box<Ws>),
    Loki(Box<crate::loki::LokiSink>),
    Console(tokio::io::Stdout),
}

/// Why TLS for wss could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: {source}", .path.display())]
    Pem { path: PathBuf, source: io::Error },
    #[error("{}: {source}", .path.display())]
    Cert {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{0}")]
    Protocols(#[source] rustls::Error),
}

/// Why a receiver could not be reached or lost a batch (the text goes to
/// the worker's log and the stream's `last_error`).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Loki(#[from] crate::loki::PushError),
    #[error("connection timed out")]
    ConnectTimeout,
    #[error("send timed out")]
    SendTimeout,
}

/// TLS for wss and https: the system's roots, plus an extra CA if given.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let at = || path.to_owned();
        let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: at(), source })?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|source| TlsError::Pem { path: at(), source })?;
            roots
                .add(cert)
                .map_err(|source| TlsError::Cert { path: at(), source })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl Sink {
    pub async fn connect(
        output: &Output,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Sink, SinkError> {
        match output {
            Output::Loki(loki) => {
                let connect = crate::loki::LokiSink::connect(loki, tls);
                let sink = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                    .await
                    .map_err(|_| SinkError::ConnectTimeout)??;
                Ok(Sink::Loki(Box::new(sink)))
            }
            Output::Console => Ok(Sink::Console(tokio::io::stdout())),
            Output::Redis {
                host,
                port,
                username,
                password,
                channel,
            } => {
                let info = redis::ConnectionInfo {
                    addr: redis::ConnectionAddr::Tcp(host.clone(), *port),
                    redis: redis::RedisConnectionInfo {
                        username: username.clone(),
                        password: password.clone(),
                        ..Default::default()
                    },
                };
                let client = redis::Client::open(info)?;
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(std::time::Duration::from_secs(5))
                    .set_response_timeout(std::time::Duration::from_secs(10));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Sink::Redis(conn, channel.clone()))
            }
            Output::WebSocket { url, .. } => {
                // ws:// needs no TLS; wss:// gets the roots built for it.
                let connector = tls.map(|t| tokio_tungstenite::Connector::Rustls(Arc::clone(t)));
                let connect = tokio_tungstenite::connect_async_tls_with_config(
                    url.as_str(),
                    None,
                    false,
                    connector,
                );
                let (ws, _) = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                    .await
                    .map_err(|_| SinkError::ConnectTimeout)??;
                Ok(Sink::WebSocket(Box::new(ws)))
            }
        }
    }

    /// Whether the link is known to be gone already (a Loki server closes
    /// idle keep-alive connections): then it is re-made before a send.
    pub fn is_closed(&self) -> bool {
        matches!(self, Sink::Loki(l) if l.is_closed())
    }

    /// Sends chunks, one message each, in one round trip where the
    /// protocol allows (pipelined PUBLISHes; WebSocket frames flushed once;
    /// Loki's entries in one push).
    /// For Redis, returns how many subscribers got each chunk.
    /// `prepared`: a Loki body made ahead for these chunks.
    pub async fn send(
        &mut self,
        chunks: &[&[u8]],
        prepared: Option<Vec<u8>>,
    ) -> Result<Vec<Option<u64>>, SinkError> {
        let limit = std::time::Duration::from_secs(30);
        let timed_out = |_| SinkError::SendTimeout;
        match self {
            Sink::Console(out) => {
                for c in chunks {
                    out.write_all(c).await?;
                }
                out.flush().await?;
                Ok(vec![None; chunks.len()])
            }
            Sink::Redis(conn, channel) => {
                let mut pipe = redis::pipe();
                for c in chunks {
                    pipe.cmd("PUBLISH").arg(channel.as_str()).arg(*c);
                }
                let heard: Vec<u64> = tokio::time::timeout(limit, pipe.query_async(conn))
                    .await
                    .map_err(timed_out)??;
                Ok(heard.into_iter().map(Some).collect())
            }
            Sink::Loki(loki) => {
                let push = async {
                    match prepared {
                        Some(data) => loki.push_compressed(data).await,
                        None => loki.push(chunks).await,
                    }
                };
                tokio::time::timeout(limit, push)
                    .await
                    .map_err(timed_out)??;
                Ok(vec![None; chunks.len()])
            }
            Sink::WebSocket(ws) => {
                let send = async {
                    for c in chunks {
                        ws.feed(Message::Binary(c.to_vec().into())).await?;
                    }
                    ws.flush().await
                };
                tokio::time::timeout(limit, send)
                    .await
                    .map_err(timed_out)??;
                Ok(vec![None; chunks.len()])
            }
        }
    }
}
