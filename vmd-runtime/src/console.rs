//! The console log of one VM: appended by the shim, rotated in place.
//!
//! Rotation keeps the last `keep` bytes (cut at a line start) by copying them
//! to a new file and renaming it over the log — never truncating a file in
//! use, so no reader ever sees NUL-filled holes and the tail survives.
//!
//! Readers that follow the log (log-stream workers) need to know where the
//! new file starts in the stream of everything the VM ever printed, or they
//! would resend the kept tail. `<log>.meta` says it: `{"base":B,"ino":I}`,
//! the absolute offset of byte 0 of the file whose inode is `I`. It is
//! written *before* the rename, for the inode of the file about to become the
//! log; a reader whose open file has another inode simply retries.
//! [`file_base`] is that rule, the one reader of the sidecar.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the current log file starts in the VM's whole console stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMeta {
    pub base: u64,
    pub ino: u64,
}

/// `log` with `suffix` appended to its whole name (VM names hold dots:
/// `with_extension` would make `a.x` and `a.y` share files).
fn beside(log: &Path, suffix: &str) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

pub fn meta_path(log: &Path) -> PathBuf {
    beside(log, ".meta")
}

/// The copy of the kept tail during a rotation.
fn rotating_path(log: &Path) -> PathBuf {
    beside(log, ".rotating")
}

/// Reads the sidecar of `log`, if it describes the file with inode `ino`.
fn read_meta(log: &Path, ino: u64) -> Option<LogMeta> {
    crate::files::read_json::<LogMeta>(&meta_path(log)).filter(|m| m.ino == ino)
}

/// Where the log file with inode `ino` starts in the VM's whole console
/// stream. A log without a sidecar was never rotated: it starts at 0. A
/// sidecar naming another inode means a rotation is in progress (the sidecar
/// is written before the rename): `None`, read again in a moment.
pub fn file_base(log: &Path, ino: u64) -> Option<u64> {
    match read_meta(log, ino) {
        Some(m) => Some(m.base),
        None if !meta_path(log).exists() => Some(0),
        None => None,
    }
}

/// The absolute offsets of the first and past the last byte the log holds
/// now; `(0, 0)` for a log not yet written, `None` while it is being rotated.
pub fn extent(log: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let md = match fs::metadata(log) {
        Ok(md) => md,
        Err(_) => return Some((0, 0)),
    };
    let base = file_base(log, md.ino())?;
    Some((base, base + md.len()))
}

/// Removes a console log, its sidecar, and what a shim killed during a
/// rotation left (a new VM starts a new log; a deleted one leaves nothing).
/// Only once no shim writes it.
pub fn remove(log: &Path) -> io::Result<()> {
    crate::files::remove_file(&rotating_path(log))?;
    crate::files::remove_file(log)?;
    crate::files::remove_state(&meta_path(log))
}

pub struct ConsoleLog {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    size: u64,
    /// Absolute offset of the current file's first byte.
    base: u64,
    rotate_bytes: u64,
    keep_bytes: u64,
    /// The group its files are in: the VM's log group, whose stream
    /// workers read it (`None`: root's).
    group: Option<u32>,
}

fn write_meta(log: &Path, meta: LogMeta, group: Option<u32>) -> io::Result<()> {
    let data = serde_json::to_vec(&meta).map_err(io::Error::other)?;
    crate::files::replace_in_group(&meta_path(log), &data, 0o640, group)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl ConsoleLog {
    /// Opens (or creates) the log for appending; an existing log is kept,
    /// so the console of earlier runs of the VM stays readable.
    pub fn open(path: &Path, rotate_bytes: u64, keep_bytes: u64) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                // Searchable, not listable (see vmd's logs directory).
                .mode(0o711)
                .create(dir)?;
        }
        let file = open_append(path)?;
        let md = file.metadata()?;
        let base = match read_meta(path, md.ino()) {
            Some(m) => m.base,
            None => {
                let m = LogMeta {
                    base: 0,
                    ino: md.ino(),
                };
                write_meta(path, m, None)?;
                0
            }
        };
        let mut log = ConsoleLog {
            path: path.to_path_buf(),
            file,
            size: md.len(),
            base,
            rotate_bytes,
            keep_bytes,
            group: None,
        };
        if log.size > rotate_bytes {
            log.rotate()?;
        }
        Ok(log)
    }

    /// Takes in what another writer appended to the file since it was
    /// opened (writes are `O_APPEND`: they always land after it), rotating
    /// if that makes it too long.
    pub fn resync(&mut self) -> io::Result<()> {
        self.size = self.file.metadata()?.len();
        if self.size > self.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    /// Absolute offset just past the last byte written.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        if self.size > self.rotate_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut src = File::open(&self.path)?;
        let len = src.metadata()?.len();
        // Start the kept tail at a line start, so it reads cleanly.
        let mut from = len.saturating_sub(self.keep_bytes);
        if from > 0 {
            src.seek(SeekFrom::Start(from))?;
            let mut probe = [0u8; 4096];
            let n = src.read(&mut probe)?;
            if let Some(nl) = probe[..n].iter().position(|&b| b == b'\n') {
                from += nl as u64 + 1;
            }
        }
        let tmp = rotating_path(&self.path);
        let mut dst = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        if let Some(g) = self.group {
            std::os::unix::fs::fchown(&dst, None, Some(g))?;
        }
        src.seek(SeekFrom::Start(from))?;
        // copy_file_range underneath: no buffer of `keep` bytes in memory.
        let kept = io::copy(&mut src, &mut dst)?;
        let meta = LogMeta {
            base: self.base + from,
            ino: dst.metadata()?.ino(),
        };
        write_meta(&self.path, meta, self.group)?;
        fs::rename(&tmp, &self.path)?;
        self.file = open_append(&self.path)?;
        self.base = meta.base;
        self.size = kept;
        Ok(())
    }

    /// Puts the log and its sidecar in group `gid`, and every file a
    /// rotation makes from now on.
    pub fn set_group(&mut self, gid: u32) -> io::Result<()> {
        std::os::unix::fs::fchown(&self.file, None, Some(gid))?;
        std::os::unix::fs::chown(meta_path(&self.path), None, Some(gid))?;
        self.group = Some(gid);
        Ok(())
    }

    /// Absolute offset of the oldest byte the log still holds.
    pub fn start(&self) -> u64 {
        self.base
    }

    /// The bytes from absolute offset `from` (raised to the oldest byte
    /// kept) to the end: `(where they start, the bytes)`. Read from the
    /// file, so a console's history costs no memory while nobody asks.
    pub fn read_from(&self, from: u64) -> io::Result<(u64, Vec<u8>)> {
        let from = from.clamp(self.base, self.end());
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(from - self.base))?;
        let mut buf = Vec::with_capacity((self.end() - from) as usize);
        f.take(self.end() - from).read_to_end(&mut buf)?;
        Ok((from, buf))
    }

    /// The last `n` bytes of the log (for failure reports), lossily as text.
    pub fn tail(&self, n: u64) -> String {
        tail_of(&self.path, n)
    }
}

/// The last `n` bytes of a file as text, starting at a line start if possible.
pub fn tail_of(path: &Path, n: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(n);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::with_capacity(n.min(len) as usize);
    let _ = f.take(n).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if from > 0 {
        if let Some(nl) = text.find('\n') {
            return text[nl + 1..].to_owned();
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_a_clean_tail_and_counts_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/vm");
        let mut log = ConsoleLog::open(&path, 10_000, 4_000).unwrap();
        let mut all = Vec::new();
        for i in 0..2_000 {
            let line = format!("line {i:05}\n");
            all.extend_from_slice(line.as_bytes());
            log.write(line.as_bytes()).unwrap();
            assert!(log.size() <= 10_000 + 11);
        }
        let text = fs::read(&path).unwrap();
        assert!(!text.contains(&0), "NUL bytes in the log");
        assert!(text.len() <= 10_011);
        assert!(text.starts_with(b"line "), "tail does not start at a line");
        assert!(
            all.ends_with(&text),
            "the log is not the tail of what was written"
        );
        // The sidecar places the file exactly in the whole stream.
        let ino = fs::metadata(&path).unwrap().ino();
        let base = file_base(&path, ino).unwrap();
        assert_eq!(base as usize + text.len(), all.len());
        assert_eq!(&all[base as usize..], &text[..]);
        assert_eq!(extent(&path), Some((base, all.len() as u64)));
        assert_eq!(file_base(&path, ino + 1), None, "another inode: rotating");
        assert_eq!(log.end(), all.len() as u64);
        assert_eq!(log.start(), base);
        // Ranges are absolute; what rotated away is not invented.
        let (at, bytes) = log.read_from(all.len() as u64 - 11).unwrap();
        assert_eq!(
            (at, &bytes[..]),
            (all.len() as u64 - 11, &b"line 01999\n"[..])
        );
        let (at, bytes) = log.read_from(0).unwrap();
        assert_eq!((at, bytes.len()), (base, text.len()));
        assert_eq!(log.read_from(u64::MAX).unwrap().1, b"");
        // Reopening appends and keeps the offsets.
        drop(log);
        let mut log = ConsoleLog::open(&path, 10_000, 4_000).unwrap();
        assert_eq!(log.end(), all.len() as u64);
        log.write(b"after reopen\n").unwrap();
        assert!(fs::read_to_string(&path)
            .unwrap()
            .ends_with("line 01999\nafter reopen\n"));
        assert_eq!(tail_of(&path, 24), "after reopen\n");
    }

    #[test]
    fn logs_of_names_with_dots_share_no_file() {
        // `with_extension` would give both `a.rotating`, `a.meta`.
        let (x, y) = (Path::new("/l/a.x"), Path::new("/l/a.y"));
        assert_ne!(rotating_path(x), rotating_path(y));
        assert_ne!(meta_path(x), meta_path(y));
        assert_eq!(rotating_path(x), Path::new("/l/a.x.rotating"));
    }

    #[test]
    fn an_oversized_log_is_rotated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm");
        fs::write(&path, "x\n".repeat(10_000)).unwrap();
        let log = ConsoleLog::open(&path, 1_000, 500).unwrap();
        assert!(log.size() <= 500);
        assert_eq!(fs::read(&path).unwrap().len() as u64, log.size());
    }
}
