//! The API's OpenAPI 3.1 description, served by the daemon at `GET /v1/openapi.json`.
//!
//! The schemas come from the types of this crate (`utoipa::ToSchema`, which follows their
//! serde attributes). The routes are declared below, one item per route, beside the route
//! table of the crate's doc: a route the daemon adds must be added here too. The description is
//! committed as `host-agent/api/openapi.json`; the test `the_committed_description_is_current`
//! fails when the two differ, so any change to the API shows in review. Refresh the file with
//! `NANOCLAW_WRITE_OPENAPI=1 cargo test -p nanoclaw-api`.
//!
//! Types of other crates (an image's record, an approval request) are described as objects;
//! their own docs say what they hold.

use utoipa::OpenApi;

use crate::{
    AgentExit, ApiError, BuildImage, BuildProgress, CreateSnapshot, CreateToken, CreateVm,
    CreatedToken, DiskCounters, Event, EventRecord, FilesCopied, ForkVm, ImportImage, MigrateVm,
    MigratedTo, MigrationEvent, MigrationOutcome, PendingApproval, PortForward, RegistrationLink,
    RestoreSnapshot, SnapshotInfo, Stream, TokenInfo, TokenScope, VmInfo, VmNetworkInfo, VmStatus,
    VmmExit, WarmImage,
};

/// The description as JSON text (pretty, with a final newline).
pub fn json() -> String {
    let mut text = Description::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Nanoclaw host daemon API",
        description = "The daemon's HTTP/JSON API: on its Unix socket, and with `host-agent serve --listen` over TLS, where each request needs `Authorization: Bearer TOKEN` with a token whose scope (read, run, admin) covers the route."
    ),
    paths(
        create_vm, list_vms, inspect_vm, remove_vm, stop_vm, detach_vm, pause_vm, resume_vm,
        snapshot_vm, fork_vm, migrate_vm, cancel_migration, resolve_migration, warm_image, list_snapshots, remove_snapshot, restore_snapshot,
        vm_events, vm_console, put_files, get_files,
        list_images, inspect_image, remove_image, import_image, build_image,
        list_approvals, registration_link,
        create_token, list_tokens, remove_token,
        metrics, openapi_json,
    ),
    components(schemas(
        AgentExit, ApiError, BuildImage, BuildProgress, CreateSnapshot, CreateToken, CreateVm,
        CreatedToken, DiskCounters, Event, EventRecord, FilesCopied, ForkVm, ImportImage,
        MigrateVm, MigratedTo, MigrationEvent, MigrationOutcome, PendingApproval, PortForward, RegistrationLink, RestoreSnapshot, SnapshotInfo, Stream,
        TokenInfo, TokenScope, VmInfo, VmNetworkInfo, VmStatus, VmmExit, WarmImage,
    )),
    tags(
        (name = "vms", description = "Agents and their microVMs"),
        (name = "snapshots", description = "Saved VMs (memory and state) and their restores"),
        (name = "files", description = "Copying files into and out of a VM, as tar streams"),
        (name = "images", description = "Root file system images"),
        (name = "approvals", description = "Passkey approvals"),
        (name = "tokens", description = "The remote API's bearer tokens (admin)"),
        (name = "daemon", description = "Metrics and this description"),
    )
)]
struct Description;

/// Creates a VM and starts its agent.
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm, responses(
    (status = 201, description = "Created", body = VmInfo),
    (status = 400, description = "A bad request", body = ApiError),
    (status = 429, description = "The daemon already runs its most VMs", body = ApiError),
))]
#[allow(dead_code)]
fn create_vm() {}

/// Lists every VM, oldest first.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", responses(
    (status = 200, description = "The VMs", body = [VmInfo]),
))]
#[allow(dead_code)]
fn list_vms() {}

/// One VM.
#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 200, description = "The VM", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
    ))]
#[allow(dead_code)]
fn inspect_vm() {}

/// Forgets an ended VM and deletes its state.
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "The VM has not ended", body = ApiError),
    ))]
#[allow(dead_code)]
fn remove_vm() {}

/// Stops a VM (and the VMs it spawned that are not detached); answers once the VMM ended.
#[utoipa::path(post, path = "/v1/vms/{id}/stop", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 200, description = "The VM, ended", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
    ))]
#[allow(dead_code)]
fn stop_vm() {}

/// Lets a VM that another VM spawned outlive its parent.
#[utoipa::path(post, path = "/v1/vms/{id}/detach", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 200, description = "The VM", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "No VM spawned it", body = ApiError),
    ))]
#[allow(dead_code)]
fn detach_vm() {}

/// Pauses a running VM's vCPUs; answers once every vCPU is parked.
#[utoipa::path(post, path = "/v1/vms/{id}/pause", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 200, description = "The VM, paused", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "The VM is not running", body = ApiError),
        (status = 502, description = "The VMM refused or did not answer", body = ApiError),
    ))]
#[allow(dead_code)]
fn pause_vm() {}

/// Lets a paused VM's vCPUs run again.
#[utoipa::path(post, path = "/v1/vms/{id}/resume", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 200, description = "The VM, running", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "The VM is not running", body = ApiError),
        (status = 502, description = "The VMM refused or did not answer", body = ApiError),
    ))]
#[allow(dead_code)]
fn resume_vm() {}

/// Saves a VM's memory and state as a snapshot in the daemon's state folder. A running VM's
/// guest first stops its processes (so that none runs in a restored copy before the copy has a
/// new identity), is paused around it and resumed after; a paused one stays paused.
#[utoipa::path(post, path = "/v1/vms/{id}/snapshot", tag = "snapshots",
    params(("id" = String, Path, description = "The VM id")),
    request_body = CreateSnapshot,
    responses(
        (status = 201, description = "Taken", body = SnapshotInfo),
        (status = 400, description = "A bad name", body = ApiError),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "The VM is not running, or the name is taken", body = ApiError),
        (status = 502, description = "The VMM refused or did not answer, or the guest did not freeze", body = ApiError),
    ))]
#[allow(dead_code)]
fn snapshot_vm() {}

/// Makes `n` new VMs from a running VM: one snapshot of it (its guest frozen and paused around
/// it), `n` restores, and the snapshot removed. Each copy reseeds its kernel's random generator
/// from the host and draws a new sidecar boot id and key before any of its processes runs
/// again; it has its own VM id, so the parent's grants do not serve it.
#[utoipa::path(post, path = "/v1/vms/{id}/fork", tag = "snapshots",
    params(("id" = String, Path, description = "The VM id")),
    request_body = ForkVm,
    responses(
        (status = 201, description = "The new VMs", body = [VmInfo]),
        (status = 400, description = "n is not 1 to 8", body = ApiError),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "The VM is not running, or is paused", body = ApiError),
        (status = 422, description = "The VMM refused the snapshot", body = ApiError),
        (status = 429, description = "n more VMs would pass --max-vms", body = ApiError),
        (status = 502, description = "The VMM refused or did not answer", body = ApiError),
    ))]
#[allow(dead_code)]
fn fork_vm() {}

/// Live-migrates a running VM to another host: this daemon dials the target's daemon (a
/// pinned migration peer, over an authenticated and encrypted link), which starts a VMM to
/// receive it; memory is copied while the VM runs, and the VM stops only for the last pages and
/// its state. The stream says when the target accepted, each round, and how it ended: `moved`
/// (the VM runs there and has ended here), `kept` (it runs on here) or `unknown` (it stays
/// paused here until the target's host says which copy runs).
#[utoipa::path(post, path = "/v1/vms/{id}/migrate", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    request_body = MigrateVm,
    responses(
        (status = 200, description = "Newline-delimited events, the last one `ended`", body = [MigrationEvent], content_type = "application/x-ndjson"),
        (status = 400, description = "The host is not a pinned peer, or the VM cannot move yet", body = ApiError),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "The VM does not run, or migrates already", body = ApiError),
    ))]
#[allow(dead_code)]
fn migrate_vm() {}

/// Cancels the VM's live migration: the VM runs on here, unless its state has already gone
/// out (then the migration ends as it ends).
#[utoipa::path(delete, path = "/v1/vms/{id}/migrate", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 204, description = "Cancelled"),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "No migration of it runs", body = ApiError),
    ))]
#[allow(dead_code)]
fn cancel_migration() {}

/// Settles a migration whose outcome is unknown (the VM's state went out and no answer came):
/// this host asks the target's over the migration link. A copy there that runs or ran ends
/// this one (`migrated`); no copy there lets this one run again.
#[utoipa::path(post, path = "/v1/vms/{id}/migrate/resolve", tag = "vms",
    params(("id" = String, Path, description = "The VM id")),
    responses(
        (status = 200, description = "The VM as it now is", body = VmInfo),
        (status = 404, description = "No such VM", body = ApiError),
        (status = 409, description = "The VM has no migration of unknown outcome", body = ApiError),
        (status = 502, description = "The target host could not be asked", body = ApiError),
    ))]
#[allow(dead_code)]
fn resolve_migration() {}

/// Takes (or replaces) the image's warm template: a snapshot of a VM of the image booted up to
/// its sidecar's hello, with no agent. A later VM of this image at exactly this size, with no
/// files copied in at creation, is restored from it instead of booted (and takes a new identity
/// first, like every restored guest). Its name is `warm-`, the image digest and the size.
#[utoipa::path(post, path = "/v1/images/{name}/warm", tag = "images",
    params(("name" = String, Path, description = "The image's name")),
    request_body = WarmImage,
    responses(
        (status = 201, description = "The template's snapshot", body = SnapshotInfo),
        (status = 404, description = "No such image", body = ApiError),
        (status = 429, description = "The daemon already runs its most VMs", body = ApiError),
        (status = 502, description = "The template VM did not get ready, or the VMM refused", body = ApiError),
    ))]
#[allow(dead_code)]
fn warm_image() {}

/// Lists the snapshots, oldest first.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots", responses(
    (status = 200, description = "The snapshots", body = [SnapshotInfo]),
))]
#[allow(dead_code)]
fn list_snapshots() {}

/// Deletes a snapshot's files.
#[utoipa::path(delete, path = "/v1/snapshots/{name}", tag = "snapshots",
    params(("name" = String, Path, description = "The snapshot's name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 400, description = "A bad name", body = ApiError),
        (status = 404, description = "No such snapshot", body = ApiError),
    ))]
#[allow(dead_code)]
fn remove_snapshot() {}

/// Starts a new VM (with a new id) from a snapshot; answers once its VMM has restored it. Its
/// guest takes a new identity (fresh entropy, boot id and key) before it is admitted.
#[utoipa::path(post, path = "/v1/snapshots/{name}/restore", tag = "snapshots",
    params(("name" = String, Path, description = "The snapshot's name")),
    request_body = RestoreSnapshot,
    responses(
        (status = 201, description = "The new VM", body = VmInfo),
        (status = 400, description = "A bad name", body = ApiError),
        (status = 404, description = "No such snapshot", body = ApiError),
        (status = 422, description = "The snapshot is damaged, incomplete, of another format, or the VMM refused it", body = ApiError),
        (status = 429, description = "The daemon already runs its most VMs", body = ApiError),
    ))]
#[allow(dead_code)]
fn restore_snapshot() {}

/// The VM's agent events, newline-delimited; with `follow=true` until the VM has ended.
#[utoipa::path(get, path = "/v1/vms/{id}/events", tag = "vms",
    params(
        ("id" = String, Path, description = "The VM id"),
        ("follow" = Option<bool>, Query, description = "Keep streaming until the VM ends"),
    ),
    responses(
        (status = 200, description = "One event per line", body = EventRecord,
            content_type = "application/x-ndjson"),
        (status = 404, description = "No such VM", body = ApiError),
    ))]
#[allow(dead_code)]
fn vm_events() {}

/// The VM's raw console output.
#[utoipa::path(get, path = "/v1/vms/{id}/console", tag = "vms",
    params(
        ("id" = String, Path, description = "The VM id"),
        ("follow" = Option<bool>, Query, description = "Keep streaming until the VM ends"),
    ),
    responses(
        (status = 200, description = "The console bytes", body = Vec<u8>,
            content_type = "application/octet-stream"),
        (status = 404, description = "No such VM", body = ApiError),
    ))]
#[allow(dead_code)]
fn vm_console() {}

/// Unpacks a tar stream into the folder `path` of a running VM.
#[utoipa::path(put, path = "/v1/vms/{id}/files", tag = "files",
    params(
        ("id" = String, Path, description = "The VM id"),
        ("path" = String, Query, description = "The folder in the guest"),
    ),
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses(
        (status = 200, description = "Unpacked", body = FilesCopied),
        (status = 409, description = "The VM is not running or not ready", body = ApiError),
        (status = 413, description = "Over 2 GiB or 100 000 entries", body = ApiError),
        (status = 422, description = "A refused path or archive", body = ApiError),
    ))]
#[allow(dead_code)]
fn put_files() {}

/// A tar stream of the file or folder `path`, from a running VM or an ended VM's disk.
#[utoipa::path(get, path = "/v1/vms/{id}/files", tag = "files",
    params(
        ("id" = String, Path, description = "The VM id"),
        ("path" = String, Query, description = "The file or folder in the guest"),
    ),
    responses(
        (status = 200, description = "A tar stream", body = Vec<u8>,
            content_type = "application/x-tar"),
        (status = 404, description = "No such VM or path", body = ApiError),
        (status = 409, description = "The VM is not ready", body = ApiError),
        (status = 413, description = "Over 2 GiB or 100 000 entries", body = ApiError),
        (status = 422, description = "A refused path", body = ApiError),
    ))]
#[allow(dead_code)]
fn get_files() {}

/// Lists the images.
#[utoipa::path(get, path = "/v1/images", tag = "images", responses(
    (status = 200, description = "The images", body = [Object]),
))]
#[allow(dead_code)]
fn list_images() {}

/// One image.
#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "The image's name")),
    responses(
        (status = 200, description = "The image", body = Object),
        (status = 404, description = "No such image", body = ApiError),
    ))]
#[allow(dead_code)]
fn inspect_image() {}

/// Removes an image's name.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "The image's name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such image", body = ApiError),
    ))]
#[allow(dead_code)]
fn remove_image() {}

/// Imports a `docker save` tarball or an OCI layout that lies on the daemon's host.
#[utoipa::path(post, path = "/v1/images/import", tag = "images", request_body = ImportImage,
    responses(
        (status = 200, description = "The image", body = Object),
        (status = 422, description = "A refused image", body = ApiError),
    ))]
#[allow(dead_code)]
fn import_image() {}

/// Builds a Debian image; streams its progress, the last line `done` or `failed`.
#[utoipa::path(post, path = "/v1/images/build", tag = "images", request_body = BuildImage,
    responses(
        (status = 200, description = "One progress line per line", body = BuildProgress,
            content_type = "application/x-ndjson"),
    ))]
#[allow(dead_code)]
fn build_image() {}

/// The pending approval requests (none when approvals are off).
#[utoipa::path(get, path = "/v1/approvals", tag = "approvals", responses(
    (status = 200, description = "The pending requests", body = [PendingApproval]),
))]
#[allow(dead_code)]
fn list_approvals() {}

/// A one-time link to register a passkey.
#[utoipa::path(post, path = "/v1/approvals/registration", tag = "approvals", responses(
    (status = 200, description = "The link", body = RegistrationLink),
    (status = 409, description = "Approvals are off", body = ApiError),
))]
#[allow(dead_code)]
fn registration_link() {}

/// Makes a token; the answer holds it, this once.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateToken,
    responses(
        (status = 201, description = "Made", body = CreatedToken),
        (status = 409, description = "Too many tokens", body = ApiError),
    ))]
#[allow(dead_code)]
fn create_token() {}

/// Lists the tokens' records (never the tokens).
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens", responses(
    (status = 200, description = "The tokens", body = [TokenInfo]),
))]
#[allow(dead_code)]
fn list_tokens() {}

/// Removes a token: it stops working at once.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "The token's id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such token", body = ApiError),
    ))]
#[allow(dead_code)]
fn remove_token() {}

/// The daemon's figures in the Prometheus text format (OpenMetrics).
#[utoipa::path(get, path = "/metrics", tag = "daemon", responses(
    (status = 200, description = "The figures", body = String,
        content_type = "application/openmetrics-text"),
))]
#[allow(dead_code)]
fn metrics() {}

/// This description.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "daemon", responses(
    (status = 200, description = "The OpenAPI description", body = Object),
))]
#[allow(dead_code)]
fn openapi_json() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_description_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let made = json();
        if std::env::var_os("NANOCLAW_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, &made).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == made,
            "{} differs from the API's types and routes: refresh it with \
             NANOCLAW_WRITE_OPENAPI=1 cargo test -p nanoclaw-api, and review the diff",
            path.display()
        );
    }

    #[test]
    fn every_route_and_type_is_described() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        for path in [
            "/v1/vms",
            "/v1/vms/{id}/pause",
            "/v1/vms/{id}/snapshot",
            "/v1/snapshots",
            "/v1/snapshots/{name}/restore",
            "/v1/vms/{id}/files",
            "/v1/tokens/{id}",
            "/metrics",
            "/v1/openapi.json",
        ] {
            assert!(doc["paths"][path].is_object(), "{path}");
        }
        let schemas = &doc["components"]["schemas"];
        assert_eq!(
            schemas["TokenScope"]["enum"],
            serde_json::json!(["read", "run", "admin"])
        );
        assert!(
            schemas["CreateVm"]["required"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("command"))
        );
    }
}
