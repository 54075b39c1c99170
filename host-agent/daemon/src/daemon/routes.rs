//! The HTTP handlers of the daemon's API (the routes are listed in [`nanoclaw_api`]).
//!
//! Event streams replay `agent-output.ndjson` first and then follow the VM's live feed
//! ([`super::event_feed`]), skipping by sequence number what the replay already sent; a
//! subscriber that falls behind the feed re-reads the log from where it was. Each stream queues
//! at most [`EVENT_STREAM_QUEUE`] lines for its client (a line is at most one event, about
//! 1.4 MiB for a 1 MiB output frame).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::broadcast;
use tokio::sync::mpsc;

use super::event_feed::EventFeed;
use super::snapshots::SnapshotError;
use super::vm::{PauseError, Vm};
use super::{Daemon, DetachError, ForkError, RemoveError, RestoreError};
use crate::error_chain;
use crate::remote::tokens::TokenError;
use nanoclaw_api::{
    ApiError, CreateSnapshot, CreateToken, CreateVm, CreatedToken, Event, EventRecord, ForkVm,
    RestoreSnapshot, SnapshotInfo, TokenInfo, VmInfo,
};

/// Highest accepted guest RAM, in MiB.
const MAX_MEMORY_MIB: u64 = 64 * 1024;
/// Lowest accepted guest RAM, in MiB (the VMM's floor).
const MIN_MEMORY_MIB: u64 = 64;
/// Highest accepted vCPU count.
const MAX_VCPUS: u8 = 32;
/// Lines an event stream queues for a slow client.
pub const EVENT_STREAM_QUEUE: usize = 8;
/// How often a followed console log is polled for growth.
const CONSOLE_POLL: Duration = Duration::from_millis(200);

/// The API router over `daemon`.
pub fn router(daemon: Arc<Daemon>) -> axum::Router {
    axum::Router::new()
        .route("/v1/vms", post(create).get(list))
        .route("/v1/vms/{id}", get(inspect).delete(remove))
        .route("/v1/vms/{id}/stop", post(stop))
        .route("/v1/vms/{id}/detach", post(detach))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(remove_token))
        .route("/v1/vms/{id}/pause", post(pause))
        .route("/v1/vms/{id}/resume", post(resume))
        .route("/v1/vms/{id}/snapshot", post(snapshot))
        .route("/v1/vms/{id}/fork", post(fork))
        .route(
            "/v1/vms/{id}/migrate",
            post(migrate).delete(cancel_migration),
        )
        .route("/v1/vms/{id}/migrate/resolve", post(resolve_migration))
        .route("/v1/snapshots", get(list_snapshots))
        .route(
            "/v1/snapshots/{name}",
            axum::routing::delete(remove_snapshot),
        )
        .route("/v1/snapshots/{name}/restore", post(restore))
        .route("/v1/vms/{id}/events", get(events))
        .route("/v1/vms/{id}/console", get(console))
        .route(
            "/v1/vms/{id}/files",
            get(super::files::get).put(super::files::put),
        )
        .route("/v1/images", get(super::images::list))
        .route(
            "/v1/images/{name}",
            get(super::images::inspect).delete(super::images::remove),
        )
        .route("/v1/images/import", post(super::images::import))
        .route("/v1/images/build", post(super::images::build))
        .route("/v1/images/{name}/warm", post(warm_image))
        .route("/v1/approvals", get(approvals))
        .route("/v1/approvals/registration", post(registration_link))
        .with_state(daemon)
}

/// An error answer: a status and one line.
#[derive(Debug)]
pub struct Failure(pub StatusCode, pub String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

fn find(daemon: &Daemon, id: &str) -> Result<Arc<Vm>, Failure> {
    daemon
        .get(id)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no VM with id {id}")))
}

/// Checks a create request; the daemon, not the CLI, is authoritative.
pub(crate) fn validate(spec: &CreateVm) -> Result<(), String> {
    let no_nul = |what: &str, s: &str| {
        if s.contains('\0') {
            Err(format!("{what} contains a NUL byte"))
        } else {
            Ok(())
        }
    };
    if spec.command.is_empty() && spec.image.is_none() {
        return Err("command is empty".into());
    }
    if spec.ports.len() > nanoclaw_api::MAX_PORT_FORWARDS {
        return Err(format!(
            "at most {} forwarded ports",
            nanoclaw_api::MAX_PORT_FORWARDS
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for p in &spec.ports {
        let addr: std::net::IpAddr = p.host_addr.parse().map_err(|_| {
            format!(
                "port forward host_addr {:?} is not an IP address",
                p.host_addr
            )
        })?;
        if p.host_port == 0 || p.guest_port == 0 {
            return Err("forwarded ports must be 1 to 65535".into());
        }
        if !seen.insert((addr, p.host_port)) {
            return Err(format!(
                "host port {addr}:{} is forwarded twice",
                p.host_port
            ));
        }
    }
    if spec.image.is_some() && !(16..=nanoclaw_api::MAX_DISK_MIB).contains(&spec.disk_size_mib) {
        return Err(format!(
            "disk_size_mib must be 16 to {}",
            nanoclaw_api::MAX_DISK_MIB
        ));
    }
    if spec.image.is_none() && spec.cwd.is_empty() {
        return Err("cwd is empty".into());
    }
    if let Some(user) = &spec.user {
        no_nul("user", user)?;
    }
    no_nul("command", &spec.command)?;
    no_nul("cwd", &spec.cwd)?;
    for a in &spec.args {
        no_nul("an argument", a)?;
    }
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') {
            return Err(format!("bad environment variable name {k:?}"));
        }
        no_nul("an environment variable", k)?;
        no_nul("an environment value", v)?;
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
        return Err(format!(
            "memory_mib must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}"
        ));
    }
    if !(1..=MAX_VCPUS).contains(&spec.vcpus) {
        return Err(format!("vcpus must be 1 to {MAX_VCPUS}"));
    }
    if let Some(text) = &spec.profile {
        crate::policy::AccessPolicy::from_toml(text).map_err(|e| error_chain(&e))?;
    }
    Ok(())
}

async fn create(
    State(daemon): State<Arc<Daemon>>,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> Result<(StatusCode, Json<VmInfo>), Failure> {
    let Json(spec) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    validate(&spec).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let vm = daemon.create(spec).map_err(|e| {
        let line = error_chain(&e);
        tracing::error!(error = %line, "create failed");
        let status = match e {
            super::DaemonError::Image(_) => StatusCode::UNPROCESSABLE_ENTITY,
            super::DaemonError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, line)
    })?;
    Ok((StatusCode::CREATED, Json(vm.info())))
}

async fn approvals(State(daemon): State<Arc<Daemon>>) -> Json<Vec<nanoclaw_api::PendingApproval>> {
    Json(daemon.approvals().map(|a| a.pending()).unwrap_or_default())
}

async fn registration_link(
    State(daemon): State<Arc<Daemon>>,
) -> Result<Json<nanoclaw_api::RegistrationLink>, Failure> {
    let approvals = daemon.approvals().ok_or_else(|| {
        Failure(
            StatusCode::CONFLICT,
            "approvals are off (start the daemon with --approvals-listen)".into(),
        )
    })?;
    let url = approvals
        .registration_link()
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&e)))?;
    Ok(Json(nanoclaw_api::RegistrationLink { url }))
}

async fn list(State(daemon): State<Arc<Daemon>>) -> Json<Vec<VmInfo>> {
    Json(daemon.list().iter().map(|v| v.info()).collect())
}

async fn inspect(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<VmInfo>, Failure> {
    let vm = find(&daemon, &id)?;
    let mut info = vm.info();
    // A running networked VM: its firewall's refusals too (one `nft` run in its namespace).
    if let (Some(net), Some(ns), false) =
        (info.network.as_mut(), vm.netns(), info.status.is_terminal())
        && let Ok(Ok(counters)) =
            tokio::task::spawn_blocking(move || crate::net::firewall::counters(&ns)).await
    {
        for (name, c) in counters {
            net.counters.insert(format!("firewall_{name}"), c.packets);
        }
    }
    Ok(Json(info))
}

async fn remove(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    match daemon.remove(&id) {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(RemoveError::NotFound) => Err(Failure(
            StatusCode::NOT_FOUND,
            format!("no VM with id {id}"),
        )),
        Err(RemoveError::NotEnded(status)) => Err(Failure(
            StatusCode::CONFLICT,
            format!("VM {id} is {}; stop it first", status.as_str()),
        )),
        Err(e @ (RemoveError::Delete { .. } | RemoveError::Network(_))) => {
            Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&e)))
        }
    }
}

async fn stop(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<VmInfo>, Failure> {
    let vm = find(&daemon, &id)?;
    // The stop runs in its own task so that a client hanging up does not abandon it halfway.
    let grace = daemon.stop_grace();
    let task = tokio::spawn({
        let vm = Arc::clone(&vm);
        async move { vm.stop(grace).await }
    });
    let _ = task.await;
    Ok(Json(vm.info()))
}

async fn detach(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<VmInfo>, Failure> {
    match daemon.detach(&id) {
        Ok(vm) => Ok(Json(vm.info())),
        Err(DetachError::NotFound) => Err(Failure(
            StatusCode::NOT_FOUND,
            format!("no VM with id {id}"),
        )),
        Err(DetachError::NoParent) => Err(Failure(
            StatusCode::CONFLICT,
            format!("VM {id} was not spawned by another VM; there is nothing to detach"),
        )),
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        nanoclaw_api::openapi::json(),
    )
        .into_response()
}

async fn metrics(State(daemon): State<Arc<Daemon>>) -> Response {
    let vms: Vec<_> = daemon
        .list()
        .iter()
        .map(|vm| (vm.status(), vm.paused()))
        .collect();
    let text = crate::metrics::global().render(vms);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn create_token(
    State(daemon): State<Arc<Daemon>>,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let now = super::state::now_unix_ms();
    match daemon.tokens().create(req.scope, now) {
        Ok((token, info)) => {
            tracing::info!(id = %info.id, scope = req.scope.as_str(), "remote API token made");
            Ok((StatusCode::CREATED, Json(CreatedToken { token, info })))
        }
        Err(e @ TokenError::TooMany) => Err(Failure(StatusCode::CONFLICT, error_chain(&e))),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&e))),
    }
}

async fn list_tokens(State(daemon): State<Arc<Daemon>>) -> Json<Vec<TokenInfo>> {
    Json(daemon.tokens().list())
}

async fn remove_token(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    match daemon.tokens().remove(&id) {
        Ok(()) => {
            tracing::info!(%id, "remote API token removed");
            Ok(StatusCode::NO_CONTENT)
        }
        Err(e @ TokenError::NotFound(_)) => Err(Failure(StatusCode::NOT_FOUND, error_chain(&e))),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&e))),
    }
}

async fn pause(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<VmInfo>, Failure> {
    set_paused(&daemon, &id, true).await
}

async fn resume(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<VmInfo>, Failure> {
    set_paused(&daemon, &id, false).await
}

/// Pauses or resumes VM `id`: `409` unless its VMM runs, `502` when the VMM refused or did
/// not answer.
async fn set_paused(daemon: &Daemon, id: &str, paused: bool) -> Result<Json<VmInfo>, Failure> {
    let vm = find(daemon, id)?;
    // In its own task, so that a client hanging up does not leave the record behind the VMM.
    let task = tokio::spawn({
        let vm = Arc::clone(&vm);
        async move { vm.set_paused(paused).await }
    });
    match task.await {
        Ok(Ok(())) => Ok(Json(vm.info())),
        Ok(Err(e @ PauseError::NotRunning(_))) => {
            Err(Failure(StatusCode::CONFLICT, error_chain(&e)))
        }
        Ok(Err(e)) => Err(Failure(StatusCode::BAD_GATEWAY, error_chain(&e))),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// The status of a snapshot error.
fn snapshot_failure(e: &SnapshotError) -> Failure {
    let status = match e {
        SnapshotError::BadName(_) => StatusCode::BAD_REQUEST,
        SnapshotError::NotFound(_) | SnapshotError::NoVm(_) => StatusCode::NOT_FOUND,
        SnapshotError::Exists(_) | SnapshotError::NotRunning(_) => StatusCode::CONFLICT,
        SnapshotError::Vmm(_) | SnapshotError::NotPlain(_) | SnapshotError::Freeze(_) => {
            StatusCode::BAD_GATEWAY
        }
        SnapshotError::Missing { .. }
        | SnapshotError::Format { .. }
        | SnapshotError::Damaged { .. }
        | SnapshotError::ImageGone { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        SnapshotError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure(status, error_chain(e))
}

/// A JSON body that may be empty (then the default).
fn optional_body<T: Default + serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Takes a snapshot of VM `id` (see [`Daemon::snapshot`]).
async fn snapshot(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<SnapshotInfo>), Failure> {
    let req: CreateSnapshot = optional_body(&body)?;
    // In its own task, so that a client hanging up does not leave the VM paused.
    let task = tokio::spawn(async move { daemon.snapshot(&id, req.name).await });
    match task.await {
        Ok(Ok(info)) => {
            tracing::info!(snapshot = %info.name, vm = %info.source_vm, "snapshot stored");
            Ok((StatusCode::CREATED, Json(info)))
        }
        Ok(Err(e)) => Err(snapshot_failure(&e)),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

async fn list_snapshots(State(daemon): State<Arc<Daemon>>) -> Json<Vec<SnapshotInfo>> {
    Json(daemon.snapshots().list())
}

async fn remove_snapshot(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> Result<StatusCode, Failure> {
    daemon
        .snapshots()
        .remove(&name)
        .map_err(|e| snapshot_failure(&e))?;
    tracing::info!(snapshot = %name, "snapshot removed");
    Ok(StatusCode::NO_CONTENT)
}

/// Makes `n` VMs from VM `id` (see [`Daemon::fork`]).
async fn fork(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    body: Result<Json<ForkVm>, JsonRejection>,
) -> Result<(StatusCode, Json<Vec<VmInfo>>), Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let task = tokio::spawn(async move { daemon.fork(&id, req.n).await });
    match task.await {
        Ok(Ok(vms)) => Ok((
            StatusCode::CREATED,
            Json(vms.iter().map(|vm| vm.info()).collect()),
        )),
        Ok(Err(e @ ForkError::BadCount(_))) => {
            Err(Failure(StatusCode::BAD_REQUEST, error_chain(&e)))
        }
        Ok(Err(e @ ForkError::Paused(_))) => Err(Failure(StatusCode::CONFLICT, error_chain(&e))),
        Ok(Err(ForkError::Restore(e))) => Err(restore_failure(e)),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Starts a live migration and streams its events (see `super::migrate`). The migration goes
/// on if the client goes away; its outcome is in the VM's record.
async fn migrate(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    body: Result<Json<nanoclaw_api::MigrateVm>, JsonRejection>,
) -> Result<Response, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut events = daemon.start_migration(&id, req).map_err(migrate_failure)?;
    let (tx, rx) = mpsc::channel(EVENT_STREAM_QUEUE);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let Ok(mut line) = serde_json::to_vec(&event) else {
                continue;
            };
            line.push(b'\n');
            // A client that went away misses the rest; the migration goes on.
            let _ = tx.send(Ok(line.into())).await;
        }
    });
    Ok(streaming("application/x-ndjson", rx))
}

/// Settles a migration whose outcome is unknown by asking the target host.
async fn resolve_migration(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<Json<VmInfo>, Failure> {
    let task = tokio::spawn(async move { daemon.resolve_migration(&id).await });
    match task.await {
        Ok(Ok(info)) => Ok(Json(info)),
        Ok(Err(e)) => Err(migrate_failure(e)),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// The status of a migration error.
fn migrate_failure(e: super::migrate::MigrateError) -> Failure {
    use super::migrate::MigrateError;
    let status = match e {
        MigrateError::NoVm(_) => StatusCode::NOT_FOUND,
        MigrateError::Conflict { .. } => StatusCode::CONFLICT,
        MigrateError::Bad(_) => StatusCode::BAD_REQUEST,
        MigrateError::Unreachable(_) => StatusCode::BAD_GATEWAY,
    };
    Failure(status, error_chain(&e))
}

/// Cancels a VM's live migration.
async fn cancel_migration(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    find(&daemon, &id)?;
    if daemon.cancel_migration(&id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Failure(
            StatusCode::CONFLICT,
            format!("VM {id} is not migrating"),
        ))
    }
}

/// The status of a restore error.
fn restore_failure(e: RestoreError) -> Failure {
    match e {
        RestoreError::Snapshot(e) => snapshot_failure(&e),
        e @ RestoreError::Refused(_) => Failure(StatusCode::UNPROCESSABLE_ENTITY, error_chain(&e)),
        RestoreError::Daemon(e @ super::DaemonError::Limit(_)) => {
            Failure(StatusCode::TOO_MANY_REQUESTS, error_chain(&e))
        }
        e => Failure(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&e)),
    }
}

/// Takes image `name`'s warm template (see [`super::warm`]).
async fn warm_image(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<SnapshotInfo>), Failure> {
    let req: nanoclaw_api::WarmImage = optional_body(&body)?;
    // In its own task, so that a client hanging up does not leave the template VM behind.
    let task = tokio::spawn(async move { daemon.warm_image(&name, req).await });
    match task.await {
        Ok(Ok(info)) => Ok((StatusCode::CREATED, Json(info))),
        Ok(Err(e @ super::warm::WarmError::Create(super::DaemonError::Image(_)))) => {
            Err(Failure(StatusCode::NOT_FOUND, error_chain(&e)))
        }
        Ok(Err(e @ super::warm::WarmError::Create(super::DaemonError::Limit(_)))) => {
            Err(Failure(StatusCode::TOO_MANY_REQUESTS, error_chain(&e)))
        }
        Ok(Err(super::warm::WarmError::Snapshot(e))) => Err(snapshot_failure(&e)),
        Ok(Err(e)) => Err(Failure(StatusCode::BAD_GATEWAY, error_chain(&e))),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Starts a new VM from snapshot `name` (see [`Daemon::restore`]).
async fn restore(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<VmInfo>), Failure> {
    let req: RestoreSnapshot = optional_body(&body)?;
    let task = tokio::spawn(async move { daemon.restore(&name, req.paused).await });
    match task.await {
        Ok(Ok(vm)) => Ok((StatusCode::CREATED, Json(vm.info()))),
        Ok(Err(e)) => Err(restore_failure(e)),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// `?follow=true|false`.
#[derive(Debug, Deserialize)]
struct FollowQuery {
    #[serde(default)]
    follow: bool,
}

type Chunks = mpsc::Sender<Result<Bytes, Infallible>>;

pub(crate) fn streaming(
    content_type: &'static str,
    rx: mpsc::Receiver<Result<Bytes, Infallible>>,
) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn events(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<FollowQuery>,
) -> Result<Response, Failure> {
    let vm = find(&daemon, &id)?;
    let was_ended = *vm.ended().borrow();
    let live = vm.subscribe();
    let (tx, rx) = mpsc::channel(EVENT_STREAM_QUEUE);
    tokio::spawn(async move {
        let mut last = None;
        let ended = replay(&vm, &mut last, &tx).await;
        if q.follow && !was_ended && ended == Some(false) {
            follow(&vm, live, last, &tx).await;
        }
    });
    Ok(streaming("application/x-ndjson", rx))
}

/// Sends the logged events after `last`. `Some(true)` when the end event was among them,
/// `None` when the client went away.
async fn replay(vm: &Vm, last: &mut Option<u64>, tx: &Chunks) -> Option<bool> {
    let text = tokio::fs::read(vm.output_path()).await.unwrap_or_default();
    let mut ended = false;
    for line in text.split(|&b| b == b'\n') {
        let Ok(rec) = serde_json::from_slice::<EventRecord>(line) else {
            continue;
        };
        if last.is_some_and(|l| rec.seq <= l) {
            continue;
        }
        *last = Some(rec.seq);
        ended |= matches!(rec.event, Event::Ended { .. });
        let mut chunk = line.to_vec();
        chunk.push(b'\n');
        tx.send(Ok(chunk.into())).await.ok()?;
    }
    Some(ended)
}

async fn follow(vm: &Vm, mut live: EventFeed, mut last: Option<u64>, tx: &Chunks) {
    loop {
        match live.recv().await {
            Ok(rec) => {
                if last.is_some_and(|l| rec.seq <= l) {
                    continue;
                }
                last = Some(rec.seq);
                let mut line = serde_json::to_vec(&*rec).unwrap_or_default();
                line.push(b'\n');
                if tx.send(Ok(line.into())).await.is_err() {
                    return;
                }
                if matches!(rec.event, Event::Ended { .. }) {
                    return;
                }
            }
            // Too slow for the live feed: catch up from the log (which lacks only output dropped
            // over its cap).
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if replay(vm, &mut last, tx).await != Some(false) {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn console(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Query(q): Query<FollowQuery>,
) -> Result<Response, Failure> {
    let vm = find(&daemon, &id)?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = vm.vmm_dir.join(super::state::CONSOLE_FILE);
        let ended = vm.ended();
        let mut offset = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Read the state first so the final read after the end sees everything.
            let was_ended = *ended.borrow();
            // The VMM's folder is the (possibly hostile) VMM's: never follow a link out of it.
            if let Ok(mut f) = tokio::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .await
                && f.seek(std::io::SeekFrom::Start(offset)).await.is_ok()
            {
                while let Ok(n) = f.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    offset += n as u64;
                    if tx
                        .send(Ok(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            if !q.follow || was_ended {
                return;
            }
            tokio::time::sleep(CONSOLE_POLL).await;
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(streaming("application/octet-stream", rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_refuses_bad_specs() {
        let ok = CreateVm::new("/bin/sh", vec![]);
        assert_eq!(validate(&ok), Ok(()));
        let mut s = ok.clone();
        s.command.clear();
        assert!(validate(&s).is_err());
        let mut s = ok.clone();
        s.env.push(("A=B".into(), "x".into()));
        assert!(validate(&s).is_err());
        let mut s = ok.clone();
        s.args.push("a\0b".into());
        assert!(validate(&s).is_err());
        let mut s = ok.clone();
        s.vcpus = 0;
        assert!(validate(&s).is_err());
        let mut s = ok.clone();
        s.memory_mib = 1;
        assert!(validate(&s).is_err());
        let mut s = ok.clone();
        s.profile = Some("name = \"p\"\ntier = \"worker\"\n".into());
        assert_eq!(validate(&s), Ok(()));
        let mut s = ok;
        s.profile = Some("name = \"p\"\ntier = \"wroker\"\n".into());
        let e = validate(&s).unwrap_err();
        assert!(e.contains("profile"), "{e}");
    }
}
