//! A zinit for one test: the double by default, the real one when
//! `VMD_TEST_ZINIT=/path/to/zinit` is set. Socket and config dir live in a
//! temp dir; teardown kills every service's process group and zinit itself.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::bin;

pub struct Supervisor {
    pub dir: tempfile::TempDir,
    binary: PathBuf,
    child: Option<Child>,
}

/// The zinit binary the tests run against.
pub fn zinit_binary() -> PathBuf {
    match std::env::var_os("VMD_TEST_ZINIT") {
        Some(p) => PathBuf::from(p),
        None => bin("zinit-double"),
    }
}

/// Whether the tests run against a real zinit.
pub fn real_zinit() -> bool {
    std::env::var_os("VMD_TEST_ZINIT").is_some()
}

impl Supervisor {
    pub fn start() -> Self {
        Self::start_in(
            tempfile::Builder::new()
                .prefix("vmd-zinit-")
                .tempdir()
                .expect("temp dir"),
        )
    }

    /// zinit with its config directory on a tmpfs, as on a Zero-OS node
    /// (its root file system, `/etc/zinit` included, is in RAM).
    pub fn start_on_tmpfs() -> Self {
        Self::start_in(crate::tmpfs_dir("vmd-zinit-"))
    }

    fn start_in(dir: tempfile::TempDir) -> Self {
        std::fs::create_dir(dir.path().join("etc")).expect("config dir");
        let mut s = Supervisor {
            dir,
            binary: zinit_binary(),
            child: None,
        };
        s.spawn();
        s
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("zinit.sock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn config_dir(&self) -> zinit::ConfigDir {
        zinit::ConfigDir::open(self.config_path()).expect("config dir")
    }

    pub fn client(&self) -> zinit::Client {
        zinit::Client::new(self.socket()).with_timeout(Duration::from_secs(5))
    }

    /// What zinit and its services (the shims) printed so far: for a
    /// failing test to show.
    pub fn output(&self) -> String {
        let own = std::fs::read(self.dir.path().join("zinit.out")).unwrap_or_default();
        let services = self.cli(&["log", "-s"]).stdout;
        String::from_utf8_lossy(&[own, services].concat()).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("zinit.out")).expect("log file");
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-s")
            .arg(self.socket())
            .arg("init")
            .arg("-c")
            .arg(self.config_path())
            .arg("--container")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("start zinit"));
        let t0 = Instant::now();
        while self.raw("list").is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "zinit did not come up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One blocking command on the control socket (for teardown, where no
    /// async runtime may be at hand).
    fn raw(&self, command: &str) -> Option<serde_json::Value> {
        let mut s = UnixStream::connect(self.socket()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        serde_json::from_str(&out).ok()
    }

    /// Runs the zinit binary as a client (`zinit -s SOCK ARGS...`).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .arg("-s")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("run zinit client")
    }

    /// Pids (= process groups) of every service with a process.
    pub fn service_pids(&self) -> Vec<i32> {
        let Some(list) = self.raw("list") else {
            return Vec::new();
        };
        let names: Vec<String> = list["body"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names
            .iter()
            .filter_map(|n| {
                let quoted = shlex::try_quote(n).ok()?;
                let st = self.raw(&format!("status {quoted}"))?;
                st["body"]["pid"]
                    .as_i64()
                    .filter(|p| *p > 0)
                    .map(|p| p as i32)
            })
            .collect()
    }

    /// Stops zinit the hard way, with every service's process group.
    pub fn kill_all(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pids = self.service_pids();
        // Freeze zinit so it respawns nothing while the groups die.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGSTOP);
        }
        // Plus whatever it started after the listing (a respawn): its
        // children, found while it is frozen.
        let zinit_pid = child.id() as i32;
        let children = children_of(zinit_pid);
        for pid in pids.into_iter().chain(children.iter().copied()) {
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
        for pid in children {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Pids whose parent is `parent` (from /proc/<pid>/stat).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid …": comm may hold spaces, so after ')'.
            let ppid: i32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == parent).then_some(pid)
        })
        .collect()
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Pids of live processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        // Zombies have an empty cmdline and are not "left running".
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            out.push(pid);
        }
    }
    out
}
