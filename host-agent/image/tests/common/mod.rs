//! Test fixtures: layer tarballs built entry by entry with the `tar` crate (including entries
//! no honest tool writes), and images made of them, written as an OCI layout directory, a tar
//! of one, or a `docker save` tarball.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use nanoclaw_image::Digest;
use serde_json::{Value, json};

pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A layer tarball under construction.
pub struct LayerBuilder {
    builder: tar::Builder<Vec<u8>>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    /// Appends with the name written into the header as given (no checks), so `..` and
    /// absolute paths can be made.
    fn append_raw(&mut self, mut h: tar::Header, path: &str, data: &[u8]) {
        let name = &mut h.as_old_mut().name;
        assert!(path.len() < name.len(), "raw paths must fit the header");
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
    }

    pub fn dir(mut self, path: &str) -> Self {
        self.append_raw(
            Self::header(tar::EntryType::Directory, 0o755, 0, 0, 1000),
            path,
            b"",
        );
        self
    }

    pub fn dir_owned(mut self, path: &str, mode: u32, uid: u64, gid: u64, mtime: u64) -> Self {
        self.append_raw(
            Self::header(tar::EntryType::Directory, mode, uid, gid, mtime),
            path,
            b"",
        );
        self
    }

    pub fn file(self, path: &str, data: &[u8]) -> Self {
        self.file_owned(path, data, 0o644, 0, 0, 1000)
    }

    pub fn file_owned(
        mut self,
        path: &str,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> Self {
        self.append_raw(
            Self::header(tar::EntryType::Regular, mode, uid, gid, mtime),
            path,
            data,
        );
        self
    }

    fn link(mut self, kind: tar::EntryType, path: &str, target: &str, uid: u64) -> Self {
        let mut h = Self::header(kind, 0o777, uid, uid, 1000);
        h.set_link_name_literal(target).unwrap();
        self.append_raw(h, path, b"");
        self
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, path, target, 0)
    }

    pub fn symlink_owned(self, path: &str, target: &str, uid: u64) -> Self {
        self.link(tar::EntryType::Symlink, path, target, uid)
    }

    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.link(tar::EntryType::Link, path, target, 0)
    }

    pub fn char_device(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Char, 0o666, 0, 0, 1000);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        self.append_raw(h, path, b"");
        self
    }

    /// `.wh.NAME` next to `path`.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, b"")
    }

    /// `DIR/.wh..wh..opq`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), b"")
    }

    pub fn build(self) -> Vec<u8> {
        self.builder.into_inner().unwrap()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// One layer of a test image.
#[derive(Clone)]
pub struct TestLayer {
    /// The uncompressed tar.
    pub tar: Vec<u8>,
    /// Whether the blob is gzip-compressed.
    pub gzip: bool,
    /// A media type to list instead of the right one.
    pub media_type: Option<String>,
}

impl TestLayer {
    pub fn plain(tar: Vec<u8>) -> Self {
        Self {
            tar,
            gzip: false,
            media_type: None,
        }
    }

    pub fn gzipped(tar: Vec<u8>) -> Self {
        Self {
            tar,
            gzip: true,
            media_type: None,
        }
    }

    pub fn blob(&self) -> Vec<u8> {
        if self.gzip {
            gzip(&self.tar)
        } else {
            self.tar.clone()
        }
    }

    fn media_type(&self) -> String {
        self.media_type.clone().unwrap_or_else(|| {
            if self.gzip {
                OCI_LAYER_GZIP
            } else {
                OCI_LAYER_TAR
            }
            .to_owned()
        })
    }
}

/// A test image: layers and the process config.
#[derive(Clone)]
pub struct TestImage {
    pub layers: Vec<TestLayer>,
    pub process: Value,
    /// Diff IDs to list instead of the right ones.
    pub diff_ids: Option<Vec<String>>,
}

impl TestImage {
    pub fn new(layers: Vec<TestLayer>) -> Self {
        Self {
            layers,
            process: json!({
                "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
                "WorkingDir": "/srv",
                "User": "1000:1000",
                "Entrypoint": ["/bin/tool"],
                "Cmd": ["--serve", "8080"],
            }),
            diff_ids: None,
        }
    }

    /// The config JSON bytes; its digest is the image's identity.
    pub fn config_bytes(&self) -> Vec<u8> {
        let diff_ids: Vec<String> = self.diff_ids.clone().unwrap_or_else(|| {
            self.layers
                .iter()
                .map(|l| Digest::of(&l.tar).to_string())
                .collect()
        });
        serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": self.process,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap()
    }

    pub fn config_digest(&self) -> Digest {
        Digest::of(&self.config_bytes())
    }

    /// The files of an OCI layout, by path.
    pub fn oci_files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        let mut blob = |bytes: Vec<u8>| -> (Digest, usize) {
            let d = Digest::of(&bytes);
            let len = bytes.len();
            files.insert(format!("blobs/sha256/{}", d.hex()), bytes);
            (d, len)
        };
        let (config_digest, config_len) = blob(self.config_bytes());
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|l| {
                let (d, len) = blob(l.blob());
                json!({"mediaType": l.media_type(), "digest": d.to_string(), "size": len})
            })
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(),
                "size": config_len,
            },
            "layers": layers,
        }))
        .unwrap();
        let (manifest_digest, manifest_len) = blob(manifest);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest.to_string(),
                "size": manifest_len,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }],
        });
        files.insert("index.json".into(), serde_json::to_vec(&index).unwrap());
        files.insert(
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        );
        files
    }

    /// The files of an old-style `docker save` archive (`<id>/layer.tar`, `<hex>.json`).
    pub fn docker_files(&self) -> BTreeMap<String, Vec<u8>> {
        let mut files = BTreeMap::new();
        let config_name = format!("{}.json", self.config_digest().hex());
        files.insert(config_name.clone(), self.config_bytes());
        let mut layer_paths = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let id = Digest::of(format!("layer-id-{i}").as_bytes()).hex();
            let path = format!("{id}/layer.tar");
            files.insert(path.clone(), l.blob());
            files.insert(format!("{id}/VERSION"), b"1.0".to_vec());
            layer_paths.push(path);
        }
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": ["test:latest"],
            "Layers": layer_paths,
        }]);
        files.insert(
            "manifest.json".into(),
            serde_json::to_vec(&manifest).unwrap(),
        );
        files
    }

    pub fn write_oci_dir(&self, dir: &Path) {
        write_files(dir, &self.oci_files());
    }

    pub fn write_oci_tar(&self, path: &Path) {
        write_tar(path, &self.oci_files());
    }

    pub fn write_docker_tar(&self, path: &Path) {
        write_tar(path, &self.docker_files());
    }
}

pub fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) {
    for (name, bytes) in files {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }
}

pub fn write_tar(path: &Path, files: &BTreeMap<String, Vec<u8>>) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, bytes) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, &bytes[..]).unwrap();
    }
    b.finish().unwrap();
}

/// Every path under `root` with its type, mode, owner, size, mtime and link target: a tree
/// in a form two imports can be compared by.
pub fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir".to_owned()
        } else if ft.is_symlink() {
            format!("link->{}", fs::read_link(&path).unwrap().display())
        } else {
            format!("file({})", meta.len())
        };
        let desc = format!(
            "{kind} {:o} {}:{} {} nlink={}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            meta.mtime(),
            if ft.is_dir() { 0 } else { meta.nlink() },
        );
        out.insert(rel.display().to_string(), desc);
        if ft.is_dir() {
            for e in fs::read_dir(&path).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    out
}

/// Every path under `root` (for before/after comparisons of the store).
pub fn list_dir(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = describe_tree(root)
        .into_iter()
        .filter(|(p, _)| !p.ends_with("lock"))
        .map(|(p, d)| format!("{p} {}", d.split(' ').next().unwrap_or("")))
        .collect();
    out.sort();
    out
}
