//! A terminal attached to a VM's console socket, as tests drive one: what
//! it has received, waiting for text, typing like a person.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use vmd_runtime::attach::{self, AttachError, Request};

pub struct Terminal {
    socket: PathBuf,
    stream: UnixStream,
    /// Where the first attach started, in the console's absolute offsets.
    pub from: u64,
    /// Everything received, across re-attaches.
    pub seen: Vec<u8>,
}

impl Terminal {
    pub async fn attach(socket: &Path, history: u64) -> Result<Terminal, AttachError> {
        let a = attach::attach(socket, Request::new(history), Duration::from_secs(5)).await?;
        Ok(Terminal {
            socket: socket.to_path_buf(),
            stream: a.stream,
            from: a.from,
            seen: Vec::new(),
        })
    }

    /// The absolute offset just past what was received.
    pub fn at(&self) -> u64 {
        self.from + self.seen.len() as u64
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Reads what is there within `d`; `false` at the end of the stream.
    pub async fn pump(&mut self, d: Duration) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        match tokio::time::timeout(d, self.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.seen.extend_from_slice(&buf[..n]);
                true
            }
            Err(_) => true,
        }
    }

    /// Waits until `text` occurs `times` times in what was received.
    pub async fn wait_for(&mut self, text: &str, times: usize, limit: Duration) {
        let t0 = Instant::now();
        while self.text().matches(text).count() < times {
            assert!(
                t0.elapsed() < limit,
                "{text:?} x{times} not seen within {limit:?}; seen:\n{}",
                crate::vm::tail(&self.text(), 2000)
            );
            if !self.pump(Duration::from_millis(100)).await {
                panic!(
                    "the console closed while waiting for {text:?}; seen:\n{}",
                    crate::vm::tail(&self.text(), 2000)
                );
            }
        }
    }

    /// Reads until the stream ends (the shim dropped this terminal or died).
    pub async fn wait_closed(&mut self, limit: Duration) {
        let t0 = Instant::now();
        while self.pump(Duration::from_millis(100)).await {
            assert!(
                t0.elapsed() < limit,
                "the console stayed open for {limit:?}"
            );
        }
    }

    /// Attaches again from where this terminal stopped (after a shim
    /// restart), retrying while no shim listens.
    pub async fn reattach(&mut self, limit: Duration) {
        let t0 = Instant::now();
        loop {
            let req = Request {
                history: 0,
                since: Some(self.at()),
            };
            match attach::attach(&self.socket, req, Duration::from_secs(5)).await {
                Ok(a) => {
                    assert_eq!(a.from, self.at(), "re-attached elsewhere");
                    self.stream = a.stream;
                    return;
                }
                Err(e) => {
                    assert!(t0.elapsed() < limit, "cannot attach again: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Types `line` and Enter, one key at a time, each after the guest
    /// echoed the one before (a slow guest loses keys sent faster).
    pub async fn type_line(&mut self, line: &str, limit: Duration) {
        for c in line.chars() {
            let before = self.text().matches(c).count();
            self.send(c.to_string().as_bytes()).await.unwrap();
            self.wait_for(&c.to_string(), before + 1, limit).await;
        }
        self.send(b"\r").await.unwrap();
    }
}
