//! When a queue thread without work spins instead of sleeping in epoll.
//!
//! Spinning saves the guest a kick and us a wakeup when the next request comes soon. It pays
//! only in two conditions, both measured with `benches/stability.sh` and `perf sched`:
//!
//! - **Nothing is in flight.** While io_uring operations are outstanding their completions come
//!   by interrupt; a spinning thread is interrupted once per completion (a reschedule IPI and
//!   task_work each time) and hands each one back alone, where a sleeping thread is woken once
//!   for a batch. On XFS over a loop device, spinning on completions cost 6.4–8.8 µs of CPU
//!   per 4 KiB write against 4.2–5.8 µs sleeping (3 alternating rounds), for no gain in IOPS.
//!   So only the wait for the guest's next request is polled; the storage wait is slept.
//! - **The CPU is not shared with another busy task.** A spinning thread stays runnable, so
//!   when a neighbour (another daemon, a build) runs, the scheduler takes turns at tick
//!   granularity and every request waiting meanwhile waits a tick (4 ms here); a sleeping
//!   thread is woken by the kick and preempts the neighbour. The governor notices that it was
//!   descheduled while spinning (a gap between two spin iterations) and stops spinning for a
//!   while, doubling the pause each time it happens again right after one.

use std::time::{Duration, Instant};

/// A gap this long between two spin iterations means another task ran on our CPU (interrupts
/// and softirqs take microseconds, a neighbour's turn milliseconds).
const PREEMPTED_GAP: Duration = Duration::from_micros(50);
/// First pause after being preempted while spinning.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause: how late at worst polling comes back once the neighbour is gone.
const MAX_PAUSE: Duration = Duration::from_millis(3200);

#[derive(Debug)]
pub struct PollGovernor {
    /// `--poll-us`: the longest spin; zero disables polling.
    window: Duration,
    /// The last pause: when it ends (no spinning before then) and how long it was.
    last_pause: Option<(Instant, Duration)>,
    /// Times polling was paused (for the session log).
    pauses: u64,
}

impl PollGovernor {
    pub fn new(window: Duration) -> PollGovernor {
        PollGovernor {
            window,
            last_pause: None,
            pauses: 0,
        }
    }

    /// Whether to keep spinning at `now`: the queue went idle at `idle_since` with `in_flight`
    /// requests waiting for the storage.
    pub fn keep_spinning(&mut self, now: Instant, idle_since: Instant, in_flight: usize) -> bool {
        if self.window.is_zero() || in_flight > 0 {
            return false;
        }
        if matches!(self.last_pause, Some((end, _)) if now < end) {
            return false;
        }
        now.duration_since(idle_since) < self.window
    }

    /// One spin iteration ran at `now`, the one before it at `previous`. Returns true when the
    /// gap shows the thread was descheduled, and polling is paused from now.
    pub fn spun(&mut self, previous: Instant, now: Instant) -> bool {
        if now.duration_since(previous) < PREEMPTED_GAP {
            return false;
        }
        // Preempted again soon after the last pause: the neighbour is still there, pause
        // longer. Polled that long without preemption: it left, start short again.
        let pause = match self.last_pause {
            Some((end, last)) if now.saturating_duration_since(end) <= last => {
                (last * 2).min(MAX_PAUSE)
            }
            _ => FIRST_PAUSE,
        };
        self.last_pause = Some((now + pause, pause));
        self.pauses += 1;
        true
    }

    pub fn pauses(&self) -> u64 {
        self.pauses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_micros(50);

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn spins_for_the_window_then_sleeps() {
        let mut g = PollGovernor::new(WINDOW);
        let idle = Instant::now();
        assert!(g.keep_spinning(idle, idle, 0));
        assert!(g.keep_spinning(idle + us(49), idle, 0));
        assert!(!g.keep_spinning(idle + us(50), idle, 0));
    }

    #[test]
    fn never_spins_with_polling_off_or_io_in_flight() {
        let idle = Instant::now();
        assert!(!PollGovernor::new(Duration::ZERO).keep_spinning(idle, idle, 0));
        assert!(!PollGovernor::new(WINDOW).keep_spinning(idle, idle, 1));
    }

    #[test]
    fn short_gaps_are_not_preemption() {
        let mut g = PollGovernor::new(WINDOW);
        let t = Instant::now();
        assert!(!g.spun(t, t + us(49)));
        assert!(g.keep_spinning(t + us(49), t, 0));
        assert_eq!(g.pauses(), 0);
    }

    #[test]
    fn preemption_pauses_polling_and_repeated_preemption_pauses_longer() {
        let mut g = PollGovernor::new(WINDOW);
        let t = Instant::now();
        assert!(g.spun(t, t + us(4000)));
        let after = t + us(4000);
        // Paused for 100 ms: no spinning, even right at the start of an idle period.
        assert!(!g.keep_spinning(after + us(1), after + us(1), 0));
        assert!(!g.keep_spinning(after + us(99_999), after + us(99_999), 0));
        let resumed = after + FIRST_PAUSE;
        assert!(g.keep_spinning(resumed, resumed, 0));
        // Preempted again at once: the next pause is twice as long.
        assert!(g.spun(resumed, resumed + us(4000)));
        let again = resumed + us(4000);
        assert!(!g.keep_spinning(again + us(199_999), again + us(199_999), 0));
        assert!(g.keep_spinning(again + 2 * FIRST_PAUSE, again + 2 * FIRST_PAUSE, 0));
        assert_eq!(g.pauses(), 2);
    }

    #[test]
    fn the_pause_stops_growing_and_resets_once_the_neighbour_is_gone() {
        let mut g = PollGovernor::new(WINDOW);
        let mut t = Instant::now();
        for _ in 0..10 {
            assert!(g.spun(t, t + us(4000)));
            let (end, _) = g.last_pause.unwrap();
            assert!(g.keep_spinning(end, end, 0));
            t = end;
        }
        assert_eq!(g.last_pause.unwrap().1, MAX_PAUSE);
        // Preempted long after the last pause ended (polling went well meanwhile): short again.
        let later = t + MAX_PAUSE * 2;
        assert!(g.spun(later, later + us(4000)));
        assert_eq!(g.last_pause.unwrap().1, FIRST_PAUSE);
    }
}
