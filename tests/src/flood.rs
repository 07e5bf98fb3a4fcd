//! VMs whose (double) guest floods its console with numbered lines, and
//! reading those numbers back: how the stream tests check that nothing was
//! lost or repeated.

use std::time::Duration;

use crate::stack::Stack;
use crate::until;

/// Lines of the double's flood: 64 bytes, `FLOOD <12-digit seq> x…\n`,
/// numbered from 1.
pub const LINE: u64 = 64;

/// Runs `name`, whose guest starts printing `bytes` bytes at `bps`,
/// `delay_ms` after it booted.
pub async fn run_flooding(stack: &Stack, name: &str, delay_ms: u64, bps: u64, bytes: u64) {
    let (delay, bps, bytes) = (delay_ms.to_string(), bps.to_string(), bytes.to_string());
    let vm = stack.vm(
        name,
        &[
            ("double.boot_ms", &delay),
            ("double.flood_bps", &bps),
            ("double.flood_bytes", &bytes),
        ],
    );
    stack.stub.run(&vm).await.unwrap();
}

/// What the console log of `name` holds.
pub fn console(stack: &Stack, name: &str) -> Vec<u8> {
    std::fs::read(stack.log(name)).unwrap_or_default()
}

/// Waits until the VM printed all of a `bytes`-byte flood (its last line is
/// in the log), and returns the log.
pub async fn wait_done(stack: &Stack, name: &str, bytes: u64) -> Vec<u8> {
    let last = format!("FLOOD {:012} ", bytes.div_ceil(LINE));
    let last = last.as_bytes();
    until(Duration::from_secs(60), "the end of the flood", || {
        let log = console(stack, name);
        std::future::ready(log.windows(last.len()).any(|w| w == last))
    })
    .await;
    console(stack, name)
}

/// The sequence numbers of the flood lines in `text`, in order.
pub fn seqs(text: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(seq)
        .collect()
}

/// The sequence number of one flood line.
pub fn seq(line: &str) -> Option<u64> {
    line.strip_prefix("FLOOD ")
        .and_then(|r| r.get(..12))
        .and_then(|n| n.parse().ok())
}
