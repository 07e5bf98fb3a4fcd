//! The shim's console socket ([`crate::RunDir::console_socket`], mode 0600):
//! how a terminal attaches to a VM's serial console. Both sides are here.
//!
//! The client sends one line, `attach history=N` or `attach history=N
//! since=OFFSET`; the shim answers `ok from=OFFSET live=LIVE` (or `error:
//! …` and closes), then streams the console: first what the log holds from
//! `OFFSET` to `LIVE` (the history), then every byte as it is appended,
//! exactly once and in order.
//!
//! A client that shows the console in a terminal emulator replays the
//! history through [`quiet_history`]: a terminal answers the queries a
//! program once sent (where is the cursor, what are you), and answers to
//! queries from the past would reach the guest as typed input.
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

    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let mut words = line.split(' ');
        if words.next() != Some("attach") {
            return Err(RequestError::NotAttach(line.to_owned()));
        }
        let mut req = Request::new(DEFAULT_HISTORY);
        for w in words {
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| RequestError::NotANumber(w.to_owned()))
            };
            match w.split_once('=') {
                Some(("history", v)) => req.history = number(v)?.min(MAX_HISTORY),
                Some(("since", v)) => req.since = Some(number(v)?),
                _ => return Err(RequestError::UnknownOption(w.to_owned())),
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

/// Why the shim refuses an attach line (the text follows `error: `).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not an attach request: {0:?}")]
    NotAttach(String),
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("unknown attach option {0:?}")]
    UnknownOption(String),
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
    /// Where the history ends and live output starts.
    pub live: u64,
    pub stream: UnixStream,
}

impl Attached {
    /// The history's length in bytes (what comes first on the stream).
    pub fn history_len(&self) -> usize {
        (self.live - self.from) as usize
    }
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
        let bad = || AttachError::BadReply(line.clone());
        let rest = line.strip_prefix("ok from=").ok_or_else(bad)?;
        let (from, live) = match rest.split_once(" live=") {
            Some((f, l)) => (f.parse().ok(), l.parse().ok()),
            None => (rest.parse().ok(), None),
        };
        let from: u64 = from.ok_or_else(bad)?;
        let live = live.unwrap_or(from).max(from);
        if live - from > MAX_HISTORY {
            return Err(bad());
        }
        Ok(Attached {
            from,
            live,
            stream: s,
        })
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
pub fn ok_line(from: u64, live: u64) -> String {
    format!("ok from={from} live={live}\n")
}

/// `history` without the terminal queries it holds: device status and
/// attributes requests (`CSI n`, `CSI c`), mode and window reports (`CSI
/// $p`, `CSI t`), keyboard protocol queries (`CSI ? u`), colour queries
/// (`OSC …;?`), setting requests (`DCS $q`, `DCS +q`) and ENQ. What is
/// shown is unchanged; nothing in it makes a terminal answer.
pub fn quiet_history(history: &[u8]) -> Vec<u8> {
    const ESC: u8 = 0x1b;
    let b = history;
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == 0x05 {
            i += 1;
            continue;
        }
        if b[i] == ESC {
            match b.get(i + 1) {
                Some(b'[') => {
                    let params = i + 2;
                    let mut j = params;
                    while j < b.len() && (0x30..=0x3f).contains(&b[j]) {
                        j += 1;
                    }
                    let inter = j;
                    while j < b.len() && (0x20..=0x2f).contains(&b[j]) {
                        j += 1;
                    }
                    if let Some(&fin) = b.get(j).filter(|f| (0x40..=0x7e).contains(*f)) {
                        let query = match fin {
                            b'n' | b'c' | b't' => true,
                            b'p' => b[inter..j].contains(&b'$'),
                            b'u' => b.get(params) == Some(&b'?'),
                            _ => false,
                        };
                        if query {
                            i = j + 1;
                            continue;
                        }
                    }
                }
                Some(&k @ (b']' | b'P')) => {
                    // OSC ends with BEL or ST (ESC \), DCS with ST.
                    let body = i + 2;
                    let mut j = body;
                    let end = loop {
                        match b.get(j) {
                            None => break None,
                            Some(0x07) if k == b']' => break Some(j + 1),
                            Some(&ESC) if b.get(j + 1) == Some(&b'\\') => break Some(j + 2),
                            _ => j += 1,
                        }
                    };
                    if let Some(end) = end {
                        let text = &b[body..j];
                        let query = if k == b']' {
                            text.ends_with(b"?") || text.windows(2).any(|w| w == b";?")
                        } else {
                            text.starts_with(b"$q") || text.starts_with(b"+q")
                        };
                        if query {
                            i = end;
                            continue;
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
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

    #[test]
    fn replayed_history_asks_the_terminal_nothing() {
        let h = b"a\x1b[6nb\x1b[31mc\x1b[cd\x05e\x1b]11;?\x07f\x1b]0;title\x07g\x1b[?u\
                  h\x1b[?2004$pi\x1bP$qm\x1b\\j\x1b[14tk\x1b[2Jl\x1b[";
        assert_eq!(
            quiet_history(h),
            b"ab\x1b[31mcdef\x1b]0;title\x07ghijk\x1b[2Jl\x1b[".to_vec()
        );
        // Busybox's prompt as a real guest printed it.
        assert_eq!(quiet_history(b"/ # \x1b[6n"), b"/ # ".to_vec());
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
