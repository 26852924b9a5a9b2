//! A log writer that takes the write system call off the request path.
//!
//! Every request writes an audit line. Written directly, each line is one `write` to
//! stderr made by the tokio worker that served the request, under stderr's lock: about
//! a quarter of the proxy's CPU at 25k requests a second, and a stall for every request
//! whenever the log's reader is slow. [`LogWriter`] appends each formatted line to a
//! shared buffer instead, and a thread of its own writes the buffer out:
//!
//! - **Group commit.** The writer thread is woken only when it is idle. After each
//!   write it lingers for [`LINGER`] (still counted as busy, so nobody wakes it), and
//!   the lines logged meanwhile go out together in its next write: under load one
//!   system call carries many lines and no logging thread makes one; when the proxy is
//!   quiet a line leaves at once.
//! - **Whole lines.** `tracing-subscriber` formats an event into a buffer and hands it
//!   over in one `write`; each `write` is appended whole, so lines never interleave.
//! - **Bounded, and never a reason to hang.** The buffer never grows past its limit
//!   ([`MAX_PENDING`] by default). An audit line (an event with a `kms_request_id`
//!   field: one per request) waits for room, so none is ever lost; any other line is
//!   dropped when there is none, and counted ([`dropped`]). Above three quarters of the
//!   limit the writer is *congested* ([`congested`]): the server then refuses new
//!   requests at once and turns readiness off, so the lines of the requests already in
//!   flight fit in the last quarter, and no tokio worker, probe or scrape waits on a
//!   log reader that stopped reading.
//! - **Rate-limited where a client chooses the volume.** [`limit`] caps the lines that
//!   unauthenticated rejects write, and counts what it suppresses.
//! - **Flushed on exit.** [`LogWriter::flush`] writes out everything pending; `main`
//!   calls it on the way out and from the panic hook.

pub mod limit;
mod text;

pub use text::{TextFields, TextFormat};

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Pending bytes above which a logging thread waits for the writer.
pub const MAX_PENDING: usize = 8 << 20;
/// After each write the writer waits this long, gathering the lines logged meanwhile
/// into its next write: at most one write every 2 ms however busy the proxy is. A line
/// logged when nothing was written for that long leaves at once.
pub const LINGER: Duration = Duration::from_millis(2);

/// Shares one buffer between the threads that log and the thread that writes.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogWriter").finish_non_exhaustive()
    }
}

struct Shared {
    state: Mutex<State>,
    /// `state.pending.len()`, readable without the lock.
    pending: AtomicUsize,
    /// Lines other than audit lines dropped for want of room.
    dropped: AtomicU64,
    /// The writer thread waits here for work.
    work: Condvar,
    /// Logging threads (over the limit) and `flush` wait here for a batch to be out.
    drained: Condvar,
    max_pending: AtomicUsize,
    /// After a write, the writer waits this long before the next one.
    linger: Duration,
}

struct State {
    pending: Vec<u8>,
    /// The writer is in a write system call (or about to make one).
    writing: bool,
    /// Bytes ever appended, and ever written out: `flush` waits for the second to
    /// reach what the first was when it was called.
    appended: u64,
    written: u64,
    /// The writer thread exits when this is set and nothing is pending.
    closing: bool,
    /// Threads waiting in `flush`: the writer does not linger.
    flushing: usize,
}

impl LogWriter {
    /// Starts the writer thread, writing to `out` (stderr in the proxy).
    pub fn start(out: impl Write + Send + 'static) -> io::Result<Self> {
        Self::with_limit(out, MAX_PENDING)
    }

    fn with_limit(mut out: impl Write + Send + 'static, max_pending: usize) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::with_capacity(64 * 1024),
                writing: false,
                appended: 0,
                written: 0,
                closing: false,
                flushing: 0,
            }),
            work: Condvar::new(),
            drained: Condvar::new(),
            pending: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            max_pending: AtomicUsize::new(max_pending),
            linger: LINGER,
        });
        let writer = Arc::clone(&shared);
        thread::Builder::new()
            .name("xks-log".into())
            .spawn(move || writer.run(&mut out))?;
        Ok(Self { shared })
    }

    /// Writes out everything logged so far and waits until it is written.
    pub fn flush(&self) {
        self.flush_within(None);
    }

    /// As [`Self::flush`], but gives up after `limit` (for the panic hook, which must not
    /// hang if the writer cannot write).
    pub fn flush_within(&self, limit: Option<Duration>) {
        let deadline = limit.map(|l| Instant::now() + l);
        let mut state = match deadline {
            Some(deadline) => match self.shared.state.try_lock_until(deadline) {
                Some(state) => state,
                None => return,
            },
            None => self.shared.state.lock(),
        };
        let target = state.appended;
        // No lingering while someone waits for the writer.
        state.flushing += 1;
        self.shared.work.notify_one();
        while state.written < target {
            match deadline {
                Some(deadline) => {
                    if self
                        .shared
                        .drained
                        .wait_until(&mut state, deadline)
                        .timed_out()
                    {
                        break;
                    }
                }
                None => self.shared.drained.wait(&mut state),
            }
        }
        state.flushing -= 1;
    }

    /// Stops the writer thread after it has written everything pending.
    pub fn close(&self) {
        self.flush();
        self.shared.state.lock().closing = true;
        self.shared.work.notify_one();
    }

    /// The process's writer, for [`congested`] and [`dropped`]: `main` registers the
    /// one its subscriber writes to.
    pub fn register(&self) {
        let _ = REGISTERED.set(Arc::clone(&self.shared));
    }

    /// Changes the buffer's limit (`server.log_buffer_bytes`).
    pub fn set_limit(&self, bytes: usize) {
        self.shared
            .max_pending
            .store(bytes.max(1), Ordering::Relaxed);
        self.shared.drained.notify_all();
    }

    /// True above three quarters of the limit: new work should be refused.
    pub fn is_congested(&self) -> bool {
        self.shared.congested()
    }

    fn append(&self, line: &[u8], audit: bool) {
        let mut state = self.shared.state.lock();
        let max = self.shared.max_pending.load(Ordering::Relaxed);
        if !audit && state.pending.len() + line.len() > max && !state.closing {
            // Only audit lines wait for room; another line is not worth a stalled thread.
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.work.notify_one();
            return;
        }
        while state.pending.len() >= self.shared.max_pending.load(Ordering::Relaxed)
            && !state.closing
        {
            self.shared.work.notify_one();
            self.shared.drained.wait(&mut state);
        }
        state.pending.extend_from_slice(line);
        self.shared
            .pending
            .store(state.pending.len(), Ordering::Relaxed);
        state.appended += line.len() as u64;
        if !state.writing {
            // Idle writer: wake it. A busy one picks this line up with its next batch.
            state.writing = true;
            self.shared.work.notify_one();
        }
    }
}

/// The writer `main` registered ([`LogWriter::register`]).
static REGISTERED: OnceLock<Arc<Shared>> = OnceLock::new();

/// Whether the registered log writer is congested (above three quarters of its limit):
/// the server refuses new requests and reports itself unready meanwhile. One atomic
/// read; false when no writer is registered (tests, benches).
pub fn congested() -> bool {
    REGISTERED.get().is_some_and(|shared| shared.congested())
}

/// Lines other than audit lines the registered writer dropped for want of room.
pub fn dropped() -> u64 {
    REGISTERED
        .get()
        .map_or(0, |shared| shared.dropped.load(Ordering::Relaxed))
}

impl Shared {
    fn congested(&self) -> bool {
        let max = self.max_pending.load(Ordering::Relaxed);
        self.pending.load(Ordering::Relaxed) >= max - max / 4
    }

    fn run(&self, out: &mut dyn Write) {
        let mut batch = Vec::with_capacity(64 * 1024);
        let mut state = self.state.lock();
        loop {
            while state.pending.is_empty() {
                state.writing = false;
                if state.closing {
                    return;
                }
                self.work.wait(&mut state);
            }
            state.writing = true;
            std::mem::swap(&mut state.pending, &mut batch);
            self.pending.store(0, Ordering::Relaxed);
            drop(state);
            // Nothing to do on failure: there is nowhere else to report it, and a
            // logging failure must not stop the proxy (as with a plain stderr write).
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            let done = batch.len() as u64;
            // Do not keep a huge buffer after a burst.
            if batch.capacity() > 1 << 20 {
                batch = Vec::with_capacity(64 * 1024);
            } else {
                batch.clear();
            }
            state = self.state.lock();
            state.written += done;
            self.drained.notify_all();
            // Linger (still marked as writing, so nobody wakes us for one line): what is
            // logged meanwhile leaves in one write. `flush`, `close` and a full buffer
            // cut this short.
            if state.pending.len() < self.max_pending.load(Ordering::Relaxed)
                && !state.closing
                && state.flushing == 0
            {
                let _ = self.work.wait_for(&mut state, self.linger);
            }
        }
    }
}

/// What `tracing-subscriber` writes one event into.
#[derive(Debug)]
pub struct LineWriter<'a> {
    writer: &'a LogWriter,
    /// An audit line: it waits for room rather than being dropped.
    audit: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.append(buf, self.audit);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            writer: self,
            audit: true,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        LineWriter {
            writer: self,
            audit: is_audit(meta),
        }
    }
}

/// The field only the per-request audit line has (server::service, `log_request`).
pub const AUDIT_FIELD: &str = "kms_request_id";

/// Whether an event is a per-request audit line, which is never dropped.
fn is_audit(meta: &tracing::Metadata<'_>) -> bool {
    meta.fields().field(AUDIT_FIELD).is_some()
}

/// The subscriber `xks-proxy serve` logs through in its default format when stderr is
/// not a terminal: the text format without colour, written by [`TextFormat`] into
/// `writer`. The instruction-count bench installs the same one, so the audit line's
/// cost is counted as the proxy pays it.
pub fn text_subscriber(
    filter: tracing_subscriber::EnvFilter,
    writer: LogWriter,
) -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(writer)
        .fmt_fields(TextFields)
        .event_format(TextFormat)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An output that records each write call, optionally slowly.
    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
        delay: Duration,
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            thread::sleep(self.delay);
            self.writes.lock().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Recorder {
        fn text(&self) -> String {
            String::from_utf8(self.writes.lock().concat()).unwrap()
        }
    }

    fn line(writer: &LogWriter, text: &str) {
        use tracing_subscriber::fmt::MakeWriter as _;
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn an_idle_writer_writes_a_line_at_once() {
        let out = Recorder::default();
        let writer = LogWriter::start(out.clone()).unwrap();
        line(&writer, "one\n");
        // No flush: the idle writer thread was woken by the line itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.text() != "one\n" {
            assert!(Instant::now() < deadline, "the line never left");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn lines_logged_during_a_write_leave_together_and_whole() {
        let out = Recorder {
            delay: Duration::from_millis(20),
            ..Recorder::default()
        };
        let writer = LogWriter::start(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                thread::spawn(move || {
                    for i in 0..50 {
                        line(
                            &writer,
                            &format!("thread {t} line {i} {}\n", "x".repeat(40)),
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        writer.flush();
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 200);
        for t in 0..4 {
            // Whole lines, each thread's in its order.
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> = (0..50)
                .map(|i| format!("thread {t} line {i} {}", "x".repeat(40)))
                .collect();
            assert_eq!(mine, expected);
        }
        // 200 lines while each write takes 20 ms: batched into far fewer writes.
        let writes = out.writes.lock().len();
        assert!(writes < 50, "{writes} writes for 200 lines");
    }

    #[test]
    fn a_full_buffer_makes_the_logger_wait_instead_of_growing() {
        let out = Recorder {
            delay: Duration::from_millis(5),
            ..Recorder::default()
        };
        let writer = LogWriter::with_limit(out.clone(), 100).unwrap();
        let biggest = Arc::new(Mutex::new(0usize));
        for i in 0..40 {
            line(&writer, &format!("line {i:04} {}\n", "y".repeat(30)));
            let pending = writer.shared.state.lock().pending.len();
            let mut b = biggest.lock();
            *b = (*b).max(pending);
        }
        writer.flush();
        // One line may go past the limit, never more.
        assert!(
            *biggest.lock() < 100 + 41,
            "pending grew to {}",
            biggest.lock()
        );
        assert_eq!(out.text().lines().count(), 40);
    }

    /// An output that blocks every write until it is opened.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        out: Recorder,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut is_open = open.lock();
            while !*is_open {
                opened.wait(&mut is_open);
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_congests_the_writer_which_drops_only_other_lines() {
        let gate = Gate::default();
        let writer = LogWriter::with_limit(gate.clone(), 1000).unwrap();
        assert!(!writer.is_congested());
        // The first line goes to the (blocked) write; the rest pile up.
        let audit = |i: usize| format!("audit {i:04} {}\n", "a".repeat(40));
        let mut sent = 0;
        while !writer.is_congested() {
            line(&writer, &audit(sent));
            sent += 1;
            assert!(sent < 100, "never congested");
        }
        let pending = writer.shared.pending.load(Ordering::Relaxed);
        assert!((750..1000).contains(&pending), "{pending}");
        // Up to the limit other lines still fit; past it they are dropped at once.
        for _ in 0..20 {
            writer.append(b"other line that is not an audit line\n", false);
        }
        assert!(writer.shared.dropped.load(Ordering::Relaxed) > 0);
        assert!(writer.shared.pending.load(Ordering::Relaxed) <= 1000);
        // The reader resumes: every audit line arrives, in order.
        {
            let (open, opened) = &*gate.open;
            *open.lock() = true;
            opened.notify_all();
        }
        writer.flush();
        let text = gate.out.text();
        let audits: Vec<&str> = text.lines().filter(|l| l.starts_with("audit")).collect();
        assert_eq!(audits.len(), sent);
        assert!(!writer.is_congested());
    }

    #[test]
    fn flush_and_close_write_everything_pending() {
        let out = Recorder {
            delay: Duration::from_millis(10),
            ..Recorder::default()
        };
        let writer = LogWriter::start(out.clone()).unwrap();
        for i in 0..20 {
            line(&writer, &format!("{i}\n"));
        }
        writer.close();
        let expected: String = (0..20).map(|i| format!("{i}\n")).collect();
        assert_eq!(out.text(), expected);
    }
}
