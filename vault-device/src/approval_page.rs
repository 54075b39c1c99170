//! The device's own approval page: the user reads a credential request on a page the device
//! serves, and the passkey signs the request the device built, on the device's own origin.
//!
//! This is what makes the device, the enforcement point of a credential release, also the one
//! that shows it (see "Why the device shows the request itself" in [`crate::approval`]). The
//! page listens on a loopback address only ([`bind`] refuses any other), so it is reachable from
//! the user's machine and from nowhere else; its origin is `http://localhost:PORT` and its rp
//! id `localhost` (browsers treat `http://localhost` as a secure context, so WebAuthn runs
//! there). The pages and their script are the ones the host serves
//! ([`shared_proto::approval::pages`]), over the same JSON API, plus a page of pending asks.
//!
//! | method and path | body | answer |
//! | --- | --- | --- |
//! | `GET /` | | the page of pending asks |
//! | `GET /register` | | the registration page (the one-time token in the fragment) |
//! | `GET /approve/{id}` | | the approval page of one ask |
//! | `GET /static/webauthn.js` | | the pages' script |
//! | `GET /api/approvals` | | the pending asks, oldest first ([`PageView`]s) |
//! | `GET /api/approvals/{id}` | | one [`PageView`] plus the rp id and credential ids |
//! | `POST /api/approvals/{id}/approve` | an [`Assertion`] | `{"approval_id"}` |
//! | `POST /api/approvals/{id}/deny` | | `{}` |
//! | `POST /api/register/begin` | `{"token"}` | `{"challenge","rp_id","user_id","user_name","exclude","push_key"}` |
//! | `POST /api/register/finish` | `{"challenge","attestation_object","client_data_json"}` | `{"credential_id","push_error"}` |
//!
//! # Registration
//!
//! Only while a one-time token is open ([`ApprovalPage::open_registration`], printed on the
//! device's terminal as a link whose fragment holds it): a WebAuthn registration ceremony on
//! this page, checked by [`verify_registration`] against the page's own relying party, stores
//! the passkey in the passkey file ([`PasskeyFile::register`]). The token works until one
//! registration succeeds or [`REGISTRATION_TTL`] passes. A passkey registered here is trusted
//! because the user made it on the device's page, not because a host vouched for it.
//!
//! # Approving
//!
//! The asks are the device's own ([`Device::page_pending`]): the request each shows, and whose
//! SHA-256 the passkey signs, is built and held by the device. Approve posts the assertion and
//! [`Device::page_approve`] checks it with [`crate::approval::check_evidence`] against that
//! held request and the stored relying party (one-use approval ids, the counter, the grant
//! log); deny fails the waiting call at once.
//!
//! # Requests from other pages
//!
//! Every request must carry `Host: localhost:PORT` (a DNS-rebinding page names another
//! host); a request with an `Origin` must name this page's origin, and a request that changes
//! anything (any method but `GET` and `HEAD`) must carry one, so no other page the browser
//! shows can approve, deny or register. `Sec-Fetch-Site`, when sent, must be `same-origin` or
//! `none`. Bodies are bounded ([`MAX_BODY`]); answers forbid framing and set a strict
//! Content-Security-Policy (the pages load only their own script).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use shared_proto::approval::pages::{APPROVE_HTML, REGISTER_HTML, WEBAUTHN_JS};
use shared_proto::approval::{
    ApprovalError, Assertion, Registration, RelyingParty, verify_registration,
};
use tokio::sync::watch;

use crate::approval::{ApprovalCheckError, PasskeyFile};
use crate::device::{Device, PageView, now_unix_ms};

/// The page of pending asks.
const PENDING_HTML: &str = include_str!("approval_page/pending.html");

/// The largest request body accepted (an assertion is well under 4 KiB).
pub const MAX_BODY: usize = 16 * 1024;
/// The longest an approval id in a path may be.
const MAX_ID_LEN: usize = 64;
/// How long a registration token stays open.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a registration challenge lives.
const CHALLENGE_TTL: Duration = Duration::from_secs(5 * 60);
/// Registration challenges outstanding at once (the oldest is dropped beyond it).
const MAX_CHALLENGES: usize = 8;
/// The user handle given to the authenticator (one user: the owner of this device).
const USER_NAME: &str = "nanoclaw-device-owner";

/// Errors of the device's approval page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The page would be reachable from other machines.
    #[error(
        "the approval page listens on loopback only (127.0.0.1 or ::1), not {0}: it shows \
         credential requests and takes approvals, and must not be reachable from other machines"
    )]
    NotLoopback(SocketAddr),
    /// Binding the listener failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No registration token is open, or this one is wrong or expired.
    #[error("this registration link is not valid (expired, used, or never issued)")]
    BadToken,
    /// The registration names no challenge this page issued (or it expired).
    #[error("no such registration (expired or already finished)")]
    NoSuchRegistration,
    /// The registration does not verify.
    #[error("the passkey registration does not verify")]
    Verify(#[source] ApprovalError),
    /// The passkey file, or an approval.
    #[error(transparent)]
    Approval(#[from] ApprovalCheckError),
    /// This page serves registration only (`vault-device passkey register`).
    #[error("no requests are shown here: this page only registers a passkey")]
    NoDevice,
}

/// Binds the page's listener on `listen`, which must be a loopback address (port 0 picks
/// one), and answers it with the page's relying party: origin `http://localhost:PORT`, rp id
/// `localhost`.
pub async fn bind(
    listen: SocketAddr,
) -> Result<(tokio::net::TcpListener, RelyingParty), PageError> {
    if !listen.ip().is_loopback() {
        return Err(PageError::NotLoopback(listen));
    }
    let bind_err = |source| PageError::Bind {
        addr: listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(bind_err)?;
    let port = listener.local_addr().map_err(bind_err)?.port();
    Ok((listener, relying_party(port)))
}

/// The relying party of the page on `port`.
pub fn relying_party(port: u16) -> RelyingParty {
    RelyingParty {
        rp_id: "localhost".into(),
        origin: format!("http://localhost:{port}"),
    }
}

struct OpenRegistration {
    token: String,
    until: Instant,
    /// Challenges issued, base64url, with their expiry.
    challenges: Vec<(String, Instant)>,
}

struct Inner {
    rp: RelyingParty,
    /// The `Host` header every request must carry.
    host: String,
    /// The passkey file, behind the lock every read-check-write of it takes.
    passkey_file: Arc<tokio::sync::Mutex<PathBuf>>,
    device: Option<Arc<Device>>,
    registration: Mutex<Option<OpenRegistration>>,
    /// Counts successful registrations.
    registered: watch::Sender<u64>,
}

/// The device's approval page: its relying party, its registration state and the device whose
/// asks it shows.
#[derive(Clone)]
pub struct ApprovalPage {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApprovalPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalPage")
            .field("origin", &self.inner.rp.origin)
            .finish_non_exhaustive()
    }
}

fn random_b64<const N: usize>() -> String {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    B64URL.encode(b)
}

impl ApprovalPage {
    /// The page of `device` at `rp` (from [`bind`]); tells the device that its asks are shown
    /// here.
    pub fn for_device(device: Arc<Device>, rp: RelyingParty) -> Self {
        device.set_approval_page(Some(rp.clone()));
        Self::new(rp, device.passkey_lock(), Some(device))
    }

    /// A page that only registers passkeys into the passkey file at `passkey_file` (the vault's
    /// `<vault>.passkeys.json`), for `vault-device passkey register`.
    pub fn registration_only(rp: RelyingParty, passkey_file: PathBuf) -> Self {
        Self::new(rp, Arc::new(tokio::sync::Mutex::new(passkey_file)), None)
    }

    fn new(
        rp: RelyingParty,
        passkey_file: Arc<tokio::sync::Mutex<PathBuf>>,
        device: Option<Arc<Device>>,
    ) -> Self {
        let host = rp
            .origin
            .split_once("://")
            .map_or(rp.origin.as_str(), |(_, h)| h)
            .to_owned();
        Self {
            inner: Arc::new(Inner {
                rp,
                host,
                passkey_file,
                device,
                registration: Mutex::new(None),
                registered: watch::channel(0).0,
            }),
        }
    }

    /// The page's relying party.
    pub fn relying_party(&self) -> &RelyingParty {
        &self.inner.rp
    }

    fn registration(&self) -> MutexGuard<'_, Option<OpenRegistration>> {
        self.inner
            .registration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Opens registration with a new one-time token (replacing any open one) and answers the
    /// link to give the user: `http://localhost:PORT/register#TOKEN`.
    pub fn open_registration(&self) -> String {
        let token = random_b64::<24>();
        *self.registration() = Some(OpenRegistration {
            token: token.clone(),
            until: Instant::now() + REGISTRATION_TTL,
            challenges: Vec::new(),
        });
        format!("{}/register#{token}", self.inner.rp.origin)
    }

    /// Waits until a registration succeeds (after this call).
    pub async fn registered(&self) {
        let mut rx = self.inner.registered.subscribe();
        let _ = rx.changed().await;
    }

    fn begin_registration(&self, token: &str) -> Result<String, PageError> {
        let now = Instant::now();
        let mut reg = self.registration();
        let open = reg
            .as_mut()
            .filter(|r| r.until > now && constant_time_eq(r.token.as_bytes(), token.as_bytes()))
            .ok_or(PageError::BadToken)?;
        open.challenges.retain(|(_, until)| *until > now);
        if open.challenges.len() >= MAX_CHALLENGES {
            open.challenges.remove(0);
        }
        let challenge = random_b64::<32>();
        open.challenges
            .push((challenge.clone(), now + CHALLENGE_TTL));
        Ok(challenge)
    }

    async fn finish_registration(
        &self,
        challenge: &str,
        registration: &Registration,
    ) -> Result<String, PageError> {
        {
            let now = Instant::now();
            let mut reg = self.registration();
            let open = reg
                .as_mut()
                .filter(|r| r.until > now)
                .ok_or(PageError::NoSuchRegistration)?;
            let at = open
                .challenges
                .iter()
                .position(|(c, until)| c == challenge && *until > now)
                .ok_or(PageError::NoSuchRegistration)?;
            open.challenges.remove(at);
        }
        let raw = B64URL
            .decode(challenge)
            .map_err(|_| PageError::NoSuchRegistration)?;
        let passkey =
            verify_registration(&self.inner.rp, &raw, registration).map_err(PageError::Verify)?;
        let id = B64URL.encode(&passkey.credential_id);
        let path = self.inner.passkey_file.lock().await;
        let mut store = PasskeyFile::load(&path)?;
        let fingerprint = crate::approval::fingerprint(&passkey);
        store.register(passkey, &self.inner.rp)?;
        store.save(&path)?;
        drop(path);
        // One registration per token.
        *self.registration() = None;
        self.inner.registered.send_modify(|n| *n += 1);
        tracing::info!(credential_id = %id, key = %fingerprint, origin = %self.inner.rp.origin,
            "passkey registered on the device's approval page");
        Ok(id)
    }

    fn device(&self) -> Result<&Arc<Device>, PageError> {
        self.inner.device.as_ref().ok_or(PageError::NoDevice)
    }

    async fn credential_ids(&self) -> Result<Vec<String>, PageError> {
        let path = self.inner.passkey_file.lock().await;
        let store = PasskeyFile::load(&path)?;
        Ok(store
            .passkeys
            .iter()
            .map(|p| B64URL.encode(&p.credential_id))
            .collect())
    }

    /// The router of the page and its API.
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .route("/", get(|| page(PENDING_HTML)))
            .route("/register", get(|| page(REGISTER_HTML)))
            .route("/approve/{id}", get(|| page(APPROVE_HTML)))
            .route("/static/webauthn.js", get(script))
            .route("/api/approvals", get(list))
            .route("/api/approvals/{id}", get(show))
            .route("/api/approvals/{id}/approve", post(approve))
            .route("/api/approvals/{id}/deny", post(deny))
            .route("/api/register/begin", post(register_begin))
            .route("/api/register/finish", post(register_finish))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .layer(axum::middleware::from_fn_with_state(self.clone(), guard))
            .with_state(self.clone())
    }

    /// Serves the page on `listener` until the task is dropped or the listener fails.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        axum::serve(listener, self.router()).await
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why [`guard`] refused a request, if it did.
fn refusal(page: &ApprovalPage, req: &Request) -> Option<Failure> {
    let headers = req.headers();
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if text(header::HOST) != Some(page.inner.host.as_str()) {
        return Some(Failure(
            StatusCode::MISDIRECTED_REQUEST,
            "wrong Host".into(),
        ));
    }
    match text(header::ORIGIN) {
        Some(origin) if origin != page.inner.rp.origin => {
            return Some(Failure(
                StatusCode::FORBIDDEN,
                "cross-origin request refused".into(),
            ));
        }
        None if req.method() != Method::GET && req.method() != Method::HEAD => {
            return Some(Failure(
                StatusCode::FORBIDDEN,
                "a request that changes anything must carry this page's Origin".into(),
            ));
        }
        _ => {}
    }
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site"))
        && site != "same-origin"
        && site != "none"
    {
        return Some(Failure(
            StatusCode::FORBIDDEN,
            "cross-site request refused".into(),
        ));
    }
    None
}

/// Refuses requests from anywhere but this page (see the module doc) and sets the security
/// headers on every answer.
async fn guard(State(page): State<ApprovalPage>, req: Request, next: Next) -> Response {
    let mut resp = match refusal(&page, &req) {
        // Any local page can send these: not above debug.
        Some(f) => {
            tracing::debug!(method = %req.method(), path = %req.uri().path(), reason = %f.1,
                "approval page request refused");
            f.into_response()
        }
        None => next.run(req).await,
    };
    let h = resp.headers_mut();
    for (name, value) in shared_proto::approval::pages::SECURITY_HEADERS {
        h.insert(
            header::HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    resp
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug)]
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}

impl From<PageError> for Failure {
    fn from(e: PageError) -> Self {
        let status = match &e {
            PageError::BadToken | PageError::Verify(_) => StatusCode::FORBIDDEN,
            PageError::NoSuchRegistration | PageError::NoDevice => StatusCode::NOT_FOUND,
            PageError::Approval(a) => match a {
                ApprovalCheckError::NoSuchAsk(_) => StatusCode::NOT_FOUND,
                ApprovalCheckError::Duplicate => StatusCode::CONFLICT,
                ApprovalCheckError::Store { .. }
                | ApprovalCheckError::Log { .. }
                | ApprovalCheckError::Build(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::FORBIDDEN,
            },
            PageError::NotLoopback(_) | PageError::Bind { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, crate::ErrorChain(&e).to_string())
    }
}

fn bad_json(e: JsonRejection) -> Failure {
    Failure(e.status(), e.body_text())
}

fn check_id(id: &str) -> Result<(), Failure> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Failure(StatusCode::NOT_FOUND, "no such request".into()));
    }
    Ok(())
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

async fn list(State(page): State<ApprovalPage>) -> Result<Json<Vec<PageView>>, Failure> {
    Ok(Json(page.device()?.page_pending(now_unix_ms())))
}

#[derive(Serialize)]
struct ShowAnswer {
    #[serde(flatten)]
    view: PageView,
    rp_id: String,
    credential_ids: Vec<String>,
}

async fn show(
    State(page): State<ApprovalPage>,
    Path(id): Path<String>,
) -> Result<Json<ShowAnswer>, Failure> {
    check_id(&id)?;
    let view = page
        .device()?
        .page_get(&id, now_unix_ms())
        .ok_or_else(|| PageError::Approval(ApprovalCheckError::NoSuchAsk(id)))?;
    Ok(Json(ShowAnswer {
        view,
        rp_id: page.inner.rp.rp_id.clone(),
        credential_ids: page.credential_ids().await?,
    }))
}

async fn approve(
    State(page): State<ApprovalPage>,
    Path(id): Path<String>,
    body: Result<Json<Assertion>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    check_id(&id)?;
    let Json(assertion) = body.map_err(bad_json)?;
    page.device()?
        .page_approve(&id, &assertion)
        .await
        .map_err(PageError::from)?;
    Ok(Json(serde_json::json!({"approval_id": id})))
}

async fn deny(
    State(page): State<ApprovalPage>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Failure> {
    check_id(&id)?;
    page.device()?.page_deny(&id).map_err(PageError::from)?;
    Ok(Json(serde_json::json!({})))
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
    /// Always null: the device's page offers no push notifications.
    push_key: Option<String>,
}

async fn register_begin(
    State(page): State<ApprovalPage>,
    body: Result<Json<BeginBody>, JsonRejection>,
) -> Result<Json<BeginAnswer>, Failure> {
    let Json(body) = body.map_err(bad_json)?;
    let challenge = page.begin_registration(&body.token)?;
    // Passkeys already registered for this very page are not registered twice.
    let exclude = {
        let path = page.inner.passkey_file.lock().await;
        let store = PasskeyFile::load(&path).map_err(PageError::from)?;
        if store.on_device && store.relying_party() == page.inner.rp {
            store
                .passkeys
                .iter()
                .map(|p| B64URL.encode(&p.credential_id))
                .collect()
        } else {
            Vec::new()
        }
    };
    Ok(Json(BeginAnswer {
        challenge,
        rp_id: page.inner.rp.rp_id.clone(),
        user_id: B64URL.encode(USER_NAME),
        user_name: USER_NAME,
        exclude,
        push_key: None,
    }))
}

#[derive(Deserialize)]
struct FinishBody {
    challenge: String,
    #[serde(flatten)]
    registration: Registration,
}

async fn register_finish(
    State(page): State<ApprovalPage>,
    body: Result<Json<FinishBody>, JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(body) = body.map_err(bad_json)?;
    let id = page
        .finish_registration(&body.challenge, &body.registration)
        .await?;
    Ok(Json(
        serde_json::json!({"credential_id": id, "push_error": null}),
    ))
}
