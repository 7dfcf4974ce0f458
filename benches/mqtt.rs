//! MQTT benchmark: `cargo bench --bench mqtt`.
//!
//! Launches a hub (library `iothub::launch`) with a plain MQTT listener and measures, on one database in one run:
//! 1. telemetry at QoS 1 from many devices, each on its own connection: publish → PUBACK (the PUBACK is sent only
//!    after the message's transaction committed), with one and with several publishes in flight per device;
//!    against the same devices sending over HTTP (one request at a time on a keep-alive connection), and a raw-SQL
//!    baseline: one INSERT per commit, as many connections as the hub's pool;
//! 2. the C2D cycle over MQTT: enqueue over REST → delivery to the subscribed device → PUBACK (which completes
//!    the message), against the HTTP cycle (enqueue → long-poll receive → complete) and the raw-SQL `SKIP LOCKED`
//!    cycle of `benches/common`.
//!
//! When a NATS server with JetStream answers at `NATS_URL` (e.g. `nats://127.0.0.1:4222`), the telemetry phase also
//! measures JetStream's acknowledged publish to a file-backed stream with the same publishers and windows: the
//! fastest durable acknowledged publish commonly at hand, which does not even fsync each message.
//!
//! Plain MQTT and plain HTTP, so that TLS (the same rustls for both) is not what is compared. Process CPU per
//! message includes the load generator's, which runs in the same process.
//!
//! Environment: `DATABASE_URL` (else a private cluster under the target folder), `MQTT_BENCH_SECS` (per phase,
//! default 8), `MQTT_BENCH_DEVICES` (default 64), `MQTT_BENCH_WINDOW` (publishes in flight per device in the
//! windowed phase, default 8), `MQTT_BENCH_SENDERS` (C2D enqueuers, default 32), `MQTT_BENCH_SOAK_SECS` (default 0:
//! none; 600 for the ten-minute soak): after the phases, the same workloads again in rounds of 30 s until that time
//! has passed, printing the process's resident memory after each round — it must not grow with time.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use iothub::mqtt::codec::{self, Connect, ConnectReturnCode, Packet, Publish, QoS};
use iothub::{Config, Listeners};
use rumqttc::mqttbytes::v4::{PubAck, Subscribe, SubscribeFilter};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use common::{http_cycle, nats, sql_cycle, window, Figures, Latencies, Load};

const HOST: &str = "bench.local";
const API: &str = "api-version=2021-04-12";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn payload(i: u64) -> String {
    format!(r#"{{"temperature":21.5,"humidity":40.2,"reading":{i},"pad":"0123456789abcdef"}}"#)
}

/// Seconds of CPU this process has used (hub and load generator together).
fn process_cpu() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::with_scratch_database(&[], run).await
}

struct Setup {
    base: String,
    mqtt: SocketAddr,
    http: reqwest::Client,
    service: String,
    /// Device id and SAS token, one per device.
    devices: Vec<(String, String)>,
}

async fn run(options: PgConnectOptions) -> anyhow::Result<()> {
    let secs = Duration::from_secs(env_number("MQTT_BENCH_SECS", 8));
    let devices = env_number("MQTT_BENCH_DEVICES", 64) as usize;
    let in_flight = env_number("MQTT_BENCH_WINDOW", 8) as usize;
    let senders = env_number("MQTT_BENCH_SENDERS", 32) as usize;

    let mut config = Config::with_database("postgres://unused");
    config.hostname = HOST.to_string();
    config.c2d.max_queue_depth = 10_000;
    let pool = iothub::postgres::connect(options.clone(), config.db_pool_size).await?;
    let listeners = Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        tls: None,
        metrics: None,
        mqtts: None,
        mqtt: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = iothub::launch(config.clone(), pool.clone(), listeners, async move {
        let _ = stopped.await;
    })
    .await?;
    let setup = setup(&pool, hub.http_addr, hub.mqtt_addr.expect("MQTT"), devices).await?;
    println!(
        "MQTT benchmark: {devices} devices, {} s per phase, hub pool {} connections",
        secs.as_secs(),
        config.db_pool_size
    );

    println!("— telemetry (device → cloud), publish → acknowledged after commit —");
    let mqtt_1 = measure(|| mqtt_telemetry(&setup, 1, secs)).await?;
    mqtt_1.print("MQTT QoS 1, 1 in flight per device");
    let mqtt_w = measure(|| mqtt_telemetry(&setup, in_flight, secs)).await?;
    mqtt_w.print(&format!("MQTT QoS 1, {in_flight} in flight per device"));
    let http = measure(|| http_telemetry(&setup, secs)).await?;
    http.print("HTTP POST …/messages/events, 1 at a time");
    let sql = measure(|| sql_telemetry(&options, devices, config.db_pool_size, secs)).await?;
    sql.print("SQL one INSERT per commit");
    match nats::server() {
        Ok(nats) => {
            let acked = measure(|| nats::publish_acked(nats, payload, devices, 1, secs)).await?;
            acked.print("NATS JetStream publish → ack, 1 in flight");
            let windowed =
                measure(|| nats::publish_acked(nats, payload, devices, in_flight, secs)).await?;
            windowed.print(&format!(
                "NATS JetStream publish → ack, {in_flight} in flight"
            ));
            println!(
                "ratios: MQTT(1)/NATS(1) {:.2}  MQTT({in_flight})/NATS({in_flight}) {:.2}",
                mqtt_1.rate() / acked.rate(),
                mqtt_w.rate() / windowed.rate(),
            );
        }
        Err(why) => println!("NATS JetStream baseline skipped: {why}"),
    }
    println!(
        "ratios: MQTT(1)/HTTP {:.2}  MQTT(1)/SQL {:.2}  MQTT({in_flight})/SQL {:.2}  HTTP/SQL {:.2}",
        mqtt_1.rate() / http.rate(),
        mqtt_1.rate() / sql.rate(),
        mqtt_w.rate() / sql.rate(),
        http.rate() / sql.rate(),
    );

    println!("— C2D cycle: enqueue (REST) → delivery → acknowledgement —");
    let mqtt_c2d = measure(|| mqtt_c2d_cycle(&setup, senders, secs)).await?;
    mqtt_c2d.print("MQTT delivery → PUBACK");
    let http_c2d = measure(|| {
        http_cycle(
            &setup.base,
            &setup.http,
            &setup.service,
            &setup.devices,
            senders,
            secs,
        )
    })
    .await?;
    http_c2d.print("HTTP long-poll receive → complete");
    let sql_c2d =
        measure(|| sql_cycle(&options, devices, senders, config.db_pool_size, secs)).await?;
    sql_c2d.print("SQL insert → SKIP LOCKED claim → delete");
    println!(
        "ratios: MQTT/HTTP {:.2}  MQTT/SQL {:.2}  HTTP/SQL {:.2}",
        mqtt_c2d.rate() / http_c2d.rate(),
        mqtt_c2d.rate() / sql_c2d.rate(),
        http_c2d.rate() / sql_c2d.rate(),
    );

    let soak = Duration::from_secs(env_number("MQTT_BENCH_SOAK_SECS", 0));
    if !soak.is_zero() {
        soak_rounds(&setup, in_flight, senders, soak).await?;
    }

    let _ = stop.send(());
    hub.wait().await?;
    pool.close().await;
    Ok(())
}

/// The process's resident memory (hub and load generator together), in MiB.
fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Telemetry and the C2D cycle over MQTT and HTTP, round after round, for `duration`; resident memory after each.
async fn soak_rounds(
    setup: &Setup,
    in_flight: usize,
    senders: usize,
    duration: Duration,
) -> anyhow::Result<()> {
    let round = Duration::from_secs(10);
    let start = Instant::now();
    let at_start = resident_mib();
    println!(
        "— soak: {} s; resident memory at its start {at_start:.1} MiB —",
        duration.as_secs()
    );
    let (mut messages, mut highest) = (0u64, at_start);
    while start.elapsed() < duration {
        messages += mqtt_telemetry(setup, in_flight, round).await?.cycles;
        messages += mqtt_c2d_cycle(setup, senders, round).await?.cycles;
        let http = http_cycle(
            &setup.base,
            &setup.http,
            &setup.service,
            &setup.devices,
            senders,
            round,
        );
        messages += http.await?.cycles;
        let now = resident_mib();
        highest = highest.max(now);
        println!(
            "soak {:>4.0} s: {messages:>9} messages, resident {now:.1} MiB",
            start.elapsed().as_secs_f64()
        );
    }
    println!(
        "soak: resident memory {at_start:.1} MiB at the start, {:.1} MiB at the end, {highest:.1} MiB at most, \
         after {messages} messages",
        resident_mib()
    );
    Ok(())
}

/// A phase's figures with the process CPU it took.
struct Measured {
    figures: Figures,
    cpu: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.figures.rate()
    }

    fn print(&self, name: &str) {
        println!(
            "{name:<42} {:>8.0} /s  latency p50 {:>6.2} ms  p99 {:>6.2} ms  process CPU {:>5.0} µs/message",
            self.figures.rate(),
            self.figures.latencies.percentile(0.50),
            self.figures.latencies.percentile(0.99),
            self.cpu * 1e6 / self.figures.cycles.max(1) as f64,
        );
    }
}

async fn measure<F, Fut>(phase: F) -> anyhow::Result<Measured>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Figures>>,
{
    let cpu = process_cpu();
    let figures = phase().await?;
    Ok(Measured {
        figures,
        cpu: process_cpu() - cpu,
    })
}

async fn setup(
    pool: &PgPool,
    http_addr: SocketAddr,
    mqtt: SocketAddr,
    count: usize,
) -> anyhow::Result<Setup> {
    let api = common::Api::new(pool, http_addr, HOST).await?;
    let devices = api.register("bench", count).await?;
    Ok(Setup {
        base: api.base,
        mqtt,
        http: api.http,
        service: api.service,
        devices,
    })
}

/// A device's MQTT connection, on raw packets.
struct Device {
    stream: TcpStream,
    buffer: BytesMut,
    out: BytesMut,
}

impl Device {
    async fn connect(addr: SocketAddr, id: &str, token: &str) -> anyhow::Result<Device> {
        let mut device = Device {
            stream: TcpStream::connect(addr).await?,
            buffer: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(4096),
        };
        device.stream.set_nodelay(true)?;
        let mut connect = Connect::new(id);
        connect.keep_alive = 240;
        connect.set_login(format!("{HOST}/{id}/?{API}"), token);
        device.send(Packet::Connect(connect)).await?;
        match device.recv().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(device),
            other => anyhow::bail!("{id}: CONNECT answered {other:?}"),
        }
    }

    async fn send(&mut self, packet: Packet) -> anyhow::Result<()> {
        self.out.clear();
        codec::encode(&packet, &mut self.out);
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(packet) = codec::decode(&mut self.buffer, 1 << 20)? {
                return Ok(packet);
            }
            if self.stream.read_buf(&mut self.buffer).await? == 0 {
                anyhow::bail!("the hub closed the connection");
            }
        }
    }
}

/// Every device publishes at QoS 1 with `window` publishes awaiting their PUBACK.
async fn mqtt_telemetry(
    setup: &Setup,
    window: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let mut connections = Vec::new();
    for (id, token) in &setup.devices {
        connections.push((id.clone(), Device::connect(setup.mqtt, id, token).await?));
    }
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let acked = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let mut tasks = Vec::new();
    for (id, mut device) in connections {
        let (acked, latencies) = (acked.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            let topic = format!("devices/{id}/messages/events/$.ct=application%2Fjson&$.ce=utf-8");
            let mut sent_at = vec![Instant::now(); window + 1];
            let mut outstanding = 0usize;
            let mut i = 0u64;
            loop {
                while outstanding < window && Instant::now() < deadline {
                    let pkid = (i % window as u64) as u16 + 1;
                    let mut publish = Publish::new(&topic, QoS::AtLeastOnce, payload(i));
                    publish.pkid = pkid;
                    sent_at[pkid as usize] = Instant::now();
                    device.send(Packet::Publish(publish)).await?;
                    outstanding += 1;
                    i += 1;
                }
                if outstanding == 0 {
                    return anyhow::Ok(());
                }
                if let Packet::PubAck(ack) = device.recv().await? {
                    latencies.record(sent_at[ack.pkid as usize].elapsed().as_micros() as u64);
                    acked.fetch_add(1, Ordering::Relaxed);
                    outstanding -= 1;
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(Figures {
        cycles: acked.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}

/// Every device sends one message at a time over HTTP.
async fn http_telemetry(setup: &Setup, duration: Duration) -> anyhow::Result<Figures> {
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let sent = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let mut tasks = Vec::new();
    for (id, token) in &setup.devices {
        let url = format!("{}/devices/{id}/messages/events?{API}", setup.base);
        let (http, token, sent, latencies) = (
            setup.http.clone(),
            token.clone(),
            sent.clone(),
            latencies.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                let response = http
                    .post(&url)
                    .header("Authorization", &token)
                    .header("Content-Type", "application/json")
                    .body(payload(i))
                    .send()
                    .await;
                i += 1;
                if matches!(response, Ok(r) if r.status() == 204) {
                    latencies.record(started.elapsed().as_micros() as u64);
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(Figures {
        cycles: sent.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}

/// The floor a durable telemetry store must beat: one INSERT per commit, the hub's pool size of connections.
async fn sql_telemetry(
    options: &PgConnectOptions,
    devices: usize,
    pool_size: u32,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let pool: PgPool = iothub::postgres::connect(options.clone(), pool_size).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_events (
             device_id text NOT NULL, seq bigserial, enqueued_at timestamptz NOT NULL DEFAULT now(),
             properties jsonb NOT NULL, body bytea NOT NULL, PRIMARY KEY (device_id, seq))",
    )
    .execute(&pool)
    .await?;
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let inserted = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let mut tasks = Vec::new();
    for d in 0..devices {
        let (pool, inserted, latencies) = (pool.clone(), inserted.clone(), latencies.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("bench-{d}");
            let mut i = 0u64;
            while Instant::now() < deadline {
                let started = Instant::now();
                let done = sqlx::query(
                    "INSERT INTO bench_events (device_id, properties, body) VALUES ($1, $2, $3)",
                )
                .bind(&id)
                .bind(serde_json::json!({ "ct": "application/json", "ce": "utf-8" }))
                .bind(payload(i).into_bytes())
                .execute(&pool)
                .await;
                i += 1;
                if done.is_ok() {
                    latencies.record(started.elapsed().as_micros() as u64);
                    inserted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    pool.close().await;
    Ok(Figures {
        cycles: inserted.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}

/// Subscribed devices acknowledge each delivery at once; `senders` enqueue over REST with at most
/// [`window`] messages in flight, so queues stay short and the latency is the path's, not a backlog's.
async fn mqtt_c2d_cycle(
    setup: &Setup,
    senders: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let mut connections = Vec::new();
    for (id, token) in &setup.devices {
        let mut device = Device::connect(setup.mqtt, id, token).await?;
        let filter = SubscribeFilter::new(
            format!("devices/{id}/messages/devicebound/#"),
            QoS::AtLeastOnce,
        );
        let mut subscribe = Subscribe::new_many([filter]);
        subscribe.pkid = 1;
        device.send(Packet::Subscribe(subscribe)).await?;
        connections.push(device);
    }
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let cycles = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let in_flight = Arc::new(Semaphore::new(window(setup.devices.len())));
    let mut devices = Vec::new();
    for mut device in connections {
        let (cycles, latencies, in_flight) = (cycles.clone(), latencies.clone(), in_flight.clone());
        devices.push(tokio::spawn(async move {
            loop {
                let packet = tokio::select! {
                    packet = device.recv() => packet?,
                    _ = tokio::time::sleep_until((deadline + Duration::from_secs(2)).into()) => return anyhow::Ok(()),
                };
                if let Packet::Publish(publish) = packet {
                    let sent: u64 = std::str::from_utf8(&publish.payload)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    latencies.record((t0.elapsed().as_micros() as u64).saturating_sub(sent));
                    device.send(Packet::PubAck(PubAck::new(publish.pkid))).await?;
                    if Instant::now() < deadline {
                        cycles.fetch_add(1, Ordering::Relaxed);
                    }
                    in_flight.add_permits(1);
                }
            }
        }));
    }
    let ids = setup.devices.iter().map(|(id, _)| id.clone()).collect();
    let load = Load {
        t0,
        deadline,
        in_flight,
    };
    let enqueuers = load.enqueue_over_rest(&setup.base, &setup.http, &setup.service, ids, senders);
    for task in enqueuers {
        task.await?;
    }
    let elapsed = t0.elapsed();
    for task in devices {
        task.await??;
    }
    Ok(Figures {
        cycles: cycles.load(Ordering::Relaxed),
        elapsed,
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}
