//! Checks of the request's own text: paths, targets, MACs, addresses, the
//! shape of names. Pure: nothing here looks at the host.

use std::path::PathBuf;

use super::super::error::{invalid, Invalid};
use crate::api::Ip;

pub fn plain_path(what: &str, p: &str) -> Result<PathBuf, Invalid> {
    if p.is_empty() {
        return invalid(format!("{what} is required"));
    }
    if !p.starts_with('/') {
        return invalid(format!("{what} {p:?} must be an absolute path"));
    }
    if let Some(c) = p.chars().find(|c| c.is_control() || *c == ',') {
        return invalid(format!("{what} {p:?} contains {c:?}"));
    }
    Ok(PathBuf::from(p))
}

pub fn target(what: &str, t: &str) -> Result<(), Invalid> {
    if t.is_empty() {
        return Ok(());
    }
    if t == "/" {
        return invalid(format!("{what} target cannot be '/'"));
    }
    if !t.starts_with('/') || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return invalid(format!(
            "{what} target {t:?} must be an absolute path without spaces"
        ));
    }
    Ok(())
}

pub fn mac(m: &str) -> Result<(), Invalid> {
    let parts: Vec<&str> = m.split(':').collect();
    let ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        return invalid(format!("invalid MAC address {m:?}"));
    }
    Ok(())
}

/// A tap's name: what a Linux interface name may be.
pub fn tap_name(t: &str) -> Result<(), Invalid> {
    if t.is_empty()
        || t.len() > 15
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return invalid(format!("invalid tap name {t:?}"));
    }
    Ok(())
}

pub fn ip(what: &str, i: &Ip, required: bool) -> Result<(), Invalid> {
    if i.is_nil() {
        return if required {
            invalid(format!("{what} is missing"))
        } else {
            Ok(())
        };
    }
    i.addr()
        .map(drop)
        .ok_or_else(|| Invalid(format!("{what} has {} bytes: not an IP address", i.0.len())))
}

/// A PCI address in the kernel's form.
pub fn pci_address(id: &str) -> Result<(), Invalid> {
    let b = id.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    let shape = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && (b'0'..=b'7').contains(&b[11]);
    if !shape {
        return invalid(format!(
            "invalid PCI address {id:?} (expected 0000:01:00.0)"
        ));
    }
    Ok(())
}
