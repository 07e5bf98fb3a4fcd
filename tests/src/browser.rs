//! A real browser for tests: headless Chromium (Debian's `chromium`), run
//! inside a network namespace and driven over the DevTools protocol on a
//! pipe (`--remote-debugging-pipe`: JSON messages ending in NUL on fds 3 and
//! 4), so it needs no port of its own anywhere.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::netns::NetNs;

pub struct Browser {
    child: Child,
    commands: std::fs::File,
    replies: mpsc::UnboundedReceiver<Value>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// One tab.
pub struct Page {
    session: String,
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap()
}

impl Browser {
    /// Starts Chromium inside `ns`.
    pub fn launch(ns: &NetNs) -> Browser {
        let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("no chromium: apt-get install chromium (tests/scripts/test.sh does)");
        let profile = tempfile::tempdir().unwrap();
        let (cmd_r, cmd_w) = pipe();
        let (resp_r, resp_w) = pipe();
        let mut c = ns.command(chromium);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let (r, w) = (cmd_r.as_raw_fd(), resp_w.as_raw_fd());
        // SAFETY: only dup2 between fork and exec.
        unsafe {
            c.pre_exec(move || {
                if libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = c.spawn().expect("cannot start chromium");
        drop((cmd_r, resp_w));
        let (tx, replies) = mpsc::unbounded_channel();
        let resp = std::fs::File::from(resp_r);
        std::thread::spawn(move || {
            let mut r = BufReader::new(resp);
            let mut msg = Vec::new();
            while r.read_until(0, &mut msg).is_ok_and(|n| n > 0) {
                if msg.last() == Some(&0) {
                    msg.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&msg) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
                msg.clear();
            }
        });
        Browser {
            child,
            commands: std::fs::File::from(cmd_w),
            replies,
            next_id: 0,
            _profile: profile,
        }
    }

    /// A DevTools call; its result (events in between are skipped).
    pub async fn call(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("chromium went away");
        let limit = Duration::from_secs(60);
        let t0 = Instant::now();
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            let v = tokio::time::timeout(left, self.replies.recv())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
                .expect("chromium went away");
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a new tab.
    pub async fn open(&mut self, url: &str) -> Page {
        let target = self
            .call("Target.createTarget", json!({ "url": url }), None)
            .await;
        let target = target["targetId"].as_str().unwrap().to_owned();
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
                None,
            )
            .await;
        Page {
            session: attached["sessionId"].as_str().unwrap().to_owned(),
        }
    }

    /// Evaluates `expression` in `page`; its value.
    pub async fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
                Some(&page.session),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Presses one key in `page` as a person would (`\r` is Enter).
    pub async fn key(&mut self, page: &Page, c: char) {
        let (key, code, vk) = match c {
            '\r' => ("Enter".to_owned(), "Enter".to_owned(), 13),
            c => (c.to_string(), String::new(), 0),
        };
        for kind in ["keyDown", "keyUp"] {
            let mut p = json!({"type": kind, "key": key, "windowsVirtualKeyCode": vk});
            if !code.is_empty() {
                p["code"] = json!(code);
            }
            if kind == "keyDown" {
                p["text"] = json!(c.to_string());
            }
            self.call("Input.dispatchKeyEvent", p, Some(&page.session))
                .await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helpers are in its group.
        // SAFETY: killpg has no memory effects; the group is the browser's.
        unsafe {
            libc::killpg(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}
