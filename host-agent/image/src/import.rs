//! Importing an OCI or docker image into the store: read and verify the source
//! ([`crate::source`]), apply its layers to a staging tree ([`crate::layer`]) while hashing and
//! counting every byte, make the ext4 root file system ([`crate::ext4`]) and commit it
//! ([`crate::store`]).
//!
//! Each layer is one stream, read once:
//!
//! ```text
//! file -> sha256 (blob digest) -> gunzip? -> sha256 (diff ID) -> size budget -> tar -> tree
//! ```
//!
//! Both digests are compared when the layer ends; the budget stops a gzip bomb at the limit.
//! All work happens in the operation's staging directory, so any error (a refusal, a mismatch,
//! the limit) leaves the store as it was: the staging directory is removed on the way out.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::config::ImageConfig;
use crate::digest::Digest;
use crate::ext4::{Ext4Error, RootfsParams, make_rootfs};
use crate::layer::{LayerError, RootTree};
use crate::limits::{Budget, BudgetReader, ImportLimits};
use crate::name::{ImageName, NameError};
use crate::source::{Compression, ImageSource, LayerPlan, SourceError, SourceKind, sniff};
use crate::store::{ImageInfo, ImageMeta, ImageOrigin, ImageStore, StoreError, now_unix};
use crate::tree::TreeStats;

/// Errors of an import.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source is unreadable, unsupported, or does not match its digests.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A layer entry was refused or could not be written.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// The layers are larger than the limit.
    #[error("image is larger than {limit} bytes uncompressed")]
    TooLarge { limit: u64 },
    /// Reading a layer's stream failed.
    #[error("reading layer {path:?}")]
    ReadLayer {
        path: String,
        #[source]
        source: io::Error,
    },
    /// Creating the staging tree failed.
    #[error("creating the staging tree {path:?}")]
    CreateTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Making the ext4 disk failed.
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
}

/// An image applied to a staging tree, before its disk is made.
#[derive(Debug, Clone)]
pub struct StagedImage {
    /// What the source was.
    pub kind: SourceKind,
    /// The image's identity: the digest of its config.
    pub digest: Digest,
    /// The manifest's digest (OCI sources).
    pub manifest_digest: Option<Digest>,
    /// The process settings.
    pub config: ImageConfig,
    /// Layers applied.
    pub layers: usize,
    /// What the tree holds.
    pub stats: TreeStats,
}

/// Imports the image at `source` (a `docker save` tarball, an OCI layout directory, or a tar of
/// one) under `name`. On any error nothing is written to the store.
pub fn import(
    store: &ImageStore,
    name: &str,
    source: &Path,
    limits: &ImportLimits,
) -> Result<ImageInfo, ImageError> {
    let name = ImageName::new(name)?;
    let staging = store.staging()?;
    tracing::info!(%name, source = %source.display(), "importing image");
    let staged = stage_image(source, &staging.tree(), staging.path(), limits)?;
    let blob = staging.blob();
    fs::create_dir(&blob).map_err(|source| ImageError::CreateTree { path: blob, source })?;
    let params = RootfsParams {
        digest: staged.digest,
        label: rootfs_label(&staged.digest),
        epoch: crate::DEFAULT_EPOCH,
    };
    let rootfs_bytes = make_rootfs(
        &staging.tree(),
        &staging.rootfs(),
        &staged.stats,
        &params,
        &mut |line| tracing::debug!(line, "import"),
    )?;
    remove_tree(&staging.tree());
    let meta = ImageMeta {
        digest: staged.digest,
        origin: ImageOrigin::Import {
            kind: staged.kind,
            manifest_digest: staged.manifest_digest,
            layers: staged.layers,
        },
        rootfs_bytes,
        created_unix: now_unix(),
    };
    Ok(store.commit(&staging, &name, &staged.config, &meta)?)
}

/// Reads and verifies `source` and applies its layers to `tree` (created here; it must not
/// exist). `scratch` is a private directory for a decompressed source tarball. This is the
/// whole import except the disk and the store, so tests can inspect the tree.
pub fn stage_image(
    source: &Path,
    tree: &Path,
    scratch: &Path,
    limits: &ImportLimits,
) -> Result<StagedImage, ImageError> {
    let image = ImageSource::open(source, scratch, limits)?;
    let plan = image.plan(limits)?;
    tracing::debug!(kind = ?plan.kind, digest = %plan.config_digest, layers = plan.layers.len(), "image verified");
    let tree_err = |source| ImageError::CreateTree {
        path: tree.to_owned(),
        source,
    };
    fs::create_dir(tree).map_err(tree_err)?;
    // The root of the image is root's and world-readable, whatever the staging dir is.
    std::os::unix::fs::chown(tree, Some(0), Some(0)).map_err(tree_err)?;
    fs::set_permissions(tree, fs::Permissions::from_mode(0o755)).map_err(tree_err)?;
    let mut root = RootTree::new(tree, limits.max_entries, crate::DEFAULT_EPOCH);
    let budget = Budget::new(limits.max_bytes);
    for layer in &plan.layers {
        apply_layer(&image, &mut root, layer, &budget)?;
    }
    let stats = root.finish()?;
    Ok(StagedImage {
        kind: plan.kind,
        digest: plan.config_digest,
        manifest_digest: plan.manifest_digest,
        config: plan.config,
        layers: plan.layers.len(),
        stats,
    })
}

/// Deletes a staged tree once its disk is made, so an import needs the disk space of the tree
/// and the disk at once only briefly. Best effort: the staging directory goes anyway when the
/// operation ends.
pub(crate) fn remove_tree(tree: &Path) {
    if let Err(error) = fs::remove_dir_all(tree) {
        tracing::warn!(tree = %tree.display(), %error, "cannot remove the staged tree yet");
    }
}

/// The volume label of an image's root file system: `nc-` and the digest's first 12 hex.
pub fn rootfs_label(digest: &Digest) -> String {
    format!("nc-{}", &digest.hex()[..12])
}

/// A layer stream, decompressed or not.
enum Decoded<R: BufRead> {
    Plain(R),
    Gzip(MultiGzDecoder<R>),
}

impl<R: BufRead> Decoded<R> {
    fn into_inner(self) -> R {
        match self {
            Decoded::Plain(r) => r,
            Decoded::Gzip(d) => d.into_inner(),
        }
    }
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(d) => d.read(buf),
        }
    }
}

fn apply_layer(
    image: &ImageSource,
    root: &mut RootTree,
    layer: &LayerPlan,
    budget: &Budget,
) -> Result<(), ImageError> {
    let path = &layer.path;
    let read_err = |source| ImageError::ReadLayer {
        path: path.clone(),
        source,
    };
    let (file, size) = image.open_file(path)?;
    if let Some(expected) = layer.blob_size.filter(|&s| s != size) {
        return Err(SourceError::SizeMismatch {
            path: path.clone(),
            expected,
            actual: size,
        }
        .into());
    }
    tracing::debug!(path, media_type = layer.media_type, size, "applying layer");
    let mut buffered = BufReader::new(crate::digest::DigestReader::new(file));
    let compression = match layer.compression {
        Compression::Detect => sniff(buffered.fill_buf().map_err(read_err)?)?,
        known => known,
    };
    let decoded = match compression {
        Compression::Gzip => Decoded::Gzip(MultiGzDecoder::new(buffered)),
        Compression::None | Compression::Detect => Decoded::Plain(buffered),
    };
    let counted = BudgetReader::new(crate::digest::DigestReader::new(decoded), budget);
    let too_large = || ImageError::TooLarge {
        limit: budget.limit(),
    };
    let mut counted = match root.apply_layer(counted) {
        Ok(reader) => reader,
        Err(_) if budget.exceeded() => return Err(too_large()),
        Err(e) => return Err(e.into()),
    };
    // The tar parser stops at the end-of-archive blocks; the rest still counts and is hashed.
    io::copy(&mut counted, &mut io::sink()).map_err(|e| {
        if budget.exceeded() {
            too_large()
        } else {
            read_err(e)
        }
    })?;
    let (decoded, diff_id, _) = counted.into_inner().finish().map_err(read_err)?;
    let (_, blob_digest, _) = decoded
        .into_inner()
        .into_inner()
        .finish()
        .map_err(read_err)?;
    if let Some(expected) = layer.blob_digest.filter(|d| *d != blob_digest) {
        return Err(SourceError::DigestMismatch {
            path: path.clone(),
            expected,
            actual: blob_digest,
        }
        .into());
    }
    if diff_id != layer.diff_id {
        return Err(SourceError::DigestMismatch {
            path: format!("{path} (uncompressed)"),
            expected: layer.diff_id,
            actual: diff_id,
        }
        .into());
    }
    Ok(())
}
