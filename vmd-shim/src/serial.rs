//! The VMM's serial port, held by the shim from before the VMM exists.
//!
//! cloud-hypervisor runs with `--serial tty`: the guest's serial output is
//! the VMM's stdout, a pipe the shim created, and its input is the VMM's
//! stdin, a pty the shim keeps the other end of. Both exist before the
//! guest can print, so the first byte is never lost; a pipe keeps what was
//! written until the shim reads it, so the last bytes before an exit are
//! never lost either; and nothing else can connect to the console (a serial
//! *socket* loses output while no one is connected on v39, drops what is
//! queued at exit on v53, and a second client hangs v39 at power-off).
//!
//! cloud-hypervisor reads console input only from a terminal, hence the pty
//! for stdin. It is in raw mode: bytes reach the guest as they were sent,
//! no echo, no line editing, no signals from ^C.

use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

/// The input side: the pty's two ends. The VMM gets `guest_side` as its
/// stdin; the shim keeps `shim_side` for as long as the VMM runs (a closed
/// master makes the VMM's reads fail).
pub struct Input {
    pub shim_side: OwnedFd,
    pub guest_side: OwnedFd,
}

impl Input {
    pub fn open() -> nix::Result<Input> {
        // O_NOCTTY on both ends: the pty must never become anyone's
        // controlling terminal (the shim may be a session leader).
        let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let name = ptsname_r(&master)?;
        let slave = nix::fcntl::open(
            name.as_str(),
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let mut t = tcgetattr(&slave)?;
        cfmakeraw(&mut t);
        tcsetattr(&slave, SetArg::TCSANOW, &t)?;
        let shim_side: OwnedFd = master.into();
        Ok(Input {
            shim_side,
            guest_side: slave,
        })
    }
}
