//! C2D throughput and latency: the full HTTP cycle (enqueue → long-poll receive → complete) over many devices with
//! keep-alive connections, and, on the same database in the same run, a raw-SQL baseline of the same cycle (one
//! `SKIP LOCKED` queue table driven directly by sqlx, one transaction per operation). When `AMQP_URL` names a
//! RabbitMQ broker that answers, the same cycle on it as well: a classic durable queue per device, persistent
//! messages each published with a confirm awaited, one consumer per queue with a prefetch of 1 and manual acks.
//!
//! Each phase on the database prints, per cycle, the WAL bytes, statements, hub CPU (the threads of the runtime the
//! hub runs on, named `hub`) and database CPU (the PostgreSQL server's processes, when it runs on this machine).
//!
//! `cargo bench --bench c2d`. Environment: `DATABASE_URL` (else a private cluster under the target folder),
//! `C2D_BENCH_SECS` (per phase, default 10), `C2D_BENCH_DEVICES` (default 64), `C2D_BENCH_SENDERS` (default 32),
//! `AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; unset: no RabbitMQ phase).

mod common;

use std::time::Duration;

use iothub::Config;
use sqlx::postgres::PgConnectOptions;

use common::meter::{Meter, Snapshot};
use common::{http_cycle, rabbitmq, sql_cycle, Figures};

const HOST: &str = "bench.local";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let secs = env_number("C2D_BENCH_SECS", 10);
    let devices = env_number("C2D_BENCH_DEVICES", 64) as usize;
    let senders = env_number("C2D_BENCH_SENDERS", 32) as usize;
    common::cpu::with_hub_runtime(|hub_runtime| {
        common::with_scratch_database(&[], |options| {
            run(hub_runtime, options, secs, devices, senders)
        })
    })
}

async fn run(
    hub_runtime: tokio::runtime::Handle,
    options: PgConnectOptions,
    secs: u64,
    devices: usize,
    senders: usize,
) -> anyhow::Result<()> {
    let mut config = Config::with_database("postgres://unused");
    config.hostname = HOST.to_string();
    config.listen = "127.0.0.1:0".parse()?;
    config.c2d.max_queue_depth = 10_000;
    let pool_size = config.db_pool_size;
    let hub = common::BenchHub::launch(hub_runtime, options.clone(), config).await?;
    let db = iothub::postgres::connect(options.clone(), 2).await?;
    let meter = Meter::new(&db).await?;

    let api = common::Api::new(&db, hub.running.http_addr, HOST).await?;
    let tokens = api.register("bench", devices).await?;

    println!(
        "C2D cycle benchmark: {devices} devices (one long-polling receiver each), {senders} senders, \
         {secs} s per phase, hub pool {pool_size} connections; per cycle: WAL bytes, statements ({}), hub CPU and \
         database CPU",
        meter.statements_source()
    );
    let duration = Duration::from_secs(secs);
    let before = meter.start().await?;
    let http_figures = http_cycle(
        &api.base,
        &api.http,
        &api.service,
        &tokens,
        senders,
        duration,
    )
    .await?;
    http_figures.print("HTTP  enqueue → receive (long poll) → complete");
    print_cost(&meter, &before, &http_figures).await?;
    let before = meter.start().await?;
    let sql_figures = sql_cycle(&options, devices, senders, pool_size, duration).await?;
    sql_figures.print("SQL   insert → SKIP LOCKED claim → delete");
    print_cost(&meter, &before, &sql_figures).await?;
    let rabbit_figures = match rabbitmq::broker().await {
        Ok(broker) => {
            let figures = rabbitmq::cycle(&broker, devices, senders, duration).await?;
            figures.print("AMQP  publish+confirm → consume → ack");
            Some(figures)
        }
        Err(why) => {
            println!("RabbitMQ baseline skipped: {why}");
            None
        }
    };
    print!(
        "ratio HTTP / SQL: {:.2}",
        http_figures.rate() / sql_figures.rate()
    );
    if let Some(rabbit) = &rabbit_figures {
        print!(
            "  HTTP / RabbitMQ: {:.2}",
            http_figures.rate() / rabbit.rate()
        );
    }
    print!(
        " (throughput)   p99 latency HTTP {:.2} ms vs SQL {:.2} ms",
        http_figures.latencies.percentile(0.99),
        sql_figures.latencies.percentile(0.99),
    );
    if let Some(rabbit) = &rabbit_figures {
        print!(" vs RabbitMQ {:.2} ms", rabbit.latencies.percentile(0.99));
    }
    println!();

    hub.stop().await?;
    db.close().await;
    Ok(())
}

/// Prints what a phase cost per cycle, read since `before`.
async fn print_cost(meter: &Meter, before: &Snapshot, figures: &Figures) -> anyhow::Result<()> {
    let cost = meter.cost(before, figures.cycles).await?;
    let db_us = cost
        .db_us
        .map_or("n/a (server not on this machine)".to_string(), |us| {
            format!("{us:.0} µs")
        });
    println!(
        "      per cycle: WAL {:.0} B, {:.2} statements, hub CPU {:.0} µs, database CPU {db_us}",
        cost.wal_bytes, cost.statements, cost.hub_us
    );
    Ok(())
}
