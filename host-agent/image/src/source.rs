//! Reading an image source: a `docker save` tarball, an OCI image layout directory, or a tar of
//! an OCI image layout, told apart by what they hold (`index.json` makes an OCI layout, else
//! `manifest.json` a docker archive). A gzip-compressed tarball is decompressed to scratch
//! first, within the size limit.
//!
//! [`ImageSource::open`] reads and verifies the JSON documents (index, manifest, config: each
//! checked against its descriptor's sha256 and size) and returns an [`ImagePlan`]: the image
//! config and, in order, the layers to apply with the digests they must have. The layer bytes
//! are read later, by the importer, through [`ImageSource::open_file`].
//!
//! A tar source is not extracted: its members are indexed once (name to offset and size, and
//! the symlinks old `docker save` writes for shared layers) and read in place.
//!
//! Docker archives carry no layer descriptors: a layer there is checked against the config's
//! `rootfs.diff_ids` (the digest of the uncompressed tar), and against its file name too when
//! that is `blobs/sha256/<hex>`; its compression is told by its magic bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::ImageConfig;
use crate::digest::Digest;
use crate::limits::{Budget, BudgetReader, ImportLimits};

/// Media types, and the platform images must be for.
pub mod media {
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI layer, uncompressed.
    pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
    /// OCI layer, gzip.
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image manifest (schema 2).
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker layer, uncompressed.
    pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
    /// Docker layer, gzip.
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// What a docker-archive layer is called when its magic bytes say zstd.
    pub const DETECTED_ZSTD: &str = "application/vnd.docker.image.rootfs.diff.tar.zstd";
    /// The only OS accepted.
    pub const OS: &str = "linux";
    /// The only architecture accepted (the VMM runs x86_64 guests).
    pub const ARCHITECTURE: &str = "amd64";
}

/// Gzip's magic bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// Zstandard's magic bytes.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Most nested indexes followed.
const MAX_INDEX_DEPTH: usize = 4;
/// Most symlinks followed when opening a member of a tar source.
const MAX_LINK_HOPS: usize = 16;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The source path cannot be inspected or opened.
    #[error("opening image source {path:?}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading the source tarball's member list failed.
    #[error("reading the image tarball {path:?}")]
    IndexTar {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Decompressing a gzip-compressed source tarball failed.
    #[error("decompressing the image tarball {path:?}")]
    Decompress {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The source has neither `index.json` nor `manifest.json`.
    #[error("{path:?} is neither an OCI image layout nor a docker-save archive")]
    NotAnImage { path: PathBuf },
    /// A file the image refers to is not in the source.
    #[error("missing blob {path:?}")]
    MissingBlob { path: String },
    /// Reading a file of the source failed.
    #[error("reading {path:?} of the image")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    /// A JSON document is larger than the limit.
    #[error("{path:?} is larger than {limit} bytes")]
    JsonTooLarge { path: String, limit: u64 },
    /// A JSON document does not parse.
    #[error("parsing {path:?}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// A blob's sha256 is not the one its descriptor names.
    #[error("digest mismatch in {path:?}: expected {expected}, got {actual}")]
    DigestMismatch {
        path: String,
        expected: Digest,
        actual: Digest,
    },
    /// A blob's size is not the one its descriptor names.
    #[error("size mismatch in {path:?}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        path: String,
        expected: u64,
        actual: u64,
    },
    /// A media type this importer does not handle.
    #[error("unsupported media type {media_type:?}")]
    UnsupportedMediaType { media_type: String },
    /// The index lists no image for linux/amd64.
    #[error("the image index has no linux/amd64 image")]
    NoImage,
    /// The source holds several images and none can be chosen.
    #[error("the source holds {count} images; import one at a time")]
    SeveralImages { count: usize },
    /// Indexes nest deeper than followed.
    #[error("image indexes nest deeper than {MAX_INDEX_DEPTH}")]
    IndexTooDeep,
    /// The config is for another platform.
    #[error("image is for {os}/{architecture}, not linux/amd64")]
    WrongPlatform { os: String, architecture: String },
    /// The config's `rootfs.diff_ids` and the manifest's layers differ in number.
    #[error("config lists {diff_ids} layer digests but the manifest has {layers} layers")]
    LayerCountMismatch { diff_ids: usize, layers: usize },
    /// A docker archive's config path does not name its digest.
    #[error("docker archive config {path:?} does not name its digest")]
    ConfigNotNamedByDigest { path: String },
    /// A path in a docker manifest is absolute or has `..`.
    #[error("docker manifest path {path:?} is not a plain relative path")]
    BadPath { path: String },
    /// Something in the source is larger than the import limit.
    #[error("image source is larger than {limit} bytes")]
    TooLarge { limit: u64 },
}

/// What kind of source an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// An OCI image layout directory.
    OciDir,
    /// A tar of an OCI image layout.
    OciArchive,
    /// A `docker save` tarball.
    DockerArchive,
}

/// How a layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// Told by the magic bytes (docker archives).
    Detect,
}

/// One layer to apply.
#[derive(Debug, Clone)]
pub struct LayerPlan {
    /// Path of the layer file inside the source.
    pub path: String,
    /// Its media type (as listed, or as docker archives imply).
    pub media_type: String,
    /// How it is compressed.
    pub compression: Compression,
    /// The digest of the file itself, when known.
    pub blob_digest: Option<Digest>,
    /// The size of the file itself, when known.
    pub blob_size: Option<u64>,
    /// The digest of the uncompressed tar (`rootfs.diff_ids`).
    pub diff_id: Digest,
}

/// A verified image: what to apply, and what to record.
#[derive(Debug)]
pub struct ImagePlan {
    /// What the source was.
    pub kind: SourceKind,
    /// The digest of the image config: the image's identity (docker's image ID).
    pub config_digest: Digest,
    /// The digest of the manifest (OCI sources).
    pub manifest_digest: Option<Digest>,
    /// The process settings.
    pub config: ImageConfig,
    /// The layers, lowest first.
    pub layers: Vec<LayerPlan>,
}

/// An opened source.
#[derive(Debug)]
pub struct ImageSource {
    files: Files,
    path: PathBuf,
}

#[derive(Debug)]
enum Files {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        members: HashMap<String, Member>,
    },
}

#[derive(Debug, Clone)]
enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<Digest>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
    #[serde(default)]
    layer_sources: Option<HashMap<Digest, Descriptor>>,
}

impl ImageSource {
    /// Opens `path` (a directory or a tarball, possibly gzip-compressed). A compressed tarball
    /// is decompressed into `scratch`, a private directory, within `limits.max_bytes`.
    pub fn open(path: &Path, scratch: &Path, limits: &ImportLimits) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if meta.is_dir() {
            return Ok(Self {
                files: Files::Dir(path.to_owned()),
                path: path.to_owned(),
            });
        }
        let mut file = File::open(path).map_err(open_err)?;
        let mut magic = [0u8; 2];
        let is_gzip = file.read_exact(&mut magic).is_ok() && magic == GZIP_MAGIC;
        let tar_path = if is_gzip {
            let out = scratch.join("source.tar");
            decompress(path, &out, limits.max_bytes)?;
            out
        } else {
            path.to_owned()
        };
        let members = index_tar(&tar_path, limits.max_entries)?;
        Ok(Self {
            files: Files::Tar {
                file: tar_path,
                members,
            },
            path: path.to_owned(),
        })
    }

    /// Reads the index or manifest and the config, verifying each, and plans the layers.
    pub fn plan(&self, limits: &ImportLimits) -> Result<ImagePlan, SourceError> {
        let oci = self.files.exists("index.json");
        if oci {
            self.plan_oci(limits)
        } else if self.files.exists("manifest.json") {
            self.plan_docker(limits)
        } else {
            Err(SourceError::NotAnImage {
                path: self.path.clone(),
            })
        }
    }

    /// Opens a file of the source by its path inside it; returns the reader and its size.
    pub fn open_file(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), SourceError> {
        self.files.open(path)
    }

    fn plan_oci(&self, limits: &ImportLimits) -> Result<ImagePlan, SourceError> {
        let kind = match self.files {
            Files::Dir(_) => SourceKind::OciDir,
            Files::Tar { .. } => SourceKind::OciArchive,
        };
        let (index, _): (Index, _) = self.read_json("index.json", None, limits)?;
        let mut manifests = index.manifests;
        let mut depth = 0;
        let manifest_desc = loop {
            let chosen = choose_manifest(manifests)?;
            match chosen.media_type.as_str() {
                media::OCI_MANIFEST | media::DOCKER_MANIFEST => break chosen,
                media::OCI_INDEX | media::DOCKER_LIST => {
                    depth += 1;
                    if depth > MAX_INDEX_DEPTH {
                        return Err(SourceError::IndexTooDeep);
                    }
                    let (nested, _): (Index, _) =
                        self.read_json(&blob_path(&chosen.digest), Some(&chosen), limits)?;
                    manifests = nested.manifests;
                }
                other => {
                    return Err(SourceError::UnsupportedMediaType {
                        media_type: other.to_owned(),
                    });
                }
            }
        };
        let (manifest, manifest_digest): (Manifest, _) = self.read_json(
            &blob_path(&manifest_desc.digest),
            Some(&manifest_desc),
            limits,
        )?;
        if !matches!(
            manifest.config.media_type.as_str(),
            media::OCI_CONFIG | media::DOCKER_CONFIG
        ) {
            return Err(SourceError::UnsupportedMediaType {
                media_type: manifest.config.media_type.clone(),
            });
        }
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for desc in &manifest.layers {
            let compression = match desc.media_type.as_str() {
                media::OCI_LAYER_TAR | media::DOCKER_LAYER_TAR => Compression::None,
                media::OCI_LAYER_GZIP | media::DOCKER_LAYER_GZIP => Compression::Gzip,
                other => {
                    return Err(SourceError::UnsupportedMediaType {
                        media_type: other.to_owned(),
                    });
                }
            };
            layers.push((desc, compression));
        }
        let config_path = blob_path(&manifest.config.digest);
        let (config_file, config_digest): (ConfigFile, _) =
            self.read_json(&config_path, Some(&manifest.config), limits)?;
        let diff_ids = check_config(&config_file, layers.len())?;
        let layers = layers
            .into_iter()
            .zip(diff_ids)
            .map(|((desc, compression), diff_id)| LayerPlan {
                path: blob_path(&desc.digest),
                media_type: desc.media_type.clone(),
                compression,
                blob_digest: Some(desc.digest),
                blob_size: Some(desc.size),
                diff_id,
            })
            .collect();
        Ok(ImagePlan {
            kind,
            config_digest,
            manifest_digest: Some(manifest_digest),
            config: config_file.config.unwrap_or_default(),
            layers,
        })
    }

    fn plan_docker(&self, limits: &ImportLimits) -> Result<ImagePlan, SourceError> {
        let (entries, _): (Vec<DockerEntry>, _) = self.read_json("manifest.json", None, limits)?;
        let entry = match <[DockerEntry; 1]>::try_from(entries) {
            Ok([entry]) => entry,
            Err(entries) if entries.is_empty() => return Err(SourceError::NoImage),
            Err(entries) => {
                return Err(SourceError::SeveralImages {
                    count: entries.len(),
                });
            }
        };
        let config_path = plain_path(&entry.config)?;
        let config_digest =
            digest_in_name(&config_path).ok_or_else(|| SourceError::ConfigNotNamedByDigest {
                path: entry.config.clone(),
            })?;
        let (config_file, _): (ConfigFile, _) =
            self.read_json_checked(&config_path, Some((&config_digest, None)), limits)?;
        let diff_ids = check_config(&config_file, entry.layers.len())?;
        let sources = entry.layer_sources.unwrap_or_default();
        let mut layers = Vec::with_capacity(entry.layers.len());
        for (path, diff_id) in entry.layers.iter().zip(diff_ids) {
            let path = plain_path(path)?;
            let (media_type, compression) = match sources.get(&diff_id) {
                None => (media::DOCKER_LAYER_TAR.to_owned(), Compression::Detect),
                Some(desc) => match desc.media_type.as_str() {
                    media::OCI_LAYER_TAR
                    | media::DOCKER_LAYER_TAR
                    | media::OCI_LAYER_GZIP
                    | media::DOCKER_LAYER_GZIP => (desc.media_type.clone(), Compression::Detect),
                    other => {
                        return Err(SourceError::UnsupportedMediaType {
                            media_type: other.to_owned(),
                        });
                    }
                },
            };
            layers.push(LayerPlan {
                blob_digest: digest_in_name(&path).filter(|_| path.starts_with("blobs/")),
                blob_size: None,
                path,
                media_type,
                compression,
                diff_id,
            });
        }
        Ok(ImagePlan {
            kind: SourceKind::DockerArchive,
            config_digest,
            manifest_digest: None,
            config: config_file.config.unwrap_or_default(),
            layers,
        })
    }

    fn read_json<T: DeserializeOwned>(
        &self,
        path: &str,
        desc: Option<&Descriptor>,
        limits: &ImportLimits,
    ) -> Result<(T, Digest), SourceError> {
        self.read_json_checked(path, desc.map(|d| (&d.digest, Some(d.size))), limits)
    }

    /// Reads a JSON document of at most `limits.max_json_bytes`, checking its digest and size
    /// when given, and parses it.
    fn read_json_checked<T: DeserializeOwned>(
        &self,
        path: &str,
        expected: Option<(&Digest, Option<u64>)>,
        limits: &ImportLimits,
    ) -> Result<(T, Digest), SourceError> {
        let (reader, size) = self.files.open(path)?;
        if size > limits.max_json_bytes {
            return Err(SourceError::JsonTooLarge {
                path: path.to_owned(),
                limit: limits.max_json_bytes,
            });
        }
        let mut bytes = Vec::new();
        reader
            .take(limits.max_json_bytes)
            .read_to_end(&mut bytes)
            .map_err(|source| SourceError::Read {
                path: path.to_owned(),
                source,
            })?;
        let actual = Digest::of(&bytes);
        if let Some((digest, size)) = expected {
            if let Some(size) = size.filter(|&s| s != bytes.len() as u64) {
                return Err(SourceError::SizeMismatch {
                    path: path.to_owned(),
                    expected: size,
                    actual: bytes.len() as u64,
                });
            }
            if *digest != actual {
                return Err(SourceError::DigestMismatch {
                    path: path.to_owned(),
                    expected: *digest,
                    actual,
                });
            }
        }
        let value = serde_json::from_slice(&bytes).map_err(|source| SourceError::Parse {
            path: path.to_owned(),
            source,
        })?;
        Ok((value, actual))
    }
}

impl Files {
    fn exists(&self, path: &str) -> bool {
        match self {
            Files::Dir(root) => plain_path(path).is_ok_and(|p| root.join(p).is_file()),
            Files::Tar { members, .. } => resolve_member(members, path).is_some(),
        }
    }

    fn open(&self, path: &str) -> Result<(Box<dyn Read + '_>, u64), SourceError> {
        let missing = || SourceError::MissingBlob {
            path: path.to_owned(),
        };
        let read_err = |source| SourceError::Read {
            path: path.to_owned(),
            source,
        };
        match self {
            Files::Dir(root) => {
                let rel = plain_path(path)?;
                let file = match File::open(root.join(rel)) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                    Err(e) => return Err(read_err(e)),
                };
                let meta = file.metadata().map_err(read_err)?;
                if !meta.is_file() {
                    return Err(missing());
                }
                Ok((Box::new(file), meta.len()))
            }
            Files::Tar { file, members } => {
                let (offset, size) = resolve_member(members, path).ok_or_else(missing)?;
                let mut f = File::open(file).map_err(read_err)?;
                f.seek(SeekFrom::Start(offset)).map_err(read_err)?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }
}

/// Picks the one linux/amd64 (or platform-less) manifest of an index.
fn choose_manifest(manifests: Vec<Descriptor>) -> Result<Descriptor, SourceError> {
    let mut fitting: Vec<Descriptor> = manifests
        .into_iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_none_or(|p| p.os == media::OS && p.architecture == media::ARCHITECTURE)
        })
        .collect();
    match fitting.len() {
        0 => Err(SourceError::NoImage),
        1 => Ok(fitting.remove(0)),
        count => Err(SourceError::SeveralImages { count }),
    }
}

/// Checks the config's platform and layer count; returns its diff IDs.
fn check_config(config: &ConfigFile, layers: usize) -> Result<Vec<Digest>, SourceError> {
    let os_ok = config.os.is_empty() || config.os == media::OS;
    let arch_ok = config.architecture.is_empty() || config.architecture == media::ARCHITECTURE;
    if !os_ok || !arch_ok {
        return Err(SourceError::WrongPlatform {
            os: config.os.clone(),
            architecture: config.architecture.clone(),
        });
    }
    if config.rootfs.diff_ids.len() != layers {
        return Err(SourceError::LayerCountMismatch {
            diff_ids: config.rootfs.diff_ids.len(),
            layers,
        });
    }
    Ok(config.rootfs.diff_ids.clone())
}

/// `blobs/sha256/<hex>`.
pub fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

/// The digest a docker-archive file name carries: `<hex>.json` or `blobs/sha256/<hex>`.
fn digest_in_name(path: &str) -> Option<Digest> {
    if let Some(hex) = path.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(hex).ok();
    }
    let name = path.rsplit('/').next()?;
    Digest::from_hex(name.strip_suffix(".json")?).ok()
}

/// Normalizes a path inside the source to `a/b/c`, refusing absolute paths and `..`.
fn plain_path(path: &str) -> Result<String, SourceError> {
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| SourceError::BadPath {
                path: path.to_owned(),
            })?),
            Component::CurDir => {}
            _ => {
                return Err(SourceError::BadPath {
                    path: path.to_owned(),
                });
            }
        }
    }
    if parts.is_empty() {
        return Err(SourceError::BadPath {
            path: path.to_owned(),
        });
    }
    Ok(parts.join("/"))
}

/// Normalizes `path` lexically (`..` pops), or `None` if it climbs above the top.
fn normalize_lexically(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

fn resolve_member(members: &HashMap<String, Member>, path: &str) -> Option<(u64, u64)> {
    let mut name = normalize_lexically(path)?;
    for _ in 0..MAX_LINK_HOPS {
        match members.get(&name)? {
            Member::File { offset, size } => return Some((*offset, *size)),
            Member::Link(target) => name = target.clone(),
        }
    }
    None
}

/// Lists a tarball's regular files (with where their data starts) and links.
fn index_tar(path: &Path, max_entries: u64) -> Result<HashMap<String, Member>, SourceError> {
    let tar_err = |source| SourceError::IndexTar {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(|source| SourceError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut archive = tar::Archive::new(file);
    let mut members = HashMap::new();
    for (count, entry) in archive.entries_with_seek().map_err(tar_err)?.enumerate() {
        if count as u64 >= max_entries {
            return Err(SourceError::TooLarge { limit: max_entries });
        }
        let entry = entry.map_err(tar_err)?;
        let Ok(name) = entry.path() else { continue };
        let Some(name) = name.to_str().and_then(normalize_lexically) else {
            continue;
        };
        let link = || {
            entry
                .link_name()
                .ok()
                .flatten()
                .and_then(|l| l.to_str().map(str::to_owned))
        };
        let member = match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => Member::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
            tar::EntryType::Link => match link().and_then(|l| normalize_lexically(&l)) {
                Some(target) => Member::Link(target),
                None => continue,
            },
            tar::EntryType::Symlink => {
                let parent = name.rsplit_once('/').map_or("", |(dir, _)| dir);
                match link().filter(|l| !l.starts_with('/')) {
                    Some(l) => match normalize_lexically(&format!("{parent}/{l}")) {
                        Some(target) => Member::Link(target),
                        None => continue,
                    },
                    None => continue,
                }
            }
            _ => continue,
        };
        members.insert(name, member);
    }
    Ok(members)
}

/// Decompresses a gzip-compressed tarball to `out`, at most `limit` bytes.
fn decompress(path: &Path, out: &Path, limit: u64) -> Result<(), SourceError> {
    let open_err = |source| SourceError::Open {
        path: path.to_owned(),
        source,
    };
    let input = File::open(path).map_err(open_err)?;
    let mut output = File::create(out).map_err(open_err)?;
    let budget = Budget::new(limit);
    let mut reader = BudgetReader::new(
        flate2::read::MultiGzDecoder::new(BufReader::new(input)),
        &budget,
    );
    io::copy(&mut reader, &mut output).map_err(|source| {
        if budget.exceeded() {
            SourceError::TooLarge { limit }
        } else {
            SourceError::Decompress {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    Ok(())
}

/// Tells a docker-archive layer's compression from its first bytes.
pub fn sniff(head: &[u8]) -> Result<Compression, SourceError> {
    if head.starts_with(&GZIP_MAGIC) {
        Ok(Compression::Gzip)
    } else if head.starts_with(&ZSTD_MAGIC) {
        Err(SourceError::UnsupportedMediaType {
            media_type: media::DETECTED_ZSTD.to_owned(),
        })
    } else {
        Ok(Compression::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_normalization_never_climbs_out() {
        assert_eq!(normalize_lexically("./a/b/../c").as_deref(), Some("a/c"));
        assert_eq!(normalize_lexically("a/../..").as_deref(), None);
    }

    #[test]
    fn docker_names_carry_digests() {
        let d = Digest::of(b"x");
        assert_eq!(digest_in_name(&format!("{}.json", d.hex())), Some(d));
        assert_eq!(digest_in_name(&blob_path(&d)), Some(d));
        assert_eq!(digest_in_name("config.json"), None);
    }

    #[test]
    fn plain_paths_refuse_escapes() {
        assert_eq!(plain_path("./a//b").unwrap(), "a/b");
        for bad in ["/etc/passwd", "../x", "a/../../x", ""] {
            assert!(
                matches!(plain_path(bad), Err(SourceError::BadPath { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn sniffs_compression() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8]).unwrap(), Compression::Gzip);
        assert_eq!(sniff(b"etc/\0\0").unwrap(), Compression::None);
        assert!(matches!(
            sniff(&[0x28, 0xb5, 0x2f, 0xfd]),
            Err(SourceError::UnsupportedMediaType { .. })
        ));
    }
}
