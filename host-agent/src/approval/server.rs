//! The approval pages and their JSON API, served by axum on a TCP listener (localhost: a
//! secure context for WebAuthn, rp id `localhost`).
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /register` | | the registration page (the link's token is in the fragment) |
//! | `GET /approve/{id}` | | the approval page |
//! | `GET /static/webauthn.js` | | the pages' script |
//! | `POST /api/register/begin` | `{"token"}` | `{"challenge","rp_id","user_id","exclude"}` |
//! | `POST /api/register/finish` | `{"challenge","attestation_object","client_data_json"}` | `{"credential_id"}` |
//! | `GET /api/approvals/{id}` | | a [`PendingView`] plus the rp id and credential ids |
//! | `POST /api/approvals/{id}/approve` | an [`Assertion`] | `{"approval_id"}` |
//! | `POST /api/approvals/{id}/deny` | | `{}` |
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

use super::passkey::{PasskeyApprover, PasskeyError, PendingView};
use crate::error_chain;

const REGISTER_HTML: &str = include_str!("pages/register.html");
const APPROVE_HTML: &str = include_str!("pages/approve.html");
const WEBAUTHN_JS: &str = include_str!("pages/webauthn.js");

/// The user handle given to the authenticator (one user: the owner of this host).
const USER_NAME: &str = "nanoclaw-owner";

/// The router of the pages and API over `approver`.
pub fn router(approver: PasskeyApprover) -> axum::Router {
    axum::Router::new()
        .route("/register", get(|| page(REGISTER_HTML)))
        .route("/approve/{id}", get(|| page(APPROVE_HTML)))
        .route("/static/webauthn.js", get(script))
        .route("/api/register/begin", post(register_begin))
        .route("/api/register/finish", post(register_finish))
        .route("/api/approvals/{id}", get(show))
        .route("/api/approvals/{id}/approve", post(approve))
        .route("/api/approvals/{id}/deny", post(deny))
        .layer(axum::middleware::from_fn_with_state(
            approver.clone(),
            guard,
        ))
        .with_state(approver)
}

/// Refuses a wrong `Host` and sets the security headers on every answer.
async fn guard(State(approver): State<PasskeyApprover>, req: Request, next: Next) -> Response {
    let origin = &approver.relying_party().origin;
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
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
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

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        WEBAUTHN_JS,
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
}

async fn register_begin(
    State(approver): State<PasskeyApprover>,
    body: Result<Json<BeginBody>, JsonRejection>,
) -> Result<Json<BeginAnswer>, Failure> {
    let Json(body) = body.map_err(bad_json)?;
    let (challenge, exclude) = approver.begin_registration(&body.token)?;
    Ok(Json(BeginAnswer {
        challenge,
        rp_id: approver.relying_party().rp_id.clone(),
        user_id: B64URL.encode(USER_NAME),
        user_name: USER_NAME,
        exclude,
    }))
}

#[derive(Deserialize)]
struct FinishBody {
    challenge: String,
    #[serde(flatten)]
    registration: Registration,
}

async fn register_finish(
    State(approver): State<PasskeyApprover>,
    body: Result<Json<FinishBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(body) = body.map_err(bad_json)?;
    let id = approver.finish_registration(&body.challenge, &body.registration)?;
    Ok(Json(serde_json::json!({"credential_id": id})))
}

#[derive(Serialize)]
struct ShowAnswer {
    #[serde(flatten)]
    view: PendingView,
    rp_id: String,
    credential_ids: Vec<String>,
}

async fn show(
    State(approver): State<PasskeyApprover>,
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
    State(approver): State<PasskeyApprover>,
    Path(id): Path<String>,
    body: Result<Json<Assertion>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(assertion) = body.map_err(bad_json)?;
    let approval_id = approver.approve(&id, &assertion)?;
    Ok(Json(serde_json::json!({"approval_id": approval_id})))
}

async fn deny(
    State(approver): State<PasskeyApprover>,
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
    Audit(#[source] crate::audit::AuditError),
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
    pub audit: std::sync::Arc<crate::audit::AuditLog>,
    /// Where passkeys are kept.
    pub passkeys_file: std::path::PathBuf,
    /// Who to notify of new requests.
    pub notifiers: Vec<std::sync::Arc<dyn crate::notify::Notifier>>,
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
        config.notifiers,
    )
    .map_err(ServerError::Approver)?;
    let app = router(approver.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "approval server failed");
        }
    });
    tracing::info!(%origin, "approval pages listening");
    Ok(approver)
}
