//! Loading the guest: the kernel (bzImage or ELF `vmlinux`), the initramfs, the command line and
//! the zero page (`struct boot_params`) that the 64-bit boot protocol hands the kernel in `rsi`.
//!
//! A bzImage is entered at its 64-bit entry (load address + 0x200) and decompresses itself. An ELF
//! `vmlinux` is entered at its ELF entry point (`startup_64`, a physical address), skipping
//! decompression; its PVH note is ignored. Both get the same zero page.
//!
//! # Faulting in before loading
//! Guest RAM is a fresh anonymous mapping, so copying an image into it takes one page fault per
//! 4 KiB page (about 4,300 for a 17 MB `vmlinux`). So the ranges about to be written (each
//! `PT_LOAD` segment of an ELF kernel, a bzImage's protected-mode part, the initramfs) are first
//! populated in one `madvise(MADV_POPULATE_WRITE)` each (`prefault`). In nested emulation,
//! where every fault is an emulated exception, `scripts/bench-boot` saw the vmlinux load stage
//! fall from 329 ms to 196 ms; on a host that runs the VMM natively it made no measurable
//! difference (the pages must be backed and zeroed either way). These are pages the guest holds
//! anyway; a kernel without that advice (before Linux 5.14) faults them in one by one, as before.
//!
//! `elf_load_ranges` reads the ELF program headers itself: linux-loader parses them too but
//! does not expose them, and the two fields needed do not justify another ELF crate.

use crate::memory::GuestRam;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestUsize};

use super::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, E820Entry, HIMEM_START, ZERO_PAGE_START, low_ram_end,
};

/// The fixed part of the guest command line.
///
/// `random.trust_cpu=on` lets the guest kernel's random generator be ready from the CPU's
/// `RDRAND` at boot, as the cloud kernels' `RANDOM_TRUST_CPU` does. Without it the sidecar's
/// first `getrandom` (its boot key) waits for the kernel's jitter entropy, which took 5 s more
/// per boot in nested emulation and minutes on a loaded host. (A virtio-rng device, which fork
/// safety needs anyway, is the other way.)
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule i8042.noaux \
     i8042.nomux i8042.dumbkbd random.trust_cpu=on";

/// Offset of the 64-bit entry point from a bzImage's protected-mode load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags`: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Boot sector signature.
const BOOT_FLAG: u16 = 0xaa55;
/// `HdrS`.
const HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment used for an ELF kernel's synthesised header.
const ELF_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Highest initramfs address for kernels that do not say (`initrd_addr_max` default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE_SIZE: u64 = 0x1000;
/// `boot_params.e820_table` capacity.
const E820_MAX_ENTRIES: usize = 128;

/// Errors from loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Opening or reading the kernel image failed.
    #[error("read kernel image {path}")]
    ReadKernel {
        /// The kernel path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an ELF file nor a bzImage.
    #[error("kernel image {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(String),
    /// The bzImage has no 64-bit entry point.
    #[error("bzImage {0} has no 64-bit entry point (xloadflags.XLF_KERNEL_64 is clear)")]
    No64BitEntry(String),
    /// The linux-loader crate failed to load the kernel.
    #[error("load kernel {path}")]
    LoadKernel {
        /// The kernel path.
        path: String,
        /// The loader error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// Opening or reading the initramfs failed.
    #[error("read initramfs {path}")]
    ReadInitrd {
        /// The initramfs path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error(
        "initramfs of {size} bytes does not fit in guest RAM above the kernel (end {kernel_end:#x})"
    )]
    InitrdTooLarge {
        /// Initramfs size.
        size: u64,
        /// End of the kernel image in guest memory.
        kernel_end: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("copy initramfs into guest memory")]
    WriteInitrd(#[source] vm_memory::GuestMemoryError),
    /// The command line is invalid or too long.
    #[error("build kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Copying the command line into guest memory failed.
    #[error("write kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The e820 map has more entries than the zero page holds.
    #[error("e820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
    /// Writing the zero page failed.
    #[error("write zero page")]
    WriteZeroPage(#[source] vm_memory::GuestMemoryError),
}

/// The two kernel image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage, entered at its 64-bit entry.
    BzImage,
    /// An uncompressed ELF `vmlinux`, entered at its ELF entry point.
    Elf,
}

/// Tells the format from the first 0x206 bytes of an image.
pub fn detect_format(head: &[u8]) -> Option<KernelFormat> {
    if head.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else if head.get(0x202..0x206) == Some(b"HdrS".as_slice()) {
        Some(KernelFormat::BzImage)
    } else {
        None
    }
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The image format.
    pub format: KernelFormat,
    /// The 64-bit entry point (guest physical).
    pub entry: u64,
    /// First guest address above everything the kernel occupies while it boots.
    pub end: u64,
    /// The bzImage setup header, to be completed into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestRam, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let read_err = |source| BootError::ReadKernel {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let mut head = vec![0u8; 0x206];
    let n = read_up_to(&mut file, &mut head).map_err(read_err)?;
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let format =
        detect_format(&head[..n]).ok_or_else(|| BootError::UnknownKernelFormat(name.clone()))?;
    let load_err = |source| BootError::LoadKernel {
        path: name.clone(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::BzImage => {
            if let Ok(meta) = file.metadata() {
                prefault(mem, HIMEM_START, meta.len());
            }
            let result = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let hdr = result
                .setup_header
                .ok_or_else(|| BootError::UnknownKernelFormat(name.clone()))?;
            if hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(name));
            }
            let load = result.kernel_load.0;
            // The decompressor needs `init_size` bytes from the (aligned) load address.
            let end = (load + GuestUsize::from(hdr.init_size)).max(result.kernel_end);
            Ok(LoadedKernel {
                format,
                entry: load + BZIMAGE_64BIT_ENTRY_OFFSET,
                end,
                setup_header: Some(hdr),
            })
        }
        KernelFormat::Elf => {
            for (addr, len) in elf_load_ranges(&file) {
                prefault(mem, addr, len);
            }
            let result = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                format,
                entry: result.kernel_load.0,
                end: result.kernel_end,
                setup_header: None,
            })
        }
    }
}

/// The most program headers [`elf_load_ranges`] reads (a kernel has a handful).
const MAX_PHDRS: usize = 64;
/// `PT_LOAD`.
const PT_LOAD: u32 = 1;

/// The guest ranges `(paddr, filesz)` that the `PT_LOAD` segments of the ELF64 image `file`
/// will be copied to, read without moving the file's position; none for a file whose headers do
/// not read (the loader then says what is wrong with it).
fn elf_load_ranges(file: &File) -> Vec<(u64, u64)> {
    let mut ehdr = [0u8; 64];
    if file.read_exact_at(&mut ehdr, 0).is_err() {
        return Vec::new();
    }
    let u64_at = |b: &[u8], at: usize| {
        b.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let u16_at = |b: &[u8], at: usize| {
        b.get(at..at + 2)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u16::from_le_bytes)
    };
    let (phoff, phentsize, phnum) = (
        u64_at(&ehdr, 32),
        usize::from(u16_at(&ehdr, 54)),
        usize::from(u16_at(&ehdr, 56)),
    );
    if phentsize < 56 || phnum > MAX_PHDRS {
        return Vec::new();
    }
    let mut table = vec![0u8; phentsize * phnum];
    if file.read_exact_at(&mut table, phoff).is_err() {
        return Vec::new();
    }
    table
        .chunks_exact(phentsize)
        .filter(|ph| ph.get(..4) == Some(PT_LOAD.to_le_bytes().as_slice()))
        .map(|ph| (u64_at(ph, 24), u64_at(ph, 32)))
        .filter(|&(_, len)| len > 0)
        .collect()
}

/// Populates the guest pages of `[addr, addr + len)` for writing, in one call (see the module
/// doc). Only an optimisation: a range outside guest RAM, or a kernel that refuses the advice,
/// leaves the pages to be faulted in as they are written.
fn prefault(mem: &GuestRam, addr: u64, len: u64) {
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return;
    };
    let offset = addr - region.start_addr().0;
    let Some(len) = usize::try_from(len.min(region.len() - offset))
        .ok()
        .filter(|&l| l > 0)
    else {
        return;
    };
    let Ok(host) = mem.get_host_address(GuestAddress(addr)) else {
        return;
    };
    // madvise wants a page-aligned start.
    let page = PAGE_SIZE as usize;
    let misalign = host as usize % page;
    // SAFETY: `[host - misalign, host + len)` lies inside one region of guest RAM, a mapping
    // this process made and keeps for its whole life (the aligned start stays inside it, since
    // regions start page-aligned). MADV_POPULATE_WRITE only faults pages in as if written
    // (with no change to what they hold), so no memory Rust can see changes.
    let rc = unsafe {
        libc::madvise(
            host.wrapping_sub(misalign).cast(),
            len + misalign,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if rc != 0 {
        tracing::debug!(
            addr = format_args!("{addr:#x}"),
            len,
            error = %std::io::Error::last_os_error(),
            "cannot populate guest pages before loading; they fault in as written"
        );
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The highest page-aligned address for an initramfs of `size` bytes that ends below both the top
/// of low RAM and `addr_max`, and starts above `kernel_end`.
pub fn initrd_placement(
    low_ram_end: u64,
    addr_max: u64,
    size: u64,
    kernel_end: u64,
) -> Option<u64> {
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let start = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    let kernel_end = kernel_end.checked_add(PAGE_SIZE - 1)? & !(PAGE_SIZE - 1);
    (start >= kernel_end).then_some(start)
}

/// Copies the initramfs at `path` as high as the kernel allows. Returns its address and size.
pub fn load_initrd(
    mem: &GuestRam,
    path: &Path,
    mem_size: u64,
    kernel: &LoadedKernel,
) -> Result<(u64, u32), BootError> {
    let name = path.display().to_string();
    let read_err = |source| BootError::ReadInitrd {
        path: name.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end: kernel.end,
    };
    let size32 = u32::try_from(size).map_err(|_| BootError::InitrdTooLarge {
        size,
        kernel_end: kernel.end,
    })?;
    let addr =
        initrd_placement(low_ram_end(mem_size), addr_max, size, kernel.end).ok_or(too_large)?;
    prefault(mem, addr, size);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::WriteInitrd)?;
    Ok((addr, size32))
}

/// Assembles the command line: the fixed part, then the virtio-mmio device arguments, then the
/// user's extra arguments.
pub fn build_cmdline(device_args: &[String], extra: Option<&str>) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    cmdline
        .insert_str(BASE_CMDLINE)
        .map_err(BootError::Cmdline)?;
    for arg in device_args {
        cmdline.insert_str(arg).map_err(BootError::Cmdline)?;
    }
    if let Some(extra) = extra.map(str::trim).filter(|e| !e.is_empty()) {
        cmdline.insert_str(extra).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Copies `cmdline` to its fixed address. Returns its size including the terminating NUL.
pub fn write_cmdline(mem: &GuestRam, cmdline: &Cmdline) -> Result<u32, BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::WriteCmdline)?;
    let len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    Ok(len as u32)
}

/// Builds the zero page for `kernel` with the command line at [`CMDLINE_START`], the optional
/// initramfs `(address, size)` and the e820 map.
pub fn build_boot_params(
    kernel: &LoadedKernel,
    cmdline_size: u32,
    initrd: Option<(u64, u32)>,
    e820: &[E820Entry],
) -> Result<boot_params, BootError> {
    if e820.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    let hdr = kernel.setup_header.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG,
        header: HDR_MAGIC,
        kernel_alignment: ELF_KERNEL_ALIGNMENT,
        ..Default::default()
    });
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
        params.ext_ramdisk_image = (addr >> 32) as u32;
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind;
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the zero page.
pub fn write_boot_params(mem: &GuestRam, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::e820_map;

    /// An ELF64 header with program headers `phdrs` (type, paddr, filesz) at offset 64.
    fn elf_with(phdrs: &[(u32, u64, u64)]) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for &(kind, paddr, filesz) in phdrs {
            let mut ph = [0u8; 56];
            ph[..4].copy_from_slice(&kind.to_le_bytes());
            ph[24..32].copy_from_slice(&paddr.to_le_bytes());
            ph[32..40].copy_from_slice(&filesz.to_le_bytes());
            f.extend_from_slice(&ph);
        }
        f
    }

    fn file_of(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    #[test]
    fn elf_load_ranges_are_the_load_segments_and_nothing_for_a_bad_header() {
        let f = file_of(&elf_with(&[
            (PT_LOAD, 0x100_0000, 0x20_0000),
            (4, 0x900_0000, 0x1000),
            (PT_LOAD, 0x140_0000, 0),
            (PT_LOAD, 0x160_0000, 0x3000),
        ]));
        assert_eq!(
            elf_load_ranges(&f),
            [(0x100_0000, 0x20_0000), (0x160_0000, 0x3000)]
        );
        // A short file, a table past its end, too many headers, entries too small.
        let mut cut = elf_with(&[(PT_LOAD, 0x100_0000, 0x1000)]);
        cut.truncate(100);
        let mut many = elf_with(&[]);
        many[56..58].copy_from_slice(&(MAX_PHDRS as u16 + 1).to_le_bytes());
        let mut small = elf_with(&[(PT_LOAD, 0x100_0000, 0x1000)]);
        small[54..56].copy_from_slice(&8u16.to_le_bytes());
        for bad in [&b"\x7fELF"[..], &cut, &many, &small] {
            assert!(elf_load_ranges(&file_of(bad)).is_empty());
        }
    }

    #[test]
    fn prefault_keeps_what_memory_holds_and_ignores_ranges_outside_it() {
        let mem = crate::memory::create_guest_memory(4 << 20).unwrap();
        mem.write_slice(b"kept", GuestAddress(0x1_0003)).unwrap();
        prefault(&mem, 0x1_0003, 0x2_0000);
        prefault(&mem, 0, 64 << 20);
        prefault(&mem, 1 << 40, 0x1000);
        prefault(&mem, 0x2000, 0);
        let mut back = [0u8; 4];
        mem.read_slice(&mut back, GuestAddress(0x1_0003)).unwrap();
        assert_eq!(&back, b"kept");
    }

    #[test]
    fn cmdline_has_base_then_devices_then_extra() {
        let c = build_cmdline(
            &["virtio_mmio.device=4K@0xd0000000:5".to_string()],
            Some("  init=/bin/sh quiet "),
        )
        .unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            format!("{BASE_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 init=/bin/sh quiet")
        );
        let plain = build_cmdline(&[], Some("   ")).unwrap();
        assert_eq!(plain.as_cstring().unwrap().to_str().unwrap(), BASE_CMDLINE);
        let huge = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&[], Some(&huge)),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn formats_are_detected_by_magic() {
        assert_eq!(detect_format(b"\x7fELF\x02\x01"), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x206];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_format(&bz), Some(KernelFormat::BzImage));
        assert_eq!(detect_format(&bz[..0x204]), None);
        assert_eq!(detect_format(b"MZ"), None);
    }

    #[test]
    fn initrd_goes_high_and_never_over_the_kernel() {
        let mib = 1u64 << 20;
        assert_eq!(
            initrd_placement(128 * mib, 0x7fff_ffff, 0x1800, 20 * mib),
            Some(128 * mib - 0x2000)
        );
        // Capped by initrd_addr_max on a large guest.
        assert_eq!(
            initrd_placement(0xd000_0000, 0x7fff_ffff, mib, 20 * mib),
            Some(0x8000_0000 - mib)
        );
        assert_eq!(
            initrd_placement(64 * mib, 0x7fff_ffff, 60 * mib, 20 * mib),
            None
        );
        assert_eq!(initrd_placement(64 * mib, 0x7fff_ffff, 65 * mib, 0), None);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let kernel = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        };
        let map = e820_map(128 << 20);
        let p = build_boot_params(&kernel, 120, Some((0x7f0_0000, 0x1234)), &map).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 120);
        assert_eq!({ hdr.ramdisk_image }, 0x7f0_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!(p.e820_entries, 3);
        let e2 = p.e820_table[2];
        assert_eq!(
            ({ e2.addr }, { e2.size }, { e2.r#type }),
            (0x10_0000, (128 << 20) - 0x10_0000, 1)
        );

        let bz_hdr = setup_header {
            version: 0x20f,
            initrd_addr_max: 0x7fff_ffff,
            loadflags: 1,
            ..Default::default()
        };
        let bz = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: 0x10_0200,
            end: 0x100_0000,
            setup_header: Some(bz_hdr),
        };
        let p = build_boot_params(&bz, 10, None, &map).unwrap();
        assert_eq!(
            ({ p.hdr.version }, { p.hdr.loadflags }, {
                p.hdr.ramdisk_image
            }),
            (0x20f, 1, 0)
        );
        let too_many = vec![map[0]; 129];
        assert!(matches!(
            build_boot_params(&bz, 10, None, &too_many),
            Err(BootError::TooManyE820Entries(129))
        ));
    }
}
