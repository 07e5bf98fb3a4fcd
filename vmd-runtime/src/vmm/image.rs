//! What format a disk image is, decided once when the VM is created.
//!
//! The format is detected when `Run` accepts the disk — before any guest
//! could write to it — recorded in the VM's description, and passed to
//! cloud-hypervisor explicitly (`image_type=`) where the version has the
//! option. Detecting again at every start would let a guest that writes a
//! qcow2 header into sector 0 of its raw disk turn it into an image the VMM
//! parses (backing files …); that is why cloud-hypervisor v51+ refuses
//! sector-0 writes to images it only *detected* as raw.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The image formats cloud-hypervisor opens (`image_type=` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    /// A fixed VHD (a footer at the end, raw data before it).
    Vhd,
    Vhdx,
}

const QCOW_MAGIC: &[u8; 4] = b"QFI\xfb";
const VHDX_SIGNATURE: &[u8; 8] = b"vhdxfile";
const VHD_COOKIE: &[u8; 8] = b"conectix";
/// The VHD footer's disk type of a fixed disk (big-endian u32 at 60).
const VHD_FIXED: u32 = 2;

impl ImageFormat {
    /// The format of the image at `path`, by the magic numbers
    /// cloud-hypervisor itself checks; anything else is raw.
    pub fn detect(path: &Path) -> std::io::Result<ImageFormat> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let mut head = [0u8; 8];
        let n = read_up_to(&mut f, &mut head)?;
        if n >= 4 && &head[..4] == QCOW_MAGIC {
            return Ok(ImageFormat::Qcow2);
        }
        if n == 8 && &head == VHDX_SIGNATURE {
            return Ok(ImageFormat::Vhdx);
        }
        if len >= 512 {
            let mut footer = [0u8; 512];
            f.seek(SeekFrom::Start(len - 512))?;
            if read_up_to(&mut f, &mut footer)? == 512 && &footer[..8] == VHD_COOKIE {
                let kind = u32::from_be_bytes([footer[60], footer[61], footer[62], footer[63]]);
                if kind == VHD_FIXED {
                    return Ok(ImageFormat::Vhd);
                }
            }
        }
        Ok(ImageFormat::Raw)
    }

    /// The value of `--disk …,image_type=`.
    pub fn image_type(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Vhdx => "vhdx",
        }
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_their_magic() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let mut qcow = QCOW_MAGIC.to_vec();
        qcow.extend([0, 0, 0, 3]);
        assert_eq!(
            ImageFormat::detect(&write("q", &qcow)).unwrap(),
            ImageFormat::Qcow2
        );
        let mut vhdx = VHDX_SIGNATURE.to_vec();
        vhdx.resize(4096, 0);
        assert_eq!(
            ImageFormat::detect(&write("x", &vhdx)).unwrap(),
            ImageFormat::Vhdx
        );
        let mut vhd = vec![0u8; 4096];
        let footer = vhd.len() - 512;
        vhd[footer..footer + 8].copy_from_slice(VHD_COOKIE);
        vhd[footer + 60..footer + 64].copy_from_slice(&VHD_FIXED.to_be_bytes());
        assert_eq!(
            ImageFormat::detect(&write("v", &vhd)).unwrap(),
            ImageFormat::Vhd
        );
        // A dynamic VHD is not a format cloud-hypervisor opens: raw.
        vhd[footer + 63] = 3;
        assert_eq!(
            ImageFormat::detect(&write("vd", &vhd)).unwrap(),
            ImageFormat::Raw
        );
        assert_eq!(
            ImageFormat::detect(&write("r", &[0u8; 1024])).unwrap(),
            ImageFormat::Raw
        );
        assert_eq!(
            ImageFormat::detect(&write("e", b"")).unwrap(),
            ImageFormat::Raw
        );
        assert_eq!(
            ImageFormat::detect(&write("s", b"QF")).unwrap(),
            ImageFormat::Raw
        );
        assert!(ImageFormat::detect(&d.path().join("missing")).is_err());
    }

    #[test]
    fn recorded_in_lowercase() {
        assert_eq!(
            serde_json::to_string(&ImageFormat::Qcow2).unwrap(),
            "\"qcow2\""
        );
        assert_eq!(ImageFormat::Raw.image_type(), "raw");
    }
}
