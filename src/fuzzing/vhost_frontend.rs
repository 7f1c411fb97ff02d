//! The `vhost_messages` target's scripted frontend: the fuzzer's bytes become a stream of
//! vhost-user messages — memory tables, vring sizes, addresses, bases and eventfds,
//! config-space reads and writes at any offset and length, virtio and protocol features in
//! any order, any request code, header flags and sizes that lie — sent over a real Unix
//! socket to a real session: guardblk's `BlkBackend` inside vhost-user-backend's request
//! handler and queue threads, started and ended the way the daemon does it (daemon.rs
//! `start_session` / `finish_session`), over a 1 MiB type-1 PI image kept across runs.
//!
//! Owns the input format (the decoder the fuzzer feeds, and [`Script`], the encoder the
//! seeds are written with), the model of when the handler answers, and the checks on every
//! answer. Must not reach into the backend: everything goes through the socket, as QEMU's
//! messages do.
//!
//! Whatever the input: no panic, no hang (every expected answer comes within
//! [`REPLY_TIMEOUT`] or the backend closes the connection, which is how it refuses a
//! message), every reply is well-formed and answers the request it follows, nothing arrives
//! that was not asked for, and the session's threads end with the input.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfig, VhostUserHeaderFlag, VhostUserInflight,
    VhostUserProtocolFeatures, VhostUserU64, VhostUserVirtioFeatures, VhostUserVringState,
    MAX_MSG_SIZE,
};
use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::integrity::PiStore;
use crate::protocol::config_space::WCE_OFFSET;
use crate::protocol::handover::DeviceLedger;
use crate::protocol::inflight::queue_region_bytes;
use crate::protocol::{features, BlkBackend, DeviceSettings};
use crate::requests::mutation::MutationTracker;
use crate::requests::policy::{AutoPath, Calibration, CostBasis, Target};
use crate::requests::{QueueCounters, WritePolicy};
use crate::storage::{EngineChoice, EngineKind, Image};

/// The device the frontend talks to: two queues of at most 16 descriptors. (Each session
/// fills a 64 KiB bounce chunk per descriptor, at least 16, per queue before its first
/// message: a larger queue costs every run its memset.)
pub(super) const NUM_QUEUES: u16 = 2;
pub(super) const QUEUE_SIZE: u16 = 16;
const PAGE: u64 = 4096;
/// The guest's RAM: one memfd of 8 pages, made once and zeroed before every input.
pub(super) const GUEST_LEN: u64 = 8 * PAGE;
/// Where the frontend process "has" guest memory mapped. Vring addresses are frontend
/// virtual addresses (SET_VRING_ADDR), translated through the memory table's user_addr.
pub(super) const USER_BASE: u64 = 0x7f00_0000_0000;
/// Longest wait for an answer the handler owes. Far above any message's handling time (an
/// inline-engine drain at GET_VRING_BASE included): running out means a hang.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_LEN: usize = 12;
/// Header flags of a well-formed request: protocol version 1.
const VERSION_1: u32 = 1;
/// The image's capacity, as GET_CONFIG must report it (1 MiB in 512-byte sectors).
const IMAGE_BYTES: u64 = 1 << 20;

/// Step selectors (the first byte of each step). Below [`OP_WRITE_GUEST`], the byte itself
/// picks the request code (modulo 48: every known code, 0 and a few past the last).
const OP_WRITE_GUEST: u8 = 0xf0;
const OP_KICK: u8 = 0xf1;
const OP_ANY_CODE: u8 = 0xff;
const CODES: u8 = 48;

/// A message's shape byte (after the selector): how it departs from a well-formed one.
pub(super) const NEED_REPLY: u8 = 1;
/// The header's flags word is read from the input (any version, reserved bits, REPLY).
pub(super) const RAW_FLAGS: u8 = 2;
/// The header's size field disagrees with the body sent; the stream is out of step after
/// it, so it is the input's last message.
pub(super) const WRONG_SIZE: u8 = 4;
/// Attach file descriptors to a message that takes none, or none to one that takes some.
pub(super) const FLIP_FDS: u8 = 8;
/// The body is raw bytes from the input instead of the request's structure.
pub(super) const RAW_BODY: u8 = 16;

/// A field selector byte that means "the exact value follows" (how [`Script`] writes every
/// field); any other selector picks among the values a field's edge cases need.
const EXACT: u8 = 0xff;

/// Reads the fuzzer's bytes, with zeros once they run out (so any prefix decodes).
struct Cursor<'a> {
    data: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.at >= self.data.len()
    }

    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.u8())
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    /// A field: the exact value after [`EXACT`], else `pick(selector, self)`.
    fn field<T>(&mut self, exact: fn(&mut Self) -> T, pick: impl FnOnce(u8, &mut Self) -> T) -> T {
        match self.u8() {
            EXACT => exact(self),
            selector => pick(selector, self),
        }
    }
}

/// The virtio features the device offers (what GET_FEATURES answers).
fn offered_features() -> u64 {
    features::device_features(false)
}

/// The protocol features GET_PROTOCOL_FEATURES answers (the handler adds REPLY_ACK).
fn offered_protocol_features() -> u64 {
    (features::protocol_features() | VhostUserProtocolFeatures::REPLY_ACK).bits()
}

/// Feature words: the offer, a subset of it, one bit more or one less.
fn features_field(c: &mut Cursor, offered: u64) -> u64 {
    c.field(Cursor::u64, |s, c| match s % 4 {
        0 => offered,
        1 => offered & c.u64(),
        2 => offered | 1 << (c.u8() % 64),
        _ => offered & !(1 << (c.u8() % 64)),
    })
}

/// A queue index: mostly 0..NUM_QUEUES + 2 (two past the last).
fn queue_index(c: &mut Cursor) -> u32 {
    c.field(Cursor::u32, |s, _| {
        u32::from(s) % (u32::from(NUM_QUEUES) + 2)
    })
}

/// SET_VRING_NUM: the maximum, a power of two (up to 2048), zero, or a small odd size.
fn vring_num(c: &mut Cursor) -> u32 {
    c.field(Cursor::u32, |s, c| match s % 4 {
        0 => u32::from(QUEUE_SIZE),
        1 => 1 << (c.u8() % 12),
        2 => 0,
        _ => u32::from(c.u8()),
    })
}

/// A memory region: guest address, size (up to twice the memfd), frontend address (where
/// QEMU would have it: USER_BASE + guest address, or elsewhere) and offset into the memfd.
fn region_field(c: &mut Cursor) -> [u64; 4] {
    let guest = c.field(Cursor::u64, |s, c| match s % 3 {
        0 => 0,
        1 => u64::from(c.u8() % 32) * PAGE,
        _ => (1 << 32) + u64::from(c.u8()) * PAGE,
    });
    let size = c.field(Cursor::u64, |s, c| match s % 3 {
        0 => GUEST_LEN,
        1 => u64::from(c.u8() % 16 + 1) * PAGE,
        _ => 0,
    });
    let user = c.field(Cursor::u64, |s, c| match s % 2 {
        0 => USER_BASE.wrapping_add(guest),
        _ => USER_BASE + u64::from(c.u8() % 32) * PAGE,
    });
    let offset = c.field(Cursor::u64, |s, c| match s % 3 {
        0 => 0,
        1 => u64::from(c.u8() % 8) * PAGE,
        _ => u64::from(c.u8()),
    });
    [guest, size, user, offset]
}

/// A vring address in the frontend's space: inside the first 64 KiB above USER_BASE,
/// aligned for any ring part, or not aligned at all.
fn ring_address(c: &mut Cursor) -> u64 {
    c.field(Cursor::u64, |s, c| match s % 2 {
        0 => USER_BASE + u64::from(c.u16() & !0xf),
        _ => USER_BASE + u64::from(c.u16()),
    })
}

/// GET/SET_CONFIG offset: 0, anywhere in the first 256 bytes, the WCE byte, or near the
/// end of the 4 KiB the protocol allows (so offset + size may pass it).
fn config_offset(c: &mut Cursor) -> u32 {
    c.field(Cursor::u32, |s, c| match s % 4 {
        0 => 0,
        1 => u32::from(c.u8()),
        2 => WCE_OFFSET as u32,
        _ => 4096 - u32::from(c.u8()),
    })
}

/// GET/SET_CONFIG size: QEMU's 60, small, zero, more than 256, one.
fn config_size(c: &mut Cursor) -> u32 {
    c.field(Cursor::u32, |s, c| match s % 5 {
        0 => 60,
        1 => u32::from(c.u8()),
        2 => 0,
        3 => 257 + u32::from(c.u8()),
        _ => 1,
    })
}

/// Sizes of a shared area handed over (dirty log, in-flight region): the memfd, a few
/// pages, zero.
fn area_size(c: &mut Cursor) -> u64 {
    c.field(Cursor::u64, |s, c| match s % 3 {
        0 => GUEST_LEN,
        1 => u64::from(c.u8() % 16) * PAGE + u64::from(c.u8() % 2) * 64,
        _ => 0,
    })
}

fn area_offset(c: &mut Cursor) -> u64 {
    c.field(Cursor::u64, |s, c| match s % 3 {
        0 => 0,
        1 => u64::from(c.u8() % 8) * PAGE,
        _ => u64::from(c.u8()),
    })
}

/// In-flight region geometry: the device's, small, zero.
fn small_u16(c: &mut Cursor, device: u16) -> u16 {
    c.field(Cursor::u16, |s, c| match s % 3 {
        0 => device,
        1 => u16::from(c.u8()),
        _ => 0,
    })
}

/// What a message carries in SCM_RIGHTS.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attach {
    Nothing,
    /// The guest memfd, this many times (one per memory region).
    GuestMemory(usize),
    /// A fresh eventfd (kept by the frontend when it is a queue's kick).
    Eventfd,
    /// The in-flight region from the last GET_INFLIGHT_FD answer (else the guest memfd).
    Inflight,
}

struct Message {
    code: u32,
    flags: u32,
    /// The header's size field: the body's length unless the input says otherwise.
    size: u32,
    body: Vec<u8>,
    attach: Attach,
}

enum Step {
    Send(Message),
    /// Write bytes into guest memory (rings, descriptors, requests for the queue threads).
    WriteGuest {
        offset: u64,
        bytes: Vec<u8>,
    },
    /// Signal a queue's kick eventfd, as the guest's notification would.
    Kick(u16),
}

fn le_body(words: &[&[u8]]) -> Vec<u8> {
    words.concat()
}

fn region_bytes([guest, size, user, offset]: [u64; 4]) -> Vec<u8> {
    le_body(&[
        &guest.to_le_bytes(),
        &size.to_le_bytes(),
        &user.to_le_bytes(),
        &offset.to_le_bytes(),
    ])
}

fn vring_state_bytes(index: u32, num: u32) -> Vec<u8> {
    le_body(&[&index.to_le_bytes(), &num.to_le_bytes()])
}

/// The request's structured body and what it carries, fields in the order [`Script`]
/// writes them.
fn structured_body(c: &mut Cursor, code: u32) -> (Vec<u8>, Attach) {
    use FrontendReq as R;
    let Ok(request) = FrontendReq::try_from(code) else {
        return (raw_body(c), Attach::Nothing);
    };
    match request {
        R::GET_FEATURES
        | R::GET_PROTOCOL_FEATURES
        | R::SET_OWNER
        | R::RESET_OWNER
        | R::RESET_DEVICE
        | R::GET_QUEUE_NUM
        | R::GET_MAX_MEM_SLOTS
        | R::CHECK_DEVICE_STATE
        | R::GET_SHMEM_CONFIG => (Vec::new(), Attach::Nothing),
        R::SET_FEATURES => (
            features_field(c, offered_features()).to_le_bytes().to_vec(),
            Attach::Nothing,
        ),
        R::SET_PROTOCOL_FEATURES => (
            features_field(c, offered_protocol_features())
                .to_le_bytes()
                .to_vec(),
            Attach::Nothing,
        ),
        R::SET_MEM_TABLE => {
            // 0..=10 regions: none and more than QEMU's 8 included.
            let count = c.field(Cursor::u32, |s, _| u32::from(s % 11));
            let mut body = le_body(&[&count.to_le_bytes(), &0u32.to_le_bytes()]);
            let regions = count.min(32);
            for _ in 0..regions {
                body.extend(region_bytes(region_field(c)));
            }
            (body, Attach::GuestMemory(regions as usize))
        }
        R::ADD_MEM_REG | R::REM_MEM_REG => {
            let mut body = 0u64.to_le_bytes().to_vec(); // padding
            body.extend(region_bytes(region_field(c)));
            let attach = if request == R::ADD_MEM_REG {
                Attach::GuestMemory(1)
            } else {
                Attach::Nothing
            };
            (body, attach)
        }
        R::SET_VRING_NUM => {
            let index = queue_index(c);
            (vring_state_bytes(index, vring_num(c)), Attach::Nothing)
        }
        R::SET_VRING_BASE | R::GET_VRING_BASE => {
            let index = queue_index(c);
            let base = c.field(Cursor::u32, |s, _| u32::from(s));
            (vring_state_bytes(index, base), Attach::Nothing)
        }
        R::SET_VRING_ENABLE => {
            let index = queue_index(c);
            let enable = c.field(Cursor::u32, |s, _| u32::from(s % 3));
            (vring_state_bytes(index, enable), Attach::Nothing)
        }
        R::SET_VRING_ADDR => {
            let index = queue_index(c);
            let flags = c.field(Cursor::u32, |s, _| u32::from(s % 2)); // VHOST_VRING_F_LOG
            let [desc, used, avail, log] = std::array::from_fn(|_| ring_address(c));
            let body = le_body(&[
                &index.to_le_bytes(),
                &flags.to_le_bytes(),
                &desc.to_le_bytes(),
                &used.to_le_bytes(),
                &avail.to_le_bytes(),
                &log.to_le_bytes(),
            ]);
            (body, Attach::Nothing)
        }
        R::SET_VRING_KICK | R::SET_VRING_CALL | R::SET_VRING_ERR => {
            // Bits 0-7 the queue, bit 8 "no fd" (then none is attached).
            let value = c.field(Cursor::u64, |s, _| {
                (u64::from(s & 0x7f) % (u64::from(NUM_QUEUES) + 2)) | (u64::from(s >> 7) << 8)
            });
            let attach = if value & 0x100 == 0 {
                Attach::Eventfd
            } else {
                Attach::Nothing
            };
            (value.to_le_bytes().to_vec(), attach)
        }
        R::GET_CONFIG | R::SET_CONFIG => {
            let offset = config_offset(c);
            let size = config_size(c);
            let flags = c.field(Cursor::u32, |s, _| u32::from(s % 2));
            let mut body = le_body(&[
                &offset.to_le_bytes(),
                &size.to_le_bytes(),
                &flags.to_le_bytes(),
            ]);
            // The payload the size promises (at most a message's worth, so a huge size is a
            // disagreement the handler must refuse): zeros to read into, bytes to write.
            let payload = (size as usize).min(MAX_MSG_SIZE);
            if request == R::GET_CONFIG {
                body.resize(body.len() + payload, 0);
            } else {
                body.extend(c.bytes(payload));
            }
            (body, Attach::Nothing)
        }
        R::SET_LOG_BASE => {
            let size = area_size(c);
            let offset = area_offset(c);
            let body = le_body(&[&size.to_le_bytes(), &offset.to_le_bytes()]);
            (body, Attach::GuestMemory(1))
        }
        R::GET_INFLIGHT_FD | R::SET_INFLIGHT_FD => {
            let size = area_size(c);
            let offset = area_offset(c);
            let queues = small_u16(c, NUM_QUEUES);
            let queue_size = small_u16(c, QUEUE_SIZE);
            let body = le_body(&[
                &size.to_le_bytes(),
                &offset.to_le_bytes(),
                &queues.to_le_bytes(),
                &queue_size.to_le_bytes(),
                &[0; 4], // struct padding
            ]);
            let attach = if request == R::SET_INFLIGHT_FD {
                Attach::Inflight
            } else {
                Attach::Nothing
            };
            (body, attach)
        }
        R::SET_LOG_FD | R::SET_BACKEND_REQ_FD | R::GPU_SET_SOCKET | R::SET_DEVICE_STATE_FD => {
            (raw_body(c), Attach::GuestMemory(1))
        }
        _ => (raw_body(c), Attach::Nothing),
    }
}

/// Raw body bytes: a length (up to a little past the largest message), then the bytes.
fn raw_body(c: &mut Cursor) -> Vec<u8> {
    let len = usize::from(c.u16()) % (MAX_MSG_SIZE + 64);
    c.bytes(len)
}

fn next_step(c: &mut Cursor) -> Step {
    let op = c.u8();
    let code = match op {
        OP_WRITE_GUEST => {
            let offset = u64::from(c.u16()) % GUEST_LEN;
            let len = u64::from(c.u8()).min(GUEST_LEN - offset);
            return Step::WriteGuest {
                offset,
                bytes: c.bytes(len as usize),
            };
        }
        OP_KICK => return Step::Kick(u16::from(c.u8()) % NUM_QUEUES),
        OP_ANY_CODE => c.u32(),
        op => u32::from(op % CODES),
    };
    let shape = c.u8();
    let flags = if shape & RAW_FLAGS != 0 {
        c.u32()
    } else if shape & NEED_REPLY != 0 {
        VERSION_1 | VhostUserHeaderFlag::NEED_REPLY.bits()
    } else {
        VERSION_1
    };
    let (body, mut attach) = if shape & RAW_BODY != 0 {
        (raw_body(c), Attach::Nothing)
    } else {
        structured_body(c, code)
    };
    if shape & FLIP_FDS != 0 {
        attach = match attach {
            Attach::Nothing => Attach::GuestMemory(1),
            _ => Attach::Nothing,
        };
    }
    let len = body.len() as u32;
    let size = if shape & WRONG_SIZE != 0 {
        c.field(Cursor::u32, |s, c| match s % 2 {
            0 => len + 1 + u32::from(c.u8()),
            _ => len.saturating_sub(1 + u32::from(c.u8() % 16)),
        })
    } else {
        len
    };
    Step::Send(Message {
        code,
        flags,
        size,
        body,
        attach,
    })
}

/// Writes inputs in the decoder's format, every field exact: the seeds.
#[derive(Default)]
pub(super) struct Script {
    bytes: Vec<u8>,
}

impl Script {
    pub(super) fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    fn put(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    fn exact_u16(&mut self, v: u16) -> &mut Self {
        self.put(&[EXACT]).put(&v.to_le_bytes())
    }

    fn exact_u32(&mut self, v: u32) -> &mut Self {
        self.put(&[EXACT]).put(&v.to_le_bytes())
    }

    fn exact_u64(&mut self, v: u64) -> &mut Self {
        self.put(&[EXACT]).put(&v.to_le_bytes())
    }

    /// A message's selector and shape (`shape` without RAW_FLAGS: flags are written by
    /// [`Script::flags`]).
    pub(super) fn message(&mut self, code: FrontendReq, shape: u8) -> &mut Self {
        self.put(&[code as u8, shape])
    }

    /// A message with a request code outside the known ones (or any code at all).
    pub(super) fn any_code(&mut self, code: u32, shape: u8) -> &mut Self {
        self.put(&[OP_ANY_CODE])
            .put(&code.to_le_bytes())
            .put(&[shape])
    }

    /// The flags word of a RAW_FLAGS message (right after its shape).
    pub(super) fn flags(&mut self, flags: u32) -> &mut Self {
        self.put(&flags.to_le_bytes())
    }

    /// A body-less request (GET_FEATURES, SET_OWNER, ...).
    pub(super) fn bare(&mut self, code: FrontendReq) -> &mut Self {
        self.message(code, NEED_REPLY)
    }

    pub(super) fn u64_request(&mut self, code: FrontendReq, value: u64) -> &mut Self {
        self.message(code, NEED_REPLY).exact_u64(value)
    }

    /// SET_MEM_TABLE with these regions ([guest, size, user, offset]) and `count` in the
    /// body (the number of regions unless testing a lie).
    pub(super) fn mem_table(&mut self, count: u32, regions: &[[u64; 4]]) -> &mut Self {
        self.message(FrontendReq::SET_MEM_TABLE, NEED_REPLY)
            .exact_u32(count);
        for region in regions {
            self.region(region);
        }
        self
    }

    pub(super) fn mem_region(&mut self, code: FrontendReq, region: [u64; 4]) -> &mut Self {
        self.message(code, NEED_REPLY).region(&region)
    }

    fn region(&mut self, region: &[u64; 4]) -> &mut Self {
        for &v in region {
            self.exact_u64(v);
        }
        self
    }

    /// SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE.
    pub(super) fn vring_state(&mut self, code: FrontendReq, index: u32, num: u32) -> &mut Self {
        self.message(code, NEED_REPLY)
            .exact_u32(index)
            .exact_u32(num)
    }

    pub(super) fn vring_addr(&mut self, index: u32, desc: u64, used: u64, avail: u64) -> &mut Self {
        self.message(FrontendReq::SET_VRING_ADDR, NEED_REPLY)
            .exact_u32(index)
            .exact_u32(0)
            .exact_u64(desc)
            .exact_u64(used)
            .exact_u64(avail)
            .exact_u64(0)
    }

    /// SET_VRING_KICK / CALL / ERR for `index`, with an eventfd.
    pub(super) fn vring_fd(&mut self, code: FrontendReq, index: u64) -> &mut Self {
        self.message(code, NEED_REPLY).exact_u64(index)
    }

    pub(super) fn get_config(&mut self, offset: u32, size: u32) -> &mut Self {
        self.message(FrontendReq::GET_CONFIG, 0)
            .exact_u32(offset)
            .exact_u32(size)
            .exact_u32(0)
    }

    pub(super) fn set_config(&mut self, offset: u32, payload: &[u8]) -> &mut Self {
        self.message(FrontendReq::SET_CONFIG, NEED_REPLY)
            .exact_u32(offset)
            .exact_u32(payload.len() as u32)
            .exact_u32(0)
            .put(payload)
    }

    /// SET_LOG_BASE (the guest memfd as the log).
    pub(super) fn log_base(&mut self, size: u64, offset: u64) -> &mut Self {
        self.message(FrontendReq::SET_LOG_BASE, 0)
            .exact_u64(size)
            .exact_u64(offset)
    }

    /// GET_INFLIGHT_FD / SET_INFLIGHT_FD (SET attaches what GET answered).
    pub(super) fn inflight(
        &mut self,
        code: FrontendReq,
        size: u64,
        queues: u16,
        queue_size: u16,
    ) -> &mut Self {
        self.message(code, NEED_REPLY)
            .exact_u64(size)
            .exact_u64(0)
            .exact_u16(queues)
            .exact_u16(queue_size)
    }

    /// A message whose header size is `size` instead of its body's length.
    pub(super) fn wrong_size(&mut self, code: FrontendReq, body: &[u8], size: u32) -> &mut Self {
        self.message(code, RAW_BODY | WRONG_SIZE)
            .put(&(body.len() as u16).to_le_bytes())
            .put(body)
            .exact_u32(size)
    }

    pub(super) fn write_guest(&mut self, offset: u16, bytes: &[u8]) -> &mut Self {
        assert!(
            bytes.len() <= 255,
            "one write step carries at most 255 bytes"
        );
        self.put(&[OP_WRITE_GUEST])
            .put(&offset.to_le_bytes())
            .put(&[bytes.len() as u8])
            .put(bytes)
    }

    pub(super) fn kick(&mut self, queue: u8) -> &mut Self {
        self.put(&[OP_KICK, queue])
    }
}

/// When the handler answers a request it accepted (vhost crate, BackendReqHandler::
/// handle_request). Any request it refuses ends the connection instead.
#[derive(Debug, PartialEq)]
enum Answer {
    /// Always: a GET, or a SET whose answer is an echo or a status word.
    Reply,
    /// Only with NEED_REPLY, once REPLY_ACK is on: a u64 status (0 done, 1 refused).
    Ack,
    /// Never (the handler refuses every code it does not know).
    Never,
}

fn answer(code: u32) -> Answer {
    use FrontendReq as R;
    match FrontendReq::try_from(code) {
        Ok(
            R::GET_FEATURES
            | R::GET_PROTOCOL_FEATURES
            | R::GET_QUEUE_NUM
            | R::GET_VRING_BASE
            | R::GET_CONFIG
            | R::GET_INFLIGHT_FD
            | R::GET_MAX_MEM_SLOTS
            | R::GET_SHARED_OBJECT
            | R::GET_SHMEM_CONFIG
            | R::SET_LOG_BASE
            | R::SET_DEVICE_STATE_FD
            | R::CHECK_DEVICE_STATE,
        ) => Answer::Reply,
        Ok(
            R::SET_OWNER
            | R::RESET_OWNER
            | R::RESET_DEVICE
            | R::SET_FEATURES
            | R::SET_PROTOCOL_FEATURES
            | R::SET_MEM_TABLE
            | R::ADD_MEM_REG
            | R::REM_MEM_REG
            | R::SET_VRING_NUM
            | R::SET_VRING_ADDR
            | R::SET_VRING_BASE
            | R::SET_VRING_KICK
            | R::SET_VRING_CALL
            | R::SET_VRING_ERR
            | R::SET_VRING_ENABLE
            | R::SET_CONFIG
            | R::SET_BACKEND_REQ_FD
            | R::SET_INFLIGHT_FD
            | R::GPU_SET_SOCKET,
        ) => Answer::Ack,
        _ => Answer::Never,
    }
}

struct Reply {
    code: u32,
    flags: u32,
    body: Vec<u8>,
    file: Option<File>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What one input got (the seed test checks the handshake got through).
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub replies: usize,
    /// The backend closed the connection before the input's end (it refused a message).
    pub closed_early: bool,
    /// The first request acked with status 1 (refused).
    pub refused: Option<u32>,
}

/// The frontend's end of one session, and what it knows of the handler's state.
struct Frontend<'a> {
    socket: UnixStream,
    guest: &'a File,
    /// Our copy of each queue's kick eventfd, for [`Step::Kick`].
    kicks: Vec<Option<EventFd>>,
    /// The last in-flight region the backend handed out, for SET_INFLIGHT_FD.
    inflight: Option<File>,
    /// Virtio features the handler has answered GET_FEATURES with (0 before).
    told_features: u64,
    /// Protocol features as last set (the handler keeps whatever the frontend sends).
    acked_protocol: u64,
    outcome: Outcome,
}

impl Frontend<'_> {
    /// Acks are sent once the handler told PROTOCOL_FEATURES and REPLY_ACK was set.
    fn acks_on(&self) -> bool {
        self.told_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
            && self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    /// Send one message and take its answer, if one is due. False once the connection is
    /// closed (the handler refused something).
    fn exchange(&mut self, message: &Message) -> bool {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&message.code.to_le_bytes());
        header[4..8].copy_from_slice(&message.flags.to_le_bytes());
        header[8..12].copy_from_slice(&message.size.to_le_bytes());
        // Fds live until the send returns; the kernel gives the handler its own copies.
        let eventfd = (message.attach == Attach::Eventfd)
            .then(|| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"));
        let fds: Vec<RawFd> = match message.attach {
            Attach::Nothing => Vec::new(),
            Attach::GuestMemory(n) => vec![self.guest.as_raw_fd(); n],
            Attach::Eventfd => vec![eventfd.as_ref().expect("made above").as_raw_fd()],
            Attach::Inflight => {
                vec![self.inflight.as_ref().unwrap_or(self.guest).as_raw_fd()]
            }
        };
        loop {
            match self
                .socket
                .send_with_fds(&[&header[..], &message.body[..]], &fds)
            {
                Ok(n) => assert_eq!(n, HEADER_LEN + message.body.len(), "short send"),
                Err(e) if is_timeout(e.errno()) => {
                    panic!("the backend stopped reading its socket for {REPLY_TIMEOUT:?}")
                }
                // Interrupted before anything was sent (a signal, as in read_reply).
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(_) => return false, // closed by the handler
            }
            break;
        }
        if let Some(kick) = eventfd {
            let queue = (le_u64(&message.body, 0) & 0xff) as usize;
            if message.code == FrontendReq::SET_VRING_KICK as u32 && queue < self.kicks.len() {
                self.kicks[queue] = Some(kick);
            }
        }

        let well_formed = message.size as usize == message.body.len();
        if message.code == FrontendReq::SET_PROTOCOL_FEATURES as u32
            && message.body.len() == 8
            && well_formed
        {
            // The handler takes the value before it decides whether to ack this message.
            self.acked_protocol = le_u64(&message.body, 0);
        }
        let due = match answer(message.code) {
            Answer::Reply => true,
            Answer::Ack => {
                self.acks_on() && message.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
            }
            Answer::Never => false,
        };
        if !due || !well_formed {
            return true;
        }
        match self.read_reply() {
            Some(reply) => {
                self.check(message, reply);
                self.outcome.replies += 1;
                true
            }
            None => false,
        }
    }

    /// The next reply, or None when the connection closed first.
    fn read_reply(&mut self) -> Option<Reply> {
        let mut header = [0u8; HEADER_LEN];
        let (n, file) = match recv_through_signals(&self.socket, &mut header) {
            Ok(got) => got,
            Err(e) if is_timeout(e.errno()) => {
                panic!("no answer and no close within {REPLY_TIMEOUT:?}: the handler hangs")
            }
            Err(_) => return None,
        };
        if n == 0 {
            return None;
        }
        self.read_all(&mut header[n..], "reply header");
        let size = le_u32(&header, 8) as usize;
        assert!(size <= MAX_MSG_SIZE, "reply of {size} bytes");
        let mut body = vec![0u8; size];
        self.read_all(&mut body, "reply body (shorter than its header says)");
        Some(Reply {
            code: le_u32(&header, 0),
            flags: le_u32(&header, 4),
            body,
            file,
        })
    }

    fn read_all(&mut self, buf: &mut [u8], what: &str) {
        if let Err(e) = self.socket.read_exact(buf) {
            match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                    panic!("{what} stalled for {REPLY_TIMEOUT:?}")
                }
                _ => panic!("{what} cut short: {e}"),
            }
        }
    }

    /// Every reply: marked a reply, protocol version 1, to the request just sent, with a
    /// body its request allows.
    fn check(&mut self, sent: &Message, reply: Reply) {
        use FrontendReq as R;
        let code = sent.code;
        assert_eq!(reply.code, code, "a reply to another request");
        check_reply_flags(&reply);
        let body = &reply.body;
        let u64_body = |what: &str| -> u64 {
            assert_eq!(body.len(), size_of::<VhostUserU64>(), "{what}: body size");
            le_u64(body, 0)
        };
        if answer(code) == Answer::Ack {
            let status = u64_body("ack");
            assert!(status <= 1, "ack status {status}");
            if status == 1 {
                self.outcome.refused.get_or_insert(code);
            }
            return;
        }
        match FrontendReq::try_from(code).expect("only known codes are answered") {
            R::GET_FEATURES => self.told_features = u64_body("GET_FEATURES"),
            R::GET_PROTOCOL_FEATURES => {
                let offered = u64_body("GET_PROTOCOL_FEATURES");
                assert_ne!(
                    offered & VhostUserProtocolFeatures::REPLY_ACK.bits(),
                    0,
                    "REPLY_ACK not offered"
                );
            }
            R::GET_QUEUE_NUM => {
                let queues = u64_body("GET_QUEUE_NUM");
                assert!(
                    (1..=u64::from(NUM_QUEUES)).contains(&queues),
                    "GET_QUEUE_NUM {queues} for a device of {NUM_QUEUES} queues"
                );
            }
            R::GET_MAX_MEM_SLOTS | R::CHECK_DEVICE_STATE | R::SET_DEVICE_STATE_FD => {
                u64_body("status word");
            }
            R::GET_VRING_BASE => {
                assert_eq!(body.len(), size_of::<VhostUserVringState>(), "vring state");
                assert_eq!(
                    le_u32(body, 0),
                    le_u32(&sent.body, 0),
                    "another queue's base"
                );
            }
            R::GET_CONFIG => check_config_reply(&sent.body, body),
            R::GET_INFLIGHT_FD => {
                assert_eq!(
                    body.len(),
                    size_of::<VhostUserInflight>(),
                    "in-flight reply"
                );
                assert_eq!(
                    body[16..20],
                    sent.body[16..20],
                    "in-flight geometry changed"
                );
                let file = reply.file.expect("GET_INFLIGHT_FD without an fd");
                let (size, offset) = (le_u64(body, 0), le_u64(body, 8));
                let len = file.metadata().expect("in-flight fd").len();
                assert!(
                    offset.checked_add(size).is_some_and(|end| end <= len),
                    "in-flight region [{offset}, +{size}) past its file of {len}"
                );
                // What a SET_INFLIGHT_FD later in the input hands back, as QEMU does.
                self.inflight = Some(file);
            }
            R::SET_LOG_BASE => {
                assert_eq!(body, &sent.body, "SET_LOG_BASE echoes its request")
            }
            _ => {}
        }
    }

    fn kick(&self, queue: u16) {
        if let Some(kick) = &self.kicks[usize::from(queue)] {
            let _ = kick.write(1);
        }
    }

    /// Hang up, and see the handler finish. In step, nothing more may arrive before its
    /// close. After a header that lied about its size, the handler reads the stream out of
    /// step: the lying message may still be answered, and what it takes for further
    /// headers (the rest of the body) too, so replies of any code may come — each still a
    /// well-formed reply.
    fn finish(mut self, in_step: bool) -> Outcome {
        let _ = self.socket.shutdown(std::net::Shutdown::Write);
        if !in_step {
            while let Some(reply) = self.read_reply() {
                check_reply_flags(&reply);
            }
            return self.outcome;
        }
        let mut stray = [0u8; 64];
        let read = loop {
            match self.socket.read(&mut stray) {
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match read {
            Ok(0) => {}
            Ok(n) => panic!(
                "the backend sent {n} bytes nobody asked for: {:02x?}",
                &stray[..n]
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the session did not end within {REPLY_TIMEOUT:?} of the hang-up")
            }
            Err(_) => {} // reset: closed
        }
        self.outcome
    }
}

/// Every reply's flags: marked a reply, protocol version 1, no reserved bits.
fn check_reply_flags(reply: &Reply) {
    let flags = reply.flags;
    assert_eq!(
        flags & VhostUserHeaderFlag::VERSION.bits(),
        1,
        "reply version"
    );
    assert_ne!(
        flags & VhostUserHeaderFlag::REPLY.bits(),
        0,
        "reply flag missing"
    );
    assert_eq!(
        flags & VhostUserHeaderFlag::RESERVED_BITS.bits(),
        0,
        "reserved reply flags"
    );
}

/// `recv_with_fd`, again when a signal interrupted it: libFuzzer's watchdog (SIGALRM every
/// second) is no close. Taking it for one left the reply to be found later as "unasked".
fn recv_through_signals(
    socket: &UnixStream,
    buf: &mut [u8],
) -> Result<(usize, Option<File>), vmm_sys_util::errno::Error> {
    loop {
        match socket.recv_with_fd(buf) {
            Err(e) if e.errno() == libc::EINTR => continue,
            other => return other,
        }
    }
}

fn is_timeout(errno: i32) -> bool {
    errno == libc::EAGAIN || errno == libc::EWOULDBLOCK || errno == libc::ETIMEDOUT
}

/// GET_CONFIG: offset and flags echoed; the payload exactly the size asked, or empty (the
/// protocol's "failed"); and where it covers them, the fields a frontend sizes the disk by.
fn check_config_reply(asked: &[u8], body: &[u8]) {
    let header = size_of::<VhostUserConfig>();
    assert!(
        body.len() >= header,
        "GET_CONFIG reply of {} bytes",
        body.len()
    );
    let (offset, size, flags) = (le_u32(body, 0), le_u32(body, 4), le_u32(body, 8));
    assert_eq!(offset, le_u32(asked, 0), "GET_CONFIG offset not echoed");
    assert_eq!(flags, le_u32(asked, 8), "GET_CONFIG flags not echoed");
    let asked_size = le_u32(asked, 4);
    assert!(
        size == 0 || size == asked_size,
        "GET_CONFIG answered {size} bytes for {asked_size}"
    );
    assert_eq!(
        body.len() - header,
        size as usize,
        "payload and its size disagree"
    );
    let payload = &body[header..];
    let field = |at: u32, len: u32| -> Option<&[u8]> {
        let start = at.checked_sub(offset)? as usize;
        payload.get(start..start + len as usize)
    };
    if let Some(capacity) = field(0, 8) {
        let sectors = u64::from_le_bytes(capacity.try_into().expect("8 bytes"));
        assert_eq!(sectors, IMAGE_BYTES / 512, "config capacity");
    }
    if let Some(queues) = field(34, 2) {
        let queues = u16::from_le_bytes(queues.try_into().expect("2 bytes"));
        assert_eq!(queues, NUM_QUEUES, "config num_queues");
    }
}

/// The session's fixed parts, made once per process: the PI image, the guest memfd, the
/// socket sessions connect to.
pub(super) struct VhostRig {
    /// The image, its PI files and the socket. (libFuzzer exits without destructors: after
    /// a fuzz run it stays in /tmp, as the other targets' scratch files do.)
    dir: PathBuf,
    socket_path: String,
    listener: UnixListener,
    image: Arc<Image>,
    pi: Arc<PiStore>,
    guest: File,
    settings: DeviceSettings,
    cost_basis: CostBasis,
}

impl VhostRig {
    pub(super) fn new() -> VhostRig {
        // Each session's queues allocate and memset their bounce pools (1 MiB a queue). By
        // default glibc serves that from fresh mappings and returns it on free, so every run
        // paid for faulting 512 zeroed pages in (two thirds of its time); kept in the heap,
        // the next session's memset hits warm pages.
        // SAFETY: mallopt only sets allocator tunables; it is called before this rig's
        // threads exist, and glibc serialises it against allocations in any case.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
        // One directory per rig (the unit tests make several in one process).
        static RIGS: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "guardblk-fuzz-vhost-{}-{}",
            std::process::id(),
            RIGS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("rig directory");
        let (image, pi) = super::scratch_pi_image(&dir, IMAGE_BYTES);
        let socket = dir.join("vhost.sock");
        let listener = UnixListener::bind(&socket).expect("frontend socket");
        // SAFETY: a NUL-terminated name and valid flags; the result is checked before the
        // descriptor is owned by a File, which nothing else holds.
        let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let guest = unsafe { File::from_raw_fd(fd) };
        guest.set_len(GUEST_LEN).expect("guest memory size");
        VhostRig {
            dir,
            socket_path: socket.to_str().expect("UTF-8 temp path").to_string(),
            listener,
            image,
            pi,
            guest,
            settings: DeviceSettings {
                num_queues: NUM_QUEUES,
                queue_size: QUEUE_SIZE,
                serial: "fuzz".into(),
                writeback: true,
                // Queue threads do their I/O inline: no io_uring per session, and a drain
                // at GET_VRING_BASE never waits on the kernel.
                engine: EngineChoice::Fixed(EngineKind::Inline),
                poll_window: Duration::ZERO,
                write_policy: WritePolicy::Auto,
                auto_path: AutoPath::Cost,
            },
            cost_basis: CostBasis {
                target: Target::Dma,
                auto_path: AutoPath::Cost,
                calibration: Calibration::default(),
            },
        }
    }

    /// One session: built as the daemon builds it, fed the input's messages, and ended as
    /// the daemon ends it (request thread joined, queue threads stopped, I/O drained).
    pub(super) fn run(&mut self, data: &[u8]) -> Outcome {
        #[cfg(fuzzing)]
        let before = ProcessState::now();
        // What an earlier input's queue threads wrote must not reach this one.
        self.guest
            .write_all_at(&[0; GUEST_LEN as usize], 0)
            .expect("zero guest memory");
        let tracker = Arc::new(MutationTracker::new(IMAGE_BYTES, Duration::from_secs(30)));
        let counters: Vec<Arc<QueueCounters>> = (0..NUM_QUEUES).map(|_| Arc::default()).collect();
        let backend = BlkBackend::new(
            1,
            Arc::new(DeviceLedger::default()),
            Arc::clone(&self.image),
            Some(Arc::clone(&self.pi)),
            &tracker,
            &self.settings,
            &self.cost_basis,
            &counters,
        )
        .expect("backend");
        let mut daemon = VhostUserDaemon::new("fuzz".into(), backend.clone(), backend.memory())
            .expect("vhost-user handler");
        backend
            .register_completion_events(&daemon.get_epoll_handlers())
            .expect("completion events");
        daemon
            .start_client(&self.socket_path)
            .expect("connect the session");
        let (socket, _) = self.listener.accept().expect("accept the session");
        socket
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("read timeout");
        socket
            .set_write_timeout(Some(REPLY_TIMEOUT))
            .expect("write timeout");
        let mut frontend = Frontend {
            socket,
            guest: &self.guest,
            kicks: (0..NUM_QUEUES).map(|_| None).collect(),
            inflight: None,
            told_features: 0,
            acked_protocol: 0,
            outcome: Outcome::default(),
        };
        let mut input = Cursor { data, at: 0 };
        let mut in_step = true;
        while in_step && !input.done() {
            match next_step(&mut input) {
                Step::Send(message) => {
                    // After a header that lies about its body, the handler reads the rest
                    // of the stream out of step: that message is the input's last.
                    in_step = message.size as usize == message.body.len();
                    if !frontend.exchange(&message) {
                        frontend.outcome.closed_early = true;
                        break;
                    }
                }
                Step::WriteGuest { offset, bytes } => self
                    .guest
                    .write_all_at(&bytes, offset)
                    .expect("write guest memory"),
                Step::Kick(queue) => frontend.kick(queue),
            }
        }
        let outcome = frontend.finish(in_step);
        if let Err(vhost_user_backend::Error::WaitDaemon(_)) = daemon.wait() {
            panic!("the session's request thread panicked");
        }
        // As finish_session: dropping the daemon stops the queue threads, then whatever
        // they started is completed.
        drop(daemon);
        backend.end_session();
        drop(backend);
        #[cfg(fuzzing)]
        before.check_session_left_nothing(&self.dir);
        outcome
    }
}

impl Drop for VhostRig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The process's threads and open files, to see that a session leaves none behind. Only
/// in the fuzz target: libFuzzer runs one input at a time, while the unit tests run beside
/// other tests opening files and threads of their own.
#[cfg(fuzzing)]
struct ProcessState {
    threads: usize,
    fds: std::collections::BTreeSet<RawFd>,
}

#[cfg(fuzzing)]
impl ProcessState {
    fn now() -> ProcessState {
        let fds = std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        ProcessState {
            threads: thread_count(),
            fds,
        }
    }

    /// Every thread of the session ended, and every file it opened is closed — but one:
    /// vhost-user-backend 0.24 leaks the exit-event fd of each queue thread (event_loop.rs,
    /// `VringEpollHandler::new` registers `consumer.into_raw_fd()` with epoll and nothing
    /// closes it), one eventfd per queue and session. Those are closed here, so long runs
    /// do not reach the fd limit; any other leftover is a finding. (Once the crate stops
    /// leaking, this count check fails: delete the exception then.)
    fn check_session_left_nothing(&self, shared_dir: &std::path::Path) {
        // A joined thread can still be listed for a moment (the kernel wakes the joiner
        // before it has removed the task): give it 100 ms to go.
        let mut threads = thread_count();
        for _ in 0..1000 {
            if threads <= self.threads {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
            threads = thread_count();
        }
        assert_eq!(threads, self.threads, "a session's thread outlived it");
        let after = ProcessState::now();
        let mut leaked_exit_events = Vec::new();
        for &fd in after.fds.difference(&self.fds) {
            let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{fd}")) else {
                continue; // the directory listing's own fd, closed since
            };
            if target.starts_with(shared_dir) {
                continue; // the image's files (its journal is opened when first needed)
            }
            assert_eq!(
                target.as_os_str(),
                "anon_inode:[eventfd]",
                "a session left fd {fd} ({}) open",
                target.display()
            );
            leaked_exit_events.push(fd);
        }
        assert_eq!(
            leaked_exit_events.len(),
            usize::from(NUM_QUEUES),
            "a session left {} eventfds open, not the one per queue thread vhost-user-backend leaks",
            leaked_exit_events.len()
        );
        for fd in leaked_exit_events {
            // SAFETY: fd is open and owned by nothing in the process: vhost-user-backend
            // released it with into_raw_fd, and the epoll instance it was registered with
            // closed with the session's handler; no other thread runs between inputs.
            unsafe { libc::close(fd) };
        }
    }
}

/// Threads in this process (`num_threads`, the 20th field of /proc/self/stat; the second,
/// the command name, is in parentheses and may hold spaces).
#[cfg(fuzzing)]
fn thread_count() -> usize {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after_name = &stat[stat.rfind(')').expect("stat's command name") + 2..];
    after_name
        .split(' ')
        .nth(17)
        .and_then(|n| n.parse().ok())
        .expect("num_threads")
}

/// The target's seeds: QEMU's handshake and device start, and the edge cases a frontend
/// can send, each after as much of the handshake as it needs to be reached.
pub(super) fn seeds() -> Vec<(String, Vec<u8>)> {
    use FrontendReq as R;
    let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
    // GET_FEATURES, protocol features (REPLY_ACK on, so every SET below is acked) and the
    // device's geometry, as QEMU asks before the guest starts the device.
    let negotiate = |s: &mut Script| {
        s.bare(R::GET_FEATURES)
            .bare(R::GET_PROTOCOL_FEATURES)
            .u64_request(R::SET_PROTOCOL_FEATURES, offered_protocol_features())
            .bare(R::GET_QUEUE_NUM)
            .bare(R::GET_MAX_MEM_SLOTS)
            .bare(R::SET_OWNER)
            .get_config(0, 60);
    };
    let guest_ram = [0, GUEST_LEN, USER_BASE, 0];
    // Queue q's rings inside guest memory (descriptors, avail, used), as SET_VRING_ADDR
    // gives them: frontend addresses.
    let rings = |q: u64| {
        let base = USER_BASE + PAGE * (1 + 2 * q);
        (base, base + 0x400, base + 0x200)
    };
    // The in-flight region GET_INFLIGHT_FD hands out, which SET_INFLIGHT_FD gives back.
    let inflight_len = (queue_region_bytes(QUEUE_SIZE) * usize::from(NUM_QUEUES)) as u64;
    let start_queues = |s: &mut Script| {
        s.u64_request(R::SET_FEATURES, offered_features())
            .inflight(R::GET_INFLIGHT_FD, 0, NUM_QUEUES, QUEUE_SIZE)
            .inflight(R::SET_INFLIGHT_FD, inflight_len, NUM_QUEUES, QUEUE_SIZE)
            .mem_table(1, &[guest_ram]);
        for q in 0..u64::from(NUM_QUEUES) {
            let (desc, used, avail) = rings(q);
            s.vring_state(R::SET_VRING_NUM, q as u32, u32::from(QUEUE_SIZE))
                .vring_state(R::SET_VRING_BASE, q as u32, 0)
                .vring_addr(q as u32, desc, used, avail)
                .vring_fd(R::SET_VRING_KICK, q)
                .vring_fd(R::SET_VRING_CALL, q)
                .vring_state(R::SET_VRING_ENABLE, q as u32, 1);
        }
    };
    let stop_queues = |s: &mut Script| {
        for q in 0..u32::from(NUM_QUEUES) {
            s.vring_state(R::GET_VRING_BASE, q, 0);
        }
    };
    let script = |build: &dyn Fn(&mut Script)| {
        let mut s = Script::default();
        build(&mut s);
        s.into_bytes()
    };
    let mut out = vec![
        (
            "handshake".to_string(),
            script(&|s| {
                negotiate(s);
                start_queues(s);
                stop_queues(s);
            }),
        ),
        (
            "handshake-read".into(),
            script(&|s| {
                negotiate(s);
                start_queues(s);
                // A read of one 4 KiB block on queue 0: header at 0x5000, data at 0x6000,
                // status at 0x7000; avail ring idx 1, entry 0 = head 0.
                let desc = |addr: u64, len: u32, flags: u16, next: u16| {
                    let mut d = addr.to_le_bytes().to_vec();
                    d.extend(len.to_le_bytes());
                    d.extend(flags.to_le_bytes());
                    d.extend(next.to_le_bytes());
                    d
                };
                let table = [
                    desc(0x5000, 16, 1, 1),
                    desc(0x6000, 4096, 3, 2),
                    desc(0x7000, 1, 2, 0),
                ]
                .concat();
                s.write_guest(0x1000, &table)
                    .write_guest(0x5008, &8u64.to_le_bytes())
                    .write_guest(0x1202, &1u16.to_le_bytes())
                    .kick(0);
                stop_queues(s);
            }),
        ),
        (
            // The guest's avail index more than a ring ahead, then the queue stopped: the
            // queue thread used to spin on it forever (protocol/backend_tests.rs).
            "avail-past-ring".into(),
            script(&|s| {
                negotiate(s);
                start_queues(s);
                s.write_guest(0x1202, &(QUEUE_SIZE + 1).to_le_bytes())
                    .kick(0);
                stop_queues(s);
            }),
        ),
        (
            "migration-log".into(),
            script(&|s| {
                negotiate(s);
                start_queues(s);
                s.log_base(PAGE, 0)
                    .u64_request(
                        R::SET_FEATURES,
                        offered_features() | VhostUserVirtioFeatures::LOG_ALL.bits(),
                    )
                    .vring_state(R::GET_VRING_BASE, 0, 0);
            }),
        ),
        (
            "wce-toggle".into(),
            script(&|s| {
                negotiate(s);
                s.set_config(WCE_OFFSET as u32, &[0])
                    .get_config(WCE_OFFSET as u32, 1)
                    .set_config(WCE_OFFSET as u32, &[1])
                    .set_config(0, &[1; 8]);
            }),
        ),
        (
            "mem-slots".into(),
            script(&|s| {
                negotiate(s);
                s.mem_region(R::ADD_MEM_REG, [0, 4 * PAGE, USER_BASE, 0])
                    .mem_region(
                        R::ADD_MEM_REG,
                        [4 * PAGE, 4 * PAGE, USER_BASE + 4 * PAGE, 4 * PAGE],
                    )
                    .mem_region(R::REM_MEM_REG, [0, 4 * PAGE, USER_BASE, 0])
                    .mem_region(R::ADD_MEM_REG, [2 * PAGE, 4 * PAGE, USER_BASE, 0]);
            }),
        ),
        (
            "features-out-of-order".into(),
            script(&|s| {
                s.u64_request(R::SET_FEATURES, offered_features())
                    .u64_request(R::SET_PROTOCOL_FEATURES, u64::MAX)
                    .bare(R::GET_FEATURES)
                    .vring_state(R::SET_VRING_ENABLE, 0, 1)
                    .u64_request(R::SET_PROTOCOL_FEATURES, reply_ack)
                    .bare(R::GET_PROTOCOL_FEATURES)
                    .bare(R::SET_OWNER)
                    .bare(R::SET_OWNER);
            }),
        ),
        (
            "no-mq-queue-num".into(),
            script(&|s| {
                s.bare(R::GET_FEATURES)
                    .u64_request(R::SET_PROTOCOL_FEATURES, reply_ack)
                    .bare(R::GET_QUEUE_NUM);
            }),
        ),
        (
            "reset-device".into(),
            script(&|s| {
                negotiate(s);
                start_queues(s);
                s.u64_request(R::SET_PROTOCOL_FEATURES, u64::MAX)
                    .bare(R::RESET_DEVICE)
                    .bare(R::RESET_OWNER);
            }),
        ),
    ];
    // GET_CONFIG edge cases: past the 4 KiB limit, offset + size overflowing, empty,
    // longer than the structure and than 256 bytes, a huge size.
    for (name, offset, size) in [
        ("config-past-limit", 4090, 10),
        ("config-overflow", u32::MAX - 8, 16),
        ("config-empty", 0, 0),
        ("config-300", 0, 300),
        ("config-tail", 90, 16),
        ("config-huge", 0, 0x10_0000),
    ] {
        out.push((
            name.into(),
            script(&|s| {
                negotiate(s);
                s.get_config(offset, size);
            }),
        ));
    }
    // Vring sizes: zero, not a power of two, past the maximum, far past it.
    for (name, num) in [
        ("vring-num-0", 0),
        ("vring-num-17", 17),
        ("vring-num-max-plus", u32::from(QUEUE_SIZE) * 2),
        ("vring-num-32768", 32768),
    ] {
        out.push((
            name.into(),
            script(&|s| {
                negotiate(s);
                s.u64_request(R::SET_FEATURES, offered_features())
                    .mem_table(1, &[guest_ram])
                    .vring_state(R::SET_VRING_NUM, 0, num)
                    .vring_state(R::SET_VRING_NUM, 5, u32::from(QUEUE_SIZE));
            }),
        ));
    }
    out.push((
        "vring-addr-outside".into(),
        script(&|s| {
            negotiate(s);
            s.u64_request(R::SET_FEATURES, offered_features())
                .mem_table(1, &[guest_ram])
                .vring_addr(0, USER_BASE + GUEST_LEN, USER_BASE, USER_BASE + 0x200);
        }),
    ));
    out.push((
        "vring-addr-before-table".into(),
        script(&|s| {
            negotiate(s);
            s.vring_addr(0, USER_BASE, USER_BASE + 0x400, USER_BASE + 0x200);
        }),
    ));
    // Memory tables: none, more regions than QEMU's 8, overlapping, past the memfd's end,
    // a count that disagrees with the regions sent.
    let pages = |n: u64| n * PAGE;
    let nine: Vec<[u64; 4]> = (0..9)
        .map(|i| [pages(i), PAGE, USER_BASE + pages(i), pages(i % 8)])
        .collect();
    for (name, count, regions) in [
        ("mem-table-empty", 0, vec![]),
        ("mem-table-nine", 9, nine),
        (
            "mem-table-overlap",
            2,
            vec![
                [0, pages(4), USER_BASE, 0],
                [pages(2), pages(4), USER_BASE + pages(2), 0],
            ],
        ),
        (
            "mem-table-past-memfd",
            1,
            vec![[0, pages(16), USER_BASE, 0]],
        ),
        ("mem-table-count-lies", 3, vec![guest_ram]),
    ] {
        out.push((
            name.into(),
            script(&|s| {
                negotiate(s);
                s.mem_table(count, &regions);
            }),
        ));
    }
    // Headers that lie about the body's size (longer, shorter), an unknown code, code 0,
    // a reply flag on a request, an fd on a request that takes none.
    out.push((
        "size-longer-than-body".into(),
        script(&|s| {
            negotiate(s);
            s.wrong_size(R::SET_FEATURES, &offered_features().to_le_bytes(), 64);
        }),
    ));
    out.push((
        "size-shorter-than-body".into(),
        script(&|s| {
            negotiate(s);
            s.wrong_size(R::SET_VRING_NUM, &[0; 8], 4);
        }),
    ));
    out.push((
        "unknown-code".into(),
        script(&|s| {
            negotiate(s);
            s.any_code(0x1234, 0)
                .put(&[0, 0])
                .any_code(0, 0)
                .put(&[0, 0]);
        }),
    ));
    out.push((
        "reply-flag".into(),
        script(&|s| {
            negotiate(s);
            s.message(R::GET_FEATURES, RAW_FLAGS)
                .flags(VhostUserHeaderFlag::REPLY.bits() | 1);
        }),
    ));
    out.push((
        "fd-on-get-features".into(),
        script(&|s| {
            negotiate(s);
            s.message(R::GET_FEATURES, FLIP_FDS);
        }),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::message::{
        VhostUserLog, VhostUserMemory, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
        VhostUserVringAddr,
    };

    /// The one crash a long vhost_messages run found was this harness taking an interrupted
    /// receive for a close (see fuzz/README.md): a signal without SA_RESTART, as libFuzzer's
    /// SIGALRM, lands while the rig waits for a reply that comes later.
    #[test]
    fn a_signal_during_the_wait_for_a_reply_is_not_a_close() {
        extern "C" fn ignore(_: libc::c_int) {}
        // SAFETY: a handler that does nothing, installed without SA_RESTART so a blocked
        // recvmsg returns EINTR; SIGUSR2 is used by nothing else in the tests.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = 0;
            assert_eq!(
                libc::sigaction(libc::SIGUSR2, &action, std::ptr::null_mut()),
                0
            );
        }
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            let mut buf = [0u8; 4];
            recv_through_signals(&ours, &mut buf).map(|(n, _)| (n, buf))
        });
        let thread = rx.recv().unwrap();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(30));
            // SAFETY: the waiter thread is alive: it ends only after the write below.
            assert_eq!(unsafe { libc::pthread_kill(thread, libc::SIGUSR2) }, 0);
        }
        std::thread::sleep(Duration::from_millis(30));
        // If the waiter gave up at a signal, its end is closed and this fails: the join says why.
        let _ = std::io::Write::write_all(&mut &theirs, b"late");
        let got = waiter
            .join()
            .unwrap()
            .expect("an interrupted receive is not an error");
        assert_eq!(got, (4, *b"late"));
    }

    fn decode(bytes: &[u8]) -> Vec<Step> {
        let mut c = Cursor { data: bytes, at: 0 };
        let mut steps = Vec::new();
        while !c.done() {
            steps.push(next_step(&mut c));
        }
        steps
    }

    /// The structured bodies are the vhost crate's message structures, byte for byte in
    /// size, so the handler parses them as QEMU's.
    #[test]
    fn structured_bodies_have_the_sizes_of_the_protocol_messages() {
        use FrontendReq as R;
        let mut s = Script::default();
        s.u64_request(R::SET_FEATURES, 1)
            .mem_table(2, &[[0, PAGE, USER_BASE, 0]; 2])
            .mem_region(R::ADD_MEM_REG, [0, PAGE, USER_BASE, 0])
            .vring_state(R::SET_VRING_NUM, 0, 16)
            .vring_addr(0, USER_BASE, USER_BASE, USER_BASE)
            .vring_fd(R::SET_VRING_KICK, 0)
            .get_config(4, 8)
            .log_base(PAGE, 0)
            .inflight(R::GET_INFLIGHT_FD, 0, 1, 16);
        let sizes: Vec<usize> = decode(&s.into_bytes())
            .iter()
            .map(|step| match step {
                Step::Send(m) => {
                    assert_eq!(m.size as usize, m.body.len());
                    m.body.len()
                }
                _ => panic!("only messages were written"),
            })
            .collect();
        assert_eq!(
            sizes,
            [
                size_of::<VhostUserU64>(),
                size_of::<VhostUserMemory>() + 2 * size_of::<VhostUserMemoryRegion>(),
                size_of::<VhostUserSingleMemoryRegion>(),
                size_of::<VhostUserVringState>(),
                size_of::<VhostUserVringAddr>(),
                size_of::<VhostUserU64>(),
                size_of::<VhostUserConfig>() + 8,
                size_of::<VhostUserLog>(),
                size_of::<VhostUserInflight>(),
            ]
        );
    }

    /// The handshake seed reaches the end with every answer QEMU would wait for: the
    /// fuzzer starts from a running device, not from a refusal.
    #[test]
    fn the_handshake_seed_gets_every_answer() {
        let seeds = seeds();
        let handshake = &seeds.iter().find(|(n, _)| n == "handshake").unwrap().1;
        let outcome = VhostRig::new().run(handshake);
        assert!(!outcome.closed_early, "{outcome:?}");
        // 7 negotiation replies, 3 acked SETs + 2 in-flight answers + the table before the
        // queues, 6 acked messages per queue, and one GET_VRING_BASE per queue.
        let expected = 7 + 4 + 6 * usize::from(NUM_QUEUES) + usize::from(NUM_QUEUES);
        assert_eq!(outcome.replies, expected);
        assert_eq!(outcome.refused, None);
    }

    /// The fuzzer's first finding: a region past the end of its memfd (here its mmap offset
    /// is) was accepted, and the handler's next SET_VRING_ADDR read the used index from it:
    /// SIGBUS, the daemon gone. The table must be refused, and nothing after it run.
    #[test]
    fn a_memory_region_past_its_file_is_refused() {
        use FrontendReq as R;
        let mut rig = VhostRig::new();
        for region in [
            [0, GUEST_LEN, USER_BASE, 0x2400_0000_0000], // the finding's offset
            [0, GUEST_LEN, USER_BASE, PAGE],             // one page past the end
            [0, 2 * GUEST_LEN, USER_BASE, 0],            // longer than the file
        ] {
            for code in [R::SET_MEM_TABLE, R::ADD_MEM_REG] {
                let mut s = Script::default();
                s.bare(R::GET_FEATURES)
                    .u64_request(R::SET_PROTOCOL_FEATURES, offered_protocol_features())
                    .u64_request(R::SET_FEATURES, offered_features());
                if code == R::SET_MEM_TABLE {
                    s.mem_table(1, &[region]);
                } else {
                    s.mem_region(code, region);
                }
                s.vring_addr(0, USER_BASE, USER_BASE + 0x400, USER_BASE + 0x200);
                let outcome = rig.run(&s.into_bytes());
                assert_eq!(outcome.refused, Some(code as u32), "{region:x?}");
                assert!(outcome.closed_early, "{region:x?}: the session went on");
            }
        }
    }
}
