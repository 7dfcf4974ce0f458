//! The C2D cycle on RabbitMQ, as a baseline for the hub's: one classic durable queue per device, persistent
//! messages published with a confirm awaited for each, one consumer per queue acknowledging by hand with a prefetch
//! of 1 (a long-poll receive, then a complete). Measured only when `AMQP_URL` names a broker that answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Semaphore;

use super::{take_slot, window, Figures, Latencies};

const VARIABLE: &str = "AMQP_URL";
/// Delivery mode 2: written to disk before the broker confirms it (unless consumed and acked before that).
const PERSISTENT: u8 = 2;

/// A broker that answered.
pub struct Broker {
    url: String,
}

/// The broker named by `AMQP_URL` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`), or why there is none to measure.
pub async fn broker() -> Result<Broker, String> {
    let url = super::baseline_url(VARIABLE)?;
    let name = super::without_credentials(&url);
    let connection = connect(&url)
        .await
        .map_err(|e| format!("cannot connect to {name} ({VARIABLE}): {e}"))?;
    let _ = connection.close(200, "".into()).await;
    Ok(Broker { url })
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    let connecting = Connection::connect(url, ConnectionProperties::default());
    Ok(tokio::time::timeout(Duration::from_secs(3), connecting).await??)
}

/// The run's queues, one per device, named apart from any other run's.
struct Queues {
    names: Vec<String>,
}

impl Queues {
    async fn declare(channel: &Channel, devices: usize) -> anyhow::Result<Queues> {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut queues = Queues { names: Vec::new() };
        for d in 0..devices {
            let name = format!("iothub-bench-{}-{d}", &run[..8]);
            channel
                .queue_declare(name.as_str().into(), durable, arguments.clone())
                .await?;
            queues.names.push(name);
        }
        Ok(queues)
    }

    async fn delete(&self, channel: &Channel) -> anyhow::Result<()> {
        for name in &self.names {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        Ok(())
    }
}

/// One connection per consumer and per sender, as each device and each back end has its own; the queues are
/// deleted afterwards, also when the run failed.
pub async fn cycle(
    broker: &Broker,
    devices: usize,
    senders: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let admin = connect(&broker.url).await?;
    let channel = admin.create_channel().await?;
    let queues = Queues::declare(&channel, devices).await?;
    let figures = run(broker, &queues.names, senders, duration).await;
    let deleted = queues.delete(&channel).await;
    let _ = admin.close(200, "".into()).await;
    let figures = figures?;
    deleted?;
    Ok(figures)
}

async fn run(
    broker: &Broker,
    queues: &[String],
    senders: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let mut consumers = Vec::new();
    for queue in queues {
        let connection = connect(&broker.url).await?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push((connection, consumer));
    }
    let mut publishers = Vec::new();
    for _ in 0..senders {
        let connection = connect(&broker.url).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        publishers.push((connection, channel));
    }

    let t0 = Instant::now();
    let deadline = t0 + duration;
    let cycles = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Latencies::default());
    let in_flight = Arc::new(Semaphore::new(window(queues.len())));
    let mut tasks = Vec::new();
    for (connection, mut consumer) in consumers {
        let (cycles, latencies, in_flight) = (cycles.clone(), latencies.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let delivery = tokio::select! {
                    delivery = consumer.next() => delivery,
                    _ = tokio::time::sleep_until(deadline.into()) => break,
                };
                let Some(delivery) = delivery else {
                    anyhow::bail!("the broker cancelled a consumer");
                };
                let delivery = delivery?;
                let sent: u64 = std::str::from_utf8(&delivery.data)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                latencies.record((t0.elapsed().as_micros() as u64).saturating_sub(sent));
                if delivery.ack(BasicAckOptions::default()).await? {
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
                in_flight.add_permits(1);
            }
            connection.close(200, "".into()).await?;
            anyhow::Ok(())
        }));
    }
    let queues = Arc::new(queues.to_vec());
    for (s, (connection, channel)) in publishers.into_iter().enumerate() {
        let (queues, in_flight) = (queues.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            let persistent = BasicProperties::default().with_delivery_mode(PERSISTENT);
            let mut next = s;
            while take_slot(&in_flight, deadline).await {
                let queue = &queues[next % queues.len()];
                next += senders;
                let sent = t0.elapsed().as_micros() as u64;
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        sent.to_string().as_bytes(),
                        persistent.clone(),
                    )
                    .await?;
                // Enqueued once the broker confirms it, as the hub's enqueue is once it answers 201.
                if !confirm.await?.is_ack() {
                    in_flight.add_permits(1);
                }
            }
            connection.close(200, "".into()).await?;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(Figures {
        cycles: cycles.load(Ordering::Relaxed),
        elapsed: t0.elapsed(),
        latencies: Arc::try_unwrap(latencies).unwrap_or_default(),
    })
}
