//! The migration stream: what one VMM sends another, record by record.
//!
//! The stream starts with a preamble, [`MAGIC`] and [`VERSION`] (a little-endian `u32`). Then
//! come records, each a tag byte, a little-endian `u32` payload length and the payload:
//!
//! | tag | record | payload |
//! | --- | --- | --- |
//! | 1 | [`Record::Layout`] | the source's guest RAM layout, CBOR ([`MemoryState`]) |
//! | 2 | [`Record::Pages`] | a guest physical address (`u64`, page-aligned), then whole pages |
//! | 3 | [`Record::State`] | the VM's state, as a snapshot's state file ([`super::super::snapshot::format`]) |
//! | 4 | [`Record::Done`] | nothing: the source sent everything |
//! | 5 | [`Record::Resumed`] | nothing: the target answers that its copy runs |
//! | 6 | [`Record::Refused`] | UTF-8 text: the target answers that it will not run, and why |
//! | 7 | [`Record::Disks`] | the sizes of the source's writable disks, in order (`u64` each) |
//! | 8 | [`Record::Blocks`] | a disk's index (`u32`), a byte offset (`u64`), then the bytes (whole sectors) |
//!
//! The source sends `Layout`, `Disks`, any number of `Pages` and `Blocks`, one `State`, `Done`;
//! the target answers with `Resumed` or `Refused`. Anything else, in any other order, is
//! refused with a [`StreamError`] that says what.
//!
//! The stream is authenticated and encrypted below this layer (the daemons' link, see
//! [`super`]), so these checks are not a defence against a forger; they keep a damaged or
//! mismatched stream from being taken for a VM. Nothing is allocated from a length the stream
//! gives before the length is checked against the record's maximum.
//!
//! A hand-written framing rather than a general one (CBOR for everything, say): the bulk of a
//! migration is pages, and a page record is a fixed header and the pages as they lie in guest
//! memory, read straight into place on the target.

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;
use crate::snapshot::memory::{MemoryState, PAGE};

/// The preamble's magic.
pub const MAGIC: [u8; 8] = *b"NCLAWMIG";
/// The stream's format version (2: the writable disks travel with the memory).
pub const VERSION: u32 = 2;
/// Most pages one [`Record::Pages`] carries (1 MiB).
pub const MAX_PAGES_PER_RECORD: usize = 256;
/// Longest layout record.
const MAX_LAYOUT: usize = 64 << 10;
/// Longest state record: a state file's header and its largest body.
const MAX_STATE: usize =
    crate::snapshot::format::HEADER_LEN + crate::snapshot::format::MAX_STATE_BODY as usize;
/// Longest refusal text.
pub const MAX_REASON: usize = 4096;
/// Most writable disks a stream carries.
pub const MAX_DISKS: usize = 64;
/// Most bytes one [`Record::Blocks`] carries (1 MiB).
pub const MAX_BLOCK_BYTES: usize = MAX_PAGES_PER_RECORD * PAGE;
/// A disk's sector: block records start and end on one.
const SECTOR: u64 = 512;

const TAG_LAYOUT: u8 = 1;
const TAG_PAGES: u8 = 2;
const TAG_STATE: u8 = 3;
const TAG_DONE: u8 = 4;
const TAG_RESUMED: u8 = 5;
const TAG_REFUSED: u8 = 6;
const TAG_DISKS: u8 = 7;
const TAG_BLOCKS: u8 = 8;

/// A fault in the stream itself.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing the connection failed (a timeout included).
    #[error("migration link: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection where a record was due.
    #[error("the peer closed the migration link while {0}")]
    Closed(&'static str),
    /// Not a migration stream.
    #[error("not a nanoclaw migration stream (bad magic)")]
    BadMagic,
    /// Another version of the stream.
    #[error(
        "migration stream version {found} is not supported (this VMM speaks version {VERSION})"
    )]
    Version {
        /// The peer's version.
        found: u32,
    },
    /// A record of a tag this VMM does not know.
    #[error("unknown migration record tag {0}")]
    UnknownTag(u8),
    /// A record longer than its kind allows.
    #[error("migration record {record} of {len} bytes is over its limit of {max}")]
    Oversized {
        /// The record's kind.
        record: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A record where another was due.
    #[error("migration record {found} where {expected} was due")]
    Unexpected {
        /// The record's kind.
        found: &'static str,
        /// What was due.
        expected: &'static str,
    },
    /// A page record whose address or length is not whole pages.
    #[error("page record at {addr:#x} of {len} bytes is not whole, aligned pages")]
    Unaligned {
        /// The record's guest address.
        addr: u64,
        /// Its data's length.
        len: usize,
    },
    /// A page record outside guest RAM.
    #[error("page record at {addr:#x} of {len} bytes lies outside guest RAM")]
    OutsideMemory {
        /// The record's guest address.
        addr: u64,
        /// Its data's length.
        len: usize,
    },
    /// A block record whose offset or length is not whole sectors.
    #[error("block record for disk {disk} at {offset:#x} of {len} bytes is not whole sectors")]
    UnalignedBlocks {
        /// The disk's index.
        disk: usize,
        /// The byte offset.
        offset: u64,
        /// The data's length.
        len: usize,
    },
    /// A block record for no disk of the target, or past its end.
    #[error(
        "block record for disk {disk} at {offset:#x} of {len} bytes lies outside the target's disks"
    )]
    OutsideDisk {
        /// The disk's index.
        disk: usize,
        /// The byte offset.
        offset: u64,
        /// The data's length.
        len: usize,
    },
    /// A disks record that is not whole sizes.
    #[error("the disks record of {0} bytes is not a list of sizes")]
    BadDisks(usize),
    /// The layout record does not decode.
    #[error("the layout record does not decode: {0}")]
    BadLayout(String),
    /// A refusal whose text is not UTF-8.
    #[error("the refusal's text is not UTF-8")]
    BadReason,
}

/// One record, as read (page data is written into guest memory as it is read, not held).
#[derive(Debug)]
pub enum Record {
    /// The source's RAM layout.
    Layout(MemoryState),
    /// Pages, already written into the target's memory: where they start and how many.
    Pages {
        /// Guest physical address of the first.
        addr: u64,
        /// How many pages.
        pages: usize,
    },
    /// The sizes of the source's writable disks, in bytes, in order.
    Disks(Vec<u64>),
    /// A run of a disk's bytes; the bytes are the caller's `scratch` from [`BLOCKS_HEADER`] on.
    Blocks {
        /// The disk's index among the writable disks.
        disk: usize,
        /// Where they go, in bytes.
        offset: u64,
        /// How many bytes.
        len: usize,
    },
    /// The VM's state, a snapshot state file's bytes.
    State(Vec<u8>),
    /// The source sent everything.
    Done,
    /// The target runs the VM.
    Resumed,
    /// The target will not run the VM.
    Refused(String),
}

impl Record {
    /// The record's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Record::Layout(_) => "layout",
            Record::Pages { .. } => "pages",
            Record::Disks(_) => "disks",
            Record::Blocks { .. } => "blocks",
            Record::State(_) => "state",
            Record::Done => "done",
            Record::Resumed => "resumed",
            Record::Refused(_) => "refused",
        }
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |source| StreamError::Io { what, source }
}

/// Writes the stream's preamble.
pub fn write_preamble(w: &mut impl Write) -> Result<(), StreamError> {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&p).map_err(io("send the preamble"))
}

/// Reads and checks the stream's preamble.
pub fn read_preamble(r: &mut impl Read) -> Result<(), StreamError> {
    let mut p = [0u8; 12];
    read_exact(r, &mut p, "the preamble was due")?;
    if p[..8] != MAGIC {
        return Err(StreamError::BadMagic);
    }
    let found = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    if found != VERSION {
        return Err(StreamError::Version { found });
    }
    Ok(())
}

fn header(tag: u8, len: usize) -> [u8; 5] {
    let mut h = [0u8; 5];
    h[0] = tag;
    h[1..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

fn write_record(w: &mut impl Write, tag: u8, payload: &[u8]) -> Result<(), StreamError> {
    w.write_all(&header(tag, payload.len()))
        .and_then(|()| w.write_all(payload))
        .map_err(io("send a record"))
}

/// Writes the layout record.
pub fn write_layout(w: &mut impl Write, layout: &MemoryState) -> Result<(), StreamError> {
    let mut body = Vec::new();
    ciborium::into_writer(layout, &mut body).map_err(|e| StreamError::BadLayout(e.to_string()))?;
    write_record(w, TAG_LAYOUT, &body)
}

/// Writes a page record: `data` (whole pages) from guest address `addr`.
pub fn write_pages(w: &mut impl Write, addr: u64, data: &[u8]) -> Result<(), StreamError> {
    debug_assert!(data.len().is_multiple_of(PAGE) && data.len() <= MAX_PAGES_PER_RECORD * PAGE);
    w.write_all(&header(TAG_PAGES, 8 + data.len()))
        .and_then(|()| w.write_all(&addr.to_le_bytes()))
        .and_then(|()| w.write_all(data))
        .map_err(io("send pages"))
}

/// Writes the disks record: the sizes of the writable disks, in order.
pub fn write_disks(w: &mut impl Write, sizes: &[u64]) -> Result<(), StreamError> {
    let body: Vec<u8> = sizes.iter().flat_map(|s| s.to_le_bytes()).collect();
    write_record(w, TAG_DISKS, &body)
}

/// Where a block record's bytes start in its payload: the disk's index and the offset.
pub const BLOCKS_HEADER: usize = 12;

/// Writes a block record: `data` (whole sectors, at most [`MAX_BLOCK_BYTES`]) at byte `offset`
/// of writable disk `disk`.
pub fn write_blocks(
    w: &mut impl Write,
    disk: usize,
    offset: u64,
    data: &[u8],
) -> Result<(), StreamError> {
    debug_assert!(data.len().is_multiple_of(SECTOR as usize) && data.len() <= MAX_BLOCK_BYTES);
    w.write_all(&header(TAG_BLOCKS, BLOCKS_HEADER + data.len()))
        .and_then(|()| w.write_all(&(disk as u32).to_le_bytes()))
        .and_then(|()| w.write_all(&offset.to_le_bytes()))
        .and_then(|()| w.write_all(data))
        .map_err(io("send disk blocks"))
}

/// Writes the state record: a snapshot state file's bytes.
pub fn write_state(w: &mut impl Write, state_file: &[u8]) -> Result<(), StreamError> {
    write_record(w, TAG_STATE, state_file)
}

/// Writes the end of the source's part.
pub fn write_done(w: &mut impl Write) -> Result<(), StreamError> {
    write_record(w, TAG_DONE, &[])?;
    w.flush().map_err(io("send the end of the stream"))
}

/// Writes the target's answer: `None` when its copy runs, the reason when it will not run.
pub fn write_answer(w: &mut impl Write, refused: Option<&str>) -> Result<(), StreamError> {
    match refused {
        None => write_record(w, TAG_RESUMED, &[]),
        Some(reason) => {
            // Cut at a character boundary below the limit.
            let mut end = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            write_record(w, TAG_REFUSED, &reason.as_bytes()[..end])
        }
    }?;
    w.flush().map_err(io("send the answer"))
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], closed: &'static str) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            StreamError::Closed(closed)
        } else {
            StreamError::Io {
                what: "receive a record",
                source: e,
            }
        }
    })
}

/// Reads one record. A page record's pages go straight into `mem` (which must hold them
/// whole); a block record's bytes are left in `scratch` (from [`BLOCKS_HEADER`] on), which is
/// reused between calls.
pub fn read_record(
    r: &mut impl Read,
    mem: Option<&GuestRam>,
    scratch: &mut Vec<u8>,
    due: &'static str,
) -> Result<Record, StreamError> {
    let mut h = [0u8; 5];
    read_exact(r, &mut h, due)?;
    let len = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let (name, max) = match h[0] {
        TAG_LAYOUT => ("layout", MAX_LAYOUT),
        TAG_PAGES => ("pages", 8 + MAX_PAGES_PER_RECORD * PAGE),
        TAG_STATE => ("state", MAX_STATE),
        TAG_DONE => ("done", 0),
        TAG_RESUMED => ("resumed", 0),
        TAG_REFUSED => ("refused", MAX_REASON),
        TAG_DISKS => ("disks", MAX_DISKS * 8),
        TAG_BLOCKS => ("blocks", BLOCKS_HEADER + MAX_BLOCK_BYTES),
        tag => return Err(StreamError::UnknownTag(tag)),
    };
    if len > max {
        return Err(StreamError::Oversized {
            record: name,
            len,
            max,
        });
    }
    scratch.clear();
    scratch.resize(len, 0);
    read_exact(r, scratch, "a record was being read")?;
    Ok(match h[0] {
        TAG_LAYOUT => Record::Layout(
            ciborium::from_reader(&scratch[..])
                .map_err(|e| StreamError::BadLayout(e.to_string()))?,
        ),
        TAG_PAGES => {
            let Some(mem) = mem else {
                return Err(StreamError::Unexpected {
                    found: "pages",
                    expected: due,
                });
            };
            let (addr, data) = scratch.split_at(8.min(len));
            let addr = u64::from_le_bytes(
                addr.try_into()
                    .map_err(|_| StreamError::Unaligned { addr: 0, len })?,
            );
            if data.is_empty() || !data.len().is_multiple_of(PAGE) || addr % PAGE as u64 != 0 {
                return Err(StreamError::Unaligned {
                    addr,
                    len: data.len(),
                });
            }
            let outside = || StreamError::OutsideMemory {
                addr,
                len: data.len(),
            };
            addr.checked_add(data.len() as u64).ok_or_else(outside)?;
            mem.write_slice(data, GuestAddress(addr))
                .map_err(|_| outside())?;
            Record::Pages {
                addr,
                pages: data.len() / PAGE,
            }
        }
        TAG_DISKS => {
            if !len.is_multiple_of(8) {
                return Err(StreamError::BadDisks(len));
            }
            Record::Disks(
                scratch
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            )
        }
        TAG_BLOCKS => {
            if len < BLOCKS_HEADER {
                return Err(StreamError::UnalignedBlocks {
                    disk: 0,
                    offset: 0,
                    len,
                });
            }
            let disk =
                u32::from_le_bytes([scratch[0], scratch[1], scratch[2], scratch[3]]) as usize;
            let mut off = [0u8; 8];
            off.copy_from_slice(&scratch[4..BLOCKS_HEADER]);
            let offset = u64::from_le_bytes(off);
            let data = len - BLOCKS_HEADER;
            if data == 0 || !(data as u64).is_multiple_of(SECTOR) || !offset.is_multiple_of(SECTOR)
            {
                return Err(StreamError::UnalignedBlocks {
                    disk,
                    offset,
                    len: data,
                });
            }
            Record::Blocks {
                disk,
                offset,
                len: data,
            }
        }
        TAG_STATE => Record::State(std::mem::take(scratch)),
        TAG_DONE => Record::Done,
        TAG_RESUMED => Record::Resumed,
        _ => {
            Record::Refused(String::from_utf8(scratch.clone()).map_err(|_| StreamError::BadReason)?)
        }
    })
}
