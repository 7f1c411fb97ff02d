//! Entry points for the fuzz targets in `fuzz/` (built only with `--cfg fuzzing`, which
//! cargo-fuzz sets), so the targets reach the crate's internals without making them public.
//! Each takes the fuzzer's bytes, feeds them to one reader of untrusted input, and checks
//! what must hold whatever the input: no panic, nothing outside what was given, and the
//! answers a guest may see are among the allowed ones. See fuzz/README.md.

use std::io::Write;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::integrity::header::Header;
use crate::integrity::journal::Journal;
use crate::protocol::inflight::{ChainWalk, InflightRegion};
use crate::requests::mutation::{MutationTracker, SavedMarks};
use crate::requests::parse::{parse_request, RequestKind, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
use crate::requests::Limits;

mod vhost_frontend;

/// Guest memory of the descriptor-chain target, and where its ring lives.
const GUEST_MEM: usize = 0x4000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;

fn limits() -> Limits {
    Limits {
        capacity_sectors: 1 << 20,
        block_size: 4096,
        max_segments: u32::from(QUEUE_SIZE) - 2,
        max_transfer_bytes: 1 << 20,
        max_discard_segments: 32,
        max_discard_sectors: 1 << 22,
        max_write_zeroes_segments: 32,
        max_write_zeroes_sectors: 1 << 22,
        read_only: false,
    }
}

fn inside(addr: GuestAddress, len: u64) -> bool {
    addr.0
        .checked_add(len)
        .is_some_and(|end| end <= GUEST_MEM as u64)
}

/// The fuzzer's bytes as guest memory: the input from address 0, zeros after it (what an
/// earlier input left there must not leak into this run).
fn load_guest(mem: &GuestMemoryMmap, data: &[u8]) {
    static ZEROS: [u8; GUEST_MEM] = [0; GUEST_MEM];
    let n = data.len().min(GUEST_MEM);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("inside guest memory");
    mem.write_slice(&ZEROS[n..], GuestAddress(n as u64))
        .expect("inside guest memory");
}

/// A ready split queue whose table and rings sit where the fuzzer's input puts them.
fn ring() -> Queue {
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    queue
}

/// Target `descriptor_chains`: the fuzzer writes guest memory (16 KiB) (descriptor table,
/// avail ring, indirect tables, headers, discard segments); every chain the queue pops goes
/// through the parser (and the in-flight recovery's own chain walker). Whatever it accepts
/// must lie inside guest memory; whatever it refuses gets IOERR or UNSUPP.
pub fn descriptor_chains(data: &[u8]) {
    thread_local! {
        // One mapping reused across runs (mapping 64 KiB per input cost most of each run).
        static MEM: GuestMemoryMmap =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEM)])
                .expect("guest memory");
    }
    MEM.with(|mem| descriptor_chains_in(mem, data));
}

fn descriptor_chains_in(mem: &GuestMemoryMmap, data: &[u8]) {
    load_guest(mem, data);
    let mut queue = ring();
    let limits = limits();
    for _ in 0..QUEUE_SIZE {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        match parse_request(head, chain, mem, &limits) {
            Ok(request) => {
                assert!(inside(request.status, 1), "status byte outside memory");
                let ranges = match &request.kind {
                    RequestKind::Read { data, .. } | RequestKind::Write { data, .. } => {
                        data.as_slice()
                    }
                    RequestKind::GetId { buffer, .. } => buffer.as_slice(),
                    _ => &[],
                };
                for r in ranges {
                    assert!(
                        inside(r.addr, u64::from(r.len)),
                        "data range outside memory"
                    );
                }
            }
            Err(rejected) => {
                let status = rejected.error.status();
                assert!(status == VIRTIO_BLK_S_IOERR || status == VIRTIO_BLK_S_UNSUPP);
                if let Some(addr) = rejected.status {
                    assert!(inside(addr, 1), "refusal's status byte outside memory");
                }
            }
        }
        // The recovery walker sees the same table: bounded, inside memory.
        let walked = ChainWalk::new(mem, DESC_TABLE, QUEUE_SIZE, head).count();
        assert!(walked <= usize::from(QUEUE_SIZE) + 0xffff);
    }
}

/// Target `request_path`: the same guest memory and ring as `descriptor_chains`, but every
/// popped chain is executed — parse, PI planning and verification, I/O through the inline
/// engine against a 1 MiB type-1 PI image that persists across runs. Each chain must be
/// answered exactly once, with nothing left in flight, whatever it asked for.
pub fn request_path(data: &[u8]) {
    thread_local! {
        static RIG: std::cell::RefCell<RequestRig> = std::cell::RefCell::new(RequestRig::new());
    }
    RIG.with(|rig| rig.borrow_mut().run(data));
}

struct RequestRig {
    _dir: std::path::PathBuf,
    executor: crate::requests::Executor,
    mem: std::sync::Arc<GuestMemoryMmap>,
}

impl RequestRig {
    fn new() -> RequestRig {
        use crate::requests::policy::{AutoPath, Calibration, CostBasis, Target, WriteCosts};
        use crate::requests::{Protection, QueueCounters, WritePolicy};
        use crate::storage::EngineKind;
        use std::sync::Arc;
        let dir = std::env::temp_dir().join(format!("guardblk-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("rig directory");
        let (image, store) = scratch_pi_image(&dir, 1 << 20);
        let basis = CostBasis {
            target: Target::Dma,
            auto_path: AutoPath::Cost,
            calibration: Calibration::default(),
        };
        let mut limits = limits();
        limits.capacity_sectors = (1 << 20) / 512;
        let executor = crate::requests::Executor::new(
            Arc::clone(&image),
            limits,
            "fuzz",
            QUEUE_SIZE,
            Arc::new(QueueCounters::default()),
            EngineKind::Inline,
            Protection {
                pi: Some(store),
                policy: WritePolicy::Auto,
                tracker: Arc::new(MutationTracker::new(1 << 20, Duration::from_secs(10))),
                costs: WriteCosts::new(&basis),
            },
        )
        .expect("executor");
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEM)])
                .expect("guest memory"),
        );
        RequestRig {
            _dir: dir,
            executor,
            mem,
        }
    }

    fn run(&mut self, data: &[u8]) {
        let mem = &self.mem;
        load_guest(mem, data);
        let mut queue = ring();
        let mut heads = Vec::new();
        let mut done = Vec::new();
        for _ in 0..QUEUE_SIZE {
            let Some(chain) = queue.pop_descriptor_chain(&**mem) else {
                break;
            };
            heads.push(chain.head_index());
            self.executor.start(
                chain.head_index(),
                chain,
                mem,
                data.len().is_multiple_of(2),
                &mut done,
            );
        }
        self.executor.drain(&mut done);
        assert_eq!(self.executor.in_flight(), 0, "requests left in flight");
        let mut answered: Vec<u16> = done.iter().map(|e| e.head).collect();
        answered.sort_unstable();
        heads.sort_unstable();
        assert_eq!(answered, heads, "every chain answered exactly once");
    }
}

/// A fresh `bytes`-long raw image in `dir` with type-1 PI metadata (4 KiB intervals)
/// beside it, opened as `serve` opens one.
fn scratch_pi_image(
    dir: &std::path::Path,
    bytes: u64,
) -> (
    std::sync::Arc<crate::storage::Image>,
    std::sync::Arc<crate::integrity::PiStore>,
) {
    use crate::integrity::header::DataIdentity;
    use crate::storage::Image;
    use std::sync::Arc;
    let path = dir.join("disk.img");
    Image::create(&path, bytes).expect("image");
    let image = Arc::new(Image::open(&path, false).expect("open image"));
    let identity = DataIdentity::of(&path, image.size()).expect("identity");
    let meta = crate::integrity::metadata::default_path(&path);
    crate::integrity::PiMetadata::create(
        &meta,
        &Header::new(crate::integrity::PiFormat::Type1, 4096, identity),
    )
    .expect("metadata");
    let store = Arc::new(
        crate::integrity::PiStore::open_beside(&image, None, true)
            .expect("PI store")
            .0,
    );
    (image, store)
}

/// Target `vhost_messages`: the vhost-user message stream a frontend sends — memory tables,
/// vring sizes, addresses, bases and eventfds, config-space reads and writes at any offset
/// and length, features and protocol features in any order, headers that lie — decoded from
/// the fuzzer's bytes and sent over a Unix socket to a real session (`BlkBackend` inside
/// vhost-user-backend's handler and queue threads, over a PI image kept across runs), one
/// session per input, ended as the daemon ends one. No panic or hang; every reply
/// well-formed and answering its request; GET_CONFIG never more than asked, echoing offset
/// and size; feature words 8 bytes; GET_QUEUE_NUM within the device's queues; nothing sent
/// that was not asked for. See vhost_frontend.rs for the input format.
pub fn vhost_messages(data: &[u8]) {
    thread_local! {
        static RIG: std::cell::RefCell<vhost_frontend::VhostRig> =
            std::cell::RefCell::new(vhost_frontend::VhostRig::new());
    }
    RIG.with(|rig| rig.borrow_mut().run(data));
}

/// Target `metadata_header`: the first page of a metadata file. A header that decodes must
/// encode back to itself.
pub fn metadata_header(data: &[u8]) {
    if let Ok(header) = Header::decode(data, std::path::Path::new("fuzz.pi")) {
        let again = Header::decode(&header.encode(), std::path::Path::new("fuzz.pi"))
            .expect("an encoded header decodes");
        assert_eq!(again.encode(), header.encode());
        let _ = (header.file_len(), header.regions(), header.tuples_offset());
    }
}

/// Target `saved_state`: the files a restarted daemon reads back — the error journal, the
/// mutation marks, an in-flight region handed over by a frontend — from arbitrary bytes.
pub fn saved_state(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("guardblk-fuzz-journal-{}", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(data))
        .expect("write the journal");
    let _ = Journal::read(&path);

    if let Ok(saved) = serde_json::from_slice::<SavedMarks>(data) {
        let tracker = MutationTracker::new(64 << 20, Duration::from_secs(30));
        let _ = tracker.restore(&saved, 1_700_000_000);
        let _ = tracker.save(1_700_000_000);
    }

    // A one-queue region of 16 descriptors with the fuzzer's bytes as its contents (one memfd
    // for every run; mapping it is part of what is tested).
    thread_local! {
        static MEMFD: std::fs::File = InflightRegion::create(1, QUEUE_SIZE).expect("region").1;
    }
    MEMFD.with(|memfd| inflight_region(memfd, data));
}

fn inflight_region(memfd: &std::fs::File, data: &[u8]) {
    let len = memfd.metadata().expect("size").len() as usize;
    let mut contents = data.to_vec();
    contents.resize(len, 0);
    std::os::unix::fs::FileExt::write_all_at(memfd, &contents, 0).expect("write region");
    let region = InflightRegion::map(memfd, 0, len as u64, 1, QUEUE_SIZE).expect("map");
    let queue = region.queue(0).expect("queue 0");
    let used = data.first().map_or(0, |&b| u16::from(b));
    if let Ok(recovery) = queue.recover(used, QUEUE_SIZE) {
        assert!(recovery.resubmit.iter().all(|&h| h < QUEUE_SIZE));
        assert!(recovery.resubmit.len() <= usize::from(QUEUE_SIZE));
    }
}

/// Seed inputs for each target, built with the same code the unit tests exercise: well-formed
/// inputs the fuzzer then mutates. The unit test below checks them and, with
/// `GUARDBLK_WRITE_FUZZ_SEEDS=DIR`, writes them to `DIR/TARGET/seed-NAME` (test.sh does, for
/// fuzz/corpus).
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    // descriptor_chains: a ring with one chain of each request type, direct and indirect.
    let kinds: [(u32, u32, bool); 6] = [
        (0, 4096, true),  // read
        (1, 8192, false), // write
        (4, 0, false),    // flush
        (8, 20, true),    // get id
        (11, 16, false),  // discard: one segment
        (13, 16, false),  // write zeroes
    ];
    for (i, &(kind, len, writable)) in kinds.iter().enumerate() {
        for indirect in [false, true] {
            let mut mem = vec![0u8; GUEST_MEM];
            let put = |mem: &mut Vec<u8>, at: usize, bytes: &[u8]| {
                mem[at..at + bytes.len()].copy_from_slice(bytes)
            };
            let desc = |addr: u64, len: u32, flags: u16, next: u16| {
                let mut d = Vec::with_capacity(16);
                d.extend_from_slice(&addr.to_le_bytes());
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&flags.to_le_bytes());
                d.extend_from_slice(&next.to_le_bytes());
                d
            };
            // Header at 0x1000 (type, reserved, sector 8), data at 0x2000, status at 0x3000.
            put(&mut mem, 0x1000, &kind.to_le_bytes());
            put(&mut mem, 0x1008, &8u64.to_le_bytes());
            if kind == 11 || kind == 13 {
                put(&mut mem, 0x2000, &16u64.to_le_bytes()); // segment: sector 16, 8 sectors
                put(&mut mem, 0x2008, &8u32.to_le_bytes());
            }
            let mut chain = vec![desc(0x1000, 16, 1, 1)];
            if len > 0 {
                chain.push(desc(0x2000, len, 1 | if writable { 2 } else { 0 }, 2));
            }
            let last = chain.len() as u16;
            chain.last_mut().unwrap()[14..16].copy_from_slice(&last.to_le_bytes());
            chain.push(desc(0x3000, 1, 2, 0));
            if indirect {
                // The table at 0x3800; descriptor 0 points at it.
                let table: Vec<u8> = chain.concat();
                put(&mut mem, 0x3800, &table);
                put(&mut mem, 0, &desc(0x3800, table.len() as u32, 4, 0));
            } else {
                put(&mut mem, 0, &chain.concat());
            }
            // Avail ring: flags 0, idx 1, ring[0] = head 0.
            put(&mut mem, AVAIL_RING as usize + 2, &1u16.to_le_bytes());
            let name = format!(
                "type{kind}-{}",
                if indirect { "indirect" } else { "direct" }
            );
            out.push(("request_path", name.clone(), mem.clone()));
            out.push(("descriptor_chains", name, mem));
        }
        let _ = i;
    }
    // metadata_header: a fresh header for each format.
    for format in [
        crate::integrity::PiFormat::Type1,
        crate::integrity::PiFormat::Type3,
        crate::integrity::PiFormat::Nvme64,
    ] {
        let data = crate::integrity::header::DataIdentity {
            path: "/srv/disk.img".into(),
            size: 1 << 30,
            device: 0x803,
            inode: 12,
        };
        let header = Header::new(format, 4096, data);
        out.push(("metadata_header", format!("{format}"), header.encode()));
    }
    // saved_state: a journal, saved marks, an in-flight region with requests in it.
    let record = crate::integrity::journal::Record::now(
        crate::integrity::journal::Event::GuardError,
        42,
        4096,
        "read",
    );
    let mut journal = serde_json::to_string(&record).expect("record") + "\n";
    journal.push_str("{\"time\":\"2026");
    out.push(("saved_state", "journal".into(), journal.into_bytes()));
    let tracker = MutationTracker::new(1 << 30, Duration::from_secs(30));
    out.push((
        "saved_state",
        "marks".into(),
        serde_json::to_vec(&tracker.save(1_700_000_000)).expect("marks"),
    ));
    let (region, memfd) = InflightRegion::create(1, QUEUE_SIZE).expect("region");
    let queue = region.queue(0).expect("queue 0");
    let _ = queue.recover(0, QUEUE_SIZE);
    for (counter, head) in [(0u64, 3u16), (1, 7), (2, 1)] {
        queue.mark_popped(head, counter);
    }
    queue.before_used(7);
    queue.after_used(7, 1);
    let len = memfd.metadata().expect("size").len() as usize;
    let mut bytes = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&memfd, &mut bytes, 0).expect("read region");
    out.push(("saved_state", "inflight".into(), bytes));
    // vhost_messages: QEMU's handshake and device start, then the edge cases.
    for (name, script) in vhost_frontend::seeds() {
        out.push(("vhost_messages", name, script));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every seed is an input its target takes without a finding, and the descriptor-chain
    /// seeds are requests the parser accepts (so the fuzzer starts from the accepted paths).
    #[test]
    fn fuzz_seeds_are_valid_inputs_for_their_targets() {
        let seeds = seeds();
        for (target, name, bytes) in &seeds {
            match *target {
                "descriptor_chains" => {
                    descriptor_chains(bytes);
                    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEM)])
                        .unwrap();
                    mem.write_slice(bytes, GuestAddress(0)).unwrap();
                    let mut queue = ring();
                    let chain = queue.pop_descriptor_chain(&mem).expect("a chain");
                    let head = chain.head_index();
                    let parsed = parse_request(head, chain, &mem, &limits());
                    assert!(parsed.is_ok(), "seed {name} refused: {parsed:?}");
                }
                "metadata_header" => {
                    metadata_header(bytes);
                    assert!(
                        Header::decode(bytes, std::path::Path::new("x")).is_ok(),
                        "{name}"
                    );
                }
                "saved_state" => saved_state(bytes),
                "request_path" => request_path(bytes),
                "vhost_messages" => vhost_messages(bytes),
                other => panic!("seed for unknown target {other}"),
            }
        }
        assert!(seeds.len() >= 15);
        if let Some(dir) = std::env::var_os("GUARDBLK_WRITE_FUZZ_SEEDS") {
            for (target, name, bytes) in seeds {
                let dir = std::path::Path::new(&dir).join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
            }
        }
    }
}
