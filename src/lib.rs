//! iothub: a self-hosted IoT messaging hub, wire-compatible with Azure IoT Hub's HTTPS device and registry API.
//!
//! [`launch`] starts a hub on listeners it is given and stops it when a shutdown future resolves; `main.rs` and
//! the tests both use it. PostgreSQL is the only state, so any number of hub processes can share one database.

pub mod auth;
pub mod c2d;
pub mod client;
pub mod config;
pub mod d2c;
pub mod feedback;
pub mod http;
pub mod notify;
pub mod postgres;
pub mod registry;
pub mod throttle;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::Config;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub db: PgPool,
    pub config: Config,
    /// Turns true when the hub is stopping, so long polls can end early.
    pub shutdown: watch::Receiver<bool>,
    /// Wake-ups for long polls when a transaction commits something they wait for.
    pub notifier: notify::Notifier,
    /// Keys and statuses for authentication, cached briefly.
    pub credentials: auth::Credentials,
    /// Token buckets per operation class (empty unless configured).
    pub throttle: throttle::Throttle,
    /// Device-to-cloud streams: partition writers and stream settings.
    pub d2c: d2c::D2c,
}

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
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

/// A hub that is serving.
pub struct RunningHub {
    pub http_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    tasks: JoinSet<anyhow::Result<()>>,
    state: AppState,
}

impl RunningHub {
    /// Requests of this process waiting for a wake-up on `channel` ([`notify::channel`]) and `key` (a device id,
    /// a partition id, or "" for feedback). A test waits for it instead of sleeping before it commits what a long
    /// poll waits for.
    pub fn waiting(&self, channel: &str, key: &str) -> usize {
        self.state.notifier.waiting(channel, key)
    }

    /// Telemetry sends queued for `partition`'s writer in this process, not yet in a transaction.
    pub fn d2c_queued(&self, partition: u32) -> usize {
        self.state.d2c.ingest.queued(partition)
    }

    /// Waits until every listener has stopped (after the shutdown future resolved and requests drained).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        while let Some(result) = self.tasks.join_next().await {
            result.context("a listener task panicked")??;
        }
        Ok(())
    }
}

/// Migrates the database and creates what a new hub needs (the default policies). Safe to run concurrently.
pub async fn prepare_database(db: &PgPool) -> anyhow::Result<()> {
    postgres::migrate(db).await?;
    auth::policies::ensure_defaults(db).await?;
    Ok(())
}

/// Starts serving on `listeners` with `db`; stops gracefully when `shutdown` resolves.
pub async fn launch(
    config: Config,
    db: PgPool,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningHub> {
    config.c2d.validate()?;
    prepare_database(&db).await?;
    http::metrics::handle();
    let (stop_tx, stop_rx) = watch::channel(false);
    let throttle = throttle::Throttle::new(&config.throttle)?;
    let db_for_auth = db.clone();
    let notifier = notify::Notifier::start(db.clone(), stop_rx.clone()).await?;
    let d2c = d2c::D2c::start(&db, &config.d2c, stop_rx.clone()).await?;
    let state = AppState(Arc::new(AppInner {
        db,
        config: config.clone(),
        shutdown: stop_rx.clone(),
        notifier,
        throttle,
        credentials: auth::Credentials::new(db_for_auth, config.auth_cache()),
        d2c,
    }));
    {
        let state = state.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tick.tick() => state.throttle.forget_idle(),
                }
            }
        });
    }
    let app = http::app(state.clone());
    let mut tasks = JoinSet::new();

    let http_addr = listeners.http.local_addr()?;
    tasks.spawn(http::serve::serve(
        listeners.http,
        app.clone(),
        None,
        stop_rx.clone(),
    ));

    let mut tls_addr = None;
    if let Some(listener) = listeners.tls {
        let (cert, key) = config
            .tls_cert
            .as_ref()
            .zip(config.tls_key.as_ref())
            .context("a TLS listener needs IOTHUB_TLS_CERT and IOTHUB_TLS_KEY")?;
        let tls = http::tls::server_config(cert, key)?;
        tls_addr = Some(listener.local_addr()?);
        tasks.spawn(http::serve::serve(
            listener,
            app.clone(),
            Some(tls),
            stop_rx.clone(),
        ));
    }

    let mut metrics_addr = None;
    if let Some(listener) = listeners.metrics {
        metrics_addr = Some(listener.local_addr()?);
        let app = http::ops::metrics_app(state.clone());
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .context("metrics listener failed")
        });
    }

    tokio::spawn(c2d::sweeper::run(
        state.db.clone(),
        config.c2d.clone(),
        stop_rx.clone(),
    ));

    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    tracing::info!(%http_addr, ?tls_addr, ?metrics_addr, hostname = %config.hostname, "iothub is serving");
    Ok(RunningHub {
        http_addr,
        tls_addr,
        metrics_addr,
        tasks,
        state,
    })
}
