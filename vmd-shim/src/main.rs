//! `vmd-shim --dir <runtime dir of the VM>`: runs one VM under zinit.
//!
//! Lifecycle lines go to stdout (zinit's ring: `zinit log vm:<name>`); the
//! VMM's own log lines to stderr and the console log; console bytes only to
//! the console log.

use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, timeout, Instant};

use vmd_shim::console::ConsoleLog;
use vmd_shim::hygiene::{needed_caps, Hardening};
use vmd_shim::spec::{RunDir, VmSpec};
use vmd_shim::state::{decide, now_secs, Decision, Exit, Phase, ProcessIdentity, ShimState};
use vmd_shim::{api, args};

#[derive(Parser)]
#[command(
    name = "vmd-shim",
    about = "Runs one VM (cloud-hypervisor) under zinit"
)]
struct Cli {
    /// The VM's runtime directory (holds vm.json).
    #[arg(long)]
    dir: PathBuf,
}

fn say(msg: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", msg.as_ref());
    let _ = out.flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread: the VMM's death signal is bound to the thread that forks it.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(format!("cannot start: {e}"));
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(Shim::run(RunDir(cli.dir)))
}

enum StopFrom {
    /// SIGTERM/SIGINT (zinit stop): stop, then exit.
    Signal,
    /// vmd on the control socket: stop, reply, then stay idle.
    Control(oneshot::Sender<String>),
}

struct Shim {
    spec: VmSpec,
    run: RunDir,
    state: Arc<Mutex<ShimState>>,
    log: Arc<Mutex<ConsoleLog>>,
    stops: mpsc::Receiver<StopFrom>,
}

/// A running VMM and what watches it.
struct Vmm {
    /// One virtiofsd per share; killed when the VMM is gone (on drop).
    _fs_daemons: Vec<Child>,
    child: Child,
    pid: i32,
    shutdown_event: Arc<AtomicBool>,
    vcpu_error: Arc<AtomicBool>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => {
            let name = nix::sys::signal::Signal::try_from(s).map_or("?", |s| s.as_str());
            format!("signal {s} ({name})")
        }
        _ => "unknown status".into(),
    }
}

impl Shim {
    async fn run(run: RunDir) -> ExitCode {
        if run.deleted_mark().exists() {
            say("the VM is being deleted: not starting it");
            return ExitCode::SUCCESS;
        }
        if !run.spec().exists() {
            say(format!(
                "no VM description at {}: nothing to run",
                run.spec().display()
            ));
            return ExitCode::SUCCESS;
        }
        let spec = match VmSpec::load(&run.spec()) {
            Ok(s) => s,
            Err(e) => {
                say(format!("cannot start: {e}"));
                return ExitCode::FAILURE;
            }
        };
        let log = match ConsoleLog::open(
            &spec.console.log,
            spec.console.rotate_bytes,
            spec.console.keep_bytes,
        ) {
            Ok(l) => l,
            Err(e) => {
                say(format!(
                    "cannot open the console log {}: {e}",
                    spec.console.log.display()
                ));
                return ExitCode::FAILURE;
            }
        };
        let mut state = ShimState::load(&run.state());
        // A shim that died with its VMM: the death signal killed the VMM,
        // but make sure, identity-checked so a reused pid is left alone.
        if let Some(old) = state.vmm.take() {
            if old.alive() {
                say(format!(
                    "killing the VMM left by a previous shim (pid {})",
                    old.pid
                ));
                unsafe {
                    libc::kill(old.pid, libc::SIGKILL);
                }
            }
        }
        let (stop_tx, stops) = mpsc::channel(4);
        let mut shim = Shim {
            spec,
            run,
            state: Arc::new(Mutex::new(state)),
            log: Arc::new(Mutex::new(log)),
            stops,
        };
        if let Err(e) = shim.listen(stop_tx.clone()) {
            say(format!("cannot open the control socket: {e}"));
            return ExitCode::FAILURE;
        }
        tokio::spawn(forward_signals(stop_tx));
        let caps: Vec<String> = needed_caps(&shim.spec)
            .iter()
            .map(|(c, why)| format!("{c} ({why})"))
            .collect();
        say(format!(
            "shim for vm {} (pid {}); VMM keeps capabilities: {}",
            shim.spec.name,
            std::process::id(),
            if caps.is_empty() {
                "none".into()
            } else {
                caps.join(", ")
            }
        ));
        shim.supervise().await
    }

    fn set(&self, f: impl FnOnce(&mut ShimState)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        if let Err(e) = st.save(&self.run.state()) {
            eprintln!("cannot save {}: {e}", self.run.state().display());
        }
    }

    fn phase(&self) -> Phase {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).phase
    }

    /// The control socket: `stop` and `status`.
    fn listen(&self, stops: mpsc::Sender<StopFrom>) -> std::io::Result<()> {
        let path = self.run.control_socket();
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let state = Arc::clone(&self.state);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (stops, state) = (stops.clone(), Arc::clone(&state));
                tokio::spawn(async move {
                    let mut s = BufReader::new(s);
                    let mut line = String::new();
                    if timeout(Duration::from_secs(5), s.read_line(&mut line))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let reply = match line.trim() {
                        "status" => {
                            let st = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
                            serde_json::to_string(&st).unwrap_or_default()
                        }
                        "stop" => {
                            let (tx, rx) = oneshot::channel();
                            if stops.send(StopFrom::Control(tx)).await.is_err() {
                                return;
                            }
                            rx.await.unwrap_or_else(|_| "error: shim exiting".into())
                        }
                        other => format!("error: unknown command {other:?}"),
                    };
                    let _ = s.get_mut().write_all(format!("{reply}\n").as_bytes()).await;
                });
            }
        });
        Ok(())
    }

    async fn supervise(&mut self) -> ExitCode {
        match self.phase() {
            Phase::Failed => {
                say("the VM failed earlier; staying idle until it is deleted");
                return self.idle().await;
            }
            Phase::PoweredOff => {
                say("the guest powered off earlier and is not kept alive; staying idle");
                return self.idle().await;
            }
            _ => {}
        }
        loop {
            let restart = self
                .state
                .lock()
                .map(|s| s.vmm_started_at.is_some())
                .unwrap_or(false);
            self.set(|s| {
                s.phase = Phase::Starting;
                if restart {
                    s.restarts += 1;
                }
            });
            let exit = match self.start_vmm() {
                Err(e) => Exit {
                    at: now_secs(),
                    status: format!("could not start the VMM: {e}"),
                    clean: false,
                },
                Ok(mut vmm) => {
                    let locker = tokio::spawn(keep_locked(self.run.clone()));
                    let status = tokio::select! {
                        st = vmm.child.wait() => st,
                        stop = self.stops.recv() => {
                            locker.abort();
                            return self.stop_vmm(vmm, stop).await;
                        }
                    };
                    locker.abort();
                    // Let the console and events drain before judging the exit.
                    let _ = timeout(Duration::from_secs(2), async {
                        for p in vmm.pumps.drain(..) {
                            let _ = p.await;
                        }
                    })
                    .await;
                    classify(&vmm, status)
                }
            };
            say(format!("vmm exited: {}", exit.status));
            let decision = {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let mut exits = std::mem::take(&mut st.exits);
                let d = decide(
                    &self.spec.restart,
                    self.spec.keep_alive,
                    &mut exits,
                    exit.clone(),
                );
                st.exits = exits;
                st.vmm = None;
                d
            };
            match decision {
                Decision::Restart { after } => {
                    self.set(|s| {
                        s.phase = Phase::BackingOff;
                        s.reason = Some(exit.status.clone());
                    });
                    say(format!("restarting in {} s", after.as_secs()));
                    tokio::select! {
                        _ = sleep(after) => {}
                        stop = self.stops.recv() => return self.stopped(stop).await,
                    }
                }
                Decision::StayOff => {
                    self.set(|s| {
                        s.phase = Phase::PoweredOff;
                        s.reason = Some("the guest powered off".into());
                    });
                    say("the guest powered off; not restarting it (no keep-alive)");
                    return self.idle().await;
                }
                Decision::GiveUp { reason } => {
                    let tail = self.log.lock().map(|l| l.tail(2048)).unwrap_or_default();
                    self.set(|s| {
                        s.phase = Phase::Failed;
                        s.reason = Some(reason.clone());
                        s.last_console = Some(tail);
                    });
                    say(format!("gave up: {reason}"));
                    return self.idle().await;
                }
            }
        }
    }

    /// Waits, starting nothing, until asked to stop.
    async fn idle(&mut self) -> ExitCode {
        loop {
            match self.stops.recv().await {
                None | Some(StopFrom::Signal) => {
                    say("stopped");
                    return ExitCode::SUCCESS;
                }
                Some(StopFrom::Control(reply)) => {
                    let _ = reply.send("stopped".into());
                }
            }
        }
    }

    /// A stop that came while no VMM ran (during a back-off).
    async fn stopped(&mut self, stop: Option<StopFrom>) -> ExitCode {
        self.set(|s| s.phase = Phase::Stopped);
        say("stopped");
        match stop {
            Some(StopFrom::Control(reply)) => {
                let _ = reply.send("stopped".into());
                self.idle().await
            }
            _ => ExitCode::SUCCESS,
        }
    }

    fn start_vmm(&mut self) -> Result<Vmm, String> {
        let run = &self.run;
        for stale in [run.api_socket(), run.serial_socket()] {
            let _ = std::fs::remove_file(&stale);
            let mut lock = stale.into_os_string();
            lock.push(".lock");
            let _ = std::fs::remove_file(PathBuf::from(lock));
        }
        let fs_daemons = start_virtiofsd(&self.spec)?;
        let (ev_r, ev_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| format!("event pipe: {e}"))?;
        let hardening = Hardening::new(&self.spec, Some(ev_w.as_raw_fd()));
        let mut cmd = tokio::process::Command::new(&self.spec.hypervisor);
        cmd.args(args::hypervisor_args(&self.spec, run))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        unsafe {
            cmd.pre_exec(move || hardening.apply());
        }
        say(format!(
            "starting the VMM: {}",
            self.spec.hypervisor.display()
        ));
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.spec.hypervisor.display()))?;
        drop(ev_w);
        let pid = child.id().map_or(0, |p| p as i32);
        let identity = ProcessIdentity::of(pid);
        self.set(|s| {
            s.phase = Phase::Running;
            s.vmm = identity;
            s.vmm_started_at = Some(now_secs());
        });
        say(format!("vmm running pid={pid}"));

        let shutdown_event = Arc::new(AtomicBool::new(false));
        let vcpu_error = Arc::new(AtomicBool::new(false));
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump_lines(
                out,
                Arc::clone(&self.log),
                Arc::clone(&vcpu_error),
            )));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump_lines(
                err,
                Arc::clone(&self.log),
                Arc::clone(&vcpu_error),
            )));
        }
        pumps.push(tokio::spawn(pump_events(ev_r, Arc::clone(&shutdown_event))));
        pumps.push(tokio::spawn(pump_serial(
            run.serial_socket(),
            Arc::clone(&self.log),
            pid,
        )));
        Ok(Vmm {
            _fs_daemons: fs_daemons,
            child,
            pid,
            shutdown_event,
            vcpu_error,
            pumps,
        })
    }

    /// Stops a running VMM gracefully, then reports and exits or idles.
    async fn stop_vmm(&mut self, mut vmm: Vmm, stop: Option<StopFrom>) -> ExitCode {
        self.set(|s| s.phase = Phase::Stopping);
        let how = graceful_stop(
            &mut vmm,
            &self.run.api_socket(),
            Duration::from_secs(self.spec.grace_secs),
        )
        .await;
        let _ = timeout(Duration::from_secs(2), async {
            for p in vmm.pumps.drain(..) {
                let _ = p.await;
            }
        })
        .await;
        self.set(|s| {
            s.phase = Phase::Stopped;
            s.vmm = None;
            s.reason = Some(how.clone());
        });
        say(format!("stopped: {how}"));
        match stop {
            Some(StopFrom::Control(reply)) => {
                let _ = reply.send("stopped".into());
                self.idle().await
            }
            _ => ExitCode::SUCCESS,
        }
    }
}

/// Starts one virtiofsd per share and waits for its socket: the VMM
/// connects to them at start. Each in its own process group (zinit's stop
/// must not take a share away from a guest that is shutting down), dying with
/// the shim, killed when dropped (`kill_on_drop`) once the VMM is gone.
fn start_virtiofsd(spec: &VmSpec) -> Result<Vec<Child>, String> {
    let mut daemons = Vec::new();
    for share in &spec.shares {
        let _ = std::fs::remove_file(&share.socket);
        let mut cmd = tokio::process::Command::new(&spec.virtiofsd);
        cmd.arg(format!("--socket-path={}", share.socket.display()))
            .arg(format!("--shared-dir={}", share.source.display()))
            .args(["--cache=auto", "--sandbox=chroot"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("parent died before exec"));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot start {} for share {}: {e}",
                spec.virtiofsd.display(),
                share.tag
            )
        })?;
        let t0 = std::time::Instant::now();
        while !share.socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "virtiofsd for share {} exited: {}",
                    share.tag,
                    describe(&st)
                ));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "virtiofsd for share {} did not create its socket",
                    share.tag
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        say(format!(
            "virtiofsd for share {} running pid={}",
            share.tag,
            child.id().unwrap_or(0)
        ));
        daemons.push(child);
    }
    Ok(daemons)
}

/// What an exit of the VMM was. Exit code 0 alone proves nothing: the VMM
/// also exits 0 when a vCPU died; only the VM's own shutdown event makes it a
/// guest power-off.
fn classify(vmm: &Vmm, status: std::io::Result<ExitStatus>) -> Exit {
    let at = now_secs();
    let st = match status {
        Ok(st) => st,
        Err(e) => {
            return Exit {
                at,
                status: format!("lost track of the VMM: {e}"),
                clean: false,
            }
        }
    };
    let vcpu = vmm.vcpu_error.load(Ordering::SeqCst);
    let event = vmm.shutdown_event.load(Ordering::SeqCst);
    let (status, clean) = match st.code() {
        Some(0) if event && !vcpu => ("guest powered off".to_owned(), true),
        Some(0) if vcpu => (
            "exit 0 after a vCPU error (the guest died)".to_owned(),
            false,
        ),
        Some(0) => ("exit 0 without a guest shutdown".to_owned(), false),
        _ => (describe(&st), false),
    };
    Exit { at, status, clean }
}

/// Power button, repeated with growing pauses (4 s, 8 s, 16 s …) through the
/// grace period — a press before the guest armed its ACPI handler is lost,
/// while pressing too often makes a slow guest run one power-off handler per
/// press (seen on emulated KVM: they crash each other) — then the API's hard
/// stops, then SIGKILL.
async fn graceful_stop(vmm: &mut Vmm, api_socket: &std::path::Path, grace: Duration) -> String {
    say(format!(
        "stopping: power button, grace {} s",
        grace.as_secs()
    ));
    let deadline = Instant::now() + grace;
    // A paused (locked) guest cannot see the power button; it may hold data
    // it still has to flush, so it gets to run for its shutdown.
    if vm_state(api_socket).await.as_deref() == Some("Paused") {
        say("the VM is paused (locked): resuming it so it can shut down cleanly");
        let _ = api::call(api_socket, "PUT", "vm.resume", Duration::from_secs(1)).await;
    }
    let mut pause = Duration::from_secs(4);
    loop {
        let _ = api::call(api_socket, "PUT", "vm.power-button", Duration::from_secs(1)).await;
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(st) = timeout(left.min(pause), vmm.child.wait()).await {
            let st = st.map(|s| describe(&s)).unwrap_or_default();
            return format!("the guest powered off ({st})");
        }
        if Instant::now() >= deadline {
            break;
        }
        pause *= 2;
    }
    say("the guest did not power off in time: shutting the VMM down");
    let _ = api::call(api_socket, "PUT", "vm.shutdown", Duration::from_secs(2)).await;
    let _ = api::call(api_socket, "PUT", "vmm.shutdown", Duration::from_secs(2)).await;
    if let Ok(st) = timeout(Duration::from_secs(3), vmm.child.wait()).await {
        let st = st.map(|s| describe(&s)).unwrap_or_default();
        return format!("forced after the grace period ({st})");
    }
    say("the VMM ignored vmm.shutdown: SIGKILL");
    unsafe {
        libc::killpg(vmm.pid, libc::SIGKILL);
    }
    let st = vmm
        .child
        .wait()
        .await
        .map(|s| describe(&s))
        .unwrap_or_default();
    format!("killed after the grace period ({st})")
}

/// The VMM's `vm.info` state (`Running`, `Paused`, …), if it answers.
async fn vm_state(api_socket: &std::path::Path) -> Option<String> {
    let body = api::expect_ok(api_socket, "GET", "vm.info", Duration::from_secs(1))
        .await
        .ok()?;
    let info: serde_json::Value = serde_json::from_slice(&body).ok()?;
    info["state"].as_str().map(str::to_owned)
}

/// Keeps a locked VM locked across VMM restarts: once a new VMM has booted
/// the guest, pauses it if the VM carries the lock mark. vmd writes the mark
/// before pausing and removes it before resuming; the check after the pause
/// undoes a pause that raced with an unlock.
async fn keep_locked(run: RunDir) {
    let api_socket = run.api_socket();
    let t0 = Instant::now();
    loop {
        match vm_state(&api_socket).await.as_deref() {
            Some("Running") => break,
            Some("Paused") => return,
            _ if t0.elapsed() > Duration::from_secs(600) => return,
            _ => sleep(Duration::from_millis(50)).await,
        }
    }
    if !run.locked_mark().exists() {
        return;
    }
    match api::expect_ok(&api_socket, "PUT", "vm.pause", Duration::from_secs(5)).await {
        Ok(_) => say("the VM is locked: paused it after boot"),
        Err(e) => say(format!("the VM is locked but could not be paused: {e}")),
    }
    if !run.locked_mark().exists() {
        let _ = api::call(&api_socket, "PUT", "vm.resume", Duration::from_secs(5)).await;
    }
}

async fn forward_signals(stops: mpsc::Sender<StopFrom>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if stops.send(StopFrom::Signal).await.is_err() {
            return;
        }
    }
}

/// The VMM's own output: into the console log and to our stderr.
async fn pump_lines(
    pipe: impl tokio::io::AsyncRead + Unpin,
    log: Arc<Mutex<ConsoleLog>>,
    vcpu_error: Arc<AtomicBool>,
) {
    let mut lines = BufReader::new(pipe).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        if line.windows(20).any(|w| w == b"VCPU generated error") {
            vcpu_error.store(true, Ordering::SeqCst);
        }
        let mut text = line.clone();
        text.push(b'\n');
        if let Ok(mut l) = log.lock() {
            let _ = l.write(&text);
        }
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&text);
    }
}

/// The event monitor: a stream of JSON objects; we look for the VM's shutdown.
async fn pump_events(fd: std::os::fd::OwnedFd, shutdown: Arc<AtomicBool>) {
    let Ok(mut rx) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match rx.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut consumed = 0;
        let mut stream =
            serde_json::Deserializer::from_slice(&buf).into_iter::<serde_json::Value>();
        while let Some(Ok(ev)) = stream.next() {
            consumed = stream.byte_offset();
            if ev["source"] == "vm" && ev["event"] == "shutdown" {
                shutdown.store(true, Ordering::SeqCst);
            }
        }
        buf.drain(..consumed);
        if buf.len() > 1 << 20 {
            buf.clear();
        }
    }
}

/// Serial output: connect to the VMM's serial socket and append everything.
async fn pump_serial(path: PathBuf, log: Arc<Mutex<ConsoleLog>>, pid: i32) {
    let started = Instant::now();
    let mut s = loop {
        match UnixStream::connect(&path).await {
            Ok(s) => break s,
            Err(_) => {
                let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                if !alive || started.elapsed() > Duration::from_secs(60) {
                    return;
                }
                sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut l) = log.lock() {
                    if let Err(e) = l.write(&buf[..n]) {
                        eprintln!("console log write failed: {e}");
                    }
                }
            }
        }
    }
}
