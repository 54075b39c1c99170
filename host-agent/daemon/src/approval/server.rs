//! The approval pages and their JSON API, served by axum on a TCP listener (localhost: a
//! secure context for WebAuthn, rp id `localhost`).
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /register` | | the registration page (the link's token is in the fragment) |
//! | `GET /approve/{id}` | | the approval page |
//! | `GET /static/webauthn.js` | | the pages' script |
//! | `GET /sw.js` | | the service worker that shows push notifications |
//! | `POST /api/register/begin` | `{"token"}` | `{"challenge","rp_id","user_id","exclude","push_key"}` |
//! | `POST /api/register/finish` | `{"challenge","attestation_object","client_data_json","push"}` | `{"credential_id","push_error"}` |
//! | `GET /api/approvals/{id}` | | a [`PendingView`] plus the rp id and credential ids |
//! | `POST /api/approvals/{id}/approve` | an [`Assertion`] | `{"approval_id"}` |
//! | `POST /api/approvals/{id}/deny` | | `{}` |
//!
//! A browser subscribes to Web Push (`push`, its `PushSubscription`) only while registering its
//! passkey, so that only the holder of a registration link can add a receiver of notices.
//!
//! Errors are a 4xx status with `{"error": "..."}`. Every request must carry the expected
//! `Host` (the origin's host and port), which keeps a DNS-rebinding page from talking to it,
//! and every answer forbids framing and sets a strict Content-Security-Policy (the pages load
//! only their own script; no inline code).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};
use shared_proto::approval::{Assertion, Registration};
// The registration and approval pages and their script are shared with vault-device's own
// approval page (`shared_proto::approval::pages`); the service worker is the host's only.
use shared_proto::approval::pages::{APPROVE_HTML, REGISTER_HTML, WEBAUTHN_JS};

use super::passkey::{PasskeyApprover, PasskeyError, PendingView};
use crate::error_chain;
use crate::notify::webpush::{Subscription, WebPush};

const SERVICE_WORKER_JS: &str = include_str!("pages/sw.js");

/// The user handle given to the authenticator (one user: the owner of this host).
const USER_NAME: &str = "nanoclaw-owner";

/// What the handlers share.
#[derive(Debug, Clone)]
struct Pages {
    approver: PasskeyApprover,
    push: Option<WebPush>,
}

/// The router of the pages and API over `approver`, offering Web Push subscriptions through
/// `push` when it is given.
pub fn router(approver: PasskeyApprover, push: Option<WebPush>) -> axum::Router {
    let pages = Pages { approver, push };
    axum::Router::new()
        .route("/register", get(|| page(REGISTER_HTML)))
        .route("/approve/{id}", get(|| page(APPROVE_HTML)))
        .route("/static/webauthn.js", get(|| script(WEBAUTHN_JS)))
        .route("/sw.js", get(|| script(SERVICE_WORKER_JS)))
        .route("/api/register/begin", post(register_begin))
        .route("/api/register/finish", post(register_finish))
        .route("/api/approvals/{id}", get(show))
        .route("/api/approvals/{id}/approve", post(approve))
        .route("/api/approvals/{id}/deny", post(deny))
        .layer(axum::middleware::from_fn_with_state(pages.clone(), guard))
        .with_state(pages)
}

/// Refuses a wrong `Host` and sets the security headers on every answer.
async fn guard(State(pages): State<Pages>, req: Request, next: Next) -> Response {
    let origin = &pages.approver.relying_party().origin;
    let expected = origin.split_once("://").map_or(origin.as_str(), |(_, h)| h);
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if host != Some(expected) {
        return Failure(StatusCode::MISDIRECTED_REQUEST, "wrong Host".into()).into_response();
    }
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    for (name, value) in shared_proto::approval::pages::SECURITY_HEADERS {
        h.insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    resp
}

/// An error answer.
#[derive(Debug)]
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl From<PasskeyError> for Failure {
    fn from(e: PasskeyError) -> Self {
        let status = match &e {
            PasskeyError::NoSuchRequest(_) | PasskeyError::NoSuchRegistration => {
                StatusCode::NOT_FOUND
            }
            PasskeyError::Verify(_) | PasskeyError::BadToken | PasskeyError::NoPasskey => {
                StatusCode::FORBIDDEN
            }
            PasskeyError::Duplicate => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, error_chain(&e))
    }
}

fn bad_json(e: JsonRejection) -> Failure {
    Failure(StatusCode::BAD_REQUEST, e.body_text())
}

async fn page(html: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn script(js: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        js,
    )
        .into_response()
}

#[derive(Deserialize)]
struct BeginBody {
    token: String,
}

#[derive(Serialize)]
struct BeginAnswer {
    challenge: String,
    rp_id: String,
    user_id: String,
    user_name: &'static str,
    exclude: Vec<String>,
    push_key: Option<String>,
}

async fn register_begin(
    State(pages): State<Pages>,
    body: Result<Json<BeginBody>, JsonRejection>,
) -> Result<Json<BeginAnswer>, Failure> {
    let Json(body) = body.map_err(bad_json)?;
    let (challenge, exclude) = pages.approver.begin_registration(&body.token)?;
    Ok(Json(BeginAnswer {
        challenge,
        rp_id: pages.approver.relying_party().rp_id.clone(),
        user_id: B64URL.encode(USER_NAME),
        user_name: USER_NAME,
        exclude,
        push_key: pages.push.as_ref().map(WebPush::public_key),
    }))
}

#[derive(Deserialize)]
struct FinishBody {
    challenge: String,
    #[serde(flatten)]
    registration: Registration,
    #[serde(default)]
    push: Option<Subscription>,
}

async fn register_finish(
    State(pages): State<Pages>,
    body: Result<Json<FinishBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(body) = body.map_err(bad_json)?;
    let id = pages
        .approver
        .finish_registration(&body.challenge, &body.registration)?;
    // The passkey is registered either way; a refused subscription is reported, not fatal.
    let push_error = match (body.push, &pages.push) {
        (Some(sub), Some(push)) => push.subscribe(sub).err().map(|e| error_chain(&e)),
        (Some(_), None) => Some("Web Push is not configured".to_owned()),
        (None, _) => None,
    };
    Ok(Json(
        serde_json::json!({"credential_id": id, "push_error": push_error}),
    ))
}

#[derive(Serialize)]
struct ShowAnswer {
    #[serde(flatten)]
    view: PendingView,
    rp_id: String,
    credential_ids: Vec<String>,
}

async fn show(
    State(Pages { approver, .. }): State<Pages>,
    Path(id): Path<String>,
) -> Result<Json<ShowAnswer>, Failure> {
    let view = approver.get(&id).ok_or(PasskeyError::NoSuchRequest(id))?;
    Ok(Json(ShowAnswer {
        view,
        rp_id: approver.relying_party().rp_id.clone(),
        credential_ids: approver
            .passkeys()
            .iter()
            .map(|p| B64URL.encode(&p.credential_id))
            .collect(),
    }))
}

async fn approve(
    State(Pages { approver, .. }): State<Pages>,
    Path(id): Path<String>,
    body: Result<Json<Assertion>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(assertion) = body.map_err(bad_json)?;
    let approval_id = approver.approve(&id, &assertion)?;
    Ok(Json(serde_json::json!({"approval_id": approval_id})))
}

async fn deny(
    State(Pages { approver, .. }): State<Pages>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Failure> {
    approver.deny(&id)?;
    Ok(Json(serde_json::json!({})))
}

/// Errors of starting the approval server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Opening the audit log failed.
    #[error("cannot open the audit log")]
    Audit(#[source] nanoclaw_audit::AuditError),
    /// Setting up Web Push failed.
    #[error("cannot set up Web Push")]
    Push(#[source] crate::notify::NotifyError),
    /// Setting up the approver failed.
    #[error("cannot set up passkey approvals")]
    Approver(#[source] PasskeyError),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The origin is not `http(s)://HOST[:PORT]`.
    #[error("bad approvals origin {0:?} (expected http://localhost:PORT or https://HOST)")]
    Origin(String),
}

/// Where and how the daemon serves approvals.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The TCP address of the pages (e.g. `127.0.0.1:8443`).
    pub listen: std::net::SocketAddr,
    /// The pages' origin as the browser sees it (default `http://localhost:PORT`); its host is
    /// the rp id.
    pub origin: Option<String>,
    /// How long a request waits.
    pub ttl: std::time::Duration,
    /// The audit log.
    pub audit: std::sync::Arc<nanoclaw_audit::AuditLog>,
    /// Where passkeys are kept.
    pub passkeys_file: std::path::PathBuf,
    /// Who to notify of new requests.
    pub notifiers: Vec<std::sync::Arc<dyn crate::notify::Notifier>>,
    /// Web Push, if configured: a notifier and the subscriptions browsers make on the pages.
    pub push: Option<WebPush>,
}

/// Binds the approval pages' listener, builds the approver and serves in the background.
pub async fn start(config: ServeConfig) -> Result<PasskeyApprover, ServerError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: config.listen,
            source,
        })?
        .port();
    let origin = config
        .origin
        .unwrap_or_else(|| format!("http://localhost:{port}"));
    let rp_id = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host))
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .ok_or_else(|| ServerError::Origin(origin.clone()))?
        .to_owned();
    let approver = PasskeyApprover::new(
        super::passkey::ApprovalConfig {
            rp: shared_proto::approval::RelyingParty {
                rp_id,
                origin: origin.clone(),
            },
            ttl: config.ttl,
            passkeys_file: Some(config.passkeys_file),
        },
        config.audit,
        {
            let mut n = config.notifiers;
            if let Some(push) = &config.push {
                n.push(std::sync::Arc::new(push.clone()));
            }
            n
        },
    )
    .map_err(ServerError::Approver)?;
    let app = router(approver.clone(), config.push);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "approval server failed");
        }
    });
    tracing::info!(%origin, "approval pages listening");
    Ok(approver)
}
