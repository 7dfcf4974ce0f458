//! The MQTT way in: IoT Hub's MQTT 3.1.1 device interface (telemetry and C2D messages) over TCP, TLS and
//! WebSockets, on the same core as HTTPS.
//!
//! [`codec`] reads and writes packets (rumqttc's `mqttbytes`), [`connection`] is the state machine of one
//! device's connection, generic over its byte stream so every transport shares it; [`topic`], [`properties`] and
//! [`messages`] map topics and property bags to core values; [`refusal`] maps core errors to CONNACK codes and
//! closes; [`session`] holds the per-hub bounds and take-over. `docs/mqtt.md` describes the wire contract.

pub mod codec;
pub mod connection;
pub mod delivery;
pub mod messages;
pub mod properties;
pub mod refusal;
pub mod session;
pub mod topic;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use sqlx::PgPool;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A listening address that may be switched off (`off` or empty).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

impl FromStr for Listen {
    type Err = std::net::AddrParseError;
    fn from_str(text: &str) -> Result<Listen, Self::Err> {
        match text.trim() {
            "" | "off" => Ok(Listen(None)),
            addr => addr.parse().map(|a| Listen(Some(a))),
        }
    }
}

impl fmt::Debug for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("off"),
        }
    }
}

/// The MQTT settings (`IOTHUB_MQTT*`); clap checks each range.
#[derive(Args, Clone, Debug)]
#[group(id = "mqtt_settings")]
pub struct Settings {
    /// MQTT over TLS (IoT Hub's port is 8883); `off` for none. Uses `IOTHUB_TLS_CERT`/`IOTHUB_TLS_KEY`, or
    /// without them a certificate of the hub's own CA (`<data dir>/tls/ca.pem`).
    #[arg(long, env = "IOTHUB_MQTTS_LISTEN", default_value = "127.0.0.1:8883")]
    pub mqtts_listen: Listen,

    /// Plain MQTT, for local tools such as `mosquitto_pub`. Unset: none (1883 is often a local broker's).
    #[arg(long, env = "IOTHUB_MQTT_LISTEN")]
    pub mqtt_listen: Option<SocketAddr>,

    /// MQTT connections a hub process holds at most (all transports); one more is refused with CONNACK 0x03.
    #[arg(long = "mqtt-max-connections", env = "IOTHUB_MQTT_MAX_CONNECTIONS", default_value_t = 10_000,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// C2D messages delivered to one connection and not yet acknowledged (PUBACK), at most (1–100).
    #[arg(long = "mqtt-max-inflight", env = "IOTHUB_MQTT_MAX_INFLIGHT", default_value_t = 16,
        value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_inflight: u32,

    /// Seconds a write to a client may wait for it to read (1–300); then the connection is closed, so a client
    /// that stops reading holds no more than its socket buffers.
    #[arg(long = "mqtt-write-timeout-secs", env = "IOTHUB_MQTT_WRITE_TIMEOUT_SECS", default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=300))]
    pub write_timeout_secs: u64,
}

impl Settings {
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
}

/// How long a client has from connecting (TLS included) to its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every MQTT connection of a hub process shares: the core's handles and the MQTT settings.
pub struct Endpoint {
    pub db: PgPool,
    pub hostname: String,
    pub settings: Settings,
    pub c2d: crate::c2d::Settings,
    /// Settlements (PUBACKs, leases given back) go through its group commit, as over HTTPS.
    pub c2d_writer: Arc<crate::c2d::writer::Writer>,
    pub feedback: crate::feedback::Settings,
    pub notifier: crate::notify::Notifier,
    pub credentials: Arc<crate::auth::Credentials>,
    pub d2c: Arc<crate::d2c::D2c>,
    /// The same buckets as HTTPS: telemetry over its rate is delayed, as IoT Hub delays MQTT operations.
    pub throttle: Arc<crate::throttle::Throttle>,
    /// Turns true when the hub is stopping.
    pub shutdown: watch::Receiver<bool>,
    pub sessions: session::Sessions,
}

impl Endpoint {
    /// Serves one MQTT connection on `stream` (TCP, TLS, or a WebSocket's bytes) until it closes.
    pub async fn serve<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        connection::run(self, stream).await
    }
}

/// Starts accepting MQTT connections on `listener` (with TLS when `tls` is given) in `tasks`. The task ends after
/// shutdown once its connections have closed (each finishes the telemetry it has in flight first).
pub fn start(
    endpoint: &Arc<Endpoint>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) {
    tasks.spawn(accept(endpoint.clone(), listener, tls));
}

async fn accept(
    endpoint: Arc<Endpoint>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<()> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut stop = endpoint.shutdown.clone();
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::warn!(%error, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let endpoint = endpoint.clone();
        match &acceptor {
            None => connections.spawn(endpoint.serve(stream)),
            Some(acceptor) => {
                let handshake = acceptor.accept(stream);
                connections.spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => endpoint.serve(stream).await,
                        Ok(Err(error)) => tracing::debug!(%error, "MQTT TLS handshake failed"),
                        Err(_) => tracing::debug!("MQTT TLS handshake timed out"),
                    }
                })
            }
        };
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}
