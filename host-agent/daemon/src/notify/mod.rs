//! Notifications of pending approvals: only an approval id, a one-line summary and the approval
//! page's URL ever leave the host this way, never argument values or secrets.
//!
//! # Layout
//! - this file: [`Notice`], the [`Notifier`] trait, [`NotifyError`] and [`from_flags`].
//! - [`webhook`]: POST the notice as JSON to a URL.
//! - [`webpush`]: Web Push to subscribed browsers (VAPID, RFC 8291 payload encryption).

pub mod webhook;
pub mod webpush;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// What a notification says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// The approval's id.
    pub approval_id: String,
    /// Who wants what, in one line (no argument values).
    pub summary: String,
    /// The approval page.
    pub url: String,
}

/// Sends notices somewhere. `notify` must not block: implementations send in the background
/// and log failures (a notification is a convenience; the request waits either way).
pub trait Notifier: Send + Sync + std::fmt::Debug {
    /// Sends `notice`.
    fn notify(&self, notice: Notice);
}

/// Errors of sending a notification.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The HTTP request failed.
    #[error("cannot reach {url}")]
    Http {
        /// Where.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The receiver answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// Where.
        url: String,
        /// The status.
        status: u16,
    },
    /// The push subscription is malformed.
    #[error("bad push subscription: {0}")]
    Subscription(&'static str),
    /// The payload is too large for one push message.
    #[error("push payload of {0} bytes is too large")]
    TooLarge(usize),
    /// Encrypting the payload failed.
    #[error("cannot encrypt the push payload")]
    Encrypt,
    /// The endpoint is not an http(s) URL.
    #[error("bad push endpoint {0:?}")]
    Endpoint(String),
    /// Reading or writing the VAPID key or the subscriptions failed.
    #[error("{}", .path.display())]
    Store {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stored file does not parse.
    #[error("{} is malformed", .0.display())]
    StoreFormat(std::path::PathBuf),
}

/// The notifiers the daemon's flags ask for.
pub fn from_flags(webhook: Option<&str>) -> Vec<Arc<dyn Notifier>> {
    let mut out: Vec<Arc<dyn Notifier>> = Vec::new();
    if let Some(url) = webhook {
        out.push(Arc::new(webhook::Webhook::new(url.to_owned())));
    }
    out
}

/// The HTTP client notifiers share: bounded time, no redirects (a redirect could send the
/// notice somewhere the user did not configure).
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_default()
}
