//! Command line: clap definitions, and their conversion into validated configuration.
//!
//! Everything a user can get wrong on the command line is caught here, with one sentence.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::commands::ServeRequest;
use crate::daemon::ServeConfig;
use crate::protocol::DeviceSettings;
use crate::requests::parse::VIRTIO_BLK_ID_BYTES;
use crate::requests::policy::AutoPath;
use crate::requests::WritePolicy;
use crate::storage::rbd::RbdSpec;
use crate::storage::{EngineChoice, EngineKind};

/// Size of the image `guardblk serve` creates when given no IMAGE.
pub const DEFAULT_IMAGE_SIZE: &str = "8G";
pub const DEFAULT_IMAGE: &str = "guardblk-default.img";
pub const DEFAULT_SOCKET: &str = "/tmp/guardblk.sock";

#[derive(Debug, Parser)]
#[command(
    name = "guardblk",
    version,
    about = "A vhost-user-blk daemon: serves a raw disk image to QEMU (or any vhost-user frontend) zero-copy with io_uring.",
    long_about = "guardblk serves a raw disk image to a virtual machine over the vhost-user-blk protocol.\n\
QEMU connects to guardblk's Unix socket and the guest sees a virtio-blk disk. Guest I/O moves \
directly between guest memory and the image with io_uring and O_DIRECT; the daemon keeps running \
when QEMU exits, restarts or reconnects.\n\n\
Every block can carry T10 protection information (PI): a guard checksum, stored in a \
metadata file beside the image (IMAGE.pi), that is generated on every write and verified on \
every read, so corruption anywhere between the guest and the disk is detected instead of \
silently returned.\n\n\
Quick start:\n  guardblk create disk.img --size 8G\n  guardblk serve disk.img --socket /run/guardblk.sock\n\
Then start QEMU with shared guest memory and a vhost-user-blk-pci device (guardblk serve prints \
the exact options). Ready-made command lines are in qemu-configs/.\n\n\
Looking after a protected image:\n  guardblk import old.img     add PI to an existing raw image\n  \
guardblk scrub disk.img     verify every block (exit 1 if any is corrupt)\n  \
guardblk info disk.img      format, geometry and the error journal\n  \
guardblk stats --watch 2    live counters of a running daemon\n\n\
Block addresses (LBAs) are always in protection-interval units (--interval, 4096 bytes by \
default); reports give the byte offset too."
)]
pub struct Cli {
    /// Log verbosity: error, warn, info, debug or trace. RUST_LOG, if set, takes precedence.
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new, sparse raw disk image with PI metadata (refuses to overwrite an existing file).
    Create(CreateArgs),
    /// Add PI to an existing raw image: compute a guard tag for every block of it.
    #[command(
        long_about = "Add protection information to an existing raw disk image.\n\n\
Reads the whole image once, computes the guard tag of every protection interval and writes \
them to a new metadata file (IMAGE.pi, or --pi-meta). From then on `guardblk serve` verifies \
every read against them. Holes in a sparse image are not read. Refuses if the metadata already \
exists (use `guardblk scrub` to check an image that already has PI) and while the image is \
being served."
    )]
    Import(ImportArgs),
    /// Verify every block of a PI-protected image against its guard tags.
    #[command(
        long_about = "Verify every protection interval of an image against its stored PI tuple.\n\n\
Prints one line per corrupt block (LBA in interval units, byte offset, which tag failed, \
expected and found values) and a summary; each failure is also appended to the error journal \
(IMAGE.pi-journal.jsonl). If the image was not shut down cleanly, blocks whose writes were in \
flight at the time are first re-checked and their tags re-derived (counted as `recovered`, \
not as errors). The image must not be in use: stop the daemon serving it first.",
        after_help = "Exit status:\n  0  every block verified\n  1  at least one block failed verification (guard, reference or application tag)\n  \
2  the scrub could not run (no PI metadata, image served by a running daemon, I/O error, ...)"
    )]
    Scrub(ScrubArgs),
    /// Show an image's PI format, geometry, state and error journal (safe while it is served).
    #[command(
        long_about = "Show what guardblk knows about an image: its size, the PI format \
and protection interval, the metadata file, whether it was closed cleanly, and a summary of the \
error journal (guard errors by block, recoveries, injected faults, the latest records).\n\n\
Only reads; works while a daemon is serving the image."
    )]
    Info(InfoArgs),
    /// Corrupt one block on purpose, to test that corruption is detected.
    #[command(
        long_about = "Corrupt one block on purpose, for tests and failure drills.\n\n\
--kind data flips the bits of one byte of the block's data; guard, ref and app flip bits of that \
field of the block's stored PI tuple (guard tag, reference tag, application tag). A later read \
by a guest fails with an I/O error and `guardblk scrub` reports the block. Each injection is \
recorded in the error journal. Refuses while the image is being served. Note that type3 PI has \
no reference tag check, so a ref injection there is not detected (by design)."
    )]
    Inject(InjectArgs),
    /// Serve a disk image on a vhost-user-blk socket until SIGINT/SIGTERM.
    Serve(ServeArgs),
    /// Show a running daemon's counters: I/O, latency, PI checks, bounces, errors, per queue.
    #[command(
        long_about = "Show a running daemon's counters as a table: requests and bytes per \
queue, requests in flight, p99 latency, how PI writes reached the disk (zero-copy, bounced, \
rewritten after the guest changed them in flight), reads healed by a re-read, guard errors and \
rejected requests.\n\n\
Asks the daemon through its stats socket (SOCKET.stats, beside the vhost-user socket) or its \
--metrics address. With --watch, refreshes every SECS seconds and shows per-second rates over \
each interval; stop it with Ctrl-C."
    )]
    Stats(StatsArgs),
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The daemon's vhost-user socket (its --socket; default /tmp/guardblk.sock): the stats
    /// socket SOCKET.stats is beside it.
    #[arg(long, value_name = "PATH", conflicts_with = "metrics")]
    pub socket: Option<PathBuf>,
    /// The daemon's --metrics address instead, e.g. http://127.0.0.1:9717.
    #[arg(long, value_name = "URL")]
    pub metrics: Option<String>,
    /// Refresh every SECS seconds (rates over each interval) until interrupted.
    #[arg(long, value_name = "SECS", value_parser = parse_watch)]
    pub watch: Option<f64>,
    /// Print the daemon's stats document (JSON) once instead of a table.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
}

fn parse_watch(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| (0.1..=3600.0).contains(s))
        .ok_or_else(|| format!("'{text}' is not a number of seconds between 0.1 and 3600"))
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Path of the image to create, or rbd:POOL/IMAGE to create a Ceph RBD image (its PI
    /// metadata is then the RBD image IMAGE.pi beside it).
    pub image: PathBuf,
    /// Capacity, a multiple of 512 bytes: plain bytes or with a K, M, G or T suffix (powers of 1024), e.g. 8G.
    #[arg(long, value_parser = parse_size)]
    pub size: u64,
    #[command(flatten)]
    pub layout: PiLayoutArgs,
    #[command(flatten)]
    pub ceph: CephArgs,
}

/// How a new or imported image is protected.
#[derive(Debug, Args)]
pub struct PiLayoutArgs {
    /// Protection-information format: type1 (CRC-16 guard + reference tag = LBA), type3
    /// (CRC-16 guard only), nvme64 (CRC-64 guard + 48-bit reference tag), or none (a plain
    /// raw image; `create` only). The tuples go in IMAGE.pi beside the image.
    #[arg(long, value_enum, default_value_t = PiChoice::Type1)]
    pub pi: PiChoice,
    /// Protection interval in bytes (512 or 4096): the guest-visible logical block size.
    #[arg(long, default_value_t = 4096, value_parser = parse_interval, value_name = "BYTES")]
    pub interval: u32,
    /// Where to put the PI metadata (a file, or a block device), instead of IMAGE.pi.
    #[arg(long, value_name = "PATH")]
    pub pi_meta: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Existing raw image (file, block device or rbd:POOL/IMAGE) to protect; its size must be a multiple of --interval.
    pub image: PathBuf,
    #[command(flatten)]
    pub layout: PiLayoutArgs,
    #[command(flatten)]
    pub ceph: CephArgs,
}

#[derive(Debug, Args)]
pub struct ScrubArgs {
    /// PI-protected image (file, block device or rbd:POOL/IMAGE) to verify.
    pub image: PathBuf,
    /// Print JSON lines instead of text: one journal record per corrupt block, then a
    /// {"summary":{...}} line.
    #[arg(long)]
    pub json: bool,
    /// The image's PI metadata, if not IMAGE.pi.
    #[arg(long, value_name = "PATH")]
    pub pi_meta: Option<PathBuf>,
    #[command(flatten)]
    pub ceph: CephArgs,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Image (file or block device) to describe, or rbd:POOL/IMAGE for a Ceph RBD image.
    pub image: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The image's PI metadata, if not IMAGE.pi.
    #[arg(long, value_name = "PATH")]
    pub pi_meta: Option<PathBuf>,
    #[command(flatten)]
    pub ceph: CephArgs,
}

/// How an rbd:POOL/IMAGE target reaches its cluster (the names qemu's rbd driver uses).
#[derive(Debug, Args)]
pub struct CephArgs {
    /// Ceph configuration file for an rbd: target [default: librados's search: $CEPH_CONF,
    /// /etc/ceph/ceph.conf, ~/.ceph/config, ./ceph.conf]
    #[arg(long, value_name = "PATH")]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph client id for an rbd: target, without "client." (its key comes from the keyring
    /// the configuration names)
    #[arg(long, value_name = "NAME", default_value = "admin")]
    pub ceph_id: String,
    /// Longest wait, in seconds, for the Ceph monitors when connecting and for any one Ceph
    /// operation; a cluster that does not answer turns into an error, not a hang
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ceph_timeout: u64,
    /// Where guardblk keeps this host's files about rbd: images (the PI error journal and
    /// statistics that sit beside a file image), as POOL/IMAGE.pi-journal.jsonl and so on
    #[arg(long, value_name = "DIR", default_value = crate::storage::rbd::DEFAULT_STATE_DIR)]
    pub rbd_state_dir: PathBuf,
}

impl CephArgs {
    pub fn options(&self) -> crate::storage::rbd::CephOptions {
        crate::storage::rbd::CephOptions {
            conf: self.ceph_conf.clone(),
            id: self.ceph_id.clone(),
            timeout: std::time::Duration::from_secs(self.ceph_timeout),
            state_dir: absolute(&self.rbd_state_dir),
        }
    }
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// PI-protected image (file, block device or rbd:POOL/IMAGE) to corrupt.
    pub image: PathBuf,
    /// Block to corrupt, in protection-interval units (LBA 3 with 4096-byte intervals is byte offset 12288).
    #[arg(long, value_name = "N")]
    pub lba: u64,
    /// What to corrupt: the block's data, or one field of its stored PI tuple.
    #[arg(long, value_enum)]
    pub kind: InjectKind,
    /// The image's PI metadata, if not IMAGE.pi.
    #[arg(long, value_name = "PATH")]
    pub pi_meta: Option<PathBuf>,
    #[command(flatten)]
    pub ceph: CephArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InjectKind {
    /// Flip the bits of one byte in the middle of the block's data.
    Data,
    /// Flip low bits of the stored guard tag (the checksum).
    Guard,
    /// Flip the lowest bit of the stored reference tag (the block's address).
    Ref,
    /// Flip bits of the stored application tag.
    App,
}

impl From<InjectKind> for crate::integrity::corruption::Corruption {
    fn from(kind: InjectKind) -> Self {
        use crate::integrity::corruption::Corruption;
        match kind {
            InjectKind::Data => Corruption::Data,
            InjectKind::Guard => Corruption::Guard,
            InjectKind::Ref => Corruption::Ref,
            InjectKind::App => Corruption::App,
        }
    }
}

impl std::fmt::Display for InjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InjectKind::Data => "data",
            InjectKind::Guard => "guard",
            InjectKind::Ref => "ref",
            InjectKind::App => "app",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PiChoice {
    Type1,
    Type3,
    Nvme64,
    None,
}

impl PiChoice {
    pub fn format(self) -> Option<crate::integrity::PiFormat> {
        use crate::integrity::PiFormat;
        match self {
            PiChoice::Type1 => Some(PiFormat::Type1),
            PiChoice::Type3 => Some(PiFormat::Type3),
            PiChoice::Nvme64 => Some(PiFormat::Nvme64),
            PiChoice::None => None,
        }
    }
}

/// 512 or 4096.
pub fn parse_interval(text: &str) -> Result<u32, String> {
    match text.trim() {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!(
            "'{text}' is not a protection interval; use 512 or 4096"
        )),
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CacheMode {
    /// Completion means "in the host's hands"; the guest sends flushes to make data durable.
    Writeback,
    /// Every write is made durable (fdatasync) before it completes.
    Writethrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IoEngine {
    /// io_uring where the image supports non-blocking I/O (block devices, XFS, ext4), inline
    /// otherwise (tmpfs, NFS, FUSE), where io_uring would hand every request to a kernel thread.
    Auto,
    /// Always io_uring.
    IoUring,
    /// Always perform I/O with plain system calls in the queue thread.
    Inline,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Raw disk image (file or block device) to serve, or a Ceph RBD image as rbd:POOL/IMAGE
    /// (see --ceph-conf; its PI metadata is the RBD image IMAGE.pi beside it). If omitted, ./guardblk-default.img is
    /// created if missing (8 GiB, sparse, type1 PI with 4096-byte intervals, like `create`) and
    /// served.
    pub image: Option<PathBuf>,
    /// Unix socket to listen on; QEMU connects here with -chardev socket,path=...
    #[arg(long, default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,
    /// Permissions of the socket file, in octal. Only processes that can open it can attach.
    #[arg(long, default_value = "0600", value_parser = parse_mode, value_name = "MODE")]
    pub socket_mode: u32,
    /// Number of virtqueues offered (1-64), each served by its own thread (and its own io_uring).
    /// QEMU's num-queues must not exceed this.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub queues: u16,
    /// Maximum virtqueue size (a power of two, 16-1024). QEMU's queue-size must not exceed this.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub queue_size: u16,
    /// Serve the image read-only: the guest sees a read-only disk; writes fail.
    #[arg(long)]
    pub read_only: bool,
    /// Serial number the guest reads (GET_ID), up to 20 ASCII characters.
    #[arg(long, value_name = "ID")]
    pub serial: Option<String>,
    /// Initial write-cache mode; the guest may switch it (Linux: echo "write through" > /sys/block/vdX/cache_type).
    #[arg(long, value_enum, default_value_t = CacheMode::Writeback)]
    pub cache: CacheMode,
    /// How queue threads submit I/O to the kernel.
    #[arg(long, value_enum, default_value_t = IoEngine::Auto)]
    pub io_engine: IoEngine,
    /// After a queue runs dry with nothing in flight, keep checking it for new requests for
    /// up to this many microseconds before sleeping. Under load this saves a guest
    /// notification and a wakeup per batch; an idle queue costs at most this much CPU after
    /// its last request. Polling pauses by itself while the queue thread's CPU is shared with
    /// another busy task. 0 disables polling.
    #[arg(long, default_value_t = 50, value_name = "MICROSECONDS")]
    pub poll_us: u32,
    /// PI metadata of the image (default IMAGE.pi). When it exists, every write stores guard
    /// tags and every read is verified; without it the image is served without PI.
    #[arg(long, value_name = "PATH")]
    pub pi_meta: Option<PathBuf>,
    /// When a PI write's data goes through a bounce buffer (copied, with its guard tags
    /// computed over the copy) instead of straight from guest memory. Every mode detects a
    /// guest changing a buffer while its write is in flight and repairs it before the write
    /// completes, so none of them can store a wrong guard.
    #[arg(long, value_enum, default_value_t = BounceMode::Auto)]
    pub bounce: BounceMode,
    /// With `--bounce auto`: which path writes take where the guest was not seen changing
    /// buffers. `cost` (default) picks the cheaper one per request size: bounce where the
    /// kernel copies anyway (tmpfs, FUSE, network filesystems, no O_DIRECT), and on devices
    /// that DMA straight from memory whichever measures cheaper on this CPU (at start-up on
    /// scratch memory, then from sampled writes). `zero-copy` and `bounce` fix the choice.
    #[arg(long, value_enum, default_value_t = AutoPathArg::Cost, value_name = "PATH")]
    pub auto_path: AutoPathArg,
    /// UNSAFE, only to demonstrate the problem guardblk solves: compute guard tags over guest
    /// memory, write it zero-copy, and never check whether the guest changed it in flight. A
    /// guest that does (Windows page-file writes, Linux swap) gets blocks whose guard tags do
    /// not match their data: false guard errors later. Never use it for real data.
    #[arg(long)]
    pub no_mutation_check: bool,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics (and the stats document as JSON
    /// on /stats), e.g. 127.0.0.1:9717. Off by default; `guardblk stats --socket` works
    /// without it, through SOCKET.stats.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Write the stats document (JSON: counters per queue and per session) to this file
    /// whenever a frontend connects or leaves. Default: IMAGE.pi-stats.json for a PI image
    /// (what `guardblk info` shows), none for an image without PI.
    #[arg(long, value_name = "PATH")]
    pub stats_file: Option<PathBuf>,
    #[command(flatten)]
    pub ceph: CephArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BounceMode {
    /// Zero-copy, except for guest pages and disk regions where the guest was recently seen
    /// changing a buffer in flight: those are bounced up front for a while (learned).
    Auto,
    /// Bounce every write (costs a copy; immune even to a buffer changed and changed back
    /// during the write, which the after-the-fact check cannot see).
    Always,
    /// Never bounce up front; every change in flight is detected after the write and the
    /// changed blocks are rewritten from a snapshot.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AutoPathArg {
    /// The cheaper path for this target, CPU and request size (measured).
    Cost,
    /// Zero-copy, checked after completion (mutation hot spots still bounce).
    ZeroCopy,
    /// Bounce every write.
    Bounce,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CliError {
    #[error("--queues must be between 1 and 64, not {0}")]
    Queues(u16),
    #[error("--queue-size must be a power of two between 16 and 1024, not {0}")]
    QueueSize(u16),
    #[error("--poll-us must be at most 10000 (10 ms), not {0}")]
    PollUs(u32),
    #[error("--serial must be at most {VIRTIO_BLK_ID_BYTES} printable ASCII characters")]
    Serial,
    #[error("--no-mutation-check contradicts --bounce always (bounced writes need no check)")]
    UncheckedBounce,
    #[error("--auto-path only applies to --bounce auto")]
    AutoPathWithoutAuto,
    #[error("--io-engine {0} does not apply to rbd: images, which are served through librbd")]
    RbdEngine(&'static str),
    /// A malformed `rbd:` name, in RbdError's words.
    #[error("{0}")]
    BadRbdName(String),
}

/// "8G" → 8 GiB. Suffixes K, M, G, T (optionally followed by "iB" or "B") are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 8G, 512M or 1048576"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    if bytes == 0 || bytes % 512 != 0 {
        return Err(format!("'{text}' is not a positive multiple of 512 bytes"));
    }
    Ok(bytes)
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{text}' is not an octal permission mode like 0600"))
}

impl ServeArgs {
    /// The image to serve, absolute (it is printed in the QEMU command line).
    pub fn image_path(&self) -> PathBuf {
        absolute(self.image.as_deref().unwrap_or(Path::new(DEFAULT_IMAGE)))
    }

    /// What to serve and how, validated.
    pub fn to_request(&self) -> Result<ServeRequest, CliError> {
        let rbd = self
            .image
            .as_deref()
            .and_then(|image| image.to_str())
            .and_then(|text| {
                Some(RbdSpec::parse(text)?.map_err(|e| CliError::BadRbdName(e.to_string())))
            })
            .transpose()?;
        if rbd.is_some() {
            match self.io_engine {
                IoEngine::Auto => {}
                IoEngine::IoUring => return Err(CliError::RbdEngine("io-uring")),
                IoEngine::Inline => return Err(CliError::RbdEngine("inline")),
            }
        }
        Ok(ServeRequest {
            image_path: match &rbd {
                Some(spec) => PathBuf::from(spec.to_string()),
                None => self.image_path(),
            },
            rbd,
            ceph: self.ceph.options(),
            default_image: self.image.is_none(),
            pi_meta: self.pi_meta.clone(),
            read_only: self.read_only,
            config: self.to_config()?,
        })
    }

    /// Validated daemon settings.
    pub fn to_config(&self) -> Result<ServeConfig, CliError> {
        if !(1..=64).contains(&self.queues) {
            return Err(CliError::Queues(self.queues));
        }
        if !self.queue_size.is_power_of_two() || !(16..=1024).contains(&self.queue_size) {
            return Err(CliError::QueueSize(self.queue_size));
        }
        if self.poll_us > 10_000 {
            return Err(CliError::PollUs(self.poll_us));
        }
        if self.auto_path != AutoPathArg::Cost
            && (self.bounce != BounceMode::Auto || self.no_mutation_check)
        {
            return Err(CliError::AutoPathWithoutAuto);
        }
        let serial = self.serial.clone().unwrap_or_else(|| "guardblk".into());
        if serial.len() > VIRTIO_BLK_ID_BYTES as usize
            || !serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        {
            return Err(CliError::Serial);
        }
        Ok(ServeConfig {
            socket: absolute(&self.socket),
            socket_mode: self.socket_mode,
            metrics: self.metrics,
            stats_file: self.stats_file.as_deref().map(absolute),
            device: DeviceSettings {
                num_queues: self.queues,
                queue_size: self.queue_size,
                serial,
                writeback: matches!(self.cache, CacheMode::Writeback),
                poll_window: std::time::Duration::from_micros(u64::from(self.poll_us)),
                write_policy: match (self.no_mutation_check, self.bounce) {
                    (true, BounceMode::Always) => return Err(CliError::UncheckedBounce),
                    (true, _) => WritePolicy::Unchecked,
                    (false, BounceMode::Auto) => WritePolicy::Auto,
                    (false, BounceMode::Always) => WritePolicy::Always,
                    (false, BounceMode::Never) => WritePolicy::Never,
                },
                auto_path: match self.auto_path {
                    AutoPathArg::Cost => AutoPath::Cost,
                    AutoPathArg::ZeroCopy => AutoPath::ZeroCopy,
                    AutoPathArg::Bounce => AutoPath::Bounce,
                },
                engine: match self.io_engine {
                    IoEngine::Auto => EngineChoice::Auto,
                    IoEngine::IoUring => EngineChoice::Fixed(EngineKind::IoUring),
                    IoEngine::Inline => EngineChoice::Fixed(EngineKind::Inline),
                },
            },
        })
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The QEMU options that attach a guest to this daemon.
pub fn qemu_command_line(config: &ServeConfig) -> String {
    format!(
        "qemu-system-x86_64 -machine q35 -m 1G \\\n  \
         -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n  \
         -chardev socket,id=disk0,path={},reconnect=1 \\\n  \
         -device vhost-user-blk-pci,chardev=disk0,num-queues={},queue-size={} \\\n  \
         ... (your kernel/disk/network options)",
        config.socket.display(),
        config.device.num_queues,
        config.device.queue_size.min(1024),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1000").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("eight").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("660"), Ok(0o660));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("01777").is_err());
    }

    #[test]
    fn serve_arguments_are_validated() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Serve(s) => s.to_config(),
            _ => unreachable!(),
        };
        assert!(parse(&["guardblk", "serve"]).is_ok());
        assert_eq!(
            parse(&["guardblk", "serve", "--queues", "0"]).unwrap_err(),
            CliError::Queues(0)
        );
        assert_eq!(
            parse(&["guardblk", "serve", "--queue-size", "100"]).unwrap_err(),
            CliError::QueueSize(100)
        );
        assert_eq!(
            parse(&["guardblk", "serve", "--serial", "x".repeat(21).as_str()]).unwrap_err(),
            CliError::Serial
        );
        let ok = parse(&[
            "guardblk",
            "serve",
            "--queues",
            "2",
            "--cache",
            "writethrough",
            "--serial",
            "abc",
        ])
        .unwrap();
        assert_eq!(ok.device.num_queues, 2);
        assert!(!ok.device.writeback);
        assert_eq!(ok.device.serial, "abc");
        assert_eq!(ok.device.engine, EngineChoice::Auto);
        let inline = parse(&["guardblk", "serve", "--io-engine", "inline"]).unwrap();
        assert_eq!(
            inline.device.engine,
            EngineChoice::Fixed(EngineKind::Inline)
        );
    }

    #[test]
    fn auto_path_only_with_bounce_auto() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Serve(s) => s.to_config(),
            _ => unreachable!(),
        };
        let ok = parse(&["guardblk", "serve", "--auto-path", "zero-copy"]).unwrap();
        assert_eq!(ok.device.auto_path, AutoPath::ZeroCopy);
        assert_eq!(
            parse(&["guardblk", "serve"]).unwrap().device.auto_path,
            AutoPath::Cost
        );
        for other in [
            &["--bounce", "never"][..],
            &["--bounce", "always"],
            &["--no-mutation-check"],
        ] {
            let mut args = vec!["guardblk", "serve", "--auto-path", "bounce"];
            args.extend_from_slice(other);
            assert_eq!(parse(&args).unwrap_err(), CliError::AutoPathWithoutAuto);
        }
    }

    #[test]
    fn help_is_consistent() {
        Cli::command().debug_assert();
    }
}
