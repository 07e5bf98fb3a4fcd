//! The VM module: every VM a zinit service `vm:<name>` running vmd-shim.
//!
//! vmd keeps nothing in memory: the desired state is the files of a VM's
//! runtime directory (see [`super::layout`]), the live state comes from zinit
//! and the shim. Every change is ordered so that a vmd killed at any instant
//! leaves a state that start-up reconciliation completes or rolls back:
//!
//! * A VM exists exactly while `<runtime>/present/<name>` does: Run creates
//!   it as its last step, Delete removes it as its first.
//! * Run writes `creating` first; a VM directory that is not present
//!   (`creating` left behind) is rolled back: its caller never got a success.
//! * Delete writes `deleted` (a shim respawned by zinit then starts nothing)
//!   and removes the directory last; whatever is left is deleted to the end.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use vmd_shim::control;
use vmd_shim::state::{Phase, ShimState};

use super::layout::{Layout, CREATING_MARK};
use super::metrics;
use super::name::VmName;
use super::validate::{validate, Settings};
use crate::api::{MachineInfo, MachineMetrics, Stream, Vm, VmInfo};
use crate::module::{MethodError, MethodResult, VmModule};

/// How long Run waits for the VMM's API to answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Zero-OS's `Logs`: the last 2 KiB.
const LOGS_TAIL: u64 = 2048;
/// What `LogsFull` returns at most (the log is rotated at 8 MiB anyway).
const LOGS_FULL_MAX: u64 = 16 << 20;

pub struct Manager {
    layout: Layout,
    settings: Settings,
    zinit: zinit::Client,
    services: zinit::ConfigDir,
}

fn err(e: impl std::fmt::Display) -> MethodError {
    MethodError::new(e.to_string())
}

fn missing(name: &str) -> MethodError {
    MethodError::new(format!("machine '{name}' does not exist"))
}

/// Writes `data` to `path` whole (temp + fsync + rename).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn remove_file(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The state of a VM as `Inspect` reports it.
pub struct Live {
    pub state: String,
    pub reason: Option<String>,
    pub restarts: u64,
    pub pid: Option<i64>,
    pub uptime: Option<u64>,
}

impl Manager {
    pub fn new(layout: Layout, settings: Settings) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(layout.vms())?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(layout.logs())?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(layout.present_dir())?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(layout.seeds())?;
        let services = zinit::ConfigDir::open(&layout.zinit_dir).map_err(io::Error::other)?;
        let zinit = zinit::Client::new(&layout.zinit_socket).with_timeout(Duration::from_secs(10));
        Ok(Manager {
            layout,
            settings,
            zinit,
            services,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn zinit(&self) -> &zinit::Client {
        &self.zinit
    }

    pub fn services(&self) -> &zinit::ConfigDir {
        &self.services
    }

    /// A name from a caller: invalid names exist nowhere.
    fn name(&self, name: &str) -> Option<VmName> {
        VmName::new(name).ok()
    }

    /// A VM is present once Run completed and until Delete starts.
    pub fn present(&self, name: &VmName) -> bool {
        self.layout.present_mark(name).exists()
    }

    fn read_request(&self, name: &VmName) -> Option<Vm> {
        let text = fs::read_to_string(self.layout.request(name)).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn service_file(&self, name: &VmName) -> Result<zinit::Service, MethodError> {
        let run = self.layout.run_dir(name);
        let exec = zinit::Command::new([
            self.layout.shim.to_string_lossy().into_owned(),
            "--dir".to_owned(),
            run.0.to_string_lossy().into_owned(),
        ])
        .map_err(err)?;
        let mut svc = zinit::Service::new(exec);
        // At system shutdown zinit waits this long for the graceful stop.
        svc.shutdown_timeout = Some(self.settings.grace_secs + 10);
        Ok(svc)
    }

    /// Removes every trace of `name`: graceful stop through the shim, the
    /// zinit service, the files, the log. Safe to repeat at any point.
    pub async fn remove(&self, name: &VmName, graceful: bool) -> Result<(), MethodError> {
        // First: from now on the VM does not exist for callers.
        remove_file(&self.layout.present_mark(name)).map_err(err)?;
        self.remove_streams_of(name.as_str()).await?;
        let run = self.layout.run_dir(name);
        let service = name.service();
        if !run.0.exists() && !self.services.exists(&service) {
            // Nothing of it on disk, so nothing vmd ever started: no need to
            // ask zinit (which may be down).
            remove_file(&self.layout.seed(name)).map_err(err)?;
            return Ok(());
        }
        if run.0.exists() {
            // From here on a shim respawned by zinit starts nothing.
            write_atomic(&run.deleted_mark(), b"").map_err(err)?;
        }
        if graceful && run.control_socket().exists() {
            let wait = Duration::from_secs(self.settings.grace_secs + 15);
            if let Err(e) = control::request(&run.control_socket(), "stop", wait).await {
                tracing::warn!(vm = %name, error = %e, "graceful stop through the shim failed; zinit will stop it");
            }
        }
        match self.zinit.remove(&service, Duration::from_secs(10)).await {
            Ok(()) => {}
            // Rolling back a Run that zinit could not take: there is no
            // service to stop (zinit never had it or is gone), and leaving
            // the files would leak them. Reconciliation removes a service
            // zinit still had once it is back.
            Err(e @ zinit::ZinitError::Connect { .. }) if !graceful => {
                tracing::warn!(vm = %name, error = %e, "zinit unreachable; removing the files of the failed Run anyway");
            }
            Err(e) => {
                return Err(err(format!(
                    "cannot remove service {service}: {e}; the VM is gone for callers and \
                     its removal completes on the next Delete or when vmd restarts"
                )))
            }
        }
        self.services.remove(&service).map_err(err)?;
        let log = self.layout.log(name);
        remove_file(&log).map_err(err)?;
        remove_file(&vmd_shim::console::meta_path(&log)).map_err(err)?;
        remove_file(&self.layout.seed(name)).map_err(err)?;
        match fs::remove_dir_all(&run.0) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        Ok(())
    }

    /// Waits until the VMM of `name` answers its API, or the start failed.
    async fn wait_up(&self, name: &VmName) -> Result<(), String> {
        let run = self.layout.run_dir(name);
        let service = name.service();
        let t0 = Instant::now();
        let mut polls = 0u32;
        loop {
            let st = ShimState::load(&run.state());
            if let Some(exit) = st.exits.last() {
                return Err(format!(
                    "the VM stopped right after its start: {}",
                    exit.status
                ));
            }
            match st.phase {
                Phase::Failed | Phase::PoweredOff => {
                    return Err(st.reason.unwrap_or_else(|| "the VM failed".into()));
                }
                // Up means booted: the API answers before the kernel is
                // loaded, and a VMM that cannot load it exits right after.
                Phase::Running if st.vmm.is_some_and(|v| v.alive()) => {
                    let info = vmd_shim::api::expect_ok(
                        &run.api_socket(),
                        "GET",
                        "vm.info",
                        Duration::from_secs(2),
                    )
                    .await;
                    if let Ok(body) = info {
                        let info: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        if info["state"] == "Running" || info["state"] == "Paused" {
                            return Ok(());
                        }
                    }
                }
                _ => {}
            }
            // The shim itself may fail before it writes any state.
            polls += 1;
            if polls.is_multiple_of(20) {
                if let Ok(s) = self.zinit.status(&service).await {
                    if matches!(s.state, zinit::State::Error(_) | zinit::State::Failure)
                        && st.vmm.is_none()
                    {
                        let lines = self.zinit.service_log(&service).await.unwrap_or_default();
                        let last = lines.last().cloned().unwrap_or_default();
                        return Err(format!("the shim could not start ({}): {last}", s.state));
                    }
                }
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(format!("the VMM did not answer within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn start(
        &self,
        name: &VmName,
        vm: &Vm,
        spec: &vmd_shim::spec::VmSpec,
        seed: &super::cloudinit::SeedFiles,
    ) -> Result<(), MethodError> {
        use std::os::unix::fs::DirBuilderExt;
        let run = self.layout.run_dir(name);
        // Leftovers of an earlier life of this name (a crash mid-way).
        if run.0.exists() {
            self.remove(name, false).await?;
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&run.0)
            .map_err(err)?;
        write_atomic(&run.0.join(CREATING_MARK), b"").map_err(err)?;
        let request = serde_json::to_vec_pretty(vm).map_err(err)?;
        write_atomic(&self.layout.request(name), &request).map_err(err)?;
        super::cloudinit::write_image(&self.layout.seed(name), seed)
            .map_err(|e| err(format!("cannot write the cloud-init image: {e}")))?;
        write_atomic(&run.spec(), &serde_json::to_vec_pretty(spec).map_err(err)?).map_err(err)?;
        // A new VM starts with a new console log.
        let log = self.layout.log(name);
        remove_file(&log).map_err(err)?;
        remove_file(&vmd_shim::console::meta_path(&log)).map_err(err)?;
        let service = name.service();
        self.services
            .install(&service, &self.service_file(name)?)
            .map_err(err)?;
        match self.zinit.monitor(&service).await {
            Ok(()) => {}
            Err(zinit::ZinitError::AlreadyMonitored(_)) => {
                // A service zinit kept from an earlier life: replace it.
                self.zinit
                    .remove(&service, Duration::from_secs(10))
                    .await
                    .map_err(err)?;
                self.zinit.monitor(&service).await.map_err(err)?;
            }
            Err(e) => return Err(err(format!("cannot start service {service}: {e}"))),
        }
        Ok(())
    }

    /// What `Inspect` adds to Zero-OS's fields.
    pub async fn live(&self, name: &VmName) -> Live {
        let run = self.layout.run_dir(name);
        let st = ShimState::load(&run.state());
        let vmm_alive = st.vmm.is_some_and(|v| v.alive());
        let mut state = st.phase.as_str().to_owned();
        if st.phase == Phase::Running {
            if !vmm_alive {
                state = "restarting".into();
            } else if let Ok(body) = vmd_shim::api::expect_ok(
                &run.api_socket(),
                "GET",
                "vm.info",
                Duration::from_millis(500),
            )
            .await
            {
                let info: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if info["state"] == "Paused" {
                    state = "paused".into();
                }
            }
        }
        let reason = match st.phase {
            Phase::Failed | Phase::PoweredOff | Phase::BackingOff | Phase::Stopped => {
                st.reason.clone()
            }
            _ => None,
        };
        Live {
            state,
            reason,
            restarts: st.restarts,
            pid: st.vmm.filter(|_| vmm_alive).map(|v| i64::from(v.pid)),
            uptime: st
                .vmm_started_at
                .filter(|_| vmm_alive)
                .map(|t| vmd_shim::state::now_secs().saturating_sub(t)),
        }
    }

    /// Every service zinit runs (`monitored`, its listing) or has a file
    /// for, sorted: what start-up reconciliation checks against vmd's own
    /// records.
    pub fn known_services(
        &self,
        monitored: Option<&std::collections::BTreeMap<String, zinit::State>>,
    ) -> Vec<String> {
        let mut services: Vec<String> = self
            .services
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(list) = monitored {
            services.extend(list.keys().cloned());
        }
        services.sort();
        services.dedup();
        services
    }

    /// Names of the VMs present, sorted.
    pub fn names(&self) -> Vec<VmName> {
        let mut out: Vec<VmName> = fs::read_dir(self.layout.present_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| VmName::new(&e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort();
        out
    }
}

impl VmModule for Manager {
    async fn run(&self, vm: Vm) -> MethodResult<MachineInfo> {
        let valid = validate(&vm, &self.layout, &self.settings).map_err(|e| {
            MethodError::new(format!("machine configuration validation failed: {e}"))
        })?;
        let name = valid.name;
        if self.present(&name) {
            // A retried Run of the same VM is answered as the first one was.
            if self.read_request(&name).as_ref() == Some(&vm) {
                return Ok(MachineInfo::default());
            }
            return Err(MethodError::new("a vm with same name already exists"));
        }
        // A PCI device belongs to one VM at a time.
        for other in self.names().into_iter().filter(|n| *n != name) {
            let Ok(text) = fs::read_to_string(self.layout.run_dir(&other).spec()) else {
                continue;
            };
            let Ok(spec) = serde_json::from_str::<vmd_shim::spec::VmSpec>(&text) else {
                continue;
            };
            if let Some(d) = valid.spec.devices.iter().find(|d| spec.devices.contains(d)) {
                return Err(MethodError::new(format!(
                    "machine configuration validation failed: PCI device {d} is already used by vm {other}"
                )));
            }
        }
        let t0 = Instant::now();
        if let Err(e) = self.start(&name, &vm, &valid.spec, &valid.seed).await {
            let _ = self.remove(&name, false).await;
            return Err(e);
        }
        match self.wait_up(&name).await {
            Ok(()) => {
                // The commit point: the VM exists.
                write_atomic(&self.layout.present_mark(&name), b"").map_err(err)?;
                remove_file(&self.layout.creating_mark(&name)).map_err(err)?;
                tracing::info!(vm = %name, took = ?t0.elapsed(), "vm started");
                Ok(MachineInfo::default())
            }
            Err(reason) => {
                let console = vmd_shim::console::tail_of(&self.layout.log(&name), LOGS_TAIL);
                let _ = self.remove(&name, false).await;
                tracing::warn!(vm = %name, %reason, "vm failed to start");
                let mut msg = format!("failed to start vm {name}: {reason}");
                if !console.trim().is_empty() {
                    msg.push_str("\nconsole:\n");
                    msg.push_str(console.trim_end());
                }
                Err(MethodError::new(msg))
            }
        }
    }

    async fn inspect(&self, name: String) -> MethodResult<VmInfo> {
        let n = self
            .name(&name)
            .filter(|n| self.present(n))
            .ok_or_else(|| missing(&name))?;
        let vm = self.read_request(&n).ok_or_else(|| missing(&name))?;
        let live = self.live(&n).await;
        Ok(VmInfo {
            ht_enabled: false,
            memory: (vm.memory >> 20) as i64,
            cpu: i64::from(vm.cpu),
            state: Some(live.state),
            reason: live.reason,
            restarts: Some(live.restarts),
            pid: live.pid,
            uptime_secs: live.uptime,
            streams: Some(self.stream_statuses(n.as_str())).filter(|s| !s.is_empty()),
        })
    }

    async fn delete(&self, name: String) -> MethodResult<()> {
        let n =
            VmName::new(&name).map_err(|e| MethodError::new(format!("invalid vm name: {e}")))?;
        let t0 = Instant::now();
        self.remove(&n, true).await?;
        tracing::info!(vm = %n, took = ?t0.elapsed(), "vm deleted");
        Ok(())
    }

    async fn exists(&self, name: String) -> bool {
        self.name(&name).is_some_and(|n| self.present(&n))
    }

    async fn logs(&self, name: String) -> MethodResult<String> {
        let Some(n) = self.name(&name) else {
            return Ok("no logs available".into());
        };
        let log = self.layout.log(&n);
        if !log.exists() {
            return Ok("no logs available".into());
        }
        Ok(vmd_shim::console::tail_of(&log, LOGS_TAIL))
    }

    async fn logs_full(&self, name: String) -> MethodResult<String> {
        let Some(n) = self.name(&name) else {
            return Ok("no logs available".into());
        };
        let log = self.layout.log(&n);
        if !log.exists() {
            return Ok("no logs available".into());
        }
        Ok(vmd_shim::console::tail_of(&log, LOGS_FULL_MAX))
    }

    async fn list(&self) -> MethodResult<Vec<String>> {
        Ok(self
            .names()
            .into_iter()
            .map(|n| n.as_str().to_owned())
            .collect())
    }

    async fn metrics(&self) -> MethodResult<MachineMetrics> {
        Ok(metrics::collect(self).await)
    }

    async fn lock(&self, name: String, lock: bool) -> MethodResult<()> {
        let n = self
            .name(&name)
            .filter(|n| self.present(n))
            .ok_or_else(|| missing(&name))?;
        let run = self.layout.run_dir(&n);
        // The mark makes the lock outlive the VMM: the shim pauses every VMM
        // it (re)starts while the mark is there.
        let mark = run.locked_mark();
        let recorded = if lock {
            std::fs::File::create(&mark).map(drop)
        } else {
            match std::fs::remove_file(&mark) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        };
        recorded
            .map_err(|e| MethodError::new(format!("cannot record the lock of vm {name}: {e}")))?;
        let api = run.api_socket();
        let t = Duration::from_secs(5);
        let info = vmd_shim::api::expect_ok(&api, "GET", "vm.info", t)
            .await
            .map_err(|e| {
                MethodError::new(format!(
                    "vm {name} is not running ({e}); the {} applies when it starts again",
                    if lock { "lock" } else { "unlock" }
                ))
            })?;
        let info: serde_json::Value = serde_json::from_slice(&info).unwrap_or_default();
        let (want, endpoint) = if lock {
            ("Paused", "vm.pause")
        } else {
            ("Running", "vm.resume")
        };
        if info["state"] == want {
            return Ok(());
        }
        vmd_shim::api::expect_ok(&api, "PUT", endpoint, t)
            .await
            .map(drop)
            .map_err(|e| {
                MethodError::new(format!(
                    "cannot {} vm {name}: {e}",
                    if lock { "pause" } else { "resume" }
                ))
            })
    }

    async fn stream_create(&self, name: String, stream: Stream) -> MethodResult<()> {
        Manager::stream_create(self, &name, &stream).await
    }

    async fn stream_delete(&self, id: String) -> MethodResult<()> {
        self.remove_stream(&id).await
    }
}
