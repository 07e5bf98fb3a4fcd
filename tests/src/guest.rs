//! Extra steps for the real test guest (`shared/guest/`), for checks its
//! `/init` has no knob for.
//!
//! The kernel unpacks concatenated newc archives in order, so a step is the
//! guest's own initramfs followed by a small archive holding one more
//! script; `rdinit=<script>` on the command line makes the kernel run it
//! first, and the script ends by `exec /init`, so the guest then behaves as
//! usual (markers, power button). The guest's files are not touched.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A guest step that writes sector 0 of every writable virtio-blk disk with
/// 0xa5 and syncs it, printing `GUEST-SECTOR0 vdX written` (what the double
/// prints with `double.write_sector0=1`) or `GUEST-SECTOR0 vdX failed`; a
/// VMM that refuses the write makes the kernel print `I/O error, dev vdX,
/// sector 0`. Whether the bytes landed is for the host to read in the image.
pub const WRITE_SECTOR0: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t devtmpfs devtmpfs /dev
mount -t sysfs sysfs /sys
dd if=/dev/zero bs=512 count=1 2>/dev/null | tr '\000' '\245' > /sector0
for d in /sys/block/vd*; do
  [ -e "$d/ro" ] && [ "$(cat "$d/ro")" = 0 ] || continue
  n=${d##*/}
  if dd if=/sector0 of=/dev/$n bs=512 count=1 conv=fsync 2>/dev/null; then
    echo "GUEST-SECTOR0 $n written" > /dev/ttyS0
  else
    echo "GUEST-SECTOR0 $n failed" > /dev/ttyS0
  fi
done
rm -f /sector0
umount /sys
umount /dev
exec /init
"#;

/// `base` (the guest's initramfs) followed by an archive holding `script`
/// at `/<name>`, written to `dir/<name>.cpio`. Boot it with
/// `rdinit=/<name>`.
pub fn initramfs_with_step(base: &Path, dir: &Path, name: &str, script: &str) -> PathBuf {
    let out = dir.join(format!("{name}.cpio"));
    let mut bytes = std::fs::read(base)
        .unwrap_or_else(|e| panic!("cannot read the guest's initramfs {}: {e}", base.display()));
    // newc members start on a 4-byte boundary; GNU cpio pads the archive to
    // 512 bytes, but a hand-made one may not be.
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let mut file = cpio::NewcBuilder::new(name)
        .mode(0o100_755)
        .nlink(1)
        .write(bytes, script.len() as u32);
    file.write_all(script.as_bytes()).unwrap();
    let bytes = cpio::newc::trailer(file.finish().unwrap()).unwrap();
    std::fs::write(&out, bytes).unwrap();
    out
}
