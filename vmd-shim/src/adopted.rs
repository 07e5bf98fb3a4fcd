//! A VMM the Go VM module started, taken over by vmd with its VM
//! (`VmSpec::adopted`). It is not the shim's child: the shim cannot wait for
//! it, gets no exit status and no events from it, and does not own its
//! serial port (the Go module's `cloud-console` appends it to the same log).
//! So the shim holds a pidfd — readable once the process exited, and a
//! signal target that cannot hit a later process with the same pid — and
//! asks the VMM's API for the rest.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::time::{timeout, Instant};

use vmd_runtime::process::say;
use vmd_runtime::state::ProcessIdentity;
use vmd_runtime::vmm::{VmState, VmmApi};

pub struct Adopted {
    pub identity: ProcessIdentity,
    pidfd: AsyncFd<OwnedFd>,
    pub api: VmmApi,
}

impl Adopted {
    /// The VMM `identity` names, if this very process still runs.
    pub fn take(identity: ProcessIdentity, api: PathBuf) -> Option<Adopted> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, identity.pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after the pidfd is held: the pid named that process when
        // the pidfd was made, so the fd is that process's.
        if !identity.alive() {
            return None;
        }
        // SAFETY: the OwnedFd is moved in and stays open as long as the
        // AsyncFd lives.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()?;
        Some(Adopted {
            identity,
            pidfd,
            api: VmmApi::new(api),
        })
    }

    /// Returns once the process exited.
    pub async fn exited(&self) {
        // A pidfd polls readable once its process is gone, and stays so.
        loop {
            match self.pidfd.readable().await {
                Ok(_) => return,
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no
        // siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }

    /// What the VMM's API says of its guest.
    pub async fn guest(&self) -> Option<VmState> {
        self.api
            .info(Duration::from_secs(2))
            .await
            .ok()
            .map(|i| i.state)
    }

    /// Stops it as the shim stops its own: the power button until the grace
    /// period ends (a paused guest resumed first), then the VMM's own
    /// shutdown, then SIGKILL.
    pub async fn stop_gracefully(&self, grace: Duration, paused: bool) -> String {
        say(format!(
            "stopping the VMM taken over (pid {}): power button, grace {} s",
            self.identity.pid,
            grace.as_secs()
        ));
        let deadline = Instant::now() + grace;
        let second = Duration::from_secs(1);
        if paused {
            if let Err(e) = self.api.put("vm.resume", second).await {
                say(format!(
                    "vm.resume failed: {e}; pressing the power button anyway"
                ));
            }
        }
        let mut pause = Duration::from_secs(4);
        loop {
            let _ = self.api.put("vm.power-button", second).await;
            let left = deadline.saturating_duration_since(Instant::now());
            if timeout(left.min(pause), self.exited()).await.is_ok() {
                return "the guest powered off".into();
            }
            if Instant::now() >= deadline {
                break;
            }
            pause *= 2;
        }
        say("the guest did not power off in time: shutting the VMM down");
        let two = Duration::from_secs(2);
        let _ = self.api.put("vm.shutdown", two).await;
        let _ = self.api.put("vmm.shutdown", two).await;
        if timeout(Duration::from_secs(3), self.exited()).await.is_ok() {
            return "forced after the grace period".into();
        }
        say("the VMM ignored vmm.shutdown: SIGKILL");
        self.signal(libc::SIGKILL);
        self.exited().await;
        "killed after the grace period".into()
    }
}
