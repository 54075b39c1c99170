//! The gateway's clients of the upstream MCP servers a profile names, built on `rmcp`.
//!
//! A `command` server is a child process of the host speaking MCP over its stdio; it gets a
//! cleared environment (only `PATH` and the profile's `env`), so no host secret leaks into it.
//! A `url` server is reached with rmcp's streamable-HTTP client (plain `http://`: upstreams run
//! on the host's side; TLS would add a second TLS stack for no gain here).

use std::process::Stdio;

use rmcp::model::{CallToolRequestParams, CallToolResult, Tool};
use rmcp::service::RunningService;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};

use super::McpError;
use crate::policy::ServerSpec;

/// One connected upstream server.
#[derive(Debug)]
pub struct Upstream {
    name: String,
    service: RunningService<RoleClient, ()>,
}

impl Upstream {
    /// Starts or connects to the server `name` and completes the MCP handshake.
    pub async fn connect(name: &str, spec: &ServerSpec) -> Result<Self, McpError> {
        let service = match (&spec.command, &spec.url) {
            (Some(argv), _) => {
                let (program, args) = argv.split_first().ok_or_else(|| McpError::Upstream {
                    server: name.into(),
                    what: "empty command".into(),
                })?;
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args).env_clear().kill_on_drop(true);
                if let Some(path) = std::env::var_os("PATH") {
                    cmd.env("PATH", path);
                }
                cmd.envs(&spec.env);
                let (transport, _stderr) = TokioChildProcess::builder(cmd)
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|source| McpError::Spawn {
                        server: name.into(),
                        source,
                    })?;
                ().serve(transport).await.map_err(|e| McpError::Upstream {
                    server: name.into(),
                    what: format!("handshake: {e}"),
                })?
            }
            (None, Some(url)) => {
                let transport = StreamableHttpClientTransport::from_uri(url.clone());
                ().serve(transport).await.map_err(|e| McpError::Upstream {
                    server: name.into(),
                    what: format!("handshake: {e}"),
                })?
            }
            (None, None) => {
                return Err(McpError::Upstream {
                    server: name.into(),
                    what: "neither command nor url".into(),
                });
            }
        };
        Ok(Self {
            name: name.into(),
            service,
        })
    }

    /// Every tool the server lists.
    pub async fn list_tools(&self) -> Result<Vec<Tool>, McpError> {
        self.service
            .peer()
            .list_all_tools()
            .await
            .map_err(|e| McpError::Upstream {
                server: self.name.clone(),
                what: format!("tools/list: {e}"),
            })
    }

    /// Calls `tool` with `args`. An MCP error the server answers with comes back as
    /// `Ok(Err(error))`, to pass on to the agent; a failure of the connection is `Err`.
    pub async fn call_tool(
        &self,
        tool: &str,
        args: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Result<CallToolResult, rmcp::ErrorData>, McpError> {
        let params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args);
        match self.service.peer().call_tool(params).await {
            Ok(result) => Ok(Ok(result)),
            Err(rmcp::ServiceError::McpError(e)) => Ok(Err(e)),
            Err(e) => Err(McpError::Upstream {
                server: self.name.clone(),
                what: format!("tools/call: {e}"),
            }),
        }
    }

    /// Closes the session (a child process is killed).
    pub async fn close(self) {
        let _ = self.service.cancel().await;
    }
}
