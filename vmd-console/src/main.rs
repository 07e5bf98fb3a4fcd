//! `vmd-console`: the web console of one VM, as Zero-OS's `cloud-console`
//! serves it, so the links users have keep working: `GET /` is a page with a
//! terminal (xterm.js, 80×25, 2 000 lines of scrollback), `GET /ws` a
//! WebSocket carrying the serial console — output as binary frames, the
//! recent console first; keystrokes back as frames, typed into the guest.
//!
//! The shim starts it and gives it everything it needs already open, so it
//! runs with nothing: as nobody, no capabilities, `no_new_privs`.
//!
//! * fd 3: the listening socket, bound by the shim inside the VM's network
//!   namespace on the console's address (this process never enters a
//!   namespace and could not);
//! * fd 4: a [`Connector`]: each web client gets its own connection to the
//!   shim's console (history, live output, paced input; a client that falls
//!   behind is dropped by the shim, nobody waits for it).
//!
//! Lines on stdout (the shim's zinit log): who connected, who left and why.
//!
//! Bounded against clients that are not browsers: a connection must send
//! its request head within `--header-timeout`, at most `--max-pending`
//! connections wait for theirs (more wait in the kernel's backlog: the fds
//! of this process stay bounded), and a WebSocket is refused when its
//! `Origin` is another site's: a page anywhere, opened by someone who can
//! reach the VM, must not get its root console (cross-site WebSocket
//! hijacking). A client without `Origin` is not a browser and is served.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use vmd_runtime::attach::{self, Connector, Request, DEFAULT_HISTORY};
use vmd_runtime::clip::Clipped;
use vmd_runtime::process::{current_thread_runtime, say};

/// A frame from a browser: a keystroke, a paste, at most this much.
const MAX_FRAME: usize = 64 << 10;
/// Console output is sent in frames of at most this much.
const OUTPUT_CHUNK: usize = 8 << 10;
/// Per client buffers, kept small: a VM's console is a slow stream, and the
/// shim, not this process, absorbs a burst (up to its per-client bound).
const READ_BUFFER: usize = 4 << 10;
const WRITE_BUFFER: usize = 8 << 10;

#[derive(Parser)]
#[command(
    name = "vmd-console",
    about = "The web console of one VM (run by vmd-shim)"
)]
struct Cli {
    /// The VM's name (for the log lines).
    #[arg(long)]
    name: String,
    /// The page's files, instead of the page built into the binary: a
    /// directory with index.html and xterm.js from npm (node_modules), as
    /// `console/web` after `npm ci`.
    #[arg(long)]
    assets: Option<PathBuf>,
    /// The listening socket.
    #[arg(long, default_value_t = 3)]
    listen_fd: RawFd,
    /// The connector to the shim's console.
    #[arg(long, default_value_t = 4)]
    connector_fd: RawFd,
    /// Web clients at once; one more gets 503.
    #[arg(long, default_value_t = 64)]
    max_clients: usize,
    /// Bytes of the past console a client gets first.
    #[arg(long, default_value_t = DEFAULT_HISTORY)]
    history: u64,
    /// Connections not yet upgraded to a WebSocket, at once; more wait in
    /// the listening socket's backlog.
    #[arg(long, default_value_t = 64)]
    max_pending: usize,
    /// Seconds a connection has to send its request head (and an idle
    /// keep-alive connection its next one) before it is closed.
    #[arg(long, default_value_t = 10)]
    header_timeout: u64,
}

struct App {
    name: String,
    assets: Option<PathBuf>,
    connector: Connector,
    clients: AtomicUsize,
    max_clients: usize,
    history: u64,
}

/// A web client's place among `max_clients`, given back when it leaves.
struct Slot(Arc<App>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Why the server could not serve (the text follows `web console: `).
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("no {what} on fd {fd} (vmd-console is started by vmd-shim)")]
    NotInherited { what: &'static str, fd: RawFd },
    #[error("listening socket: {0}")]
    Listener(#[source] std::io::Error),
    #[error("console connector: {0}")]
    Connector(#[source] std::io::Error),
    #[error("accepting: {0}")]
    Accept(#[source] std::io::Error),
}

/// Takes over descriptor `fd`, which the shim left open for us.
fn inherited(fd: RawFd, what: &'static str) -> Result<OwnedFd, ServeError> {
    if !is_open(fd) {
        return Err(ServeError::NotInherited { what, fd });
    }
    // SAFETY: the descriptor is open (checked) and nothing else in this
    // process owns it: it was inherited for this purpose.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether descriptor `fd` is open.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only inspects the descriptor, whatever it is.
    unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) >= 0 }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            say(e.to_string());
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format!("web console: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> Result<(), ServeError> {
    let listener = std::net::TcpListener::from(inherited(cli.listen_fd, "listening socket")?);
    listener
        .set_nonblocking(true)
        .map_err(ServeError::Listener)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(ServeError::Listener)?;
    let connector = Connector::from_fd(inherited(cli.connector_fd, "console connector")?)
        .map_err(ServeError::Connector)?;
    let at = listener.local_addr().map_err(ServeError::Listener)?;
    let app = Arc::new(App {
        name: cli.name,
        assets: cli.assets,
        connector,
        clients: AtomicUsize::new(0),
        max_clients: cli.max_clients,
        history: cli.history,
    });
    say(format!("web console of vm {} on http://{at}/", app.name));
    let router = Router::new()
        .route("/", get(page))
        .route("/xterm.js", get(xterm_js))
        .route("/xterm.css", get(xterm_css))
        .route("/ws", get(ws))
        .with_state(app);
    let pending = Arc::new(tokio::sync::Semaphore::new(cli.max_pending.max(1)));
    let header_timeout = Duration::from_secs(cli.header_timeout.max(1));
    loop {
        // A place first: while every place is taken, connections wait in
        // the backlog, not as open fds here.
        let Ok(place) = Arc::clone(&pending).acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of fds or memory for a moment: the next accept may do.
            Err(e) if is_transient(&e) => {
                say(format!("web console: accepting: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(ServeError::Accept(e)),
        };
        let router = router.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            // Errors are the client's (a bad request, a timeout, gone):
            // hyper has answered what could be answered.
            let _ = conn.await;
            // An upgraded connection ends here too: its WebSocket counts
            // against `max_clients` from now on.
            drop(place);
        });
    }
}

/// Whether an accept error passes (the listener itself is fine).
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE)
            | Some(nix::libc::ENFILE)
            | Some(nix::libc::ENOBUFS)
            | Some(nix::libc::ENOMEM)
            | Some(nix::libc::ECONNABORTED)
            | Some(nix::libc::EINTR)
    )
}

/// Whether a WebSocket's `Origin` is this server's own (the authority the
/// browser asked for, `Host`), or absent: no browser.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let origin = origin.to_str().ok().and_then(|o| o.parse::<Uri>().ok());
    let origin = origin.as_ref().and_then(|o| o.authority());
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin, host) {
        (Some(origin), Some(host)) => origin.as_str().eq_ignore_ascii_case(host),
        // `Origin: null` (a sandboxed or file page), unparsable, no Host.
        _ => false,
    }
}

/// One file of the page: `rel` under `--assets` if given, else the copy
/// built into the binary.
async fn file(app: &App, rel: &str, kind: &'static str) -> Response {
    let body = match &app.assets {
        Some(dir) => tokio::fs::read(dir.join(rel)).await.map(Cow::Owned).map_err(|e| {
            say(format!("web console: cannot read {rel}: {e}"));
            "the console page is not installed\n"
        }),
        None => page::embedded(rel).map(Cow::Borrowed).ok_or_else(|| {
            say(format!(
                "web console: {rel} is not built into this binary (it was built before `npm ci`); pass --assets"
            ));
            "the console page is not built into this vmd-console\n"
        }),
    };
    match body {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, kind),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
        Err(text) => (StatusCode::INTERNAL_SERVER_ERROR, text).into_response(),
    }
}

async fn page(State(app): State<Arc<App>>) -> Response {
    file(&app, page::INDEX, "text/html; charset=utf-8").await
}

async fn xterm_js(State(app): State<Arc<App>>) -> Response {
    file(&app, page::XTERM_JS, "text/javascript").await
}

async fn xterm_css(State(app): State<Arc<App>>) -> Response {
    file(&app, page::XTERM_CSS, "text/css").await
}

/// The page built into the binary (see `build.rs`).
mod page {
    pub const INDEX: &str = "index.html";
    pub const XTERM_JS: &str = "node_modules/@xterm/xterm/lib/xterm.js";
    pub const XTERM_CSS: &str = "node_modules/@xterm/xterm/css/xterm.css";

    #[cfg(embedded_page)]
    pub fn embedded(rel: &str) -> Option<&'static [u8]> {
        match rel {
            INDEX => Some(include_bytes!(env!("VMD_CONSOLE_INDEX_HTML"))),
            XTERM_JS => Some(include_bytes!(env!("VMD_CONSOLE_XTERM_JS"))),
            XTERM_CSS => Some(include_bytes!(env!("VMD_CONSOLE_XTERM_CSS"))),
            _ => None,
        }
    }

    #[cfg(not(embedded_page))]
    pub fn embedded(_rel: &str) -> Option<&'static [u8]> {
        None
    }
}

async fn ws(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !same_origin(&headers) {
        let origin = headers
            .get(header::ORIGIN)
            .map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned())
            .unwrap_or_default();
        say(format!(
            "web console: {peer} refused: a page of another site ({})",
            Clipped(&origin)
        ));
        return (
            StatusCode::FORBIDDEN,
            "the console answers only its own page\n",
        )
            .into_response();
    }
    if app.clients.fetch_add(1, Ordering::SeqCst) >= app.max_clients {
        app.clients.fetch_sub(1, Ordering::SeqCst);
        say(format!(
            "web console: {peer} refused: {} clients already",
            app.max_clients
        ));
        return (StatusCode::SERVICE_UNAVAILABLE, "too many consoles open\n").into_response();
    }
    let slot = Slot(Arc::clone(&app));
    upgrade
        .max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| session(slot, peer, socket))
}

/// One web client, until it leaves, the shim drops it, or the shim goes.
async fn session(slot: Slot, peer: SocketAddr, mut socket: WebSocket) {
    let app = Arc::clone(&slot.0);
    let attached = async {
        let s = app.connector.connect().await.map_err(|e| e.to_string())?;
        attach::attach_on(s, Request::new(app.history), Duration::from_secs(5))
            .await
            .map_err(|e| e.to_string())
    };
    let console = match attached.await {
        Ok(a) => a,
        Err(e) => {
            say(format!("web console: {peer}: cannot attach: {e}"));
            let text = format!("\r\n[vmd: the console is not available: {e}]\r\n");
            let _ = socket.send(Message::Binary(Bytes::from(text))).await;
            let _ = socket.close().await;
            return;
        }
    };
    say(format!(
        "web console: {peer} connected ({} open)",
        app.clients.load(Ordering::SeqCst)
    ));
    let history_len = console.history_len();
    let (mut to_browser, mut from_browser) = socket.split();
    let (mut from_shim, mut to_shim) = console.stream.into_split();
    let output = async {
        // The history, without the queries of the past (xterm.js would
        // answer them, into the guest).
        let mut history = vec![0u8; history_len];
        if let Err(e) = from_shim.read_exact(&mut history).await {
            return format!("console: {e}");
        }
        for chunk in attach::quiet_history(&history).chunks(OUTPUT_CHUNK) {
            if let Err(e) = to_browser
                .send(Message::Binary(Bytes::copy_from_slice(chunk)))
                .await
            {
                return format!("browser: {e}");
            }
        }
        drop(history);
        let mut buf = vec![0u8; OUTPUT_CHUNK];
        loop {
            let n = match from_shim.read(&mut buf).await {
                Ok(0) => {
                    return "the console went away (fell behind, or the shim restarted)".to_owned()
                }
                Ok(n) => n,
                Err(e) => return format!("console: {e}"),
            };
            // A slow browser makes this wait; the shim then drops this
            // client rather than wait for it.
            if let Err(e) = to_browser
                .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                .await
            {
                return format!("browser: {e}");
            }
        }
    };
    let input = async {
        while let Some(msg) = from_browser.next().await {
            let bytes: Bytes = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Text(t)) => Bytes::copy_from_slice(t.as_str().as_bytes()),
                Ok(Message::Close(_)) => return "closed by the browser".to_owned(),
                Ok(_) => continue,
                Err(e) => return format!("browser: {e}"),
            };
            // Waits while the guest's keyboard is busy: this browser is not
            // read meanwhile, nobody else waits.
            if let Err(e) = to_shim.write_all(&bytes).await {
                return format!("console: {e}");
            }
        }
        "the browser went away".to_owned()
    };
    let why = tokio::select! {
        w = output => w,
        w = input => w,
    };
    say(format!("web console: {peer} disconnected: {why}"));
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: Option<&str>, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, v.parse().unwrap());
        }
        if let Some(v) = origin {
            h.insert(header::ORIGIN, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_consoles_own_page_or_no_browser_gets_a_websocket() {
        let ok = |host, origin| same_origin(&headers(host, origin));
        assert!(ok(Some("10.20.2.1:20006"), None), "no browser");
        assert!(ok(Some("10.20.2.1:20006"), Some("http://10.20.2.1:20006")));
        assert!(ok(Some("[fd00::1]:20006"), Some("http://[FD00::1]:20006")));
        assert!(!ok(Some("10.20.2.1:20006"), Some("https://evil.example")));
        assert!(!ok(Some("10.20.2.1:20006"), Some("http://10.20.2.1:20007")));
        assert!(!ok(Some("10.20.2.1:20006"), Some("http://10.20.2.1")));
        assert!(!ok(Some("10.20.2.1:20006"), Some("null")));
        assert!(!ok(None, Some("http://10.20.2.1:20006")));
        assert!(!ok(
            Some("10.20.2.1:20006"),
            Some("http://10.20.2.1:20006.evil.example")
        ));
    }
}
