//! Image names: `[a-z0-9][a-z0-9._-]{0,63}`. A name is also a file name in the store, so the
//! rule keeps out `/`, `..`, leading dots and anything a shell or a URL would need to quote.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest name accepted.
pub const MAX_NAME_LEN: usize = 64;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The name breaks the `[a-z0-9][a-z0-9._-]{0,63}` rule.
    #[error("image name {0:?} is not [a-z0-9][a-z0-9._-]{{0,63}}")]
    Invalid(String),
}

/// A validated image name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageName(String);

impl ImageName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self, NameError> {
        let mut bytes = name.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
        if first_ok && rest_ok && name.len() <= MAX_NAME_LEN {
            Ok(Self(name.to_owned()))
        } else {
            Err(NameError::Invalid(name.to_owned()))
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ImageName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Serialize for ImageName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ImageName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in [
            "a",
            "0",
            "debian-12",
            "py3.11_slim",
            &"a".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(ImageName::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_everything_else() {
        let too_long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "_x",
            "A",
            "ubuntu:22.04",
            "a/b",
            "a b",
            "é",
            &too_long,
        ] {
            assert!(
                matches!(ImageName::new(bad), Err(NameError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
