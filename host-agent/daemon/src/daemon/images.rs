//! Images in the daemon: the `/v1/images` routes over the image store ([`nanoclaw_image`]), and
//! what a VM created with an image gets: its command, environment, working directory and user
//! from the image's config, the image's disk read-only and a writable disk of its own.
//!
//! The store does the work (it refuses hostile archives and writes nothing on an error); these
//! handlers run it on blocking threads and turn its errors into answers.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use nanoclaw_api::{BuildImage, BuildProgress, CreateVm, ImageInfo, ImportImage};
use nanoclaw_image::{DebianRecipe, ImageStore, ImportLimits, StoreError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Daemon;
use super::routes::{Failure, streaming};
use crate::error_chain;

/// The writable disk's file name in the VM directory.
pub const SCRATCH_DISK_FILE: &str = "scratch.ext4";
/// The guest device of the image disk (the VMM's first disk).
pub const IMAGE_DEVICE: &str = "/dev/vda";
/// The guest device of the writable disk (the VMM's second disk).
pub const SCRATCH_DEVICE: &str = "/dev/vdb";

/// What a VM created with an image records: the disks its VMM gets, the user to resolve in the
/// image, and which image it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmImage {
    /// The image's name when the VM was created.
    pub name: String,
    /// Its digest.
    pub digest: String,
    /// The read-only root disk.
    pub rootfs: PathBuf,
    /// The VM's writable disk.
    pub scratch: PathBuf,
    /// The user the sidecar resolves in the image, if any.
    pub user: Option<String>,
}

/// Fills the parts of `spec` that the image gives and makes the VM's writable disk in `vm_dir`.
/// The returned spec is what the agent runs; the returned [`VmImage`] is what the VMM attaches.
pub fn resolve(
    store: &ImageStore,
    mut spec: CreateVm,
    vm_dir: &FsPath,
) -> Result<(CreateVm, VmImage), String> {
    let Some(name) = spec.image.clone() else {
        return Err("no image named".into());
    };
    let info = store.inspect(&name).map_err(|e| error_chain(&e))?;
    let config = &info.config;
    if spec.command.is_empty() {
        let mut argv = config.entrypoint.clone();
        if spec.args.is_empty() {
            argv.extend(config.cmd.iter().cloned());
        } else {
            argv.append(&mut spec.args);
        }
        let mut argv = argv.into_iter();
        spec.command = argv.next().ok_or_else(|| {
            format!("image {name} has no Entrypoint or Cmd: give the command to run")
        })?;
        spec.args = argv.collect();
    }
    let mut env: Vec<(String, String)> = config
        .env
        .iter()
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .filter(|(k, _)| !spec.env.iter().any(|(name, _)| name == k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    env.append(&mut spec.env);
    spec.env = env;
    if spec.cwd.is_empty() {
        spec.cwd = if config.working_dir.is_empty() {
            "/".to_owned()
        } else {
            config.working_dir.clone()
        };
    }
    let user = spec.user.clone().or_else(|| {
        let u = config.user.trim();
        (!u.is_empty()).then(|| u.to_owned())
    });
    let scratch = vm_dir.join(SCRATCH_DISK_FILE);
    let size = spec.disk_size_mib.saturating_mul(1 << 20);
    match spec.copy_in_tar.take() {
        None => nanoclaw_image::create_scratch_disk(&scratch, size),
        Some(b64) => {
            let staged = stage_copy_in(&b64, vm_dir)?;
            let made = nanoclaw_image::create_scratch_disk_with(&scratch, size, Some(&staged));
            let _ = std::fs::remove_dir_all(&staged);
            made
        }
    }
    .map_err(|e| error_chain(&e))?;
    Ok((
        spec,
        VmImage {
            name,
            digest: info.digest.to_string(),
            rootfs: info.rootfs,
            scratch,
            user,
        },
    ))
}

/// Most entries a copy-in tar may hold.
const MAX_COPY_IN_ENTRIES: u64 = 100_000;
/// The folder under the VM directory where copied-in files are laid out before they go onto the
/// writable disk, and the overlay's upper folder inside it.
const COPY_IN_DIR: &str = "copy-in";

/// Unpacks a create request's copy-in tar into `<vm-dir>/copy-in/upper/` with the image
/// store's layer rules (no `..`, no absolute paths, no writes through symlinks, no device
/// nodes, bounded), and returns `<vm-dir>/copy-in`, the writable disk's initial contents.
fn stage_copy_in(b64: &str, vm_dir: &FsPath) -> Result<PathBuf, String> {
    use base64::Engine as _;
    if b64.len() / 4 * 3 > nanoclaw_api::MAX_COPY_IN_BYTES + 3 {
        return Err(format!(
            "the files to copy in are over {} MiB: copy them with `nanoclaw cp` once the VM runs",
            nanoclaw_api::MAX_COPY_IN_BYTES >> 20
        ));
    }
    let tar = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("copy-in tar: bad base64: {e}"))?;
    let staged = vm_dir.join(COPY_IN_DIR);
    let upper = staged.join("upper");
    std::fs::create_dir_all(&upper).map_err(|e| format!("{}: {e}", upper.display()))?;
    let mut tree = nanoclaw_image::layer::RootTree::new(&upper, MAX_COPY_IN_ENTRIES, 0);
    let applied = tree
        .apply_layer(tar.as_slice())
        .and_then(|_| tree.finish())
        .map_err(|e| format!("copy-in: {}", error_chain(&e)));
    if let Err(why) = applied {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(why);
    }
    Ok(staged)
}

fn store_failure(e: StoreError) -> Failure {
    let status = match e {
        StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
        StoreError::Name(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure(status, error_chain(&e))
}

/// Runs `f` on a blocking thread: the store does file I/O and runs tools.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// `GET /v1/images`.
pub async fn list(State(daemon): State<Arc<Daemon>>) -> Result<Json<Vec<ImageInfo>>, Failure> {
    let store = daemon.images().clone();
    blocking(move || store.list().map_err(store_failure))
        .await
        .map(Json)
}

/// `GET /v1/images/{name}`.
pub async fn inspect(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<Json<ImageInfo>, Failure> {
    let store = daemon.images().clone();
    blocking(move || store.inspect(&name).map_err(store_failure))
        .await
        .map(Json)
}

/// `DELETE /v1/images/{name}`.
pub async fn remove(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    let store = daemon.images().clone();
    blocking(move || store.remove(&name).map_err(store_failure)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/images/import`.
pub async fn import(
    State(daemon): State<Arc<Daemon>>,
    body: Result<Json<ImportImage>, JsonRejection>,
) -> Result<Json<ImageInfo>, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let store = daemon.images().clone();
    blocking(move || {
        nanoclaw_image::import(
            &store,
            &req.name,
            FsPath::new(&req.source),
            &ImportLimits::default(),
        )
        .map_err(|e| {
            let line = error_chain(&e);
            tracing::warn!(name = %req.name, error = %line, "image import refused");
            Failure(StatusCode::UNPROCESSABLE_ENTITY, line)
        })
    })
    .await
    .map(Json)
}

/// `POST /v1/images/build`: progress lines as they come, then the outcome.
pub async fn build(
    State(daemon): State<Arc<Daemon>>,
    body: Result<Json<BuildImage>, JsonRejection>,
) -> Result<Response, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut recipe = DebianRecipe::new(&req.suite);
    recipe.packages = req.packages;
    recipe.pip_packages = req.pip;
    if let Some(mirror) = req.mirror {
        recipe.mirror = mirror;
    }
    let store = daemon.images().clone();
    let (tx, rx) = mpsc::channel(64);
    let send = move |p: &BuildProgress| {
        let mut line = serde_json::to_vec(p).unwrap_or_default();
        line.push(b'\n');
        // A client that went away stops nothing: the build finishes and is cached.
        let _ = tx.blocking_send(Ok(Bytes::from(line)));
    };
    tokio::task::spawn_blocking(move || {
        let outcome = nanoclaw_image::build_debian(&store, &req.name, &recipe, |line| {
            send(&BuildProgress::Line(line.to_owned()));
        });
        match outcome {
            Ok(info) => send(&BuildProgress::Done(Box::new(info))),
            Err(e) => {
                let line = error_chain(&e);
                tracing::warn!(name = %req.name, error = %line, "image build failed");
                send(&BuildProgress::Failed(line));
            }
        }
    });
    Ok(streaming("application/x-ndjson", rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store holding image `app` with `config` (its disk is a small placeholder file: the
    /// daemon only hands the disk's path on).
    fn store_with(config: nanoclaw_image::ImageConfig) -> (tempfile::TempDir, ImageStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        let staging = store.staging().unwrap();
        std::fs::create_dir(staging.blob()).unwrap();
        std::fs::write(staging.rootfs(), [0u8; 4096]).unwrap();
        let meta = nanoclaw_image::ImageMeta {
            digest: nanoclaw_image::Digest::of(b"app"),
            origin: nanoclaw_image::ImageOrigin::Debian {
                recipe: DebianRecipe::new("bookworm"),
            },
            rootfs_bytes: 4096,
            created_unix: 0,
        };
        let name = nanoclaw_image::ImageName::new("app").unwrap();
        store.commit(&staging, &name, &config, &meta).unwrap();
        (dir, store)
    }

    #[test]
    fn an_image_gives_command_env_cwd_and_user_and_the_request_overrides_them() {
        let config = nanoclaw_image::ImageConfig {
            env: vec!["PATH=/usr/bin".into(), "MODE=image".into(), "bad".into()],
            working_dir: "/srv".into(),
            user: "agent".into(),
            entrypoint: vec!["/usr/bin/python3".into()],
            cmd: vec!["app.py".into()],
        };
        let (dir, store) = store_with(config);
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();

        let mut spec = CreateVm::new("", Vec::new());
        spec.image = Some("app".into());
        spec.cwd = String::new();
        spec.disk_size_mib = 64;
        spec.env = vec![("MODE".into(), "request".into())];
        let (run, image) = resolve(&store, spec, &vm_dir).unwrap();
        assert_eq!(run.command, "/usr/bin/python3");
        assert_eq!(run.args, ["app.py"]);
        assert_eq!(
            run.env,
            [
                ("PATH".to_owned(), "/usr/bin".to_owned()),
                ("MODE".to_owned(), "request".to_owned())
            ]
        );
        assert_eq!(run.cwd, "/srv");
        assert_eq!(image.user.as_deref(), Some("agent"));
        assert_eq!(
            std::fs::metadata(&image.scratch).unwrap().len(),
            64 << 20,
            "the writable disk has the asked size"
        );

        // Arguments without a command go to the entrypoint; the request's user and cwd win.
        let mut spec = CreateVm::new("", vec!["other.py".into()]);
        spec.image = Some("app".into());
        spec.cwd = "/tmp".into();
        spec.user = Some("1000:1000".into());
        spec.disk_size_mib = 64;
        let vm_dir = dir.path().join("vm2");
        std::fs::create_dir(&vm_dir).unwrap();
        let (run, image) = resolve(&store, spec, &vm_dir).unwrap();
        assert_eq!(
            (run.command.as_str(), run.args.as_slice()),
            ("/usr/bin/python3", &["other.py".to_owned()][..])
        );
        assert_eq!(run.cwd, "/tmp");
        assert_eq!(image.user.as_deref(), Some("1000:1000"));
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> String {
        use base64::Engine as _;
        let mut tar = tar::Builder::new(Vec::new());
        for (path, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(1000);
            h.set_gid(1000);
            if path.contains("..") {
                // The tar crate refuses `..` names; a hostile client would not.
                h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                tar.append(&h, *data).unwrap();
            } else {
                tar.append_data(&mut h, path, *data).unwrap();
            }
        }
        base64::engine::general_purpose::STANDARD.encode(tar.into_inner().unwrap())
    }

    #[test]
    fn copied_in_files_go_onto_the_writable_disk_and_escapes_are_refused() {
        let (dir, store) = store_with(nanoclaw_image::ImageConfig {
            cmd: vec!["/bin/true".into()],
            ..Default::default()
        });
        let vm_dir = dir.path().join("vm");
        std::fs::create_dir(&vm_dir).unwrap();
        let mut spec = CreateVm::new("", Vec::new());
        spec.image = Some("app".into());
        spec.disk_size_mib = 64;
        spec.copy_in_tar = Some(tar_of(&[("opt/agent/agent.py", b"print('hi')\n")]));
        let (run, image) = resolve(&store, spec.clone(), &vm_dir).unwrap();
        assert_eq!(
            run.copy_in_tar, None,
            "the tar is not kept in the VM's record"
        );
        assert!(
            !vm_dir.join(COPY_IN_DIR).exists(),
            "the staging folder is gone"
        );
        // The file is inside the ext4 image (its bytes are in the disk file).
        let disk = std::fs::read(&image.scratch).unwrap();
        assert!(disk.windows(11).any(|w| w == b"print('hi')"));

        let vm_dir = dir.path().join("vm2");
        std::fs::create_dir(&vm_dir).unwrap();
        spec.copy_in_tar = Some(tar_of(&[("../../etc/evil", b"x")]));
        let err = resolve(&store, spec, &vm_dir).unwrap_err();
        assert!(err.contains(".."), "{err}");
        assert!(!vm_dir.join(SCRATCH_DISK_FILE).exists(), "no disk was made");
        assert!(!dir.path().join("etc/evil").exists());
    }

    #[test]
    fn an_image_without_a_command_needs_one_and_a_missing_image_is_named() {
        let (dir, store) = store_with(nanoclaw_image::ImageConfig::default());
        let mut spec = CreateVm::new("", Vec::new());
        spec.image = Some("app".into());
        let err = resolve(&store, spec.clone(), dir.path()).unwrap_err();
        assert!(err.contains("no Entrypoint or Cmd"), "{err}");

        spec.image = Some("nope".into());
        let err = resolve(&store, spec, dir.path()).unwrap_err();
        assert!(err.contains("nope"), "{err}");
    }
}
