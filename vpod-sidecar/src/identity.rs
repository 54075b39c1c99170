//! The sidecar's boot identity (boot id and X25519 boot key) and how a clone takes a new one.
//!
//! A boot draws one identity from `getrandom`: the boot id tells the host a reconnect from a
//! reboot, and the boot key is the sidecar's side of every credential session (its public half
//! goes into `Hello`). An identity lives in an [`IdentityCell`], which the credential proxy
//! reads for every new session and the control loop builds its `Hello` from.
//!
//! # Clones
//!
//! A guest restored from a snapshot more than once (a fork, or a warm start from an image's
//! template) would otherwise be several guests with one identity and one CRNG state. The host
//! tells each clone so with `Reidentify { entropy }`, and [`reidentify`] then, in this order:
//! 1. mixes the host's bytes into the kernel's pool and reseeds the CRNG
//!    ([`crate::init::add_host_entropy`]), so that nothing drawn from here on repeats between
//!    clones;
//! 2. draws a new boot id and boot key from the reseeded CRNG and swaps them into the cell:
//!    the proxy's pool drops every session made with the old key, and the fallback path's
//!    envelope opener is made anew;
//! 3. returns the new `Hello`, which the control loop reconnects with. The host admits the
//!    new boot and only then binds the VM's credential relay to the new key: the device sees
//!    a new identity, under the clone's own VM id.
//!
//! The processes a `Freeze` stopped before the snapshot go on only after that (the caller's
//! [`crate::control::HostRequests::reidentify`] thaws them), so an agent never runs in a clone
//! with its parent's kernel randomness.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand_core::{OsRng, RngCore};
use shared_proto::handshake::PROTOCOL_VERSION;
use shared_proto::message::GuestToHost;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::init::{self, InitError};
use crate::proxy::ProxyIdentity;

/// The pause before retrying `getrandom`, which fails only in exotic setups.
const RANDOM_RETRY: Duration = Duration::from_millis(100);

/// Fills an array from the kernel's CSPRNG, retrying instead of panicking on failure.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    while let Err(e) = OsRng.try_fill_bytes(&mut out) {
        tracing::warn!(error = %e, "getrandom");
        std::thread::sleep(RANDOM_RETRY);
    }
    out
}

/// A fresh identity: a boot id and a boot key from the kernel's CSPRNG.
pub fn draw() -> ProxyIdentity {
    ProxyIdentity {
        boot_secret: Zeroizing::new(random_bytes::<32>()),
        boot_id: random_bytes::<16>(),
    }
}

/// The `Hello` that announces `identity`.
pub fn hello(identity: &ProxyIdentity) -> GuestToHost {
    let secret = StaticSecret::from(*identity.boot_secret);
    GuestToHost::Hello {
        protocol_version: PROTOCOL_VERSION,
        sidecar_version: env!("CARGO_PKG_VERSION").to_owned(),
        boot_id: identity.boot_id,
        ephemeral_public_key: PublicKey::from(&secret).to_bytes(),
    }
}

/// The current identity, shared by the control loop and the credential proxy.
#[derive(Debug)]
pub struct IdentityCell {
    current: RwLock<Arc<ProxyIdentity>>,
}

impl From<ProxyIdentity> for IdentityCell {
    fn from(identity: ProxyIdentity) -> Self {
        Self {
            current: RwLock::new(Arc::new(identity)),
        }
    }
}

impl IdentityCell {
    /// The identity now in force. Compare with [`Arc::ptr_eq`] to tell a change.
    pub fn current(&self) -> Arc<ProxyIdentity> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts `identity` in force; what was made with the old one is retired by its users.
    pub fn replace(&self, identity: ProxyIdentity) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(identity);
    }
}

/// Steps 1 and 2 of a clone's new identity (see the module doc): reseeds the kernel with the
/// host's `entropy`, then draws and puts in force a new identity, whose `Hello` it returns.
/// When the reseed fails, the old identity stays, and so does the failure's answer to the host.
pub fn reidentify(cell: &IdentityCell, entropy: &[u8]) -> Result<GuestToHost, InitError> {
    init::add_host_entropy(entropy)?;
    let fresh = draw();
    let hello = hello(&fresh);
    cell.replace(fresh);
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_identity_is_a_new_one_and_says_so_in_its_hello() {
        let cell = IdentityCell::from(draw());
        let before = cell.current();
        cell.replace(draw());
        let after = cell.current();
        assert!(!Arc::ptr_eq(&before, &after));
        assert_ne!(before.boot_id, after.boot_id);
        assert_ne!(*before.boot_secret, *after.boot_secret);
        let (
            GuestToHost::Hello {
                boot_id: a,
                ephemeral_public_key: ka,
                ..
            },
            GuestToHost::Hello {
                boot_id: b,
                ephemeral_public_key: kb,
                ..
            },
        ) = (hello(&before), hello(&after))
        else {
            panic!("not hellos");
        };
        assert_eq!(a, before.boot_id);
        assert_eq!(b, after.boot_id);
        assert_ne!(ka, kb);
        // The public key is the secret's.
        let public = PublicKey::from(&StaticSecret::from(*after.boot_secret)).to_bytes();
        assert_eq!(kb, public);
    }

    #[test]
    fn a_refused_reseed_keeps_the_identity() {
        let cell = IdentityCell::from(draw());
        let before = cell.current();
        // A length out of bounds is refused before any syscall, so this runs anywhere.
        assert!(reidentify(&cell, &[1; 3]).is_err());
        assert!(Arc::ptr_eq(&before, &cell.current()));
    }
}
