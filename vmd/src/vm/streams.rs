//! Log streams (`StreamCreate`, `StreamDelete`): each a zinit service
//! `stream:<id>` running vmd-logstream, following one VM's console log.
//! Their files: `HostPaths::{stream_spec, stream_progress}`.

use std::collections::BTreeMap;
use std::fs;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmd_runtime::events::EventKind;
use vmd_runtime::output::{redact_url, Output};
use vmd_runtime::progress::Progress;
use vmd_runtime::{console, files, StreamId, VmName};

use super::error::{Invalid, IoContext, VmError};
use super::manager::Manager;
use crate::api::{Stream, StreamStatus};
use crate::zbus::keyed::KeyedLocks;

/// What a new stream sends of the console printed before it (the worker's
/// default `--tail`, which receivers of Zero-OS's helper expect).
const STREAM_TAIL: u64 = 8192;

/// One stream as the metrics endpoint shows it.
#[derive(Debug, Clone)]
pub struct StreamSample {
    pub id: String,
    pub vm: String,
    pub progress: Progress,
    /// Console bytes printed and not yet sent (unknown while the log is
    /// being rotated).
    pub lag_bytes: Option<u64>,
}

/// A stream as its caller asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSpec {
    pub id: String,
    pub vm: String,
    pub namespace: String,
    pub output: String,
}

fn service_of(id: &StreamId) -> zinit::ServiceName {
    // A valid id makes a valid service name.
    zinit::ServiceName::new(id.service()).expect("stream service name")
}

fn refused(why: impl Into<String>) -> VmError {
    VmError::InvalidStream(Invalid(why.into()))
}

impl Manager {
    /// Every stream recorded, sorted by id.
    pub fn stream_specs(&self) -> Vec<StreamSpec> {
        let mut out: Vec<StreamSpec> = fs::read_dir(self.paths().streams_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| files::read_json(&e.path()))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Every stream's delivery, for the metrics endpoint: its worker's
    /// progress, and how far it is behind its VM's console.
    pub fn stream_samples(&self) -> Vec<StreamSample> {
        self.stream_specs()
            .into_iter()
            .filter_map(|s| {
                let id = StreamId::new(&s.id).ok()?;
                let vm = VmName::new(&s.vm).ok()?;
                let progress =
                    Progress::load(&self.paths().stream_progress(&id)).unwrap_or_default();
                let end = console::extent(&self.paths().log(&vm)).map(|(_, end)| end);
                Some(StreamSample {
                    lag_bytes: end.map(|e| e.saturating_sub(progress.pos)),
                    id: id.to_string(),
                    vm: vm.to_string(),
                    progress,
                })
            })
            .collect()
    }

    /// The console bytes each of `names` wrote so far (the absolute end of
    /// its log).
    pub fn console_written<'n>(&self, names: impl Iterator<Item = &'n str>) -> Vec<(String, u64)> {
        names
            .filter_map(|n| {
                let vm = VmName::new(n).ok()?;
                let (_, end) = console::extent(&self.paths().log(&vm))?;
                Some((n.to_owned(), end))
            })
            .collect()
    }

    fn check_namespace(&self, ns: &str) -> Result<(), VmError> {
        if ns.is_empty() {
            return Ok(());
        }
        if !super::host::is_netns_name(ns) {
            return Err(refused(format!("invalid network namespace {ns:?}")));
        }
        if !self.host().netns_dir.join(ns).exists() {
            return Err(refused(format!("network namespace {ns:?} does not exist")));
        }
        Ok(())
    }

    /// Whether one more stream of `vm` stays within the limits. Changes of
    /// one VM run one after the other, so its own count is exact; the
    /// host's may be passed by the changes in flight on other VMs at once.
    fn check_stream_room(&self, vm: &VmName) -> Result<(), VmError> {
        let specs = self.stream_specs();
        let (per_vm, total) = (
            self.settings().max_streams_per_vm,
            self.settings().max_streams,
        );
        let of_vm = specs.iter().filter(|s| s.vm == vm.as_str()).count();
        if of_vm >= per_vm {
            return Err(refused(format!(
                "vm {vm} has {of_vm} log streams already, the most one VM may have ({per_vm})"
            )));
        }
        if specs.len() >= total {
            return Err(refused(format!(
                "the host has {} log streams already, the most it may have ({total})",
                specs.len()
            )));
        }
        Ok(())
    }

    pub async fn stream_create(&self, vm: &str, stream: &Stream) -> Result<(), VmError> {
        let name = self.existing(vm)?;
        let id = StreamId::new(&stream.id).map_err(|e| VmError::InvalidStream(e.into()))?;
        stream
            .output
            .parse::<Output>()
            .map_err(|e| refused(e.to_string()))?;
        self.check_namespace(&stream.namespace)?;
        let spec_path = self.paths().stream_spec(&id);
        let svc = service_of(&id);
        let spec = StreamSpec {
            id: id.to_string(),
            vm: name.to_string(),
            namespace: stream.namespace.clone(),
            // Validated above; kept as given, credentials and all, for the
            // worker alone (the record is 0600).
            output: stream.output.clone(),
        };
        let half_made = if spec_path.exists() || self.services().exists(&svc) {
            // A caller retrying after a lost reply gets the same success
            // (as with Run); the same id for anything else is refused.
            let existing: Option<StreamSpec> = files::read_json(&spec_path);
            if existing.as_ref() != Some(&spec) {
                return Err(VmError::StreamExists(stream.id.clone()));
            }
            if self.services().exists(&svc) {
                return match self.zinit().monitor(&svc).await {
                    Ok(()) | Err(zinit::ZinitError::AlreadyMonitored(_)) => Ok(()),
                    Err(source) => Err(VmError::StreamStart {
                        id: spec.id,
                        source,
                    }),
                };
            }
            // This very stream, recorded by a StreamCreate that died before
            // its service was written (the request, served again after a
            // crash, lands here before the reconciliation does): finish it.
            true
        } else {
            false
        };
        // A half-made stream counts already.
        if !half_made {
            self.check_stream_room(&name)?;
        }
        let result = self.install_stream(&name, &id, &spec).await;
        if result.is_ok() {
            self.events()
                .note(&name, EventKind::StreamStarted, Some(id.to_string()));
        }
        if result.is_err() {
            if let Err(e) = self.remove_stream(&id).await {
                tracing::error!(stream = %id, error = %e, "cannot undo the failed StreamCreate; reconciliation removes it");
            }
        }
        result
    }

    async fn install_stream(
        &self,
        name: &VmName,
        id: &StreamId,
        spec: &StreamSpec,
    ) -> Result<(), VmError> {
        let paths = self.paths();
        let host = self.host();
        files::write_json(&paths.stream_spec(id), spec, 0o600)
            .what(|| format!("cannot write the record of stream {id}"))?;
        let progress = paths.stream_progress(id);
        let mut argv = vec![
            host.logstream.to_string_lossy().into_owned(),
            "--log".into(),
            paths.log(name).to_string_lossy().into_owned(),
            // From the record (0600): a receiver's credentials appear on
            // no command line, in no service file, in no `zinit status`.
            "--output-from".into(),
            paths.stream_spec(id).to_string_lossy().into_owned(),
            "--state".into(),
            progress.to_string_lossy().into_owned(),
        ];
        if !spec.namespace.is_empty() {
            argv.extend([
                "--namespace".into(),
                spec.namespace.clone(),
                "--netns-dir".into(),
                host.netns_dir.to_string_lossy().into_owned(),
            ]);
        }
        if let Some(uid) = host.stream_uid {
            argv.extend(["--user".into(), uid.to_string()]);
        }
        if let Some(ca) = &host.stream_ca_file {
            argv.extend(["--ca-file".into(), ca.to_string_lossy().into_owned()]);
        }
        // The stream starts here, now (the last 8 KiB, then everything
        // after), not whenever zinit gets the worker running: what the VM
        // prints in between is sent too. The worker resumes from this.
        // While the log is being rotated the worker takes the tail itself.
        if !progress.exists() {
            if let Some((base, end)) = console::extent(&paths.log(name)) {
                let start = Progress {
                    pos: end.saturating_sub(STREAM_TAIL).max(base),
                    ..Default::default()
                };
                start
                    .save_for(&progress, host.stream_uid)
                    .what(|| format!("cannot write the progress of stream {id}"))?;
            }
        }
        let exec = zinit::Command::new(argv).map_err(|e| refused(e.to_string()))?;
        let svc = service_of(id);
        self.services()
            .install(&svc, &zinit::Service::new(exec))
            .what(|| format!("cannot write the service file of {svc}"))?;
        self.zinit()
            .monitor(&svc)
            .await
            .map_err(|source| VmError::StreamStart {
                id: id.to_string(),
                source,
            })
    }

    /// `StreamDelete`: an unknown (or invalid) id is removed already.
    pub async fn stream_delete(&self, id: &str) -> Result<(), VmError> {
        match StreamId::new(id) {
            Ok(id) => self.remove_stream(&id).await,
            Err(_) => Ok(()),
        }
    }

    /// Stops and removes a stream.
    pub async fn remove_stream(&self, id: &StreamId) -> Result<(), VmError> {
        let svc = service_of(id);
        let of: Option<StreamSpec> = files::read_json(&self.paths().stream_spec(id));
        self.zinit()
            .remove(&svc, Duration::from_secs(10))
            .await
            .map_err(|source| VmError::StreamStop {
                id: id.to_string(),
                source,
            })?;
        self.services()
            .remove(&svc)
            .what(|| format!("cannot remove the service file of {svc}"))?;
        // The worker is gone (zinit waited for it): what it was writing too.
        for p in [
            self.paths().stream_progress(id),
            self.paths().stream_inflight(id),
            self.paths().stream_spec(id),
        ] {
            files::remove_state(&p).what(|| format!("cannot remove {}", p.display()))?;
        }
        if let Some(vm) = of.and_then(|s| VmName::new(&s.vm).ok()) {
            self.events()
                .note(&vm, EventKind::StreamStopped, Some(id.to_string()));
        }
        Ok(())
    }

    /// Every stream of VM `vm`.
    pub async fn remove_streams_of(&self, vm: &VmName) -> Result<(), VmError> {
        for s in self
            .stream_specs()
            .into_iter()
            .filter(|s| s.vm == vm.as_str())
        {
            if let Ok(id) = StreamId::new(&s.id) {
                self.remove_stream(&id).await?;
            }
        }
        Ok(())
    }

    pub fn stream_statuses(&self, vm: &VmName) -> Vec<StreamStatus> {
        self.stream_specs()
            .into_iter()
            .filter(|s| s.vm == vm.as_str())
            .map(|s| {
                let p = StreamId::new(&s.id)
                    .ok()
                    .and_then(|id| Progress::load(&self.paths().stream_progress(&id)))
                    .unwrap_or_default();
                StreamStatus {
                    // Without credentials: Inspect and `vmd ctl` show it.
                    output: s
                        .output
                        .parse::<Output>()
                        .map_or_else(|_| redact_url(&s.output), |o| o.to_string()),
                    id: s.id,
                    connected: p.connected,
                    sent_bytes: p.sent_bytes,
                    dropped_bytes: p.dropped_bytes,
                    unheard_bytes: p.unheard_bytes,
                    rejected_bytes: p.rejected_bytes,
                }
            })
            .collect()
    }

    /// Start-up reconciliation of streams: streams whose VM or service is
    /// gone, services without a stream, workers zinit no longer monitors
    /// (`monitored`: its listing). Returns what it removed.
    pub async fn reconcile_streams(
        &self,
        locks: &Arc<KeyedLocks>,
        monitored: Option<&BTreeMap<String, zinit::State>>,
    ) -> Vec<String> {
        let mut removed = Vec::new();
        for s in self.stream_specs() {
            let Ok(id) = StreamId::new(&s.id) else {
                continue;
            };
            // A StreamCreate of the same id may be running: hold its key.
            let _key = locks.lock(id.service()).await;
            if !self.paths().stream_spec(&id).exists() {
                continue;
            }
            let vm_there = VmName::new(&s.vm).is_ok_and(|n| self.present(&n));
            let svc = service_of(&id);
            let svc_there = self.services().exists(&svc);
            if !vm_there || !svc_there {
                removed.push(id.service());
                if let Err(e) = self.remove_stream(&id).await {
                    tracing::error!(stream = %id, error = %e, "cannot remove a stream whose VM is gone");
                }
            } else if monitored.is_some_and(|m| !m.contains_key(svc.as_str())) {
                if let Err(e) = self.zinit().monitor(&svc).await {
                    tracing::error!(stream = %id, error = %e, "cannot monitor the stream's worker again");
                }
            }
        }
        let recorded = |s: &str| {
            s.strip_prefix("stream:")
                .and_then(|id| StreamId::new(id).ok())
                .is_some_and(|id| self.paths().stream_spec(&id).exists())
        };
        // The Go VM module's streams (`sh -c "exec tailstream …"`, on a node
        // vmd took over) run on until a StreamDelete of their id: only
        // vmd-logstream workers without a record are vmd's leftovers.
        let foreign = |s: &str| {
            zinit::ServiceName::new(s.to_owned())
                .ok()
                .and_then(|svc| self.services().read(&svc).ok())
                .is_some_and(|f| std::path::Path::new(f.exec.program()) != self.host().logstream)
        };
        for s in self.known_services(monitored) {
            if !s.starts_with("stream:") || recorded(&s) {
                continue;
            }
            if foreign(&s) {
                tracing::info!(service = %s, "a log stream vmd did not start (the Go VM module's): left running");
                continue;
            }
            let _key = locks.lock(s.clone()).await;
            if recorded(&s) {
                continue;
            }
            removed.push(s.clone());
            if let Ok(svc) = zinit::ServiceName::new(s.clone()) {
                if let Err(e) = self.zinit().remove(&svc, Duration::from_secs(10)).await {
                    tracing::error!(service = %s, error = %e, "cannot remove an orphan stream service");
                }
                if let Err(e) = self.services().remove(&svc) {
                    tracing::error!(service = %s, error = %e, "cannot remove an orphan stream service file");
                }
            }
        }
        removed
    }
}
