//! Component tests of the import: real layer tarballs, real OCI layouts and docker-save
//! archives written by the fixtures, real `mkfs.ext4`. They need root (layers carry owners).

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use common::{LayerBuilder, TestImage, TestLayer, describe_tree, list_dir};
use nanoclaw_image::digest::Digest;
use nanoclaw_image::ext4::{EXT4_MAGIC, EXT4_MAGIC_OFFSET};
use nanoclaw_image::layer::LayerError;
use nanoclaw_image::source::{SourceError, SourceKind};
use nanoclaw_image::{
    ImageError, ImageOrigin, ImageStore, ImportLimits, StoreError, import, stage_image,
};

/// Two layers exercising every kind of entry and both whiteouts.
fn two_layer_image() -> TestImage {
    let lower = LayerBuilder::new()
        .dir("etc/")
        .dir("etc/app/")
        .file("etc/app/a", b"alpha")
        .file("etc/app/b", b"beta")
        .dir("bin/")
        .file_owned("bin/tool", b"#!/bin/sh\n", 0o4755, 0, 0, 1000)
        .file("gone.txt", b"deleted by the upper layer")
        .dir("opq/")
        .file("opq/old1", b"hidden by the opaque marker")
        .dir("opq/sub/")
        .file("opq/sub/old2", b"hidden too")
        .dir_owned("home/", 0o755, 0, 0, 1000)
        .dir_owned("home/user/", 0o700, 1000, 1000, 2_000_000)
        .file_owned("home/user/data", b"mine", 0o600, 1000, 1000, 1_234_567)
        .symlink_owned("link", "etc/app/a", 1000)
        .hardlink("hard", "etc/app/a")
        .file("becomes_dir", b"a file first")
        .dir("becomes_file/")
        .file("becomes_file/child", b"x")
        .build();
    let upper = LayerBuilder::new()
        .whiteout("gone.txt")
        .dir("opq/")
        // Written before the marker in the same layer: kept all the same.
        .file("opq/new", b"from the upper layer")
        .opaque("opq")
        .whiteout("etc/app/b")
        .file("etc/app/c", b"gamma")
        .dir("becomes_dir/")
        .file("becomes_dir/inner", b"now a directory")
        .file("becomes_file", b"now a file")
        // Creates its parent implicitly.
        .file("srv/www/index.html", b"<html>")
        .build();
    TestImage::new(vec![TestLayer::plain(lower), TestLayer::gzipped(upper)])
}

fn stage(source: &Path) -> Result<(tempfile::TempDir, nanoclaw_image::StagedImage), ImageError> {
    let dir = tempfile::tempdir().unwrap();
    let staged = stage_image(
        source,
        &dir.path().join("tree"),
        dir.path(),
        &ImportLimits::default(),
    )?;
    Ok((dir, staged))
}

#[test]
fn oci_layout_two_layers_applies_whiteouts_links_and_owners() {
    let src = tempfile::tempdir().unwrap();
    let image = two_layer_image();
    image.write_oci_dir(src.path());
    let (dir, staged) = stage(src.path()).unwrap();
    let root = dir.path().join("tree");
    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();

    assert_eq!(staged.kind, SourceKind::OciDir);
    assert_eq!(staged.digest, image.config_digest());
    assert_eq!(staged.layers, 2);
    assert!(!root.join("gone.txt").exists());
    assert!(!root.join("etc/app/b").exists());
    assert_eq!(fs::read(root.join("etc/app/c")).unwrap(), b"gamma");
    let opq: Vec<_> = fs::read_dir(root.join("opq"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(opq, ["new"]);
    assert!(meta("becomes_dir").is_dir());
    assert_eq!(
        fs::read(root.join("becomes_dir/inner")).unwrap(),
        b"now a directory"
    );
    assert!(meta("becomes_file").is_file());
    assert_eq!(
        fs::read(root.join("srv/www/index.html")).unwrap(),
        b"<html>"
    );

    // Symlink: kept as a link, owned by its own uid (lchown).
    let link = meta("link");
    assert!(link.file_type().is_symlink());
    assert_eq!(
        fs::read_link(root.join("link")).unwrap(),
        Path::new("etc/app/a")
    );
    assert_eq!((link.uid(), link.gid()), (1000, 1000));
    // Hardlink: the same inode as its target.
    assert_eq!(meta("hard").ino(), meta("etc/app/a").ino());
    assert_eq!(meta("hard").nlink(), 2);
    // Modes (setuid kept after chown), owners and times.
    assert_eq!(meta("bin/tool").permissions().mode() & 0o7777, 0o4755);
    let data = meta("home/user/data");
    assert_eq!(
        (data.uid(), data.gid(), data.mode() & 0o777),
        (1000, 1000, 0o600)
    );
    assert_eq!(data.mtime(), 1_234_567);
    let home = meta("home/user");
    assert_eq!(
        (home.uid(), home.mode() & 0o777, home.mtime()),
        (1000, 0o700, 2_000_000)
    );
    // The root is root's and world-readable; undated directories get the default time.
    assert_eq!((meta("").uid(), meta("").mode() & 0o777), (0, 0o755));
    assert_eq!(meta("srv").mtime() as u64, nanoclaw_image::DEFAULT_EPOCH);

    let config = &staged.config;
    assert_eq!(config.env, ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"]);
    assert_eq!(config.working_dir, "/srv");
    assert_eq!(config.user, "1000:1000");
    assert_eq!(config.entrypoint, ["/bin/tool"]);
    assert_eq!(config.cmd, ["--serve", "8080"]);
}

#[test]
fn docker_archive_and_oci_tar_stage_the_same_tree() {
    let image = two_layer_image();
    let src = tempfile::tempdir().unwrap();
    image.write_oci_dir(&src.path().join("layout"));
    image.write_oci_tar(&src.path().join("oci.tar"));
    image.write_docker_tar(&src.path().join("docker.tar"));
    let (oci_dir, oci) = stage(&src.path().join("layout")).unwrap();
    let (tar_dir, tar) = stage(&src.path().join("oci.tar")).unwrap();
    let (docker_dir, docker) = stage(&src.path().join("docker.tar")).unwrap();
    assert_eq!(tar.kind, SourceKind::OciArchive);
    assert_eq!(docker.kind, SourceKind::DockerArchive);
    assert_eq!(docker.digest, oci.digest);
    assert_eq!(docker.config, oci.config);
    assert_eq!(docker.manifest_digest, None);
    let expected = describe_tree(&oci_dir.path().join("tree"));
    assert!(expected.len() > 15, "{expected:?}");
    assert_eq!(describe_tree(&tar_dir.path().join("tree")), expected);
    assert_eq!(describe_tree(&docker_dir.path().join("tree")), expected);
}

#[test]
fn gzipped_docker_archive_with_gzipped_layer_imports() {
    let image = TestImage::new(vec![TestLayer::gzipped(
        LayerBuilder::new()
            .dir("etc/")
            .file("etc/os-release", b"ID=test\n")
            .build(),
    )]);
    let src = tempfile::tempdir().unwrap();
    let plain = src.path().join("docker.tar");
    image.write_docker_tar(&plain);
    let gz = src.path().join("docker.tar.gz");
    fs::write(&gz, common::gzip(&fs::read(&plain).unwrap())).unwrap();
    let (dir, staged) = stage(&gz).unwrap();
    assert_eq!(staged.kind, SourceKind::DockerArchive);
    assert_eq!(
        fs::read(dir.path().join("tree/etc/os-release")).unwrap(),
        b"ID=test\n"
    );
}

#[test]
fn import_makes_an_ext4_disk_and_a_store_entry() {
    let state = tempfile::tempdir().unwrap();
    let store = ImageStore::open(state.path()).unwrap();
    let src = tempfile::tempdir().unwrap();
    let image = two_layer_image();
    image.write_oci_dir(src.path());
    let info = import(&store, "app", src.path(), &ImportLimits::default()).unwrap();

    assert_eq!(info.name.as_str(), "app");
    assert_eq!(info.digest, image.config_digest());
    assert_eq!(info.config.cmd, ["--serve", "8080"]);
    let ImageOrigin::Import {
        kind,
        manifest_digest,
        layers,
    } = &info.meta.origin
    else {
        panic!("{:?}", info.meta.origin)
    };
    assert_eq!((*kind, *layers), (SourceKind::OciDir, 2));
    assert!(manifest_digest.is_some());
    let bytes = fs::read(&info.rootfs).unwrap();
    assert_eq!(bytes.len() as u64, info.meta.rootfs_bytes);
    let at = EXT4_MAGIC_OFFSET as usize;
    assert_eq!(bytes[at..at + 2], EXT4_MAGIC);
    // The label names the digest; the file system checks clean.
    let label_at = 1024 + 0x78;
    assert_eq!(
        &bytes[label_at..label_at + 15],
        format!("nc-{}", &info.digest.hex()[..12]).as_bytes()
    );
    let fsck = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&info.rootfs)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let config_json: serde_json::Value =
        serde_json::from_slice(&fs::read(info.rootfs.with_file_name("config.json")).unwrap())
            .unwrap();
    assert_eq!(config_json["WorkingDir"], "/srv");
    assert_eq!(config_json["Entrypoint"][0], "/bin/tool");

    assert_eq!(store.inspect("app").unwrap(), info);
    assert_eq!(store.list().unwrap(), std::slice::from_ref(&info));
    // Nothing left behind in tmp/.
    assert_eq!(fs::read_dir(store.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn the_same_image_gives_the_same_disk_bytes() {
    let src = tempfile::tempdir().unwrap();
    two_layer_image().write_docker_tar(&src.path().join("image.tar"));
    let mut disks = Vec::new();
    for _ in 0..2 {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let info = import(
            &store,
            "app",
            &src.path().join("image.tar"),
            &ImportLimits::default(),
        )
        .unwrap();
        disks.push(fs::read(&info.rootfs).unwrap());
        // The next import's staged files get another change time.
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    assert!(
        disks[0] == disks[1],
        "two imports of one image made different disks"
    );
}

#[test]
fn list_inspect_remove_share_and_drop_blobs() {
    let state = tempfile::tempdir().unwrap();
    let store = ImageStore::open(state.path()).unwrap();
    let src = tempfile::tempdir().unwrap();
    let small = TestImage::new(vec![TestLayer::plain(
        LayerBuilder::new().file("f", b"1").build(),
    )]);
    small.write_docker_tar(&src.path().join("small.tar"));
    let limits = ImportLimits::default();
    let a = import(&store, "a", &src.path().join("small.tar"), &limits).unwrap();
    let b = import(&store, "b", &src.path().join("small.tar"), &limits).unwrap();
    assert_eq!(a.rootfs, b.rootfs, "one blob for one digest");
    let names: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|i| i.name.to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
    store.remove("a").unwrap();
    assert!(matches!(
        store.inspect("a"),
        Err(StoreError::NotFound { .. })
    ));
    assert!(b.rootfs.exists());
    store.remove("b").unwrap();
    assert!(!b.rootfs.exists());
    assert_eq!(
        fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
    assert!(matches!(
        store.inspect("Not Valid"),
        Err(StoreError::Name(_))
    ));
}

#[test]
fn concurrent_imports_of_different_names() {
    let state = tempfile::tempdir().unwrap();
    let store = ImageStore::open(state.path()).unwrap();
    let src = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..4)
        .map(|i| {
            let image = TestImage::new(vec![TestLayer::plain(
                LayerBuilder::new()
                    .file("id", format!("{i}").as_bytes())
                    .build(),
            )]);
            let path = src.path().join(format!("{i}.tar"));
            image.write_oci_tar(&path);
            (path, image.config_digest())
        })
        .collect();
    std::thread::scope(|s| {
        for (i, (path, _)) in paths.iter().enumerate() {
            let store = store.clone();
            s.spawn(move || {
                import(&store, &format!("img{i}"), path, &ImportLimits::default()).unwrap()
            });
        }
    });
    let listed = store.list().unwrap();
    assert_eq!(listed.len(), 4);
    for (i, (_, digest)) in paths.iter().enumerate() {
        assert_eq!(store.inspect(&format!("img{i}")).unwrap().digest, *digest);
    }
}

/// Imports `image` (as an OCI layout directory) into a fresh store and returns the error,
/// after checking that the store is exactly as it was before.
fn refused(image: &TestImage, limits: &ImportLimits) -> ImageError {
    let src = tempfile::tempdir().unwrap();
    image.write_oci_dir(src.path());
    refused_source(src.path(), limits)
}

fn refused_source(source: &Path, limits: &ImportLimits) -> ImageError {
    let state = tempfile::tempdir().unwrap();
    let store = ImageStore::open(state.path()).unwrap();
    let before = list_dir(state.path());
    let err = import(&store, "refused", source, limits).expect_err("import should be refused");
    assert_eq!(
        list_dir(state.path()),
        before,
        "store changed by a refused import: {err}"
    );
    assert!(store.list().unwrap().is_empty());
    err
}

fn one_layer(layer: LayerBuilder) -> TestImage {
    TestImage::new(vec![TestLayer::plain(layer.build())])
}

#[test]
fn refuses_parent_and_absolute_paths() {
    let err = refused(
        &one_layer(LayerBuilder::new().file("../evil", b"x")),
        &Default::default(),
    );
    assert!(
        matches!(err, ImageError::Layer(LayerError::ParentComponent { .. })),
        "{err:?}"
    );
    let err = refused(
        &one_layer(LayerBuilder::new().file("a/../../evil", b"x")),
        &Default::default(),
    );
    assert!(
        matches!(err, ImageError::Layer(LayerError::ParentComponent { .. })),
        "{err:?}"
    );
    let err = refused(
        &one_layer(LayerBuilder::new().file("/evil", b"x")),
        &Default::default(),
    );
    assert!(
        matches!(err, ImageError::Layer(LayerError::AbsolutePath { .. })),
        "{err:?}"
    );
}

#[test]
fn refuses_writes_through_symlinks() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_owned();
    fs::write(outside.path().join("secret"), b"keep").unwrap();
    let cases = [
        LayerBuilder::new()
            .symlink("a", &target)
            .file("a/passwd", b"owned"),
        LayerBuilder::new()
            .symlink("a", "../../../../../../../..")
            .file("a/tmp/x", b"owned"),
        LayerBuilder::new()
            .dir("d/")
            .symlink("d/up", &target)
            .dir("d/up/sub/"),
        LayerBuilder::new()
            .symlink("a", &target)
            .whiteout("a/secret"),
        LayerBuilder::new().symlink("a", &target).opaque("a"),
        LayerBuilder::new()
            .symlink("a", &target)
            .symlink("a/l", "/etc/shadow"),
    ];
    for (i, layer) in cases.into_iter().enumerate() {
        let err = refused(&one_layer(layer), &Default::default());
        assert!(
            matches!(err, ImageError::Layer(LayerError::ThroughSymlink { .. })),
            "{i}: {err:?}"
        );
    }
    // The symlink in a lower layer counts too.
    let two = TestImage::new(vec![
        TestLayer::plain(LayerBuilder::new().symlink("etc", &target).build()),
        TestLayer::plain(LayerBuilder::new().file("etc/passwd", b"owned").build()),
    ]);
    let err = refused(&two, &Default::default());
    assert!(
        matches!(err, ImageError::Layer(LayerError::ThroughSymlink { .. })),
        "{err:?}"
    );
    let left: Vec<_> = fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["secret"]);
    assert_eq!(fs::read(outside.path().join("secret")).unwrap(), b"keep");
}

#[test]
fn refuses_hardlinks_outside_or_missing() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), b"keep").unwrap();
    let secret = outside.path().join("secret").to_str().unwrap().to_owned();
    let dir = outside.path().to_str().unwrap().to_owned();
    for layer in [
        LayerBuilder::new().hardlink("h", &secret),
        LayerBuilder::new().hardlink("h", "../../../../etc/passwd"),
        LayerBuilder::new()
            .symlink("s", &dir)
            .hardlink("h", "s/secret"),
    ] {
        let err = refused(&one_layer(layer), &Default::default());
        assert!(
            matches!(err, ImageError::Layer(LayerError::HardlinkOutside { .. })),
            "{err:?}"
        );
    }
    let err = refused(
        &one_layer(LayerBuilder::new().hardlink("h", "not/there")),
        &Default::default(),
    );
    assert!(
        matches!(err, ImageError::Layer(LayerError::HardlinkMissing { .. })),
        "{err:?}"
    );
    // A target that comes later in the layer does not exist yet.
    let later = LayerBuilder::new().hardlink("h", "f").file("f", b"x");
    let err = refused(&one_layer(later), &Default::default());
    assert!(
        matches!(err, ImageError::Layer(LayerError::HardlinkMissing { .. })),
        "{err:?}"
    );
    assert_eq!(
        fs::metadata(outside.path().join("secret")).unwrap().nlink(),
        1
    );
}

#[test]
fn refuses_device_nodes() {
    let err = refused(
        &one_layer(LayerBuilder::new().dir("dev/").char_device("dev/null")),
        &Default::default(),
    );
    assert!(
        matches!(err, ImageError::Layer(LayerError::DeviceNode { .. })),
        "{err:?}"
    );
}

#[test]
fn refuses_a_tampered_layer() {
    let image = one_layer(LayerBuilder::new().file("f", b"original content"));
    let src = tempfile::tempdir().unwrap();
    image.write_oci_dir(src.path());
    let blob = src
        .path()
        .join("blobs/sha256")
        .join(Digest::of(&image.layers[0].tar).hex());
    let mut bytes = fs::read(&blob).unwrap();
    let at = bytes.windows(8).position(|w| w == b"original").unwrap();
    bytes[at] = b'O';
    fs::write(&blob, bytes).unwrap();
    let err = refused_source(src.path(), &Default::default());
    let ImageError::Source(SourceError::DigestMismatch { expected, .. }) = err else {
        panic!("{err:?}")
    };
    assert_eq!(expected, Digest::of(&image.layers[0].tar));
}

#[test]
fn refuses_a_wrong_diff_id_and_a_tampered_manifest() {
    let mut image = TestImage::new(vec![TestLayer::gzipped(
        LayerBuilder::new().file("f", b"x").build(),
    )]);
    image.diff_ids = Some(vec![Digest::of(b"something else").to_string()]);
    let err = refused(&image, &Default::default());
    assert!(
        matches!(err, ImageError::Source(SourceError::DigestMismatch { .. })),
        "{err:?}"
    );

    let image = one_layer(LayerBuilder::new().file("f", b"x"));
    let src = tempfile::tempdir().unwrap();
    let mut files = image.oci_files();
    let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifest_hex =
        index["manifests"][0]["digest"].as_str().unwrap()["sha256:".len()..].to_owned();
    let manifest = files
        .get_mut(&format!("blobs/sha256/{manifest_hex}"))
        .unwrap();
    let pos = manifest.iter().position(|&b| b == b'{').unwrap();
    manifest.insert(pos + 1, b' ');
    common::write_files(src.path(), &files);
    let err = refused_source(src.path(), &Default::default());
    assert!(
        matches!(
            err,
            ImageError::Source(
                SourceError::SizeMismatch { .. } | SourceError::DigestMismatch { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn refuses_unknown_media_types_by_name() {
    for media_type in [
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/octet-stream",
    ] {
        let mut image = one_layer(LayerBuilder::new().file("f", b"x"));
        image.layers[0].media_type = Some(media_type.to_owned());
        let err = refused(&image, &Default::default());
        let ImageError::Source(SourceError::UnsupportedMediaType { media_type: named }) = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(named, media_type);
        assert!(err.to_string().contains(media_type));
    }
}

#[test]
fn refuses_a_missing_blob() {
    let image = one_layer(LayerBuilder::new().file("f", b"x"));
    let src = tempfile::tempdir().unwrap();
    image.write_oci_dir(src.path());
    fs::remove_file(
        src.path()
            .join("blobs/sha256")
            .join(Digest::of(&image.layers[0].tar).hex()),
    )
    .unwrap();
    let err = refused_source(src.path(), &Default::default());
    assert!(
        matches!(err, ImageError::Source(SourceError::MissingBlob { .. })),
        "{err:?}"
    );
    let err = refused_source(&src.path().join("nothing-here"), &Default::default());
    assert!(
        matches!(err, ImageError::Source(SourceError::Open { .. })),
        "{err:?}"
    );
    fs::remove_file(src.path().join("index.json")).unwrap();
    let err = refused_source(src.path(), &Default::default());
    assert!(
        matches!(err, ImageError::Source(SourceError::NotAnImage { .. })),
        "{err:?}"
    );
}

#[test]
fn gzip_bomb_stops_at_the_size_limit() {
    const LIMIT: u64 = 1 << 20;
    let zeros = vec![0u8; 64 << 20];
    let image = TestImage::new(vec![TestLayer::gzipped(
        LayerBuilder::new().file("bomb", &zeros).build(),
    )]);
    drop(zeros);
    assert!(
        image.layers[0].blob().len() < 1 << 20,
        "the bomb should compress well"
    );
    let limits = ImportLimits {
        max_bytes: LIMIT,
        ..Default::default()
    };
    let err = refused(&image, &limits);
    assert!(
        matches!(err, ImageError::TooLarge { limit: LIMIT }),
        "{err:?}"
    );

    // It stopped at the limit: the partial file in a staged tree is no larger than it.
    let src = tempfile::tempdir().unwrap();
    image.write_oci_dir(src.path());
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let err = stage_image(src.path(), &tree, dir.path(), &limits).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err:?}");
    assert!(fs::metadata(tree.join("bomb")).unwrap().len() <= LIMIT);
}

#[test]
fn refuses_too_many_entries() {
    let mut layer = LayerBuilder::new();
    for i in 0..50 {
        layer = layer.file(&format!("f{i}"), b"");
    }
    let limits = ImportLimits {
        max_entries: 20,
        ..Default::default()
    };
    let err = refused(&one_layer(layer), &limits);
    assert!(
        matches!(
            err,
            ImageError::Layer(LayerError::TooManyEntries { limit: 20 })
        ),
        "{err:?}"
    );
}

#[test]
fn refuses_a_bad_name_before_reading_anything() {
    let state = tempfile::tempdir().unwrap();
    let store = ImageStore::open(state.path()).unwrap();
    let err = import(
        &store,
        "../escape",
        Path::new("/nonexistent"),
        &Default::default(),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::Name(_)), "{err:?}");
}
