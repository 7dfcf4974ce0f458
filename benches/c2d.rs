//! C2D throughput and latency: the full HTTP cycle (enqueue → long-poll receive → complete) over many devices with
//! keep-alive connections, and, on the same database in the same run, a raw-SQL baseline of the same cycle (one
//! `SKIP LOCKED` queue table driven directly by sqlx, one transaction per operation).
//!
//! `cargo bench --bench c2d`. Environment: `DATABASE_URL` (else a private cluster under the target folder),
//! `C2D_BENCH_SECS` (per phase, default 10), `C2D_BENCH_DEVICES` (default 64), `C2D_BENCH_SENDERS` (default 32).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iothub::auth::{policies, sas};
use iothub::{Config, Listeners};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::sync::Semaphore;

const HOST: &str = "bench.local";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Latencies in microseconds (bounded: one sample per cycle of a bounded run).
#[derive(Default)]
struct Latencies(Mutex<Vec<u32>>);

impl Latencies {
    fn record(&self, micros: u64) {
        let mut samples = self.0.lock().unwrap();
        if samples.len() < 5_000_000 {
            samples.push(micros.min(u32::MAX as u64) as u32);
        }
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut samples = self.0.lock().unwrap().clone();
        if samples.is_empty() {
            return f64::NAN;
        }
        samples.sort_unstable();
        let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
        f64::from(samples[index]) / 1000.0
    }
}

struct Figures {
    cycles: u64,
    elapsed: Duration,
    latencies: Latencies,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, name: &str) {
        println!(
            "{name:<44} {:>8} cycles  {:>8.0} cycles/s  enqueue→receive p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.cycles,
            self.rate(),
            self.latencies.percentile(0.50),
            self.latencies.percentile(0.99),
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs = env_number("C2D_BENCH_SECS", 10);
    let devices = env_number("C2D_BENCH_DEVICES", 64) as usize;
    let senders = env_number("C2D_BENCH_SENDERS", 32) as usize;

    let mut cluster = None;
    let server = match std::env::var("DATABASE_URL") {
        Ok(url) => PgConnectOptions::from_str(&url)?,
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
    let options = server.clone().database(&name);

    let result = run(options, secs, devices, senders).await;

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

async fn run(
    options: PgConnectOptions,
    secs: u64,
    devices: usize,
    senders: usize,
) -> anyhow::Result<()> {
    let mut config = Config::with_database("postgres://unused");
    config.hostname = HOST.to_string();
    config.listen = "127.0.0.1:0".parse()?;
    config.c2d.max_queue_depth = 10_000;
    let pool = iothub::postgres::connect(options.clone(), config.db_pool_size).await?;
    let listeners = Listeners {
        http: tokio::net::TcpListener::bind(config.listen).await?,
        tls: None,
        metrics: None,
        mqtts: None,
        mqtt: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let hub = iothub::launch(config.clone(), pool.clone(), listeners, async move {
        let _ = stopped.await;
    })
    .await?;
    let base = format!("http://{}", hub.http_addr);

    let expiry = chrono::Utc::now().timestamp() + 3600;
    let owner_key = policies::get(&pool, "iothubowner")
        .await?
        .expect("owner")
        .primary_key;
    let owner = sas::sign(HOST, &owner_key, Some("iothubowner"), expiry)?;
    let service_key = policies::get(&pool, "service")
        .await?
        .expect("service")
        .primary_key;
    let service = sas::sign(HOST, &service_key, Some("service"), expiry)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut tokens = Vec::new();
    for d in 0..devices {
        let id = format!("bench-{d}");
        let device: serde_json::Value = http
            .put(format!("{base}/devices/{id}?api-version=2021-04-12"))
            .header("Authorization", &owner)
            .json(&serde_json::json!({"deviceId": id}))
            .send()
            .await?
            .json()
            .await?;
        let key = device["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .expect("a key")
            .to_string();
        tokens.push((
            id.clone(),
            sas::sign(&format!("{HOST}/devices/{id}"), &key, None, expiry)?,
        ));
    }

    println!(
        "C2D cycle benchmark: {devices} devices (one long-polling receiver each), {senders} senders, \
         {secs} s per phase, hub pool {} connections",
        config.db_pool_size
    );
    let duration = Duration::from_secs(secs);
    let http_figures = http_cycle(&base, &http, &service, &tokens, senders, duration).await?;
    http_figures.print("HTTP  enqueue → receive (long poll) → complete");
    let sql_figures = sql_cycle(&options, devices, senders, config.db_pool_size, duration).await?;
    sql_figures.print("SQL   insert → SKIP LOCKED claim → delete");
    println!(
        "ratio HTTP / SQL: {:.2} (throughput)   p99 latency HTTP {:.2} ms vs SQL {:.2} ms",
        http_figures.rate() / sql_figures.rate(),
        http_figures.latencies.percentile(0.99),
        sql_figures.latencies.percentile(0.99),
    );

    let _ = stop.send(());
    hub.wait().await?;
    pool.close().await;
    Ok(())
}

/// In-flight messages at most, so queues stay short and latency measures the path, not a backlog.
fn window(devices: usize) -> usize {
    devices * 2
}

async fn http_cycle(
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
    let ids: Arc<Vec<String>> = Arc::new(devices.iter().map(|(id, _)| id.clone()).collect());
    for s in 0..senders {
        let (http, base, service, ids, in_flight) = (
            http.clone(),
            base.to_string(),
            service.to_string(),
            ids.clone(),
            in_flight.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut next = s;
            while Instant::now() < deadline {
                let Ok(Ok(permit)) =
                    tokio::time::timeout(Duration::from_millis(200), in_flight.acquire()).await
                else {
                    continue;
                };
                permit.forget();
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
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(Figures {
        cycles: cycles.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}

async fn sql_cycle(
    options: &PgConnectOptions,
    devices: usize,
    senders: usize,
    pool_size: u32,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let pool: PgPool = iothub::postgres::connect(options.clone(), pool_size).await?;
    sqlx::query(
        "CREATE TABLE bench_queue (
             device_id text NOT NULL, seq bigint NOT NULL, body bytea NOT NULL,
             lock_token uuid, locked_until timestamptz, PRIMARY KEY (device_id, seq))",
    )
    .execute(&pool)
    .await?;
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
            while Instant::now() < deadline {
                let Ok(Ok(permit)) =
                    tokio::time::timeout(Duration::from_millis(200), in_flight.acquire()).await
                else {
                    continue;
                };
                permit.forget();
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
