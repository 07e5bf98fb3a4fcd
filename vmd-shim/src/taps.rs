//! The VM's taps, opened by the shim and handed to the VMM as open fds
//! (`--net fd=N`, every supported release): attaching to a tap is the one
//! thing a VMM needed `CAP_NET_ADMIN` for, and a VMM that is handed its
//! taps keeps no capability at all.
//!
//! Each tap is opened exactly as cloud-hypervisor opens one given by name
//! (`net_util::open_tap`, one queue pair): `/dev/net/tun` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, the virtio-net header size set,
//! the interface brought up. Like it, attaching to a name that does not
//! exist creates that tap (vmd checks that it exists before Run).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use vmd_runtime::spec::Net;

/// Why a tap could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun for tap {tap}: {source}")]
    Tun { tap: String, source: std::io::Error },
    #[error("cannot attach to tap {tap}: {source}")]
    Attach { tap: String, source: std::io::Error },
    #[error("cannot set up tap {tap}: {what}: {source}")]
    Setup {
        tap: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot enter the taps' network namespace {}: {source}", .netns.display())]
    Netns {
        netns: PathBuf,
        source: std::io::Error,
    },
}

/// `struct virtio_net_hdr_v1`: what cloud-hypervisor sets
/// (`net_util::vnet_hdr_len`).
const VNET_HDR_LEN: libc::c_int = 12;

/// The network namespace the taps are in, opened once per start: the
/// taps are opened there, and the VMM runs there.
pub struct TapNetns {
    path: PathBuf,
    file: std::fs::File,
}

impl TapNetns {
    pub fn open(path: &Path) -> Result<TapNetns, TapError> {
        let file = std::fs::File::open(path).map_err(|source| TapError::Netns {
            netns: path.to_owned(),
            source,
        })?;
        Ok(TapNetns {
            path: path.to_owned(),
            file,
        })
    }
}

impl From<TapNetns> for OwnedFd {
    fn from(n: TapNetns) -> OwnedFd {
        n.file.into()
    }
}

/// Opens every tap of `nets`, in order, in network namespace `netns` (the
/// shim's own when `None`).
pub fn open(nets: &[Net], netns: Option<&TapNetns>) -> Result<Vec<OwnedFd>, TapError> {
    let open_all = || nets.iter().map(|n| open_one(&n.tap)).collect();
    let Some(ns) = netns.filter(|_| !nets.is_empty()) else {
        return open_all();
    };
    // A thread of its own enters the namespace (setns changes only the
    // calling thread), opens the taps there and ends; the fds work from
    // anywhere.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&ns.file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    TapError::Netns {
                        netns: ns.path.clone(),
                        source: e.into(),
                    }
                })?;
                open_all()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(TapError::Netns {
                    netns: ns.path.clone(),
                    source: std::io::Error::other("the thread opening the taps died"),
                })
            })
    })
}

fn ifreq(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

fn open_one(tap: &str) -> Result<OwnedFd, TapError> {
    let setup = |what: &'static str| {
        let tap = tap.to_owned();
        move |source: std::io::Error| TapError::Setup { tap, what, source }
    };
    let path = CString::from(c"/dev/net/tun");
    // SAFETY: a constant NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(TapError::Tun {
            tap: tap.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: open returned a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq(tap, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    // SAFETY: TUNSETIFF reads an ifreq, which lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(TapError::Attach {
            tap: tap.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    let hdr = VNET_HDR_LEN;
    // SAFETY: TUNSETVNETHDRSZ reads an int, which lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
        return Err(setup("virtio-net header size")(
            std::io::Error::last_os_error(),
        ));
    }
    bring_up(tap).map_err(setup("bring it up"))?;
    Ok(fd)
}

/// `ip link set TAP up`, as cloud-hypervisor does (`Tap::enable`).
fn bring_up(tap: &str) -> std::io::Result<()> {
    // SAFETY: a plain socket call; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socket returned a new descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req = ifreq(tap, 0);
    // SAFETY: SIOCGIFFLAGS fills the ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS set the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
