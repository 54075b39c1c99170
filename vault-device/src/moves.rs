//! Moves: following a VM that live-migrates from one paired host to another.
//!
//! A VM's memory moves whole, so its sidecar keeps its boot key, but it gets a new id on its
//! new host. Before the switch-over the source host sends `HostToDevice::Moving` on its own
//! link, naming the VM, its boot key, the target host's link key and the VM's id there; the
//! device records a [`Move`] in the vault ([`note`]) and answers `MoveNoted`.
//!
//! # Origins
//!
//! Grants, approvals and the per-VM limits of a session are those of its **origin**
//! ([`resolve`]): a session from host `H` for VM `V` whose sidecar proves boot key `K`
//! resolves to the `from` side of the move that names `(H, V, K)` as its target, resolved
//! again the same way (a VM may move twice), else to `(H, V)` itself. A walk that does not end
//! after [`MAX_CHAIN`] steps (a loop, or a chain too long) resolves to `(H, V)`: the session
//! gets only what its own host granted it. A session for `(H, V)` with another boot key is
//! some other VM that reused the id: it is not resolved.
//!
//! Once a session from the target has completed its handshake (its sidecar proved it holds
//! `K`), the move is marked arrived ([`mark_arrived`]); from then on the source's sessions for
//! that VM with that key are refused ([`Resolution::Moved`]), so only one copy is served.
//!
//! # What the device trusts
//!
//! - Only a paired host can be named as the target: the device holds no grant for a host it
//!   has not pinned, and [`note`] refuses any other (and the source itself).
//! - The source can hand over only what it could already do for that VM (its grants for
//!   `(source, vm)`), and only to a session whose sidecar proves that very boot key.
//! - The target cannot claim a VM unasked: only a notice from the source's own link creates a
//!   move, and a move names one target host and id.
//! - A notice speaks only for the VMs of the host whose link it came on: the move's source is
//!   that link's key, never a field of the notice.

use serde::{Deserialize, Serialize};

/// The most moves the vault remembers; the oldest are dropped first.
pub const MAX_MOVES: usize = 1024;
/// The most moves one resolution walks back (a VM that moved more often than this resolves to
/// itself).
pub const MAX_CHAIN: usize = 16;

/// A VM as one host names it: the host's link key and the VM's id there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostVm {
    /// The host's link key ([`crate::vault::Pairing::host_public_key`]).
    #[serde(with = "serde_bytes")]
    pub host: [u8; 32],
    /// The VM's id on that host.
    pub vm: String,
}

impl HostVm {
    /// The VM `vm` on `host`.
    pub fn new(host: [u8; 32], vm: impl Into<String>) -> Self {
        Self {
            host,
            vm: vm.into(),
        }
    }
}

/// A VM the source host said moves to another paired host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// The source's link key.
    #[serde(with = "serde_bytes")]
    pub from_host: [u8; 32],
    /// The VM's id on the source.
    pub from_vm: String,
    /// The sidecar's boot key, which moves with the VM's memory.
    #[serde(with = "serde_bytes")]
    pub boot_key: [u8; 32],
    /// The target's link key (a paired host).
    #[serde(with = "serde_bytes")]
    pub to_host: [u8; 32],
    /// The VM's id on the target.
    pub to_vm: String,
    /// A session from the target with this boot key has completed its handshake: the source's
    /// copy is no longer served.
    pub arrived: bool,
    /// When the notice came (Unix seconds).
    pub at: u64,
}

impl Move {
    /// The move a notice from `from`'s host announces at `at` (Unix seconds): `from.vm`, with
    /// boot key `boot_key`, going to `to`; not arrived yet.
    pub fn noticed(from: HostVm, boot_key: [u8; 32], to: HostVm, at: u64) -> Self {
        Self {
            from_host: from.host,
            from_vm: from.vm,
            boot_key,
            to_host: to.host,
            to_vm: to.vm,
            arrived: false,
            at,
        }
    }
}

impl Move {
    fn is_from(&self, host: &[u8; 32], vm: &str, key: &[u8; 32]) -> bool {
        self.from_host == *host && self.from_vm == vm && self.boot_key == *key
    }

    fn is_to(&self, host: &[u8; 32], vm: &str, key: &[u8; 32]) -> bool {
        self.to_host == *host && self.to_vm == vm && self.boot_key == *key
    }
}

/// Why a `Moving` notice was refused (the reason goes back in `MoveNoted`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoveRefused {
    /// The target is not a host the device has paired.
    #[error("the target host is not paired with this device")]
    NotPaired,
    /// The target is the source itself.
    #[error("the target host is the source host")]
    SameHost,
}

/// Records `notice` (a move from the host whose link it came on) in `moves`, if its target is
/// one of `paired` (link keys) other than the source. A notice for the same source VM and boot
/// key replaces the earlier one; a departure from the new target with that key is no longer
/// arrived (the VM comes back there); the oldest moves beyond [`MAX_MOVES`] are dropped.
pub fn note(moves: &mut Vec<Move>, paired: &[[u8; 32]], notice: Move) -> Result<(), MoveRefused> {
    if notice.to_host == notice.from_host {
        return Err(MoveRefused::SameHost);
    }
    if !paired.contains(&notice.to_host) {
        return Err(MoveRefused::NotPaired);
    }
    moves.retain(|m| !m.is_from(&notice.from_host, &notice.from_vm, &notice.boot_key));
    for m in moves.iter_mut() {
        if m.is_from(&notice.to_host, &notice.to_vm, &notice.boot_key) {
            m.arrived = false;
        }
    }
    moves.push(notice);
    let excess = moves.len().saturating_sub(MAX_MOVES);
    moves.drain(..excess);
    Ok(())
}

/// How the device treats a session from `(host, vm)` with a boot key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Serve it as this origin's VM.
    Serve(HostVm),
    /// Refuse it: the VM moved to this host and arrived there.
    Moved {
        /// The target's link key.
        to_host: [u8; 32],
    },
}

/// What a session from `host` for `vm` whose sidecar has `boot_key` is (see the module doc).
pub fn resolve(moves: &[Move], host: &[u8; 32], vm: &str, boot_key: &[u8; 32]) -> Resolution {
    if let Some(m) = moves
        .iter()
        .rev()
        .find(|m| m.arrived && m.is_from(host, vm, boot_key))
    {
        return Resolution::Moved { to_host: m.to_host };
    }
    let mut at = HostVm::new(*host, vm);
    // MAX_CHAIN steps back, then one more look that must find nothing.
    for _ in 0..=MAX_CHAIN {
        // The newest notice wins when several name the same target.
        match moves
            .iter()
            .rev()
            .find(|m| m.is_to(&at.host, &at.vm, boot_key))
        {
            Some(m) => at = HostVm::new(m.from_host, m.from_vm.clone()),
            None => return Resolution::Serve(at),
        }
    }
    Resolution::Serve(HostVm::new(*host, vm))
}

/// Marks the moves to `(host, vm)` with `boot_key` arrived, after a session from there
/// completed its handshake; answers whether any changed (and so must be saved).
pub fn mark_arrived(moves: &mut [Move], host: &[u8; 32], vm: &str, boot_key: &[u8; 32]) -> bool {
    let mut changed = false;
    for m in moves.iter_mut() {
        if !m.arrived && m.is_to(host, vm, boot_key) {
            m.arrived = true;
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [0xa; 32];
    const B: [u8; 32] = [0xb; 32];
    const C: [u8; 32] = [0xc; 32];
    const K: [u8; 32] = [7; 32];

    fn mv(from_host: [u8; 32], from_vm: &str, to_host: [u8; 32], to_vm: &str) -> Move {
        Move::noticed(
            HostVm::new(from_host, from_vm),
            K,
            HostVm::new(to_host, to_vm),
            1,
        )
    }

    fn serve(host: [u8; 32], vm: &str) -> Resolution {
        Resolution::Serve(HostVm::new(host, vm))
    }

    #[test]
    fn a_notice_must_name_another_paired_host() {
        let mut moves = Vec::new();
        let paired = [A, B];
        assert_eq!(
            note(&mut moves, &paired, mv(A, "v1", C, "v2")),
            Err(MoveRefused::NotPaired)
        );
        assert_eq!(
            note(&mut moves, &paired, mv(A, "v1", A, "v2")),
            Err(MoveRefused::SameHost)
        );
        assert!(moves.is_empty());
        note(&mut moves, &paired, mv(A, "v1", B, "v2")).unwrap();
        // A second notice for the same VM and key replaces the first.
        note(&mut moves, &paired, mv(A, "v1", B, "v3")).unwrap();
        assert_eq!(moves, [mv(A, "v1", B, "v3")]);
    }

    #[test]
    fn the_oldest_moves_are_dropped_beyond_the_bound() {
        let mut moves = Vec::new();
        for i in 0..MAX_MOVES + 2 {
            note(&mut moves, &[A, B], mv(A, &format!("v{i}"), B, "t")).unwrap();
        }
        assert_eq!(moves.len(), MAX_MOVES);
        assert_eq!(moves[0].from_vm, "v2");
    }

    #[test]
    fn the_target_with_the_boot_key_resolves_to_the_source() {
        let moves = [mv(A, "v1", B, "v2")];
        assert_eq!(resolve(&moves, &B, "v2", &K), serve(A, "v1"));
        // Another key: some other VM that took the id.
        assert_eq!(resolve(&moves, &B, "v2", &[8; 32]), serve(B, "v2"));
        // A third host, or another VM of the target, is not named.
        assert_eq!(resolve(&moves, &C, "v2", &K), serve(C, "v2"));
        assert_eq!(resolve(&moves, &B, "v9", &K), serve(B, "v9"));
        // The source is still served until the VM arrives.
        assert_eq!(resolve(&moves, &A, "v1", &K), serve(A, "v1"));
    }

    #[test]
    fn two_moves_resolve_to_the_first_source() {
        let moves = [mv(A, "v1", B, "v2"), mv(B, "v2", C, "v3")];
        assert_eq!(resolve(&moves, &C, "v3", &K), serve(A, "v1"));
        assert_eq!(resolve(&moves, &B, "v2", &K), serve(A, "v1"));
    }

    #[test]
    fn a_loop_is_bounded_and_resolves_to_the_session_itself() {
        let moves = [mv(A, "v1", B, "v2"), mv(B, "v2", A, "v1")];
        assert_eq!(resolve(&moves, &A, "v1", &K), serve(A, "v1"));
        assert_eq!(resolve(&moves, &B, "v2", &K), serve(B, "v2"));
        // A chain longer than the bound is treated the same way; one of MAX_CHAIN moves is
        // walked to its start.
        let hosts: Vec<[u8; 32]> = (0..=MAX_CHAIN as u8 + 1).map(|i| [i; 32]).collect();
        let long: Vec<Move> = hosts.windows(2).map(|w| mv(w[0], "v", w[1], "v")).collect();
        let last = hosts[MAX_CHAIN + 1];
        assert_eq!(resolve(&long, &last, "v", &K), serve(last, "v"));
        assert_eq!(resolve(&long[1..], &last, "v", &K), serve(hosts[1], "v"));
    }

    #[test]
    fn after_arrival_the_source_copy_is_refused() {
        let mut moves = vec![mv(A, "v1", B, "v2")];
        assert!(!mark_arrived(&mut moves, &B, "v2", &[8; 32]));
        assert!(mark_arrived(&mut moves, &B, "v2", &K));
        assert!(!mark_arrived(&mut moves, &B, "v2", &K), "already arrived");
        assert_eq!(
            resolve(&moves, &A, "v1", &K),
            Resolution::Moved { to_host: B }
        );
        // Another VM that took the id on the source, with its own key, is served.
        assert_eq!(resolve(&moves, &A, "v1", &[8; 32]), serve(A, "v1"));
        // The target still resolves to the source's grants.
        assert_eq!(resolve(&moves, &B, "v2", &K), serve(A, "v1"));
        // Moving back to the same id: the old departure is no longer arrived.
        note(&mut moves, &[A, B], mv(B, "v2", A, "v1")).unwrap();
        assert_eq!(resolve(&moves, &A, "v1", &K), serve(A, "v1"));
        assert!(mark_arrived(&mut moves, &A, "v1", &K));
        assert_eq!(
            resolve(&moves, &B, "v2", &K),
            Resolution::Moved { to_host: A }
        );
    }
}
