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
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::AppState;

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
/// Connections may be upgraded (MQTT over WebSockets); an upgraded connection leaves the drain to its new owner.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    // Every connection task holds a sender; the drain ends when the last is dropped.
    let (open, mut drained) = mpsc::channel::<()>(1);
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
        let (open, stop) = (open.clone(), stop.clone());
        match &acceptor {
            None => {
                tokio::spawn(serve_connection(TokioIo::new(stream), service, stop, open));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream));
                    let Ok(Ok(stream)) = handshake.await else {
                        return;
                    };
                    serve_connection(TokioIo::new(stream), service, stop, open).await
                });
            }
        }
    }
    drop(listener);
    drop(open);
    if tokio::time::timeout(DRAIN_TIMEOUT, drained.recv())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; stopping anyway");
    }
    Ok(())
}

/// One HTTP/1.1 connection until it ends; when the hub stops, it finishes the request in flight and closes.
async fn serve_connection<I>(
    io: I,
    service: TowerToHyperService<Router>,
    mut stop: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let connection = http1_builder()
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// Where a hub serves.
pub struct Addresses {
    pub http: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
}

/// Starts a serving task in `tasks` for each HTTP listener: the API over plain HTTP and (configured) TLS, and
/// metrics on their own listener when there is one.
pub fn start(
    state: &AppState,
    http_listener: TcpListener,
    tls_listener: Option<TcpListener>,
    metrics_listener: Option<TcpListener>,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<Addresses> {
    let app = super::app(state.clone());
    let stop = state.shutdown.clone();
    let http = http_listener.local_addr()?;
    tasks.spawn(serve(http_listener, app.clone(), None, stop.clone()));
    let mut tls_addr = None;
    if let Some(listener) = tls_listener {
        let tls = crate::tls::listener_config(&state.config, crate::tls::Protocol::Http)?;
        tls_addr = Some(listener.local_addr()?);
        tasks.spawn(serve(listener, app, Some(tls), stop.clone()));
    }
    let mut metrics_addr = None;
    if let Some(listener) = metrics_listener {
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
