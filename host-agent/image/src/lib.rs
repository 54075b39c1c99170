//! Agent root filesystem images: the host side.
//!
//! An image is a read-only ext4 disk (`rootfs.ext4`) and the process settings to start an agent
//! in it (`config.json`: Env, WorkingDir, User, Entrypoint, Cmd). The VMM attaches the disk
//! read-only plus a per-VM writable disk ([`create_scratch_disk`]); the guest's PID 1 stacks
//! them with overlayfs. Images come from two places:
//!
//! - [`import()`]: a `docker save` tarball, an OCI image layout directory or a tar of one; every
//!   blob is checked against its sha256 while it streams, layers are applied with their
//!   whiteouts into a private staging tree that nothing in a layer can escape, and the tree
//!   becomes the disk;
//! - [`build_debian`]: debootstrap plus pip packages, with an unprivileged `agent` user,
//!   cached by the recipe's hash.
//!
//! Both land in the content-addressed [`ImageStore`] under the state directory, where names
//! point at digests. Nothing reaches the store unless the whole operation succeeds.
//!
//! # Layout
//! - [`store`]: the store on disk, names, atomic commits, list, inspect, remove.
//! - [`mod@import`]: the import pipeline ([`import()`], [`stage_image`]) and its [`ImageError`].
//! - [`source`]: reading docker and OCI sources, media types, digests of JSON documents.
//! - [`layer`]: applying layer tar streams to a tree: whiteouts, opaque directories, refusals.
//! - [`limits`]: the size and entry limits, enforced while streaming.
//! - [`digest`]: sha256 digests and the hashing reader.
//! - [`tree`]: walking a staged tree, counting it, clamping its times.
//! - [`ext4`]: `mkfs.ext4` for the root file system and the scratch disk.
//! - [`debian`]: debootstrap builds and their recipes.
//! - [`config`]: the image config, [`ImageConfig`].
//! - [`name`]: image names, [`ImageName`].
//! - [`tool`]: running external tools and naming their Debian packages.
//! - [`mounts`]: the mount table, so no delete crosses into a mount.

pub mod config;
pub mod debian;
pub mod digest;
pub mod ext4;
pub mod import;
pub mod layer;
pub mod limits;
pub mod mounts;
pub mod name;
pub mod source;
pub mod store;
pub mod tool;
pub mod tree;

pub use config::ImageConfig;
pub use debian::{DebianError, DebianRecipe, build_debian};
pub use digest::Digest;
pub use ext4::{Ext4Error, create_scratch_disk, create_scratch_disk_with};
pub use import::{ImageError, StagedImage, import, stage_image};
pub use limits::ImportLimits;
pub use name::ImageName;
pub use store::{ImageInfo, ImageMeta, ImageOrigin, ImageStore, StoreError};

/// The time used where an image has none of its own: mke2fs's clock for imports, the mtime of
/// directories no layer dates, and a recipe's default epoch (2024-01-01T00:00:00Z).
pub const DEFAULT_EPOCH: u64 = 1_704_067_200;
