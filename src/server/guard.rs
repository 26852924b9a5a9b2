//! What one client connection may hold, and for how long, before it authenticates.
//!
//! A connection slot (`server.max_connections`) is the scarce thing an unauthenticated
//! client could take; each connection therefore carries a [`ConnectionClock`] and
//! [`ConnectionClock::expired`] closes it when one of these ends:
//!
//! - **Unauthenticated lifetime.** A connection that has served no authenticated
//!   request is closed `server.unauthenticated_timeout_seconds` after it opened,
//!   whatever it sends meanwhile (probes, junk, slow bodies, an idle HTTP/2 connection).
//! - **Idleness.** Once a request has authenticated, the connection lives until
//!   `server.idle_timeout_seconds` have passed since its last authenticated request
//!   ended with none in flight: KMS keeps connections to reuse them, and requests that
//!   fail authentication do not extend that life.
//! - **Header reading (HTTP/1.1).** A request's head must be complete within
//!   `server.header_read_timeout_seconds` of its first byte. hyper's own header timer
//!   also runs while a kept-alive connection waits for its next request, so it would
//!   close KMS's idle connections after 10 s; [`GuardedIo`] sees the first byte of each
//!   request instead.
//! - **A slow body.** The service gives a request's body `server.body_read_timeout_ms`
//!   and, when it runs out, asks the connection to close ([`ConnectionClock::close`]).
//!
//! The checks run on a one-second tick per connection (and at once for a close asked
//! by the service), not per request: the request path pays two atomic stores.
//!
//! On HTTP/2 a client can also keep a connection busy without any request at all, with
//! PING, SETTINGS and other control frames that the server must answer or process.
//! [`GuardedIo`] counts them in the decrypted byte stream against a token bucket
//! ([`FrameMeter`]) and ends the connection when the bucket runs dry.
//!
//! [`ClientConnections`] bounds connections per client address
//! (`server.max_connections_per_client`).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::Limits;
use crate::metrics::Metrics;

/// Why the proxy closed a client connection (the `reason` label of
/// `xks_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No authenticated request within `server.unauthenticated_timeout_seconds`.
    Unauthenticated,
    /// No authenticated request for `server.idle_timeout_seconds`.
    Idle,
    /// An HTTP/1.1 request head not complete within `server.header_read_timeout_seconds`.
    HeaderTimeout,
    /// A request body not complete within `server.body_read_timeout_ms`.
    BodyTimeout,
    /// More HTTP/2 control frames than the budget allows.
    ControlFrameFlood,
    /// The client address already had `server.max_connections_per_client` connections.
    PerClientLimit,
}

impl CloseReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Idle => "idle",
            Self::HeaderTimeout => "header_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::ControlFrameFlood => "control_frame_flood",
            Self::PerClientLimit => "per_client_limit",
        }
    }
}

/// "Never" and "none" in the clock's millisecond fields.
const UNSET: u64 = u64::MAX;

/// How often a connection's deadlines are checked.
const TICK: Duration = Duration::from_secs(1);

/// One connection's requests and deadlines, shared by its service and its watchdog.
#[derive(Debug)]
pub struct ConnectionClock {
    epoch: Instant,
    /// Requests in service now.
    in_flight: AtomicUsize,
    /// Authenticated requests in service now: while one runs, nothing expires.
    authenticated_in_flight: AtomicUsize,
    /// When an authenticated request last ended (ms after `epoch`), [`UNSET`] if none has.
    last_authenticated_ms: AtomicU64,
    /// When the first byte of the HTTP/1.1 request head being read arrived (ms after
    /// `epoch`), [`UNSET`] while no head is being read.
    head_started_ms: AtomicU64,
    /// A close asked for by the service; the first reason stays.
    close_reason: OnceLock<CloseReason>,
    close_asked: Notify,
}

impl Default for ConnectionClock {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnectionClock {
    /// A clock for a connection opened now.
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            authenticated_in_flight: AtomicUsize::new(0),
            last_authenticated_ms: AtomicU64::new(UNSET),
            head_started_ms: AtomicU64::new(UNSET),
            close_reason: OnceLock::new(),
            close_asked: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A request's head is parsed and its service begins; dropping the guard ends it.
    pub fn request(&self) -> RequestGuard<'_> {
        self.head_started_ms.store(UNSET, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard {
            clock: self,
            authenticated: false,
        }
    }

    /// Bytes arrived from the client (HTTP/1.1): with no request in service, they
    /// start the next request's head, and its header-read deadline.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started_ms.load(Ordering::Relaxed) == UNSET
        {
            self.head_started_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Asks the connection to close once its requests in flight are answered.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.close_reason.set(reason);
        self.close_asked.notify_one();
    }

    /// True once the service asked the connection to close.
    pub fn closing(&self) -> bool {
        self.close_reason.get().is_some()
    }

    /// Completes with the reason when the connection must close: see the module's
    /// list. Cancel-safe.
    pub async fn expired(&self, limits: &Limits) -> CloseReason {
        let header = limits.header_read_timeout.as_millis() as u64;
        let idle = limits.idle_timeout.as_millis() as u64;
        let unauthenticated =
            (limits.unauthenticated_timeout.min(limits.idle_timeout)).as_millis() as u64;
        loop {
            if let Some(reason) = self.close_reason.get() {
                return *reason;
            }
            let now = self.now_ms();
            let mut next = now + TICK.as_millis() as u64;
            let head = self.head_started_ms.load(Ordering::Relaxed);
            if head != UNSET {
                if now >= head.saturating_add(header) {
                    return CloseReason::HeaderTimeout;
                }
                next = next.min(head + header);
            }
            if self.authenticated_in_flight.load(Ordering::Relaxed) == 0 {
                let (until, reason) = match self.last_authenticated_ms.load(Ordering::Relaxed) {
                    UNSET => (unauthenticated, CloseReason::Unauthenticated),
                    last => (last.saturating_add(idle), CloseReason::Idle),
                };
                if now >= until {
                    return reason;
                }
                next = next.min(until);
            }
            let wake = self.epoch + Duration::from_millis(next);
            tokio::select! {
                () = tokio::time::sleep_until(wake) => {}
                () = self.close_asked.notified() => {}
            }
        }
    }
}

/// A request in service on its connection.
#[derive(Debug)]
pub struct RequestGuard<'a> {
    clock: &'a ConnectionClock,
    authenticated: bool,
}

impl<'a> RequestGuard<'a> {
    /// The connection's clock.
    pub fn clock(&self) -> &'a ConnectionClock {
        self.clock
    }

    /// Whether the request passed SigV4.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// The request passed SigV4: from its end on, the connection counts as one that
    /// serves KMS, and it does not expire while the request runs.
    pub fn authenticated(&mut self) {
        if !self.authenticated {
            self.authenticated = true;
            self.clock
                .authenticated_in_flight
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestGuard<'_> {
    fn drop(&mut self) {
        let clock = self.clock;
        if self.authenticated {
            clock
                .last_authenticated_ms
                .store(clock.now_ms(), Ordering::Relaxed);
            clock
                .authenticated_in_flight
                .fetch_sub(1, Ordering::Relaxed);
        }
        clock.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The TLS stream of a connection, watched: the first byte of each HTTP/1.1 request
/// starts its header deadline, and HTTP/2 control frames are metered.
#[derive(Debug)]
pub struct GuardedIo<T> {
    inner: T,
    clock: Arc<ConnectionClock>,
    /// `Some` on HTTP/2.
    meter: Option<FrameMeter>,
    metrics: Arc<Metrics>,
}

impl<T> GuardedIo<T> {
    /// Watches `inner`, an HTTP/2 connection if `h2`.
    pub fn new(inner: T, clock: Arc<ConnectionClock>, h2: bool, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            clock,
            meter: h2.then(|| FrameMeter::new(Instant::now())),
            metrics,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                match &mut this.meter {
                    None => this.clock.bytes_arrived(),
                    Some(meter) => {
                        if meter.feed(new, Instant::now()).is_err() {
                            this.metrics
                                .connection_closed(CloseReason::ControlFrameFlood.as_str());
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "too many HTTP/2 control frames",
                            )));
                        }
                    }
                }
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Control frames a connection may send in a burst.
pub const CONTROL_FRAME_BURST: u32 = 1000;
/// Control frames a connection earns back per second.
pub const CONTROL_FRAMES_PER_SECOND: u32 = 100;
/// Control frames each request (a HEADERS frame) earns: its RST_STREAM, WINDOW_UPDATE
/// or PRIORITY are not a flood.
pub const CONTROL_FRAMES_PER_REQUEST: u32 = 4;

/// The client preface that opens an HTTP/2 connection (RFC 9113, section 3.4).
const PREFACE_LEN: usize = 24;
/// RFC 9113, section 4.1: a frame starts with a 9-byte header.
const FRAME_HEADER_LEN: usize = 9;

/// Frame types (RFC 9113, section 6).
mod frame {
    pub(super) const DATA: u8 = 0x0;
    pub(super) const HEADERS: u8 = 0x1;
    pub(super) const PRIORITY: u8 = 0x2;
    pub(super) const RST_STREAM: u8 = 0x3;
    pub(super) const SETTINGS: u8 = 0x4;
    pub(super) const PING: u8 = 0x6;
    pub(super) const WINDOW_UPDATE: u8 = 0x8;
    /// END_STREAM on DATA, ACK on SETTINGS and PING.
    pub(super) const FLAG_END_STREAM_OR_ACK: u8 = 0x1;
}

/// Follows the frame boundaries of an HTTP/2 client's byte stream and charges each
/// control frame (PING, SETTINGS, PRIORITY, RST_STREAM, WINDOW_UPDATE, and an empty
/// DATA frame that does not end its stream) against a token bucket.
#[derive(Debug)]
pub struct FrameMeter {
    preface_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    payload_left: usize,
    tokens: u32,
    refilled: Instant,
}

/// The bucket ran dry.
#[derive(Debug, PartialEq, Eq)]
pub struct Flood;

impl FrameMeter {
    /// A meter for a connection that starts at `now`, with a full bucket.
    pub fn new(now: Instant) -> Self {
        Self {
            preface_left: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            payload_left: 0,
            tokens: CONTROL_FRAME_BURST,
            refilled: now,
        }
    }

    /// Follows `bytes`, the next bytes the client sent; `Err` if a control frame among
    /// them found the bucket empty.
    pub fn feed(&mut self, mut bytes: &[u8], now: Instant) -> Result<(), Flood> {
        let mut result = Ok(());
        let skip = self.preface_left.min(bytes.len());
        self.preface_left -= skip;
        bytes = &bytes[skip..];
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len());
                self.payload_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (FRAME_HEADER_LEN - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == FRAME_HEADER_LEN {
                self.header_len = 0;
                let [l0, l1, l2, kind, flags, ..] = self.header;
                let length = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                self.payload_left = length;
                if self.charge(kind, flags, length, now).is_err() {
                    result = Err(Flood);
                }
            }
        }
        result
    }

    fn charge(&mut self, kind: u8, flags: u8, length: usize, now: Instant) -> Result<(), Flood> {
        let ack_or_end = flags & frame::FLAG_END_STREAM_OR_ACK != 0;
        let control = match kind {
            frame::HEADERS => {
                self.tokens = (self.tokens + CONTROL_FRAMES_PER_REQUEST).min(CONTROL_FRAME_BURST);
                false
            }
            frame::PING | frame::SETTINGS => !ack_or_end,
            frame::PRIORITY | frame::RST_STREAM | frame::WINDOW_UPDATE => true,
            frame::DATA => length == 0 && !ack_or_end,
            _ => false,
        };
        if !control {
            return Ok(());
        }
        if self.tokens == 0 {
            let earned = now.saturating_duration_since(self.refilled).as_millis() as u64
                * u64::from(CONTROL_FRAMES_PER_SECOND)
                / 1000;
            if earned == 0 {
                return Err(Flood);
            }
            self.tokens = earned.min(u64::from(CONTROL_FRAME_BURST)) as u32;
            self.refilled = now;
        }
        self.tokens -= 1;
        Ok(())
    }
}

/// Open connections per client address, for `server.max_connections_per_client`.
#[derive(Debug)]
pub struct ClientConnections {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl ClientConnections {
    /// At most `limit` connections per address.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `address`, if it has fewer than the limit.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock();
        let count = open.entry(address).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            owner: Arc::clone(self),
            address,
        })
    }
}

/// One connection's place in [`ClientConnections`], given back on drop.
#[derive(Debug)]
pub struct ClientSlot {
    owner: Arc<ClientConnections>,
    address: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock();
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_ping_flood_runs_the_bucket_dry_and_acks_do_not() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(now);
        meter.feed(PREFACE, now).unwrap();
        meter
            .feed(&frame(frame::SETTINGS, 0, &[0; 6]), now)
            .unwrap();
        for _ in 0..5000 {
            meter
                .feed(
                    &frame(frame::SETTINGS, frame::FLAG_END_STREAM_OR_ACK, &[]),
                    now,
                )
                .unwrap();
        }
        let ping = frame(frame::PING, 0, &[7; 8]);
        let sent = (0..5000)
            .take_while(|_| meter.feed(&ping, now).is_ok())
            .count();
        assert_eq!(sent, CONTROL_FRAME_BURST as usize - 1);
        // A second later the client has earned a second's worth again.
        let later = now + Duration::from_secs(1);
        let sent = (0..5000)
            .take_while(|_| meter.feed(&ping, later).is_ok())
            .count();
        assert_eq!(sent, CONTROL_FRAMES_PER_SECOND as usize);
    }

    #[test]
    fn frames_split_across_reads_are_followed() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(now);
        let mut stream = PREFACE.to_vec();
        // A DATA frame whose payload looks like PING headers must not be counted.
        let fake_pings: Vec<u8> = (0..3000)
            .flat_map(|_| frame(frame::PING, 0, &[0; 8]))
            .collect();
        for _ in 0..3 {
            stream.extend(frame(frame::HEADERS, 0x4, &[0x82]));
            stream.extend(frame(frame::DATA, 0, &fake_pings[..16_000]));
            stream.extend(frame(frame::DATA, frame::FLAG_END_STREAM_OR_ACK, &[]));
        }
        for chunk in stream.chunks(7) {
            meter.feed(chunk, now).unwrap();
        }
        assert_eq!(meter.tokens, CONTROL_FRAME_BURST);
        // And a real ping after all that is counted.
        meter.feed(&frame(frame::PING, 0, &[0; 8]), now).unwrap();
        assert_eq!(meter.tokens, CONTROL_FRAME_BURST - 1);
    }

    #[test]
    fn requests_earn_their_own_control_frames() {
        let now = Instant::now();
        let mut meter = FrameMeter::new(now);
        meter.feed(PREFACE, now).unwrap();
        // Many more requests than the burst, each cancelled with RST_STREAM and a
        // WINDOW_UPDATE: never a flood.
        for _ in 0..10 * CONTROL_FRAME_BURST {
            meter
                .feed(&frame(frame::HEADERS, 0x4, &[0x82]), now)
                .unwrap();
            meter
                .feed(&frame(frame::RST_STREAM, 0, &[0; 4]), now)
                .unwrap();
            meter
                .feed(&frame(frame::WINDOW_UPDATE, 0, &[0, 0, 1, 0]), now)
                .unwrap();
        }
        // Empty DATA frames that do not end their stream are a flood of their own.
        let empty = frame(frame::DATA, 0, &[]);
        let sent = (0..5000)
            .take_while(|_| meter.feed(&empty, now).is_ok())
            .count();
        assert!(sent <= CONTROL_FRAME_BURST as usize, "{sent}");
    }

    #[test]
    fn client_connections_are_bounded_per_address() {
        let limits = ClientConnections::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none());
        let _other = limits.admit(b).unwrap();
        drop(first);
        let _third = limits.admit(a).unwrap();
        drop(_third);
        drop(_second);
        drop(_other);
        assert!(limits.open.lock().is_empty(), "addresses are forgotten");
    }

    fn limits() -> Limits {
        Limits {
            request_deadline: Duration::from_millis(100),
            max_connections: 10,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(1),
            unauthenticated_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_connections_per_client: None,
            http2_max_concurrent_streams: 10,
            shutdown_grace: Duration::from_secs(10),
            summary_interval: None,
        }
    }

    async fn expires_after(clock: &ConnectionClock, limits: &Limits) -> (CloseReason, Duration) {
        let started = Instant::now();
        let reason = clock.expired(limits).await;
        (reason, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn an_unauthenticated_connection_lives_ten_seconds_whatever_it_sends() {
        let clock = ConnectionClock::new();
        let limits = limits();
        let busy = async {
            // Requests that never authenticate, back to back.
            loop {
                let _request = clock.request();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        };
        let (reason, after) = tokio::select! {
            result = expires_after(&clock, &limits) => result,
            () = busy => unreachable!(),
        };
        assert_eq!(reason, CloseReason::Unauthenticated);
        assert!(after >= Duration::from_secs(10) && after < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn an_authenticated_connection_idles_from_its_last_authenticated_request() {
        let clock = ConnectionClock::new();
        let limits = limits();
        {
            let mut request = clock.request();
            request.authenticated();
            // Runs past the unauthenticated lifetime: nothing expires meanwhile.
            tokio::time::timeout(Duration::from_secs(20), clock.expired(&limits))
                .await
                .unwrap_err();
        }
        let (reason, after) = expires_after(&clock, &limits).await;
        assert_eq!(reason, CloseReason::Idle);
        assert!(after >= Duration::from_secs(299) && after <= Duration::from_secs(301));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_must_be_complete_within_the_header_timeout_of_its_first_byte() {
        let clock = ConnectionClock::new();
        let mut limits = limits();
        limits.header_read_timeout = Duration::from_secs(2);
        {
            let mut request = clock.request();
            request.authenticated();
        }
        // Kept alive and idle for a minute: no header deadline runs.
        tokio::time::timeout(Duration::from_secs(60), clock.expired(&limits))
            .await
            .unwrap_err();
        clock.bytes_arrived();
        let (reason, after) = expires_after(&clock, &limits).await;
        assert_eq!(reason, CloseReason::HeaderTimeout);
        assert!(after <= Duration::from_secs(2), "{after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_asked_by_the_service_comes_at_once() {
        let clock = ConnectionClock::new();
        let limits = limits();
        let (reason, after) = tokio::join!(expires_after(&clock, &limits), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            clock.close(CloseReason::BodyTimeout);
        })
        .0;
        assert_eq!(reason, CloseReason::BodyTimeout);
        assert!(after < Duration::from_millis(20));
        assert!(clock.closing());
    }
}
