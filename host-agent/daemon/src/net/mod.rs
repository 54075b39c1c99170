//! The network of a VM whose profile names `[network] egress` (a VM without it gets no network
//! device and none of this):
//!
//! - [`addr`]: its addresses out of the overlay prefix, and its MAC;
//! - [`netns`]: its own network namespace, kept by a bind mount in its folder, holding the TAP
//!   its VMM attaches to and a veth to the host;
//! - [`firewall`]: the nftables rules inside that namespace (default deny, a set of allowed
//!   destinations the resolver fills) and the host's masquerade for the prefix;
//! - [`forward`]: host ports forwarded to the guest (`nanoclaw run -p`);
//! - [`underlay`]: the network the hosts share, where clients reach the VMs' addresses and a
//!   migrated VM's address moves to its new host.
//!
//! `docs/security/network.md` says what is enforced where.

pub mod addr;
pub mod firewall;
pub mod forward;
pub mod netns;
pub mod underlay;

use std::io::Write;
use std::process::{Command, Stdio};

/// The most bytes of a tool's stderr kept in an error.
const MAX_STDERR: usize = 2048;

/// Why a tool (`ip`, `nft`) did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// It could not be started (not installed, or the namespace could not be entered).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// How it ended.
        status: std::process::ExitStatus,
        /// The start of what it wrote to stderr.
        stderr: String,
    },
}

impl ToolError {
    /// What the tool wrote to stderr, when it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            Self::Failed { stderr, .. } => Some(stderr),
            Self::Spawn { .. } => None,
        }
    }
}

/// Runs `cmd` to its end, with `stdin` as its input, and returns its stdout.
pub(crate) fn run_tool(mut cmd: Command, stdin: Option<&[u8]>) -> Result<Vec<u8>, ToolError> {
    let command = {
        let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
        words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        words.join(" ")
    };
    let spawn = |source| ToolError::Spawn {
        command: command.clone(),
        source,
    };
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A tool that exits early closes the pipe: its status says why.
        let _ = pipe.write_all(input);
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.len() > MAX_STDERR {
        let mut cut = MAX_STDERR;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
    }
    Err(ToolError::Failed {
        command,
        status: out.status,
        stderr,
    })
}
