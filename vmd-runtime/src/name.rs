//! Names that become paths, zinit service names (`vm:<name>`,
//! `stream:<id>`) and parts of command lines: each is one plain word, checked
//! once when it comes in and carried as its type from then on.

use std::fmt;

/// The longest name accepted (Zero-OS workload ids are far shorter).
pub const MAX_LEN: usize = 64;

/// A character of a plain word: a letter, a digit, `-`, `_` or `.`.
pub fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// 1 to `max` bytes of [`is_word_char`]s, starting with a letter or a digit:
/// safe as a file name, in a service name and on a command line.
pub fn is_plain_word(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(is_word_char)
}

/// Why a VM name was refused (the text is what a caller sees).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is required")]
    Empty,
    #[error("name is longer than {MAX_LEN} characters")]
    TooLong,
    #[error("name {0:?} contains {1:?}: only letters, digits, '-', '_' and '.' are allowed")]
    BadChar(String, char),
    #[error("name {0:?} must start with a letter or a digit")]
    BadStart(String),
    #[error("name {0:?} ends with {1:?}, which vmd keeps for the files beside a VM's own (its console log's sidecars, files being written)")]
    Reserved(String, &'static str),
}

/// Endings of the files vmd keeps beside a VM's: `logs/<name>.meta`,
/// `logs/<name>.rotating`, `<file>.tmp` while a file is replaced, and the
/// `<api socket>.lock` cloud-hypervisor v53 leaves beside its socket. A VM
/// named with one of them would have its files where another VM keeps a
/// sidecar, so a new VM may not end with one.
pub const RESERVED_ENDINGS: [&str; 4] = [".meta", ".rotating", ".tmp", ".lock"];

/// Why a stream id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamIdError {
    #[error("missing stream id")]
    Empty,
    #[error("invalid stream id {0:?}: 1-64 letters, digits, '-', '_' or '.'")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

impl VmName {
    /// Letters, digits, `-`, `_` and `.`; starting with a letter or digit;
    /// at most 64 bytes.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_LEN {
            return Err(NameError::TooLong);
        }
        if let Some(c) = name.chars().find(|c| !is_word_char(*c)) {
            return Err(NameError::BadChar(name.to_owned(), c));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(NameError::BadStart(name.to_owned()));
        }
        Ok(VmName(name.to_owned()))
    }

    /// Whether a *new* VM may have this name: not ending with one of the
    /// [`RESERVED_ENDINGS`]. Checked at `Run` only: a VM that exists under
    /// such a name (from an older vmd) is still listed, inspected and
    /// deleted.
    pub fn check_new(&self) -> Result<(), NameError> {
        match RESERVED_ENDINGS.iter().find(|e| self.0.ends_with(*e)) {
            Some(e) => Err(NameError::Reserved(self.0.clone(), e)),
            None => Ok(()),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The zinit service of this VM (`vm:` and a plain word: always a valid
    /// service name).
    pub fn service(&self) -> String {
        format!("vm:{}", self.0)
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A log stream's id (a caller's choice, used as a file and service name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(String);

impl StreamId {
    /// 1-64 letters, digits, `-`, `_` or `.`, starting with a letter or digit.
    pub fn new(id: &str) -> Result<Self, StreamIdError> {
        if id.is_empty() {
            return Err(StreamIdError::Empty);
        }
        if !is_plain_word(id, MAX_LEN) {
            return Err(StreamIdError::Invalid(id.to_owned()));
        }
        Ok(StreamId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The zinit service of the stream's worker.
    pub fn service(&self) -> String {
        format!("stream:{}", self.0)
    }
}

impl fmt::Display for StreamId {
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

    #[test]
    fn a_new_vm_cannot_take_the_name_of_another_ones_sidecar() {
        for taken in ["a.meta", "a.rotating", "a.meta.tmp", "a.tmp"] {
            let n = VmName::new(taken).expect("still a name: an old VM may have it");
            let e = n.check_new().unwrap_err();
            assert!(e.to_string().contains("keeps for the files beside"), "{e}");
        }
        for free in ["a", "metadata", "a.meta1", "meta.a", "tmp"] {
            VmName::new(free).unwrap().check_new().unwrap();
        }
    }
}
