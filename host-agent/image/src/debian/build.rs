//! The build steps: the cache lookup, debootstrap, pip in a chroot, the agent user, the
//! cleanup, the disk and the commit.

use std::fs;
use std::path::Path;

use super::chroot::{ChrootMounts, detach_mounts_under};
use super::tidy::{add_agent_user, clean, create_dir, remove_any, tree_path, write_new};
use super::{AGENT_HOME, AGENT_ID, AGENT_USER, DebianError, DebianRecipe, IMAGE_PATH};
use crate::config::ImageConfig;
use crate::ext4::{RootfsParams, make_rootfs};
use crate::import::{remove_tree, rootfs_label};
use crate::name::ImageName;
use crate::store::{ImageInfo, ImageMeta, ImageOrigin, ImageStore, now_unix};
use crate::tool::{CHROOT, DEBOOTSTRAP};
use crate::tree;

/// The host's resolver configuration, copied into the chroot while pip runs.
const HOST_RESOLV_CONF: &str = "/etc/resolv.conf";
/// The host's CA bundle (Debian's path), which pip in the chroot verifies PyPI with.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Where the host's CA bundle sits in the chroot while pip runs.
const CHROOT_CA_BUNDLE: &str = "/tmp/nanoclaw-host-ca.crt";

/// The config of images built here: user `agent`, working directory its home.
pub fn agent_config() -> ImageConfig {
    ImageConfig {
        env: vec![
            format!("PATH={IMAGE_PATH}"),
            format!("HOME={AGENT_HOME}"),
            format!("USER={AGENT_USER}"),
            "LANG=C.UTF-8".to_owned(),
        ],
        working_dir: AGENT_HOME.to_owned(),
        user: format!("{AGENT_ID}:{AGENT_ID}"),
        entrypoint: Vec::new(),
        cmd: vec!["/bin/bash".to_owned()],
    }
}

/// Builds (or finds in the store) the image of `recipe` and names it `name`. Needs root and the
/// network. `progress` gets lines such as `"debootstrap: ..."`, `"pip: ..."`, `"mkfs: ..."`.
pub fn build_debian(
    store: &ImageStore,
    name: &str,
    recipe: &DebianRecipe,
    mut progress: impl FnMut(&str),
) -> Result<ImageInfo, DebianError> {
    let progress: &mut dyn FnMut(&str) = &mut progress;
    let name = ImageName::new(name)?;
    let recipe = recipe.normalized()?;
    let digest = recipe.hash()?;
    if let Some(info) = store.tag_existing(&name, &digest)? {
        progress(&format!("cache: recipe {digest} is already built"));
        return Ok(info);
    }
    // Find the tools before any work.
    DEBOOTSTRAP.find().map_err(DebianError::Debootstrap)?;
    if !recipe.pip_packages.is_empty() {
        CHROOT.find().map_err(DebianError::Pip)?;
    }
    let staging = store.staging()?;
    let root = staging.tree();
    tracing::info!(%name, %digest, suite = recipe.suite, "building Debian image");
    let built = build_tree(&root, &recipe, progress);
    // Whatever happened, nothing may stay mounted below the staging directory when it is
    // deleted; if something cannot be detached, keep the directory.
    if let Err(source) = detach_mounts_under(staging.path()) {
        let staging = staging.keep();
        return Err(DebianError::MountsLeft {
            staging,
            source: Box::new(source),
        });
    }
    built?;
    let stats = tree::stats(&root)?;
    create_dir(&staging.blob(), 0o755)?;
    let params = RootfsParams {
        digest,
        label: rootfs_label(&digest),
        epoch: recipe.epoch,
    };
    let rootfs_bytes = make_rootfs(&root, &staging.rootfs(), &stats, &params, progress)?;
    remove_tree(&root);
    let meta = ImageMeta {
        digest,
        origin: ImageOrigin::Debian {
            recipe: recipe.clone(),
        },
        rootfs_bytes,
        created_unix: now_unix(),
    };
    let info = store.commit(&staging, &name, &agent_config(), &meta)?;
    progress(&format!(
        "done: {name} {digest}, {} MiB",
        rootfs_bytes >> 20
    ));
    Ok(info)
}

/// debootstrap, pip, the agent user, the cleanup and the times: the tree at `root` (created
/// here) as it goes on the disk.
fn build_tree(
    root: &Path,
    recipe: &DebianRecipe,
    progress: &mut dyn FnMut(&str),
) -> Result<(), DebianError> {
    create_dir(root, 0o755)?;
    let mut cmd = DEBOOTSTRAP.command().map_err(DebianError::Debootstrap)?;
    cmd.arg("--variant=minbase");
    if !recipe.packages.is_empty() {
        cmd.arg(format!("--include={}", recipe.packages.join(",")));
    }
    cmd.arg(&recipe.suite).arg(root).arg(&recipe.mirror);
    DEBOOTSTRAP
        .run(cmd, "debootstrap", progress)
        .map_err(DebianError::Debootstrap)?;
    if !recipe.pip_packages.is_empty() {
        let mounts = ChrootMounts::mount(root)?;
        let installed = install_pip(root, recipe, progress);
        mounts.unmount()?;
        installed?;
    }
    add_agent_user(root, recipe.epoch)?;
    clean(root)?;
    tree::clamp_times(root, recipe.epoch)?;
    Ok(())
}

fn install_pip(
    root: &Path,
    recipe: &DebianRecipe,
    progress: &mut dyn FnMut(&str),
) -> Result<(), DebianError> {
    // The host's network settings, in the chroot only for this step: its resolver, and its
    // trust roots (a host behind a TLS-inspecting proxy trusts a CA the image does not have).
    let resolv = tree_path(root, "etc/resolv.conf")?;
    remove_any(&resolv)?;
    write_new(&resolv, &read_host(HOST_RESOLV_CONF)?, 0o644)?;
    let host_ca = Path::new(HOST_CA_BUNDLE)
        .exists()
        .then(|| tree_path(root, CHROOT_CA_BUNDLE.trim_start_matches('/')))
        .transpose()?;
    if let Some(ca) = &host_ca {
        remove_any(ca)?;
        write_new(ca, &read_host(HOST_CA_BUNDLE)?, 0o644)?;
    }
    let mut cmd = CHROOT.command().map_err(DebianError::Pip)?;
    cmd.env("HOME", "/root")
        .env("SOURCE_DATE_EPOCH", recipe.epoch.to_string())
        .arg(root)
        .args([
            "/usr/bin/python3",
            "-m",
            "pip",
            "install",
            "--break-system-packages",
        ])
        .args([
            "--no-cache-dir",
            "--no-input",
            "--disable-pip-version-check",
        ])
        .args(["--root-user-action=ignore", "--progress-bar=off"]);
    if host_ca.is_some() {
        cmd.args(["--cert", CHROOT_CA_BUNDLE]);
    }
    cmd.args(&recipe.pip_packages);
    let result = CHROOT.run(cmd, "pip", progress).map_err(DebianError::Pip);
    remove_any(&resolv)?;
    if let Some(ca) = &host_ca {
        remove_any(ca)?;
    }
    result
}

fn read_host(path: &str) -> Result<Vec<u8>, DebianError> {
    fs::read(path).map_err(|source| DebianError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn recipe(packages: &[&str], pip: &[&str]) -> DebianRecipe {
        DebianRecipe {
            packages: packages.iter().map(|s| s.to_string()).collect(),
            pip_packages: pip.iter().map(|s| s.to_string()).collect(),
            ..DebianRecipe::new("bookworm")
        }
    }

    #[test]
    fn cached_recipe_is_only_named_again() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let r = recipe(&["python3"], &[]);
        let digest = r.hash().unwrap();
        // Put a built image for the recipe in the store by hand.
        let staging = store.staging().unwrap();
        fs::create_dir(staging.blob()).unwrap();
        fs::write(staging.rootfs(), b"disk").unwrap();
        let meta = ImageMeta {
            digest,
            origin: ImageOrigin::Debian {
                recipe: r.normalized().unwrap(),
            },
            rootfs_bytes: 4,
            created_unix: 1,
        };
        let name = ImageName::new("first").unwrap();
        store
            .commit(&staging, &name, &agent_config(), &meta)
            .unwrap();
        drop(staging);

        let mut lines = Vec::new();
        let started = std::time::Instant::now();
        let info = build_debian(&store, "second", &r, |l| lines.push(l.to_owned())).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(info.digest, digest);
        assert_eq!(info.config, agent_config());
        assert!(lines.iter().all(|l| l.starts_with("cache: ")), "{lines:?}");
        assert_eq!(store.list().unwrap().len(), 2);
        // A different recipe is not a cache hit: it would need debootstrap (not run here).
        let other = recipe(&["python3", "git"], &[]);
        assert_eq!(
            store.tag_existing(&name, &other.hash().unwrap()).unwrap(),
            None
        );
    }
}
