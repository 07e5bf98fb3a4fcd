//! A seccomp filter the shim puts on the VMM before it runs: system calls
//! no VMM has a use for, refused with `EPERM` — on every thread, the main
//! one included, which cloud-hypervisor's own filters (per thread, installed
//! once a thread has started) leave unfiltered. Its filters then narrow
//! each thread further; ours stays under them.
//!
//! The list is what would let a process that took over the VMM leave its
//! jail or reach the host's kernel: mounting and namespaces, tracing other
//! processes, loading kernel code (modules, BPF, kexec), keys, clocks,
//! swap, reboot, file handles (`open_by_handle_at` walks past a chroot),
//! `userfaultfd` (vmd restores no snapshots, the only use cloud-hypervisor
//! makes of it). Everything else is allowed: the VMM's own filters decide.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The system calls refused.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("syslog", libc::SYS_syslog),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("vhangup", libc::SYS_vhangup),
    ("userfaultfd", libc::SYS_userfaultfd),
];

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// The filter, compiled (before the fork: installing it is one system call).
pub fn program() -> Result<BpfProgram, seccompiler::BackendError> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED.iter().map(|(_, nr)| (*nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        ARCH,
    )?;
    filter.try_into()
}

/// Installs `prog` on the calling thread (inherited across exec).
///
/// # Safety
/// Between fork and exec: one system call on data prepared before.
/// `no_new_privs` must be set (the caller does), or the process be root.
pub unsafe fn install(prog: &BpfProgram) -> std::io::Result<()> {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        // seccompiler's sock_filter has the kernel's layout.
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    if libc::syscall(
        libc::SYS_seccomp,
        libc::SECCOMP_SET_MODE_FILTER,
        0,
        &fprog as *const libc::sock_fprog,
    ) != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_compiles_and_refuses_what_it_lists() {
        let prog = program().unwrap();
        assert!(!prog.is_empty());
        // In a child: the filter is for good.
        match unsafe { libc::fork() } {
            0 => {
                let code = unsafe {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || install(&prog).is_err()
                    {
                        10
                    } else if libc::unshare(libc::CLONE_NEWUTS) == 0 {
                        11
                    } else if *libc::__errno_location() != libc::EPERM {
                        12
                    } else if libc::getpid() <= 0 {
                        13
                    } else {
                        0
                    }
                };
                unsafe { libc::_exit(code) };
            }
            pid => {
                let mut st = 0;
                unsafe { libc::waitpid(pid, &mut st, 0) };
                assert!(libc::WIFEXITED(st), "{st}");
                assert_eq!(libc::WEXITSTATUS(st), 0);
            }
        }
    }
}
