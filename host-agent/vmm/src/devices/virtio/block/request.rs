//! One block request: a descriptor chain parsed into a request, executed against a
//! [`DiskBackend`], and completed with a status byte ([`process_chain`]).
//!
//! Expected layout (what Linux sends, and the spec's "legacy" layout): a 16-byte device-readable
//! header (`type`, `reserved`, `sector`), zero or more data descriptors (device-writable for
//! `IN` and `GET_ID`, device-readable for `OUT`), and a device-writable status descriptor last,
//! whose first byte gets the status. Everything else is refused:
//!
//! - no usable status byte (the last descriptor is device-readable, empty or outside guest
//!   memory), a chain cut short (a descriptor loop, a `next` index outside the table) or longer
//!   than `MAX_CHAIN_DESCRIPTORS` (130): the chain is *dropped*, returned with used length 0
//!   and no status written;
//! - a bad header, data of the wrong direction or outside guest memory, a length that is not a
//!   whole number of sectors or over `MAX_REQUEST_BYTES` (8 MiB), a sector range past the end
//!   of the disk, a write to a read-only disk, a host I/O error: `VIRTIO_BLK_S_IOERR`;
//! - `DISCARD`, `WRITE_ZEROES` and unknown types: `VIRTIO_BLK_S_UNSUPP`.
//!
//! Data moves through a bounce buffer of fixed size, so no guest-chosen length is ever
//! allocated, and the range checks use checked arithmetic.

use crate::memory::GuestRam;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use super::defs::{self, MAX_CHAIN_DESCRIPTORS, MAX_REQUEST_BYTES, SECTOR_SHIFT, SECTOR_SIZE};
use super::{DiskBackend, DiskInfo};

/// The request types the device knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest memory.
    In,
    /// Write sectors from guest memory.
    Out,
    /// Make earlier writes durable.
    Flush,
    /// Read the device id.
    GetId,
    /// Anything else (discard, write-zeroes, unknown), with its raw type.
    Unsupported(u32),
}

impl RequestType {
    /// Decodes the header's `type` field.
    pub fn from_raw(raw: u32) -> Self {
        match raw {
            defs::VIRTIO_BLK_T_IN => Self::In,
            defs::VIRTIO_BLK_T_OUT => Self::Out,
            defs::VIRTIO_BLK_T_FLUSH => Self::Flush,
            defs::VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// Why a request failed. [`RequestError::status`] says what the guest is told.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain yielded no descriptor (its head is outside the table or unreadable).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain has more descriptors than the device reads.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    ChainTooLong,
    /// The chain stops at a descriptor that still has `NEXT` set: a loop, a `next` index
    /// outside the table, or an unreadable descriptor.
    #[error("descriptor chain cut short (loop or bad next index)")]
    ChainTruncated,
    /// The last descriptor cannot take the status byte.
    #[error("no device-writable status byte in guest memory at the end of the chain")]
    BadStatusDescriptor,
    /// The chain holds only the status descriptor.
    #[error("request has no header")]
    MissingHeader,
    /// The header descriptor is device-writable.
    #[error("request header is in a device-writable descriptor")]
    HeaderWritable,
    /// The header descriptor is not 16 bytes.
    #[error("request header descriptor is {0} bytes, not 16")]
    HeaderLength(u32),
    /// The header is outside guest memory.
    #[error("request header is outside guest memory")]
    HeaderUnreadable,
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor of the wrong direction")]
    DataDirection,
    /// A data descriptor reaches outside guest memory.
    #[error("data descriptor outside guest memory")]
    DataOutsideMemory,
    /// A flush carries data.
    #[error("flush request carries data descriptors")]
    UnexpectedData,
    /// The data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    DataUnaligned(u64),
    /// The data length is over the per-request cap.
    #[error("data length {0} is over the {MAX_REQUEST_BYTES}-byte cap")]
    DataTooLarge(u64),
    /// The sector range reaches past the end of the disk (or overflows).
    #[error("{len} bytes at sector {sector} reach past the end of the disk")]
    OutOfRange {
        /// The first sector.
        sector: u64,
        /// The data length.
        len: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// A request type the device does not support.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The host file failed.
    #[error("host I/O failed")]
    Io(#[source] std::io::Error),
    /// A guest memory access failed after the range was checked.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

impl RequestError {
    /// The status byte the guest gets, or `None` when the chain is dropped without one.
    pub fn status(&self) -> Option<u8> {
        match self {
            Self::EmptyChain
            | Self::ChainTooLong
            | Self::ChainTruncated
            | Self::BadStatusDescriptor => None,
            Self::Unsupported(_) => Some(defs::VIRTIO_BLK_S_UNSUPP),
            _ => Some(defs::VIRTIO_BLK_S_IOERR),
        }
    }
}

/// Scratch space reused across requests, so that serving a request allocates nothing.
#[derive(Debug)]
pub struct RequestBuffers {
    descs: Vec<Descriptor>,
    bounce: Vec<u8>,
}

impl RequestBuffers {
    /// Buffers for the device's limits.
    pub fn new() -> Self {
        Self {
            descs: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS + 1),
            bounce: vec![0; defs::BOUNCE_BUFFER_LEN],
        }
    }
}

impl Default for RequestBuffers {
    fn default() -> Self {
        Self::new()
    }
}

/// How one chain ended: what goes into the used ring, the metrics and the log.
#[derive(Debug)]
pub struct Completion {
    /// Used length: bytes written into device-writable descriptors, the status byte included
    /// (0 for a dropped chain).
    pub used_len: u32,
    /// The request type, once a header was read.
    pub request_type: Option<RequestType>,
    /// Data bytes moved between the disk and guest memory.
    pub data_bytes: u64,
    /// `Ok` (status `OK`) or why the request failed.
    pub result: Result<(), RequestError>,
}

/// A chain's descriptors, split into header, data and status.
#[derive(Debug)]
struct ChainLayout<'a> {
    header: Descriptor,
    data: &'a [Descriptor],
    status: GuestAddress,
}

/// Reads at most [`MAX_CHAIN_DESCRIPTORS`] descriptors of `chain` into `descs` and splits them.
/// An error here means the chain has no usable status byte.
fn split_chain<'a, M>(
    chain: DescriptorChain<M>,
    mem: &GuestRam,
    descs: &'a mut Vec<Descriptor>,
) -> Result<ChainLayout<'a>, (Option<GuestAddress>, RequestError)>
where
    M: Deref,
    M::Target: GuestMemory,
{
    descs.clear();
    descs.extend(chain.take(MAX_CHAIN_DESCRIPTORS + 1));
    if descs.len() > MAX_CHAIN_DESCRIPTORS {
        return Err((None, RequestError::ChainTooLong));
    }
    let Some((status, rest)) = descs.split_last() else {
        return Err((None, RequestError::EmptyChain));
    };
    if status.has_next() {
        return Err((None, RequestError::ChainTruncated));
    }
    if !status.is_write_only()
        || status.len() == 0
        || !mem.check_range(status.addr(), 1, Permissions::Write)
    {
        return Err((None, RequestError::BadStatusDescriptor));
    }
    let Some((header, data)) = rest.split_first() else {
        return Err((Some(status.addr()), RequestError::MissingHeader));
    };
    Ok(ChainLayout {
        header: *header,
        data,
        status: status.addr(),
    })
}

/// A parsed, checked request, ready to run.
#[derive(Debug)]
struct Request<'a> {
    /// The request type.
    request_type: RequestType,
    /// The first sector (meaningful for `IN` and `OUT`).
    sector: u64,
    data: &'a [Descriptor],
    data_len: u64,
}

impl<'a> Request<'a> {
    /// Reads the header and checks the data descriptors against the request type, guest memory
    /// and the disk. Nothing is read from or written to the disk.
    fn parse(
        layout: &ChainLayout<'a>,
        mem: &GuestRam,
        info: &DiskInfo,
    ) -> Result<Self, (Option<RequestType>, RequestError)> {
        let header = layout.header;
        if header.is_write_only() {
            return Err((None, RequestError::HeaderWritable));
        }
        if header.len() != defs::REQUEST_HEADER_SIZE {
            return Err((None, RequestError::HeaderLength(header.len())));
        }
        let mut raw = [0u8; defs::REQUEST_HEADER_SIZE as usize];
        mem.read_slice(&mut raw, header.addr())
            .map_err(|_| (None, RequestError::HeaderUnreadable))?;
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = raw;
        let request_type = RequestType::from_raw(u32::from_le_bytes([t0, t1, t2, t3]));
        let sector = u64::from_le_bytes(s);
        let fail = |e| Err((Some(request_type), e));

        let device_writes = match request_type {
            RequestType::Unsupported(t) => return fail(RequestError::Unsupported(t)),
            RequestType::Out if info.read_only => return fail(RequestError::ReadOnly),
            RequestType::Flush if !layout.data.is_empty() => {
                return fail(RequestError::UnexpectedData);
            }
            RequestType::In | RequestType::GetId => true,
            RequestType::Out | RequestType::Flush => false,
        };
        let access = if device_writes {
            Permissions::Write
        } else {
            Permissions::Read
        };
        let mut data_len: u64 = 0;
        for d in layout.data {
            if d.is_write_only() != device_writes {
                return fail(RequestError::DataDirection);
            }
            if !mem.check_range(d.addr(), d.len() as usize, access) {
                return fail(RequestError::DataOutsideMemory);
            }
            // At most MAX_CHAIN_DESCRIPTORS descriptors of at most u32::MAX bytes each.
            data_len += u64::from(d.len());
        }
        if matches!(request_type, RequestType::In | RequestType::Out) {
            if data_len > MAX_REQUEST_BYTES {
                return fail(RequestError::DataTooLarge(data_len));
            }
            if !data_len.is_multiple_of(SECTOR_SIZE) {
                return fail(RequestError::DataUnaligned(data_len));
            }
            let end = sector
                .checked_mul(SECTOR_SIZE)
                .and_then(|start| start.checked_add(data_len));
            if end.is_none_or(|end| end > info.capacity_bytes()) {
                return fail(RequestError::OutOfRange {
                    sector,
                    len: data_len,
                });
            }
        }
        Ok(Self {
            request_type,
            sector,
            data: layout.data,
            data_len,
        })
    }

    /// Runs the request. Returns the bytes written into guest memory and the outcome; on a
    /// failure part way through an `IN`, the bytes already written still count.
    fn execute<D: DiskBackend>(
        &self,
        mem: &GuestRam,
        disk: &D,
        info: &DiskInfo,
        bounce: &mut [u8],
        write_through: bool,
    ) -> (u64, Result<(), RequestError>) {
        match self.request_type {
            RequestType::In => self.read(mem, disk, bounce),
            RequestType::Out => {
                let result = self.write(mem, disk, bounce).and_then(|()| {
                    if write_through {
                        disk.sync_data().map_err(RequestError::Io)
                    } else {
                        Ok(())
                    }
                });
                (0, result)
            }
            RequestType::Flush if info.read_only => (0, Ok(())),
            RequestType::Flush => (0, disk.sync_data().map_err(RequestError::Io)),
            RequestType::GetId => self.get_id(mem, &info.id),
            RequestType::Unsupported(t) => (0, Err(RequestError::Unsupported(t))),
        }
    }

    /// Calls `f(guest address, disk offset, length)` for each bounce-sized piece of the data.
    fn for_each_chunk(
        &self,
        chunk_len: usize,
        mut f: impl FnMut(GuestAddress, u64, usize) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let mut offset = self.sector << SECTOR_SHIFT;
        for d in self.data {
            let len = u64::from(d.len());
            let mut done = 0u64;
            while done < len {
                // `chunk_len` fits in usize, and the checked range lies in guest memory, so
                // neither conversion nor address can overflow.
                let n = (len - done).min(chunk_len as u64) as usize;
                let addr = GuestAddress(d.addr().0 + done);
                f(addr, offset, n)?;
                done += n as u64;
                offset += n as u64;
            }
        }
        Ok(())
    }

    fn read<D: DiskBackend>(
        &self,
        mem: &GuestRam,
        disk: &D,
        bounce: &mut [u8],
    ) -> (u64, Result<(), RequestError>) {
        let mut written = 0u64;
        let result = self.for_each_chunk(bounce.len(), |addr, offset, n| {
            let buf = &mut bounce[..n];
            disk.read_exact_at(buf, offset).map_err(RequestError::Io)?;
            mem.write_slice(buf, addr).map_err(RequestError::Memory)?;
            written += n as u64;
            Ok(())
        });
        (written, result)
    }

    fn write<D: DiskBackend>(
        &self,
        mem: &GuestRam,
        disk: &D,
        bounce: &mut [u8],
    ) -> Result<(), RequestError> {
        self.for_each_chunk(bounce.len(), |addr, offset, n| {
            let buf = &mut bounce[..n];
            mem.read_slice(buf, addr).map_err(RequestError::Memory)?;
            disk.write_all_at(buf, offset).map_err(RequestError::Io)
        })
    }

    /// Writes the id, zero-padded to 20 bytes, into as much of the data as there is room for.
    fn get_id(&self, mem: &GuestRam, id: &[u8]) -> (u64, Result<(), RequestError>) {
        let mut answer = [0u8; defs::ID_BYTES];
        let n = id.len().min(answer.len());
        answer[..n].copy_from_slice(&id[..n]);
        let mut left: &[u8] = &answer;
        let mut written = 0u64;
        for d in self.data {
            if left.is_empty() {
                break;
            }
            let n = left.len().min(d.len() as usize);
            if let Err(e) = mem.write_slice(&left[..n], d.addr()) {
                return (written, Err(RequestError::Memory(e)));
            }
            left = &left[n..];
            written += n as u64;
        }
        (written, Ok(()))
    }
}

/// Parses and runs the request in `chain`, then writes its status byte. The caller puts the
/// chain in the used ring with [`Completion::used_len`].
///
/// `write_through` makes every write durable before it completes (for a driver that did not
/// negotiate `VIRTIO_BLK_F_FLUSH` and so will never flush).
pub fn process_chain<M, D>(
    chain: DescriptorChain<M>,
    mem: &GuestRam,
    disk: &D,
    info: &DiskInfo,
    buffers: &mut RequestBuffers,
    write_through: bool,
) -> Completion
where
    M: Deref,
    M::Target: GuestMemory,
    D: DiskBackend,
{
    let RequestBuffers { descs, bounce } = buffers;
    let (status_addr, request_type, data_bytes, written, result) =
        match split_chain(chain, mem, descs) {
            Err((status_addr, e)) => (status_addr, None, 0, 0, Err(e)),
            Ok(layout) => match Request::parse(&layout, mem, info) {
                Err((request_type, e)) => (Some(layout.status), request_type, 0, 0, Err(e)),
                Ok(req) => {
                    let (written, result) = req.execute(mem, disk, info, bounce, write_through);
                    let moved = match (req.request_type, &result) {
                        (RequestType::In, _) => written,
                        (RequestType::Out, Ok(())) => req.data_len,
                        _ => 0,
                    };
                    (
                        Some(layout.status),
                        Some(req.request_type),
                        moved,
                        written,
                        result,
                    )
                }
            },
        };
    let Some(status_addr) = status_addr else {
        return Completion {
            used_len: 0,
            request_type,
            data_bytes,
            result,
        };
    };
    let status = match &result {
        Ok(()) => defs::VIRTIO_BLK_S_OK,
        Err(e) => e.status().unwrap_or(defs::VIRTIO_BLK_S_IOERR),
    };
    match mem.write_obj(status, status_addr) {
        Ok(()) => Completion {
            // At most MAX_REQUEST_BYTES (or 20 id bytes) plus the status byte.
            used_len: u32::try_from(written + 1).unwrap_or(u32::MAX),
            request_type,
            data_bytes,
            result,
        },
        // The range was checked when the chain was split; count it as dropped if it fails.
        Err(_) => Completion {
            used_len: 0,
            request_type,
            data_bytes,
            result: Err(RequestError::BadStatusDescriptor),
        },
    }
}
