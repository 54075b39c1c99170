//! Warm starts: a template snapshot per image and size, taken after the guest's sidecar has
//! said hello and before any agent runs, which `run --image` restores instead of booting.
//!
//! # Taking a template
//!
//! [`Daemon::warm_image`] (`nanoclaw image warm NAME`) boots a VM of the image that is never
//! sent an agent (`VmRecord::template`), waits for its sidecar's hello, snapshots it under
//! [`template_name`] and removes the VM. The name holds the image's digest, the guest's memory
//! and vCPUs and the writable disk's size, so a rebuilt image or another size never finds a
//! template made for something else; warming again replaces the template. The template also
//! records the VMM, guest kernel and initramfs it booted with (`SnapshotMeta::guest`): after
//! one of them changes (an upgrade), runs boot cold until the image is warmed again.
//!
//! # Starting from one
//!
//! A `run --image` that matches a template, and copies nothing in at creation, starts warm
//! (`Daemon::warm_start`): its VM gets a copy of the template's memory, state and writable
//! disk (an empty file system that the template's guest had not mounted) and a VMM started with
//! `--restore`. Like every restored guest, it takes a new identity (fresh kernel entropy, boot
//! id and boot key, see `state::Reidentify`) before it is admitted; then it is sent its agent,
//! with the run's own command, environment, user and profile, exactly as a booted VM is.
//!
//! A run that copies files in at creation boots cold: those files are written into the
//! writable disk before the VMM starts, and the template's guest kernel may already hold the
//! disk's first blocks (its superblock) in its cache, from before the files were there.
//! `nanoclaw cp` after the start has no such limit.

use std::sync::Arc;
use std::time::Duration;

use nanoclaw_api::{CreateVm, SnapshotInfo, WarmImage};

use super::images;
use super::snapshots::SnapshotError;
use super::state::{self, VmRecord};
use super::vm::Vm;
use super::{Daemon, DaemonError};

/// How long a template's guest has to say hello.
const TEMPLATE_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of taking a template.
#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    /// The template VM could not be created (a bad image, the limits, ...).
    #[error("cannot start the template VM")]
    Create(#[source] DaemonError),
    /// Its guest did not say hello in time.
    #[error("the template VM's guest was not ready within {0:?}")]
    NotReady(Duration),
    /// Its VM ended before its guest said hello.
    #[error("the template VM ended before its guest was ready: {0}")]
    Ended(String),
    /// The snapshot failed.
    #[error("cannot take the template snapshot")]
    Snapshot(#[source] SnapshotError),
}

/// The snapshot name of the template of the image with `digest` at `size`:
/// `warm-<16 hex digits of the digest>-<memory>m-<vcpus>c-<disk>d`.
pub fn template_name(digest: &str, memory_mib: u64, vcpus: u8, disk_size_mib: u64) -> String {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    let short: String = hex.chars().take(16).collect();
    format!("warm-{short}-{memory_mib}m-{vcpus}c-{disk_size_mib}d")
}

impl Daemon {
    /// Takes (or replaces) the warm template of image `name` at the size `req` gives (see the
    /// module doc). The template VM is removed whatever happens.
    pub async fn warm_image(
        self: &Arc<Self>,
        name: &str,
        req: WarmImage,
    ) -> Result<SnapshotInfo, WarmError> {
        let spec: CreateVm = serde_json::from_value(serde_json::json!({
            // Never run: a template is sent no agent.
            "command": "/bin/true",
            "image": name,
            "memory_mib": req.memory_mib,
            "vcpus": req.vcpus,
            "disk_size_mib": req.disk_size_mib,
        }))
        .map_err(|e| WarmError::Create(DaemonError::Image(e.to_string())))?;
        let vm = self.create_template(spec).map_err(WarmError::Create)?;
        let taken = self.snapshot_template(&vm).await;
        vm.stop(self.stop_grace).await;
        if let Err(e) = self.remove(&vm.id) {
            tracing::warn!(vm = %vm.id, error = %crate::error_chain(&e), "template VM left");
        }
        let info = taken?;
        tracing::info!(image = name, snapshot = %info.name, "warm template taken");
        Ok(info)
    }

    /// Waits for the template VM's hello, then snapshots it under its template name.
    async fn snapshot_template(&self, vm: &Arc<Vm>) -> Result<SnapshotInfo, WarmError> {
        let deadline = tokio::time::Instant::now() + TEMPLATE_BOOT_TIMEOUT;
        loop {
            let info = vm.info();
            if info.status.is_terminal() {
                let why = info
                    .vmm_exit
                    .map_or_else(|| "no exit recorded".to_owned(), |e| e.reason);
                return Err(WarmError::Ended(why));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(WarmError::NotReady(TEMPLATE_BOOT_TIMEOUT));
            }
            if info.control_connected && info.boot_id.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (spec, image) = vm.spec_and_image();
        let digest = image.map(|i| i.digest).unwrap_or_default();
        let name = template_name(&digest, spec.memory_mib, spec.vcpus, spec.disk_size_mib);
        match self.snapshots.remove(&name) {
            Ok(()) | Err(SnapshotError::NotFound(_)) => {}
            Err(e) => return Err(WarmError::Snapshot(e)),
        }
        self.snapshot(&vm.id, Some(name))
            .await
            .map_err(WarmError::Snapshot)
    }

    /// Creates the template VM of `spec`: an image VM that is never sent an agent.
    fn create_template(self: &Arc<Self>, spec: CreateVm) -> Result<Arc<Vm>, DaemonError> {
        self.limits
            .admit(&self.lock_vms(), None)
            .map_err(DaemonError::Limit)?;
        let (id, dir) = state::create_vm_dir(&self.vms_dir).map_err(DaemonError::State)?;
        let (spec, image) = match images::resolve(&self.images, spec, &dir) {
            Ok(resolved) => resolved,
            Err(why) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(DaemonError::Image(why));
            }
        };
        let mut record = VmRecord::new(id.clone(), spec, state::now_unix_ms());
        record.image = Some(image);
        record.template = true;
        let (vm, child) = self.start(id, dir, record, None)?;
        tokio::spawn(Arc::clone(&vm).watch_child(child));
        Ok(vm)
    }

    /// Starts the VM of an image `spec` from its warm template when there is one that fits
    /// (see the module doc); `Ok(None)` when there is none, and the caller boots cold.
    pub(super) fn warm_start(
        self: &Arc<Self>,
        spec: &CreateVm,
        parent: Option<&str>,
    ) -> Result<Option<Arc<Vm>>, DaemonError> {
        let Some(image_name) = &spec.image else {
            return Ok(None);
        };
        if spec.copy_in_tar.is_some() {
            return Ok(None);
        }
        // A template has no network device: a VM whose profile allows egress boots cold, with
        // its own network.
        if super::wants_network(spec) {
            return Ok(None);
        }
        let Ok(info) = self.images.inspect(image_name) else {
            // The cold path gives the error.
            return Ok(None);
        };
        let name = template_name(
            &info.digest.to_string(),
            spec.memory_mib,
            spec.vcpus,
            spec.disk_size_mib,
        );
        let Ok(meta) = self.snapshots.meta(&name) else {
            return Ok(None);
        };
        if meta.guest.as_deref() != Some(self.launch.guest_fingerprint().as_str()) {
            // Made by another VMM, or of another guest kernel or initramfs (an upgrade).
            tracing::info!(snapshot = %name, "warm template of another guest; booting");
            return Ok(None);
        }
        self.limits
            .admit(&self.lock_vms(), parent)
            .map_err(DaemonError::Limit)?;
        let (id, dir) = state::create_vm_dir(&self.vms_dir).map_err(DaemonError::State)?;
        let made = images::resolve(&self.images, spec.clone(), &dir).and_then(|(spec, image)| {
            // The writable disk is the template's: the one its guest knows.
            std::fs::remove_file(&image.scratch).map_err(|e| e.to_string())?;
            let found = self
                .snapshots
                .prepare_restore(&name, &meta, Some(&image.scratch))
                .map_err(|e| crate::error_chain(&e))?;
            Ok((spec, image, found))
        });
        let (spec, image, snapshot_dir) = match made {
            Ok(made) => made,
            Err(why) => {
                let _ = std::fs::remove_dir_all(&dir);
                tracing::warn!(snapshot = %name, error = %why, "warm start not possible; booting");
                return Ok(None);
            }
        };
        let mut record = VmRecord::new(id.clone(), spec, state::now_unix_ms());
        record.image = Some(image);
        record.parent = parent.map(str::to_owned);
        record.boot_id = meta.boot_id.clone();
        record.reidentify = Some(state::Reidentify::default());
        record.restore = Some(state::Restore {
            snapshot: name.clone(),
            dir: snapshot_dir,
            paused: false,
        });
        let (vm, child) = self.start(id, dir, record, parent)?;
        tokio::spawn(Arc::clone(&vm).watch_child(child));
        tracing::info!(vm = %vm.id, snapshot = %name, "warm start");
        Ok(Some(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::super::snapshots;
    use super::*;

    #[test]
    fn a_template_name_is_a_valid_snapshot_name_and_tells_sizes_apart() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let name = template_name(d, 256, 1, 2048);
        assert_eq!(name, "warm-0123456789abcdef-256m-1c-2048d");
        snapshots::validate_name(&name).unwrap();
        assert_ne!(name, template_name(d, 512, 1, 2048));
        assert_ne!(name, template_name(d, 256, 2, 2048));
        assert_ne!(name, template_name(d, 256, 1, 4096));
        assert_ne!(
            name,
            template_name(
                "sha256:ffff456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                256,
                1,
                2048
            )
        );
    }
}
