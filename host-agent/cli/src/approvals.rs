//! `nanoclaw approvals`: the pending approval requests, through the daemon's API.
//!
//! Approving is not possible from the CLI, on purpose: an approval is a passkey assertion with
//! user verification (the biometric) over the exact request, made on the approval page.

use std::fmt::Write as _;

use hyper::Method;
use shared_proto::approval::RequestAction;

use super::client::Client;
use super::{CliError, print_out};
use nanoclaw_api::{PendingApproval, RegistrationLink};

/// Lists the pending requests.
pub async fn list(client: &Client, json: bool) -> Result<u8, CliError> {
    let pending: Vec<PendingApproval> = client
        .json(Method::GET, "/v1/approvals", None::<&()>)
        .await?;
    if json {
        let text = serde_json::to_string_pretty(&pending).map_err(CliError::Event)?;
        print_out(&format!("{text}\n"))?;
        return Ok(0);
    }
    if pending.is_empty() {
        print_out("no pending approval requests\n")?;
        return Ok(0);
    }
    let mut text = String::new();
    for p in &pending {
        let r = &p.request;
        let action = match &r.action {
            RequestAction::ToolCall { server, tool } => format!("tool {server}/{tool}"),
            RequestAction::Spawn { profile } => format!("spawn profile {profile}"),
            RequestAction::Credential { name, target_host } => {
                format!("credential {name} for {target_host}")
            }
        };
        let _ = writeln!(
            text,
            "{}  agent {} (vm {}, profile {})\n    {action}; rule {}: {}\n    arguments {}\n    expires {} (unix ms); approve at {}",
            r.id,
            r.agent,
            r.vm_id,
            r.profile,
            r.rule,
            r.reason,
            r.arguments,
            r.expires_unix_ms,
            p.url
        );
    }
    print_out(&text)?;
    Ok(0)
}

/// Prints a one-time passkey registration link.
pub async fn register_link(client: &Client) -> Result<u8, CliError> {
    let link: RegistrationLink = client
        .json(Method::POST, "/v1/approvals/registration", None::<&()>)
        .await?;
    print_out(&format!(
        "Open this link in the browser that holds your passkey (valid for 10 minutes, once):\n{}\n",
        link.url
    ))?;
    Ok(0)
}
