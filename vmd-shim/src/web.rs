//! The VM's web console: a `vmd-console` next to the VMM, for a VM whose
//! description places one ([`WebConsole`]: a namespace, an address, a port).
//!
//! The shim binds the listening socket itself, from a short-lived thread
//! that enters the VM's network namespace (a namespace is a property of the
//! thread; the socket stays in it): the server never needs to enter it. It
//! runs as nobody with no capabilities, and reaches the console through a
//! connector the shim answers ([`vmd_runtime::attach::Connector`]).
//!
//! The console comes back by itself: a bind that fails (the namespace or
//! its address not there yet) is retried, a server that dies is restarted,
//! both with a back-off; `state.json` says whether it listens, or why not.

use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vmd_runtime::process::say;
use vmd_runtime::spec::WebConsole;
use vmd_runtime::state::WebConsoleState;

use crate::console::{Keyboard, SharedConsole};
use crate::hygiene::{describe, high_fd, Hardening};
use crate::shared::Shared;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);

/// Listens on the console's address inside its namespace.
fn bind(w: &WebConsole) -> std::io::Result<std::net::TcpListener> {
    let netns = std::fs::File::open(&w.netns).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("network namespace {}: {e}", w.netns.display()),
        )
    })?;
    let addr = std::net::SocketAddr::from((w.address, w.port));
    // A thread of its own, which ends right after: the namespace it entered
    // goes with it, nothing else of the shim ever runs there.
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| std::io::Error::other(format!("cannot enter the namespace: {e}")))?;
            std::net::TcpListener::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the bind thread panicked")))
    })
}

/// Who the server runs as: nobody, when the shim can switch to it.
fn nobody() -> Option<(libc::uid_t, libc::gid_t)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("nobody").ok().flatten();
    Some(user.map_or((65534, 65534), |u| (u.uid.as_raw(), u.gid.as_raw())))
}

/// Runs the web console of `w` for as long as the shim runs.
pub async fn run(
    name: String,
    w: WebConsole,
    shared: Shared,
    console: SharedConsole,
    keyboard: Keyboard,
) {
    let url = w.url();
    let record = |listening: bool, error: Option<String>| {
        let url = url.clone();
        shared.set(move |s| {
            s.web_console = Some(WebConsoleState {
                url,
                listening,
                error,
            })
        });
    };
    let mut retry = FIRST_RETRY;
    loop {
        let why = match serve_once(&name, &w, &record, &console, &keyboard).await {
            Ok(stopped) => {
                // It served: start the back-off over.
                retry = FIRST_RETRY;
                stopped.to_string()
            }
            Err(why) => why.to_string(),
        };
        say(format!(
            "web console: {why}; trying again in {} s",
            retry.as_secs()
        ));
        record(false, Some(why));
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(LAST_RETRY);
    }
}

/// Why the web console server could not be started.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot listen on {at}: {source}")]
    Listen { at: String, source: std::io::Error },
    #[error("console connector: {0}")]
    Connector(#[source] std::io::Error),
    #[error("descriptors: {0}")]
    Descriptors(#[source] std::io::Error),
    #[error("cannot start {server}: {source}", server = .server.display())]
    Spawn {
        server: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// How a server that did start came to stop.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error("the web console server exited ({})", describe(.0))]
    Exited(std::process::ExitStatus),
    #[error("lost track of the web console server: {0}")]
    Lost(#[source] std::io::Error),
}

/// Binds, starts the server, and waits for it to exit: `Ok(how it
/// stopped)` once it served, `Err(why it could not)`.
async fn serve_once(
    name: &str,
    w: &WebConsole,
    record: &impl Fn(bool, Option<String>),
    console: &SharedConsole,
    keyboard: &Keyboard,
) -> Result<Stopped, StartError> {
    let in_ns = format!(
        "{} in {}",
        w.url(),
        w.netns.file_name().unwrap_or_default().to_string_lossy()
    );
    let listener = bind(w).map_err(|source| StartError::Listen {
        at: in_ns.clone(),
        source,
    })?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartError::Connector)?;
    let fds = high_fd(listener.as_fd()).and_then(|l| Ok((l, high_fd(theirs.as_fd())?)));
    let (listen_fd, connector_fd) = fds.map_err(StartError::Descriptors)?;
    drop((listener, theirs));
    let mut cmd =
        Hardening::console_server(listen_fd.as_raw_fd(), connector_fd.as_raw_fd(), nobody())
            .command(&w.server);
    cmd.arg("--name").arg(name);
    if let Some(assets) = &w.assets {
        cmd.arg("--assets").arg(assets);
    }
    cmd
        // Its lines (who connected) go where the shim's go: zinit's log.
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit());
    let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
        server: w.server.clone(),
        source,
    })?;
    drop(cmd);
    drop((listen_fd, connector_fd));
    record(true, None);
    say(format!(
        "web console listening on {in_ns} (pid {})",
        child.id().unwrap_or(0)
    ));
    let (console, keyboard) = (Arc::clone(console), keyboard.clone());
    let connector = tokio::spawn(vmd_runtime::attach::serve_connector(
        ours.into(),
        move |s| {
            tokio::spawn(crate::console::serve(
                s,
                Arc::clone(&console),
                keyboard.clone(),
            ));
        },
    ));
    let status = child.wait().await;
    connector.abort();
    Ok(match status {
        Ok(st) => Stopped::Exited(st),
        Err(e) => Stopped::Lost(e),
    })
}
