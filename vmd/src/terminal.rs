//! `vmd ctl console NAME`: the operator's terminal on a VM's serial console.
//!
//! It talks to the VM's shim over its console socket ([`vmd_runtime::attach`]),
//! not through Redis, so it works while vmd is down. The terminal is put in
//! raw mode (every key goes to the guest, ^C included) and restored however
//! the session ends; `Ctrl-]` detaches. When the shim restarts, the session
//! attaches again from where it stopped.

use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use vmd_runtime::attach::{self, AttachError, Request};
use vmd_runtime::RunDir;

/// The key that detaches (as telnet and virsh have it).
pub const DETACH: u8 = 0x1d;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("no vm {0} on this host (no run directory at {1})")]
    NoVm(String, String),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("terminal: {0}")]
    Tty(#[from] nix::Error),
    #[error("terminal: {0}")]
    Io(#[from] std::io::Error),
}

/// Raw mode for as long as it lives.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Result<Option<RawMode>, nix::Error> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSAFLUSH, &raw)?;
        Ok(Some(RawMode { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSAFLUSH, &self.saved);
    }
}

/// A line for the operator, readable in raw mode too.
fn note(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r\n[vmd: {text}]\r\n");
    let _ = e.flush();
}

/// Runs the session until `Ctrl-]`, the end of input, or the VM's removal.
pub async fn console(name: &str, run: RunDir, history: u64) -> Result<(), TerminalError> {
    if !run.exists() {
        return Err(TerminalError::NoVm(
            name.to_owned(),
            run.path().display().to_string(),
        ));
    }
    let socket = run.console_socket();
    // The first attach must work: a wrong name or a dead shim is an error,
    // not a terminal waiting forever.
    let first = attach::attach(&socket, Request::new(history), Duration::from_secs(5)).await?;
    let _raw = RawMode::enter()?;
    note(&format!("console of vm {name}; Ctrl-] detaches"));
    let keys = read_keys();
    session(&socket, &run, first, keys).await
}

/// Stdin, read on a thread of its own: a read of a terminal cannot be
/// cancelled, and the process must be able to end while one is pending.
fn read_keys() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

async fn session(
    socket: &Path,
    run: &RunDir,
    first: attach::Attached,
    mut keys: mpsc::Receiver<Vec<u8>>,
) -> Result<(), TerminalError> {
    let mut stdout = tokio::io::stdout();
    let mut at = first.live;
    let history_len = first.history_len();
    let mut stream = first.stream;
    // The history, without the queries of the past: the operator's
    // terminal would answer them, into the guest.
    let mut history = vec![0u8; history_len];
    stream.read_exact(&mut history).await?;
    stdout.write_all(&attach::quiet_history(&history)).await?;
    stdout.flush().await?;
    drop(history);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let lost = loop {
            tokio::select! {
                r = stream.read(&mut buf) => match r {
                    Ok(0) => break "the console closed".to_owned(),
                    Ok(n) => {
                        stdout.write_all(&buf[..n]).await?;
                        stdout.flush().await?;
                        at += n as u64;
                    }
                    Err(e) => break e.to_string(),
                },
                k = keys.recv() => {
                    let Some(k) = k else {
                        // End of input (a pipe): leave quietly.
                        return Ok(());
                    };
                    let (send, detach) = match k.iter().position(|&b| b == DETACH) {
                        Some(i) => (&k[..i], true),
                        None => (&k[..], false),
                    };
                    if !send.is_empty() {
                        if let Err(e) = stream.write_all(send).await {
                            break e.to_string();
                        }
                    }
                    if detach {
                        note("detached");
                        return Ok(());
                    }
                }
            }
        };
        note(&format!("{lost}; attaching again"));
        stream = loop {
            if !run.exists() {
                note("the VM was deleted");
                return Ok(());
            }
            let req = Request {
                history: 0,
                since: Some(at),
            };
            match attach::attach(socket, req, Duration::from_secs(5)).await {
                Ok(a) => {
                    if a.from > at {
                        note(&format!("{} bytes rotated away meanwhile", a.from - at));
                    }
                    at = a.from;
                    break a.stream;
                }
                Err(_) => {
                    // Keys typed while no shim listens reach no one; Ctrl-]
                    // still detaches.
                    let wait = tokio::time::sleep(Duration::from_millis(500));
                    tokio::select! {
                        _ = wait => {}
                        k = keys.recv() => match k {
                            None => return Ok(()),
                            Some(k) if k.contains(&DETACH) => {
                                note("detached");
                                return Ok(());
                            }
                            Some(_) => {}
                        }
                    }
                }
            }
        };
    }
}
