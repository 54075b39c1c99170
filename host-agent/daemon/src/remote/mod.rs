//! The remote API: the daemon's HTTP API over TLS, for clients on other machines (the Python
//! SDK, `nanoclaw` with `--remote`), with bearer tokens.
//!
//! `host-agent serve --listen ADDR` serves the same routes as the Unix socket
//! ([`crate::daemon::routes`]) over TLS on `ADDR`, behind [`authorize`]: each request needs
//! `Authorization: Bearer TOKEN`, a token of [`tokens`] whose scope covers the route
//! ([`required_scope`]). No token, or an unknown one, is `401`; a scope too small is `403`.
//! The Unix socket stays as it is, for local use: access to it is access to the daemon.
//!
//! # TLS
//!
//! rustls, with the certificate and key the operator gives (`--tls-cert`, `--tls-key`, PEM),
//! or else one the daemon makes at its first start and keeps in `<state-dir>/tls/`: a
//! self-signed certificate for `localhost`, the host's name and every `--tls-name`, its key
//! readable by root alone. The daemon logs the certificate's SHA-256 at startup, for clients
//! to pin. Handshakes run beside the accept loop, at most [`MAX_HANDSHAKES`] at once and each
//! within [`HANDSHAKE_TIMEOUT`], so a silent client holds nothing for long; a failing accept
//! (out of descriptors) pauses instead of spinning.
//!
//! # Layout
//! - this file: the route scopes, the authorization layer, the TLS identity and the listener;
//! - [`tokens`]: the token store (hashed, 0600).

pub mod tokens;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use nanoclaw_api::{ApiError, TokenScope};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use self::tokens::TokenStore;

/// How long a client has for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; more connections wait to be accepted.
pub const MAX_HANDSHAKES: usize = 64;
/// The folder of the daemon's own certificate, in the state directory.
pub const TLS_DIR: &str = "tls";

/// Errors of setting up the remote API.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// A certificate or key file could not be read or written.
    #[error("{}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{}: {what}", .path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// Making the self-signed certificate failed.
    #[error("making the self-signed certificate")]
    Generate(#[source] rcgen::Error),
    /// rustls refused the certificate and key.
    #[error("the TLS certificate and key")]
    Tls(#[source] rustls::Error),
    /// `--tls-cert` without `--tls-key`, or the other way round.
    #[error("--tls-cert and --tls-key go together")]
    HalfIdentity,
    /// Binding the listener failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The scope a request needs: reads need `read`; changes to VMs and file copies into them
/// `run`; images, approvals registration, tokens and anything not named here `admin`.
pub fn required_scope(method: &Method, path: &str) -> TokenScope {
    let parts: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let is_get = method == Method::GET || method == Method::HEAD;
    match parts.as_slice() {
        ["", "v1", "tokens", ..] => TokenScope::Admin,
        ["", "metrics"] if is_get => TokenScope::Read,
        ["", "v1", ..] if is_get => TokenScope::Read,
        ["", "v1", "vms"] if method == Method::POST => TokenScope::Run,
        ["", "v1", "vms", _] if method == Method::DELETE => TokenScope::Run,
        [
            "",
            "v1",
            "vms",
            _,
            "stop" | "detach" | "pause" | "resume" | "snapshot" | "fork",
        ] if method == Method::POST => TokenScope::Run,
        ["", "v1", "snapshots", _, "restore"] if method == Method::POST => TokenScope::Run,
        ["", "v1", "snapshots", _] if method == Method::DELETE => TokenScope::Run,
        ["", "v1", "vms", _, "files"] if method == Method::PUT => TokenScope::Run,
        _ => TokenScope::Admin,
    }
}

fn refuse(status: StatusCode, error: &str) -> Response {
    let mut response = (
        status,
        axum::Json(ApiError {
            error: error.to_owned(),
        }),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// The authorization layer of the remote API (see the module doc).
pub async fn authorize(
    State(tokens): State<Arc<TokenStore>>,
    req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(scope) = presented.and_then(|t| tokens.scope_of(t)) else {
        return refuse(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
    };
    let needed = required_scope(req.method(), req.uri().path());
    if scope < needed {
        return refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "this token's scope is {}; {} {} needs {}",
                scope.as_str(),
                req.method(),
                req.uri().path(),
                needed.as_str()
            ),
        );
    }
    next.run(req).await
}

/// Where the TLS identity comes from.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// The operator's certificate chain (PEM), with [`TlsSettings::key`].
    pub cert: Option<PathBuf>,
    /// The operator's private key (PEM).
    pub key: Option<PathBuf>,
    /// More names for the self-signed certificate.
    pub names: Vec<String>,
}

/// The rustls server configuration and the certificate's SHA-256 (hex), for pinning.
pub fn tls_config(
    state_dir: &Path,
    settings: &TlsSettings,
) -> Result<(Arc<rustls::ServerConfig>, String), RemoteError> {
    let (cert_path, key_path) = match (&settings.cert, &settings.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (None, None) => own_identity(state_dir, &settings.names)?,
        _ => return Err(RemoteError::HalfIdentity),
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| RemoteError::File {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(&cert_path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| RemoteError::Pem {
            path: cert_path.clone(),
            what: e.to_string(),
        })?;
    let Some(first) = certs.first() else {
        return Err(RemoteError::Pem {
            path: cert_path,
            what: "no certificate".into(),
        });
    };
    let fingerprint = hex::encode(Sha256::digest(first.as_ref()));
    let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| RemoteError::Pem {
        path: key_path.clone(),
        what: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(RemoteError::Tls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(RemoteError::Tls)?;
    Ok((Arc::new(config), fingerprint))
}

/// The daemon's own certificate and key in `<state_dir>/tls/`, made at the first start.
fn own_identity(state_dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), RemoteError> {
    let dir = state_dir.join(TLS_DIR);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let file_err = |path: &Path| {
        let path = path.to_owned();
        move |source| RemoteError::File { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(file_err(&dir))?;
    let mut sans = vec!["localhost".to_owned()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim();
        if !host.is_empty() {
            sans.push(host.to_owned());
        }
    }
    sans.extend(names.iter().cloned());
    sans.dedup();
    let made = rcgen::generate_simple_self_signed(sans).map_err(RemoteError::Generate)?;
    let replace = |path: &Path, bytes: &[u8], mode: u32| {
        shared_proto::fs::replace_file(path, bytes, mode).map_err(|e| RemoteError::File {
            path: path.to_owned(),
            source: std::io::Error::other(e),
        })
    };
    replace(&key, made.key_pair.serialize_pem().as_bytes(), 0o600)?;
    replace(&cert, made.cert.pem().as_bytes(), 0o644)?;
    Ok((cert, key))
}

/// A TLS listener for `axum::serve`: accepts TCP connections and hands over those whose
/// handshake completed (see the module doc).
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// Binds `addr` and starts accepting.
    pub async fn bind(
        addr: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<Self, RemoteError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RemoteError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| RemoteError::Bind { addr, source })?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Ok(Self { ready, local })
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let mut failures = 0u64;
    loop {
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, "remote API: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, ready) = (acceptor.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            {
                let _ = ready.send((tls, peer)).await;
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_needs_the_scope_of_what_it_does() {
        let cases = [
            (Method::GET, "/v1/vms", TokenScope::Read),
            (Method::GET, "/v1/vms/abc/files", TokenScope::Read),
            (Method::GET, "/metrics", TokenScope::Read),
            (Method::POST, "/v1/vms", TokenScope::Run),
            (Method::POST, "/v1/vms/abc/stop", TokenScope::Run),
            (Method::POST, "/v1/vms/abc/pause", TokenScope::Run),
            (Method::POST, "/v1/vms/abc/snapshot", TokenScope::Run),
            (Method::POST, "/v1/vms/abc/fork", TokenScope::Run),
            (Method::POST, "/v1/vms/abc/migrate", TokenScope::Admin),
            (Method::DELETE, "/v1/vms/abc/migrate", TokenScope::Admin),
            (
                Method::POST,
                "/v1/vms/abc/migrate/resolve",
                TokenScope::Admin,
            ),
            (Method::GET, "/v1/snapshots", TokenScope::Read),
            (Method::POST, "/v1/snapshots/s/restore", TokenScope::Run),
            (Method::DELETE, "/v1/snapshots/s", TokenScope::Run),
            (Method::PUT, "/v1/vms/abc/files", TokenScope::Run),
            (Method::DELETE, "/v1/vms/abc", TokenScope::Run),
            (Method::GET, "/v1/tokens", TokenScope::Admin),
            (Method::POST, "/v1/tokens", TokenScope::Admin),
            (Method::POST, "/v1/images/import", TokenScope::Admin),
            (Method::DELETE, "/v1/images/x", TokenScope::Admin),
            (
                Method::POST,
                "/v1/approvals/registration",
                TokenScope::Admin,
            ),
            (Method::POST, "/v1/vms/abc/unknown", TokenScope::Admin),
            (Method::PATCH, "/v1/vms", TokenScope::Admin),
        ];
        for (method, path, scope) in cases {
            assert_eq!(required_scope(&method, path), scope, "{method} {path}");
        }
        assert!(TokenScope::Read < TokenScope::Run && TokenScope::Run < TokenScope::Admin);
    }

    #[test]
    fn the_daemon_makes_its_own_certificate_once_and_refuses_half_an_identity() {
        let dir = tempfile::tempdir().unwrap();
        let settings = TlsSettings {
            names: vec!["agents.example".into()],
            ..TlsSettings::default()
        };
        let (_, first) = tls_config(dir.path(), &settings).unwrap();
        let (_, again) = tls_config(dir.path(), &settings).unwrap();
        assert_eq!(first, again, "kept across restarts");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let half = TlsSettings {
            cert: Some(dir.path().join("tls/cert.pem")),
            ..TlsSettings::default()
        };
        assert!(matches!(
            tls_config(dir.path(), &half),
            Err(RemoteError::HalfIdentity)
        ));
        std::fs::write(dir.path().join("bad.pem"), b"not pem").unwrap();
        let bad = TlsSettings {
            cert: Some(dir.path().join("bad.pem")),
            key: Some(dir.path().join("tls/key.pem")),
            names: vec![],
        };
        assert!(matches!(
            tls_config(dir.path(), &bad),
            Err(RemoteError::Pem { .. })
        ));
    }
}
