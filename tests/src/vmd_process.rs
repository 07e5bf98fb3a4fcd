//! The real `vmd` binary, started for one test with every path in a temp dir.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{bin, RedisServer};

pub struct VmdProcess {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    broker: String,
}

impl VmdProcess {
    pub fn start(redis: &RedisServer, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmd-daemon-")
            .tempdir()
            .expect("temp dir");
        let mut p = VmdProcess {
            dir,
            child: None,
            broker: redis.url(),
        };
        p.spawn(extra);
        p
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("vmd.stderr")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    fn spawn(&mut self, extra: &[&str]) {
        let d = self.dir.path();
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("stderr file");
        let mut cmd = Command::new(bin("vmd"));
        cmd.arg("--broker")
            .arg(&self.broker)
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runtime-dir")
            .arg(d.join("run"))
            .arg("--zinit-socket")
            .arg(d.join("zinit.sock"))
            .arg("--zinit-dir")
            .arg(d.join("zinit"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start vmd"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("try_wait")
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// `vmd ctl ARGS` against this daemon's broker: (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin("vmd"))
            .arg("--broker")
            .arg(&self.broker)
            .arg("ctl")
            .args(args)
            .output()
            .expect("run vmd ctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for VmdProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
