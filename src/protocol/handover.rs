//! One image, one running guest: which frontend session's device may do I/O.
//!
//! A live migration on this host runs two QEMUs against one disk: the source, whose guest
//! runs until the last moment, and the destination, which connects at its start-up (it needs
//! the config space to build the device) but starts the device only after the source stopped
//! its own. guardblk serves both from one process — the image, its PI metadata, write intents
//! and mutation marks stay in one place and nothing needs handing between processes — and
//! this ledger keeps their I/O apart: a session's device *claims* the image on its first
//! request and *releases* it when the frontend has stopped all of its queues (GET_VRING_BASE
//! drains them first) or disconnects. A claim while another session holds the image waits if
//! that session is migrating (VHOST_F_LOG_ALL on: the destination started a moment early)
//! and is refused otherwise: a second guest on a disk in use gets I/O errors, never the disk.

use std::sync::{Mutex, MutexGuard};

/// The answer to a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The session may do I/O until it releases.
    Granted,
    /// The holder is migrating: hold requests; the waker runs when the holder releases.
    Wait,
    /// The holder runs a guest that is not migrating: refuse the requests.
    Refused { holder: u64 },
}

type Waker = Box<dyn Fn() + Send>;

#[derive(Default)]
struct State {
    holder: Option<u64>,
    holder_migrating: bool,
    waiting: Vec<(u64, Waker)>,
}

/// Shared by every session of one daemon.
#[derive(Default)]
pub struct DeviceLedger {
    state: Mutex<State>,
}

impl DeviceLedger {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Session `session` wants to do I/O. With [`Claim::Wait`], `wake` is kept and called
    /// (once) when the holder releases; otherwise it is dropped.
    pub fn claim(&self, session: u64, wake: impl Fn() + Send + 'static) -> Claim {
        let mut state = self.state();
        match state.holder {
            None => {
                state.holder = Some(session);
                state.holder_migrating = false;
                Claim::Granted
            }
            Some(h) if h == session => Claim::Granted,
            Some(_) if state.holder_migrating => {
                if !state.waiting.iter().any(|(s, _)| *s == session) {
                    state.waiting.push((session, Box::new(wake)));
                }
                Claim::Wait
            }
            Some(holder) => Claim::Refused { holder },
        }
    }

    /// The holder turned dirty logging on or off (only the holder's flag counts).
    pub fn set_migrating(&self, session: u64, migrating: bool) {
        let mut state = self.state();
        if state.holder == Some(session) {
            state.holder_migrating = migrating;
        }
    }

    /// Session `session` stopped its device or left: the image is free, and every session
    /// waiting for it is woken (the first to claim gets it). Returns whether it was the holder.
    pub fn release(&self, session: u64) -> bool {
        let wakers = {
            let mut state = self.state();
            state.waiting.retain(|(s, _)| *s != session);
            if state.holder != Some(session) {
                return false;
            }
            state.holder = None;
            state.holder_migrating = false;
            std::mem::take(&mut state.waiting)
        };
        // Outside the lock: a waker kicks a queue, whose thread may claim at once.
        for (_, wake) in wakers {
            wake();
        }
        true
    }

    pub fn holder(&self) -> Option<u64> {
        self.state().holder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn counter() -> (Arc<AtomicUsize>, impl Fn() + Send + 'static) {
        let c = Arc::new(AtomicUsize::new(0));
        let c2 = Arc::clone(&c);
        (c, move || {
            c2.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn a_second_guest_is_refused_while_the_first_runs() {
        let ledger = DeviceLedger::default();
        assert_eq!(ledger.claim(1, || ()), Claim::Granted);
        assert_eq!(ledger.claim(1, || ()), Claim::Granted);
        assert_eq!(ledger.claim(2, || ()), Claim::Refused { holder: 1 });
        assert!(!ledger.release(2), "a non-holder releases nothing");
        assert_eq!(ledger.holder(), Some(1));
        assert!(ledger.release(1));
        assert_eq!(ledger.claim(2, || ()), Claim::Granted);
    }

    #[test]
    fn a_migration_destination_waits_and_is_woken_once_at_the_release() {
        let ledger = DeviceLedger::default();
        assert_eq!(ledger.claim(1, || ()), Claim::Granted);
        ledger.set_migrating(2, true); // not the holder: ignored
        assert_eq!(ledger.claim(2, || ()), Claim::Refused { holder: 1 });
        ledger.set_migrating(1, true);
        let (woken, wake) = counter();
        assert_eq!(ledger.claim(2, wake), Claim::Wait);
        assert_eq!(
            ledger.claim(2, || ()),
            Claim::Wait,
            "a repeated claim keeps one waker"
        );
        assert_eq!(woken.load(Ordering::SeqCst), 0);
        assert!(ledger.release(1));
        assert_eq!(woken.load(Ordering::SeqCst), 1);
        assert_eq!(ledger.claim(2, || ()), Claim::Granted);
        // The new holder is not migrating: the old source, resuming, is refused.
        assert_eq!(ledger.claim(1, || ()), Claim::Refused { holder: 2 });
    }

    #[test]
    fn a_waiter_that_leaves_is_not_woken() {
        let ledger = DeviceLedger::default();
        ledger.claim(1, || ());
        ledger.set_migrating(1, true);
        let (woken, wake) = counter();
        assert_eq!(ledger.claim(2, wake), Claim::Wait);
        assert!(!ledger.release(2));
        assert!(ledger.release(1));
        assert_eq!(woken.load(Ordering::SeqCst), 0);
    }
}
