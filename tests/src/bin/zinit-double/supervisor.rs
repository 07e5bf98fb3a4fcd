//! The supervision state machine, as zinit v0.2.14 runs it.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{Mutex, Notify, RwLock};
use zinit::{Log, Service};

use crate::ring::Ring;

/// zinit waits this long before it respawns, and between test runs.
pub const RESPAWN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Unknown,
    Blocked,
    Spawned,
    Running,
    Success,
    /// The wait status as zinit prints it, e.g. `Exited(Pid(5), 1)`.
    Error(String),
    TestFailure,
    Failure,
}

impl State {
    pub fn text(&self) -> String {
        match self {
            State::Error(w) => format!("Error({w})"),
            other => format!("{other:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    Up,
    Down,
}

pub struct Svc {
    pub config: Service,
    pub pid: i32,
    pub target: Target,
    pub state: State,
    scheduled: bool,
    state_changed: Arc<Notify>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("service name {0:?} unknown")]
    Unknown(String),
    #[error("service {0:?} already monitored")]
    AlreadyMonitored(String),
    #[error("service {0:?} is up")]
    IsUp(String),
    #[error("service {0:?} is down")]
    IsDown(String),
    #[error("zinit is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Other(String),
}

#[derive(Clone)]
pub struct Zinit {
    table: Arc<RwLock<HashMap<String, Arc<Mutex<Svc>>>>>,
    pub ring: Ring,
    env: Arc<HashMap<String, String>>,
    shutting_down: Arc<std::sync::atomic::AtomicBool>,
    /// Wakes services blocked on `after` (zinit's `notify_waiters`).
    released: Arc<Notify>,
}

/// zinit's wait status text for an exit status.
fn wait_text(pid: i32, status: std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("Exited(Pid({pid}), {code})")
    } else if let Some(sig) = status.signal() {
        let name =
            Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.as_str().to_owned());
        format!("Signaled(Pid({pid}), {name}, {})", status.core_dumped())
    } else {
        "StillAlive".to_owned()
    }
}

/// `/etc/environment`, read once at start, as zinit does.
fn read_environment() -> HashMap<String, String> {
    let mut m = HashMap::new();
    if let Ok(text) = std::fs::read_to_string("/etc/environment") {
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') {
                continue;
            }
            let (k, v) = line.split_once('=').unwrap_or((line, ""));
            m.insert(k.to_owned(), v.to_owned());
        }
    }
    m
}

impl Zinit {
    pub fn new(ring_lines: usize) -> Self {
        Zinit {
            table: Arc::default(),
            ring: Ring::new(ring_lines),
            env: Arc::new(read_environment()),
            shutting_down: Arc::default(),
            released: Arc::default(),
        }
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn get(&self, name: &str) -> Result<Arc<Mutex<Svc>>, Error> {
        self.table
            .read()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Unknown(name.to_owned()))
    }

    pub async fn monitor(&self, name: &str, config: Service) -> Result<(), Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let svc = {
            let mut table = self.table.write().await;
            if table.contains_key(name) {
                return Err(Error::AlreadyMonitored(name.to_owned()));
            }
            let svc = Arc::new(Mutex::new(Svc {
                config,
                pid: 0,
                target: Target::Up,
                state: State::Unknown,
                scheduled: false,
                state_changed: Arc::default(),
            }));
            table.insert(name.to_owned(), Arc::clone(&svc));
            svc
        };
        tokio::spawn(self.clone().watch(name.to_owned(), svc));
        Ok(())
    }

    pub async fn list(&self) -> Vec<(String, String)> {
        let table = self.table.read().await;
        let mut out = Vec::new();
        for (name, svc) in table.iter() {
            out.push((name.clone(), svc.lock().await.state.text()));
        }
        out
    }

    pub async fn status(&self, name: &str) -> Result<serde_json::Value, Error> {
        let svc = self.get(name).await?;
        let (pid, state, target, after) = {
            let s = svc.lock().await;
            (s.pid, s.state.text(), s.target, s.config.after.clone())
        };
        let mut deps = serde_json::Map::new();
        for dep in after {
            let st = match self.get(dep.as_str()).await {
                Ok(d) => d.lock().await.state.text(),
                Err(_) => State::Unknown.text(),
            };
            deps.insert(dep.to_string(), serde_json::Value::String(st));
        }
        Ok(serde_json::json!({
            "name": name,
            "pid": pid,
            "state": state,
            "target": format!("{target:?}"),
            "after": deps,
        }))
    }

    pub async fn stop(&self, name: &str) -> Result<(), Error> {
        let svc = self.get(name).await?;
        let mut s = svc.lock().await;
        s.target = Target::Down;
        let sig = s.config.signal.map_or(Signal::SIGTERM, |x| x.stop.0);
        if s.pid == 0 {
            return Ok(());
        }
        killpg(Pid::from_raw(s.pid), sig).map_err(|e| Error::Other(e.to_string()))
    }

    pub async fn start(&self, name: &str) -> Result<(), Error> {
        if self.is_shutting_down() {
            return Err(Error::ShuttingDown);
        }
        let svc = self.get(name).await?;
        svc.lock().await.target = Target::Up;
        tokio::spawn(self.clone().watch(name.to_owned(), svc));
        Ok(())
    }

    pub async fn forget(&self, name: &str) -> Result<(), Error> {
        let mut table = self.table.write().await;
        let svc = table
            .get(name)
            .ok_or_else(|| Error::Unknown(name.to_owned()))?;
        {
            let s = svc.lock().await;
            if s.target == Target::Up || s.pid != 0 {
                return Err(Error::IsUp(name.to_owned()));
            }
        }
        table.remove(name);
        Ok(())
    }

    pub async fn kill(&self, name: &str, sig: Signal) -> Result<(), Error> {
        let svc = self.get(name).await?;
        let s = svc.lock().await;
        if s.pid == 0 {
            return Err(Error::IsDown(name.to_owned()));
        }
        killpg(Pid::from_raw(s.pid), sig).map_err(|e| Error::Other(e.to_string()))
    }

    async fn can_schedule(&self, config: &Service) -> bool {
        let table = self.table.read().await;
        for dep in &config.after {
            let Some(d) = table.get(dep.as_str()) else {
                return false;
            };
            let d = d.lock().await;
            let ok = match d.state {
                State::Running => !d.config.oneshot,
                State::Success => true,
                _ => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }

    async fn set_state(svc: &Mutex<Svc>, state: State) {
        let mut s = svc.lock().await;
        s.state = state;
        s.state_changed.notify_waiters();
    }

    /// Spawns `argv` in its own process group, wired to the ring as zinit does.
    fn spawn(
        &self,
        config: &Service,
        argv: &[String],
        log: Log,
        prefix: &str,
    ) -> std::io::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(config.dir.clone().unwrap_or_else(|| PathBuf::from("/")))
            .envs(self.env.iter())
            .envs(config.env.iter())
            .process_group(0);
        match log {
            Log::None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
            Log::Ring => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            Log::Stdout => {}
        }
        let mut child = cmd.spawn()?;
        if log == Log::Ring {
            self.ring
                .push(format!("[-] {prefix}: ------------ [start] ------------"));
            if let Some(out) = child.stdout.take() {
                self.sink(out, format!("[+] {prefix}"));
            }
            if let Some(err) = child.stderr.take() {
                self.sink(err, format!("[-] {prefix}"));
            }
        }
        Ok(child)
    }

    fn sink(&self, pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static, prefix: String) {
        let ring = self.ring.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            // Like zinit: reading stops at EOF or at the first line that is
            // not UTF-8 (after which the pipe is no longer drained).
            while let Ok(Some(line)) = lines.next_line().await {
                ring.push(format!("{prefix}: {line}"));
            }
        });
    }

    async fn test_loop(self, name: String, config: Service, svc: Arc<Mutex<Svc>>) {
        loop {
            let passed = match &config.test {
                None => Some(true),
                Some(test) => {
                    match self.spawn(&config, test.argv(), config.log, &format!("{name}/test")) {
                        Ok(mut child) => Some(child.wait().await.is_ok_and(|s| s.success())),
                        Err(_) => None,
                    }
                }
            };
            match passed {
                Some(true) => {
                    Self::set_state(&svc, State::Running).await;
                    self.released.notify_waiters();
                    return;
                }
                Some(false) => {}
                // zinit spins here; a double need not burn a CPU to be faithful.
                None => Self::set_state(&svc, State::TestFailure).await,
            }
            tokio::time::sleep(RESPAWN).await;
        }
    }

    async fn watch(self, name: String, svc: Arc<Mutex<Svc>>) {
        {
            let mut s = svc.lock().await;
            if s.target == Target::Down || s.scheduled {
                return;
            }
            s.scheduled = true;
        }
        loop {
            let config = {
                let s = svc.lock().await;
                if s.target == Target::Down {
                    break;
                }
                s.config.clone()
            };
            loop {
                let released = self.released.notified();
                if self.can_schedule(&config).await {
                    break;
                }
                Self::set_state(&svc, State::Blocked).await;
                released.await;
            }
            let mut s = svc.lock().await;
            if s.target == Target::Down {
                break;
            }
            let mut child = match self.spawn(&config, config.exec.argv(), config.log, &name) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("zinit: ERROR service {name} failed to start: {e}");
                    s.state = State::Failure;
                    s.state_changed.notify_waiters();
                    break;
                }
            };
            let pid = child.id().map_or(0, |p| p as i32);
            s.pid = pid;
            s.state = if config.oneshot {
                State::Running
            } else {
                State::Spawned
            };
            s.state_changed.notify_waiters();
            drop(s);

            let tester = (!config.oneshot).then(|| {
                tokio::spawn(
                    self.clone()
                        .test_loop(name.clone(), config.clone(), Arc::clone(&svc)),
                )
            });
            let status = child.wait().await;
            if let Some(t) = tester {
                t.abort();
            }
            {
                let mut s = svc.lock().await;
                s.pid = 0;
                s.state = match status {
                    Ok(st) if st.success() => State::Success,
                    Ok(st) => State::Error(wait_text(pid, st)),
                    Err(_) => State::Unknown,
                };
                s.state_changed.notify_waiters();
            }
            if config.oneshot {
                self.released.notify_waiters();
                break;
            }
            tokio::time::sleep(RESPAWN).await;
        }
        svc.lock().await.scheduled = false;
    }

    /// Stops every live service, dependents before their dependencies, each
    /// waited for up to its `shutdown_timeout`; then zinit exits.
    pub async fn shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let services: Vec<(String, Arc<Mutex<Svc>>)> = self
            .table
            .read()
            .await
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let mut pending: Vec<(String, Arc<Mutex<Svc>>)> = Vec::new();
        for (name, svc) in services {
            let alive = matches!(svc.lock().await.state, State::Running | State::Spawned);
            if alive {
                pending.push((name, svc));
            }
        }
        while !pending.is_empty() {
            // Those no other pending service depends on go first.
            let mut needed = std::collections::HashSet::new();
            for (_, svc) in &pending {
                for dep in &svc.lock().await.config.after {
                    needed.insert(dep.to_string());
                }
            }
            let (mut now, later): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|(n, _)| !needed.contains(n));
            // A dependency cycle: stop the rest together.
            let later = if now.is_empty() {
                now = later;
                Vec::new()
            } else {
                later
            };
            let mut waits = Vec::new();
            for (name, svc) in now {
                let _ = self.stop(&name).await;
                waits.push(tokio::spawn(async move {
                    let (timeout, changed) = {
                        let s = svc.lock().await;
                        (
                            s.config.shutdown_timeout.unwrap_or(10),
                            Arc::clone(&s.state_changed),
                        )
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(timeout), async {
                        loop {
                            let c = changed.notified();
                            if !matches!(svc.lock().await.state, State::Running | State::Spawned) {
                                return;
                            }
                            c.await;
                        }
                    })
                    .await;
                }));
            }
            for w in waits {
                let _ = w.await;
            }
            pending = later;
        }
    }

    /// Loads and monitors every `*.yaml` file of `dir` (zinit's start-up).
    pub async fn load_dir(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_file())
                || p.extension().is_none_or(|x| x != "yaml")
            {
                continue;
            }
            let Some(name) = p.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            match load(&p) {
                Ok(svc) => {
                    if let Err(e) = self.monitor(name, svc).await {
                        eprintln!("zinit: ERROR failed to monitor service {name}: {e}");
                    }
                }
                Err(e) => eprintln!("zinit: ERROR failed to load config file {p:?}: {e}"),
            }
        }
    }
}

pub fn load(path: &Path) -> Result<Service, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    Service::from_yaml(&text).map_err(|e| e.to_string())
}
