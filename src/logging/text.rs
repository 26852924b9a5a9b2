//! The text log format, line for line what `tracing-subscriber`'s default (`Full`,
//! without colours) writes, at a fraction of the cost.
//!
//! Every request writes an audit line of seventeen fields. The default formatter sends
//! each piece of it through `core::fmt`: the timestamp is formatted field by field, the
//! level and target through no-op colour styles, every string through `Debug` and,
//! for the message, an escaper that writes one `char` at a time. That was ≈ 7 % of the
//! proxy's CPU. Here the common cases are copied as they are: the timestamp from a
//! per-thread cache of the current second, strings that need no escaping between
//! quotes, integers without `core::fmt`. Anything else (other `Debug` values, strings
//! that need escaping) goes through `core::fmt` exactly as the default does, so the
//! output stays the same; a test compares the two on every kind of field.
//!
//! With colours (stderr is a terminal) the default formatter is used.

use std::cell::{Cell, RefCell};
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// The event format: `2026-11-23T14:49:53.123456Z  INFO target: message k=v ...`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFormat;

/// The field format of [`TextFormat`], for events and spans alike.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextFields;

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Events from the `log` crate carry their own target in `log.*` fields.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        write_timestamp(&mut writer, SystemTime::now())?;
        writer.write_str(level_str(meta.level()))?;
        writer.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                seen = true;
                writer.write_str(span.metadata().name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>() {
                    if !fields.is_empty() {
                        writer.write_char('{')?;
                        writer.write_str(fields)?;
                        writer.write_char('}')?;
                    }
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

thread_local! {
    /// An event's fields, gathered here and handed to the writer in one piece. Each
    /// piece written to `Writer` is a dynamic call and a `memcpy`, about a hundred for
    /// the audit line; pushed onto a `String` the punctuation is a store.
    static FIELDS: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A gathering buffer grown past this by an unusual event is not kept.
const FIELDS_KEPT: usize = 16 * 1024;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        FIELDS.with(|cell| match cell.try_borrow_mut() {
            Ok(mut buffer) => {
                buffer.clear();
                let result = record_fields(&mut *buffer, &fields);
                let written = writer.write_str(&buffer);
                if buffer.capacity() > FIELDS_KEPT {
                    *buffer = String::new();
                }
                result.and(written)
            }
            // A value whose `Debug` logs while it is being formatted: write directly.
            Err(_) => record_fields(&mut writer, &fields),
        })
    }
}

fn record_fields<W: fmt::Write, R: RecordFields>(writer: &mut W, fields: &R) -> fmt::Result {
    let mut visitor = FieldVisitor {
        writer,
        first: true,
        result: Ok(()),
    };
    fields.record(&mut visitor);
    visitor.result
}

/// Level as the default formatter pads it: five characters, right-aligned.
fn level_str(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

thread_local! {
    /// The Unix second last formatted on this thread, and its `YYYY-MM-DDTHH:MM:SS.`.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ ` in UTC, as `tracing-subscriber`'s `SystemTime` timer.
fn write_timestamp(writer: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (cached, mut prefix) = SECOND.with(Cell::get);
    if cached != seconds {
        let at = i64::try_from(seconds)
            .ok()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let mut text = String::with_capacity(20);
        let _ = write!(
            text,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        );
        if text.len() != prefix.len() {
            // A year beyond 9999: not worth a cache.
            return write!(writer, "{text}{:06}Z ", since.subsec_micros());
        }
        prefix.copy_from_slice(text.as_bytes());
        SECOND.with(|s| s.set((seconds, prefix)));
    }
    let mut line = [0u8; 28];
    line[..20].copy_from_slice(&prefix);
    let mut micros = since.subsec_micros();
    for digit in line[20..26].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    line[26] = b'Z';
    line[27] = b' ';
    writer.write_str(std::str::from_utf8(&line).expect("digits and ASCII punctuation"))
}

/// Writes fields as `DefaultFields` does: `message` bare (control sequences escaped),
/// the rest as `name=value` with `Debug` values, separated by spaces.
struct FieldVisitor<'writer, W: fmt::Write> {
    writer: &'writer mut W,
    first: bool,
    result: fmt::Result,
}

impl<W: fmt::Write> FieldVisitor<'_, W> {
    /// The separator, and the field's name unless it is the message. False when the
    /// field is not written at all.
    fn start(&mut self, field: &Field) -> bool {
        let name = field.name();
        // `log.*` fields are the metadata of `log` records, already in the prefix.
        if self.result.is_err() || name.starts_with("log.") {
            return false;
        }
        if self.first {
            self.first = false;
        } else {
            self.result = self.writer.write_str(" ");
        }
        if name != "message" {
            let name = name.strip_prefix("r#").unwrap_or(name);
            self.result = self
                .result
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_str("="));
        }
        self.result.is_ok()
    }

    fn write_integer(&mut self, field: &Field, negative: bool, mut value: u64) {
        if !self.start(field) {
            return;
        }
        let mut digits = [0u8; 21];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        if negative {
            at -= 1;
            digits[at] = b'-';
        }
        self.result = self
            .writer
            .write_str(std::str::from_utf8(&digits[at..]).expect("ASCII digits"));
    }
}

impl<W: fmt::Write> Visit for FieldVisitor<'_, W> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            Escaping(&mut *self.writer).write_str(value)
        } else if !needs_debug_escape(value) {
            // `Debug` of a string that needs no escaping: the string between quotes.
            self.writer
                .write_str("\"")
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_str("\""))
        } else {
            write!(self.writer, "{value:?}")
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.write_integer(field, false, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.write_integer(field, value < 0, value.unsigned_abs());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.start(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.start(field) {
            return;
        }
        self.result = write!(Escaping(&mut *self.writer), "{value}");
        if value.source().is_some() {
            let name = field.name();
            self.result = self.result.and_then(|()| {
                write!(self.writer, " {name}.sources=[")?;
                let mut error = value.source();
                let mut first = true;
                while let Some(e) = error {
                    if !first {
                        self.writer.write_str(", ")?;
                    }
                    first = false;
                    write!(Escaping(&mut *self.writer), "{e}")?;
                    error = e.source();
                }
                self.writer.write_char(']')
            });
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.start(field) {
            return;
        }
        self.result = if field.name() == "message" {
            write!(Escaping(&mut *self.writer), "{value:?}")
        } else {
            write!(self.writer, "{value:?}")
        };
    }
}

/// Whether `Debug` of `value` is anything but `value` between quotes: a byte outside
/// printable ASCII, a quote or a backslash. Written as a sum over every byte, with no
/// early exit, so that the compiler checks many bytes at a time.
fn needs_debug_escape(value: &str) -> bool {
    value
        .bytes()
        .map(|b| u8::from(!(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\'))
        .fold(0u8, |seen, flag| seen | flag)
        != 0
}

/// Escapes the control characters a terminal could act on, as `tracing-subscriber`
/// does for messages: ESC, BEL, BS, FF, DEL and the C1 controls.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // C1 controls (U+0080..U+009F) are encoded as 0xC2 0x80..0x9F.
        if !s.bytes().any(|b| b < 0x20 || b == 0x7f || b == 0xc2) {
            return self.0.write_str(s);
        }
        for c in s.chars() {
            match c {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                c => self.0.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;
    use tracing::subscriber::with_default;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Self;
        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    impl Buffer {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    #[derive(Debug)]
    struct Outer(Inner);
    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer \x1b[31mfailed")
        }
    }
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("inner cause")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    impl std::error::Error for Inner {}

    /// Every kind of event and field the proxy logs, and the awkward ones.
    fn events() {
        let long = "arn:aws:iam::123456789012:role/".repeat(12);
        tracing::info!(
            long = long.as_str(),
            key_store = %"bench",
            operation = "Encrypt",
            key_id = "foo",
            quoted = "say \"hi\" \\ now",
            backslash = "C:\\path",
            control = "tab\there\nnewline \x1b[2J",
            unicode = "clé 🔑 \u{85}",
            empty = "",
            latency_us = 97u64,
            big = u64::MAX,
            negative = -42i64,
            min = i64::MIN,
            flag = true,
            ratio = 0.25f64,
            debug = ?Some("x"),
            r#type = "raw",
            "xks request"
        );
        tracing::warn!("message only, with \x1b[31m escape \u{9b} and \x07 bell");
        tracing::error!(answer = 42, "formatted {} message", "a");
        let with_source: &(dyn std::error::Error + 'static) = &Outer(Inner);
        tracing::warn!(error = with_source, "with sources");
        let without: &(dyn std::error::Error + 'static) = &Inner;
        tracing::warn!(error = without, "no sources");
        tracing::debug!(hidden = 1, "below the filter");
        let span = tracing::info_span!("connection", peer = "127.0.0.1:1234", id = 7u64);
        let _in = span.enter();
        let inner = tracing::info_span!("request");
        let _also = inner.enter();
        tracing::info!(status = 200u64, "in spans");
        tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("from the log crate"))
                .level(log::Level::Warn)
                .target("rustls::conn")
                .module_path(Some("rustls::conn"))
                .file(Some("conn.rs"))
                .line(Some(7))
                .build(),
        )
        .unwrap();
    }

    #[test]
    fn lines_are_those_of_the_default_format() {
        let ours = Buffer::default();
        let theirs = Buffer::default();
        with_default(
            tracing_subscriber::fmt()
                .with_max_level(Level::INFO)
                .with_ansi(false)
                .with_writer(theirs.clone())
                .finish(),
            events,
        );
        with_default(
            tracing_subscriber::fmt()
                .with_max_level(Level::INFO)
                .with_ansi(false)
                .fmt_fields(TextFields)
                .event_format(TextFormat)
                .with_writer(ours.clone())
                .finish(),
            events,
        );
        let (ours, theirs) = (ours.lines(), theirs.lines());
        assert_eq!(ours.len(), 7, "{ours:#?}");
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(&theirs) {
            // The same shape of timestamp; everything after it the same.
            let shape = |l: &str| {
                l[..28]
                    .bytes()
                    .map(|c| if c.is_ascii_digit() { b'9' } else { c })
                    .collect::<Vec<_>>()
            };
            assert_eq!(shape(a), b"9999-99-99T99:99:99.999999Z ");
            assert_eq!(shape(a), shape(b));
            assert_eq!(a[28..], b[28..]);
        }
        assert!(ours[0].contains(" INFO xks_proxy::logging::text::tests: xks request "));
        assert!(ours[5].contains(" INFO connection{peer=\"127.0.0.1:1234\" id=7}:request: "));
        assert!(ours[6].contains(":request: rustls::conn: from the log crate"));
    }

    #[test]
    fn strings_are_quoted_as_they_are_only_when_debug_would_not_escape_them() {
        let mut cases: Vec<String> = (0u8..0x80).map(|b| char::from(b).to_string()).collect();
        cases
            .extend(["é", "\u{85}", "🔑", "plain text", "a\"b", "a\\b", "tab\t"].map(String::from));
        cases.push(format!("{}\x7f", "x".repeat(100)));
        for s in cases {
            let debug = format!("{s:?}");
            let quoted = format!("\"{s}\"");
            if s.is_ascii() {
                assert_eq!(needs_debug_escape(&s), debug != quoted, "{s:?}");
            } else {
                // Beyond ASCII we leave the decision to `Debug`.
                assert!(needs_debug_escape(&s), "{s:?}");
            }
        }
    }

    #[test]
    fn timestamps_are_utc_with_microseconds_across_seconds() {
        for (at, text) in [
            (0, "1970-01-01T00:00:00.000000Z "),
            (1_795_000_000_123_456, "2026-11-18T11:06:40.123456Z "),
            (1_795_000_001_000_001, "2026-11-18T11:06:41.000001Z "),
            (1_795_000_001_999_999, "2026-11-18T11:06:41.999999Z "),
            (951_782_400_000_000, "2000-02-29T00:00:00.000000Z "),
        ] {
            let mut out = String::new();
            let now = UNIX_EPOCH + std::time::Duration::from_micros(at);
            write_timestamp(&mut out, now).unwrap();
            assert_eq!(out, text);
        }
    }
}
