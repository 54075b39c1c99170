//! A small OCI image layout written by the test itself: layers are plain tars built with the
//! `tar` crate, every blob is named by its SHA-256, and the config carries the process
//! settings (`Env`, `WorkingDir`, `User`, `Entrypoint`, `Cmd`). Tests import it with
//! `nanoclaw image import`, so nothing is fetched from a registry.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// One entry of a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A folder with its mode.
    Dir(String, u32),
    /// A regular file with its bytes and mode.
    File(String, Vec<u8>, u32),
    /// A symlink at the first path pointing at the second.
    Symlink(String, String),
    /// A whiteout: the path is deleted from the layers below.
    Whiteout(String),
}

/// A layer as an uncompressed tar.
pub fn layer(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_ustar();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        match entry {
            Entry::Dir(path, mode) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                tar.append_data(&mut header, path, std::io::empty())?;
            }
            Entry::File(path, data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                tar.append_data(&mut header, path, data.as_slice())?;
            }
            Entry::Symlink(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                tar.append_link(&mut header, path, target)?;
            }
            Entry::Whiteout(path) => {
                let (dir, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
                let wh = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
                tar.append_data(&mut header, wh, std::io::empty())?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `bytes` as a blob of the layout at `dir`; returns its descriptor.
fn blob(dir: &Path, media_type: &str, bytes: &[u8]) -> Result<Value> {
    let digest = sha256_hex(bytes);
    let path = dir.join("blobs/sha256").join(&digest);
    std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(json!({"mediaType": media_type, "digest": format!("sha256:{digest}"), "size": bytes.len()}))
}

/// Writes an OCI image layout at `dir` with `layers` (bottom first) and `process` as the
/// config's `config` object.
pub fn write_layout(dir: &Path, layers: &[Vec<u8>], process: Value) -> Result<()> {
    std::fs::create_dir_all(dir.join("blobs/sha256"))?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        layer_descs.push(blob(dir, "application/vnd.oci.image.layer.v1.tar", l)?);
        diff_ids.push(format!("sha256:{}", sha256_hex(l)));
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": process,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_desc = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config)?,
    )?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    });
    let manifest_desc = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest)?,
    )?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// The base layer of a tiny image: the host's static busybox as `/bin/busybox` with the
/// applets a shell script needs, and an unprivileged user `agent` (1000:1000).
pub fn busybox_layer(extra: &[Entry]) -> Result<Vec<u8>> {
    let busybox = std::fs::read("/bin/busybox")
        .context("read /bin/busybox (the Debian package busybox-static)")?;
    let mut entries = vec![
        Entry::Dir("bin".into(), 0o755),
        Entry::File("bin/busybox".into(), busybox, 0o755),
        Entry::Dir("etc".into(), 0o755),
        Entry::File(
            "etc/passwd".into(),
            b"root:x:0:0:root:/root:/bin/sh\nagent:x:1000:1000:agent:/home/agent:/bin/sh\n"
                .to_vec(),
            0o644,
        ),
        Entry::File(
            "etc/group".into(),
            b"root:x:0:\nagent:x:1000:\n".to_vec(),
            0o644,
        ),
        Entry::Dir("home".into(), 0o755),
        Entry::Dir("home/agent".into(), 0o755),
        Entry::Dir("tmp".into(), 0o1777),
    ];
    for applet in [
        "sh",
        "echo",
        "cat",
        "ls",
        "id",
        "pwd",
        "env",
        "dd",
        "df",
        "sync",
        "rm",
        "mkdir",
        "sha256sum",
        "head",
        "grep",
        "wc",
        "sleep",
        "true",
        "false",
    ] {
        entries.push(Entry::Symlink(format!("bin/{applet}"), "busybox".into()));
    }
    entries.extend_from_slice(extra);
    layer(&entries)
}

/// The run script of [`test_image`]: what the agent sees of its image.
pub const TEST_IMAGE_RUN_SH: &str = r#"echo "greeting=$GREETING"
echo "cwd=$(pwd)"
echo "uid=$(id -u) gid=$(id -g)"
echo "data=$(ls /data | tr '\n' ' ')"
echo "args=$*"
echo written > /tmp/scratch-file && echo "tmp=ok"
echo changed > /data/keep.txt && echo "overlay=$(cat /data/keep.txt)"
"#;

/// Writes the e2e tier's test image at `dir`: [`busybox_layer`] with a folder `/data` (mode
/// 0777) holding `keep.txt`, a top layer that deletes `/data/old.txt` with a whiteout and adds
/// `/app/run.sh` ([`TEST_IMAGE_RUN_SH`]); it runs as `agent` in `/app` with
/// `PATH=/bin`, `GREETING`, and `first second` as its Cmd.
pub fn test_image(dir: &Path) -> Result<()> {
    let base = busybox_layer(&[
        Entry::Dir("data".into(), 0o777),
        Entry::File("data/keep.txt".into(), b"keep\n".to_vec(), 0o666),
        Entry::File("data/old.txt".into(), b"old\n".to_vec(), 0o644),
        Entry::Symlink("bin/tr".into(), "busybox".into()),
    ])
    .context("base layer")?;
    let top = layer(&[
        Entry::Whiteout("data/old.txt".into()),
        Entry::Dir("app".into(), 0o755),
        Entry::File(
            "app/run.sh".into(),
            TEST_IMAGE_RUN_SH.as_bytes().to_vec(),
            0o755,
        ),
    ])
    .context("top layer")?;
    write_layout(
        dir,
        &[base, top],
        json!({
            "Env": ["PATH=/bin", "GREETING=hello from oci"],
            "WorkingDir": "/app",
            "User": "agent",
            "Entrypoint": ["/bin/sh", "/app/run.sh"],
            "Cmd": ["first", "second"],
        }),
    )
    .context("write the layout")
}

/// Writes [`test_image`] into a scratch folder and imports it into `daemon` as `name` with
/// `nanoclaw image import`, waiting up to `timeout`; an import that fails is an error holding
/// its output and the daemon's records.
pub fn import_test_image(
    daemon: &crate::Daemon,
    name: &str,
    timeout: std::time::Duration,
) -> Result<()> {
    use crate::OutputWithin as _;
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    test_image(&layout)?;
    let layout = layout.to_str().context("a UTF-8 temporary path")?;
    let out = daemon
        .nanoclaw(&["image", "import", name, layout])
        .output_within(timeout)?;
    anyhow::ensure!(
        out.status.success(),
        "nanoclaw image import {name}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.records()
    );
    Ok(())
}
