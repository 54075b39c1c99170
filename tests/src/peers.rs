//! The Python test peers on the official `mcp` SDK (`tests/peers/`: an MCP upstream server and
//! an agent client), and the Python that runs them: the venv `scripts/setup --test` installs.

use std::path::PathBuf;

use crate::workspace::workspace_root;

/// The Python with the pinned `mcp` SDK: `NANOCLAW_MCP_PYTHON`, or
/// `~/.cache/nanoclaw/mcp-venv/bin/python3`.
///
/// # Panics
///
/// If it is missing, saying how to install it.
pub fn mcp_python() -> PathBuf {
    let path = std::env::var_os("NANOCLAW_MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/nanoclaw/mcp-venv/bin/python3")
        });
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup --test (it installs the pinned Python mcp SDK)",
        path.display()
    );
    path
}

/// The peer script `tests/peers/NAME` (`mcp_upstream.py`, `mcp_agent.py`).
pub fn peer(name: &str) -> PathBuf {
    workspace_root().join("tests/peers").join(name)
}
