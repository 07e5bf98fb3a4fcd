//! `vmd-shim --dir <run directory of the VM>`: runs one VM under zinit.
//!
//! * [`supervisor`] — the VM's life: start, watch, restart or give up, stop;
//! * [`policy`] — what an exit of the VMM leads to (pure);
//! * [`vmm`] — starting cloud-hypervisor, judging its exit, stopping it gracefully;
//! * [`error`] — why a VMM could not start, and whether a retry can help;
//! * [`virtiofsd`] — one virtiofsd per share;
//! * [`hygiene`] — how both are spawned (capabilities, `no_new_privs`, death signal);
//! * [`jail`] — the VMM's own uid and mount view;
//! * [`denylist`] — system calls no VMM may make, refused on every thread;
//! * [`taps`] — the VM's taps, opened for the VMM;
//! * [`pumps`] — the VMM's output, events and serial console into the console log;
//! * [`lock`] — keeping a locked VM paused;
//! * [`shared`] — the shim's state, in memory and in `state.json`;
//! * [`console`] — the console log shared with attached terminals, and their input;
//! * [`control`] — the control socket vmd talks to (and watches);
//! * [`web`] — the web console server, bound in the VM's network namespace.
//!
//! Lifecycle lines go to stdout (zinit's ring: `zinit log vm:<name>`); the
//! VMM's own log lines to stderr and the console log; console bytes only to
//! the console log.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmd_runtime::process::{current_thread_runtime, say};
use vmd_runtime::RunDir;

mod adopted;
mod console;
mod control;
mod denylist;
mod error;
mod hygiene;
mod jail;
mod lock;
mod policy;
mod pumps;
mod serial;
mod shared;
mod supervisor;
mod taps;
mod virtiofsd;
mod vmm;
mod web;

#[derive(Parser)]
#[command(
    name = "vmd-shim",
    about = "Runs one VM (cloud-hypervisor) under zinit"
)]
struct Cli {
    /// The VM's run directory (holds vm.json).
    #[arg(long)]
    dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One thread: the VMM's death signal is bound to the thread that forks it.
    match current_thread_runtime() {
        Ok(rt) => rt.block_on(supervisor::run(RunDir::new(cli.dir))),
        Err(e) => {
            say(e.to_string());
            ExitCode::FAILURE
        }
    }
}
