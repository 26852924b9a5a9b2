//! The HTTPS server: accepts TCP connections, completes TLS, speaks HTTP/1.1 or HTTP/2
//! as ALPN chose, and hands each request to [`service::serve_request`].
//!
//! Connections: TCP_NODELAY (responses are small and latency-bound), keep-alive (KMS
//! reuses connections), a TLS handshake timeout, and an HTTP/1.1 header-read timeout so
//! a slow client cannot hold a connection open by dribbling headers.
//!
//! Shutdown: on the signal, stop accepting, ask every connection to finish its
//! in-flight requests and close, and wait for them up to a grace period.

pub mod service;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub use service::{App, KeyStore};

use crate::auth::Verifier;
use crate::config::{BackendConfig, Config};
use crate::hsm::pkcs11::Pkcs11Backend;
use crate::hsm::software::SoftwareBackend;
use crate::hsm::{Backend, HsmError};
use crate::router::Router;
use crate::xks::{Handler, HealthInfo, KeySet};

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an HTTP/1.1 client has to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

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
    /// Binding the listener.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Builds the backend a configuration asks for.
pub fn backend(config: &BackendConfig) -> Result<Backend, HsmError> {
    Ok(match config {
        BackendConfig::Pkcs11(settings) => Backend::Pkcs11(Pkcs11Backend::connect(settings)?),
        BackendConfig::Software(keys) => Backend::Software(SoftwareBackend::new(keys.clone())?),
    })
}

/// Assembles the application from a validated configuration and a backend.
pub fn app(config: Config, backend: Backend) -> Result<App, StartError> {
    let router = Router::new(config.key_stores.iter().map(|s| s.uri_prefix.as_str()))?;
    let key_stores = config
        .key_stores
        .into_iter()
        .map(|store| KeyStore {
            verifier: Verifier::new(store.region, store.credentials),
            keys: KeySet::new(store.keys),
            name: store.name,
        })
        .collect();
    let health = HealthInfo {
        fleet_size: config.proxy.fleet_size,
        vendor: config.proxy.vendor,
        model: format!("xks-proxy {}", env!("CARGO_PKG_VERSION")),
        ekm_vendor: config.proxy.ekm_vendor,
    };
    Ok(App {
        router,
        key_stores,
        handler: Handler::new(Arc::new(backend), health),
        max_body_bytes: config.max_body_bytes,
    })
}

/// A bound, ready-to-run server.
pub struct Server {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Arc<App>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds the listener.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        app: App,
    ) -> Result<Self, StartError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            app: Arc::new(app),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every connection task holds a clone; when all are dropped, draining is done.
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off briefly instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let acceptor = self.acceptor.clone();
                    let app = Arc::clone(&self.app);
                    let stop = stop_rx.clone();
                    let done = done_tx.clone();
                    tokio::spawn(async move {
                        connection(stream, peer, acceptor, app, stop).await;
                        drop(done);
                    });
                }
            }
        }
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        drop(self.listener);
        let _ = stop_tx.send(true);
        drop(done_tx);
        if tokio::time::timeout(SHUTDOWN_GRACE, done_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    stop: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(tls);
    let service = service_fn(move |request| {
        let app = Arc::clone(&app);
        async move { Ok::<_, std::convert::Infallible>(service::serve_request(app, request).await) }
    });
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service);
        drive(conn, peer, stop).await;
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true)
            .serve_connection(io, service);
        drive(conn, peer, stop).await;
    }
}

/// Runs a connection to its end, or, once shutdown starts, lets it finish the requests
/// in flight and close.
async fn drive<C>(conn: C, peer: SocketAddr, mut stop: watch::Receiver<bool>)
where
    C: GracefulConnection<Error = hyper::Error>,
{
    tokio::pin!(conn);
    let stopping = async move {
        // The borrow `wait_for` returns must not live across the await below.
        let _ = stop.wait_for(|stopping| *stopping).await.map(|_| ());
    };
    tokio::select! {
        result = conn.as_mut() => log_connection_end(peer, result),
        () = stopping => {
            conn.as_mut().graceful_shutdown();
            log_connection_end(peer, conn.await);
        }
    }
}

fn log_connection_end(peer: SocketAddr, result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
