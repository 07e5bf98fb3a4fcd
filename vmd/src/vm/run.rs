//! `Run`: plan, write, start, wait until booted, commit — or roll back.

use std::time::{Duration, Instant};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::broadcast::Receiver;
use vmd_runtime::events::{EventKind, ShimEvent};
use vmd_runtime::state::{Phase, ShimState};
use vmd_runtime::{console, files, VmName};

use super::error::{IoContext, NotUp, VmError};
use super::host::is_netns_name;
use super::manager::{service_of, Manager};
use super::plan::{needs_in_use, plan, InUse, Plan};
use crate::api::{MachineInfo, Vm};
use crate::events::Seen;
use crate::network::{console_address, console_port};
use std::net::{IpAddr, Ipv4Addr};
use vmd_runtime::spec::WebConsole;

/// How long Run waits for the VM to boot.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A VM handed to zinit: what its shim says, and its seed's sync.
struct Started {
    seen: Receiver<Seen>,
    seed_synced: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// How long a silent shim is given before zinit is asked about it.
const SHIM_SILENT: Duration = Duration::from_secs(1);
/// What a failed Run shows of the console.
const CONSOLE_TAIL: u64 = 2048;

impl Manager {
    pub async fn run(&self, vm: Vm) -> Result<MachineInfo, VmError> {
        // Other VMs' specs are read only when this one wants PCI devices
        // or writable disks: they belong to one VM at a time.
        let in_use = if needs_in_use(&vm) {
            self.in_use()
        } else {
            InUse::new()
        };
        let mut plan =
            plan(&vm, self.host(), self.settings(), &in_use).map_err(VmError::InvalidVm)?;
        let name = plan.name.clone();
        if self.present(&name) {
            // A retried Run of the same VM is answered as the first one was.
            if self.request(&name).as_ref() == Some(&vm) {
                return Ok(MachineInfo {
                    console_url: self.console_url(&name),
                });
            }
            return Err(VmError::AlreadyExists);
        }
        // Asked before anything is written: a refusal leaves nothing behind.
        plan.spec.web_console = self.place_console(&vm, &name).await?;
        // Probed once per binary (and again after an upgrade in place).
        let release = self
            .versions()
            .supported_release(&self.host().hypervisor)
            .await?;
        plan.spec.hypervisor_release = Some(release);
        let t0 = Instant::now();
        let Started { seen, seed_synced } = match self.start(&vm, &plan).await {
            Ok(s) => s,
            Err(e) => {
                self.roll_back(&name).await;
                return Err(e);
            }
        };
        let up = self.wait_up(&name, seen).await;
        // What exists must survive a power loss: its seed too.
        let synced = match seed_synced.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if let (Ok(()), Err(e)) = (&up, synced) {
            self.roll_back(&name).await;
            return Err::<MachineInfo, _>(e).what(|| "cannot sync the cloud-init image".into());
        }
        match up {
            Ok(()) => {
                // The commit point: the VM exists.
                self.mark(&self.paths().present_mark(&name))?;
                self.unlink(&self.run_dir(&name).creating_mark())?;
                tracing::info!(vm = %name, took = ?t0.elapsed(), "vm started");
                Ok(MachineInfo {
                    console_url: self.console_url(&name),
                })
            }
            Err(reason) => {
                let console = console::tail_of(&self.paths().log(&name), CONSOLE_TAIL);
                self.roll_back(&name).await;
                tracing::warn!(vm = %name, %reason, "vm failed to start");
                Err(VmError::StartFailed {
                    name: name.to_string(),
                    reason,
                    console,
                })
            }
        }
    }

    /// Where the VM's web console listens, by Zero-OS's rule: on the first
    /// interface with a private network (`NetID`) and an IPv4 address, the
    /// network module gives the namespace and subnet; the console listens on
    /// the subnet's `.1`, port 20000 + the VM's last octet. Asked once, at
    /// Run: the placement is part of the VM's description from then on.
    async fn place_console(&self, vm: &Vm, name: &VmName) -> Result<Option<WebConsole>, VmError> {
        let Some(network) = self.network() else {
            return Ok(None);
        };
        let Some((net_id, ip)) = console_network(vm) else {
            return Ok(None);
        };
        let fail = |reason: String| VmError::ConsoleConfig {
            name: name.to_string(),
            reason,
        };
        let ns = network
            .namespace(net_id)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let subnet = network
            .subnet(net_id)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let address = console_address(&subnet).ok_or_else(|| {
            let shown = subnet
                .ip
                .addr()
                .map_or("<nil>".to_owned(), |a| a.to_string());
            fail(format!("invalid network address: {shown}"))
        })?;
        if !is_netns_name(&ns) {
            return Err(fail(format!("invalid network namespace {ns:?}")));
        }
        let console = &self.host().console;
        Ok(Some(WebConsole {
            netns: self.host().netns_dir.join(ns),
            address,
            port: console_port(ip),
            server: console.server.clone(),
            assets: console.assets.clone(),
        }))
    }

    /// The web console's address if it listens now (a console that cannot
    /// listen does not fail the Run: the reason is in `Inspect`).
    fn console_url(&self, name: &VmName) -> String {
        let live = self.live(name);
        if let Some(why) = &live.console_error {
            tracing::warn!(vm = %name, %why, "the web console does not listen");
        }
        live.console_url.unwrap_or_default()
    }

    /// What every VM present holds (PCI devices, writable disks).
    fn in_use(&self) -> InUse {
        let mut used = InUse::new();
        for other in self.names() {
            let spec: Option<vmd_runtime::spec::VmSpec> =
                files::read_json(&self.run_dir(&other).spec());
            if let Some(spec) = spec {
                used.add(&other, &spec);
            }
        }
        used
    }

    /// Undoes a Run that failed; what cannot be undone now is logged and
    /// left to reconciliation (the `creating` mark says so).
    async fn roll_back(&self, name: &VmName) {
        if let Err(e) = self.remove(name, false).await {
            tracing::error!(vm = %name, error = %e, "cannot roll back the failed Run; reconciliation finishes it");
        }
    }

    /// Writes the VM's files and hands its service to zinit; returns what
    /// its shim will say.
    async fn start(&self, vm: &Vm, plan: &Plan) -> Result<Started, VmError> {
        let name = &plan.name;
        let run = self.run_dir(name);
        // Leftovers of an earlier life of this name (a crash mid-way).
        if run.exists() {
            self.remove(name, false).await?;
        }
        let shown = || format!("cannot create the run directory of vm {name}");
        files::create_dir(run.path(), 0o700).what(shown)?;
        // Listening before the shim can say anything: nothing is missed.
        let seen = self.events().follow(name, true);
        self.mark(&run.creating_mark())?;
        files::write_json(&run.request(), vm, 0o600)
            .what(|| format!("cannot write the request of vm {name}"))?;
        let seed_synced = super::cloudinit::write_image(&self.paths().seed(name), &plan.seed)
            .what(|| "cannot write the cloud-init image".into())?
            .sync_later();
        plan.spec
            .save(&run.spec())
            .what(|| format!("cannot write the description of vm {name}"))?;
        // What the Go VM module needs to adopt it after a roll-back.
        if let Some(cfg) = &plan.spec.go_config {
            let machine = super::goconfig::Machine::of(&plan.spec);
            files::replace(cfg, &machine.to_json(), 0o600)
                .what(|| format!("cannot write the Go config of vm {name}"))?;
        }
        // A new VM starts with a new console log.
        console::remove(&self.paths().log(name))
            .what(|| format!("cannot remove the old console log of vm {name}"))?;
        let service = service_of(name);
        self.services()
            .install(&service, &plan.service)
            .what(|| format!("cannot write the service file of {service}"))?;
        // Before zinit runs the shim: `created` comes before its events.
        self.events().created(name);
        let started = match self.zinit().monitor(&service).await {
            Err(zinit::ZinitError::AlreadyMonitored(_)) => {
                // A service zinit kept from an earlier life: replace it.
                match self.zinit().remove(&service, Duration::from_secs(10)).await {
                    Ok(()) => self.zinit().monitor(&service).await,
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        started.map_err(|source| VmError::ServiceStart {
            service: service.to_string(),
            source,
        })?;
        Ok(Started { seen, seed_synced })
    }

    /// Waits until the VM of `name` has booted, or its start failed (the
    /// reason, for the caller), listening to what its shim pushes. Only a
    /// shim that never says anything is looked for in zinit (it may not
    /// start at all: a missing binary, a broken service file).
    pub(super) async fn wait_up(
        &self,
        name: &VmName,
        mut seen: Receiver<Seen>,
    ) -> Result<(), NotUp> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut heard = false;
        let mut ask_zinit = Instant::now() + SHIM_SILENT;
        loop {
            let got = tokio::select! {
                got = seen.recv() => got,
                _ = tokio::time::sleep_until(ask_zinit.into()), if !heard => {
                    self.shim_never_started(name).await?;
                    ask_zinit = Instant::now() + SHIM_SILENT;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(NotUp::Timeout(START_TIMEOUT));
                }
            };
            let verdict = match got {
                Ok(Seen::State(st)) => {
                    heard = true;
                    booted_by_state(&st)
                }
                Ok(Seen::Event(ev)) => {
                    heard = true;
                    booted_by_event(&ev)
                }
                // zinit restarts the shim: until the next one speaks, zinit
                // is what can say why it does not.
                Ok(Seen::Gone) => {
                    heard = false;
                    None
                }
                // Fell behind (it cannot, with a few events per boot): the
                // shim's record says where the VM is.
                Err(RecvError::Lagged(_)) => match ShimState::load(&self.run_dir(name).state()) {
                    Ok(Some(st)) => booted_by_state(&st),
                    _ => None,
                },
                Err(RecvError::Closed) => return Err(NotUp::Lost),
            };
            if let Some(v) = verdict {
                return v;
            }
        }
    }

    /// A shim zinit cannot keep running, and that never spoke.
    async fn shim_never_started(&self, name: &VmName) -> Result<(), NotUp> {
        let service = service_of(name);
        match self.zinit().status(&service).await {
            Ok(s) if matches!(s.state, zinit::State::Error(_) | zinit::State::Failure) => {
                let lines = self.zinit().service_log(&service).await.unwrap_or_default();
                Err(NotUp::ShimFailed {
                    state: s.state.to_string(),
                    last_line: lines.last().cloned().unwrap_or_default(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Whether a state the shim reports settles the Run.
fn booted_by_state(st: &ShimState) -> Option<Result<(), NotUp>> {
    if let Some(exit) = st.exits.last() {
        return Some(Err(NotUp::Stopped(exit.status.clone())));
    }
    match st.phase {
        Phase::Failed | Phase::PoweredOff => Some(Err(NotUp::Failed(
            st.reason.clone().unwrap_or_else(|| "the VM failed".into()),
        ))),
        // Up means booted (the VMM's `booted` event): the API answers
        // before the kernel is loaded, and a VMM that cannot load it exits
        // right after.
        Phase::Running if st.booted() => Some(Ok(())),
        _ => None,
    }
}

/// Whether an event settles the Run.
fn booted_by_event(ev: &ShimEvent) -> Option<Result<(), NotUp>> {
    let reason = || ev.reason.clone().unwrap_or_else(|| ev.kind.to_string());
    match ev.kind {
        EventKind::Booted => Some(Ok(())),
        EventKind::Crashed => Some(Err(NotUp::Stopped(reason()))),
        EventKind::PoweredOff => Some(Err(NotUp::Stopped("guest powered off".into()))),
        EventKind::Failed => Some(Err(NotUp::Failed(reason()))),
        _ => None,
    }
}

/// The network the web console goes on: the first interface with a private
/// network and an IPv4 address, with that address.
fn console_network(vm: &Vm) -> Option<(&str, Ipv4Addr)> {
    vm.network.ifaces.iter().find_map(|i| {
        if i.net_id.is_empty() {
            return None;
        }
        let v4 = i.ips.iter().find_map(|n| match n.ip.addr()? {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(a) => a.to_ipv4_mapped(),
        })?;
        Some((i.net_id.as_str(), v4))
    })
}
