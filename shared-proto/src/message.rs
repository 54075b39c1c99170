//! The messages of the control channel, one enum per direction.
//!
//! [`GuestToHost`] is what the sidecar sends; [`HostToGuest`] is what the host sends. Both are
//! internally tagged (`{"type": "hello", ...}` in CBOR) so that a hex dump names the message, and
//! byte payloads are CBOR byte strings (`serde_bytes`), not arrays of integers.
//!
//! The host must treat every [`GuestToHost`] value as hostile input: it may come from a guest
//! that skipped the sidecar.

use serde::{Deserialize, Serialize};

/// A message from the sidecar (guest) to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestToHost {
    /// The first message on a control connection.
    Hello {
        /// The sidecar's [`crate::PROTOCOL_VERSION`].
        protocol_version: u32,
        /// The sidecar's crate version, for logs.
        sidecar_version: String,
        /// Random per boot; tells a reconnect apart from a reboot.
        #[serde(with = "serde_bytes")]
        boot_id: [u8; 16],
        /// The sidecar's X25519 public key, generated at boot, for [`crate::envelope`].
        #[serde(with = "serde_bytes")]
        ephemeral_public_key: [u8; 32],
    },
    /// The answer to `Freeze`: every other process of the guest is stopped.
    Frozen,
    /// The agent process started.
    AgentStarted {
        /// Its pid inside the guest.
        pid: u32,
    },
    /// A chunk of the agent's output (at most 64 KiB), between `AgentStarted` and
    /// `AgentExited`, in the order read from each stream.
    AgentOutput {
        /// Which stream it came from.
        stream: OutputStream,
        /// The bytes, as read.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The agent process ended and its output was drained; the last message of a boot. The
    /// sidecar then half-closes the connection, waits for the host to close it and resets the
    /// VM.
    AgentExited {
        /// How it ended.
        status: ExitStatus,
    },
    /// The sidecar could not do what the host asked.
    Error {
        /// A short human-readable reason.
        message: String,
    },
}

/// A message from the host to the sidecar (guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostToGuest {
    /// The host accepts the sidecar's `Hello`.
    HelloAck {
        /// The host's [`crate::PROTOCOL_VERSION`].
        protocol_version: u32,
    },
    /// The host refuses the sidecar's `Hello`; the sidecar resets the VM.
    HelloReject {
        /// Why.
        reason: String,
        /// The host's [`crate::PROTOCOL_VERSION`].
        host_protocol_version: u32,
    },
    /// Start the agent (once per boot; a second one is answered with `Error`). A command that
    /// cannot be started is answered with `Error` (why) and `AgentExited` with `Exit(127)`
    /// (missing program or directory) or `Exit(126)` (anything else).
    RunAgent(AgentSpec),
    /// Bytes for the agent's standard input, written in order.
    ///
    /// **Empty `data` is EOF**: the sidecar closes the agent's stdin. An EOF for an agent that
    /// ended or never started is a no-op; bytes after EOF are answered with `Error`.
    AgentStdin {
        /// The bytes; empty for EOF.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Send a signal to the agent's process group.
    Signal {
        /// The signal number: a standard signal, 1 to 31 (Linux numbering). Others, and a
        /// signal when no agent runs, are answered with `Error`.
        signo: i32,
    },
    /// Diagnostic: the sidecar connects to host port `port` (a guest-initiated vsock
    /// connection) and echoes every byte back until EOF.
    EchoConnect {
        /// The host port to connect to.
        port: u32,
    },
    /// Flush and reset the VM.
    Shutdown,
    /// Stop every process of the guest but the sidecar (`SIGSTOP`), before a snapshot that
    /// will be forked: a clone's agent must not run before it has fresh entropy. Answered with
    /// `Frozen` once done, or with `Error`.
    Freeze,
    /// Let the processes stopped by `Freeze` go on (`SIGCONT`). A no-op when not frozen.
    Thaw,
    /// This guest is a clone of a snapshot (a fork or a warm start): mix `entropy` into the
    /// kernel's pool and reseed its CRNG, draw a new boot id and boot key, drop every session
    /// made with the old key, move its network to `network` when given, let frozen processes
    /// go on, then reconnect with a new `Hello`.
    Reidentify {
        /// Fresh random bytes from the host, [`REIDENTIFY_ENTROPY_MIN`] to
        /// [`REIDENTIFY_ENTROPY_MAX`] of them; any other length is answered with `Error`.
        #[serde(with = "serde_bytes")]
        entropy: Vec<u8>,
        /// The clone's own link, when the VM is networked: each clone gets an address, a
        /// gateway and a resolver of its own, and the interface the snapshot's guest configured
        /// is moved to them before its processes go on. Absent (and in older hosts' frames):
        /// the network stays as it was.
        #[serde(default)]
        network: Option<GuestNetwork>,
    },
}

/// The fewest entropy bytes a `Reidentify` carries.
pub const REIDENTIFY_ENTROPY_MIN: usize = 32;
/// The most entropy bytes a `Reidentify` carries.
pub const REIDENTIFY_ENTROPY_MAX: usize = 256;

/// What to run as the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// The program (a path inside the guest).
    pub command: String,
    /// Its arguments, without `argv[0]`.
    pub args: Vec<String>,
    /// Its whole environment, in order.
    pub env: Vec<(String, String)>,
    /// Its working directory.
    pub cwd: String,
    /// The user it runs as.
    pub uid: u32,
    /// The group it runs as.
    pub gid: u32,
    /// The agent's MCP endpoint, when its profile names tools (absent in older hosts' frames).
    #[serde(default)]
    pub mcp: Option<McpSummary>,
    /// The agent's root file system, built from an image disk and a scratch disk. Absent (and
    /// in older hosts' frames): the agent runs in the sidecar's initramfs as before.
    #[serde(default)]
    pub root: Option<RootFs>,
    /// The user the agent runs as, OCI style: `name`, `uid`, `name:group` or `uid:gid`,
    /// resolved against the agent root's `/etc/passwd` and `/etc/group`. A user that resolves
    /// to uid 0, and an absent one, run as `uid`/`gid` above.
    #[serde(default)]
    pub user: Option<String>,
    /// The agent's network, when its profile allows egress: the sidecar configures the
    /// interface with this MAC before the agent starts. Absent (and in older hosts' frames):
    /// the VM has no network device.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
}

/// The guest's side of its point-to-point link to the host. Addresses go on the wire as four
/// bytes ([`ipv4_octets`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    /// The guest's IPv4 address.
    #[serde(with = "ipv4_octets")]
    pub address: std::net::Ipv4Addr,
    /// Its prefix length on the link (the gateway is inside it).
    pub prefix_len: u8,
    /// The default route's next hop.
    #[serde(with = "ipv4_octets")]
    pub gateway: std::net::Ipv4Addr,
    /// The resolver the agent's `/etc/resolv.conf` names.
    #[serde(with = "ipv4_octets")]
    pub dns: std::net::Ipv4Addr,
    /// The MAC address of the interface to configure.
    pub mac: [u8; 6],
}

/// An IPv4 address as its four bytes. Serde's own encoding of `Ipv4Addr` depends on whether
/// the format says it is human-readable, which the CBOR encoder and decoder answer
/// differently; four bytes read back the same everywhere.
pub mod ipv4_octets {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::net::Ipv4Addr;

    /// Writes `addr` as four bytes.
    pub fn serialize<S: Serializer>(addr: &Ipv4Addr, s: S) -> Result<S::Ok, S::Error> {
        addr.octets().serialize(s)
    }

    /// Reads four bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
        <[u8; 4]>::deserialize(d).map(Ipv4Addr::from)
    }
}

/// The block devices the agent's root file system is built from. The sidecar mounts the image
/// read-only, keeps its changes on the scratch disk and joins both with overlayfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// The read-only ext4 image disk, such as `/dev/vda`.
    pub image_device: String,
    /// The writable ext4 disk for the agent's changes, formatted by the host, such as
    /// `/dev/vdb`.
    pub scratch_device: String,
}

/// What the sidecar needs to serve the agent its local MCP endpoint and filter early. The host
/// re-checks every call; this summary only lets the sidecar refuse the obvious ones itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpSummary {
    /// The names of the tools the agent sees.
    pub tools: Vec<String>,
    /// The TCP port of the local streamable-HTTP endpoint on 127.0.0.1 in the guest.
    pub local_port: u16,
}

/// One of the agent's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Exit(i32),
    /// A signal with this number killed it.
    Signal(i32),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::{decode_frame, encode_frame};
    use proptest::prelude::*;

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..64)
    }

    fn text() -> impl Strategy<Value = String> {
        "\\PC{0,16}"
    }

    fn network() -> impl Strategy<Value = GuestNetwork> {
        (any::<u32>(), any::<u8>(), any::<u32>(), any::<[u8; 6]>()).prop_map(
            |(address, prefix_len, gateway, mac)| GuestNetwork {
                address: address.into(),
                prefix_len,
                gateway: gateway.into(),
                dns: gateway.into(),
                mac,
            },
        )
    }

    pub(crate) fn any_guest_to_host() -> impl Strategy<Value = GuestToHost> {
        let status = prop_oneof![
            any::<i32>().prop_map(ExitStatus::Exit),
            any::<i32>().prop_map(ExitStatus::Signal),
        ];
        let stream = prop_oneof![Just(OutputStream::Stdout), Just(OutputStream::Stderr)];
        prop_oneof![
            (any::<u32>(), text(), any::<[u8; 16]>(), any::<[u8; 32]>()).prop_map(
                |(protocol_version, sidecar_version, boot_id, ephemeral_public_key)| {
                    GuestToHost::Hello {
                        protocol_version,
                        sidecar_version,
                        boot_id,
                        ephemeral_public_key,
                    }
                }
            ),
            Just(GuestToHost::Frozen),
            any::<u32>().prop_map(|pid| GuestToHost::AgentStarted { pid }),
            (stream, bytes()).prop_map(|(stream, data)| GuestToHost::AgentOutput { stream, data }),
            status.prop_map(|status| GuestToHost::AgentExited { status }),
            text().prop_map(|message| GuestToHost::Error { message }),
        ]
    }

    pub(crate) fn any_host_to_guest() -> impl Strategy<Value = HostToGuest> {
        let spec = (
            text(),
            proptest::collection::vec(text(), 0..4),
            proptest::collection::vec((text(), text()), 0..4),
            text(),
            any::<u32>(),
            any::<u32>(),
            proptest::option::of(
                (proptest::collection::vec(text(), 0..4), any::<u16>())
                    .prop_map(|(tools, local_port)| McpSummary { tools, local_port }),
            ),
            proptest::option::of((text(), text()).prop_map(|(image_device, scratch_device)| {
                RootFs {
                    image_device,
                    scratch_device,
                }
            })),
            proptest::option::of(text()),
            proptest::option::of(network()),
        )
            .prop_map(
                |(command, args, env, cwd, uid, gid, mcp, root, user, network)| AgentSpec {
                    command,
                    args,
                    env,
                    cwd,
                    uid,
                    gid,
                    mcp,
                    root,
                    user,
                    network,
                },
            );
        prop_oneof![
            any::<u32>().prop_map(|protocol_version| HostToGuest::HelloAck { protocol_version }),
            (text(), any::<u32>()).prop_map(|(reason, host_protocol_version)| {
                HostToGuest::HelloReject {
                    reason,
                    host_protocol_version,
                }
            }),
            spec.prop_map(HostToGuest::RunAgent),
            bytes().prop_map(|data| HostToGuest::AgentStdin { data }),
            any::<i32>().prop_map(|signo| HostToGuest::Signal { signo }),
            any::<u32>().prop_map(|port| HostToGuest::EchoConnect { port }),
            Just(HostToGuest::Shutdown),
            Just(HostToGuest::Freeze),
            Just(HostToGuest::Thaw),
            (bytes(), proptest::option::of(network()))
                .prop_map(|(entropy, network)| HostToGuest::Reidentify { entropy, network }),
        ]
    }

    proptest! {
        #[test]
        fn guest_to_host_round_trips(msg in any_guest_to_host()) {
            let frame = encode_frame(&msg).unwrap();
            let (back, used) = decode_frame::<GuestToHost>(&frame).unwrap().unwrap();
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn host_to_guest_round_trips(msg in any_host_to_guest()) {
            let frame = encode_frame(&msg).unwrap();
            let (back, used) = decode_frame::<HostToGuest>(&frame).unwrap().unwrap();
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, msg);
        }
    }

    /// `RunAgent` as hosts before image roots encoded it: no `root`, no `user`.
    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum OldHostToGuest {
        RunAgent(OldAgentSpec),
        /// Before networked clones: no `network`.
        Reidentify {
            #[serde(with = "serde_bytes")]
            entropy: Vec<u8>,
        },
    }

    #[derive(Serialize)]
    struct OldAgentSpec {
        command: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        uid: u32,
        gid: u32,
    }

    #[test]
    fn an_older_hosts_run_agent_decodes_without_root_or_user() {
        let old = OldHostToGuest::RunAgent(OldAgentSpec {
            command: "/bin/agent".into(),
            args: vec!["-v".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            uid: 1000,
            gid: 1000,
        });
        let frame = encode_frame(&old).unwrap();
        let (back, _) = decode_frame::<HostToGuest>(&frame).unwrap().unwrap();
        let HostToGuest::RunAgent(spec) = back else {
            panic!("not a RunAgent: {back:?}");
        };
        assert_eq!(spec.command, "/bin/agent");
        assert_eq!((spec.uid, spec.gid), (1000, 1000));
        assert_eq!(spec.mcp, None);
        assert_eq!(spec.root, None);
        assert_eq!(spec.user, None);
        assert_eq!(spec.network, None);
    }

    #[test]
    fn an_older_hosts_reidentify_decodes_without_a_network() {
        let old = OldHostToGuest::Reidentify {
            entropy: vec![7; 32],
        };
        let frame = encode_frame(&old).unwrap();
        let (back, _) = decode_frame::<HostToGuest>(&frame).unwrap().unwrap();
        assert_eq!(
            back,
            HostToGuest::Reidentify {
                entropy: vec![7; 32],
                network: None
            }
        );
    }

    #[test]
    fn byte_fields_are_cbor_byte_strings() {
        let hello = GuestToHost::Hello {
            protocol_version: 1,
            sidecar_version: "0.1.0".into(),
            boot_id: [0xab; 16],
            ephemeral_public_key: [0xcd; 32],
        };
        let frame = encode_frame(&hello).unwrap();
        // Major type 2 (byte string) with a one-byte length: 0x58 0x20 for 32 bytes, and
        // 0x50 for 16 bytes.
        let body = &frame[4..];
        assert!(body.windows(2).any(|w| w == [0x58, 0x20]));
        assert!(body.contains(&0x50));
        // And the tag names the message.
        assert!(body.windows(5).any(|w| w == b"hello"));
    }
}
