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
}

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
}
