//! The guest kernel command line: Zero-OS defaults merged with `KernelArgs`.
//!
//! Zero-OS lets the defaults win on conflicting keys; so does vmd. The
//! result is sorted by key so that the same VM always gets the same line.
//! Values that would break the line (spaces, quotes, control characters)
//! are refused rather than quoted: the kernel's own quoting rules are not
//! something a caller should have to rely on.

use std::collections::BTreeMap;

use super::error::{invalid, Invalid};

/// Zero-OS's defaults for a disk boot.
pub const DISK_DEFAULTS: &[(&str, &str)] = &[
    ("rw", ""),
    ("console", "ttyS0"),
    ("reboot", "k"),
    ("panic", "1"),
    ("root", "/dev/vda"),
    ("boot.shell_on_fail", ""),
];

/// For a virtio-fs root (`Boot.Type == 1`): the root is the share `vroot`.
pub const VIRTIOFS_DEFAULTS: &[(&str, &str)] = &[
    ("rw", ""),
    ("console", "ttyS0"),
    ("reboot", "k"),
    ("panic", "1"),
    ("root", "vroot"),
    ("rootfstype", "virtiofs"),
    ("rootdelay", "30"),
    ("boot.shell_on_fail", ""),
];

fn check(what: &str, s: &str) -> Result<(), Invalid> {
    if let Some(c) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\''))
    {
        return invalid(format!(
            "kernel argument {what} {s:?} contains {c:?}, which cannot be put on the command line"
        ));
    }
    Ok(())
}

/// The command line for `args` over `defaults`.
pub fn kernel_cmdline(
    defaults: &[(&str, &str)],
    args: &BTreeMap<String, String>,
) -> Result<String, Invalid> {
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in args {
        if k.is_empty() {
            return invalid("kernel argument with an empty name".into());
        }
        check("name", k)?;
        if k.contains('=') {
            return invalid(format!("kernel argument name {k:?} contains '='"));
        }
        // `--` ends the kernel's parameters (the rest go to init), and a
        // word starting with `-` is no kernel parameter.
        if k.starts_with('-') {
            return invalid(format!("kernel argument name {k:?} starts with '-'"));
        }
        check("value", v)?;
        merged.insert(k.clone(), v.clone());
    }
    for (k, v) in defaults {
        merged.insert((*k).to_owned(), (*v).to_owned());
    }
    let words: Vec<String> = merged
        .into_iter()
        .map(|(k, v)| if v.is_empty() { k } else { format!("{k}={v}") })
        .collect();
    Ok(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_win_and_order_is_stable() {
        let line = kernel_cmdline(
            DISK_DEFAULTS,
            &args(&[("root", "/dev/vdb"), ("quiet", ""), ("a", "1")]),
        )
        .unwrap();
        assert_eq!(
            line,
            "a=1 boot.shell_on_fail console=ttyS0 panic=1 quiet reboot=k root=/dev/vda rw"
        );
        assert_eq!(
            line,
            kernel_cmdline(
                DISK_DEFAULTS,
                &args(&[("a", "1"), ("quiet", ""), ("root", "/dev/vdb")])
            )
            .unwrap()
        );
    }

    #[test]
    fn virtiofs_boot() {
        let line = kernel_cmdline(VIRTIOFS_DEFAULTS, &BTreeMap::new()).unwrap();
        assert!(
            line.contains("root=vroot")
                && line.contains("rootfstype=virtiofs")
                && line.contains("rootdelay=30")
        );
    }

    #[test]
    fn hostile_values_are_refused() {
        for (k, v) in [
            ("a", "b c"),
            ("a", "\"x\""),
            ("a b", ""),
            ("a", "x\ny"),
            ("", "x"),
            ("a=b", "c"),
            ("init", "$(rm -rf /) x"),
            ("--", ""),
            ("--disk", "path=/etc/shadow"),
            ("-x", ""),
        ] {
            assert!(
                kernel_cmdline(DISK_DEFAULTS, &args(&[(k, v)])).is_err(),
                "{k:?}={v:?}"
            );
        }
        // `$(...)` without spaces is just bytes to the kernel: harmless, kept.
        assert!(kernel_cmdline(DISK_DEFAULTS, &args(&[("x", "$(id)")])).is_ok());
        // A dash inside a name is the kernel's own style.
        assert!(kernel_cmdline(DISK_DEFAULTS, &args(&[("no-kvmclock", "")])).is_ok());
    }
}
