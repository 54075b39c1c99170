//! Grants: the device's standing permission to release one credential.
//!
//! A [`Grant`] names a credential, one target authority (`host` or `host:port`), one VM (or
//! `*` for any VM of the paired host) and an expiry. Releasing a credential, either by making
//! the call (primary path) or by sealing it (fallback path, only when the grant says
//! `fallback`), needs a live grant that matches all of them; [`find_grant`] is that check.
//! Grants come from `vault-device grant` (kept in the vault: [`issue`], [`revoke`]) or from a
//! passkey approval the device verified itself ([`crate::approval`]: kept in memory for
//! minutes, call path only).

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
    /// The grant as `vault-device list` shows it at `now`:
    /// `<credential> host <host> vm <vm> <N>s left|expired[ fallback]`.
    pub fn describe(&self, now: u64) -> String {
        let left = self.expires_at.saturating_sub(now);
        format!(
            "{} host {} vm {} {}{}",
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

    fn ask(credential: &str, host: &str) -> GrantRequest {
        GrantRequest {
            credential: credential.into(),
            host: host.into(),
            vm: "vm-1".into(),
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
        assert_eq!(grants, std::slice::from_ref(&new));
        assert_eq!(
            new.describe(200),
            "openai host B.example:8443 vm vm-1 60s left fallback"
        );
        assert_eq!(
            g("vm-1", false).describe(100),
            "openai host api.openai.com vm vm-1 expired"
        );
        revoke(&mut grants, "openai");
        assert!(grants.is_empty());
    }
}
