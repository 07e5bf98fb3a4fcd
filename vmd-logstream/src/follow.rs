//! Following a console log that the shim rotates, in absolute offsets.
//!
//! Byte `n` of the VM's console is at offset `n - base` of the log file whose
//! inode the sidecar `<log>.meta` names. A follower keeps its position as an
//! absolute offset; after a rotation it finds the same byte in the new file,
//! so nothing is sent twice. If it fell so far behind that its position was
//! rotated away, it skips to the oldest byte kept and counts the gap.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use vmd_runtime::console::file_base;

pub struct Follower {
    path: PathBuf,
    file: File,
    ino: u64,
    base: u64,
    /// Absolute offset of the next byte to read.
    pos: u64,
    /// Bytes rotated away before they were read.
    pub dropped: u64,
}

/// Where to start.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// The last `n` bytes of what the log holds.
    Tail(u64),
    /// An absolute offset (a previous run of the worker).
    At(u64),
}

fn open(path: &Path) -> io::Result<(File, u64, u64)> {
    let file = File::open(path)?;
    let ino = file.metadata()?.ino();
    let base = file_base(path, ino)
        .ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "sidecar not yet updated"))?;
    Ok((file, ino, base))
}

impl Follower {
    pub fn open(path: &Path, start: Start) -> io::Result<Self> {
        let (file, ino, base) = open(path)?;
        let end = base + file.metadata()?.len();
        let (pos, dropped) = match start {
            Start::Tail(n) => (end.saturating_sub(n).max(base), 0),
            Start::At(p) if p < base => (base, base - p),
            Start::At(p) => (p.min(end), 0),
        };
        Ok(Follower {
            path: path.to_owned(),
            file,
            ino,
            base,
            pos,
            dropped,
        })
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Reads what is new into `buf`; 0 when nothing is, for now.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos - self.base)?;
        if n > 0 {
            self.pos += n as u64;
            return Ok(n);
        }
        // At the end of this file: has the log been rotated?
        let ino = match std::fs::metadata(&self.path) {
            Ok(m) => m.ino(),
            Err(_) => return Ok(0),
        };
        if ino == self.ino {
            return Ok(0);
        }
        match open(&self.path) {
            Ok((file, ino, base)) => {
                if self.pos < base {
                    self.dropped += base - self.pos;
                    self.pos = base;
                }
                self.file = file;
                self.ino = ino;
                self.base = base;
                Ok(0)
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::NotFound =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmd_runtime::console::ConsoleLog;

    fn drain(f: &mut Follower) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                // One more try: a rotation shows up as an empty read first.
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    return out;
                }
                out.extend_from_slice(&buf[..n]);
                continue;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn follows_across_rotations_without_loss_or_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm");
        let mut log = ConsoleLog::open(&path, 5_000, 2_000).unwrap();
        log.write(b"early\n").unwrap();
        let mut f = Follower::open(&path, Start::Tail(1 << 20)).unwrap();
        let mut all = b"early\n".to_vec();
        let mut got = Vec::new();
        for i in 0..3_000 {
            let line = format!("line {i}\n");
            all.extend_from_slice(line.as_bytes());
            log.write(line.as_bytes()).unwrap();
            if i % 50 == 0 {
                got.extend(drain(&mut f));
            }
        }
        got.extend(drain(&mut f));
        assert_eq!(f.dropped, 0);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(all).unwrap()
        );
    }

    #[test]
    fn a_follower_left_behind_counts_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm");
        let mut log = ConsoleLog::open(&path, 5_000, 2_000).unwrap();
        let mut f = Follower::open(&path, Start::Tail(0)).unwrap();
        let mut all = Vec::new();
        for i in 0..2_000 {
            let line = format!("line {i}\n");
            all.extend_from_slice(line.as_bytes());
            log.write(line.as_bytes()).unwrap();
        }
        let got = drain(&mut f);
        assert!(f.dropped > 0);
        assert_eq!(f.dropped as usize + got.len(), all.len());
        // What it still had open it delivers; then one counted hole; then
        // everything from the oldest byte kept.
        let a = got.iter().zip(&all).take_while(|(x, y)| x == y).count();
        assert_eq!(&got[a..], &all[a + f.dropped as usize..]);
    }

    #[test]
    fn resumes_at_an_absolute_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm");
        let mut log = ConsoleLog::open(&path, 1 << 20, 1 << 10).unwrap();
        log.write(b"0123456789").unwrap();
        let mut f = Follower::open(&path, Start::At(4)).unwrap();
        assert_eq!(drain(&mut f), b"456789");
        let mut f = Follower::open(&path, Start::Tail(3)).unwrap();
        assert_eq!(drain(&mut f), b"789");
    }
}
