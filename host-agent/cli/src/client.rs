//! A small HTTP/1.1 client of the daemon's API over its Unix socket (hyper's connection API,
//! one connection per request).

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;

use nanoclaw_api::ApiError;

/// Errors of talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error(
        "the host-agent daemon is not running at {} (start it with: host-agent serve)",
        .0.display()
    )]
    NotRunning(PathBuf),
    /// Connecting failed for another reason.
    #[error("cannot connect to the daemon at {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("request to the daemon failed")]
    Http(#[source] hyper::Error),
    /// Building the request failed.
    #[error("cannot build the request")]
    Request(#[source] hyper::http::Error),
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The daemon's message.
        message: String,
    },
    /// The daemon's answer does not parse.
    #[error("unexpected answer from the daemon")]
    Decode(#[source] serde_json::Error),
    /// Encoding the request body failed.
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
}

/// The daemon's API at one socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns the response, whose body is still streaming. A non-2xx
    /// answer becomes [`ClientError::Api`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let content_type = body.as_ref().map(|_| "application/json");
        let body = Full::new(Bytes::from(body.unwrap_or_default()));
        self.send_body(method, path, content_type, body).await
    }

    /// Like [`Client::send`], with any body (such as a stream) of `content_type`.
    pub async fn send_body<B>(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: B,
    ) -> Result<hyper::Response<Incoming>, ClientError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(self.socket.clone())
                }
                _ => ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                },
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "daemon connection ended");
            }
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "nanoclaw");
        if let Some(content_type) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, content_type);
        }
        let req = req.body(body).map_err(ClientError::Request)?;
        let resp = sender.send_request(req).await.map_err(ClientError::Http)?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = body_bytes(resp).await?;
        let message = serde_json::from_slice::<ApiError>(&bytes)
            .map(|e| e.error)
            .unwrap_or_else(|_| format!("the daemon answered {status}"));
        Err(ClientError::Api { status, message })
    }

    /// Sends a request with an optional JSON body and decodes a JSON answer.
    pub async fn json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ClientError::Encode)?;
        let resp = self.send(method, path, body).await?;
        let bytes = body_bytes(resp).await?;
        serde_json::from_slice(&bytes).map_err(ClientError::Decode)
    }
}

/// Reads a whole (small, JSON) response body.
async fn body_bytes(resp: hyper::Response<Incoming>) -> Result<Bytes, ClientError> {
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Http)?
        .to_bytes())
}

/// Splits a streamed body into lines.
#[derive(Debug)]
pub struct Lines {
    body: Incoming,
    buf: Vec<u8>,
    done: bool,
}

impl Lines {
    /// Lines of `body`.
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            buf: Vec::new(),
            done: false,
        }
    }

    /// The next line without its newline; `None` at the end of the body.
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                line.pop();
                return Ok(Some(line));
            }
            if self.done {
                return Ok((!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf)));
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame.map_err(ClientError::Http)?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None => self.done = true,
            }
        }
    }
}

/// Streams a body's raw bytes into `out`.
pub async fn copy_body(mut body: Incoming, out: &mut impl std::io::Write) -> Result<(), CopyError> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(CopyError::Http)?.into_data() {
            out.write_all(&data).map_err(CopyError::Write)?;
            out.flush().map_err(CopyError::Write)?;
        }
    }
    Ok(())
}

/// Errors of [`copy_body`].
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// Reading the body failed.
    #[error("reading from the daemon failed")]
    Http(#[source] hyper::Error),
    /// Writing the output failed.
    #[error("cannot write the output")]
    Write(#[source] std::io::Error),
}
