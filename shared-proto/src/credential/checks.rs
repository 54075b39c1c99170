//! The field checks behind the [`Validate`](super::Validate) impls.

use super::{CredentialError, HeaderLine, MAX_HEADERS, MAX_NAME_LEN, MAX_VALUE_LEN};

pub(super) fn check_name(s: &str, field: &'static str) -> Result<(), CredentialError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.chars().any(|c| c.is_control()) {
        return Err(CredentialError::InvalidField { field });
    }
    Ok(())
}

/// A VM id: a name, and never `*`, which a grant uses to mean every VM; a host that could name
/// `*` as the VM of a session would have the user approve a grant for all of them.
pub(super) fn check_vm_id(s: &str) -> Result<(), CredentialError> {
    check_name(s, "vm_id")?;
    if s == "*" {
        return Err(CredentialError::InvalidField { field: "vm_id" });
    }
    Ok(())
}

pub(super) fn check_value(s: &[u8], field: &'static str) -> Result<(), CredentialError> {
    if s.len() > MAX_VALUE_LEN || s.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(CredentialError::InvalidField { field });
    }
    Ok(())
}

pub(super) fn check_path(s: &str) -> Result<(), CredentialError> {
    check_value(s.as_bytes(), "path_and_query")?;
    if !s.starts_with('/') || s.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(CredentialError::InvalidField {
            field: "path_and_query",
        });
    }
    Ok(())
}

/// An authority is `host` or `host:port` of letters, digits, `-`, `.` and one `:port`.
pub(super) fn check_authority(s: &str) -> Result<(), CredentialError> {
    let bad = CredentialError::InvalidField { field: "authority" };
    check_name(s, "authority")?;
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad);
    }
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(bad);
    }
    Ok(())
}

pub(super) fn check_headers(headers: &[HeaderLine]) -> Result<(), CredentialError> {
    if headers.len() > MAX_HEADERS {
        return Err(CredentialError::InvalidField { field: "headers" });
    }
    for (name, value) in headers {
        check_name(name, "header name")?;
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(CredentialError::InvalidField {
                field: "header name",
            });
        }
        check_value(value, "header value")?;
    }
    Ok(())
}

pub(super) fn check_chunk(bytes: &[u8], max: usize) -> Result<(), CredentialError> {
    if bytes.len() > max {
        return Err(CredentialError::InvalidField { field: "bytes" });
    }
    Ok(())
}
