//! vsock addresses of every channel between the guest and the host.
//!
//! The host side speaks Firecracker-style hybrid vsock over Unix sockets: a guest connection to
//! host port `P` reaches the listener at `<vm>/vsock.sock_<P>`, and a host connection into the
//! guest opens `<vm>/vsock.sock` and writes `CONNECT <port>\n`. All ports are at or above 1024
//! and grouped in one block so that they are easy to spot in a trace.
//!
//! [`host_listener_path`] is the one place that spells the listener path rule.

use std::path::{Path, PathBuf};

/// The file name of the VM's hybrid vsock socket; a host listener for guest port `P` adds
/// `_<P>` to it.
const VSOCK_SOCKET: &str = "vsock.sock";

/// The well-known CID of the host (`VMADDR_CID_HOST`). The guest connects to this CID.
pub const HOST_CID: u32 = 2;

/// Control channel. The host listens on it; the sidecar connects at boot, sends
/// `GuestToHost::Hello`, then exchanges framed messages for the life of the VM.
pub const CONTROL_PORT: u32 = 1024;

/// Credential proxy channel. The host listens; the sidecar connects to relay the end-to-end
/// encrypted traffic between the sidecar and the user's device (the host sees ciphertext only).
pub const CREDENTIAL_PROXY_PORT: u32 = 1025;

/// MCP channel. The host listens (the MCP gateway); the sidecar connects to forward the agent's
/// MCP tool calls.
pub const MCP_PORT: u32 = 1026;

/// Log channel. The host listens; the sidecar connects to stream its own and the agent's logs,
/// keeping the serial console quiet.
pub const LOG_PORT: u32 = 1027;

/// Echo diagnostic. The guest listens on it (any CID); the host connects with
/// `CONNECT 1028\n` and every byte it sends comes back until it closes its write side.
pub const ECHO_PORT: u32 = 1028;

/// File copy channel. The guest listens on it (any CID); the host connects with
/// `CONNECT 1029\n` and runs one transfer per connection, in and out of the agent's root, with
/// the messages of [`crate::files`].
pub const FILES_PORT: u32 = 1029;

/// Where a host listener for guest connections to host `port` binds, in the VM's directory:
/// `<vm_dir>/vsock.sock_<port>` (the hybrid vsock rule). A path computation only; nothing is
/// touched.
pub fn host_listener_path(vm_dir: &Path, port: u32) -> PathBuf {
    vm_dir.join(format!("{VSOCK_SOCKET}_{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_listener_path_is_the_hybrid_vsock_rule() {
        assert_eq!(
            host_listener_path(Path::new("/run/vm-1"), CONTROL_PORT),
            Path::new("/run/vm-1/vsock.sock_1024")
        );
        assert_eq!(
            host_listener_path(Path::new("d"), MCP_PORT),
            Path::new("d/vsock.sock_1026")
        );
    }

    #[test]
    fn ports_are_distinct_and_unprivileged() {
        let ports = [
            CONTROL_PORT,
            CREDENTIAL_PROXY_PORT,
            MCP_PORT,
            LOG_PORT,
            ECHO_PORT,
            FILES_PORT,
        ];
        for (i, a) in ports.iter().enumerate() {
            assert!(*a >= 1024, "port {a} is below 1024");
            for b in &ports[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
