//! The fallback path: the secret sealed to the sidecar's boot key, under a grant that says the
//! fallback is allowed, and never for a VM whose calls are tokenized in enforce mode.

use rand_core::{OsRng, RngCore};
use shared_proto::credential::{DeviceToSidecar, ProxyTarget};
use shared_proto::envelope;
use x25519_dalek::PublicKey;

use super::{Refusal, SEAL_TTL_SECS, SessionContext, SessionPeer, now, refused, resolve};
use crate::grant::Release;
use crate::tokenize;

/// The fallback path: seal the secret to the sidecar's boot key, under a grant that allows it.
pub(super) fn seal<C: SessionContext>(
    ctx: &C,
    peer: &SessionPeer,
    target: &ProxyTarget,
) -> DeviceToSidecar {
    let data = match ctx.snapshot() {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %crate::ErrorChain(&e), "vault");
            return refused(503, "the vault is unavailable");
        }
    };
    if ctx
        .tokens()
        .get(&peer.host, &peer.vm_id)
        .is_some_and(|vm| tokenize::lock(&vm).enforce())
    {
        tracing::info!(vm = %peer.vm_id, "seal refused: the VM's calls are tokenized");
        return refused(
            403,
            "this agent's calls are tokenized, which the fallback path would bypass; \
             use the primary path",
        );
    }
    let (entry, authority) = match resolve(&data, &peer.origin, target, Release::Seal) {
        Ok((index, authority)) => (&data.entries[index], authority),
        Err(Refusal { status, reason, .. }) => {
            tracing::info!(vm = %peer.vm_id, ?target, "seal refused");
            return refused(status, reason);
        }
    };
    let mut request_id = [0u8; 16];
    OsRng.fill_bytes(&mut request_id);
    let recipient = PublicKey::from(peer.sidecar_public_key);
    match envelope::seal(
        &mut OsRng,
        &recipient,
        request_id,
        &peer.vm_id,
        now() + SEAL_TTL_SECS,
        entry.secret.expose(),
    ) {
        Ok(envelope) => {
            tracing::info!(vm = %peer.vm_id, credential = %entry.name, %authority, "sealed");
            DeviceToSidecar::Sealed {
                authority,
                envelope,
                header: entry.header.clone(),
                format: entry.format.clone(),
            }
        }
        Err(e) => refused(500, format!("cannot seal: {e}")),
    }
}
