//! `nanoclaw image build|import|ls|inspect|rm|warm`: agents' root file systems, through the
//! daemon's API (the daemon owns the content-addressed store), and their warm templates.

use std::fmt::Write as _;
use std::path::PathBuf;

use hyper::Method;

use super::client::{Client, Lines};
use super::{CliError, print_out};
use nanoclaw_api::{BuildImage, BuildProgress, ImageInfo, ImportImage, SnapshotInfo, WarmImage};

/// `nanoclaw image ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Build a Debian image with debootstrap (and pip), cached by its recipe.
    Build {
        /// The image's name.
        name: String,
        /// The Debian suite, such as `bookworm`.
        #[arg(long, value_name = "SUITE")]
        debian: String,
        /// Debian packages besides the minimal base, comma-separated.
        #[arg(long, value_delimiter = ',')]
        packages: Vec<String>,
        /// pip requirements from PyPI, comma-separated.
        #[arg(long, value_delimiter = ',')]
        pip: Vec<String>,
        /// The Debian mirror (default: the daemon's).
        #[arg(long)]
        mirror: Option<String>,
    },
    /// Import a `docker save` tarball or an OCI image layout (a folder or a tar).
    Import {
        /// The image's name.
        name: String,
        /// The source on this host.
        file: PathBuf,
    },
    /// List images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one image: its digest, origin, disk and process defaults.
    Inspect {
        /// The image's name.
        name: String,
    },
    /// Remove an image's name (its disk goes when no name refers to it).
    Rm {
        /// The image's name.
        name: String,
    },
    /// Take the image's warm template: a snapshot of a VM of it booted up to its sidecar's
    /// hello, which `run --image NAME` at the same size then restores instead of booting.
    /// Prints the template's snapshot name (`snapshot rm` removes it).
    Warm {
        /// The image's name.
        name: String,
        /// Guest RAM in MiB of the runs it serves (as `run --memory`).
        #[arg(long = "memory", default_value_t = nanoclaw_api::DEFAULT_MEMORY_MIB)]
        memory_mib: u64,
        /// vCPUs of the runs it serves (as `run --vcpus`).
        #[arg(long, default_value_t = nanoclaw_api::DEFAULT_VCPUS)]
        vcpus: u8,
        /// The writable disk's size of the runs it serves (as `run --disk-size`).
        #[arg(long = "disk-size", default_value_t = nanoclaw_api::DEFAULT_DISK_MIB, value_name = "SIZE", value_parser = crate::parse_size_mib)]
        disk_size_mib: u64,
    },
}

/// Runs an image subcommand.
pub async fn run(client: &Client, command: ImageCommand) -> Result<u8, CliError> {
    match command {
        ImageCommand::Build {
            name,
            debian,
            packages,
            pip,
            mirror,
        } => {
            let req = BuildImage {
                name,
                suite: debian,
                packages,
                pip,
                mirror,
            };
            build(client, &req).await
        }
        ImageCommand::Import { name, file } => {
            // The daemon reads the source itself, so it gets an absolute path.
            let file = std::path::absolute(&file).map_err(|source| CliError::Path {
                path: file.clone(),
                source,
            })?;
            let req = ImportImage {
                name,
                source: file.to_string_lossy().into_owned(),
            };
            let info: ImageInfo = client
                .json(Method::POST, "/v1/images/import", Some(&req))
                .await?;
            print_out(&format!("{} {}\n", info.name, info.digest))?;
            Ok(0)
        }
        ImageCommand::Ls { json } => {
            let images: Vec<ImageInfo> =
                client.json(Method::GET, "/v1/images", None::<&()>).await?;
            if json {
                let text = serde_json::to_string_pretty(&images).map_err(CliError::Event)?;
                return print_out(&format!("{text}\n")).map(|()| 0);
            }
            let mut text = format!("{:<24} {:<16} {:>10}\n", "NAME", "DIGEST", "SIZE");
            for i in &images {
                let digest = i.digest.to_string();
                let _ = writeln!(
                    text,
                    "{:<24} {:<16} {:>9}M",
                    i.name,
                    digest.get(..16).unwrap_or(&digest),
                    i.meta.rootfs_bytes >> 20
                );
            }
            print_out(&text).map(|()| 0)
        }
        ImageCommand::Inspect { name } => {
            let info: ImageInfo = client
                .json(Method::GET, &format!("/v1/images/{name}"), None::<&()>)
                .await?;
            let text = serde_json::to_string_pretty(&info).map_err(CliError::Event)?;
            print_out(&format!("{text}\n")).map(|()| 0)
        }
        ImageCommand::Rm { name } => {
            client
                .send(Method::DELETE, &format!("/v1/images/{name}"), None)
                .await?;
            Ok(0)
        }
        ImageCommand::Warm {
            name,
            memory_mib,
            vcpus,
            disk_size_mib,
        } => {
            let req = WarmImage {
                memory_mib,
                vcpus,
                disk_size_mib,
            };
            let info: SnapshotInfo = client
                .json(Method::POST, &format!("/v1/images/{name}/warm"), Some(&req))
                .await?;
            print_out(&format!("{}\n", info.name)).map(|()| 0)
        }
    }
}

/// Streams a build's progress to stderr; prints the image on stdout.
async fn build(client: &Client, req: &BuildImage) -> Result<u8, CliError> {
    let body = serde_json::to_vec(req).map_err(CliError::Event)?;
    let resp = client
        .send(Method::POST, "/v1/images/build", Some(body))
        .await?;
    let mut lines = Lines::new(resp.into_body());
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_slice::<BuildProgress>(&line).map_err(CliError::Event)? {
            BuildProgress::Line(l) => eprintln!("image: {l}"),
            BuildProgress::Done(info) => {
                print_out(&format!("{} {}\n", info.name, info.digest))?;
                return Ok(0);
            }
            BuildProgress::Failed(why) => return Err(CliError::ImageBuild(why)),
        }
    }
    Err(CliError::ImageBuild(
        "the daemon ended the build without an outcome".into(),
    ))
}
