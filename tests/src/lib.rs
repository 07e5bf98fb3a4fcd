//! Fixtures of the integration tests: a real `redis-server` on a private
//! unix socket, the Go vectors, a fixture module, paths of the built binaries.

pub mod fixture;
pub mod redis_server;
pub mod supervisor;
pub mod vm;
pub mod vmd_process;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use redis_server::RedisServer;
pub use supervisor::Supervisor;
pub use vmd_process::VmdProcess;

/// `shared/` beside the repository (override with `VMD_SHARED_DIR`).
pub fn shared_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMD_SHARED_DIR") {
        return PathBuf::from(d);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The messages of `shared/vectors/vectors.txt`, by name.
pub fn vectors() -> BTreeMap<String, Vec<u8>> {
    let path = shared_dir().join("vectors/vectors.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some((name, rest)) = line.split_once(" (") else {
            continue;
        };
        let len: usize = rest
            .trim_end_matches(" bytes):")
            .parse()
            .unwrap_or_else(|_| panic!("bad header {line:?}"));
        let hex = lines.next().expect("hex line after header").trim();
        let bytes = unhex(hex);
        assert_eq!(bytes.len(), len, "length of vector {name}");
        out.insert(name.to_owned(), bytes);
    }
    out
}

pub fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A binary of the workspace (`cargo build --workspace` must have run).
pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// One log-stream message, gunzipped (each is a complete gzip member).
pub fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .expect("each message is a complete gzip member");
    out
}
