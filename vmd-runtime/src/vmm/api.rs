//! A client for cloud-hypervisor's REST API on its unix socket.
//!
//! Deliberately small (one request per connection):
//! the shim makes a handful of calls in a VM's life, and a full HTTP stack
//! would cost more memory than the rest of the shim.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::unix::{exchange, ExchangeError};
use tokio::net::UnixStream;

/// The state of the VM inside a VMM (`vm.info`'s `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
    /// A state this vmd does not know (a newer cloud-hypervisor).
    #[serde(other)]
    Unknown,
}

impl VmState {
    /// Booted: the guest runs, or ran and is paused.
    pub fn is_booted(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }
}

/// The part of `vm.info` vmd reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VmInfo {
    pub state: VmState,
}

/// The API of one VMM, by its socket.
#[derive(Debug, Clone)]
pub struct VmmApi {
    socket: PathBuf,
}

impl VmmApi {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        VmmApi {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `GET vm.info`.
    pub async fn info(&self, timeout: Duration) -> Result<VmInfo, ApiError> {
        let body = expect_ok(&self.socket, "GET", "vm.info", timeout).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::BadReply(format!("vm.info: {e}")))
    }

    /// The VM's state, `None` when the VMM does not answer (or has no VM).
    pub async fn state(&self, timeout: Duration) -> Option<VmState> {
        self.info(timeout).await.ok().map(|i| i.state)
    }

    /// `PUT <action>` (`vm.pause`, `vm.power-button`, `vmm.shutdown`…), which
    /// must succeed.
    pub async fn put(&self, action: &str, timeout: Duration) -> Result<(), ApiError> {
        expect_ok(&self.socket, "PUT", action, timeout)
            .await
            .map(drop)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the VMM API at {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("VMM API i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("VMM API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("VMM API sent an invalid reply: {0}")]
    BadReply(String),
    /// The VMM refused: its error chain, e.g. `["Error from API", "VM is not running"]`.
    #[error("VMM API {status}: {}", .chain.join(": "))]
    Refused { status: u16, chain: Vec<String> },
}

pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Sends `method /api/v1/<endpoint>` and returns the reply.
pub async fn call(
    socket: &Path,
    method: &str,
    endpoint: &str,
    timeout: Duration,
) -> Result<Reply, ApiError> {
    let req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
         Content-Length: 0\r\n\r\n"
    );
    exchange(socket, req.as_bytes(), timeout, |mut s| async move {
        read_reply(&mut s).await
    })
    .await
}

impl ExchangeError for ApiError {
    fn connect(socket: String, e: std::io::Error) -> Self {
        ApiError::Connect(socket, e)
    }
    fn timeout(_request: &[u8], timeout: Duration) -> Self {
        ApiError::Timeout(timeout)
    }
}

async fn read_reply(s: &mut UnixStream) -> Result<Reply, ApiError> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > 64 * 1024 {
            return Err(ApiError::BadReply("headers too long".into()));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(ApiError::BadReply(
                "connection closed before the headers ended".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ApiError::BadReply(format!("status line {status_line:?}")))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    let mut body = buf[head_end + 4..].to_vec();
    match length {
        Some(len) => {
            if len > 16 << 20 {
                return Err(ApiError::BadReply("body too large".into()));
            }
            while body.len() < len {
                let mut chunk = vec![0u8; (len - body.len()).min(64 * 1024)];
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(ApiError::BadReply("body cut short".into()));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        // micro_http (cloud-hypervisor's server) sends Content-Length exactly
        // when there is a body, and keeps the connection open: no length, no body.
        None => body.clear(),
    }
    Ok(Reply { status, body })
}

/// A call that must succeed (2xx); the VMM's error chain otherwise.
pub async fn expect_ok(
    socket: &Path,
    method: &str,
    endpoint: &str,
    timeout: Duration,
) -> Result<Vec<u8>, ApiError> {
    let r = call(socket, method, endpoint, timeout).await?;
    if (200..300).contains(&r.status) {
        return Ok(r.body);
    }
    let chain = serde_json::from_slice::<Vec<String>>(&r.body)
        .unwrap_or_else(|_| vec![String::from_utf8_lossy(&r.body).into_owned()]);
    Err(ApiError::Refused {
        status: r.status,
        chain,
    })
}
