//! Serving the application over HTTP/1.1, plain or TLS, with the limits a public endpoint needs.
//!
//! `axum::serve` has no header read timeout, so a client that sends its headers a byte at a time (slowloris) could
//! hold a connection for ever; here hyper's HTTP/1 connection gets one, and graceful shutdown drains in-flight
//! requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::AppState;
use crate::config::Config;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight (a long poll lasts at most 30 s).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(35);

/// The HTTP/1.1 settings every listener uses.
pub fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024)
        // Application property names in `iothub-app-*` headers are case-sensitive (see `casing`).
        .preserve_header_case(true);
    builder
}

/// Serves plain HTTP/1.1, or HTTPS when `tls` is given (the handshake has [`HEADER_READ_TIMEOUT`] too).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            // Out of file descriptors and the like: pause instead of spinning.
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        match &acceptor {
            None => {
                let connection = http1_builder().serve_connection(TokioIo::new(stream), service);
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream));
                    let Ok(Ok(stream)) = handshake.await else {
                        return;
                    };
                    let connection =
                        http1_builder().serve_connection(TokioIo::new(stream), service);
                    let _ = watcher.watch(connection).await;
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
    Ok(())
}

/// Where a hub serves.
pub struct Addresses {
    pub http: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// Starts a serving task in `tasks` for each listener: the API over plain HTTP and (configured) TLS, and metrics
/// on their own listener when there is one.
pub fn start(
    state: &AppState,
    listeners: Listeners,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<Addresses> {
    let app = super::app(state.clone());
    let stop = state.shutdown.clone();
    let http = listeners.http.local_addr()?;
    tasks.spawn(serve(listeners.http, app.clone(), None, stop.clone()));
    let mut tls_addr = None;
    if let Some(listener) = listeners.tls {
        let tls = crate::tls::listener_config(&state.config, crate::tls::Alpn::Http1)?;
        tls_addr = Some(listener.local_addr()?);
        tasks.spawn(serve(listener, app, Some(tls), stop.clone()));
    }
    let mut metrics_addr = None;
    if let Some(listener) = listeners.metrics {
        metrics_addr = Some(listener.local_addr()?);
        let app = super::routes::ops::metrics_app(state.clone());
        let mut stop = stop.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .context("metrics listener failed")
        });
    }
    Ok(Addresses {
        http,
        tls: tls_addr,
        metrics: metrics_addr,
    })
}

/// The sockets a hub serves on; binding is the caller's (tests bind port 0).
pub struct Listeners {
    pub http: TcpListener,
    pub tls: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the configuration names.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))
        };
        Ok(Listeners {
            http: bind(config.listen).await?,
            tls: match config.tls_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
            metrics: match config.metrics_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
        })
    }
}
