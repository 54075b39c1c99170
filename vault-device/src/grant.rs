//! Grants: the device's standing permission to release one credential.
//!
//! A [`Grant`] names a credential, one target authority (`host` or `host:port`), one paired
//! host (by its link key: each host picks its own VM ids), one VM of that host (or `*` for any
//! VM of that host only) and an expiry. Releasing a credential, either by making the call
//! (primary path) or by sealing it (fallback path, only when the grant says `fallback`), needs
//! a live grant that matches all of them for the session's origin ([`crate::moves`]: the VM it
//! was before it moved, if it did); [`find_grant`] is that check. A grant from an older vault
//! names no host and is for the first pairing ([`crate::vault`]); one that still names none
//! matches nothing.
//! Grants come from `vault-device grant` (kept in the vault: [`issue`], [`revoke`]) or from a
//! passkey approval the device verified itself ([`crate::approval`]: kept in memory for
//! minutes, call path only).

use serde::{Deserialize, Serialize};

use crate::moves::HostVm;
use crate::vault::{Pairing, host_label};

/// A permission to release `credential` for calls to `host` from `vm` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The credential's name.
    pub credential: String,
    /// The authority the call goes to.
    pub host: String,
    /// The VM id, or `*` for any VM of the host [`Grant::on`].
    pub vm: String,
    /// The link key of the host whose VM this is (`None` only in a grant read from an older
    /// vault before any pairing: it matches nothing).
    #[serde(default, with = "serde_bytes")]
    pub on: Option<[u8; 32]>,
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

/// Errors of issuing a grant.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The vault holds no credential of that name.
    #[error("no credential named {0:?}")]
    NoSuchCredential(String),
    /// The credential may not be sent to the host asked for.
    #[error("{credential} may not be sent to {host} (its hosts: {hosts})")]
    HostNotAllowed {
        /// The credential.
        credential: String,
        /// The authority asked for.
        host: String,
        /// The credential's allowed authorities, comma-separated.
        hosts: String,
    },
}

/// What `vault-device grant` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRequest {
    /// The credential's name.
    pub credential: String,
    /// The authority the call goes to; one of the credential's hosts.
    pub host: String,
    /// The VM id, or [`ANY_VM`].
    pub vm: String,
    /// The link key of the paired host the VM runs on.
    pub on: [u8; 32],
    /// Seconds from now.
    pub ttl_secs: u64,
    /// Whether the fallback path is allowed too.
    pub fallback: bool,
}

/// Whether `authority` is one of `hosts` (ASCII case-insensitive, exact): where a credential
/// may be sent.
pub fn host_allowed(hosts: &[String], authority: &str) -> bool {
    hosts.iter().any(|h| h.eq_ignore_ascii_case(authority))
}

/// Adds the grant `request` asks for to `grants` at `now` and answers it. The credential's
/// allowed hosts are `credential_hosts` (`None`: the vault has no credential of that name), and
/// the host must be one of them. Expired grants are dropped on the way.
pub fn issue(
    grants: &mut Vec<Grant>,
    credential_hosts: Option<&[String]>,
    request: GrantRequest,
    now: u64,
) -> Result<Grant, GrantError> {
    let Some(hosts) = credential_hosts else {
        return Err(GrantError::NoSuchCredential(request.credential));
    };
    if !host_allowed(hosts, &request.host) {
        return Err(GrantError::HostNotAllowed {
            credential: request.credential,
            host: request.host,
            hosts: hosts.join(","),
        });
    }
    grants.retain(|g| g.expires_at > now);
    let grant = Grant {
        credential: request.credential,
        host: request.host,
        vm: request.vm,
        on: Some(request.on),
        expires_at: now.saturating_add(request.ttl_secs),
        fallback: request.fallback,
    };
    grants.push(grant.clone());
    Ok(grant)
}

/// Removes every grant of `credential`.
pub fn revoke(grants: &mut Vec<Grant>, credential: &str) {
    grants.retain(|g| g.credential != credential);
}

impl Grant {
    /// The grant as `vault-device list` shows it at `now`, naming its host as `pairings` do
    /// ([`host_label`]): `<credential> host <host> on <host> vm <vm> <N>s left|expired[ fallback]`.
    pub fn describe(&self, now: u64, pairings: &[Pairing]) -> String {
        let left = self.expires_at.saturating_sub(now);
        let on = self
            .on
            .map_or_else(|| "(no host)".to_owned(), |k| host_label(pairings, &k));
        format!(
            "{} host {} on {on} vm {} {}{}",
            self.credential,
            self.host,
            self.vm,
            if left == 0 {
                "expired".to_owned()
            } else {
                format!("{left}s left")
            },
            if self.fallback { " fallback" } else { "" }
        )
    }
}

/// The first live grant that allows releasing `credential` to `host` for the VM `origin` at
/// `now`: for the origin's host, and for its VM or any VM of that host.
pub fn find_grant<'a>(
    grants: &'a [Grant],
    credential: &str,
    host: &str,
    origin: &HostVm,
    release: Release,
    now: u64,
) -> Option<&'a Grant> {
    grants.iter().find(|g| {
        g.credential == credential
            && g.host.eq_ignore_ascii_case(host)
            && g.on == Some(origin.host)
            && (g.vm == ANY_VM || g.vm == origin.vm)
            && now < g.expires_at
            && (release == Release::Call || g.fallback)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [0xa; 32];
    const B: [u8; 32] = [0xb; 32];

    fn g(vm: &str, fallback: bool) -> Grant {
        Grant {
            credential: "openai".into(),
            host: "api.openai.com".into(),
            vm: vm.into(),
            on: Some(A),
            expires_at: 100,
            fallback,
        }
    }

    fn on(host: [u8; 32], vm: &str) -> HostVm {
        HostVm::new(host, vm)
    }

    #[test]
    fn every_dimension_must_match() {
        let grants = [g("vm-1", false)];
        let ok = |c, h, v, r, now| find_grant(&grants, c, h, &on(A, v), r, now).is_some();
        assert!(ok("openai", "api.openai.com", "vm-1", Release::Call, 99));
        assert!(!ok("openai", "api.openai.com", "vm-1", Release::Call, 100));
        assert!(!ok("other", "api.openai.com", "vm-1", Release::Call, 1));
        assert!(!ok("openai", "evil.com", "vm-1", Release::Call, 1));
        assert!(!ok("openai", "api.openai.com", "vm-2", Release::Call, 1));
        assert!(!ok("openai", "api.openai.com", "vm-1", Release::Seal, 1));
        let any = [g(ANY_VM, true)];
        let found = |o: &HostVm| find_grant(&any, "openai", "API.openai.com", o, Release::Seal, 1);
        assert!(found(&on(A, "vm-9")).is_some());
    }

    #[test]
    fn a_grant_serves_the_vms_of_its_own_host_only() {
        let grants = [g("vm-1", false)];
        let found =
            |o: &HostVm| find_grant(&grants, "openai", "api.openai.com", o, Release::Call, 1);
        assert!(found(&on(A, "vm-1")).is_some());
        // Host B picked the same id for a VM of its own.
        assert!(found(&on(B, "vm-1")).is_none());
        // `*` is any VM of that host, not of every host.
        let any = [g(ANY_VM, false)];
        let found = |o: &HostVm| find_grant(&any, "openai", "api.openai.com", o, Release::Call, 1);
        assert!(found(&on(A, "vm-5")).is_some());
        assert!(found(&on(B, "vm-5")).is_none());
        // A grant that names no host matches none.
        let mut unnamed = g(ANY_VM, false);
        unnamed.on = None;
        let none = [unnamed];
        assert!(
            find_grant(
                &none,
                "openai",
                "api.openai.com",
                &on(A, "v"),
                Release::Call,
                1
            )
            .is_none()
        );
    }

    fn ask(credential: &str, host: &str) -> GrantRequest {
        GrantRequest {
            credential: credential.into(),
            host: host.into(),
            vm: "vm-1".into(),
            on: B,
            ttl_secs: 60,
            fallback: true,
        }
    }

    #[test]
    fn issuing_checks_the_credential_and_host_and_drops_expired_grants() {
        let hosts = vec!["api.openai.com".to_owned(), "b.example:8443".to_owned()];
        let mut grants = vec![g("vm-1", false)];
        let err = issue(&mut grants, None, ask("nope", "x"), 1).unwrap_err();
        assert_eq!(err.to_string(), "no credential named \"nope\"");
        let err = issue(&mut grants, Some(&hosts), ask("openai", "evil.com"), 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "openai may not be sent to evil.com (its hosts: api.openai.com,b.example:8443)"
        );
        assert_eq!(grants.len(), 1, "a refused request changes nothing");
        // At 200 the first grant (expiring at 100) is gone.
        let new = issue(
            &mut grants,
            Some(&hosts),
            ask("openai", "B.example:8443"),
            200,
        )
        .unwrap();
        assert_eq!(new.expires_at, 260);
        assert_eq!(new.on, Some(B));
        assert_eq!(grants, std::slice::from_ref(&new));
        let pairings = [Pairing {
            address: "b.example:7000".into(),
            host_public_key: B,
            host_name: "host-b".into(),
        }];
        assert_eq!(
            new.describe(200, &pairings),
            "openai host B.example:8443 on host-b vm vm-1 60s left fallback"
        );
        assert_eq!(
            g("vm-1", false).describe(100, &pairings),
            format!(
                "openai host api.openai.com on {} vm vm-1 expired",
                hex::encode(A)
            )
        );
        revoke(&mut grants, "openai");
        assert!(grants.is_empty());
    }
}
