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
    /// Flags of every start (the paths and `extra`).
    args: Vec<String>,
    /// Its `--runtime-dir`.
    runtime: PathBuf,
}

impl VmdProcess {
    /// vmd with its own (dead) zinit socket: for tests of the zbus side.
    pub fn start(redis: &RedisServer, extra: &[&str]) -> Self {
        Self::start_with(redis, None, extra)
    }

    /// vmd talking to `zinit` (socket and config dir), with
    /// `extra` flags after the path flags.
    pub fn start_with(
        redis: &RedisServer,
        zinit: Option<&crate::Supervisor>,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vmd-daemon-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let (zsock, zdir) = match zinit {
            Some(z) => (z.socket(), z.config_path()),
            None => (d.join("zinit.sock"), d.join("zinit")),
        };
        let mut args: Vec<String> = vec![
            "--root".into(),
            d.join("root").to_string_lossy().into_owned(),
        ];
        // The caller's runtime directory (a tmpfs, as on a node), else one
        // of the test's.
        let runtime = match extra.iter().position(|a| *a == "--runtime-dir") {
            Some(i) => PathBuf::from(extra[i + 1]),
            None => {
                args.push("--runtime-dir".into());
                args.push(d.join("run").to_string_lossy().into_owned());
                d.join("run")
            }
        };
        // Where a node has them (/var/run/cloud-hypervisor,
        // /var/run/cache/vmd), the test's own: beside the runtime directory's
        // other files.
        for (flag, sub) in [
            ("--api-socket-dir", "api"),
            ("--go-config-dir", "go-config"),
        ] {
            if !extra.contains(&flag) {
                args.push(flag.into());
                args.push(runtime.join(sub).to_string_lossy().into_owned());
            }
        }
        args.extend([
            "--zinit-socket".into(),
            zsock.to_string_lossy().into_owned(),
            "--zinit-dir".into(),
            zdir.to_string_lossy().into_owned(),
        ]);
        // VMs' files are in the test's temp dirs (and where the real guest
        // is), not where a node keeps them; vmd's own dirs stay refused.
        if !extra.contains(&"--allowed-path") {
            let mut allowed = vec![std::env::temp_dir()];
            for var in ["VMD_TEST_KERNEL", "VMD_TEST_INITRD"] {
                if let Some(dir) = std::env::var_os(var)
                    .map(PathBuf::from)
                    .and_then(|p| p.parent().map(|d| d.to_owned()))
                {
                    allowed.push(dir);
                }
            }
            for a in allowed {
                args.push("--allowed-path".into());
                args.push(a.to_string_lossy().into_owned());
            }
        }
        // The test's hypervisor unless the caller names one.
        if !extra.contains(&"--cloud-hypervisor") {
            args.push("--cloud-hypervisor".into());
            args.push(crate::vm::ch_binary().to_string_lossy().into_owned());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut p = VmdProcess {
            runtime,
            dir,
            child: None,
            broker: redis.url(),
            args,
        };
        p.spawn();
        p
    }

    /// Waits (up to 20 s) until vmd answers its zbus status object.
    pub async fn wait_ready(&self) {
        let broker: vmd::zbus::broker::Broker = self.broker.parse().expect("broker URL");
        let quick = vmd::stub::VmdStub::new(broker).with_timeout(Duration::from_millis(500));
        let t0 = Instant::now();
        while quick.status().await.is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "vmd did not come up:\n{}",
                self.stderr()
            );
        }
    }

    /// SIGKILL, then start again with the same flags (a crash and a restart).
    pub fn crash_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn();
    }

    /// SIGKILL, no restart.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again after [`VmdProcess::crash`].
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Its flags, for a restart with other ones (benchmarks).
    pub fn args_mut(&mut self) -> &mut Vec<String> {
        &mut self.args
    }

    pub fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }

    pub fn runtime(&self) -> std::path::PathBuf {
        self.runtime.clone()
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("vmd.stderr")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("stderr file");
        let mut cmd = Command::new(bin("vmd"));
        cmd.arg("--broker")
            .arg(&self.broker)
            .args(&self.args)
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

    /// The command line of every start, program first.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec![
            bin("vmd").to_string_lossy().into_owned(),
            "--broker".into(),
            self.broker.clone(),
        ];
        argv.extend(self.args.iter().cloned());
        argv
    }

    /// From now on vmd runs as the zinit service `service`, as on a node:
    /// the test's own child is killed and zinit starts and supervises vmd
    /// with the same command line. Returns once the service is monitored.
    pub async fn move_under_zinit(&mut self, zinit: &crate::Supervisor, service: &str) {
        self.crash();
        let mut unit = zinit::Service::new(zinit::Command::new(self.argv()).expect("argv"));
        unit.env.insert("RUST_LOG".into(), "info".into());
        let name = zinit::ServiceName::new(service).expect("service name");
        zinit
            .config_dir()
            .install(&name, &unit)
            .expect("vmd's unit");
        zinit.client().monitor(&name).await.expect("monitor vmd");
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
