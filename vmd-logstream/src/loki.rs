//! Grafana Loki's push API (`POST /loki/api/v1/push`, JSON, one entry per
//! console line), with the guarantees of the other outputs.
//!
//! * [`Framer`] cuts the console into chunks that end on a line (a line
//!   without its newline goes out after [`LINE_WAIT`]: a login prompt has
//!   none) and encodes each as JSON entries, timestamped when read.
//! * No repeats across a worker's restart: before a push, where it starts
//!   and the chunks in it (their end offsets and first timestamps) are
//!   written to the stream's in-flight file. A restarted worker cuts the same bytes at the same
//!   offsets with the same timestamps, so a push it repeats is identical,
//!   entry for entry, and Loki keeps one copy of an entry whose stream,
//!   timestamp and line it already has (its head block and its queriers
//!   de-duplicate exactly that).
//! * [`LokiSink`] keeps one HTTP/1.1 connection alive (TLS for https),
//!   sends basic auth from the URL and the tenant as `X-Scope-OrgID`.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use vmd_runtime::output::Loki;

/// A line without a newline waits this long for the rest of it.
pub const LINE_WAIT: Duration = Duration::from_millis(500);

/// Longer lines go as several entries (Loki's default `max_line_size` is
/// 256 KB; a console line that long is binary noise anyway).
pub const MAX_LINE: usize = 16 << 10;

/// Where a chunk ends and the timestamp of its first entry: what a
/// restarted worker needs to cut and stamp the same chunk again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    pub end: u64,
    pub ts: u64,
}

/// A chunk ready to push.
#[derive(Debug, Clone)]
pub struct Framed {
    pub cut: Cut,
    /// Console bytes in it.
    pub raw: usize,
    /// Its entries, each an `EntryAdapter` as a `StreamAdapter` field
    /// (protobuf), back to back (empty if the chunk held only empty lines).
    pub entries: Vec<u8>,
}

/// Cuts the console into chunks of whole lines.
pub struct Framer {
    partial: Vec<u8>,
    /// Absolute offset of `partial[0]`.
    start: u64,
    /// When `partial` last grew (a line left unfinished that long goes).
    grew: Instant,
    last_ts: u64,
    /// Cuts of a previous run, to be made again.
    replay: VecDeque<Cut>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Framer {
    /// Starting at absolute offset `at`, first making again the `replay`
    /// cuts that lie after it.
    pub fn new(at: u64, replay: Vec<Cut>) -> Framer {
        let last_ts = replay.iter().map(|c| c.ts).max().unwrap_or(0);
        Framer {
            partial: Vec::new(),
            start: at,
            grew: Instant::now(),
            last_ts,
            replay: replay.into_iter().filter(|c| c.end > at).collect(),
        }
    }

    /// Takes `bytes`, read at absolute offset `at`; returns the chunks
    /// complete now.
    pub fn push(&mut self, at: u64, bytes: &[u8], out: &mut Vec<Framed>) {
        if at != self.start + self.partial.len() as u64 {
            // A hole (the log rotated past unread bytes): what came
            // before it goes on its own, and cuts of a previous run no
            // longer match the bytes.
            self.flush(out);
            self.replay.clear();
            self.start = at;
        }
        if !bytes.is_empty() {
            self.partial.extend_from_slice(bytes);
            self.grew = Instant::now();
        }
        loop {
            let have = self.start + self.partial.len() as u64;
            if let Some(c) = self.replay.front().copied() {
                if c.end > have {
                    return; // the rest of a repeated chunk is still to be read
                }
                self.replay.pop_front();
                let n = (c.end - self.start) as usize;
                self.cut(n, Some(c.ts), out);
                continue;
            }
            match self.partial.iter().rposition(|&b| b == b'\n') {
                Some(i) => self.cut(i + 1, None, out),
                None if self.partial.len() >= MAX_LINE => self.cut(self.partial.len(), None, out),
                None => {}
            }
            return;
        }
    }

    /// Cuts what is left if it waited [`LINE_WAIT`] for its newline.
    pub fn flush_idle(&mut self, out: &mut Vec<Framed>) {
        if self.replay.is_empty() && !self.partial.is_empty() && self.grew.elapsed() >= LINE_WAIT {
            self.flush(out);
        }
    }

    fn flush(&mut self, out: &mut Vec<Framed>) {
        if !self.partial.is_empty() {
            self.cut(self.partial.len(), None, out);
        }
    }

    fn cut(&mut self, n: usize, ts: Option<u64>, out: &mut Vec<Framed>) {
        let ts = ts.unwrap_or_else(|| now_ns().max(self.last_ts + 1));
        let (entries, count) = encode(&self.partial[..n], ts);
        self.last_ts = self.last_ts.max(ts + count.saturating_sub(1) as u64);
        self.start += n as u64;
        self.partial.drain(..n);
        out.push(Framed {
            cut: Cut {
                end: self.start,
                ts,
            },
            raw: n,
            entries,
        });
    }
}

/// The entries of `bytes`: one per line, without its newline or a
/// carriage return before it; empty lines left out; invalid UTF-8
/// replaced (a protobuf string is text); lines over [`MAX_LINE`] in
/// pieces. The `k`-th entry is stamped `ts + k` nanoseconds.
///
/// Each entry is encoded as field 2 (`entries`) of Loki's `StreamAdapter`
/// (`pkg/push/push.proto`): repeated fields concatenate, so the chunks of a
/// push are joined as they are.
fn encode(bytes: &[u8], ts: u64) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 4);
    let mut count = 0;
    // Checked once for the chunk (a console is nearly always valid
    // UTF-8); line by line only when it is not.
    let whole = std::str::from_utf8(bytes).ok();
    let mut from = 0;
    while from < bytes.len() {
        let end = memchr::memchr(b'\n', &bytes[from..]).map_or(bytes.len(), |i| from + i);
        let mut to = end;
        if to > from && bytes[to - 1] == b'\r' {
            to -= 1;
        }
        let text = match whole {
            // Cut at ASCII bytes: on character boundaries.
            Some(s) => std::borrow::Cow::Borrowed(&s[from..to]),
            None => String::from_utf8_lossy(&bytes[from..to]),
        };
        from = end + 1;
        let mut rest: &str = &text;
        while !rest.is_empty() {
            let mut at = rest.len().min(MAX_LINE);
            while !rest.is_char_boundary(at) {
                at -= 1;
            }
            let (piece, tail) = rest.split_at(at);
            entry(&mut out, ts + count as u64, piece);
            count += 1;
            rest = tail;
        }
    }
    (out, count)
}

/// `EntryAdapter { timestamp: google.protobuf.Timestamp { seconds, nanos }, line }`
/// as field 2 of a `StreamAdapter`, written with prost's wire helpers
/// (no message is built: a console carries millions of lines).
fn entry(out: &mut Vec<u8>, ts_ns: u64, line: &str) {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let (seconds, nanos) = (ts_ns / 1_000_000_000, ts_ns % 1_000_000_000);
    // proto3 leaves zero values out.
    let ts_len = if seconds > 0 {
        1 + encoded_len_varint(seconds)
    } else {
        0
    } + if nanos > 0 {
        1 + encoded_len_varint(nanos)
    } else {
        0
    };
    let line_len = line.len() as u64;
    let entry_len = 1
        + encoded_len_varint(ts_len as u64)
        + ts_len
        + 1
        + encoded_len_varint(line_len)
        + line.len();
    // Everything before the line is at most 39 bytes: written on the stack
    // and appended once (appending byte by byte to the Vec cost most of
    // the framing).
    let mut head = [0u8; 40];
    let mut w: &mut [u8] = &mut head;
    encode_key(2, WireType::LengthDelimited, &mut w);
    encode_varint(entry_len as u64, &mut w);
    encode_key(1, WireType::LengthDelimited, &mut w);
    encode_varint(ts_len as u64, &mut w);
    if seconds > 0 {
        encode_key(1, WireType::Varint, &mut w);
        encode_varint(seconds, &mut w);
    }
    if nanos > 0 {
        encode_key(2, WireType::Varint, &mut w);
        encode_varint(nanos, &mut w);
    }
    encode_key(2, WireType::LengthDelimited, &mut w);
    encode_varint(line_len, &mut w);
    let used = 40 - w.len();
    out.extend_from_slice(&head[..used]);
    out.extend_from_slice(line.as_bytes());
}

/// A Prometheus label set of one label, as Loki parses it: `{job="…"}`.
fn labels(job: &str) -> String {
    let mut v = String::with_capacity(job.len() + 8);
    for c in job.chars() {
        match c {
            '\\' => v.push_str("\\\\"),
            '"' => v.push_str("\\\""),
            '\n' => v.push_str("\\n"),
            c => v.push(c),
        }
    }
    format!("{{job=\"{v}\"}}")
}

/// The push body for `chunks`, before snappy: a `PushRequest` of one
/// `StreamAdapter`, labelled `job`.
pub fn body(job: &str, chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    body_into(job, chunks, &mut out);
    out
}

/// [`body`] into `out` (cleared first).
fn body_into(job: &str, chunks: &[&[u8]], out: &mut Vec<u8>) {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    let labels = labels(job);
    let entries: usize = chunks.iter().map(|c| c.len()).sum();
    let stream_len = 1 + encoded_len_varint(labels.len() as u64) + labels.len() + entries;
    out.clear();
    out.reserve(stream_len + 16);
    encode_key(1, WireType::LengthDelimited, out);
    encode_varint(stream_len as u64, out);
    encode_key(1, WireType::LengthDelimited, out);
    encode_varint(labels.len() as u64, out);
    out.extend_from_slice(labels.as_bytes());
    for c in chunks {
        out.extend_from_slice(c);
    }
}

/// The body of a push of `chunks`, snappy-compressed as Loki reads it.
pub fn compressed(job: &str, chunks: &[&[u8]]) -> io::Result<Vec<u8>> {
    Compressor::default().compress(job, chunks)
}

/// Makes push bodies with buffers kept from one push to the next: a
/// fresh body and a zero-filled output of snappy's worst case per push
/// were a fifth of the worker's work per byte (BENCHMARKS.md "logstream").
/// Only the compressed body, a fraction of the console bytes, is a new
/// allocation.
pub struct Compressor {
    encoder: snap::raw::Encoder,
    body: Vec<u8>,
    out: Vec<u8>,
}

impl Default for Compressor {
    fn default() -> Self {
        Compressor {
            encoder: snap::raw::Encoder::new(),
            body: Vec::new(),
            out: Vec::new(),
        }
    }
}

impl Compressor {
    pub fn compress(&mut self, job: &str, chunks: &[&[u8]]) -> io::Result<Vec<u8>> {
        body_into(job, chunks, &mut self.body);
        let most = snap::raw::max_compress_len(self.body.len());
        if most == 0 {
            return Err(io::Error::other("a push body too large for snappy"));
        }
        if self.out.len() < most {
            self.out.resize(most, 0);
        }
        let n = self
            .encoder
            .compress(&self.body, &mut self.out)
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(self.out[..n].to_vec())
    }
}

/// What the in-flight file holds: the push under way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushing {
    /// Where the push starts: everything before it was acknowledged (the
    /// progress file, saved less often, may say less).
    pub start: u64,
    pub cuts: Vec<Cut>,
}

/// The in-flight file: the push under way. Rewritten in place
/// (one `pwrite`, padded over what was there: a kill cannot leave half of
/// one) rather than replaced, so that nobody watching the progress
/// directory is woken once per push.
pub struct InFlight {
    file: File,
    len: usize,
}

impl InFlight {
    pub fn open(path: &Path) -> io::Result<InFlight> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let len = file.metadata()?.len() as usize;
        Ok(InFlight { file, len })
    }

    /// The push a previous run recorded (none if unreadable: then a push
    /// that was under way may be repeated, never lost).
    pub fn load(&self) -> Option<Pushing> {
        let mut buf = vec![0; self.len];
        match self.file.read_at(&mut buf, 0) {
            Ok(n) if n == self.len => serde_json::from_slice(&buf).ok(),
            _ => None,
        }
    }

    pub fn record(&mut self, pushing: &Pushing) -> io::Result<()> {
        let mut data = serde_json::to_vec(pushing).map_err(io::Error::other)?;
        let written = data.len();
        if data.len() < self.len {
            data.resize(self.len, b' ');
        }
        self.file.write_all_at(&data, 0)?;
        self.len = self.len.max(written);
        Ok(())
    }
}

/// What a push came back with, besides success.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] rustls::pki_types::InvalidDnsNameError),
    /// Worth another try later: 429, 5xx, or an answer that says the
    /// receiver is misconfigured (401, 403, 404…), which its owner fixes.
    #[error("the receiver answered {status}: {message}")]
    Refused { status: u16, message: String },
    /// Loki will never take these entries (400, 413: too old, too long, too
    /// many): they are dropped and counted.
    #[error("the receiver rejected the entries ({status}): {message}")]
    Rejected { status: u16, message: String },
}

/// One HTTP/1.1 connection to a Loki push endpoint.
pub struct LokiSink {
    send: SendRequest<Full<Bytes>>,
    loki: Loki,
    authority: String,
    authorization: Option<String>,
}

impl LokiSink {
    pub async fn connect(
        loki: &Loki,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<LokiSink, PushError> {
        let tcp = tokio::net::TcpStream::connect((loki.host.as_str(), loki.port)).await?;
        let _ = tcp.set_nodelay(true);
        let send = match tls.filter(|_| loki.tls) {
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(loki.host.clone())?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await?;
                handshake(TokioIo::new(tls)).await?
            }
            None => handshake(TokioIo::new(tcp)).await?,
        };
        let host = if loki.host.contains(':') {
            format!("[{}]", loki.host)
        } else {
            loki.host.clone()
        };
        let default_port = if loki.tls { 443 } else { 80 };
        let authority = if loki.port == default_port {
            host
        } else {
            format!("{host}:{}", loki.port)
        };
        let authorization = (loki.username.is_some() || loki.password.is_some()).then(|| {
            use base64::Engine;
            let pair = format!(
                "{}:{}",
                loki.username.as_deref().unwrap_or_default(),
                loki.password.as_deref().unwrap_or_default()
            );
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        Ok(LokiSink {
            send,
            loki: loki.clone(),
            authority,
            authorization,
        })
    }

    /// Whether the server closed the connection (an idle keep-alive ends).
    pub fn is_closed(&self) -> bool {
        self.send.is_closed()
    }

    /// Pushes the entries of `chunks` in one request: Loki's own format
    /// (what Promtail and Alloy send), a snappy-compressed protobuf
    /// `PushRequest`. Snappy costs a fraction of gzip's CPU per byte.
    pub async fn push(&mut self, chunks: &[&[u8]]) -> Result<(), PushError> {
        let data = compressed(&self.loki.job, chunks)?;
        self.push_compressed(data).await
    }

    /// Pushes a body made by [`compressed`] (made ahead, while the previous
    /// push was out).
    pub async fn push_compressed(&mut self, data: Vec<u8>) -> Result<(), PushError> {
        let mut req = hyper::Request::post(self.loki.target.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .header(
                hyper::header::USER_AGENT,
                concat!("vmd-logstream/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(a) = &self.authorization {
            req = req.header(hyper::header::AUTHORIZATION, a.as_str());
        }
        if let Some(t) = &self.loki.tenant {
            req = req.header("X-Scope-OrgID", t.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(data)))
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.send.ready().await?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status().as_u16();
        // The answer is read whole (keeps the connection reusable), up to
        // a bound: only its first words are shown.
        let body = http_body_util::Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let message = shown(&body);
        Err(match status {
            400 | 413 | 422 => PushError::Rejected { status, message },
            _ => PushError::Refused { status, message },
        })
    }
}

async fn handshake<T>(io: TokioIo<T>) -> Result<SendRequest<Full<Bytes>>, PushError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// A receiver's answer as it may be logged: one line, printable, short.
fn shown(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    s = s.trim().to_owned();
    if s.is_empty() {
        s = "(no message)".into();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(f: &mut Framer, at: u64, b: &[u8]) -> Vec<Framed> {
        let mut out = Vec::new();
        f.push(at, b, &mut out);
        out
    }

    // Loki's messages (`pkg/push/push.proto`), to read back what was sent.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PushRequest {
        #[prost(message, repeated, tag = "1")]
        streams: Vec<StreamAdapter>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct StreamAdapter {
        #[prost(string, tag = "1")]
        labels: String,
        #[prost(message, repeated, tag = "2")]
        entries: Vec<EntryAdapter>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct EntryAdapter {
        #[prost(message, optional, tag = "1")]
        timestamp: Option<Timestamp>,
        #[prost(string, tag = "2")]
        line: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Timestamp {
        #[prost(int64, tag = "1")]
        seconds: i64,
        #[prost(int32, tag = "2")]
        nanos: i32,
    }

    fn decode(job: &str, chunks: &[Framed]) -> PushRequest {
        use prost::Message;
        let parts: Vec<&[u8]> = chunks.iter().map(|c| c.entries.as_slice()).collect();
        PushRequest::decode(&body(job, &parts)[..]).unwrap()
    }

    fn lines(chunks: &[Framed]) -> Vec<(u64, String)> {
        decode("j", chunks).streams[0]
            .entries
            .iter()
            .map(|e| {
                let t = e.timestamp.clone().unwrap_or_default();
                (
                    t.seconds as u64 * 1_000_000_000 + t.nanos as u64,
                    e.line.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn chunks_end_on_lines_and_entries_are_lines() {
        let mut f = Framer::new(100, Vec::new());
        let a = frame(&mut f, 100, b"one\r\ntwo\n\nthr");
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].cut.end, 110);
        assert_eq!(a[0].raw, 10);
        let b = frame(&mut f, 113, b"ee \"q\" \x1b[0m\xff\n");
        let got = lines(&[a, b].concat());
        let texts: Vec<&str> = got.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(texts, ["one", "two", "three \"q\" \u{1b}[0m\u{fffd}"]);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "{got:?}");
    }

    #[test]
    fn an_unfinished_line_waits_then_goes() {
        let mut f = Framer::new(0, Vec::new());
        assert!(frame(&mut f, 0, b"login: ").is_empty());
        let mut out = Vec::new();
        f.flush_idle(&mut out);
        assert!(out.is_empty(), "went before its wait");
        f.grew -= LINE_WAIT;
        f.flush_idle(&mut out);
        assert_eq!(lines(&out)[0].1, "login: ");
        assert_eq!(out[0].cut.end, 7);
    }

    #[test]
    fn long_lines_go_in_pieces() {
        let mut f = Framer::new(0, Vec::new());
        let long = "é".repeat(MAX_LINE); // two bytes each
        let mut out = Vec::new();
        for piece in long.as_bytes().chunks(8192) {
            let at = f.start + f.partial.len() as u64;
            f.push(at, piece, &mut out);
        }
        let got = lines(&out);
        assert!(got.iter().all(|(_, l)| l.len() <= MAX_LINE));
        let joined: String = got.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(joined, long);
    }

    #[test]
    fn a_restarted_framer_repeats_the_same_entries() {
        let data = b"a\nbb\nccc\ndddd\nlast";
        let mut first = Framer::new(0, Vec::new());
        let mut out = Vec::new();
        first.push(0, &data[..7], &mut out);
        first.push(7, &data[7..], &mut out);
        first.grew -= LINE_WAIT;
        first.flush_idle(&mut out);
        let cuts: Vec<Cut> = out.iter().map(|c| c.cut).collect();
        // Killed after pushing everything but before recording it: the
        // next run starts at 0 with the recorded cuts, reading differently.
        let mut again = Framer::new(0, cuts.clone());
        let mut out2 = Vec::new();
        for (i, b) in data.iter().enumerate() {
            again.push(i as u64, &[*b], &mut out2);
        }
        assert_eq!(out2.iter().map(|c| c.cut).collect::<Vec<_>>(), cuts);
        assert_eq!(lines(&out2), lines(&out));
        // What comes after is stamped later.
        let mut out3 = Vec::new();
        again.push(data.len() as u64, b"new\n", &mut out3);
        assert!(lines(&out3)[0].0 > lines(&out).last().unwrap().0);
    }

    #[test]
    fn a_hole_ends_the_chunk_before_it() {
        let mut f = Framer::new(0, vec![Cut { end: 3, ts: 5 }]);
        let out = frame(&mut f, 0, b"ab");
        assert!(out.is_empty());
        let out = frame(&mut f, 50, b"xyz\n");
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].cut.end, out[0].raw), (2, 2));
        assert_eq!((out[1].cut.end, out[1].raw), (54, 4));
    }

    #[test]
    fn the_body_is_what_loki_documents() {
        let mut f = Framer::new(0, Vec::new());
        let mut out = frame(&mut f, 0, b"x\n\ny\n");
        out.extend(frame(&mut f, 5, b"\n"));
        let push = decode("tail\"s\\tream", &out);
        assert_eq!(push.streams.len(), 1);
        assert_eq!(push.streams[0].labels, r#"{job="tail\"s\\tream"}"#);
        let got = lines(&out);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1, "y");
        let now = now_ns();
        assert!(
            got[0].0 <= now && got[0].0 > now - 60_000_000_000,
            "{got:?}"
        );
    }

    #[test]
    fn kept_buffers_make_the_same_bodies_as_fresh_ones() {
        // A large push, then a smaller one: nothing of the first may leak
        // into the second through the kept buffers.
        let mut f = Framer::new(0, Vec::new());
        let mut framed = Vec::new();
        let big: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        f.push(0, &big, &mut framed);
        f.push(big.len() as u64, b"tail 1\ntail 2\n", &mut framed);
        let (first, second) = framed.split_at(framed.len() - 1);
        let mut c = Compressor::default();
        for chunks in [first, second, first] {
            let wires: Vec<&[u8]> = chunks.iter().map(|c| c.entries.as_slice()).collect();
            let made = c.compress("tailstream", &wires).unwrap();
            assert_eq!(made, compressed("tailstream", &wires).unwrap());
            let raw = snap::raw::Decoder::new().decompress_vec(&made).unwrap();
            assert_eq!(raw, body("tailstream", &wires));
        }
    }

    #[test]
    fn the_in_flight_file_survives_shorter_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.inflight");
        let mut f = InFlight::open(&p).unwrap();
        assert_eq!(f.load(), None);
        let long = Pushing {
            start: 0,
            cuts: (1..20)
                .map(|i| Cut {
                    end: i * 1000,
                    ts: i,
                })
                .collect(),
        };
        f.record(&long).unwrap();
        let short = Pushing {
            start: 3,
            cuts: vec![Cut { end: 7, ts: 9 }],
        };
        f.record(&short).unwrap();
        let again = InFlight::open(&p).unwrap();
        assert_eq!(again.load(), Some(short));
    }
}
