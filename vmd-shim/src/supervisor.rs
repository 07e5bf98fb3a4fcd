//! The life of one VM: start the VMM, watch it, apply the restart policy,
//! stop it when asked. State changes are saved to `state.json` as they
//! happen, so vmd (and a later shim) always see where the VM is.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::sleep;

use vmd_runtime::console::ConsoleLog;

use crate::console::{Console, Keyboard, SharedConsole};
use vmd_runtime::control::STOPPED;
use vmd_runtime::events::EventKind;
use vmd_runtime::process::say;
use vmd_runtime::spec::VmSpec;
use vmd_runtime::state::{now_secs, Exit, Phase, ShimState};
use vmd_runtime::vmm::{VersionCache, VmState};
use vmd_runtime::RunDir;

use crate::control::{RetryAsked, StopFrom};
use crate::error::StartError;
use crate::hygiene::needed_caps;
use crate::lock::Locker;
use crate::policy::{decide, Decision};
use crate::shared::Shared;
use crate::vmm::Vmm;

struct Shim {
    spec: VmSpec,
    shared: Shared,
    locker: Arc<Locker>,
    log: SharedConsole,
    keyboard: Keyboard,
    stops: mpsc::Receiver<StopFrom>,
    retries: mpsc::Receiver<RetryAsked>,
    /// The VMM binary's release, probed again only when the file changes
    /// (nodes upgrade it in place; every start builds for what is there).
    versions: VersionCache,
    /// The VM's user, taken at start and held for the shim's life (every
    /// restart of the VMM runs as the same user).
    lease: Option<crate::jail::Lease>,
}

/// Runs the VM of `run` until stopped.
pub async fn run(run: RunDir) -> ExitCode {
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
    let c = &spec.console;
    let mut log = match ConsoleLog::open(&c.log, c.rotate_bytes, c.keep_bytes) {
        Ok(l) => l,
        Err(e) => {
            say(format!(
                "cannot open the console log {}: {e}",
                c.log.display()
            ));
            return ExitCode::FAILURE;
        }
    };
    // The VM's own user: its console log's group now (its stream workers
    // read it in that group only), its VMM's uid at every start.
    let lease = match &spec.jail {
        Some(jail) => match crate::jail::Lease::take(jail, &spec.name) {
            Ok(lease) => {
                if let Err(e) = log.set_group(jail.log_gid(lease.uid)) {
                    say(format!("cannot give the console log its group: {e}"));
                }
                Some(lease)
            }
            Err(e) => {
                say(format!("cannot start: {e}"));
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut state = match ShimState::load(&run.state()) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            // Never silently: it may have said the VM failed. Kept for the
            // operator; the VM starts afresh, its crash count from zero.
            let kept = run.state().with_extension("json.corrupt");
            let moved = std::fs::rename(run.state(), &kept);
            say(format!(
                "{e}; {}; starting the VM afresh",
                match moved {
                    Ok(()) => format!("kept as {}", kept.display()),
                    Err(e) => format!("cannot keep it aside: {e}"),
                }
            ));
            ShimState::new()
        }
    };
    // A shim that died with its VMM: the death signal killed the VMM,
    // but make sure, identity-checked so a reused pid is left alone.
    let lost = state.vmm.take();
    // The Go module's VMM taken over is nobody's child: it outlives a shim
    // and is watched again by this one.
    let lost = lost.filter(|old| Some(*old) != spec.adopted);
    if let Some(old) = lost {
        if old.alive() {
            say(format!(
                "killing the VMM left by a previous shim (pid {})",
                old.pid
            ));
            // SAFETY: kill has no memory effects; the pid is identity-checked.
            unsafe {
                libc::kill(old.pid, libc::SIGKILL);
            }
        }
    }
    let (stop_tx, stops) = mpsc::channel(4);
    let (retry_tx, retries) = mpsc::channel(4);
    let shared = Shared::new(run.clone(), state);
    if let Some(old) = lost {
        // Its VMM went with it: for watchers, the VM crashed.
        shared.emit(
            EventKind::Crashed,
            Some(format!(
                "the shim exited; its VMM (pid {}) went with it",
                old.pid
            )),
            |s| s.vm = None,
        );
    }
    let locker = Arc::new(Locker::new(shared.clone(), spec.api_socket_in(&run)));
    if let Err(e) = crate::control::listen(
        shared.clone(),
        Arc::clone(&locker),
        stop_tx.clone(),
        retry_tx,
    ) {
        say(format!("cannot open the control socket: {e}"));
        return ExitCode::FAILURE;
    }
    tokio::spawn(forward_signals(stop_tx));
    let log = Console::new(log);
    let keyboard = Keyboard::start();
    if let Err(e) =
        crate::console::listen(&run.console_socket(), Arc::clone(&log), keyboard.clone())
    {
        // The VM runs without: its console still goes to the log.
        say(format!(
            "cannot open the console socket: {e}; no terminal can attach"
        ));
    }
    let caps: Vec<String> = needed_caps(&spec)
        .iter()
        .map(|(c, why)| format!("{c} ({why})"))
        .collect();
    say(format!(
        "shim for vm {} (pid {}); VMM keeps capabilities: {}",
        spec.name,
        std::process::id(),
        if caps.is_empty() {
            "none".into()
        } else {
            caps.join(", ")
        }
    ));
    // Before the VMM: a Run that sees the VM booted sees whether the
    // console listens too.
    // What an earlier shim recorded no longer holds.
    shared.set(|s| s.web_console = None);
    if let Some(w) = spec.web_console.clone() {
        let task = crate::web::run(
            spec.name.clone(),
            w,
            shared.clone(),
            Arc::clone(&log),
            keyboard.clone(),
        );
        tokio::spawn(task);
        let mut changes = shared.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while shared.snapshot().web_console.is_none() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
    let versions = VersionCache::new();
    if let Some(release) = spec.hypervisor_release {
        versions.remember(&spec.hypervisor, release);
    }
    let mut shim = Shim {
        spec,
        shared,
        locker,
        log,
        keyboard,
        stops,
        retries,
        versions,
        lease,
    };
    shim.supervise().await
}

impl Shim {
    fn phase(&self) -> Phase {
        self.shared.snapshot().phase
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
        let api = self.spec.api_socket_in(&self.shared.run);
        let mut adopted = self
            .spec
            .adopted
            .and_then(|id| crate::adopted::Adopted::take(id, api));
        loop {
            if let Some(vmm) = adopted.take() {
                match self.watch_adopted(vmm).await {
                    Ok(exit) => {
                        if let Some(stop) = self.after_exit(exit).await {
                            return stop;
                        }
                        continue;
                    }
                    Err(code) => return code,
                }
            }
            let snapshot = self.shared.snapshot();
            let restart = snapshot.vmm_started_at.is_some();
            let (kind, reason) = if restart {
                let attempt = snapshot.restarts + 1;
                (EventKind::Restarting, Some(format!("restart {attempt}")))
            } else {
                (EventKind::Starting, None)
            };
            self.shared.emit(kind, reason, |s| {
                s.phase = Phase::Starting;
                s.vm = None;
                if restart {
                    s.restarts += 1;
                }
            });
            let exit = match self.start_vmm().await {
                Err(e) if e.is_permanent() => {
                    let reason = format!("the VM cannot start: {e}");
                    say(&reason);
                    self.shared
                        .emit(EventKind::Failed, Some(reason.clone()), |s| {
                            s.phase = Phase::Failed;
                            s.reason = Some(reason.clone());
                        });
                    return self.idle().await;
                }
                Err(e) => {
                    let exit = Exit {
                        at: now_secs(),
                        status: format!("could not start the VMM: {e}"),
                        clean: false,
                    };
                    self.announce(&exit);
                    exit
                }
                Ok(mut vmm) => {
                    let locker = tokio::spawn(Arc::clone(&self.locker).keep_locked());
                    let status = tokio::select! {
                        st = vmm.child.wait() => st,
                        stop = self.stops.recv() => {
                            locker.abort();
                            return self.stop_vmm(vmm, stop).await;
                        }
                    };
                    locker.abort();
                    // A signal or a failure code says all there is to say:
                    // watchers hear it at once. An exit 0 is judged once the
                    // VMM's last events and lines are in (a guest power-off,
                    // or a vCPU error).
                    let told = match status {
                        Ok(st) if st.code() == Some(0) => None,
                        _ => {
                            let exit = vmm.classify(&status);
                            self.announce(&exit);
                            Some(exit)
                        }
                    };
                    // The console and events drain before anything restarts.
                    vmm.drain_pumps().await;
                    let exit = told.unwrap_or_else(|| {
                        let exit = vmm.classify(&status);
                        self.announce(&exit);
                        exit
                    });
                    // After the exit is announced, whichever way it was.
                    vmm.release_taps().await;
                    exit
                }
            };
            if let Some(code) = self.after_exit(exit).await {
                return code;
            }
        }
    }

    /// Carries out the restart policy's verdict on an exit: `None` to start
    /// the VM again, or how the shim ends.
    async fn after_exit(&mut self, exit: Exit) -> Option<ExitCode> {
        let decision = {
            let mut st = self.shared.lock();
            let d = decide(
                &self.spec.restart,
                self.spec.keep_alive,
                &mut st.exits,
                exit.clone(),
            );
            st.vmm = None;
            st.vm = None;
            d
        };
        // Deleted by the Go VM module after a roll-back: it removed the
        // VM's config file (vmd removes it only after stopping the shim).
        let decision = match (&decision, &self.spec.go_config) {
            (Decision::Restart { .. }, Some(cfg)) if !cfg.exists() => {
                let why = format!(
                    "the VM's config file {} is gone (deleted by the Go VM module): not restarting it",
                    cfg.display()
                );
                self.shared
                    .emit(EventKind::Stopped, Some(why.clone()), |s| {
                        s.phase = Phase::Stopped;
                        s.reason = Some(why.clone());
                    });
                say(why);
                return Some(self.idle().await);
            }
            _ => decision,
        };
        match decision {
            Decision::Restart { after } => {
                self.shared.set(|s| {
                    s.phase = Phase::BackingOff;
                    s.reason = Some(exit.status.clone());
                });
                say(format!("restarting in {} s", after.as_secs()));
                tokio::select! {
                    _ = sleep(after) => {}
                    stop = self.stops.recv() => return Some(self.stopped(stop).await),
                }
            }
            Decision::StayOff => {
                self.shared.set(|s| {
                    s.phase = Phase::PoweredOff;
                    s.reason = Some("the guest powered off".into());
                });
                say("the guest powered off; not restarting it (no keep-alive)");
                return Some(self.idle().await);
            }
            Decision::GiveUp { reason } => {
                let tail = crate::console::lock(&self.log).tail(2048);
                self.shared
                    .emit(EventKind::Failed, Some(reason.clone()), |s| {
                        s.phase = Phase::Failed;
                        s.reason = Some(reason.clone());
                        s.last_console = Some(tail);
                    });
                say(format!("gave up: {reason}"));
                return Some(self.idle().await);
            }
        }
        None
    }

    /// Watches the VMM taken over from the Go module until it exits (its
    /// exit, for the restart policy) or a stop comes (carried out: how the
    /// shim ends).
    async fn watch_adopted(&mut self, vmm: crate::adopted::Adopted) -> Result<Exit, ExitCode> {
        let pid = vmm.identity.pid;
        let guest = vmm.guest().await.unwrap_or(VmState::Running);
        self.shared.emit(
            EventKind::Booted,
            Some(format!("taken over from the Go VM module (pid {pid})")),
            |s| {
                s.phase = Phase::Running;
                s.vmm = Some(vmm.identity);
                s.vm = Some(guest);
                s.vmm_started_at.get_or_insert_with(now_secs);
            },
        );
        say(format!(
            "watching the VMM taken over from the Go VM module, pid {pid}"
        ));
        let locker = tokio::spawn(Arc::clone(&self.locker).keep_locked());
        tokio::select! {
            _ = vmm.exited() => {}
            stop = self.stops.recv() => {
                locker.abort();
                self.shared.emit(EventKind::Stopping, None, |s| s.phase = Phase::Stopping);
                let paused = self.shared.snapshot().vm == Some(VmState::Paused);
                let how = vmm
                    .stop_gracefully(Duration::from_secs(self.spec.grace_secs), paused)
                    .await;
                self.shared.emit(EventKind::Stopped, Some(how.clone()), |s| {
                    s.phase = Phase::Stopped;
                    s.vmm = None;
                    s.vm = None;
                    s.reason = Some(how.clone());
                });
                say(format!("stopped: {how}"));
                return Err(self.after_stop(stop).await);
            }
        }
        locker.abort();
        // What the Go module's console process appended meanwhile is the
        // log's: the shim's own writes go after it.
        if let Err(e) = crate::console::lock(&self.log).resync() {
            say(format!("cannot read the console log's size: {e}"));
        }
        let exit = Exit {
            at: now_secs(),
            status: format!(
                "the VMM taken over from the Go VM module (pid {pid}) exited; not the shim's child, its status is unknown"
            ),
            // Unknown, so the Go module's rule: a VM without keep-alive is
            // never started again once it stopped (its guest may well have
            // powered off); one with keep-alive is, as after a crash.
            clean: !self.spec.keep_alive,
        };
        self.announce(&exit);
        Ok(exit)
    }

    async fn start_vmm(&mut self) -> Result<Vmm, StartError> {
        let version = self.versions.supported(&self.spec.hypervisor).await?;
        let vmm = Vmm::start(
            &self.spec,
            &self.shared.run,
            version,
            &self.log,
            &self.keyboard,
            &self.shared,
            self.lease
                .as_ref()
                .filter(|_| self.spec.jail.as_ref().is_some_and(|j| j.confine_vmm)),
        )
        .await?;
        let identity = vmd_runtime::state::ProcessIdentity::of(vmm.pid);
        self.shared.set(|s| {
            s.phase = Phase::Running;
            s.vmm = identity;
            s.vmm_started_at = Some(now_secs());
        });
        say(format!("vmm running pid={}", vmm.pid));
        Ok(vmm)
    }

    /// Says how the VMM exited, in zinit's log and to watchers.
    fn announce(&self, exit: &Exit) {
        say(format!("vmm exited: {}", exit.status));
        let (kind, reason) = if exit.clean {
            (EventKind::PoweredOff, None)
        } else {
            (EventKind::Crashed, Some(exit.status.clone()))
        };
        self.shared.emit(kind, reason, |s| s.vm = None);
    }

    /// Waits, starting nothing, until asked to stop — or, failed, to retry:
    /// then the state starts over (a new restart window) and the shim exits,
    /// so that zinit starts a fresh one, which starts the VM.
    async fn idle(&mut self) -> ExitCode {
        loop {
            tokio::select! {
                stop = self.stops.recv() => match stop {
                    None | Some(StopFrom::Signal) => {
                        say("stopped");
                        return ExitCode::SUCCESS;
                    }
                    Some(StopFrom::Control(reply)) => {
                        let _ = reply.send(STOPPED.into());
                    }
                },
                Some(asked) = self.retries.recv() => {
                    if self.phase() != Phase::Failed {
                        let _ = asked.reply.send(vmd_runtime::control::error_reply("the VM has not failed"));
                        continue;
                    }
                    self.shared.set(|s| {
                        s.phase = Phase::Starting;
                        s.exits.clear();
                        s.reason = Some("retrying after the failure".into());
                        s.last_console = None;
                    });
                    say("retrying the failed VM: exiting for zinit to start the shim again");
                    let _ = asked.reply.send(vmd_runtime::control::RETRYING.into());
                    // Gone only once vmd has its answer.
                    let _ = tokio::time::timeout(Duration::from_secs(5), asked.written).await;
                    return ExitCode::SUCCESS;
                }
            }
        }
    }

    /// A stop that came while no VMM ran (during a back-off).
    async fn stopped(&mut self, stop: Option<StopFrom>) -> ExitCode {
        self.shared
            .emit(EventKind::Stopping, None, |s| s.phase = Phase::Stopping);
        self.shared.emit(
            EventKind::Stopped,
            Some("stopped while no VMM ran".into()),
            |s| s.phase = Phase::Stopped,
        );
        say("stopped");
        self.after_stop(stop).await
    }

    /// Stops a running VMM gracefully, then reports and exits or idles.
    async fn stop_vmm(&mut self, mut vmm: Vmm, stop: Option<StopFrom>) -> ExitCode {
        self.shared
            .emit(EventKind::Stopping, None, |s| s.phase = Phase::Stopping);
        let how = vmm
            .stop_gracefully(Duration::from_secs(self.spec.grace_secs))
            .await;
        vmm.drain_pumps().await;
        self.shared
            .emit(EventKind::Stopped, Some(how.clone()), |s| {
                s.phase = Phase::Stopped;
                s.vmm = None;
                s.vm = None;
                s.reason = Some(how.clone());
            });
        say(format!("stopped: {how}"));
        vmm.release_taps().await;
        self.after_stop(stop).await
    }

    async fn after_stop(&mut self, stop: Option<StopFrom>) -> ExitCode {
        match stop {
            Some(StopFrom::Control(reply)) => {
                let _ = reply.send(STOPPED.into());
                self.idle().await
            }
            _ => ExitCode::SUCCESS,
        }
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
