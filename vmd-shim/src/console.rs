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

pub fn meta_path(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".meta");
    PathBuf::from(p)
}

/// Reads the sidecar of `log`, if it describes the file with inode `ino`.
pub fn read_meta(log: &Path, ino: u64) -> Option<LogMeta> {
    let text = fs::read_to_string(meta_path(log)).ok()?;
    let m: LogMeta = serde_json::from_str(&text).ok()?;
    (m.ino == ino).then_some(m)
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
}

fn write_meta(log: &Path, meta: LogMeta) -> io::Result<()> {
    let path = meta_path(log);
    let tmp = path.with_extension("meta.tmp");
    fs::write(&tmp, serde_json::to_vec(&meta).unwrap_or_default())?;
    fs::rename(&tmp, &path)
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
                .mode(0o750)
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
                write_meta(path, m)?;
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
        };
        if log.size > rotate_bytes {
            log.rotate()?;
        }
        Ok(log)
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
        let tmp = self.path.with_extension("rotating");
        let mut dst = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        src.seek(SeekFrom::Start(from))?;
        // copy_file_range underneath: no buffer of `keep` bytes in memory.
        let kept = io::copy(&mut src, &mut dst)?;
        let meta = LogMeta {
            base: self.base + from,
            ino: dst.metadata()?.ino(),
        };
        write_meta(&self.path, meta)?;
        fs::rename(&tmp, &self.path)?;
        self.file = open_append(&self.path)?;
        self.base = meta.base;
        self.size = kept;
        Ok(())
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
        let meta = read_meta(&path, ino).unwrap();
        assert_eq!(meta.base as usize + text.len(), all.len());
        assert_eq!(&all[meta.base as usize..], &text[..]);
        assert_eq!(log.end(), all.len() as u64);
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
    fn an_oversized_log_is_rotated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm");
        fs::write(&path, "x\n".repeat(10_000)).unwrap();
        let log = ConsoleLog::open(&path, 1_000, 500).unwrap();
        assert!(log.size() <= 500);
        assert_eq!(fs::read(&path).unwrap().len() as u64, log.size());
    }
}
