//! The PI metadata file's header: format constants, the header page (what the file
//! describes and its state), the identity of the data it belongs to, and the errors of
//! opening a metadata file. Layout in docs/FORMAT.md.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::guard::crc64_nvme;
use super::pi::PiFormat;

/// First bytes of every metadata file.
pub const MAGIC: [u8; 8] = *b"GBLK-PI\0";
/// The only layout version this build reads and writes.
pub const VERSION: u32 = 1;
/// The header occupies the first page.
pub const HEADER_SIZE: u64 = 4096;
/// Application tag guardblk stores with every generated tuple. Guests cannot send PI over
/// virtio-blk, so the tag is ours: a fixed value that is checked on read and that keeps a
/// written tuple distinguishable from the all-zero "unwritten" one.
pub const APP_TAG: u16 = 0x4742; // "GB"
/// Intent regions are at least 1 MiB; larger disks get larger regions so the per-region
/// state stays at or under 2^20 entries (8 MiB of memory).
const MIN_REGION_SHIFT: u32 = 20;
/// The smallest region of metadata beside an RBD image (see [`Header::new`]).
const RBD_MIN_REGION_SHIFT: u32 = 22;
const MAX_REGIONS_LOG2: u32 = 20;
/// The data target's path is recorded (informational) in this many bytes.
const PATH_FIELD: usize = 256;

#[derive(Debug, Error)]
pub enum MetadataError {
    #[error("PI metadata {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot open PI metadata {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    #[error(transparent)]
    Rbd(Box<crate::storage::rbd::RbdError>),
    #[error("cannot create {path}, where guardblk keeps the PI journal and statistics of rbd: images (see --rbd-state-dir): {source}")]
    StateDir { path: PathBuf, source: io::Error },
    #[error("cannot create PI metadata {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path} is not guardblk PI metadata (bad magic)")]
    NotMetadata { path: PathBuf },
    #[error("PI metadata {path} has format version {version}; this guardblk reads version {VERSION} only")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("PI metadata {path} has a damaged header ({what}); restore it from a backup or re-create it with `guardblk import`")]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("PI metadata {path} is truncated: {len} bytes, but its header needs {needed}")]
    Truncated {
        path: PathBuf,
        len: u64,
        needed: u64,
    },
    #[error("PI metadata {meta} describes a {expected}-byte disk, but {data} is {actual} bytes; this is not its image (or the image was resized)")]
    SizeMismatch {
        meta: PathBuf,
        data: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("PI metadata {meta} does not belong to {data}: none of the {sampled} written blocks sampled verify against it")]
    NotPaired {
        meta: PathBuf,
        data: PathBuf,
        sampled: usize,
    },
    #[error("PI metadata {path} was not closed cleanly and needs recovery, which needs write access to it ({source}); run `guardblk scrub` on the image once with write access")]
    NeedsRecovery { path: PathBuf, source: io::Error },
    #[error("PI metadata {path} is in use by another process (it holds the metadata lock)")]
    Locked { path: PathBuf },
    #[error("the file system holding PI metadata {path} has no room for it ({needed} bytes must be allocated up front, so that a full disk can never leave a tuple unstored): free space and try again")]
    NoSpace { path: PathBuf, needed: u64 },
    #[error("cannot map PI metadata {path}: {source}")]
    Map { path: PathBuf, source: io::Error },
    #[error("I/O error on PI metadata {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("image size {size} is not a multiple of the {interval}-byte protection interval")]
    NotIntervalMultiple { size: u64, interval: u32 },
}

/// Whether the metadata was closed cleanly (every tuple durable, no write intents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    Clean,
    /// Opened for writing and not (yet) closed cleanly.
    InUse,
}

/// What identifies the data target a metadata file belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub device: u64,
    pub inode: u64,
}

/// `device` of an RBD image's identity ("rbd" in ASCII): no st_dev is ever this small and
/// odd-looking, and block devices use `inode` 0.
pub const RBD_DEVICE: u64 = 0x0072_6264;

impl DataIdentity {
    /// The identity of an open image: a file's or device's (below), or an RBD image's
    /// (its pool-unique id, which survives renames, hashed into `inode`).
    pub fn of_image(image: &crate::storage::Image) -> io::Result<DataIdentity> {
        match image.backing() {
            crate::storage::image::Backing::File(_) => DataIdentity::of(image.path(), image.size()),
            crate::storage::image::Backing::Rbd(rbd) => Ok(DataIdentity {
                path: image.path().into(),
                size: image.size(),
                device: RBD_DEVICE,
                inode: fnv1a(rbd.id()?.as_bytes()),
            }),
        }
    }

    pub fn of(path: &Path, size: u64) -> io::Result<DataIdentity> {
        let meta = std::fs::metadata(path)?;
        let (device, inode) = if meta.file_type().is_block_device() {
            (meta.rdev(), 0)
        } else {
            (meta.dev(), meta.ino())
        };
        Ok(DataIdentity {
            path: std::fs::canonicalize(path).unwrap_or_else(|_| path.into()),
            size,
            device,
            inode,
        })
    }
}

/// FNV-1a, 64 bits: a stable hash of an RBD image id (no collision resistance needed: the
/// pairing check verifies data whenever the identity differs).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub uuid: [u8; 16],
    pub format: PiFormat,
    pub interval: u32,
    pub blocks: u64,
    pub region_shift: u32,
    pub state: VolumeState,
    pub created_unix: u64,
    pub data: DataIdentity,
}

fn format_code(format: PiFormat) -> u8 {
    match format {
        PiFormat::Type1 => 1,
        PiFormat::Type3 => 3,
        PiFormat::Nvme64 => 64,
    }
}

fn round_up_page(n: u64) -> u64 {
    n.div_ceil(4096) * 4096
}

impl Header {
    pub fn new(format: PiFormat, interval: u32, data: DataIdentity) -> Header {
        let blocks = data.size / u64::from(interval);
        // An RBD image's regions are at least its default object size (4 MiB): the first
        // write to an idle region waits for a synchronous write of its intent bit to the
        // cluster (a round trip, not a page cache flush), and recovery reads whole objects
        // anyway. Any shift from MIN_REGION_SHIFT up is valid in the format.
        let mut region_shift = if data.device == RBD_DEVICE {
            RBD_MIN_REGION_SHIFT
        } else {
            MIN_REGION_SHIFT
        };
        while data.size.div_ceil(1 << region_shift) > 1 << MAX_REGIONS_LOG2 {
            region_shift += 1;
        }
        Header {
            uuid: random_uuid(),
            format,
            interval,
            blocks,
            region_shift,
            state: VolumeState::Clean,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            data,
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.blocks * u64::from(self.interval)
    }

    pub fn regions(&self) -> u64 {
        self.capacity_bytes().div_ceil(1 << self.region_shift)
    }

    pub fn bitmap_offset(&self) -> u64 {
        HEADER_SIZE
    }

    pub fn bitmap_len(&self) -> u64 {
        round_up_page(self.regions().div_ceil(64) * 8)
    }

    pub fn tuples_offset(&self) -> u64 {
        self.bitmap_offset() + self.bitmap_len()
    }

    pub fn tuples_len(&self) -> u64 {
        round_up_page(self.blocks * self.format.tuple_size() as u64)
    }

    /// Bytes the whole metadata file needs.
    pub fn file_len(&self) -> u64 {
        self.tuples_offset() + self.tuples_len()
    }

    pub fn uuid_string(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }

    /// The on-disk header page; field offsets are documented in docs/FORMAT.md.
    pub fn encode(&self) -> Vec<u8> {
        let mut page = vec![0u8; HEADER_SIZE as usize];
        let mut put = |offset: usize, bytes: &[u8]| {
            page[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &MAGIC);
        put(8, &VERSION.to_le_bytes());
        put(12, &(HEADER_SIZE as u32).to_le_bytes());
        put(16, &self.uuid);
        put(32, &[format_code(self.format)]);
        put(33, &[self.format.tuple_size() as u8]);
        put(36, &self.interval.to_le_bytes());
        put(40, &self.blocks.to_le_bytes());
        put(48, &self.capacity_bytes().to_le_bytes());
        put(56, &self.bitmap_offset().to_le_bytes());
        put(64, &self.bitmap_len().to_le_bytes());
        put(72, &self.region_shift.to_le_bytes());
        let state: u32 = match self.state {
            VolumeState::Clean => 0,
            VolumeState::InUse => 1,
        };
        put(76, &state.to_le_bytes());
        put(80, &self.tuples_offset().to_le_bytes());
        put(88, &self.tuples_len().to_le_bytes());
        put(96, &self.created_unix.to_le_bytes());
        put(104, &self.data.device.to_le_bytes());
        put(112, &self.data.inode.to_le_bytes());
        let path = self.data.path.as_os_str().as_encoded_bytes();
        put(120, &path[..path.len().min(PATH_FIELD - 1)]);
        let checksum = crc64_nvme(&page[..HEADER_SIZE as usize - 8]);
        page[HEADER_SIZE as usize - 8..].copy_from_slice(&checksum.to_le_bytes());
        page
    }

    pub fn decode(page: &[u8], path: &Path) -> Result<Header, MetadataError> {
        let corrupt = |what| MetadataError::Corrupt {
            path: path.into(),
            what,
        };
        if page.len() < HEADER_SIZE as usize || page[..8] != MAGIC {
            return Err(MetadataError::NotMetadata { path: path.into() });
        }
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(MetadataError::UnsupportedVersion {
                path: path.into(),
                version,
            });
        }
        if u64_at(HEADER_SIZE as usize - 8) != crc64_nvme(&page[..HEADER_SIZE as usize - 8]) {
            return Err(corrupt("header checksum mismatch"));
        }
        if u64::from(u32_at(12)) != HEADER_SIZE {
            return Err(corrupt("unexpected header size"));
        }
        let format = match page[32] {
            1 => PiFormat::Type1,
            3 => PiFormat::Type3,
            64 => PiFormat::Nvme64,
            _ => return Err(corrupt("unknown PI format")),
        };
        if usize::from(page[33]) != format.tuple_size() {
            return Err(corrupt("tuple size does not match the PI format"));
        }
        let interval = u32_at(36);
        if interval != 512 && interval != 4096 {
            return Err(corrupt("protection interval is neither 512 nor 4096"));
        }
        let state = match u32_at(76) {
            0 => VolumeState::Clean,
            1 => VolumeState::InUse,
            _ => return Err(corrupt("unknown state")),
        };
        let path_bytes = &page[120..120 + PATH_FIELD];
        let path_len = path_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(PATH_FIELD);
        let header = Header {
            uuid: page[16..32].try_into().expect("16 bytes"),
            format,
            interval,
            blocks: u64_at(40),
            region_shift: u32_at(72),
            state,
            created_unix: u64_at(96),
            data: DataIdentity {
                path: PathBuf::from(String::from_utf8_lossy(&path_bytes[..path_len]).as_ref()),
                size: u64_at(48),
                device: u64_at(104),
                inode: u64_at(112),
            },
        };
        if header.data.size != header.capacity_bytes()
            || !(MIN_REGION_SHIFT..64).contains(&header.region_shift)
            || u64_at(56) != header.bitmap_offset()
            || u64_at(64) != header.bitmap_len()
            || u64_at(80) != header.tuples_offset()
            || u64_at(88) != header.tuples_len()
        {
            return Err(corrupt("inconsistent geometry"));
        }
        Ok(header)
    }
}

fn random_uuid() -> [u8; 16] {
    let mut uuid = [0u8; 16];
    // SAFETY: getrandom writes at most `uuid.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(uuid.as_mut_ptr().cast(), uuid.len(), 0) };
    if n != uuid.len() as isize {
        // Entropy is not critical here (the UUID names the pair); fall back to the clock.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        uuid = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    uuid[6] = (uuid[6] & 0x0f) | 0x40; // version 4
    uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
    uuid
}

/// The default metadata path for an image: `IMAGE.pi`.
pub fn default_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".pi");
    PathBuf::from(name)
}
