//! VM names. A name becomes a directory, a file, a zinit service name
//! (`vm:<name>`) and part of command lines, so it is one plain word.

use std::fmt;

/// The longest name accepted (Zero-OS workload ids are far shorter).
pub const MAX_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

impl VmName {
    /// Letters, digits, `-`, `_` and `.`; starting with a letter or digit;
    /// at most 64 bytes.
    pub fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("name is required".into());
        }
        if name.len() > MAX_LEN {
            return Err(format!("name is longer than {MAX_LEN} characters"));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(format!(
                "name {name:?} contains {c:?}: only letters, digits, '-', '_' and '.' are allowed"
            ));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(format!("name {name:?} must start with a letter or a digit"));
        }
        Ok(VmName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The zinit service of this VM.
    pub fn service(&self) -> zinit::ServiceName {
        // Valid by construction: `vm:` + a plain word within zinit's rules.
        zinit::ServiceName::new(format!("vm:{}", self.0)).expect("vm service name")
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["12-345-web", "a", "vm_1.test", &"x".repeat(64)] {
            assert!(VmName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "a b",
            "a\"b",
            "a\nb",
            "a'b",
            "a;b",
            "a:b",
            "$(id)",
            ".x",
            "-x",
            "..",
            "é",
            &"x".repeat(65),
            &"x".repeat(300),
        ] {
            assert!(VmName::new(bad).is_err(), "{bad:?}");
        }
    }
}
