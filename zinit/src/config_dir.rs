//! zinit's config dir: service files installed and removed atomically.
//!
//! A service file is written to a temp file in the same directory, fsynced,
//! renamed over `<name>.yaml` and the directory fsynced, so zinit (or a vmd
//! restarted after a crash) sees either the old file, the new one or none —
//! never half a file. Files are 0600: they may carry secrets in `env`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::name::ServiceName;
use crate::service::{Service, ServiceError};

#[derive(Debug, thiserror::Error)]
pub enum ConfigDirError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("service file {path}: {source}")]
    Service {
        path: PathBuf,
        #[source]
        source: ServiceError,
    },
}

const TMP_MARK: &str = ".tmp-";

#[derive(Debug, Clone)]
pub struct ConfigDir {
    path: PathBuf,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ConfigDirError + 'a {
    move |source| ConfigDirError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl ConfigDir {
    /// The directory, created (0755, as /etc/zinit is) if missing.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, ConfigDirError> {
        let path = path.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&path)
            .map_err(io_err("create", &path))?;
        Ok(ConfigDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self, name: &ServiceName) -> PathBuf {
        self.path.join(name.file_name())
    }

    /// Writes `<name>.yaml` atomically (replacing an existing one).
    pub fn install(&self, name: &ServiceName, service: &Service) -> Result<(), ConfigDirError> {
        let target = self.file(name);
        let yaml = service
            .to_yaml()
            .map_err(|source| ConfigDirError::Service {
                path: target.clone(),
                source,
            })?;
        // Hidden and not ending in .yaml: zinit's directory scan skips it.
        let tmp = self.path.join(format!(
            ".{}{TMP_MARK}{}",
            name.file_name(),
            std::process::id()
        ));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(yaml.as_bytes())?;
            f.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("write", &tmp)(e));
        }
        if let Err(e) = fs::rename(&tmp, &target) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename", &target)(e));
        }
        self.sync()
    }

    /// Removes `<name>.yaml`; removing a missing file succeeds.
    pub fn remove(&self, name: &ServiceName) -> Result<(), ConfigDirError> {
        let path = self.file(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    pub fn exists(&self, name: &ServiceName) -> bool {
        self.file(name).is_file()
    }

    pub fn read(&self, name: &ServiceName) -> Result<Service, ConfigDirError> {
        let path = self.file(name);
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        Service::from_yaml(&text).map_err(|source| ConfigDirError::Service { path, source })
    }

    /// Names of the service files present whose stem is a valid name.
    pub fn list(&self) -> Result<Vec<ServiceName>, ConfigDirError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.path).map_err(io_err("list", &self.path))? {
            let entry = entry.map_err(io_err("list", &self.path))?;
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".yaml")) else {
                continue;
            };
            if let Ok(n) = ServiceName::new(stem) {
                out.push(n);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes temp files a crash left behind; returns how many.
    pub fn sweep_temp_files(&self) -> Result<usize, ConfigDirError> {
        let mut n = 0;
        for entry in fs::read_dir(&self.path).map_err(io_err("list", &self.path))? {
            let entry = entry.map_err(io_err("list", &self.path))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(TMP_MARK) {
                let p = entry.path();
                fs::remove_file(&p).map_err(io_err("remove", &p))?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn sync(&self) -> Result<(), ConfigDirError> {
        File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Command;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn install_read_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path().join("zinit")).unwrap();
        let name: ServiceName = "vm:web".parse().unwrap();
        let mut svc = Service::new(Command::new(["/bin/sleep", "1"]).unwrap());
        dir.install(&name, &svc).unwrap();
        let path = dir.file(&name);
        assert_eq!(path.file_name().unwrap(), "vm:web.yaml");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(dir.read(&name).unwrap(), svc);
        svc.oneshot = true;
        dir.install(&name, &svc).unwrap();
        assert_eq!(dir.read(&name).unwrap(), svc);
        assert_eq!(dir.list().unwrap(), vec![name.clone()]);
        // Only the service file is left: no temp files.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        dir.remove(&name).unwrap();
        dir.remove(&name).unwrap();
        assert!(dir.list().unwrap().is_empty());
    }

    #[test]
    fn invalid_service_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        let mut svc = Service::new(Command::new(["/bin/true"]).unwrap());
        svc.env.insert("BAD=NAME".into(), "x".into());
        assert!(dir.install(&"s".parse().unwrap(), &svc).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn crash_leftovers_are_swept_and_never_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ConfigDir::open(tmp.path()).unwrap();
        fs::write(tmp.path().join(".vm:a.yaml.tmp-123"), "exec: half").unwrap();
        fs::write(tmp.path().join("not a name.yaml"), "exec: x").unwrap();
        assert!(dir.list().unwrap().is_empty());
        assert_eq!(dir.sweep_temp_files().unwrap(), 1);
        assert_eq!(dir.sweep_temp_files().unwrap(), 0);
    }
}
