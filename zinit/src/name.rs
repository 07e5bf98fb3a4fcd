//! Service names: what may safely be a zinit service.
//!
//! A name becomes the file `<config dir>/<name>.yaml` (zinit opens it relative
//! to its working directory, so `/` or `..` would escape the directory), a
//! word of a shell-split control command, and a prefix in the log ring. The
//! rules below keep it one plain word in all three places.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest name: the file `<name>.yaml` must fit in 255 bytes.
pub const MAX_LEN: usize = 250;

/// A valid zinit service name, such as `vm:12-345-web` or `stream:s1`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("service name is empty")]
    Empty,
    #[error("service name is longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("service name {0:?} contains {1:?}: only letters, digits and . _ - : @ + are allowed")]
    BadChar(String, char),
    #[error("service name {0:?} must start with a letter or a digit")]
    BadStart(String),
}

impl ServiceName {
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > MAX_LEN {
            return Err(NameError::TooLong);
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-:@+".contains(*c)))
        {
            return Err(NameError::BadChar(name, c));
        }
        // Rules out ".", "..", hidden files and names that look like flags.
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(NameError::BadStart(name));
        }
        Ok(ServiceName(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The service file's name in the config dir.
    pub fn file_name(&self) -> String {
        format!("{}.yaml", self.0)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        ServiceName::new(s)
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ServiceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ServiceName::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_vmd_uses() {
        for ok in [
            "vm:12-345-web",
            "stream:s1",
            "vmd",
            "redis",
            "a.b_c-d@e+f",
            "9",
        ] {
            ServiceName::new(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        assert!(ServiceName::new("x".repeat(MAX_LEN)).is_ok());
    }

    #[test]
    fn rejects_hostile_names() {
        for bad in [
            "", "../x", "a/b", "/abs", "a b", "a\"b", "a'b", "a\nb", "a\tb", "a\0b", ".", "..",
            ".hidden", "-flag", "a;b", "a$b", "a`b", "a#b", "a\\b", "é", "a\u{7f}",
        ] {
            assert!(ServiceName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            ServiceName::new("x".repeat(MAX_LEN + 1)),
            Err(NameError::TooLong)
        );
    }
}
