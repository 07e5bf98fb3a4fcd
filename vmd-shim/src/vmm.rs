//! One run of cloud-hypervisor: start it hardened with its pumps, tell a
//! guest power-off from a crash when it exits, stop it gracefully.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Child;
use tokio::time::{timeout, Instant};

use vmd_runtime::process::say;
use vmd_runtime::spec::VmSpec;
use vmd_runtime::state::{now_secs, Exit};
use vmd_runtime::vmm::{args, Version, VmState, VmmApi};
use vmd_runtime::RunDir;

use crate::console::{Keyboard, Plugged, SharedConsole};
use crate::error::StartError;
use crate::hygiene::{describe, high_fd, Hardening};
use crate::pumps;
use crate::shared::Shared;

/// A running VMM and what watches it.
pub struct Vmm {
    /// One virtiofsd per share; killed when the VMM is gone (on drop).
    _fs_daemons: Vec<Child>,
    /// The shim's end of the serial input pty, typed into while the VMM runs.
    _keyboard: Option<Plugged>,
    pub child: Child,
    pub pid: i32,
    api: VmmApi,
    events: Arc<pumps::Events>,
    vcpu_error: Arc<AtomicBool>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
    /// The shim's own files of the VM's taps, held until the VMM is gone
    /// and its exit announced ([`Vmm::release_taps`]). The last close of a
    /// tap's file detaches its queue, which waits for an RCU grace period
    /// of the kernel: left to the VMM's exit, that wait (up to 12 ms seen
    /// with 1 000 VMs) came before its parent could hear of the exit, so
    /// before watchers heard `crashed`.
    taps: Vec<OwnedFd>,
}

/// The files the VM cannot start without. Checked before anything is
/// started: a VMM would only exit on them, and a restart would not help.
fn preflight(spec: &VmSpec) -> Result<(), StartError> {
    let mut needed: Vec<(&'static str, &std::path::Path)> = vec![("kernel", &spec.kernel)];
    if let Some(i) = &spec.initramfs {
        needed.push(("initrd", i));
    }
    needed.extend(spec.disks.iter().map(|d| ("disk", d.path.as_path())));
    needed.extend(
        spec.shares
            .iter()
            .map(|s| ("shared directory", s.source.as_path())),
    );
    for (what, path) in needed {
        if !path.exists() {
            return Err(StartError::Missing {
                what,
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

impl Vmm {
    /// Starts the shares' virtiofsd, then VMM `version`, with its output,
    /// events and serial console pumped into `log`.
    pub async fn start(
        spec: &VmSpec,
        run: &RunDir,
        version: Version,
        log: &SharedConsole,
        keyboard: &Keyboard,
        shared: &Shared,
        lease: Option<&crate::jail::Lease>,
    ) -> Result<Vmm, StartError> {
        preflight(spec)?;
        // cloud-hypervisor v53 leaves `<socket>.lock` behind.
        let api = spec.api_socket_in(run);
        let mut lock = api.clone().into_os_string();
        lock.push(".lock");
        for p in [api, lock.into()] {
            crate::virtiofsd::remove_stale(&p)?;
        }
        let fs_daemons = crate::virtiofsd::start(spec).await?;
        let (ev_r, ev_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(StartError::EventPipe)?;
        // Numbered above what the child gets them as, so that handing one
        // over never overwrites another.
        let ev_w = high_fd(ev_w.as_fd()).map_err(StartError::Descriptors)?;
        // The VMM runs where its taps are, as it would opening them by name
        // (up to v51 it also asks a tap's MTU by name, in its namespace).
        let netns = match &spec.tap_netns {
            Some(p) => Some(crate::taps::TapNetns::open(p)?),
            None => None,
        };
        let taps = crate::taps::open(&spec.nets, netns.as_ref())?
            .iter()
            .map(|t| high_fd(t.as_fd()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::Descriptors)?;
        let tap_fds: Vec<i32> = taps.iter().map(|t| t.as_raw_fd()).collect();
        let view = match lease {
            Some(lease) => {
                let view = crate::jail::View::prepare(spec, run, lease)?;
                say(format!("the VMM runs jailed as uid {}", lease.uid));
                Some(view)
            }
            None => None,
        };
        let input = match crate::serial::Input::open() {
            Ok(i) => Some(i),
            Err(e) => {
                say(format!(
                    "no pty for the serial console ({e}): it takes no input"
                ));
                None
            }
        };
        let mut cmd = Hardening::vmm(
            spec,
            ev_w.as_raw_fd(),
            &tap_fds,
            view,
            netns.map(Into::into),
        )
        .command(&spec.hypervisor);
        // Named as the Go VM module names its VMMs (its `/proc` rule wants
        // argv[0] to be exactly this): a node rolled back to it adopts the
        // VM instead of killing it (docs/zero-os-node.md).
        cmd.arg0(VMM_ARGV0);
        cmd.args(args::hypervisor_args(spec, run, version))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let serial_input = match input {
            Some(i) => {
                cmd.stdin(Stdio::from(i.guest_side));
                Some(i.shim_side)
            }
            None => {
                cmd.stdin(Stdio::null());
                None
            }
        };
        say(format!(
            "starting the VMM: {} (cloud-hypervisor {version})",
            spec.hypervisor.display()
        ));
        let mut child = cmd.spawn().map_err(|source| StartError::Spawn {
            program: spec.hypervisor.clone(),
            source,
        })?;
        // The child has its copies; the pty's guest side went with `cmd`.
        drop(cmd);
        let keyboard_plug = serial_input.and_then(|master| match keyboard.plug(master) {
            Ok(p) => Some(p),
            Err(e) => {
                say(format!("the serial console takes no input: {e}"));
                None
            }
        });
        drop(ev_w);
        let pid = child.id().map_or(0, |p| p as i32);
        protect_from_oom(pid);
        let events = Arc::new(pumps::Events {
            shutdown: AtomicBool::new(false),
            shared: shared.clone(),
        });
        let vcpu_error = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        if let Some(err) = child.stderr.take() {
            tasks.push(tokio::spawn(pumps::vmm_lines(
                Box::new(err),
                Arc::clone(log),
                Arc::clone(&vcpu_error),
            )));
        }
        if let Some(out) = child.stdout.take() {
            tasks.push(tokio::spawn(pumps::serial(Box::new(out), Arc::clone(log))));
        }
        tasks.push(tokio::spawn(pumps::events(ev_r, Arc::clone(&events))));
        Ok(Vmm {
            _fs_daemons: fs_daemons,
            _keyboard: keyboard_plug,
            child,
            pid,
            api: VmmApi::new(spec.api_socket_in(run)),
            events,
            vcpu_error,
            pumps: tasks,
            taps,
        })
    }

    /// Lets go of the taps once the VMM is gone, off the shim's thread (the
    /// close waits for the kernel, see `taps`), and waits for it: a VMM
    /// started after this attaches to them again.
    pub async fn release_taps(&mut self) {
        let taps = std::mem::take(&mut self.taps);
        if taps.is_empty() {
            return;
        }
        if let Err(e) = tokio::task::spawn_blocking(move || drop(taps)).await {
            say(format!("closing the taps did not finish: {e}"));
        }
    }

    /// Lets what the VMM still had to say reach the log (up to 2 s).
    pub async fn drain_pumps(&mut self) {
        pumps::drain(&mut self.pumps).await;
    }

    /// What an exit of the VMM was. Exit code 0 alone proves nothing: the
    /// VMM also exits 0 when a vCPU died; only the VM's own shutdown event
    /// makes it a guest power-off.
    pub fn classify(&self, status: &std::io::Result<ExitStatus>) -> Exit {
        let at = now_secs();
        let st = match status {
            Ok(st) => *st,
            Err(e) => {
                return Exit {
                    at,
                    status: format!("lost track of the VMM: {e}"),
                    clean: false,
                }
            }
        };
        let vcpu = self.vcpu_error.load(Ordering::SeqCst);
        let event = self.events.shutdown.load(Ordering::SeqCst);
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

    /// Power button, repeated with growing pauses (4 s, 8 s, 16 s …) through
    /// the grace period — a press before the guest armed its ACPI handler is
    /// lost, while pressing too often makes a slow guest run one power-off
    /// handler per press (seen on emulated KVM: they crash each other) —
    /// then the API's hard stops, then SIGKILL. Returns how it ended.
    pub async fn stop_gracefully(&mut self, grace: Duration) -> String {
        say(format!(
            "stopping: power button, grace {} s",
            grace.as_secs()
        ));
        let deadline = Instant::now() + grace;
        let api = self.api.clone();
        let second = Duration::from_secs(1);
        // A paused (locked) guest cannot see the power button; it may hold
        // data it still has to flush, so it gets to run for its shutdown.
        if self.events.shared.snapshot().vm == Some(VmState::Paused) {
            say("the VM is paused (locked): resuming it so it can shut down cleanly");
            if let Err(e) = api.put("vm.resume", second).await {
                say(format!(
                    "vm.resume failed: {e}; pressing the power button anyway"
                ));
            }
        }
        let mut pause = Duration::from_secs(4);
        loop {
            // Best effort: a guest that ignores it is forced below.
            let _ = api.put("vm.power-button", second).await;
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(st) = timeout(left.min(pause), self.child.wait()).await {
                // Exit 0 is the guest's power-off; anything else (a signal,
                // a seccomp kill) is the VMM dying while it was asked.
                return match st {
                    Ok(s) if s.success() => format!("the guest powered off ({})", describe(&s)),
                    Ok(s) => format!("the VMM exited during the stop ({})", describe(&s)),
                    Err(e) => format!("the VMM's exit could not be read: {e}"),
                };
            }
            if Instant::now() >= deadline {
                break;
            }
            pause *= 2;
        }
        say("the guest did not power off in time: shutting the VMM down");
        let two = Duration::from_secs(2);
        if let Err(e) = api.put("vm.shutdown", two).await {
            say(format!("vm.shutdown failed: {e}"));
        }
        if let Err(e) = api.put("vmm.shutdown", two).await {
            say(format!("vmm.shutdown failed: {e}"));
        }
        if let Ok(st) = timeout(Duration::from_secs(3), self.child.wait()).await {
            let st = st.map(|s| describe(&s)).unwrap_or_default();
            return format!("forced after the grace period ({st})");
        }
        say("the VMM ignored vmm.shutdown: SIGKILL");
        // SAFETY: killpg has no memory effects; the group is the VMM's own.
        unsafe {
            libc::killpg(self.pid, libc::SIGKILL);
        }
        let st = self
            .child
            .wait()
            .await
            .map(|s| describe(&s))
            .unwrap_or_default();
        format!("killed after the grace period ({st})")
    }
}

/// The VMM's argv[0], whatever its binary's path.
pub const VMM_ARGV0: &str = "cloud-hypervisor";

/// What the VMM's `oom_score_adj` is set to: the node's OOM killer takes
/// other processes first (the Go module sets the same on its VMMs; the shim
/// and helpers keep theirs, so they go before a guest).
pub const VMM_OOM_SCORE_ADJ: i32 = -200;

/// Sets [`VMM_OOM_SCORE_ADJ`] on the VMM. Lowering it needs
/// `CAP_SYS_RESOURCE`, which the shim has as root; without it the VMM runs
/// with the default, which is said, not fatal.
fn protect_from_oom(pid: i32) {
    if pid <= 0 {
        return;
    }
    let path = format!("/proc/{pid}/oom_score_adj");
    if let Err(e) = std::fs::write(&path, VMM_OOM_SCORE_ADJ.to_string()) {
        say(format!(
            "cannot set the VMM's oom_score_adj to {VMM_OOM_SCORE_ADJ}: {e}"
        ));
    }
}
