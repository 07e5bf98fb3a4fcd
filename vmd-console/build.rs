//! Embeds the web console's page in the binary, so that a node needs
//! nothing but the binaries: `console/web/index.html` and xterm.js as
//! `npm ci` installed it (pinned by `console/web/package-lock.json`).
//!
//! Without `node_modules` (a plain `cargo build` before `npm ci`) the build
//! still succeeds, says so, and the binary serves the page only from
//! `--assets`: a build never fetches anything.

use std::path::PathBuf;

/// What is embedded: the name the binary knows it by, and its path under
/// `console/web`.
const FILES: [(&str, &str); 3] = [
    ("VMD_CONSOLE_INDEX_HTML", "index.html"),
    (
        "VMD_CONSOLE_XTERM_JS",
        "node_modules/@xterm/xterm/lib/xterm.js",
    ),
    (
        "VMD_CONSOLE_XTERM_CSS",
        "node_modules/@xterm/xterm/css/xterm.css",
    ),
];

fn main() {
    println!("cargo::rustc-check-cfg=cfg(embedded_page)");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let web = manifest.join("../console/web");
    let mut missing = Vec::new();
    for (var, rel) in FILES {
        let path = web.join(rel);
        // Also when it does not exist yet: `npm ci` then triggers a rebuild.
        println!("cargo::rerun-if-changed={}", path.display());
        match path.canonicalize() {
            Ok(p) => println!("cargo::rustc-env={var}={}", p.display()),
            Err(_) => missing.push(rel),
        }
    }
    if missing.is_empty() {
        println!("cargo::rustc-cfg=embedded_page");
    } else {
        println!(
            "cargo::warning=the web console page is not embedded ({} missing: run `npm ci --prefix console/web` and build again); this vmd-console serves it only from --assets",
            missing.join(", ")
        );
    }
}
