//! The version handshake on the control channel.
//!
//! The sidecar opens the connection and sends `GuestToHost::Hello`. The host answers with
//! [`answer_hello`]: `HelloAck` when the versions match and `HelloReject` otherwise. The sidecar
//! checks that answer with [`check_hello_answer`]. A version mismatch is
//! [`HandshakeError::VersionMismatch`] on both sides.

use crate::message::{GuestToHost, HostToGuest};

/// The version of this protocol. Bump it on any incompatible change to a message.
pub const PROTOCOL_VERSION: u32 = 1;

/// Errors of the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch {
        /// This side's version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// The host refused the hello for a reason other than the version.
    #[error("hello rejected: {reason}")]
    Rejected {
        /// The host's reason.
        reason: String,
    },
    /// The first message was not part of the handshake.
    #[error("expected {expected}, got another message")]
    UnexpectedMessage {
        /// What was expected.
        expected: &'static str,
    },
}

/// The host's decision on a sidecar's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloVerdict {
    /// The message to send back to the sidecar.
    pub reply: HostToGuest,
    /// `Ok` when the sidecar is accepted; the error otherwise.
    pub outcome: Result<(), HandshakeError>,
}

/// Checks the sidecar's first message and produces the host's reply.
pub fn answer_hello(first: &GuestToHost) -> HelloVerdict {
    match first {
        GuestToHost::Hello {
            protocol_version, ..
        } if *protocol_version == PROTOCOL_VERSION => HelloVerdict {
            reply: HostToGuest::HelloAck {
                protocol_version: PROTOCOL_VERSION,
            },
            outcome: Ok(()),
        },
        GuestToHost::Hello {
            protocol_version, ..
        } => {
            let err = HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: *protocol_version,
            };
            HelloVerdict {
                reply: HostToGuest::HelloReject {
                    reason: err.to_string(),
                    host_protocol_version: PROTOCOL_VERSION,
                },
                outcome: Err(err),
            }
        }
        _ => {
            let err = HandshakeError::UnexpectedMessage { expected: "Hello" };
            HelloVerdict {
                reply: HostToGuest::HelloReject {
                    reason: err.to_string(),
                    host_protocol_version: PROTOCOL_VERSION,
                },
                outcome: Err(err),
            }
        }
    }
}

/// The sidecar's check of the host's answer to its `Hello`.
pub fn check_hello_answer(answer: &HostToGuest) -> Result<(), HandshakeError> {
    match answer {
        HostToGuest::HelloAck { protocol_version } if *protocol_version == PROTOCOL_VERSION => {
            Ok(())
        }
        HostToGuest::HelloAck { protocol_version } => Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: *protocol_version,
        }),
        HostToGuest::HelloReject {
            host_protocol_version,
            ..
        } if *host_protocol_version != PROTOCOL_VERSION => Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: *host_protocol_version,
        }),
        HostToGuest::HelloReject { reason, .. } => Err(HandshakeError::Rejected {
            reason: reason.clone(),
        }),
        _ => Err(HandshakeError::UnexpectedMessage {
            expected: "HelloAck or HelloReject",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(v: u32) -> GuestToHost {
        GuestToHost::Hello {
            protocol_version: v,
            sidecar_version: "test".into(),
            boot_id: [1; 16],
            ephemeral_public_key: [2; 32],
        }
    }

    #[test]
    fn matching_versions_are_acked_and_accepted() {
        let v = answer_hello(&hello(PROTOCOL_VERSION));
        assert_eq!(v.outcome, Ok(()));
        assert_eq!(check_hello_answer(&v.reply), Ok(()));
    }

    #[test]
    fn a_newer_guest_is_rejected_with_a_mismatch_on_both_sides() {
        let v = answer_hello(&hello(PROTOCOL_VERSION + 1));
        assert_eq!(
            v.outcome,
            Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            })
        );
        assert!(matches!(v.reply, HostToGuest::HelloReject { .. }));
        // The guest sees the host's (equal) version in the reject, so it reports the reason.
        assert!(matches!(
            check_hello_answer(&v.reply),
            Err(HandshakeError::Rejected { .. })
        ));
    }

    #[test]
    fn the_guest_reports_a_mismatch_from_an_older_host() {
        let ack = HostToGuest::HelloAck {
            protocol_version: PROTOCOL_VERSION + 7,
        };
        assert_eq!(
            check_hello_answer(&ack),
            Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 7
            })
        );
        let reject = HostToGuest::HelloReject {
            reason: "old".into(),
            host_protocol_version: 0,
        };
        assert_eq!(
            check_hello_answer(&reject),
            Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: 0
            })
        );
    }

    #[test]
    fn other_first_messages_are_unexpected() {
        let v = answer_hello(&GuestToHost::AgentStarted { pid: 1 });
        assert!(matches!(
            v.outcome,
            Err(HandshakeError::UnexpectedMessage { .. })
        ));
        assert!(matches!(v.reply, HostToGuest::HelloReject { .. }));
        assert!(matches!(
            check_hello_answer(&HostToGuest::Shutdown),
            Err(HandshakeError::UnexpectedMessage { .. })
        ));
    }
}
