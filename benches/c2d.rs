//! C2D throughput and latency: the full HTTP cycle (enqueue → long-poll receive → complete) over many devices with
//! keep-alive connections, and, on the same database in the same run, a raw-SQL baseline of the same cycle (one
//! `SKIP LOCKED` queue table driven directly by sqlx, one transaction per operation). When `AMQP_URL` names a
//! RabbitMQ broker that answers, the same cycle on it as well: a classic durable queue per device, persistent
//! messages each published with a confirm awaited, one consumer per queue with a prefetch of 1 and manual acks.
//!
//! `cargo bench --bench c2d`. Environment: `DATABASE_URL` (else a private cluster under the target folder),
//! `C2D_BENCH_SECS` (per phase, default 10), `C2D_BENCH_DEVICES` (default 64), `C2D_BENCH_SENDERS` (default 32),
//! `AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`; unset: no RabbitMQ phase).

mod common;

use std::time::Duration;

use iothub::{Config, Listeners};
use sqlx::postgres::PgConnectOptions;

use common::{http_cycle, rabbitmq, sql_cycle};

const HOST: &str = "bench.local";

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs = env_number("C2D_BENCH_SECS", 10);
    let devices = env_number("C2D_BENCH_DEVICES", 64) as usize;
    let senders = env_number("C2D_BENCH_SENDERS", 32) as usize;

    common::with_scratch_database(&[], |options| run(options, secs, devices, senders)).await
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

    let api = common::Api::new(&pool, hub.http_addr, HOST).await?;
    let tokens = api.register("bench", devices).await?;

    println!(
        "C2D cycle benchmark: {devices} devices (one long-polling receiver each), {senders} senders, \
         {secs} s per phase, hub pool {} connections",
        config.db_pool_size
    );
    let duration = Duration::from_secs(secs);
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
    let sql_figures = sql_cycle(&options, devices, senders, config.db_pool_size, duration).await?;
    sql_figures.print("SQL   insert → SKIP LOCKED claim → delete");
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

    let _ = stop.send(());
    hub.wait().await?;
    pool.close().await;
    Ok(())
}
