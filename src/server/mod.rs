//! The HTTPS server: accepts TCP connections, completes TLS, speaks HTTP/1.1 or HTTP/2
//! as ALPN chose, and hands each request to [`service::serve_request`].
//!
//! Connections: at most `server.max_connections` at once (beyond that, new ones wait in
//! the kernel's backlog, and readiness is off), optionally at most
//! `server.max_connections_per_client` from one address, TCP_NODELAY (responses are
//! small and latency-bound), keep-alive (KMS reuses connections), a TLS handshake
//! timeout, and the deadlines of [`guard`]: what a connection may hold before it
//! authenticates, how long a request's head and body may take, when it is idle, and
//! how many HTTP/2 control frames it may send.
//!
//! Around the listener run the health monitor, the periodic latency summary, if
//! configured the plain-HTTP admin listener ([`admin`]), and under systemd the
//! notifications of [`crate::systemd`].
//!
//! Shutdown: on the signal, turn readiness off, stop accepting (new connections are
//! refused), ask every connection to finish its in-flight requests and close, and wait
//! for them up to the grace period.

pub mod admin;
pub mod guard;
pub mod live;
mod quota;
pub mod service;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

pub use live::KeyStore;
pub use quota::Quota;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::auth::ReplayCache;
use crate::config::{Config, Limits};
use crate::health::HealthMonitor;
use crate::hsm::{Backend, HsmError};
use crate::metrics::{HandshakeLabels, Metrics};
use crate::xks::{Handler, HealthInfo};
use guard::{ClientConnections, CloseReason, ConnectionClock, GuardedIo};
use live::Live;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS files or settings.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The HSM.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// Routes.
    #[error("routes: {0}")]
    Routes(#[from] crate::router::PrefixError),
    /// Authorization policies.
    #[error(transparent)]
    Authz(#[from] crate::authz::AuthzError),
    /// Binding the listener.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why `xks-proxy check-config` refused a configuration.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file or a setting.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A PKCS#11 module path that names no file.
    #[error("hsm.module: {0} is not a file")]
    Module(String),
    /// The certificate and key, the routes or the policies.
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Loads the configuration at `path` and everything `serve` reads before it opens the
/// HSM (the certificate and key, the routes and the policies, as a reload builds
/// them); returns what an operator wants to see of it, a line each.
pub fn check_config(path: &std::path::Path) -> Result<Vec<String>, CheckError> {
    let mut config = Config::load(path)?;
    if let crate::hsm::BackendConfig::Pkcs11(ekms) = &config.backend {
        if let Some(ekm) = ekms.iter().find(|ekm| !ekm.module.is_file()) {
            return Err(CheckError::Module(ekm.module.display().to_string()));
        }
    }
    let files = config.watched_files.clone();
    let (listen, admin) = (config.listen, config.admin_listen);
    Live::build(&mut config, None)?;
    let mut lines = vec![
        format!("{}: valid", path.display()),
        format!("listen {listen}"),
    ];
    lines.extend(admin.map(|admin| format!("admin {admin}")));
    lines.extend(files.iter().map(|file| format!("reads {}", file.display())));
    Ok(lines)
}

/// Everything the service needs, shared by all connections.
#[derive(Debug)]
pub struct App {
    /// Routes, key stores, TLS and policies: swapped whole by a reload.
    pub live: ArcSwap<Live>,
    /// The files whose change triggers a reload.
    pub watched: Mutex<Vec<PathBuf>>,
    /// Signatures seen, when replay protection is on (survives reloads).
    pub replay: Option<Arc<ReplayCache>>,
    /// Executes operations.
    pub handler: Handler,
    /// Largest body buffered.
    pub max_body_bytes: usize,
    /// Deadlines, timeouts and connection limits.
    pub limits: Limits,
    /// How often watched files are checked for changes.
    pub reload_poll: Option<std::time::Duration>,
    /// What we measure.
    pub metrics: Arc<Metrics>,
    /// Caps the lines unauthenticated rejects write.
    pub log_limits: crate::logging::limit::Limiter,
}

/// Assembles the application from a validated configuration and a backend.
pub fn app(mut config: Config, backend: Backend, metrics: Arc<Metrics>) -> Result<App, StartError> {
    let replay = config
        .sigv4_replay_protection
        .then(|| Arc::new(ReplayCache::new(REPLAY_CACHE_ENTRIES)));
    let live = Live::build(&mut config, replay.as_ref())?;
    *metrics.secrets.lock() = live.secret_dates.clone();
    let health = HealthInfo {
        fleet_size: config.proxy.fleet_size,
        vendor: config.proxy.vendor,
        model: format!("xks-proxy {}", env!("CARGO_PKG_VERSION")),
        ekm_vendor: config.proxy.ekm_vendor,
    };
    let backend = Arc::new(backend);
    let monitor = Arc::new(HealthMonitor::new(
        Arc::clone(&backend),
        config.health.key,
        config.health.interval,
        config.limits.request_deadline,
        Arc::clone(&metrics),
    ));
    Ok(App {
        live: ArcSwap::from_pointee(live),
        watched: Mutex::new(config.watched_files),
        replay,
        handler: Handler::new(backend, health, monitor),
        max_body_bytes: config.max_body_bytes,
        limits: config.limits,
        reload_poll: config.reload_poll,
        metrics,
        log_limits: crate::logging::limit::Limiter::default(),
    })
}

/// Signatures the replay cache remembers at most (~40 MB; ten minutes at 1800 TPS).
const REPLAY_CACHE_ENTRIES: usize = 1_000_000;

/// A bound, ready-to-run server.
pub struct Server {
    listener: TcpListener,
    admin: Option<TcpListener>,
    app: Arc<App>,
    /// The configuration file, for reloads.
    config_path: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("admin", &self.admin)
            .field("app", &self.app)
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

impl Server {
    /// Binds the listener and, if `admin` is given, the admin listener. With
    /// `config_path`, the configuration reloads on SIGHUP and when its files change.
    pub async fn bind(
        addr: SocketAddr,
        admin: Option<SocketAddr>,
        app: App,
        config_path: Option<std::path::PathBuf>,
    ) -> Result<Self, StartError> {
        let listener = bind(addr).await?;
        let admin = match admin {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok(Self {
            listener,
            admin,
            app: Arc::new(app),
            config_path,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.admin.as_ref().map(TcpListener::local_addr)
    }

    /// The application (for its health monitor and metrics).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            admin,
            app,
            config_path,
        } = self;
        let mut background = tokio::task::JoinSet::new();
        background.spawn(Arc::clone(app.handler.monitor()).run());
        if let Some(interval) = app.limits.summary_interval {
            background.spawn(summaries(
                Arc::clone(&app.metrics),
                interval,
                app.limits.request_deadline,
            ));
        }
        if let Some(admin) = admin {
            background.spawn(admin::serve(admin, Arc::clone(&app)));
        }
        if let Some(path) = config_path {
            background.spawn(live::watch(Arc::clone(&app), path, app.reload_poll));
        }
        // Under systemd (`Type=notify`): READY=1 once an EKM serves, and the watchdog.
        background.spawn(crate::systemd::ready_when_serving(Arc::clone(
            app.handler.monitor(),
        )));
        if let Some(interval) = crate::systemd::watchdog_interval() {
            background.spawn(crate::systemd::watchdog(interval));
        }

        let (stop_tx, stop_rx) = watch::channel(false);
        // Every connection task holds a clone; when all are dropped, draining is done.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
        let slots = Arc::new(Semaphore::new(app.limits.max_connections));
        let per_client = app
            .limits
            .max_connections_per_client
            .map(ClientConnections::new);
        tokio::pin!(shutdown);
        loop {
            // Take a connection slot first: at the limit, connections wait in the
            // kernel's backlog rather than in our memory.
            let slot = tokio::select! {
                () = &mut shutdown => break,
                slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            };
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let client_slot = match &per_client {
                None => None,
                Some(clients) => match clients.admit(peer.ip()) {
                    Some(place) => Some(place),
                    None => {
                        // Closed before TLS: the cheapest answer to one address's flood.
                        app.metrics
                            .connection_closed(CloseReason::PerClientLimit.as_str());
                        tracing::debug!(%peer, "connection refused: per-client limit");
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            // The certificate and mTLS settings of the moment: a reload applies to new
            // connections; open ones keep their session.
            let acceptor = TlsAcceptor::from(Arc::clone(&app.live.load().tls));
            let app = Arc::clone(&app);
            let stop = stop_rx.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                app.metrics.connections_open.inc();
                connection(stream, peer, acceptor, &app, stop).await;
                app.metrics.connections_open.dec();
                drop(slot);
                drop(client_slot);
                drop(done);
            });
        }
        tracing::info!(
            "shutting down: readiness off, no new connections, draining in-flight requests"
        );
        app.handler.monitor().begin_shutdown();
        crate::systemd::stopping();
        // The grace bounds the whole exit, the HSM sessions' last calls included.
        crate::hsm::exit_by(std::time::Instant::now() + app.limits.shutdown_grace);
        drop(listener);
        let _ = stop_tx.send(true);
        drop(done_tx);
        if tokio::time::timeout(app.limits.shutdown_grace, done_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
        background.abort_all();
    }
}

/// Logs one INFO line per operation every `interval`: p50/p99/p99.9 and the budget share.
async fn summaries(metrics: Arc<Metrics>, interval: Duration, deadline: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    let mut earlier = metrics.latencies.snapshot();
    loop {
        ticker.tick().await;
        let now = metrics.latencies.snapshot();
        for line in crate::metrics::summary_lines(&now, &earlier, deadline) {
            tracing::info!(target: "xks_proxy::summary", "{line}");
        }
        earlier = now;
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: &Arc<App>,
    stop: watch::Receiver<bool>,
) {
    let limits = &app.limits;
    // The unauthenticated lifetime counts from here: the handshake is part of it.
    let clock = Arc::new(ConnectionClock::new());
    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await;
    let (tls, result) = match handshake {
        Ok(Ok(tls)) => (Some(tls), "ok"),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            (None, "error")
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            (None, "timeout")
        }
    };
    app.metrics
        .tls_handshakes
        .get_or_create(&HandshakeLabels { result })
        .inc();
    let Some(tls) = tls else { return };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(GuardedIo::new(
        tls,
        Arc::clone(&clock),
        h2,
        Arc::clone(&app.metrics),
    ));
    let service = {
        let app = Arc::clone(app);
        let clock = Arc::clone(&clock);
        service_fn(move |request| {
            let app = Arc::clone(&app);
            let clock = Arc::clone(&clock);
            async move {
                let response = service::serve_request(app, &clock, request).await;
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            // Find dead peers on long-lived connections.
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10))
            .serve_connection(io, service);
        drive(conn, peer, &clock, app, stop).await;
    } else {
        // No hyper header timer: it would also run while a kept-alive connection waits
        // for its next request. The clock times a head from its first byte instead.
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            .serve_connection(io, service);
        drive(conn, peer, &clock, app, stop).await;
    }
}

/// Runs a connection to its end; or, once shutdown starts or the connection's clock
/// expires, lets it finish the requests in flight and close.
async fn drive<C>(
    conn: C,
    peer: SocketAddr,
    clock: &ConnectionClock,
    app: &App,
    mut stop: watch::Receiver<bool>,
) where
    C: GracefulConnection<Error = hyper::Error>,
{
    tokio::pin!(conn);
    let stopping = async move {
        // The borrow `wait_for` returns must not live across the await below.
        let _ = stop.wait_for(|stopping| *stopping).await.map(|_| ());
    };
    let reason = tokio::select! {
        result = conn.as_mut() => return log_connection_end(peer, result),
        () = stopping => None,
        reason = clock.expired(&app.limits) => Some(reason),
    };
    let Some(reason) = reason else {
        // Shutdown: the server's grace period bounds the drain.
        conn.as_mut().graceful_shutdown();
        return log_connection_end(peer, conn.await);
    };
    tracing::debug!(%peer, reason = reason.as_str(), "closing connection");
    if reason != CloseReason::BodyTimeout {
        // A body timeout was counted where it happened.
        app.metrics.connection_closed(reason.as_str());
    }
    if reason == CloseReason::HeaderTimeout {
        // Mid-head there is nothing to finish (and hyper would wait for the head).
        return;
    }
    conn.as_mut().graceful_shutdown();
    // Requests in flight are bounded by the body timeout and the request deadline;
    // whatever is left after them is a client holding on.
    let drain = app.limits.body_read_timeout + app.limits.request_deadline + DRAIN_SLACK;
    match tokio::time::timeout(drain, conn).await {
        Ok(result) => log_connection_end(peer, result),
        Err(_) => tracing::debug!(%peer, "connection did not drain in time; dropped"),
    }
}

/// Margin past the longest a request may legitimately take when draining.
const DRAIN_SLACK: Duration = Duration::from_secs(1);

fn log_connection_end(peer: SocketAddr, result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
