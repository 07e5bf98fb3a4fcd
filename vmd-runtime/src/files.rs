//! Durable state files: written whole, synced, renamed into place.
//!
//! Every file another process (or a later life of this one) reads goes
//! through [`write_atomic`]: a reader sees the old content or the new, never
//! half of it, and after a power loss the new content is on disk if the
//! rename is. ([`replace`] is the same without the syncs, for the two files
//! rewritten too often to sync.)

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Writes `data` to `path` whole with permissions `mode` (temp file in the
/// same directory, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_whole(path, data, mode, true, None, None)
}

/// [`write_atomic`], the file owned by `uid`, if given, from the moment it
/// appears (a file another, unprivileged process must read at `mode` 0600).
pub fn write_atomic_as(path: &Path, data: &[u8], mode: u32, uid: Option<u32>) -> io::Result<()> {
    write_whole(path, data, mode, true, uid, None)
}

/// Replaces `path` with `data` atomically for readers, without waiting for
/// the disk: for files rewritten so often that syncing them costs more than
/// what a power loss would take — the console log's sidecar (rewritten at
/// every rotation, beside a log nobody syncs either: syncing it there cost a
/// third of the console throughput) and the tap counters `Metrics` keeps.
pub fn replace(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    write_whole(path, data, mode, false, None, None)
}

/// [`replace`], the new file in group `gid` before it appears.
pub fn replace_in_group(path: &Path, data: &[u8], mode: u32, gid: Option<u32>) -> io::Result<()> {
    write_whole(path, data, mode, false, None, gid)
}

fn write_whole(
    path: &Path,
    data: &[u8],
    mode: u32,
    durable: bool,
    uid: Option<u32>,
    gid: Option<u32>,
) -> io::Result<()> {
    let tmp = temp_path(path);
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(&f, uid, gid)?;
    }
    f.write_all(data)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    fs::rename(&tmp, path)?;
    if let (true, Some(dir)) = (durable, path.parent()) {
        // The rename itself is durable only once the directory is synced.
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// `path` with `.tmp` appended to its whole name (`state.json.tmp`), so two
/// files that differ only by extension never share a temp file.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".tmp");
    PathBuf::from(p)
}

/// Writes `value` as pretty JSON with [`write_atomic`].
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T, mode: u32) -> io::Result<()> {
    let data = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    write_atomic(path, &data, mode)
}

/// Reads a JSON file; `None` when it is missing or not a `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Removes a file; one that is not there is removed already.
pub fn remove_file(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes a state file written with [`write_atomic`], and the temp file a
/// writer killed mid-write leaves beside it. Only once no writer is left.
pub fn remove_state(path: &Path) -> io::Result<()> {
    remove_file(&temp_path(path))?;
    remove_file(path)
}

/// Removes a directory tree; one that is not there is removed already.
pub fn remove_dir_all(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Creates `dir` and its parents with `mode` (the mode applies to what is
/// created; an existing directory is left as it is).
pub fn create_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(mode).create(dir)
}

/// An empty mark file (`deleted`, `locked`, `present/<name>`), durable.
pub fn write_mark(path: &Path) -> io::Result<()> {
    write_atomic(path, b"", 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_whole_with_the_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "a temp file was left behind");
        remove_file(&p).unwrap();
        remove_file(&p).unwrap();
        // A writer killed between its temp file and the rename.
        std::fs::write(temp_path(&p), b"half").unwrap();
        std::fs::write(&p, b"whole").unwrap();
        remove_state(&p).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
