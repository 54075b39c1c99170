//! Notifications of pending approvals: only an approval id, a one-line summary and the approval
//! page's URL ever leave the host this way, never argument values or secrets.
//!
//! # Layout
//! - this file: [`Notice`] and the [`Notifier`] trait.

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
