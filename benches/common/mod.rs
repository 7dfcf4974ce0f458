//! What the benchmarks share: a database of their own for a run, and the C2D cycle they drive over the hub's HTTP
//! API (enqueue → long-poll receive → complete) with the raw-SQL `SKIP LOCKED` baseline of the same cycle on the
//! same database; the brokers' baselines, each measured only when its variable names a broker.
#![allow(dead_code)]

pub mod cpu;
pub mod meter;
pub mod nats;
pub mod rabbitmq;

/// The allocator the `iothub` binary ships with, so the hub measured here allocates as it does in production.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::sync::Semaphore;

/// A hub launched for a benchmark on the hub's runtime ([`cpu::with_hub_runtime`]), with a pool of its own.
pub struct BenchHub {
    pub running: iothub::RunningHub,
    pub pool: PgPool,
    runtime: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl BenchHub {
    /// Launches the hub with `config` (its HTTP listener on `config.listen`) on `runtime`: the hub, its pool and
    /// every task it starts live there, so their CPU is metered apart from the load generator's.
    pub async fn launch(
        runtime: tokio::runtime::Handle,
        options: PgConnectOptions,
        config: iothub::Config,
    ) -> anyhow::Result<BenchHub> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (running, pool) = runtime
            .spawn(async move {
                let pool = iothub::postgres::connect(options, config.db_pool_size).await?;
                let listeners = iothub::Listeners {
                    http: tokio::net::TcpListener::bind(config.listen).await?,
                    tls: None,
                    metrics: None,
                    mqtts: None,
                    mqtt: None,
                };
                let running = iothub::launch(config, pool.clone(), listeners, async move {
                    let _ = stopped.await;
                })
                .await?;
                anyhow::Ok((running, pool))
            })
            .await??;
        Ok(BenchHub {
            running,
            pool,
            runtime,
            stop,
        })
    }

    /// Stops the hub and waits for every task it started.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.runtime.spawn(self.running.wait()).await??;
        self.pool.close().await;
        Ok(())
    }
}

/// A hub's REST API as a benchmark drives it: an HTTP client with room for every device's connection, and tokens
/// of the owner and service policies, valid for an hour.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub owner: String,
    pub service: String,
    host: String,
    expiry: i64,
}

impl Api {
    pub async fn new(
        db: &PgPool,
        http_addr: std::net::SocketAddr,
        host: &str,
    ) -> anyhow::Result<Api> {
        let expiry = chrono::Utc::now().timestamp() + 3600;
        let token = |name: &'static str| async move {
            let key = iothub::auth::policies::get(db, name)
                .await?
                .expect("policy")
                .primary_key;
            anyhow::Ok(iothub::auth::sas::sign(host, &key, Some(name), expiry)?)
        };
        Ok(Api {
            base: format!("http://{http_addr}"),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(1024)
                .timeout(Duration::from_secs(30))
                .build()?,
            owner: token("iothubowner").await?,
            service: token("service").await?,
            host: host.to_string(),
            expiry,
        })
    }

    /// Registers `{prefix}-0` … through the registry API; each device's id and SAS token.
    pub async fn register(
        &self,
        prefix: &str,
        count: usize,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut devices = Vec::with_capacity(count);
        for d in 0..count {
            let id = format!("{prefix}-{d}");
            let device: serde_json::Value = self
                .http
                .put(format!("{}/devices/{id}?api-version=2021-04-12", self.base))
                .header("Authorization", &self.owner)
                .json(&serde_json::json!({ "deviceId": id }))
                .send()
                .await?
                .json()
                .await?;
            let key = device["authentication"]["symmetricKey"]["primaryKey"]
                .as_str()
                .expect("a key");
            let audience = format!("{}/devices/{id}", self.host);
            let token = iothub::auth::sas::sign(&audience, key, None, self.expiry)?;
            devices.push((id, token));
        }
        Ok(devices)
    }
}

/// Runs `run` on a database created for it on `DATABASE_URL`'s server, or on a private cluster under the target
/// folder; `settings` (e.g. `plan_cache_mode = force_generic_plan`) are set on the database first. The database is
/// dropped, and a cluster started here stopped, when `run` returns.
pub async fn with_scratch_database<F, Fut>(settings: &[&str], run: F) -> anyhow::Result<()>
where
    F: FnOnce(PgConnectOptions) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut cluster = None;
    let server = match std::env::var("DATABASE_URL") {
        Ok(url) => url.parse::<PgConnectOptions>()?,
        Err(_) => {
            let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-postgres");
            let managed = iothub::postgres::ManagedCluster::start(&root).await?;
            let options = managed.options("postgres");
            cluster = Some(managed);
            options
        }
    };
    let name = format!("iothub_bench_{}", uuid::Uuid::new_v4().simple());
    let mut admin = server.connect().await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    for setting in settings {
        sqlx::query(&format!("ALTER DATABASE {name} SET {setting}"))
            .execute(&mut admin)
            .await?;
    }
    let result = run(server.clone().database(&name)).await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    admin.close().await?;
    if let Some(cluster) = cluster {
        if cluster.started_here() {
            cluster.stop().await?;
        }
    }
    result
}

/// The broker a baseline is to measure, from `variable`; when it is unset, why the baseline is skipped. A bench asks
/// for a broker only when it is told where one is, so that it runs the same on a machine without any.
pub fn baseline_url(variable: &str) -> Result<String, String> {
    match std::env::var(variable) {
        Ok(url) if !url.trim().is_empty() => Ok(url.trim().to_string()),
        _ => Err(format!("{variable} not set")),
    }
}

/// A broker's URL fit to print: any `user:password@` left out.
pub fn without_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
        (None, Some((_, host))) => host.to_string(),
        _ => url.to_string(),
    }
}

/// Latencies in microseconds (bounded: one sample per cycle of a bounded run).
#[derive(Default)]
pub struct Latencies(Mutex<Vec<u32>>);

impl Latencies {
    pub fn record(&self, micros: u64) {
        let mut samples = self.0.lock().unwrap();
        if samples.len() < 5_000_000 {
            samples.push(micros.min(u32::MAX as u64) as u32);
        }
    }

    pub fn percentile(&self, p: f64) -> f64 {
        let mut samples = self.0.lock().unwrap().clone();
        if samples.is_empty() {
            return f64::NAN;
        }
        samples.sort_unstable();
        let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
        f64::from(samples[index]) / 1000.0
    }
}

pub struct Figures {
    pub cycles: u64,
    pub elapsed: Duration,
    pub latencies: Latencies,
}

impl Figures {
    pub fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }

    pub fn print(&self, name: &str) {
        println!(
            "{name:<44} {:>8} cycles  {:>8.0} cycles/s  enqueue→receive p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.cycles,
            self.rate(),
            self.latencies.percentile(0.50),
            self.latencies.percentile(0.99),
        );
    }
}

/// In-flight messages at most, so queues stay short and latency measures the path, not a backlog.
pub fn window(devices: usize) -> usize {
    devices * 2
}

/// Takes one of the `in_flight` slots for a send; `false` once `deadline` has passed. Whoever ends the message
/// gives the slot back (or the sender, when the send fails), so a run never has more than the window on its way.
pub async fn take_slot(in_flight: &Semaphore, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        // Bounded waits: a run whose receivers stall still ends at its deadline.
        if let Ok(Ok(permit)) =
            tokio::time::timeout(Duration::from_millis(200), in_flight.acquire()).await
        {
            permit.forget();
            return true;
        }
    }
    false
}

pub async fn http_cycle(
    base: &str,
    http: &reqwest::Client,
    service: &str,
    devices: &[(String, String)],
    senders: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let cycles = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let in_flight = Arc::new(Semaphore::new(window(devices.len())));
    let mut tasks = Vec::new();
    for (id, token) in devices {
        let (id, token) = (id.clone(), token.clone());
        let (http, base, cycles, latencies, in_flight) = (
            http.clone(),
            base.to_string(),
            cycles.clone(),
            latencies.clone(),
            in_flight.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let receive = format!(
                "{base}/devices/{id}/messages/deviceBound?api-version=2021-04-12&wait-ms=1000"
            );
            while Instant::now() < deadline {
                let Ok(response) = http
                    .get(&receive)
                    .header("Authorization", &token)
                    .send()
                    .await
                else {
                    continue;
                };
                if response.status() != 200 {
                    continue;
                }
                let lock = response.headers()["etag"]
                    .to_str()
                    .unwrap_or("")
                    .trim_matches('"')
                    .to_string();
                let body = response.bytes().await.unwrap_or_default();
                let sent: u64 = std::str::from_utf8(&body)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                latencies.record((t0.elapsed().as_micros() as u64).saturating_sub(sent));
                let done = http
                    .delete(format!(
                        "{base}/devices/{id}/messages/deviceBound/{lock}?api-version=2021-04-12"
                    ))
                    .header("Authorization", &token)
                    .send()
                    .await;
                if matches!(done, Ok(r) if r.status() == 204) {
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                in_flight.add_permits(1);
            }
        }));
    }
    let ids = devices.iter().map(|(id, _)| id.clone()).collect();
    let load = Load {
        t0,
        deadline,
        in_flight,
    };
    tasks.extend(load.enqueue_over_rest(base, http, service, ids, senders));
    for task in tasks {
        task.await?;
    }
    Ok(Figures {
        cycles: cycles.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}

/// The pace of a C2D run: messages carry their send time (µs since `t0`) as their body, and at most
/// `in_flight` permits' worth are on their way (the receiving side gives a permit back per message it ends).
pub struct Load {
    pub t0: Instant,
    pub deadline: Instant,
    pub in_flight: Arc<Semaphore>,
}

impl Load {
    /// `senders` tasks enqueuing over REST until the deadline, round-robin over `ids`, each when a permit is free.
    pub fn enqueue_over_rest(
        &self,
        base: &str,
        http: &reqwest::Client,
        service: &str,
        ids: Vec<String>,
        senders: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let ids = Arc::new(ids);
        (0..senders)
            .map(|s| {
                let (http, base, service, ids, in_flight) = (
                    http.clone(),
                    base.to_string(),
                    service.to_string(),
                    ids.clone(),
                    self.in_flight.clone(),
                );
                let (t0, deadline) = (self.t0, self.deadline);
                tokio::spawn(async move {
                    let mut next = s;
                    while take_slot(&in_flight, deadline).await {
                        let id = &ids[next % ids.len()];
                        next += senders;
                        let sent = t0.elapsed().as_micros() as u64;
                        let response = http
                            .post(format!(
                                "{base}/devices/{id}/commands?api-version=2021-04-12"
                            ))
                            .header("Authorization", &service)
                            .body(sent.to_string())
                            .send()
                            .await;
                        if !matches!(response, Ok(r) if r.status() == 201) {
                            in_flight.add_permits(1);
                        }
                    }
                })
            })
            .collect()
    }
}

pub async fn sql_cycle(
    options: &PgConnectOptions,
    devices: usize,
    senders: usize,
    pool_size: u32,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let pool: PgPool = iothub::postgres::connect(options.clone(), pool_size).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_queue (
             device_id text NOT NULL, seq bigint NOT NULL, body bytea NOT NULL,
             lock_token uuid, locked_until timestamptz, PRIMARY KEY (device_id, seq))",
    )
    .execute(&pool)
    .await?;
    sqlx::query("TRUNCATE bench_queue").execute(&pool).await?;
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let cycles = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let in_flight = Arc::new(Semaphore::new(window(devices)));
    let seq = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for d in 0..devices {
        let (pool, cycles, latencies, in_flight) = (
            pool.clone(),
            cycles.clone(),
            latencies.clone(),
            in_flight.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let id = format!("bench-{d}");
            while Instant::now() < deadline {
                let token = uuid::Uuid::new_v4();
                let claimed: Result<Option<Vec<u8>>, _> = sqlx::query_scalar(
                    "UPDATE bench_queue SET lock_token = $2, locked_until = now() + interval '60 seconds'
                     WHERE device_id = $1 AND seq = (
                         SELECT seq FROM bench_queue
                         WHERE device_id = $1 AND (lock_token IS NULL OR locked_until <= now())
                         ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING body",
                )
                .bind(&id)
                .bind(token)
                .fetch_optional(&pool)
                .await;
                let Ok(Some(body)) = claimed else {
                    // Polling: the baseline has no notification path.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let sent: u64 = std::str::from_utf8(&body).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                latencies.record((t0.elapsed().as_micros() as u64).saturating_sub(sent));
                let done = sqlx::query("DELETE FROM bench_queue WHERE device_id = $1 AND lock_token = $2")
                    .bind(&id)
                    .bind(token)
                    .execute(&pool)
                    .await;
                if matches!(done, Ok(r) if r.rows_affected() == 1) {
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                in_flight.add_permits(1);
            }
        }));
    }
    for s in 0..senders {
        let (pool, in_flight, seq) = (pool.clone(), in_flight.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = s;
            while take_slot(&in_flight, deadline).await {
                let id = format!("bench-{}", next % devices);
                next += senders;
                let sent = t0.elapsed().as_micros() as u64;
                let inserted = sqlx::query(
                    "INSERT INTO bench_queue (device_id, seq, body) VALUES ($1, $2, $3)",
                )
                .bind(&id)
                .bind(seq.fetch_add(1, Ordering::Relaxed) as i64)
                .bind(sent.to_string().into_bytes())
                .execute(&pool)
                .await;
                if inserted.is_err() {
                    in_flight.add_permits(1);
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let figures = Figures {
        cycles: cycles.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    };
    pool.close().await;
    Ok(figures)
}
