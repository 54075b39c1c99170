//! The relay greeting (host -> sidecar) and the proxy messages that travel end to end between
//! the sidecar and the device.

use serde::{Deserialize, Serialize};

use super::checks::{
    check_authority, check_chunk, check_headers, check_name, check_path, check_value,
};
use super::{CredentialError, MAX_CHUNK, Validate};
use crate::envelope::Envelope;

/// Host -> sidecar: the first frame on a credential proxy connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayGreeting {
    /// A device is linked; records of the end-to-end session follow.
    Ready {
        /// The VM id the host gave this VM (bound into the session prologue).
        vm_id: String,
        /// The paired device's static public key (the sidecar's session peer).
        #[serde(with = "serde_bytes")]
        device_public_key: [u8; 32],
    },
    /// No device is linked right now; the host closes the connection.
    Unavailable {
        /// Why, for the agent's error message.
        reason: String,
    },
}

/// What a proxied request is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyTarget {
    /// Base-URL mode: `http://127.0.0.1:PORT/<service>/<path>`; the device maps the service (a
    /// credential name) to its first allowed host.
    Service {
        /// The credential name.
        name: String,
        /// The path and query after the service, starting with `/`.
        path_and_query: String,
    },
    /// `HTTP_PROXY` mode: the absolute URI the agent asked for; the device calls it over HTTPS.
    Absolute {
        /// The authority (`host` or `host:port`).
        authority: String,
        /// The path and query, starting with `/`.
        path_and_query: String,
    },
}

/// A header line: name and raw value.
pub type HeaderLine = (String, serde_bytes::ByteBuf);

/// The head of a proxied request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRequest {
    /// Where it goes.
    pub target: ProxyTarget,
    /// The HTTP method.
    pub method: String,
    /// The agent's headers, minus hop-by-hop ones.
    pub headers: Vec<HeaderLine>,
}

/// Sidecar -> device, inside the end-to-end session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SidecarToDevice {
    /// A request head; its body follows as `Body` messages and `End`.
    Request(ProxyRequest),
    /// Up to [`MAX_CHUNK`] body bytes.
    Body(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of the body.
    End,
    /// The fallback path: seal the credential for a call to `target` (its path is not used).
    Seal {
        /// Which credential and host, as for a request.
        target: ProxyTarget,
    },
}

/// Device -> sidecar, inside the end-to-end session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceToSidecar {
    /// The upstream response head; its body follows as `Body` messages and `End`.
    Head {
        /// The HTTP status.
        status: u16,
        /// The response headers, minus hop-by-hop ones.
        headers: Vec<HeaderLine>,
    },
    /// Up to [`MAX_CHUNK`] body bytes, sent as they arrive from upstream.
    Body(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of the response body.
    End,
    /// The device refused or could not make the call; nothing was sent upstream with the
    /// credential if `status` is 403.
    Refused {
        /// The HTTP status the sidecar answers the agent with (403 refused, 502 upstream).
        status: u16,
        /// A message for the agent.
        reason: String,
    },
    /// The fallback path: the secret sealed to the sidecar's boot key, and how to inject it.
    Sealed {
        /// The authority (`host` or `host:port`) the secret may be sent to.
        authority: String,
        /// The envelope (request id, VM id, expiry bound in).
        envelope: Envelope,
        /// The header to set.
        header: String,
        /// The value format; `{}` is replaced by the secret.
        format: String,
    },
}

impl Validate for RelayGreeting {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Ready { vm_id, .. } => check_name(vm_id, "vm_id"),
            Self::Unavailable { reason } => check_value(reason.as_bytes(), "reason"),
        }
    }
}

impl Validate for ProxyTarget {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Service {
                name,
                path_and_query,
            } => {
                check_name(name, "name")?;
                check_path(path_and_query)
            }
            Self::Absolute {
                authority,
                path_and_query,
            } => {
                check_authority(authority)?;
                check_path(path_and_query)
            }
        }
    }
}

impl Validate for SidecarToDevice {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Request(r) => {
                r.target.validate()?;
                if r.method.is_empty()
                    || r.method.len() > 16
                    || !r.method.bytes().all(|b| b.is_ascii_uppercase())
                {
                    return Err(CredentialError::InvalidField { field: "method" });
                }
                check_headers(&r.headers)
            }
            Self::Body(b) => check_chunk(b, MAX_CHUNK),
            Self::End => Ok(()),
            Self::Seal { target } => target.validate(),
        }
    }
}

impl Validate for DeviceToSidecar {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Head { status, headers } => {
                if !(100..=999).contains(status) {
                    return Err(CredentialError::InvalidField { field: "status" });
                }
                check_headers(headers)
            }
            Self::Body(b) => check_chunk(b, MAX_CHUNK),
            Self::End => Ok(()),
            Self::Refused { status, reason } => {
                if !(400..=599).contains(status) {
                    return Err(CredentialError::InvalidField { field: "status" });
                }
                check_value(reason.as_bytes(), "reason")
            }
            Self::Sealed {
                authority,
                header,
                format,
                ..
            } => {
                check_authority(authority)?;
                check_name(header, "header")?;
                check_value(format.as_bytes(), "format")
            }
        }
    }
}
