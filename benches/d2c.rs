//! D2C ingestion benchmark: `cargo bench --bench d2c`.
//!
//! Launches a hub (library `iothub::launch`) on a database created for the run on `DATABASE_URL`'s server (dropped
//! afterwards, so runs do not meet each other's devices), or on a private PostgreSQL cluster under the target
//! folder, and measures on the same database:
//! 1. single-message sends over HTTP from many simulated devices (keep-alive connections), messages/s, and how
//!    many messages each ingestion transaction carried;
//! 2. batched sends (`application/vnd.microsoft.iothub.json`), messages/s;
//! 3. send → readable latency (p50/p99) during the single-message run, seen by long-polling readers;
//! 4. the HTTP + authentication ceiling: the same sends refused (a malformed batch) before anything is written;
//! 5. baselines straight into one table: one INSERT per message (autocommit), and multi-row INSERTs of as many rows
//!    as a batch holds (the batch's like: one statement per batch);
//! 6. reads of the same stored JSON events with `body=all` (every form of each body), `body=base64` and
//!    `body=decoded`, side by side (in the order A B C C B A): events/s, hub CPU and answer bytes per event;
//! 7. when `NATS_URL` names a NATS server with JetStream that answers: its acknowledged publish to a file-backed
//!    stream, one publisher per device with one publish awaiting its ack, as the single HTTP sends do;
//! 8. how often authentication found a device's keys in the credential cache during the single-message run
//!    (`IOTHUB_AUTH_CACHE_MS` applies, as for `iothub serve`).
//! 9. per message of the send phases and of the baselines: hub CPU, database CPU (the server's processes, when it
//!    runs on this machine), WAL bytes and statements (`pg_stat_statements` when the server preloads it, else
//!    committed transactions).
//!
//! Environment: `D2C_BENCH_SECS` (per phase, default 5), `D2C_BENCH_DEVICES` (concurrent devices, default 64),
//! `D2C_BENCH_BATCH` (messages per batch, default 100), `D2C_BENCH_DB_CONNECTIONS` (baseline connections, default
//! 16, the hub's pool size), `D2C_BENCH_READ_EVENTS` (events stored for the read phases, default 20000),
//! `D2C_BENCH_READ_SECS` (per read phase, default 3), `NATS_URL` (e.g. `nats://127.0.0.1:4222`; unset: no NATS
//! phase).
//!
//! Hub CPU is the CPU time of the threads of the runtime the hub runs on (named `hub`), not of the load generator.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

use common::cpu::hub_cpu;
use common::meter::{Cost, Meter};
use common::nats;

const HOST: &str = "bench.example.net";
const API: &str = "api-version=2021-04-12";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Credential cache lookups so far, from the hub's metrics: (hits, misses).
fn cache_lookups() -> (u64, u64) {
    let (mut hits, mut misses) = (0, 0);
    for line in iothub::http::metrics::handle().render().lines() {
        let Some(labels) = line.strip_prefix("iothub_auth_cache_lookups_total{") else {
            continue;
        };
        let count: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if labels.contains("outcome=\"hit\"") {
            hits += count;
        } else {
            misses += count;
        }
    }
    (hits, misses)
}

fn payload(i: u64) -> String {
    format!(
        r#"{{"temperature":21.5,"humidity":40.2,"reading":{i},"pad":"0123456789abcdef0123456789abcdef"}}"#
    )
}

struct Devices {
    ids: Vec<(String, String)>,
}

/// What a phase of sends moved: its rate before the stop, and every message acknowledged (the ones in flight at the
/// stop included, as their cost is metered).
#[derive(Clone, Copy)]
struct Phase {
    rate: f64,
    messages: u64,
}

/// Sends for `secs` from every device at once; returns messages acknowledged per second.
async fn http_phase(
    http: &reqwest::Client,
    base: &str,
    devices: &Devices,
    secs: u64,
    batch: usize,
    epoch: Instant,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (id, token) in &devices.ids {
        let (http, base, id, token) = (http.clone(), base.to_string(), id.clone(), token.clone());
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let url = format!("{base}/devices/{id}/messages/events?{API}");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // The body carries its send time (µs since the epoch of the run) for the latency readers.
                let stamp = epoch.elapsed().as_micros();
                let request = http.post(&url).header("Authorization", &token);
                let request = if batch == 0 {
                    request.header("Content-Type", "application/vnd.microsoft.iothub.json").body("[")
                } else if batch == 1 {
                    request.header("iothub-app-sent", stamp.to_string()).body(payload(i))
                } else {
                    let items: Vec<Value> = (0..batch as u64)
                        .map(|k| json!({"body": BASE64.encode(payload(i + k)), "properties": {"iothub-app-sent": stamp.to_string()}}))
                        .collect();
                    request
                        .header("Content-Type", "application/vnd.microsoft.iothub.json")
                        .body(serde_json::to_string(&items).unwrap())
                };
                match request.send().await {
                    Ok(r) if r.status() == 204 || (batch == 0 && r.status() == 400) => {
                        sent.fetch_add(batch.max(1) as u64, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += batch.max(1) as u64;
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let before_drain = sent.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let f = failed.load(Ordering::Relaxed);
    if f > 0 {
        println!("  ({f} sends failed)");
    }
    Phase {
        rate: before_drain as f64 / elapsed,
        messages: sent.load(Ordering::Relaxed),
    }
}

/// Long-polls every partition and records, for each single message read, the time from send to readable.
fn spawn_readers(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    partitions: u32,
    epoch: Instant,
    latencies: Arc<Mutex<Vec<f64>>>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..partitions)
        .map(|p| {
            let (http, base, token) = (http.clone(), base.to_string(), token.to_string());
            let (latencies, stop) = (latencies.clone(), stop.clone());
            tokio::spawn(async move {
                let mut from: Option<i64> = None;
                while !stop.load(Ordering::Relaxed) {
                    let position = match from {
                        Some(n) => format!("from-sequence-number={n}"),
                        None => "from=end".to_string(),
                    };
                    let url = format!("{base}/messages/events/partitions/{p}?{API}&{position}&max-count=1000&wait-ms=1000");
                    let Ok(response) = http.get(url).header("Authorization", &token).send().await else {
                        continue;
                    };
                    let Ok(page) = response.json::<Value>().await else {
                        continue;
                    };
                    let now = epoch.elapsed().as_micros() as f64;
                    let mut batch = Vec::new();
                    for e in page["events"].as_array().into_iter().flatten() {
                        if let Some(sent) = e["properties"]["sent"].as_str().and_then(|s| s.parse::<f64>().ok()) {
                            batch.push((now - sent) / 1000.0);
                        }
                    }
                    latencies.lock().unwrap().extend(batch);
                    from = page["nextSequenceNumber"].as_i64();
                }
            })
        })
        .collect()
}

/// Every partition's next sequence number, from the event endpoint.
async fn next_positions(
    http: &reqwest::Client,
    base: &str,
    token: &str,
) -> anyhow::Result<Vec<(u32, i64)>> {
    let info: Value = http
        .get(format!("{base}/messages/events?{API}"))
        .header("Authorization", token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(info["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let id = p["partitionId"].as_str().unwrap().parse().unwrap();
            (id, p["lastSequenceNumber"].as_i64().map_or(0, |s| s + 1))
        })
        .collect())
}

/// Stores about `count` JSON events (`iothub-contenttype: application/json`) from every device in batches of 100;
/// returns each partition's range of them, `(partition, first, end)`.
async fn store_json_events(
    http: &reqwest::Client,
    base: &str,
    devices: &Devices,
    service: &str,
    count: usize,
) -> anyhow::Result<Vec<(u32, i64, i64)>> {
    const PER_BATCH: usize = 100;
    let before = next_positions(http, base, service).await?;
    let batches_per_device = count.div_ceil(PER_BATCH * devices.ids.len());
    let mut tasks = Vec::new();
    for (id, token) in &devices.ids {
        let request = http
            .post(format!("{base}/devices/{id}/messages/events?{API}"))
            .header("Authorization", token)
            .header("Content-Type", "application/vnd.microsoft.iothub.json");
        tasks.push(tokio::spawn(async move {
            for b in 0..batches_per_device {
                let items: Vec<Value> = (0..PER_BATCH)
                    .map(|k| {
                        json!({"body": payload((b * PER_BATCH + k) as u64), "base64Encoded": false,
                        "properties": {"iothub-contenttype": "application/json"}})
                    })
                    .collect();
                let response = request
                    .try_clone()
                    .unwrap()
                    .body(serde_json::to_string(&items).unwrap())
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status() == 204,
                    "storing events: {}",
                    response.status()
                );
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let after = next_positions(http, base, service).await?;
    Ok(before
        .into_iter()
        .zip(after)
        .map(|((p, start), (_, end))| (p, start, end))
        .filter(|(_, start, end)| end > start)
        .collect())
}

/// What one read phase measured.
#[derive(Clone, Copy)]
struct ReadFigures {
    rate: f64,
    hub_us: f64,
    bytes: f64,
}

impl ReadFigures {
    fn mean<'a>(runs: impl Iterator<Item = &'a ReadFigures>) -> ReadFigures {
        let runs: Vec<&ReadFigures> = runs.collect();
        let n = runs.len().max(1) as f64;
        ReadFigures {
            rate: runs.iter().map(|r| r.rate).sum::<f64>() / n,
            hub_us: runs.iter().map(|r| r.hub_us).sum::<f64>() / n,
            bytes: runs.iter().map(|r| r.bytes).sum::<f64>() / n,
        }
    }
}

/// Reads the stored `ranges` over and over for `secs` with `body=format`, one reader per partition, in pages of up
/// to 1000. Each answer is checked for its status and its `nextSequenceNumber`, not parsed, so the load generator's
/// CPU goes to the hub.
async fn read_phase(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    ranges: &[(u32, i64, i64)],
    format: &str,
    secs: f64,
) -> anyhow::Result<ReadFigures> {
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for &(p, start, end) in ranges {
        let (http, token) = (http.clone(), token.to_string());
        let (stop, events, bytes) = (stop.clone(), events.clone(), bytes.clone());
        let url = format!("{base}/messages/events/partitions/{p}?{API}&body={format}");
        tasks.push(tokio::spawn(async move {
            let mut from = start;
            while !stop.load(Ordering::Relaxed) {
                let n = (end - from).min(1000);
                let answer = http
                    .get(format!("{url}&from-sequence-number={from}&max-count={n}"))
                    .header("Authorization", &token)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                // The page's last field: where the next read continues.
                let next = format!("\"nextSequenceNumber\":{}}}", from + n);
                anyhow::ensure!(
                    answer.ends_with(next.as_bytes()),
                    "partition {p}: a page from {from} did not hold {n} events"
                );
                events.fetch_add(n as u64, Ordering::Relaxed);
                bytes.fetch_add(answer.len() as u64, Ordering::Relaxed);
                from = if from + n >= end { start } else { from + n };
            }
            anyhow::Ok(())
        }));
    }
    let cpu_before = hub_cpu();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (read, sent) = (
        events.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
    );
    let (elapsed, cpu) = (
        started.elapsed().as_secs_f64(),
        hub_cpu().saturating_sub(cpu_before),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let n = read.max(1) as f64;
    Ok(ReadFigures {
        rate: read as f64 / elapsed,
        hub_us: cpu.as_secs_f64() * 1e6 / n,
        bytes: sent as f64 / n,
    })
}

/// One autocommit INSERT per message from `connections` connections; rows per second.
async fn baseline_single(pool: &PgPool, secs: u64, connections: usize) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (pool, stop, rows) = (pool.clone(), stop.clone(), rows.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sqlx::query("INSERT INTO bench_raw (device_id, properties, body) VALUES ($1, $2::jsonb, $3)")
                    .bind(format!("bench-{c}"))
                    .bind(r#"{"sent":"0"}"#)
                    .bind(payload(i).into_bytes())
                    .execute(&pool)
                    .await
                    .unwrap();
                rows.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = rows.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in tasks {
        t.await?;
    }
    Ok(Phase {
        rate: n as f64 / elapsed,
        messages: rows.load(Ordering::Relaxed),
    })
}

/// Multi-row INSERTs of `per_statement` rows from `connections` connections; rows per second.
async fn baseline_multi(
    pool: &PgPool,
    secs: u64,
    connections: usize,
    per_statement: usize,
) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (pool, stop, rows) = (pool.clone(), stop.clone(), rows.clone());
        tasks.push(tokio::spawn(async move {
            let devices: Vec<String> = (0..per_statement).map(|_| format!("bench-{c}")).collect();
            let props: Vec<String> = (0..per_statement).map(|_| r#"{"sent":"0"}"#.to_string()).collect();
            let bodies: Vec<Vec<u8>> = (0..per_statement as u64).map(|i| payload(i).into_bytes()).collect();
            while !stop.load(Ordering::Relaxed) {
                sqlx::query(
                    "INSERT INTO bench_raw (device_id, properties, body)
                     SELECT d, p::jsonb, b FROM unnest($1::text[], $2::text[], $3::bytea[]) AS u(d, p, b)",
                )
                .bind(&devices)
                .bind(&props)
                .bind(&bodies)
                .execute(&pool)
                .await
                .unwrap();
                rows.fetch_add(per_statement as u64, Ordering::Relaxed);
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = rows.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in tasks {
        t.await?;
    }
    Ok(Phase {
        rate: n as f64 / elapsed,
        messages: rows.load(Ordering::Relaxed),
    })
}

fn print_cost(name: &str, cost: &Cost) {
    println!(
        "  {name:<50} {:>10.1} {:>10} {:>10.0} {:>10.2}",
        cost.hub_us,
        cost.db_us.map_or("n/a".into(), |us| format!("{us:.1}")),
        cost.wal_bytes,
        cost.statements
    );
}

fn main() -> anyhow::Result<()> {
    common::cpu::with_hub_runtime(|hub_runtime| {
        common::with_scratch_database(&[], |options| run(hub_runtime, options))
    })
}

async fn run(hub_runtime: tokio::runtime::Handle, options: PgConnectOptions) -> anyhow::Result<()> {
    let secs: u64 = env_or("D2C_BENCH_SECS", 5);
    let device_count: usize = env_or("D2C_BENCH_DEVICES", 64);
    let batch: usize = env_or("D2C_BENCH_BATCH", 100);
    let connections: usize = env_or("D2C_BENCH_DB_CONNECTIONS", 16);
    let read_events: usize = env_or("D2C_BENCH_READ_EVENTS", 20_000);
    let read_secs: f64 = env_or("D2C_BENCH_READ_SECS", 3.0);

    let pool = iothub::postgres::connect(options, 40).await?;
    let meter = Meter::new(&pool).await?;
    let mut config = iothub::Config::with_database("postgres://unused");
    config.hostname = HOST.to_string();
    config.listen = "127.0.0.1:0".parse()?;
    let cache_ms = config.auth_cache_ms;
    let hub =
        common::BenchHub::launch(hub_runtime, pool.connect_options().as_ref().clone(), config)
            .await?;
    let running = &hub.running;
    let base = format!("http://{}", running.http_addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(device_count * 2)
        .build()?;
    let devices = Devices {
        ids: common::Api::new(&pool, running.http_addr, HOST)
            .await?
            .register("bench", device_count)
            .await?,
    };
    let service_key = iothub::auth::policies::get(&pool, "service")
        .await?
        .unwrap()
        .primary_key;
    let service = iothub::auth::sas::sign(
        HOST,
        &service_key,
        Some("service"),
        chrono::Utc::now().timestamp() + 7200,
    )?;
    let partitions: u32 = sqlx::query_scalar::<_, i32>("SELECT partition_count FROM d2c_settings")
        .fetch_one(&pool)
        .await? as u32;

    println!("d2c benchmark: {device_count} devices, {secs} s per phase, batches of {batch}, {partitions} partitions");
    let epoch = Instant::now();

    // Warm-up (connections, plans).
    http_phase(&http, &base, &devices, 1, 1, epoch).await;

    let latencies = Arc::new(Mutex::new(Vec::new()));
    let stop_readers = Arc::new(AtomicBool::new(false));
    let readers = spawn_readers(
        &http,
        &base,
        &service,
        partitions,
        epoch,
        latencies.clone(),
        stop_readers.clone(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = cache_lookups();
    let metered = meter.start().await?;
    let single = http_phase(&http, &base, &devices, secs, 1, epoch).await;
    let single_cost = meter.cost(&metered, single.messages).await?;
    let after = cache_lookups();
    let (hits, misses) = (after.0 - before.0, after.1 - before.1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_readers.store(true, Ordering::Relaxed);
    for r in readers {
        let _ = r.await;
    }
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Messages per ingestion transaction in the single-message run: one enqueued time per transaction and partition.
    let (events, transactions): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (partition_id, enqueued_at)) FROM d2c_events",
    )
    .fetch_one(&pool)
    .await?;

    let metered = meter.start().await?;
    let batched = http_phase(&http, &base, &devices, secs, batch, epoch).await;
    let batched_cost = meter.cost(&metered, batched.messages).await?;
    // The same requests refused after authentication, before any write: what HTTP + SAS + the device lookup cost.
    let metered = meter.start().await?;
    let ceiling = http_phase(&http, &base, &devices, secs, 0, epoch).await;
    let ceiling_cost = meter.cost(&metered, ceiling.messages).await?;

    let ranges = store_json_events(&http, &base, &devices, &service, read_events).await?;
    let stored: i64 = ranges.iter().map(|(_, start, end)| end - start).sum();
    // A B C C B A: a drift of the shared machine's load weighs on every format alike.
    let formats = ["all", "base64", "decoded"];
    let mut reads = Vec::new();
    for format in formats.iter().chain(formats.iter().rev()) {
        reads.push((
            *format,
            read_phase(&http, &base, &service, &ranges, format, read_secs).await?,
        ));
    }
    let read = |format: &str| {
        ReadFigures::mean(reads.iter().filter(|(f, _)| *f == format).map(|(_, r)| r))
    };

    sqlx::query("CREATE TABLE IF NOT EXISTS bench_raw (id bigserial PRIMARY KEY, device_id text NOT NULL, properties jsonb NOT NULL, body bytea NOT NULL, at timestamptz NOT NULL DEFAULT now())")
        .execute(&pool)
        .await?;
    let metered = meter.start().await?;
    let per_insert = baseline_single(&pool, secs, connections).await?;
    let per_insert_cost = meter.cost(&metered, per_insert.messages).await?;
    let metered = meter.start().await?;
    let multi = baseline_multi(&pool, secs, connections, batch.max(1)).await?;
    let multi_cost = meter.cost(&metered, multi.messages).await?;
    let jetstream = match nats::server() {
        Ok(server) => {
            let duration = Duration::from_secs(secs);
            Some(nats::publish_acked(server, payload, device_count, 1, duration).await?)
        }
        Err(why) => {
            println!("NATS JetStream baseline skipped: {why}");
            None
        }
    };

    println!();
    println!(
        "{:<52} {:>12}",
        "HTTP single-message sends",
        format!("{:.0} msg/s", single.rate)
    );
    println!(
        "{:<52} {:>12}",
        format!("HTTP batched sends ({batch}/batch)"),
        format!("{:.0} msg/s", batched.rate)
    );
    println!(
        "{:<52} {:>12}",
        format!("baseline: one INSERT per message ({connections} conns)"),
        format!("{:.0} rows/s", per_insert.rate)
    );
    println!(
        "{:<52} {:>12}",
        format!("baseline: multi-row INSERT, {batch} rows ({connections} conns)"),
        format!("{:.0} rows/s", multi.rate)
    );
    if let Some(jetstream) = &jetstream {
        println!(
            "{:<52} {:>12}",
            format!("baseline: JetStream publish → ack ({device_count} publishers)"),
            format!("{:.0} msg/s", jetstream.rate())
        );
    }
    println!(
        "{:<52} {:>12}",
        "HTTP sends refused after auth (no write)",
        format!("{:.0} req/s", ceiling.rate)
    );
    println!(
        "{:<52} {:>12}",
        "messages per ingestion transaction (single run)",
        format!("{:.1}", events as f64 / transactions.max(1) as f64)
    );
    println!(
        "{:<52} {:>12}",
        format!("send -> readable latency ({} samples)", lat.len()),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        )
    );
    println!(
        "reads of {stored} stored JSON events ({} B bodies), pages of up to 1000, one reader per partition, \
         {read_secs} s per phase, A B C C B A:",
        payload(0).len()
    );
    for format in formats {
        let r = read(format);
        println!(
            "  {:<50} {:>12} {:>14} {:>14}",
            format!("body={format}"),
            format!("{:.0} events/s", r.rate),
            format!("hub {:.1} µs/event", r.hub_us),
            format!("{:.0} B/event", r.bytes),
        );
    }
    println!(
        "{:<52} {:>12}",
        format!("credential cache (single run, {cache_ms} ms)"),
        format!(
            "{hits} hits, {misses} misses ({:.1} % missed)",
            100.0 * misses as f64 / (hits + misses).max(1) as f64
        )
    );
    println!(
        "per message, by {}: {:>10} {:>10} {:>10} {:>10}",
        meter.statements_source(),
        "hub µs",
        "db µs",
        "WAL B",
        "statements"
    );
    for (name, cost) in [
        ("HTTP single sends (and their readers)", &single_cost),
        ("HTTP batched sends", &batched_cost),
        ("HTTP sends refused after auth (per request)", &ceiling_cost),
        ("baseline: one INSERT per message", &per_insert_cost),
        ("baseline: multi-row INSERT", &multi_cost),
    ] {
        print_cost(name, cost);
    }
    println!();
    println!("ratios (target):");
    println!(
        "  HTTP single / one-INSERT-per-message  = {:.2}  (> 1)",
        single.rate / per_insert.rate
    );
    if let Some(jetstream) = &jetstream {
        println!(
            "  HTTP single / NATS JetStream acked    = {:.2}  (toward 1)",
            single.rate / jetstream.rate()
        );
    }
    println!(
        "  HTTP batched / multi-row INSERT       = {:.2}  (>= 0.5)",
        batched.rate / multi.rate
    );
    println!(
        "  p99 send -> readable                  = {:.1} ms (< 50 ms)",
        percentile(&lat, 0.99)
    );
    let (all, base64, decoded) = (read("all"), read("base64"), read("decoded"));
    println!(
        "  reads body=base64 / body=all          = {:.2} events/s, {:.2} hub CPU per event",
        base64.rate / all.rate,
        base64.hub_us / all.hub_us
    );
    println!(
        "  reads body=decoded / body=all         = {:.2} events/s, {:.2} hub CPU per event",
        decoded.rate / all.rate,
        decoded.hub_us / all.hub_us
    );

    hub.stop().await?;
    pool.close().await;
    Ok(())
}
