//! Queue-loop tests that need no frontend: a `BlkBackend` over a scratch raw image, one
//! vring in anonymous guest memory, and its queue event delivered by hand, as the queue's
//! worker thread would.

use std::sync::mpsc;

use vhost_user_backend::VringT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::requests::policy::{Calibration, Target};
use crate::storage::{EngineChoice, EngineKind};

const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x1200;
const USED_RING: u64 = 0x1400;

/// A one-queue device (session `session`) over a fresh 1 MiB image, with EVENT_IDX on and
/// 64 KiB of guest memory holding a ready ring; the tempdir holds the image.
fn device(session: u64, ledger: Arc<DeviceLedger>) -> (BlkBackend, Vring, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    Image::create(&path, 1 << 20).unwrap();
    let image = Arc::new(Image::open(&path, false).unwrap());
    let settings = DeviceSettings {
        num_queues: 1,
        queue_size: QUEUE_SIZE,
        serial: "test".into(),
        writeback: true,
        engine: EngineChoice::Fixed(EngineKind::Inline),
        poll_window: Duration::ZERO,
        write_policy: WritePolicy::Auto,
        auto_path: AutoPath::Cost,
    };
    let basis = CostBasis {
        target: Target::Dma,
        auto_path: AutoPath::Cost,
        calibration: Calibration::default(),
    };
    let tracker = Arc::new(MutationTracker::new(1 << 20, Duration::from_secs(30)));
    let backend = BlkBackend::new(
        session,
        ledger,
        image,
        None,
        &tracker,
        &settings,
        &basis,
        &[Arc::new(QueueCounters::default())],
    )
    .unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    backend.memory().lock().unwrap().replace(mem);
    backend.set_event_idx(true);
    let vring = Vring::new(backend.memory(), QUEUE_SIZE).unwrap();
    vring.set_queue_size(QUEUE_SIZE);
    vring
        .set_queue_info(DESC_TABLE, AVAIL_RING, USED_RING)
        .unwrap();
    vring.set_queue_event_idx(true);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    (backend, vring, dir)
}

/// The guest's avail index (the ring's second u16).
fn set_avail_idx(backend: &BlkBackend, idx: u16) {
    backend
        .memory()
        .memory()
        .write_obj(idx, GuestAddress(AVAIL_RING + 2))
        .unwrap();
}

/// Deliver queue 0's kick on a thread of its own: does the event come back within 5 s?
/// (A thread that does not is left spinning: that is the failure.)
fn event_returns(backend: &BlkBackend, vring: &Vring) -> bool {
    let (done, returned) = mpsc::channel();
    let (backend, vring) = (backend.clone(), vring.clone());
    std::thread::spawn(move || {
        let _ = backend.handle_event(0, EventSet::IN, &[vring], 0);
        let _ = done.send(());
    });
    returned.recv_timeout(Duration::from_secs(5)).is_ok()
}

/// An avail index more than a ring ahead of the device's (a guest's bug, or a hostile
/// one): virtio-queue pops nothing, while re-arming notifications keeps seeing entries.
/// The queue thread spun on that forever, holding the queue lock, so the frontend's
/// GET_VRING_BASE and the session's end hung behind it (found by the vhost_messages target).
#[test]
fn an_avail_index_past_the_ring_does_not_spin_the_queue_thread() {
    let (backend, vring, _dir) = device(1, Arc::new(DeviceLedger::default()));
    set_avail_idx(&backend, QUEUE_SIZE + 1);
    assert!(event_returns(&backend, &vring), "the queue thread spins");
    // And the queue is usable again once the guest's index makes sense.
    set_avail_idx(&backend, 0);
    assert!(event_returns(&backend, &vring));
}

/// The same ring on a device refused the image (another session's guest holds it): the
/// refusal loop re-armed and looked again forever.
#[test]
fn an_avail_index_past_the_ring_does_not_spin_a_refused_queue() {
    let ledger = Arc::new(DeviceLedger::default());
    assert_eq!(ledger.claim(1, || {}), Claim::Granted);
    let (backend, vring, _dir) = device(2, ledger);
    set_avail_idx(&backend, QUEUE_SIZE + 1);
    assert!(
        event_returns(&backend, &vring),
        "the refusing queue thread spins"
    );
}
