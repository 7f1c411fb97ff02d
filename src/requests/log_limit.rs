//! At most a few log lines a second for events a guest or a failing disk can repeat at will
//! (rejected chains, failed I/O): counted always, logged up to a rate, with the number left
//! out since the last line, so a hostile guest cannot flood the host's journal.

use std::time::{Duration, Instant};

/// Lines per window (per kind, per queue).
pub const LINES_PER_WINDOW: u32 = 5;
pub const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct LogLimit {
    window_start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl Default for LogLimit {
    fn default() -> LogLimit {
        LogLimit::new()
    }
}

impl LogLimit {
    pub const fn new() -> LogLimit {
        LogLimit {
            window_start: None,
            lines: 0,
            suppressed: 0,
        }
    }

    /// One more event at `now`: `Some(left_out)` if it may be logged (with how many were
    /// left out since the last logged one), `None` if it must not.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.lines = 0;
        }
        if self.lines < LINES_PER_WINDOW {
            self.lines += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_logs_a_few_lines_and_the_next_window_says_how_many_were_left_out() {
        let mut limit = LogLimit::new();
        let t0 = Instant::now();
        let logged: Vec<u64> = (0..1000).filter_map(|_| limit.allow(t0)).collect();
        assert_eq!(logged, vec![0; LINES_PER_WINDOW as usize]);
        let later = t0 + WINDOW;
        assert_eq!(limit.allow(later), Some(1000 - u64::from(LINES_PER_WINDOW)));
        assert_eq!(limit.allow(later), Some(0));
    }
}
