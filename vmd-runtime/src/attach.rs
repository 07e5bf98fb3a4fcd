//! The shim's console socket ([`crate::RunDir::console_socket`], mode 0600):
//! how a terminal attaches to a VM's serial console. Both sides are here.
//!
//! The client sends one line, `attach history=N` or `attach history=N
//! since=OFFSET`; the shim answers `ok from=OFFSET` (or `error: …` and
//! closes), then streams the console: first what the log holds from
//! `OFFSET`, then every byte as it is appended, exactly once and in order.
//! Everything the client sends after its line is typed into the guest.
//!
//! Offsets are absolute positions in everything the VM ever printed (the
//! console log's, see [`crate::console`]), so a client that loses the
//! stream (a shim restart) attaches again with `since=` where it stopped,
//! and gets neither a gap nor a repeat while the log still holds that part.
//! A client that does not keep up is disconnected: nobody waits for it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// What a console shows of the past on connect, by default: as much as
/// Zero-OS's cloud-console kept.
pub const DEFAULT_HISTORY: u64 = 80_000;
/// The most history one attach may ask for.
pub const MAX_HISTORY: u64 = 1 << 20;
/// The request and reply lines are short; a longer one is not ours.
const MAX_LINE: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// How many bytes of the past to replay (at most [`MAX_HISTORY`]).
    pub history: u64,
    /// Replay from this offset instead (a re-attach), if the log holds it.
    pub since: Option<u64>,
}

impl Request {
    pub fn new(history: u64) -> Self {
        Request {
            history: history.min(MAX_HISTORY),
            since: None,
        }
    }

    pub fn line(&self) -> String {
        match self.since {
            Some(s) => format!("attach history={} since={s}\n", self.history),
            None => format!("attach history={}\n", self.history),
        }
    }

    pub fn parse(line: &str) -> Result<Request, String> {
        let mut words = line.split(' ');
        if words.next() != Some("attach") {
            return Err(format!("not an attach request: {line:?}"));
        }
        let mut req = Request::new(DEFAULT_HISTORY);
        for w in words {
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{w:?} is not a number"))
            };
            match w.split_once('=') {
                Some(("history", v)) => req.history = number(v)?.min(MAX_HISTORY),
                Some(("since", v)) => req.since = Some(number(v)?),
                _ => return Err(format!("unknown attach option {w:?}")),
            }
        }
        Ok(req)
    }

    /// Where the replay starts, for a log ending at `end`.
    pub fn start(&self, end: u64) -> u64 {
        match self.since {
            Some(s) => s.min(end),
            None => end.saturating_sub(self.history),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot reach the console of the VM at {0}: {1} (is its shim running?)")]
    Connect(String, #[source] io::Error),
    #[error("console i/o: {0}")]
    Io(#[from] io::Error),
    #[error("the console did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the console refused: {0}")]
    Refused(String),
    #[error("the console answered {0:?}")]
    BadReply(String),
}

/// An attached console: the stream carries the console from `from` on, and
/// takes input for the guest.
pub struct Attached {
    pub from: u64,
    pub stream: UnixStream,
}

/// Reads one `\n`-terminated line, byte by byte: what follows it on the
/// stream is console data and must stay there.
pub async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if line.len() >= MAX_LINE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        line.push(b);
    }
    String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Attaches to the console of the shim listening at `socket`.
pub async fn attach(
    socket: &Path,
    req: Request,
    timeout: Duration,
) -> Result<Attached, AttachError> {
    let connect = async {
        UnixStream::connect(socket)
            .await
            .map_err(|e| AttachError::Connect(socket.display().to_string(), e))
    };
    let s = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| AttachError::Timeout(timeout))??;
    attach_on(s, req, timeout).await
}

/// Attaches over a connection to the shim's console made otherwise (a
/// [`Connector`]'s).
pub async fn attach_on(
    mut s: UnixStream,
    req: Request,
    timeout: Duration,
) -> Result<Attached, AttachError> {
    let run = async {
        s.write_all(req.line().as_bytes()).await?;
        let line = read_line(&mut s).await?;
        if let Some(e) = line.strip_prefix("error: ") {
            return Err(AttachError::Refused(e.to_owned()));
        }
        let from = line
            .strip_prefix("ok from=")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| AttachError::BadReply(line.clone()))?;
        Ok(Attached { from, stream: s })
    };
    tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| AttachError::Timeout(timeout))?
}

/// Connections to the shim's console for a process that cannot open its
/// socket (the web console server runs as nobody, without capabilities):
/// it holds one end of a socket pair the shim made, writes a byte, and the
/// shim answers with one end of a fresh connection (SCM_RIGHTS), served
/// exactly like one accepted on the console socket.
pub struct Connector {
    sock: tokio::sync::Mutex<UnixStream>,
}

impl Connector {
    pub fn from_fd(fd: OwnedFd) -> io::Result<Connector> {
        let s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(true)?;
        Ok(Connector {
            sock: tokio::sync::Mutex::new(UnixStream::from_std(s)?),
        })
    }

    /// A new connection to the shim's console.
    pub async fn connect(&self) -> io::Result<UnixStream> {
        // One request and its answer at a time: answers carry no id.
        let s = self.sock.lock().await;
        loop {
            s.writable().await?;
            match s.try_write(b"c") {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        let fd = loop {
            s.readable().await?;
            match s.try_io(tokio::io::Interest::READABLE, || recv_fd(s.as_raw_fd())) {
                Ok(fd) => break fd,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        let c = std::os::unix::net::UnixStream::from(fd);
        c.set_nonblocking(true)?;
        UnixStream::from_std(c)
    }
}

/// The shim's side of a [`Connector`]: answers each request byte with a new
/// connection, whose other end goes to `serve`. Returns when the other side
/// closes its end.
pub async fn serve_connector(fd: OwnedFd, mut serve: impl FnMut(UnixStream)) -> io::Result<()> {
    let s = std::os::unix::net::UnixStream::from(fd);
    s.set_nonblocking(true)?;
    let s = UnixStream::from_std(s)?;
    let mut buf = [0u8; 64];
    loop {
        s.readable().await?;
        let n = match s.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        for _ in 0..n {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
            loop {
                s.writable().await?;
                match s.try_io(tokio::io::Interest::WRITABLE, || {
                    send_fd(s.as_raw_fd(), theirs.as_raw_fd())
                }) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            drop(theirs);
            ours.set_nonblocking(true)?;
            serve(UnixStream::from_std(ours)?);
        }
    }
}

fn send_fd(sock: RawFd, fd: RawFd) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd];
    let iov = [std::io::IoSlice::new(b"f")];
    sendmsg::<()>(
        sock,
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut got = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: the kernel just installed `fd` in this process
                // for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                got.get_or_insert(owned);
            }
        }
    }
    if msg.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the shim closed the console connector",
        ));
    }
    got.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no connection passed"))
}

/// The shim's answer line.
pub fn ok_line(from: u64) -> String {
    format!("ok from={from}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_refused() {
        for r in [
            Request::new(80_000),
            Request {
                history: 0,
                since: Some(12_345),
            },
        ] {
            let line = r.line();
            assert_eq!(Request::parse(line.trim_end()), Ok(r));
        }
        assert_eq!(Request::new(u64::MAX).history, MAX_HISTORY);
        assert_eq!(Request::parse("attach").unwrap().history, DEFAULT_HISTORY);
        assert!(Request::parse("attach history=-1").is_err());
        assert!(Request::parse("attach colour=red").is_err());
        assert!(Request::parse("stop").is_err());
        // Where replay starts.
        assert_eq!(Request::new(100).start(1_000), 900);
        assert_eq!(Request::new(100).start(50), 0);
        let since = |s| Request {
            history: 10,
            since: Some(s),
        };
        assert_eq!(since(500).start(1_000), 500);
        assert_eq!(since(5_000).start(1_000), 1_000, "a future offset is now");
    }

    #[tokio::test]
    async fn a_connector_hands_out_connections() {
        use tokio::io::AsyncReadExt;
        let (shim, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let served = tokio::spawn(serve_connector(OwnedFd::from(shim), |mut s| {
            tokio::spawn(async move {
                let _ = s.write_all(b"hello").await;
            });
        }));
        let c = Connector::from_fd(OwnedFd::from(server)).unwrap();
        for _ in 0..3 {
            let mut s = c.connect().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
        }
        drop(c);
        served.await.unwrap().unwrap();
    }
}
