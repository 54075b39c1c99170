//! Live migration, the daemon's part: carrying a running VM from this host to another (the
//! VMM's part, the memory and state stream itself, is `nanoclaw_vmm::migration`).
//!
//! # Who does what
//! 1. **The offer.** `POST /v1/vms/{id}/migrate` (`nanoclaw migrate ID --to HOST:PORT`) asks
//!    the source daemon, which dials the target's daemon over a [`link`] (Noise XX, both
//!    daemons' keys pinned by configuration: [`Peers`]) and sends an [`Offer`]: the VM's
//!    creation request and what the daemon knows of its guest (boot id, agent started).
//! 2. **The answer.** The target checks the offer as it checks a create request, makes the
//!    VM's folder and record, listens on a local socket in it and starts a VMM with
//!    `--migrate-from` on that socket, then answers [`Reply::Accepted`] with the VM's id there;
//!    or [`Reply::Refused`] with a reason, and nothing is left.
//! 3. **The copy.** The source daemon listens on a socket in its VMM's folder, asks its VMM to
//!    migrate into it (the control socket's `migrate`, whose progress lines go back to the
//!    client), and both daemons relay the two sockets over the link, both ways, without
//!    reading the stream. A cancel closes the source's socket: before the VM's state has gone
//!    out, the VM runs on here and the target's VMM, cut off, exits.
//! 4. **One copy.** The source VMM's answer says which copy runs. `moved`: the target's VMM
//!    restored the VM and answered before it ran it; the source daemon ends its VMM and keeps
//!    the record as `migrated`, with where it went. `kept`: nothing moved. `unknown`: the state
//!    went out and no answer came back; the source VM stays paused, its record says so, and
//!    `nanoclaw migrate ID --resolve` asks the target over the link ([`Request::Ask`]): a copy
//!    there that runs or ran ends this one as `migrated`; no copy there resumes this one. No
//!    failure leaves two running copies.
//! 5. **A source daemon that stops mid-migration** (killed, say, just after the switch-over)
//!    has recorded where the VM was going before the copy began. On its restart it asks the
//!    VMM, which outlives it: `moved` ends this copy as `migrated`; `running` keeps it; paused
//!    records the outcome as unknown, for `--resolve`. A VMM that moved its VM refuses to run
//!    it again whatever it is asked, so even a daemon that never comes back leaves one copy.
//!
//! # The address
//! A networked VM keeps its overlay addresses ([`Offer::net`]): the target builds the VM's
//! namespace, links and firewall for the same addresses (its gateway at the same MAC) before
//! its VMM starts, and refuses the offer when they are not a slot of its own prefix or are
//! held there. Once its copy runs, the target answers ARP for the guest's address on its
//! underlay and announces it there; the source withdraws its answer when its copy ends
//! (`crate::net::underlay`). A client's TCP connection to the guest goes on: the address,
//! the guest's sockets and the firewall's admission of those connections all hold on the
//! new host. What the guest had opened outward, through the source's masquerade, does not.
//!
//! # The disks
//! A VM created with an image ([`Offer::image`]) has the image's read-only root disk and a
//! writable disk of its own. The target must hold the same image, by digest (under any
//! name): it refuses the offer otherwise, and the user imports the image there first. The
//! writable disk moves with the memory: the target daemon makes an all-zero file of the
//! source's size, and the VMMs copy its blocks in the same rounds as the pages, with a dirty
//! log of their own.
//!
//! # The credential link
//! The VM's memory moves whole, so its sidecar keeps its boot key. Once the target has
//! accepted the VM (its answer names its own credential link key), the source tells the
//! device, over its own link, where the VM goes: its id here and there, the boot key and the
//! target's link key (`crate::relay::Relay::tell_moving`). The device, paired with both hosts,
//! then serves the target's sessions for that VM and that boot key under the VM's grants, and
//! stops serving the source's copy once the target's first session has opened. The device
//! follows a VM only to a host it has paired itself; a device that is not linked or refuses
//! leaves the VM moving without it, and the migration's progress says so.
//!
//! # The tokenizer
//! An agent whose profile tokenizes holds surrogates its tokenizer issued here. The offer
//! carries the tokenizer's key ([`OfferTokens`]) and is followed by the surrogates issued so
//! far ([`token_batches`]); the target's gateway starts with that key and adopts them. The
//! ones issued while the copy ran follow once the VM has moved ([`Request::Tokens`], on a
//! link of their own, best effort). The target's gateway and the device then give the same
//! surrogates, and restore those the agent holds.
//!
//! # What does not move yet
//! A paused VM and a VM tied to a parent or to children are refused before anything starts.

pub mod link;

use std::collections::HashMap;

use nanoclaw_api::{CreateVm, VmStatus};
use serde::{Deserialize, Serialize};
use shared_proto::credential::IssuedToken;

/// The offer's format.
pub const OFFER_VERSION: u32 = 1;
/// The writable disk's unit (a virtio-blk sector): its length is a whole number of these.
const SECTOR: u64 = 512;

/// What the source offers the target: enough to list and run the VM there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    /// [`OFFER_VERSION`].
    pub version: u32,
    /// The VM's id on the source host.
    pub source_vm: String,
    /// Its creation request (memory and vCPUs must match for the VMM's stream to fit).
    pub spec: CreateVm,
    /// Its guest's boot id: the sidecar says hello again with it on the target.
    pub boot_id: Option<String>,
    /// Whether the agent was sent (it is never sent twice).
    pub agent_sent: bool,
    /// The agent's pid in the guest.
    pub agent_pid: Option<u32>,
    /// `starting` or `running`.
    pub status: VmStatus,
    /// A networked VM's addresses: they go with it (the target refuses them if they are not
    /// a slot of its overlay prefix, or held there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::addr::VmLink>,
    /// A VM created with an image: which image, and its writable disk's size (the target
    /// refuses an image it does not hold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<OfferImage>,
    /// The agent's tokenizer, when its profile tokenizes: its key, and how many messages of
    /// issued surrogates follow the offer ([`token_batches`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<OfferTokens>,
}

/// The agent's tokenizer as offered: the target's gateway and the device then give the same
/// surrogates, and restore the ones the agent holds.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferTokens {
    /// The agent's tokenization key, 64 hex digits (the link is encrypted, and the target
    /// is a host the source pinned).
    pub key: String,
    /// Messages of issued surrogates that follow the offer, each a JSON array of
    /// `IssuedToken`s (at most [`MAX_TOKEN_BATCHES`]).
    pub batches: u32,
}

impl std::fmt::Debug for OfferTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OfferTokens")
            .field("key", &"<redacted>")
            .field("batches", &self.batches)
            .finish()
    }
}

impl OfferTokens {
    /// The key, or why it is not one.
    pub fn key(&self) -> Result<zeroize::Zeroizing<[u8; 32]>, String> {
        let mut key = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(&self.key, &mut key[..])
            .map_err(|_| "the tokenizer key is not 64 hex digits".to_owned())?;
        Ok(key)
    }
}

/// The most messages of issued surrogates after an offer or in a [`Request::Tokens`]: enough
/// for a tokenizer's whole memory (`nanoclaw_tokenize::MAX_ISSUED`) at the smallest batch.
pub const MAX_TOKEN_BATCHES: u32 = 2048;
/// The most JSON bytes of one batch: well inside one link message.
const TOKEN_BATCH_BYTES: usize = 48 * 1024;

/// `issued` cut into batches for the link: JSON arrays of at most 48 KiB each
/// (none when `issued` is empty).
pub fn token_batches(issued: &[IssuedToken]) -> Vec<Vec<u8>> {
    let mut batches = Vec::new();
    let mut current: Vec<&IssuedToken> = Vec::new();
    let mut bytes = 2;
    for token in issued {
        let len = serde_json::to_vec(token).map_or(0, |v| v.len()) + 1;
        if !current.is_empty() && bytes + len > TOKEN_BATCH_BYTES {
            batches.push(serde_json::to_vec(&current).unwrap_or_default());
            current.clear();
            bytes = 2;
        }
        current.push(token);
        bytes += len;
    }
    if !current.is_empty() {
        batches.push(serde_json::to_vec(&current).unwrap_or_default());
    }
    batches
}

/// Reads one batch of [`token_batches`] into `into`, checking each surrogate as the device
/// link does (not empty, at most `MAX_SURROGATE_LEN` bytes, its clear prefix inside it) and
/// the whole against `nanoclaw_tokenize::MAX_ISSUED`.
pub fn read_token_batch(bytes: &[u8], into: &mut Vec<IssuedToken>) -> Result<(), String> {
    let batch: Vec<IssuedToken> = serde_json::from_slice(bytes)
        .map_err(|e| format!("a batch of surrogates does not parse: {e}"))?;
    if into.len() + batch.len() > nanoclaw_tokenize::MAX_ISSUED {
        return Err("more surrogates than a tokenizer remembers".to_owned());
    }
    if !batch.iter().all(IssuedToken::is_well_formed) {
        return Err("a surrogate is empty, too long, or shorter than its prefix".to_owned());
    }
    into.extend(batch);
    Ok(())
}

/// The image of a VM offered with one: the target attaches the same image's root disk and a
/// writable disk of the same size, which the VMMs fill.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferImage {
    /// The image's name on the source (kept in the target's record; the digest decides).
    pub name: String,
    /// Its digest, `sha256:<64 hex>`: the target must hold this image.
    pub digest: String,
    /// The user the sidecar resolves in the image, if any.
    pub user: Option<String>,
    /// The length of the source's writable disk, in bytes: the target's starts as an
    /// all-zero file of exactly this length.
    pub disk_bytes: u64,
}

/// What a source daemon asks of a target, first thing on a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Take this VM.
    Offer(Box<Offer>),
    /// Does the copy of `source_vm` that came here as `target_vm` run? Asked after a migration
    /// whose outcome the source does not know; answered [`Reply::Copy`], and only to the host
    /// the VM came from.
    Ask {
        /// The VM's id on the asking host.
        source_vm: String,
        /// Its id here.
        target_vm: String,
    },
    /// Surrogates the agent's tokenizer issued on the source after the offer, sent once the
    /// VM has moved; `batches` messages of [`token_batches`] follow. Taken only from the host
    /// the VM came from, for its VM; answered with nothing.
    Tokens {
        /// The VM's id on the sending host.
        source_vm: String,
        /// Its id here.
        target_vm: String,
        /// Messages that follow (at most [`MAX_TOKEN_BATCHES`]).
        batches: u32,
    },
}

/// Where a migrated VM's copy is, on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyState {
    /// It runs (or is paused) here: the source's copy must never run again.
    Running,
    /// It ran here and has ended: the source's copy must not run either.
    Ended,
    /// There is no such VM from that host here: the copy never ran, and the source's may.
    None,
}

/// The target's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reply", deny_unknown_fields)]
pub enum Reply {
    /// A VMM waits for the stream; `vm` is the VM's id on the target host.
    Accepted {
        /// The id.
        vm: String,
        /// The target's credential link key (hex), when it serves a device link: the source
        /// names it to the device, which follows the VM only to a host it paired itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        link_key: Option<String>,
    },
    /// Nothing started, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// The answer to [`Request::Ask`].
    Copy {
        /// Where the copy is.
        state: CopyState,
    },
}

/// Why an offer is not acceptable as sent (checked before anything is made).
pub fn check_offer(offer: &Offer) -> Result<(), String> {
    if offer.version != OFFER_VERSION {
        return Err(format!(
            "offer version {} is not {OFFER_VERSION}",
            offer.version
        ));
    }
    if offer.source_vm.is_empty() || offer.source_vm.len() > 64 {
        return Err("the source VM's id is empty or too long".to_owned());
    }
    if !matches!(offer.status, VmStatus::Starting | VmStatus::Running) {
        return Err(format!(
            "a VM that is {} does not migrate",
            offer.status.as_str()
        ));
    }
    if let Some(b) = &offer.boot_id
        && (b.len() != 32 || !b.bytes().all(|c| c.is_ascii_hexdigit()))
    {
        return Err("the boot id is not 32 hex digits".to_owned());
    }
    match (offer.spec.image.is_some(), &offer.image) {
        (true, None) => return Err("a VM with an image is offered without its disk".to_owned()),
        (false, Some(_)) => {
            return Err("a VM without an image is offered with an image's disk".to_owned());
        }
        (true, Some(image)) => check_image(image)?,
        (false, None) => {}
    }
    if let Some(tokens) = &offer.tokens {
        tokens.key()?;
        if tokens.batches > MAX_TOKEN_BATCHES {
            return Err(format!(
                "{} batches of surrogates: at most {MAX_TOKEN_BATCHES}",
                tokens.batches
            ));
        }
    }
    match (
        crate::daemon::wants_network(&offer.spec),
        offer.net.is_some(),
    ) {
        (true, false) => Err("a networked VM is offered without its addresses".to_owned()),
        (false, true) => Err("a VM without a network is offered with addresses".to_owned()),
        _ => Ok(()),
    }
}

/// Why an offered image is not acceptable: a name the store would not take, a digest that
/// does not parse, a user with a NUL byte, or a writable disk of no size, of part of a sector,
/// or larger than a created VM may ask for.
fn check_image(image: &OfferImage) -> Result<(), String> {
    nanoclaw_image::ImageName::new(&image.name).map_err(|e| format!("the offered image: {e}"))?;
    image
        .digest
        .parse::<nanoclaw_image::Digest>()
        .map_err(|e| format!("the offered image {}: {e}", image.name))?;
    if image.user.as_deref().is_some_and(|u| u.contains('\0')) {
        return Err("the offered image's user contains a NUL byte".to_owned());
    }
    let most = nanoclaw_api::MAX_DISK_MIB << 20;
    if image.disk_bytes == 0 || !image.disk_bytes.is_multiple_of(SECTOR) || image.disk_bytes > most
    {
        return Err(format!(
            "the offered writable disk of {} bytes is not a multiple of {SECTOR} from {SECTOR} to {most}",
            image.disk_bytes
        ));
    }
    Ok(())
}

/// The hosts this daemon migrates with: each one's address and pinned key
/// (`--migration-peer ADDR=KEY`).
#[derive(Debug, Clone, Default)]
pub struct Peers {
    by_addr: HashMap<String, [u8; 32]>,
}

/// A `--migration-peer` that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("--migration-peer {0:?}: want HOST:PORT=KEY, KEY being 64 hex digits")]
pub struct BadPeer(pub String);

impl Peers {
    /// Parses `HOST:PORT=KEY` flags.
    pub fn parse(flags: &[String]) -> Result<Self, BadPeer> {
        let mut by_addr = HashMap::new();
        for flag in flags {
            let (addr, key) = flag
                .rsplit_once('=')
                .filter(|(a, _)| a.contains(':'))
                .ok_or_else(|| BadPeer(flag.clone()))?;
            let key = link::parse_key(key).ok_or_else(|| BadPeer(flag.clone()))?;
            by_addr.insert(addr.trim().to_owned(), key);
        }
        Ok(Self { by_addr })
    }

    /// The key pinned for `addr`.
    pub fn key_of(&self, addr: &str) -> Option<[u8; 32]> {
        self.by_addr.get(addr).copied()
    }

    /// Every pinned key (a caller must show one of them).
    pub fn keys(&self) -> Vec<[u8; 32]> {
        self.by_addr.values().copied().collect()
    }

    /// Whether none is pinned.
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_proto::credential::MAX_SURROGATE_LEN;

    fn offer() -> Offer {
        Offer {
            version: OFFER_VERSION,
            source_vm: "vm-1".to_owned(),
            spec: serde_json::from_value(serde_json::json!({"command": "/bin/sleep"})).unwrap(),
            boot_id: Some("00112233445566778899aabbccddeeff".to_owned()),
            agent_sent: true,
            agent_pid: Some(7),
            status: VmStatus::Running,
            net: None,
            image: None,
            tokens: None,
        }
    }

    /// [`offer`] of a VM created with image `app`, its writable disk 64 MiB.
    fn image_offer() -> Offer {
        let mut o = offer();
        o.spec.image = Some("app".to_owned());
        o.image = Some(OfferImage {
            name: "app".to_owned(),
            digest: nanoclaw_image::Digest::of(b"app").to_string(),
            user: Some("agent".to_owned()),
            disk_bytes: 64 << 20,
        });
        o
    }

    #[test]
    fn an_image_offer_round_trips_and_passes() {
        let o = image_offer();
        let text = serde_json::to_value(&o).unwrap();
        assert_eq!(serde_json::from_value::<Offer>(text.clone()).unwrap(), o);
        assert_eq!(check_offer(&o), Ok(()));
        // The largest disk a created VM may have passes too.
        let mut big = image_offer();
        if let Some(image) = &mut big.image {
            image.disk_bytes = nanoclaw_api::MAX_DISK_MIB << 20;
        }
        assert_eq!(check_offer(&big), Ok(()));
        // An offer without an image says nothing of one (an older target reads it as before).
        let plain = serde_json::to_value(offer()).unwrap();
        assert!(plain.get("image").is_none(), "{plain}");
        let mut extra = text;
        extra["image"]["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Offer>(extra).is_err());
    }

    #[test]
    fn bad_image_offers_are_refused_with_a_reason() {
        type Spoil = Box<dyn Fn(&mut Offer)>;
        let image = |f: fn(&mut OfferImage)| -> Spoil {
            Box::new(move |o: &mut Offer| {
                if let Some(i) = &mut o.image {
                    f(i);
                }
            })
        };
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|o| o.image = None), "offered without its disk"),
            (
                Box::new(|o| o.spec.image = None),
                "without an image is offered with",
            ),
            (image(|i| i.name = "../etc".into()), "image name"),
            (image(|i| i.digest = "sha256:zz".into()), "64 lowercase hex"),
            (image(|i| i.digest = "md5:00".into()), "not supported"),
            (image(|i| i.digest = String::new()), "no algorithm"),
            (image(|i| i.user = Some("a\0b".into())), "NUL"),
            (image(|i| i.disk_bytes = 0), "0 bytes"),
            (
                image(|i| i.disk_bytes = (64 << 20) + 100),
                "multiple of 512",
            ),
            (
                image(|i| i.disk_bytes = (nanoclaw_api::MAX_DISK_MIB << 20) + 512),
                "multiple of 512 from 512 to",
            ),
        ];
        for (spoil, says) in cases {
            let mut o = image_offer();
            spoil(&mut o);
            let why = check_offer(&o).unwrap_err();
            assert!(why.contains(says), "{why} (want {says:?})");
        }
    }

    #[test]
    fn an_offer_round_trips_and_a_good_one_passes() {
        let o = Request::Offer(Box::new(offer()));
        let text = serde_json::to_vec(&o).unwrap();
        assert_eq!(serde_json::from_slice::<Request>(&text).unwrap(), o);
        assert_eq!(check_offer(&offer()), Ok(()));
        let ask: Request =
            serde_json::from_str(r#"{"ask":{"source_vm":"a","target_vm":"b"}}"#).unwrap();
        assert!(matches!(ask, Request::Ask { .. }));
        let copy: Reply = serde_json::from_str(r#"{"reply":"copy","state":"none"}"#).unwrap();
        assert_eq!(
            copy,
            Reply::Copy {
                state: CopyState::None
            }
        );
    }

    #[test]
    fn bad_offers_are_refused_with_a_reason() {
        type Spoil = Box<dyn Fn(&mut Offer)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (Box::new(|o| o.version = 2), "version 2"),
            (Box::new(|o| o.source_vm.clear()), "id is empty"),
            (Box::new(|o| o.status = VmStatus::Stopped), "stopped"),
            (Box::new(|o| o.boot_id = Some("zz".into())), "boot id"),
            (
                Box::new(|o| {
                    o.net = Some(
                        crate::net::addr::allocate(
                            &crate::net::addr::OverlayPrefix::DEFAULT.parse().unwrap(),
                            &Default::default(),
                        )
                        .unwrap(),
                    )
                }),
                "offered with addresses",
            ),
            (
                Box::new(|o| o.spec.ports = vec!["8080:80".parse().unwrap()]),
                "without its addresses",
            ),
        ];
        for (spoil, says) in cases {
            let mut o = offer();
            spoil(&mut o);
            let why = check_offer(&o).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
        let mut text = serde_json::to_value(offer()).unwrap();
        text["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<Offer>(text).is_err());
    }

    #[test]
    fn peers_parse_and_refuse_what_is_not_an_address_and_a_key() {
        let key = "ab".repeat(32);
        let peers = Peers::parse(&[format!("10.0.0.2:7420={key}")]).unwrap();
        assert_eq!(peers.key_of("10.0.0.2:7420"), Some([0xab; 32]));
        assert_eq!(peers.key_of("10.0.0.3:7420"), None);
        for bad in [
            "10.0.0.2:7420".to_owned(),
            format!("host={key}"),
            "10.0.0.2:7420=abcd".to_owned(),
        ] {
            assert!(Peers::parse(std::slice::from_ref(&bad)).is_err(), "{bad}");
        }
    }

    fn token(n: usize, len: usize) -> IssuedToken {
        IssuedToken {
            surrogate: format!("{n:0len$}"),
            kind: shared_proto::credential::TokenKind::Email,
            prefix_len: 0,
            alphabet: 0,
        }
    }

    #[test]
    fn surrogates_cross_in_batches_that_fit_a_link_message_and_come_back_whole() {
        let issued: Vec<IssuedToken> = (0..3000).map(|n| token(n, 150)).collect();
        let batches = token_batches(&issued);
        assert!(batches.len() > 1, "{}", batches.len());
        assert!(
            batches
                .iter()
                .all(|b| b.len() <= TOKEN_BATCH_BYTES && b.len() < link::MAX_DATA)
        );
        let mut back = Vec::new();
        for b in &batches {
            read_token_batch(b, &mut back).unwrap();
        }
        assert_eq!(back, issued);
        assert!(token_batches(&[]).is_empty());
    }

    #[test]
    fn bad_batches_and_bad_offered_keys_are_refused() {
        let mut into = Vec::new();
        for bad in [
            &b"not json"[..],
            br#"[{"surrogate":"","kind":"Email","prefix_len":0,"alphabet":0}]"#,
            br#"[{"surrogate":"ab","kind":"ApiKey","prefix_len":3,"alphabet":0}]"#,
        ] {
            assert!(read_token_batch(bad, &mut into).is_err());
        }
        let long = token(1, MAX_SURROGATE_LEN + 1);
        assert!(read_token_batch(&serde_json::to_vec(&[long]).unwrap(), &mut into).is_err());
        assert!(into.is_empty(), "nothing of a refused batch is kept");

        let mut o = offer();
        o.tokens = Some(OfferTokens {
            key: "ab".repeat(32),
            batches: 3,
        });
        check_offer(&o).unwrap();
        assert_eq!(*o.tokens.as_ref().unwrap().key().unwrap(), [0xab; 32]);
        assert!(
            !format!("{o:?}").contains(&"ab".repeat(32)),
            "the key stays out of logs"
        );
        for (key, batches) in [
            ("ab".repeat(31), 1),
            ("zz".repeat(32), 1),
            ("ab".repeat(32), MAX_TOKEN_BATCHES + 1),
        ] {
            o.tokens = Some(OfferTokens { key, batches });
            assert!(check_offer(&o).is_err());
        }
    }
}
