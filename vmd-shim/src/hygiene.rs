//! How the shim starts a process (the VMM, virtiofsd): least privilege and
//! no orphans.
//!
//! * own process group: zinit's `stop` signals the shim's group; the VMM
//!   must not get that SIGTERM (it would hard-stop the guest) — the shim
//!   stops it gracefully instead — nor virtiofsd (a guest shutting down
//!   still needs its shares);
//! * `PR_SET_PDEATHSIG(SIGKILL)` and a parent check: if the shim dies, the
//!   VMM dies with it and never lingers holding a tap. The death signal is
//!   tied to the *thread* that forked, so the shim forks from its main
//!   thread (single-threaded runtime);
//! * `no_new_privs`, and every capability the VM does not need dropped
//!   from the bounding set (as root that is what the VMM ends up with);
//! * no shell: the argv is executed directly.
//!
//! Everything in [`Hardening::apply`] runs between fork and exec, so it only
//! makes raw system calls on data prepared beforehand.

use caps::{CapSet, Capability};

use vmd_runtime::spec::VmSpec;
use vmd_runtime::vmm::args::{EVENT_FD, FIRST_TAP_FD};

pub struct Hardening {
    parent: libc::pid_t,
    drop: Vec<libc::c_ulong>,
    /// Descriptors handed over: (ours, the number the child sees).
    pass: Vec<(libc::c_int, libc::c_int)>,
    /// Become this (uid, gid), with these supplementary groups only.
    user: Option<(libc::uid_t, libc::gid_t)>,
    groups: Vec<libc::gid_t>,
    /// The VMM's jail: its mount view, entered before the change of user.
    view: Option<crate::jail::View>,
    /// The VMM's system-call denylist, installed last.
    seccomp: Option<seccompiler::BpfProgram>,
    /// The network namespace to run in (its taps'), entered first.
    netns: Option<std::os::fd::OwnedFd>,
}

/// Where the web console server finds its descriptors.
pub const CONSOLE_LISTEN_FD: libc::c_int = 3;
pub const CONSOLE_CONNECTOR_FD: libc::c_int = 4;

/// What virtiofsd keeps: the capabilities it keeps for itself after its own
/// drop (it serves files as the guest's users), chroot for its sandbox,
/// CAP_SETPCAP to make that drop, raising its open-file limit, and
/// CAP_DAC_READ_SEARCH (virtiofsd 1.14 refuses to start without it in its
/// bounding set: "can't apply the child capabilities").
const VIRTIOFSD_CAPS: [Capability; 12] = [
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_SETPCAP,
    Capability::CAP_SYS_RESOURCE,
];

/// The capabilities the VMM keeps for `spec`, with the reason.
pub fn needed_caps(spec: &VmSpec) -> Vec<(Capability, &'static str)> {
    // The taps come open (`crate::taps`): nothing for the network.
    let mut keep = Vec::new();
    if !spec.devices.is_empty() {
        // VFIO pins all guest memory.
        keep.push((
            Capability::CAP_IPC_LOCK,
            "lock guest memory for PCI passthrough",
        ));
        keep.push((
            Capability::CAP_SYS_RESOURCE,
            "raise RLIMIT_MEMLOCK for VFIO",
        ));
    }
    keep
}

impl Hardening {
    /// Prepares the hardening of a VMM for `spec`. `event_fd` is handed to
    /// the VMM as fd 3 (its event monitor), the taps from
    /// [`FIRST_TAP_FD`] on (they must be numbered above those: see
    /// [`high_fd`]); with a `view`, the VMM runs in it as its user.
    pub fn vmm(
        spec: &VmSpec,
        event_fd: libc::c_int,
        taps: &[libc::c_int],
        view: Option<crate::jail::View>,
        netns: Option<std::os::fd::OwnedFd>,
    ) -> Self {
        let keep: Vec<Capability> = needed_caps(spec).into_iter().map(|(c, _)| c).collect();
        let mut h = Hardening::keeping(&keep);
        h.pass = vec![(event_fd, EVENT_FD)];
        h.pass.extend(taps.iter().copied().zip(FIRST_TAP_FD..));
        if let Some(v) = &view {
            h.user = Some((v.uid, v.gid));
            h.groups = v.groups.clone();
        }
        h.view = view;
        h.netns = netns;
        h.seccomp = crate::denylist::program()
            .map_err(|e| {
                vmd_runtime::process::say(format!(
                    "the VMM runs without vmd's seccomp denylist: {e}"
                ))
            })
            .ok();
        h
    }

    /// Prepares the hardening of a virtiofsd.
    pub fn virtiofsd() -> Self {
        Hardening::keeping(&VIRTIOFSD_CAPS)
    }

    /// Prepares the hardening of the web console server: nothing kept at
    /// all — it runs as `user`, without capabilities, and gets its
    /// listening socket and console connector as fds 3 and 4. The fds must
    /// not be 3 or 4 already (see [`high_fd`]).
    pub fn console_server(
        listen: libc::c_int,
        connector: libc::c_int,
        user: Option<(libc::uid_t, libc::gid_t)>,
    ) -> Self {
        let mut h = Hardening::keeping(&[]);
        h.pass = vec![
            (listen, CONSOLE_LISTEN_FD),
            (connector, CONSOLE_CONNECTOR_FD),
        ];
        h.user = user;
        h
    }

    fn keeping(keep: &[Capability]) -> Self {
        // Without CAP_SETPCAP (an unprivileged shim) nothing can be dropped,
        // and nothing needs to be: the VMM has no capabilities to begin with.
        let can_drop =
            caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false);
        let drop = if can_drop {
            caps::all()
                .into_iter()
                .filter(|c| !keep.contains(c))
                .map(|c| libc::c_ulong::from(c.index()))
                .collect()
        } else {
            Vec::new()
        };
        Hardening {
            parent: std::process::id() as libc::pid_t,
            drop,
            pass: Vec::new(),
            user: None,
            groups: Vec::new(),
            view: None,
            seccomp: None,
            netns: None,
        }
    }

    /// # Safety
    /// To be called only in the child between fork and exec.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        let err = std::io::Error::last_os_error;
        if let Some(ns) = &self.netns {
            use std::os::fd::AsRawFd;
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(err());
            }
        }
        for &cap in &self.drop {
            // EINVAL: a capability this kernel does not know; nothing to drop.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && *libc::__errno_location() != libc::EINVAL
            {
                return Err(err());
            }
        }
        if !self.drop.is_empty()
            && libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
        {
            return Err(err());
        }
        if let Some(view) = &self.view {
            view.enter()?;
        }
        if let Some((uid, gid)) = self.user {
            // Leaving root clears the permitted and effective sets.
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(err());
            }
        }
        // After any change of user: that clears the death signal.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(err());
        }
        // The shim may have died between fork and prctl: then the death
        // signal will never come, so do not run at all.
        if libc::getppid() != self.parent {
            return Err(std::io::Error::other("parent died before exec"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(err());
        }
        if let Some(prog) = &self.seccomp {
            crate::denylist::install(prog)?;
        }
        for &(fd, target) in &self.pass {
            if fd == target {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(err());
                }
            } else if libc::dup2(fd, target) < 0 {
                return Err(err());
            }
        }
        Ok(())
    }
}

/// A copy of `fd` numbered 10 or above (close-on-exec), so that handing
/// several descriptors to low numbers in a child never overwrites one
/// with another.
pub fn high_fd(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<std::os::fd::OwnedFd> {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))
        .map(|n| {
            // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor we own.
            unsafe { std::os::fd::FromRawFd::from_raw_fd(n) }
        })
        .map_err(std::io::Error::from)
}

impl Hardening {
    /// A command for `program` that runs hardened: no shell, a clean
    /// environment, stdin closed, its own process group, killed when the
    /// handle is dropped, and [`Hardening::apply`] between fork and exec.
    pub fn command(self, program: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: `apply` only makes raw system calls on data prepared before
        // the fork.
        unsafe {
            cmd.pre_exec(move || self.apply());
        }
        cmd
    }
}

/// An exit status as operators read it: `exit 1`, `signal 9 (SIGKILL)`.
pub fn describe(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => {
            let name = nix::sys::signal::Signal::try_from(s).map_or("?", |s| s.as_str());
            format!("signal {s} ({name})")
        }
        _ => "unknown status".into(),
    }
}
