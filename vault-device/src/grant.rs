//! Grants: the device's standing permission to release one credential.
//!
//! A [`Grant`] names a credential, one target authority (`host` or `host:port`), one VM (or
//! `*` for any VM of the paired host) and an expiry. Releasing a credential, either by making
//! the call (primary path) or by sealing it (fallback path, only when the grant says
//! `fallback`), needs a live grant that matches all of them; [`find_grant`] is that check.
//! Grants come from `vault-device grant` (kept in the vault) or from a passkey approval the
//! device verified itself ([`crate::approval`]: kept in memory for minutes, call path only).

use serde::{Deserialize, Serialize};

/// A permission to release `credential` for calls to `host` from `vm` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The credential's name.
    pub credential: String,
    /// The authority the call goes to.
    pub host: String,
    /// The VM id, or `*` for any.
    pub vm: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// Whether the fallback path (sealing the secret into the guest) is allowed.
    pub fallback: bool,
}

/// The wildcard VM.
pub const ANY_VM: &str = "*";

/// What kind of release is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// The device makes the call.
    Call,
    /// The device seals the secret to the sidecar.
    Seal,
}

/// The first live grant that allows releasing `credential` to `host` for `vm` at `now`.
pub fn find_grant<'a>(
    grants: &'a [Grant],
    credential: &str,
    host: &str,
    vm: &str,
    release: Release,
    now: u64,
) -> Option<&'a Grant> {
    grants.iter().find(|g| {
        g.credential == credential
            && g.host.eq_ignore_ascii_case(host)
            && (g.vm == ANY_VM || g.vm == vm)
            && now < g.expires_at
            && (release == Release::Call || g.fallback)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(vm: &str, fallback: bool) -> Grant {
        Grant {
            credential: "openai".into(),
            host: "api.openai.com".into(),
            vm: vm.into(),
            expires_at: 100,
            fallback,
        }
    }

    #[test]
    fn every_dimension_must_match() {
        let grants = [g("vm-1", false)];
        let ok = |c, h, v, r, now| find_grant(&grants, c, h, v, r, now).is_some();
        assert!(ok("openai", "api.openai.com", "vm-1", Release::Call, 99));
        assert!(!ok("openai", "api.openai.com", "vm-1", Release::Call, 100));
        assert!(!ok("other", "api.openai.com", "vm-1", Release::Call, 1));
        assert!(!ok("openai", "evil.com", "vm-1", Release::Call, 1));
        assert!(!ok("openai", "api.openai.com", "vm-2", Release::Call, 1));
        assert!(!ok("openai", "api.openai.com", "vm-1", Release::Seal, 1));
        let any = [g(ANY_VM, true)];
        assert!(find_grant(&any, "openai", "API.openai.com", "vm-9", Release::Seal, 1).is_some());
    }
}
