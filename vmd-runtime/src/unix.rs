//! One request and its reply over a unix socket, bounded in time: how vmd
//! asks a shim and how a shim asks its VMM. A peer that does not answer
//! costs a timeout, never a hang.

use std::future::Future;
use std::io;
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// How the caller's error type says what went wrong.
pub(crate) trait ExchangeError: From<io::Error> {
    fn connect(socket: String, e: io::Error) -> Self;
    /// No reply to `request` within `timeout`.
    fn timeout(request: &[u8], timeout: Duration) -> Self;
}

/// Connects to `socket`, writes `request`, and reads the reply with `read`,
/// all within `timeout`.
pub(crate) async fn exchange<T, E, F, Fut>(
    socket: &Path,
    request: &[u8],
    timeout: Duration,
    read: F,
) -> Result<T, E>
where
    E: ExchangeError,
    F: FnOnce(UnixStream) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let run = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| E::connect(socket.display().to_string(), e))?;
        s.write_all(request).await?;
        read(s).await
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| E::timeout(request, timeout))?
}
