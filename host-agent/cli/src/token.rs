//! `nanoclaw token create|ls|rm`: the remote API's bearer tokens, managed over the local socket.
//!
//! A token is printed once, when it is made; the daemon keeps only its hash.

use std::fmt::Write as _;

use hyper::Method;
use nanoclaw_api::{CreateToken, CreatedToken, TokenInfo, TokenScope};

use super::client::Client;
use super::{CliError, print_out};

/// `nanoclaw token ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it (shown this once).
    Create {
        /// What it may do: `read`, `run` (also create and stop VMs) or `admin`.
        #[arg(long, value_parser = parse_scope)]
        scope: TokenScope,
    },
    /// List the tokens (ids and scopes, never the tokens).
    Ls,
    /// Remove a token: it stops working at once.
    Rm {
        /// The token's id.
        id: String,
    },
}

fn parse_scope(s: &str) -> Result<TokenScope, String> {
    match s {
        "read" => Ok(TokenScope::Read),
        "run" => Ok(TokenScope::Run),
        "admin" => Ok(TokenScope::Admin),
        other => Err(format!("unknown scope {other:?} (read, run or admin)")),
    }
}

/// Runs a token command.
pub async fn run(client: &Client, command: TokenCommand) -> Result<u8, CliError> {
    match command {
        TokenCommand::Create { scope } => {
            let made: CreatedToken = client
                .json(Method::POST, "/v1/tokens", Some(&CreateToken { scope }))
                .await?;
            print_out(&format!("{}\n", made.token))?;
            eprintln!(
                "token {} ({}): shown this once; keep it secret",
                made.info.id,
                made.info.scope.as_str()
            );
        }
        TokenCommand::Ls => {
            let tokens: Vec<TokenInfo> =
                client.json(Method::GET, "/v1/tokens", None::<&()>).await?;
            let mut text = String::from("ID           SCOPE  CREATED (unix ms)\n");
            for t in tokens {
                let _ = writeln!(
                    text,
                    "{:<12} {:<6} {}",
                    t.id,
                    t.scope.as_str(),
                    t.created_unix_ms
                );
            }
            print_out(&text)?;
        }
        TokenCommand::Rm { id } => {
            client
                .send(Method::DELETE, &format!("/v1/tokens/{id}"), None)
                .await?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_by_name_only() {
        assert_eq!(parse_scope("run"), Ok(TokenScope::Run));
        assert!(parse_scope("root").is_err());
    }
}
