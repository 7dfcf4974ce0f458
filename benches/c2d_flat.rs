//! Flat C2D cost: the C2D cycle over HTTP (enqueue → long-poll receive → complete) on devices with no history and
//! on devices that each keep 100,000 ended messages (kept for status queries), with 1,000 and then 100,000
//! registered devices, all with `plan_cache_mode = force_generic_plan` on the hub's database (what a pooler in
//! transaction mode, or PostgreSQL's own choice after five executions, gives). The raw-SQL `SKIP LOCKED` cycle runs
//! on the same database in the same run. Each phase prints its rate, WAL bytes, statements, hub CPU and database
//! CPU per message; the end prints the ratios (HTTP phases run twice, in the order A B B A), which should stay near
//! 1.0.
//!
//! `cargo bench --bench c2d_flat`. Environment: `DATABASE_URL` (else a private cluster under the target folder;
//! statements are counted by `pg_stat_statements` when the server preloads it, else by committed transactions),
//! `C2D_FLAT_SECS` (per phase, default 6), `C2D_FLAT_DEVICES` (devices per set, default 8), `C2D_FLAT_SENDERS`
//! (default 8), `C2D_FLAT_ENDED` (ended messages per seeded device, default 100000).
//!
//! Hub CPU is the CPU time of the threads of the runtime the hub runs on (named `hub`), not of the load generator;
//! database CPU is that of the PostgreSQL server's processes (children of its postmaster), read from `/proc`.

mod common;

use std::time::{Duration, Instant};

use iothub::Config;
use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

use common::meter::{Meter, Snapshot};
use common::{http_cycle, sql_cycle, Figures};

const HOST: &str = "bench.local";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Settings {
    secs: u64,
    devices: usize,
    senders: usize,
    ended: i64,
}

fn main() -> anyhow::Result<()> {
    let settings = Settings {
        secs: env_number("C2D_FLAT_SECS", 6),
        devices: env_number("C2D_FLAT_DEVICES", 8) as usize,
        senders: env_number("C2D_FLAT_SENDERS", 8) as usize,
        ended: env_number("C2D_FLAT_ENDED", 100_000) as i64,
    };
    common::cpu::with_hub_runtime(|hub| with_database(hub, settings))
}

async fn with_database(hub: tokio::runtime::Handle, settings: Settings) -> anyhow::Result<()> {
    common::with_scratch_database(&["plan_cache_mode = force_generic_plan"], |options| {
        run(hub, options, &settings)
    })
    .await
}

/// Devices registered through the API, with their SAS tokens.
type DeviceSet = Vec<(String, String)>;

async fn run(
    hub_runtime: tokio::runtime::Handle,
    options: PgConnectOptions,
    settings: &Settings,
) -> anyhow::Result<()> {
    let mut config = Config::with_database("postgres://unused");
    config.hostname = HOST.to_string();
    config.listen = "127.0.0.1:0".parse()?;
    config.c2d.max_queue_depth = 10_000;
    let pool_size = config.db_pool_size;
    let hub = common::BenchHub::launch(hub_runtime, options.clone(), config).await?;
    let base = format!("http://{}", hub.running.http_addr);
    let db = iothub::postgres::connect(options.clone(), 2).await?;
    let meter = Meter::new(&db).await?;
    let plan_mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&db)
        .await?;

    let api = common::Api::new(&db, hub.running.http_addr, HOST).await?;
    let (http, service) = (api.http.clone(), api.service.clone());
    let register_set = |set: &'static str| api.register(set, settings.devices);
    let fresh = register_set("fresh").await?;
    let seeded = register_set("ended").await?;
    let fresh_many = register_set("fresh-many").await?;
    let t = Instant::now();
    seed_ended(&db, &seeded, settings.ended).await?;
    println!(
        "seeded {} ended messages on each of {} devices in {:.1} s",
        settings.ended,
        seeded.len(),
        t.elapsed().as_secs_f64()
    );
    register_filler(&db, 1_000).await?;

    println!(
        "C2D flat-cost benchmark: {} devices per set (one long-polling receiver each), {} senders, {} s per phase, \
         hub pool {pool_size} connections, plan_cache_mode = {plan_mode}, statements counted by {}",
        settings.devices,
        settings.senders,
        settings.secs,
        meter.statements_source()
    );
    println!(
        "{:<40} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8} {:>10} {:>10}",
        "phase",
        "cycles",
        "cycles/s",
        "p50 ms",
        "p99 ms",
        "WAL B/msg",
        "stmt/msg",
        "hub µs/msg",
        "db µs/msg"
    );
    let duration = Duration::from_secs(settings.secs);
    let http_phase = |name: String, set: &DeviceSet| {
        let (meter, http, base, service, set) = (&meter, &http, &base, &service, set.clone());
        async move {
            let before = meter.start().await?;
            let figures = http_cycle(base, http, service, &set, settings.senders, duration).await?;
            report(meter, &name, &figures, before).await
        }
    };
    let sql_phase = |name: String| {
        let (meter, options) = (&meter, &options);
        async move {
            let before = meter.start().await?;
            let figures = sql_cycle(
                options,
                settings.devices,
                settings.senders,
                pool_size,
                duration,
            )
            .await?;
            report(meter, &name, &figures, before).await
        }
    };

    // Each pair of HTTP phases runs in the order A B B A, so a drift of the shared machine's load over the run
    // weighs on both sides of a ratio alike; a side's rate is the mean of its two phases.
    let ended = settings.ended;
    let few_fresh = http_phase("HTTP   1,000 devices, fresh device".into(), &fresh).await?;
    let few_ended = http_phase(
        format!("HTTP   1,000 devices, {ended} ended/device"),
        &seeded,
    )
    .await?;
    let few_sql = sql_phase("SQL    1,000 devices".into()).await?;
    let few_ended = (few_ended
        + http_phase(
            format!("HTTP   1,000 devices, {ended} ended/device"),
            &seeded,
        )
        .await?)
        / 2.0;
    let few_fresh =
        (few_fresh + http_phase("HTTP   1,000 devices, fresh device".into(), &fresh).await?) / 2.0;
    register_filler(&db, 100_000).await?;
    let many_fresh = http_phase("HTTP 100,000 devices, fresh device".into(), &fresh_many).await?;
    let many_ended = http_phase(
        format!("HTTP 100,000 devices, {ended} ended/device"),
        &seeded,
    )
    .await?;
    let many_sql = sql_phase("SQL  100,000 devices".into()).await?;
    let many_ended = (many_ended
        + http_phase(
            format!("HTTP 100,000 devices, {ended} ended/device"),
            &seeded,
        )
        .await?)
        / 2.0;
    let many_fresh = (many_fresh
        + http_phase("HTTP 100,000 devices, fresh device".into(), &fresh_many).await?)
        / 2.0;

    println!("ratios (near 1.0 = flat):");
    println!(
        "  ended / fresh device:        {:.2} with 1,000 devices, {:.2} with 100,000",
        few_ended / few_fresh,
        many_ended / many_fresh
    );
    println!(
        "  100,000 / 1,000 devices:     HTTP {:.2}, SQL {:.2}",
        many_fresh / few_fresh,
        many_sql / few_sql
    );
    println!(
        "  HTTP / raw SQL cycle:        {:.2} with 1,000 devices, {:.2} with 100,000",
        few_fresh / few_sql,
        many_fresh / many_sql
    );

    hub.stop().await?;
    db.close().await;
    Ok(())
}

/// Registers `count` devices named after `set` through the registry API.
/// Gives each device of `set` `ended` completed messages, as a long run of traffic would leave them (kept for status
/// queries until the feedback TTL), with one statement, and refreshes the planner's statistics.
async fn seed_ended(db: &PgPool, set: &DeviceSet, ended: i64) -> anyhow::Result<()> {
    let ids: Vec<&str> = set.iter().map(|(id, _)| id.as_str()).collect();
    sqlx::query(
        "INSERT INTO c2d_messages (device_id, seq, device_generation_id, message_id, ack, body, enqueued_at,
             expires_at, state, delivery_count, outcome, outcome_at)
         SELECT d.device_id, s, d.generation_id, 'seeded-' || s, 'none', convert_to(s::text, 'UTF8'), now(),
             now() + interval '1 hour', 'completed', 1, 'Success', now()
         FROM devices d, generate_series(1, $2::bigint) s WHERE d.device_id = ANY($1)",
    )
    .bind(&ids)
    .bind(ended)
    .execute(db)
    .await?;
    sqlx::query("UPDATE devices SET c2d_next_seq = $2 + 1 WHERE device_id = ANY($1)")
        .bind(&ids)
        .bind(ended)
        .execute(db)
        .await?;
    sqlx::query("ANALYZE c2d_messages").execute(db).await?;
    Ok(())
}

/// Registers devices straight in the table until `total` are registered.
async fn register_filler(db: &PgPool, total: i64) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO devices (device_id, generation_id, etag_version, status, auth_type, primary_key, secondary_key)
         SELECT 'filler-' || i, md5(i::text), 1, 'enabled', 'sas',
             encode(sha256(convert_to('p' || i, 'UTF8')), 'base64'),
             encode(sha256(convert_to('s' || i, 'UTF8')), 'base64')
         FROM generate_series((SELECT count(*) FROM devices) + 1, $1) i",
    )
    .bind(total)
    .execute(db)
    .await?;
    sqlx::query("ANALYZE devices").execute(db).await?;
    Ok(())
}

/// Prints a phase's line (and the statements that took the most time); returns its rate.
async fn report(
    meter: &Meter,
    name: &str,
    figures: &Figures,
    before: Snapshot,
) -> anyhow::Result<f64> {
    let cost = meter.cost(&before, figures.cycles).await?;
    println!(
        "{name:<40} {:>8} {:>9.0} {:>8.2} {:>8.2} {:>9.0} {:>8.1} {:>10.0} {:>10}",
        figures.cycles,
        figures.rate(),
        figures.latencies.percentile(0.50),
        figures.latencies.percentile(0.99),
        cost.wal_bytes,
        cost.statements,
        cost.hub_us,
        cost.db_us.map_or("n/a".into(), |us| format!("{us:.0}")),
    );
    meter.top_statements().await?;
    Ok(figures.rate())
}
