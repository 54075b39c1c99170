//! Debian build recipes: validation (nothing in a recipe can become an option of debootstrap
//! or pip, a URL or a path), the canonical form, and the hash that names the built image.

use serde::{Deserialize, Serialize};

use super::{BUILDER_VERSION, DEFAULT_MIRROR, DebianError};
use crate::digest::Digest;

/// Longest package or pip requirement accepted.
const MAX_SPEC_LEN: usize = 200;

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebianRecipe {
    /// The suite, such as `bookworm`.
    pub suite: String,
    /// Debian packages besides the minbase set.
    pub packages: Vec<String>,
    /// pip requirements (`name`, `name==1.2`, `name[extra]>=1`), installed system-wide.
    pub pip_packages: Vec<String>,
    /// The mirror.
    pub mirror: String,
    /// The time every file is clamped to, and mke2fs's time (seconds since the epoch).
    pub epoch: u64,
}

impl DebianRecipe {
    /// A recipe for `suite` with no extra packages, the default mirror and epoch.
    pub fn new(suite: &str) -> Self {
        Self {
            suite: suite.to_owned(),
            packages: Vec::new(),
            pip_packages: Vec::new(),
            mirror: DEFAULT_MIRROR.to_owned(),
            epoch: crate::DEFAULT_EPOCH,
        }
    }

    /// Checks every field and returns the canonical form: packages and pip requirements
    /// sorted and deduplicated, `python3-pip` added when there are pip requirements, the
    /// mirror without a trailing `/`.
    pub fn normalized(&self) -> Result<Self, DebianError> {
        let suite_ok = self.suite.len() <= 32
            && self.suite.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .suite
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !suite_ok {
            return Err(DebianError::BadSuite(self.suite.clone()));
        }
        for p in &self.packages {
            if !is_package_name(p) {
                return Err(DebianError::BadPackage(p.clone()));
            }
        }
        for p in &self.pip_packages {
            if !is_pip_requirement(p) {
                return Err(DebianError::BadPipPackage(p.clone()));
            }
        }
        let mirror = self.mirror.trim_end_matches('/');
        let mirror_ok = (mirror.starts_with("http://") || mirror.starts_with("https://"))
            && mirror.len() <= 512
            && mirror.bytes().all(|b| b.is_ascii_graphic());
        if !mirror_ok {
            return Err(DebianError::BadMirror(self.mirror.clone()));
        }
        if self.epoch == 0 {
            return Err(DebianError::BadEpoch);
        }
        let mut packages = self.packages.clone();
        if !self.pip_packages.is_empty() {
            packages.push("python3-pip".to_owned());
        }
        packages.sort();
        packages.dedup();
        let mut pip_packages = self.pip_packages.clone();
        pip_packages.sort();
        pip_packages.dedup();
        Ok(Self {
            suite: self.suite.clone(),
            packages,
            pip_packages,
            mirror: mirror.to_owned(),
            epoch: self.epoch,
        })
    }

    /// The hash of the normalized recipe and [`BUILDER_VERSION`]: the built image's digest.
    pub fn hash(&self) -> Result<Digest, DebianError> {
        #[derive(Serialize)]
        struct Keyed<'a> {
            builder_version: u32,
            recipe: &'a DebianRecipe,
        }
        let recipe = self.normalized()?;
        let keyed = Keyed {
            builder_version: BUILDER_VERSION,
            recipe: &recipe,
        };
        // Plain strings and numbers: serializing cannot fail.
        Ok(Digest::of(&serde_json::to_vec(&keyed).unwrap_or_default()))
    }
}

/// Debian policy: lowercase alphanumerics, `+`, `-`, `.`, starting alphanumeric, 2+ chars.
fn is_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= MAX_SPEC_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        })
}

/// A PEP 508 name with optional extras and version clauses; no URLs, paths, spaces or options.
fn is_pip_requirement(spec: &str) -> bool {
    spec.len() <= MAX_SPEC_LEN
        && spec.starts_with(|c: char| c.is_ascii_alphanumeric())
        && spec.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_' | b'-' | b'[' | b']' | b',' | b'=' | b'<' | b'>'
                )
                || matches!(b, b'!' | b'~' | b'*')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(packages: &[&str], pip: &[&str]) -> DebianRecipe {
        DebianRecipe {
            packages: packages.iter().map(|s| s.to_string()).collect(),
            pip_packages: pip.iter().map(|s| s.to_string()).collect(),
            ..DebianRecipe::new("bookworm")
        }
    }

    #[test]
    fn hash_ignores_order_duplicates_and_trailing_slash() {
        let a = recipe(&["python3", "ca-certificates"], &["openai", "mcp==1.2"]);
        let mut b = recipe(
            &["ca-certificates", "python3", "python3"],
            &["mcp==1.2", "openai"],
        );
        b.mirror.push('/');
        assert_eq!(a.hash().unwrap(), b.hash().unwrap());
        assert!(
            a.normalized()
                .unwrap()
                .packages
                .contains(&"python3-pip".to_owned())
        );
    }

    #[test]
    fn hash_changes_with_every_field() {
        let base = recipe(&["python3"], &[]);
        let h = base.hash().unwrap();
        let variants = [
            DebianRecipe {
                suite: "trixie".into(),
                ..base.clone()
            },
            recipe(&["python3", "git"], &[]),
            recipe(&["python3"], &["openai"]),
            DebianRecipe {
                mirror: "http://mirror.example/debian".into(),
                ..base.clone()
            },
            DebianRecipe {
                epoch: base.epoch + 1,
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.hash().unwrap(), h, "{v:?}");
        }
    }

    #[test]
    fn refuses_option_injection_and_odd_values() {
        assert!(matches!(
            recipe(&["--foo"], &[]).hash(),
            Err(DebianError::BadPackage(_))
        ));
        assert!(matches!(
            recipe(&["a,b"], &[]).hash(),
            Err(DebianError::BadPackage(_))
        ));
        for bad in [
            "--index-url=http://x",
            "-r/etc/passwd",
            "pkg @ http://x",
            "./local",
            "",
        ] {
            assert!(
                matches!(
                    recipe(&[], &[bad]).hash(),
                    Err(DebianError::BadPipPackage(_))
                ),
                "{bad}"
            );
        }
        let ok = recipe(
            &["g++", "libc6.1"],
            &["openai>=1,<2", "uvicorn[standard]==0.3"],
        );
        assert!(ok.hash().is_ok());
        let bad_suite = DebianRecipe::new("../bookworm");
        assert!(matches!(bad_suite.hash(), Err(DebianError::BadSuite(_))));
        let bad_mirror = DebianRecipe {
            mirror: "file:///etc".into(),
            ..DebianRecipe::new("sid")
        };
        assert!(matches!(bad_mirror.hash(), Err(DebianError::BadMirror(_))));
        let zero = DebianRecipe {
            epoch: 0,
            ..DebianRecipe::new("sid")
        };
        assert!(matches!(zero.hash(), Err(DebianError::BadEpoch)));
    }
}
