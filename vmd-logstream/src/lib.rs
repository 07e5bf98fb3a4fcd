//! vmd-logstream: one worker per log stream, shipping a VM's console log to
//! a receiver.
//!
//! * [`follow`] — following the rotated console log in absolute offsets;
//! * [`sink`] — Redis PUBLISH, WebSocket binary messages, stdout;
//! * [`loki`] — Grafana Loki's push API, one entry per line;
//! * [`Gzip`] — one gzip member per chunk;
//! * [`user`] — dropping root once the worker has what needs it.
//!
//! The outputs it accepts and the progress file it keeps are part of the
//! contract with vmd: `vmd_runtime::{output, progress}`.

pub mod follow;
pub mod loki;
pub mod sink;
pub mod user;

/// gzip, one complete member per chunk (what receivers gunzip one by one).
///
/// One deflate state (a few hundred KiB) is kept and reset for every chunk:
/// allocating it per chunk costs CPU and leaves malloc holding the peak.
pub struct Gzip {
    deflate: flate2::Compress,
    scratch: Vec<u8>,
}

impl Default for Gzip {
    fn default() -> Self {
        Gzip {
            deflate: flate2::Compress::new(flate2::Compression::fast(), false),
            scratch: Vec::new(),
        }
    }
}

impl Gzip {
    /// The member, in a buffer of exactly its size (chunks wait in a queue:
    /// spare capacity there would be most of the worker's memory).
    pub fn member(&mut self, chunk: &[u8]) -> Vec<u8> {
        // RFC 1952: header (no name, no time, OS unknown), raw deflate, CRC32, size.
        let mut out = std::mem::take(&mut self.scratch);
        out.clear();
        out.reserve(chunk.len() / 2 + 64);
        out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
        self.deflate.reset();
        let mut input = chunk;
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let before_in = self.deflate.total_in();
            let status = self
                .deflate
                .compress_vec(input, &mut out, flate2::FlushCompress::Finish)
                .unwrap_or(flate2::Status::StreamEnd);
            let used = (self.deflate.total_in() - before_in) as usize;
            input = &input[used..];
            if status == flate2::Status::StreamEnd {
                break;
            }
        }
        let mut crc = flate2::Crc::new();
        crc.update(chunk);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        let member = out.clone();
        self.scratch = out;
        member
    }
}

/// One gzip member for `chunk` (a fresh compressor; see [`Gzip`] for many).
pub fn gzip(chunk: &[u8]) -> Vec<u8> {
    Gzip::default().member(chunk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn members_gunzip_one_by_one() {
        let mut g = Gzip::default();
        for data in [
            &b""[..],
            b"hello\n",
            &vec![b'x'; 100_000],
            &(0..=255u8).cycle().take(70_000).collect::<Vec<_>>(),
        ] {
            let member = g.member(data);
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(&member[..])
                .read_to_end(&mut back)
                .unwrap();
            assert_eq!(back, data);
        }
    }
}
