//! Rate limits for the lines that unauthenticated rejects write.
//!
//! A client without credentials chooses how many requests it sends, and each reject
//! (an unknown path, a failed signature, a body that never came) used to write a line:
//! 56,000 junk requests in 8 s wrote 56,000 lines. Each kind of reject now writes at
//! most [`LINES_PER_SECOND`] lines a second; the rest are counted
//! (`xks_log_lines_suppressed_total{kind}`), and the first line after a second with
//! suppressed lines is preceded by one that says how many. Audit lines of
//! authenticated requests are never limited.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Lines each kind of reject may write in a second.
pub const LINES_PER_SECOND: u32 = 20;

/// A kind of unauthenticated reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No route: an unknown path or method.
    Routing,
    /// SigV4 failed (and the request's audit line with it).
    Authentication,
    /// The body was refused before authentication (too large, too slow, unreadable).
    Body,
}

impl Kind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Routing => "routing",
            Self::Authentication => "authentication",
            Self::Body => "body",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Routing => 0,
            Self::Authentication => 1,
            Self::Body => 2,
        }
    }
}

/// Whether to write a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it; first say that `suppressed_before` similar lines were left out (when
    /// not zero).
    Write {
        /// Lines of this kind suppressed since the last one written.
        suppressed_before: u64,
    },
    /// Leave it out (counted).
    Suppress,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
}

/// One window a second per kind.
#[derive(Debug)]
pub struct Limiter {
    windows: [Mutex<Window>; 3],
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Limiter {
    /// A limiter whose first windows start at `now`.
    pub fn new(now: Instant) -> Self {
        let window = || {
            Mutex::new(Window {
                started: now,
                written: 0,
                suppressed: 0,
            })
        };
        Self {
            windows: [window(), window(), window()],
        }
    }

    /// Whether a line of `kind` may be written at `now`.
    pub fn check(&self, kind: Kind, now: Instant) -> Verdict {
        let mut window = self.windows[kind.index()].lock();
        if now.saturating_duration_since(window.started) >= Duration::from_secs(1) {
            window.started = now;
            window.written = 0;
        }
        if window.written >= LINES_PER_SECOND {
            window.suppressed += 1;
            return Verdict::Suppress;
        }
        window.written += 1;
        Verdict::Write {
            suppressed_before: std::mem::take(&mut window.suppressed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_a_few_lines_a_second_and_says_how_many_it_left_out() {
        let t0 = Instant::now();
        let limiter = Limiter::new(t0);
        let verdicts: Vec<_> = (0..1000)
            .map(|_| limiter.check(Kind::Routing, t0))
            .collect();
        let written = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Write { .. }))
            .count();
        assert_eq!(written, LINES_PER_SECOND as usize);
        // Another kind has its own budget.
        assert_eq!(
            limiter.check(Kind::Authentication, t0),
            Verdict::Write {
                suppressed_before: 0
            }
        );
        // A second later the first line carries the count of those left out.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            limiter.check(Kind::Routing, later),
            Verdict::Write {
                suppressed_before: 1000 - u64::from(LINES_PER_SECOND)
            }
        );
        assert_eq!(
            limiter.check(Kind::Routing, later),
            Verdict::Write {
                suppressed_before: 0
            }
        );
    }
}
