//! iothub: a self-hosted IoT messaging hub, wire-compatible with Azure IoT Hub's HTTPS device and registry API.
//!
//! One messaging core that knows no protocol ([`registry`], [`auth`], [`c2d`], [`feedback`], [`d2c`], with
//! [`notify`] and [`throttle`]), and on top of it one module per way in ([`http`], [`mqtt`]). [`cli`] is a client of
//! the HTTP API. `docs/architecture.md` draws the layers.
//!
//! [`launch`] starts a hub on listeners it is given and stops it when a shutdown future resolves; `main.rs` and
//! the tests both use it. PostgreSQL is the only state, so any number of hub processes can share one database.

pub mod auth;
pub mod c2d;
pub mod cli;
pub mod config;
pub mod d2c;
pub mod feedback;
pub mod http;
pub mod keys;
pub mod lock_token;
pub mod mqtt;
pub mod notify;
pub mod postgres;
pub mod registry;
pub mod throttle;
pub mod tls;
pub mod writer_queue;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::Config;
use http::{AppInner, AppState};

/// The sockets a hub serves on; binding is the caller's (tests bind port 0).
pub struct Listeners {
    pub http: TcpListener,
    pub tls: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
    /// MQTT over TLS.
    pub mqtts: Option<TcpListener>,
    /// Plain MQTT.
    pub mqtt: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the configuration names; a taken address is an error naming its setting.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let bind = |addr: SocketAddr, setting: &'static str| async move {
            TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr}: set {setting} to a free address")
            })
        };
        let optional = |addr: Option<SocketAddr>, setting: &'static str| async move {
            match addr {
                Some(addr) => bind(addr, setting).await.map(Some),
                None => Ok(None),
            }
        };
        let mqtts = config.mqtt.mqtts_listen.0;
        Ok(Listeners {
            http: bind(config.listen, "IOTHUB_LISTEN").await?,
            tls: optional(config.tls_listen, "IOTHUB_TLS_LISTEN").await?,
            metrics: optional(config.metrics_listen, "IOTHUB_METRICS_LISTEN").await?,
            mqtts: optional(mqtts, "IOTHUB_MQTTS_LISTEN").await?,
            mqtt: optional(config.mqtt.mqtt_listen, "IOTHUB_MQTT_LISTEN").await?,
        })
    }
}

/// A hub that is serving.
pub struct RunningHub {
    pub http_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub mqtts_addr: Option<SocketAddr>,
    pub mqtt_addr: Option<SocketAddr>,
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

    /// C2D enqueues queued for this process's writer, not yet in a transaction.
    pub fn c2d_queued(&self) -> usize {
        self.state.c2d.queued()
    }

    /// C2D settlements queued for this process's writer, not yet in a transaction.
    pub fn c2d_settlements_queued(&self) -> usize {
        self.state.c2d.settlements_queued()
    }

    /// MQTT connections open in this process (handshakes included).
    pub fn mqtt_connections(&self) -> usize {
        self.state.mqtt.sessions.open()
    }

    /// Waits until every task of the hub has stopped: listeners (after the shutdown future resolved and requests
    /// drained), the sweeper, the stream writers and maintenance.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        while let Some(result) = self.tasks.join_next().await {
            result.context("a hub task panicked")??;
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

/// Starts serving on `listeners` with `db`; stops gracefully when `shutdown` resolves. Every task it starts is in
/// the returned hub's one `JoinSet`.
pub async fn launch(
    config: Config,
    db: PgPool,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningHub> {
    config.validate()?;
    prepare_database(&db).await?;
    http::metrics::handle();
    let (stop_tx, stop) = watch::channel(false);
    // Telemetry and C2D writers outlive the listeners: a send still in flight when shutdown begins gets its commit.
    let (drained_tx, drained) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let credentials = Arc::new(auth::Credentials::new(db.clone(), config.auth_cache()));
    let notifier =
        notify::Notifier::start(db.clone(), credentials.clone(), stop.clone(), &mut tasks).await?;
    let d2c = Arc::new(d2c::D2c::start(&db, &config.d2c, drained.clone(), &mut tasks).await?);
    let c2d = Arc::new(
        c2d::writer::Writer::start(&db, &config.c2d, &config.feedback, drained, &mut tasks).await?,
    );
    let throttle = Arc::new(throttle::Throttle::new(&config.throttle)?);
    let mqtt = Arc::new(mqtt::Endpoint {
        db: db.clone(),
        hostname: config.hostname.clone(),
        settings: config.mqtt.clone(),
        c2d: config.c2d.clone(),
        c2d_writer: c2d.clone(),
        feedback: config.feedback.clone(),
        notifier: notifier.clone(),
        credentials: credentials.clone(),
        d2c: d2c.clone(),
        throttle: throttle.clone(),
        shutdown: stop.clone(),
        sessions: mqtt::session::Sessions::new(config.mqtt.max_connections),
    });
    let state = AppState(Arc::new(AppInner {
        throttle,
        notifier,
        d2c,
        c2d,
        credentials,
        mqtt: mqtt.clone(),
        shutdown: stop.clone(),
        config: config.clone(),
        db: db.clone(),
    }));
    tasks.spawn(forget_idle_buckets(state.clone(), stop.clone()));
    tasks.spawn(http::metrics::upkeep(stop.clone()));
    tasks.spawn(sweep(db, config.clone(), stop.clone()));
    let mut serving = JoinSet::new();
    let Listeners {
        http: http_listener,
        tls,
        metrics,
        mqtts,
        mqtt: mqtt_listener,
    } = listeners;
    let addrs = http::serve::start(&state, http_listener, tls, metrics, &mut serving)?;
    let (mqtts_addr, mqtt_addr) = start_mqtt(&config, &mqtt, mqtts, mqtt_listener, &mut serving)?;
    tasks.spawn(drain(serving, drained_tx));
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    tracing::info!(http_addr = %addrs.http, tls_addr = ?addrs.tls, metrics_addr = ?addrs.metrics,
        ?mqtts_addr, ?mqtt_addr, hostname = %config.hostname, "iothub is serving");
    Ok(RunningHub {
        http_addr: addrs.http,
        tls_addr: addrs.tls,
        metrics_addr: addrs.metrics,
        mqtts_addr,
        mqtt_addr,
        tasks,
        state,
    })
}

/// Starts the MQTT listeners given; their addresses. MQTT over TLS presents the configured certificate, or the
/// local CA's.
fn start_mqtt(
    config: &Config,
    endpoint: &Arc<mqtt::Endpoint>,
    mqtts: Option<TcpListener>,
    plain: Option<TcpListener>,
    serving: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let mut mqtts_addr = None;
    if let Some(listener) = mqtts {
        let tls = tls::listener_config(config, tls::Protocol::Mqtt)?;
        mqtts_addr = Some(listener.local_addr()?);
        mqtt::start(endpoint, listener, Some(tls), serving);
    }
    let mut mqtt_addr = None;
    if let Some(listener) = plain {
        mqtt_addr = Some(listener.local_addr()?);
        mqtt::start(endpoint, listener, None, serving);
    }
    Ok((mqtts_addr, mqtt_addr))
}

/// Waits for the listeners to stop (each after its requests in flight have answered), then lets the writers stop.
async fn drain(
    mut serving: JoinSet<anyhow::Result<()>>,
    drained: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let mut outcome = Ok(());
    while let Some(result) = serving.join_next().await {
        let result = result.context("a listener task panicked").and_then(|r| r);
        if outcome.is_ok() {
            outcome = result;
        }
    }
    let _ = drained.send(true);
    outcome
}

/// Lets the throttle forget devices whose buckets are full again, once a minute.
async fn forget_idle_buckets(
    state: AppState,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = tick.tick() => state.throttle.forget_idle(),
        }
    }
}

async fn sweep(db: PgPool, config: Config, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    c2d::sweeper::run(db, config.c2d, config.feedback, stop).await;
    Ok(())
}
