//! Building a Debian image with debootstrap: `debootstrap --variant=minbase` with the recipe's
//! packages, then its pip packages installed in a chroot, an unprivileged `agent` user, a
//! cleanup of what makes two builds differ, and the ext4 root file system.
//!
//! An image built from a recipe is stored under the recipe's hash ([`DebianRecipe::hash`]:
//! suite, mirror, sorted packages, sorted pip packages, epoch and [`BUILDER_VERSION`]), so a
//! second build of the same recipe finds it in the store and only names it.
//!
//! Reproducibility, as far as the tools allow: apt lists and caches, `*-old` files, logs (kept,
//! emptied), `/tmp`, the host's resolv.conf and hostname that debootstrap copies in, and the
//! machine-id's contents are removed; every mtime and atime is clamped to the recipe's epoch,
//! which is also `SOURCE_DATE_EPOCH` for pip (so `.pyc` files use hashes, not times) and
//! mke2fs. What still differs between two builds: package versions if the mirror moved on,
//! inode change times (mke2fs copies them and nothing can set them), and file order within
//! directories.
//!
//! The `agent` user (uid and gid 1000, home `/home/agent`) is added by appending to the
//! passwd, group, shadow and gshadow files rather than by running `useradd` in the chroot: the
//! lines are then fixed (no "last changed" date of today), and no tool from the image runs as
//! root on the host more than pip needs to.
//!
//! Every write into the tree goes through [`tree_path`], which refuses a path whose parents
//! are symlinks, so a package cannot redirect these writes (or the `/proc` and `/dev` mounts) to
//! the host.

//!
//! Parts: [`recipe`] (validation and hashing), `build` (the steps), `chroot` (the `/proc` and
//! `/dev` mounts for pip, and making sure no mount is left below a staging directory before it
//! is deleted), `tidy` (the agent user and the cleanup).

mod build;
mod chroot;
pub mod recipe;
mod tidy;

use std::io;
use std::path::PathBuf;

use crate::ext4::Ext4Error;
use crate::name::NameError;
use crate::store::StoreError;
use crate::tool::ToolError;
use crate::tree::TreeError;

pub use build::{agent_config, build_debian};
pub use recipe::DebianRecipe;
pub use tidy::{add_agent_user, clean, tree_path};

/// Bumped whenever the build steps change what an image holds; part of every recipe hash.
pub const BUILDER_VERSION: u32 = 1;
/// The default mirror.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The agent user's name.
pub const AGENT_USER: &str = "agent";
/// The agent user's uid and gid.
pub const AGENT_ID: u32 = 1000;
/// The agent user's home.
pub const AGENT_HOME: &str = "/home/agent";
/// The `PATH` of images built here.
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// The image name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The suite is not `[a-z][a-z0-9-]*`.
    #[error("suite {0:?} is not a Debian suite name")]
    BadSuite(String),
    /// A package name breaks Debian policy's rule.
    #[error("package {0:?} is not a Debian package name")]
    BadPackage(String),
    /// A pip requirement is not a plain `name[extras]<op>version` specifier.
    #[error("pip requirement {0:?} is not a plain requirement specifier")]
    BadPipPackage(String),
    /// The mirror is not an http(s) URL.
    #[error("mirror {0:?} is not an http(s) URL")]
    BadMirror(String),
    /// The epoch is zero (mke2fs would take it as unset).
    #[error("the recipe's epoch must be after 1970-01-01")]
    BadEpoch,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// debootstrap is missing or failed.
    #[error("debootstrap")]
    Debootstrap(#[source] ToolError),
    /// pip in the chroot is missing or failed.
    #[error("pip install in the image")]
    Pip(#[source] ToolError),
    /// A path of the tree goes through a symlink or a non-directory.
    #[error("{path:?} in the image goes through a symlink or a non-directory")]
    UnsafePath { path: PathBuf },
    /// Mounting `/proc` or `/dev` into the chroot failed.
    #[error("mounting {path:?}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// Unmounting failed.
    #[error("unmounting {path:?}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// Listing the mounts failed.
    #[error("reading /proc/self/mountinfo")]
    MountInfo(#[source] io::Error),
    /// Mounts below the staging directory could not be detached, so it is left in place
    /// (deleting it could reach into a mounted host directory).
    #[error("mounts left below {staging:?}; the staging directory is kept")]
    MountsLeft {
        staging: PathBuf,
        #[source]
        source: Box<DebianError>,
    },
    /// The `agent` user or uid/gid 1000 already exists in the image.
    #[error("the image already has user or group {AGENT_USER} or id {AGENT_ID}")]
    AgentTaken,
    /// Reading, writing or removing a file of the tree failed.
    #[error("preparing {path:?} in the image")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Walking the tree or clamping times failed.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// Making the ext4 disk failed.
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
}
