//! Log streams: each a zinit service `stream:<id>` running vmd-logstream,
//! following one VM's console log.
//!
//! ```text
//! <runtime-dir>/streams/<id>.json       what the caller asked for (id, vm, namespace, output)
//! <runtime-dir>/streams/<id>.progress   the worker's position and counters
//! <zinit-dir>/stream:<id>.yaml          the service
//! ```

use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmd_logstream::output::Output;
use vmd_logstream::progress::Progress;

use super::manager::{write_atomic, Manager};
use super::name::VmName;
use crate::api::{Stream, StreamStatus};
use crate::module::MethodError;
use crate::zbus::keyed::KeyedLocks;

/// What a new stream sends of the console printed before it (the worker's
/// default `--tail`, which receivers of Zero-OS's helper expect).
const STREAM_TAIL: u64 = 8192;

struct LogEnd {
    base: u64,
    pos: u64,
}

/// Where the console log of a VM ends, in absolute offsets; `None` while
/// the log is being rotated (the worker then takes the tail itself).
fn log_end(log: &std::path::Path) -> Option<LogEnd> {
    use std::os::unix::fs::MetadataExt;
    let md = match fs::metadata(log) {
        Ok(md) => md,
        Err(_) => return Some(LogEnd { base: 0, pos: 0 }),
    };
    let base = match vmd_shim::console::read_meta(log, md.ino()) {
        Some(m) => m.base,
        None if !vmd_shim::console::meta_path(log).exists() => 0,
        None => return None,
    };
    Some(LogEnd {
        base,
        pos: base + md.len(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSpec {
    pub id: String,
    pub vm: String,
    pub namespace: String,
    pub output: String,
}

fn valid_id(id: &str) -> Result<(), MethodError> {
    if id.is_empty() {
        return Err(MethodError::new("missing stream id"));
    }
    let ok = id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(MethodError::new(format!(
            "invalid stream id {id:?}: 1-64 letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

fn service(id: &str) -> zinit::ServiceName {
    // A valid id makes a valid service name.
    zinit::ServiceName::new(format!("stream:{id}")).expect("stream service name")
}

impl Manager {
    fn streams_dir(&self) -> PathBuf {
        self.layout().runtime.join("streams")
    }

    fn stream_spec_path(&self, id: &str) -> PathBuf {
        self.streams_dir().join(format!("{id}.json"))
    }

    fn stream_progress_path(&self, id: &str) -> PathBuf {
        self.streams_dir().join(format!("{id}.progress"))
    }

    pub fn stream_specs(&self) -> Vec<StreamSpec> {
        let mut out: Vec<StreamSpec> = fs::read_dir(self.streams_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_str(&fs::read_to_string(e.path()).ok()?).ok())
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub async fn stream_create(&self, vm: &str, stream: &Stream) -> Result<(), MethodError> {
        let name = VmName::new(vm)
            .ok()
            .filter(|n| self.present(n))
            .ok_or_else(|| MethodError::new(format!("machine '{vm}' does not exist")))?;
        valid_id(&stream.id)?;
        stream
            .output
            .parse::<Output>()
            .map_err(|e| MethodError::new(e.to_string()))?;
        if !stream.namespace.is_empty() {
            let ns = &stream.namespace;
            if ns.contains('/')
                || ns.starts_with('.')
                || ns.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(MethodError::new(format!(
                    "invalid network namespace {ns:?}"
                )));
            }
            if !self.layout().netns_dir.join(ns).exists() {
                return Err(MethodError::new(format!(
                    "network namespace {ns:?} does not exist"
                )));
            }
        }
        let spec_path = self.stream_spec_path(&stream.id);
        let svc = service(&stream.id);
        let spec = StreamSpec {
            id: stream.id.clone(),
            vm: name.as_str().to_owned(),
            namespace: stream.namespace.clone(),
            // Validated above; passed on as given, credentials and all.
            output: stream.output.clone(),
        };
        if spec_path.exists() || self.services().exists(&svc) {
            // A caller retrying after a lost reply gets the same success
            // (as with Run); the same id for anything else is refused.
            let existing: Option<StreamSpec> = fs::read_to_string(&spec_path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            if existing.as_ref() == Some(&spec) && self.services().exists(&svc) {
                return match self.zinit().monitor(&svc).await {
                    Ok(()) | Err(zinit::ZinitError::AlreadyMonitored(_)) => Ok(()),
                    Err(e) => Err(MethodError::new(format!(
                        "cannot start stream {}: {e}",
                        spec.id
                    ))),
                };
            }
            return Err(MethodError::new(format!(
                "stream with id '{}' already exists",
                stream.id
            )));
        }
        let result = self.install_stream(&name, &spec).await;
        if result.is_err() {
            let _ = self.remove_stream(&stream.id).await;
        }
        result
    }

    async fn install_stream(&self, name: &VmName, spec: &StreamSpec) -> Result<(), MethodError> {
        use std::os::unix::fs::DirBuilderExt;
        let err = |e: &dyn std::fmt::Display| MethodError::new(e.to_string());
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(self.streams_dir())
            .map_err(|e| err(&e))?;
        write_atomic(
            &self.stream_spec_path(&spec.id),
            &serde_json::to_vec_pretty(spec).map_err(|e| err(&e))?,
        )
        .map_err(|e| err(&e))?;
        let mut argv = vec![
            self.layout().logstream.to_string_lossy().into_owned(),
            "--log".into(),
            self.layout().log(name).to_string_lossy().into_owned(),
            "--output".into(),
            spec.output.clone(),
            "--state".into(),
            self.stream_progress_path(&spec.id)
                .to_string_lossy()
                .into_owned(),
        ];
        if !spec.namespace.is_empty() {
            argv.extend([
                "--namespace".into(),
                spec.namespace.clone(),
                "--netns-dir".into(),
                self.layout().netns_dir.to_string_lossy().into_owned(),
            ]);
        }
        if let Some(ca) = &self.layout().stream_ca_file {
            argv.extend(["--ca-file".into(), ca.to_string_lossy().into_owned()]);
        }
        // The stream starts here, now (the last 8 KiB, then everything
        // after), not whenever zinit gets the worker running: what the VM
        // prints in between is sent too. The worker resumes from this.
        let progress = self.stream_progress_path(&spec.id);
        if !progress.exists() {
            if let Some(end) = log_end(&self.layout().log(name)) {
                let start = Progress {
                    pos: end.pos.saturating_sub(STREAM_TAIL).max(end.base),
                    ..Default::default()
                };
                start.save(&progress).map_err(|e| err(&e))?;
            }
        }
        let exec = zinit::Command::new(argv).map_err(|e| err(&e))?;
        let svc = service(&spec.id);
        self.services()
            .install(&svc, &zinit::Service::new(exec))
            .map_err(|e| err(&e))?;
        self.zinit()
            .monitor(&svc)
            .await
            .map_err(|e| MethodError::new(format!("cannot start stream {}: {e}", spec.id)))
    }

    /// Stops and removes a stream; an unknown one is already removed.
    pub async fn remove_stream(&self, id: &str) -> Result<(), MethodError> {
        if valid_id(id).is_err() {
            return Ok(());
        }
        let svc = service(id);
        self.zinit()
            .remove(&svc, Duration::from_secs(10))
            .await
            .map_err(|e| MethodError::new(format!("cannot stop stream {id}: {e}")))?;
        self.services()
            .remove(&svc)
            .map_err(|e| MethodError::new(e.to_string()))?;
        for p in [self.stream_progress_path(id), self.stream_spec_path(id)] {
            let _ = fs::remove_file(p);
        }
        Ok(())
    }

    /// Every stream of VM `vm`.
    pub async fn remove_streams_of(&self, vm: &str) -> Result<(), MethodError> {
        for s in self.stream_specs().into_iter().filter(|s| s.vm == vm) {
            self.remove_stream(&s.id).await?;
        }
        Ok(())
    }

    pub fn stream_statuses(&self, vm: &str) -> Vec<StreamStatus> {
        self.stream_specs()
            .into_iter()
            .filter(|s| s.vm == vm)
            .map(|s| {
                let p = Progress::load(&self.stream_progress_path(&s.id)).unwrap_or_default();
                StreamStatus {
                    id: s.id,
                    output: s.output,
                    connected: p.connected,
                    sent_bytes: p.sent_bytes,
                    dropped_bytes: p.dropped_bytes,
                    unheard_bytes: p.unheard_bytes,
                }
            })
            .collect()
    }

    /// Start-up: streams whose VM or service is gone, services without a stream.
    /// Start-up reconciliation of streams; `monitored` is zinit's listing.
    pub async fn reconcile_streams(
        &self,
        locks: &Arc<KeyedLocks>,
        monitored: Option<&std::collections::BTreeMap<String, zinit::State>>,
    ) -> Vec<String> {
        let mut removed = Vec::new();
        for s in self.stream_specs() {
            // A StreamCreate of the same id may be running: hold its key.
            let _key = locks.lock(format!("stream:{}", s.id)).await;
            if !self.stream_spec_path(&s.id).exists() {
                continue;
            }
            let vm_there = VmName::new(&s.vm).is_ok_and(|n| self.present(&n));
            let svc = service(&s.id);
            let svc_there = self.services().exists(&svc);
            if !vm_there || !svc_there {
                removed.push(format!("stream:{}", s.id));
                if let Err(e) = self.remove_stream(&s.id).await {
                    tracing::error!(stream = %s.id, error = %e, "cannot remove a stream whose VM is gone");
                }
            } else if monitored.is_some_and(|m| !m.contains_key(svc.as_str())) {
                if let Err(e) = self.zinit().monitor(&svc).await {
                    tracing::error!(stream = %s.id, error = %e, "cannot monitor the stream's worker again");
                }
            }
        }
        let services = self.known_services(monitored);
        for s in services {
            let Some(id) = s.strip_prefix("stream:") else {
                continue;
            };
            if valid_id(id).is_ok() && self.stream_spec_path(id).exists() {
                continue;
            }
            let _key = locks.lock(s.clone()).await;
            if valid_id(id).is_ok() && self.stream_spec_path(id).exists() {
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
