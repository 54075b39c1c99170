//! The webhook notifier: `POST` the [`Notice`] as JSON to a configured URL.

use super::{Notice, Notifier, NotifyError, http_client};

/// POSTs notices to one URL.
#[derive(Debug, Clone)]
pub struct Webhook {
    url: String,
    client: reqwest::Client,
}

impl Webhook {
    /// A webhook to `url`.
    pub fn new(url: String) -> Self {
        Self {
            url,
            client: http_client(),
        }
    }

    /// Sends one notice and waits for a 2xx answer.
    pub async fn send(&self, notice: &Notice) -> Result<(), NotifyError> {
        let resp = self
            .client
            .post(&self.url)
            .json(notice)
            .send()
            .await
            .map_err(|source| NotifyError::Http {
                url: self.url.clone(),
                source,
            })?;
        if !resp.status().is_success() {
            return Err(NotifyError::Status {
                url: self.url.clone(),
                status: resp.status().as_u16(),
            });
        }
        Ok(())
    }
}

impl Notifier for Webhook {
    fn notify(&self, notice: Notice) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.send(&notice).await {
                tracing::warn!(error = %crate::error_chain(&e), "webhook notification failed");
            }
        });
    }
}
