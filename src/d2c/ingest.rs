//! Group commit: one writer task per partition drains every send waiting for it into one transaction (one
//! INSERT, one fsync) and then answers each sender. A sender gets its answer only after the transaction that holds
//! its message has committed, so `204` means durable.
//!
//! Memory stays bounded: each partition's queue is a bounded channel. When the database falls behind and a queue
//! is full, sends wait for room, and give up with 503 after the enqueue timeout instead of piling up.

use std::time::Duration;

use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::model::NewEvent;
use super::{store, Error, PartitionId, Result, Settings};
use crate::postgres::sqlstate;
use crate::writer_queue::{self, Refused};

/// Messages a transaction takes at most in bytes, so one transaction stays reasonably small.
const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;

struct Job {
    events: Vec<NewEvent>,
    done: oneshot::Sender<Result<i64>>,
}

/// The handles to the partition writers.
pub struct Ingest {
    queues: Vec<mpsc::Sender<Job>>,
    enqueue_timeout: Duration,
}

impl Ingest {
    pub fn start(
        db: PgPool,
        partitions: u32,
        config: &Settings,
        shutdown: watch::Receiver<bool>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> Ingest {
        // A writer may keep its connection between transactions only if every writer can have one.
        let keep = partitions <= db.options().get_max_connections();
        let queues = (0..partitions)
            .map(|partition| {
                let (tx, rx) = mpsc::channel(config.queue_depth as usize);
                let writer = writer(
                    db.clone(),
                    PartitionId::new(partition),
                    rx,
                    config.batch_max as usize,
                    config.retention_days,
                    keep,
                    shutdown.clone(),
                );
                tasks.spawn(async move {
                    writer.await;
                    Ok(())
                });
                tx
            })
            .collect();
        Ingest {
            queues,
            enqueue_timeout: Duration::from_millis(config.enqueue_timeout_ms),
        }
    }

    /// Sends waiting in partition `partition`'s queue, not yet taken into a transaction. Tests read it to know
    /// sends have arrived before they let the writer go on.
    pub fn queued(&self, partition: u32) -> usize {
        self.queues
            .get(partition as usize)
            .map_or(0, |queue| queue.max_capacity() - queue.capacity())
    }

    /// Appends `events` (one device's, so one partition's) atomically; returns the first sequence number once
    /// the transaction that holds them has committed.
    pub async fn submit(&self, partition: PartitionId, events: Vec<NewEvent>) -> Result<i64> {
        // A `PartitionId` is below the partition count by construction: there is a writer for it.
        let queue = &self.queues[partition.index()];
        match writer_queue::hand_off(queue, self.enqueue_timeout, |done| Job { events, done }).await
        {
            Ok(answer) => answer,
            Err(Refused::Full) => Err(Error::IngestBehind),
            Err(Refused::Closed) => Err(Error::ShuttingDown),
        }
    }
}

async fn writer(
    db: PgPool,
    partition: PartitionId,
    mut rx: mpsc::Receiver<Job>,
    batch_max: usize,
    retention_days: u32,
    keep: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut held: Option<PoolConnection<Postgres>> = None;
    while let Some(first) = writer_queue::next_job(&mut rx, &mut shutdown).await {
        // Everything that queued up while the previous transaction ran goes into this one.
        let mut count = first.events.len();
        let mut bytes: usize = first.events.iter().map(|e| e.body.len()).sum();
        let mut jobs = vec![first];
        while count < batch_max && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(job) => {
                    count += job.events.len();
                    bytes += job.events.iter().map(|e| e.body.len()).sum::<usize>();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let events: Vec<&NewEvent> = jobs.iter().flat_map(|j| j.events.iter()).collect();
        let connection = match held.take() {
            Some(connection) => Ok(connection),
            None => db.acquire().await,
        };
        let result = match connection {
            Ok(mut connection) => {
                let result = commit(&db, &mut connection, partition, &events, retention_days).await;
                // Kept for the next transaction while sends already wait for it, when the pool has a connection
                // for every writer: giving a pooled connection back costs a round trip (the driver tests it), and
                // an idle writer holds none.
                if keep && result.is_ok() && !rx.is_empty() {
                    held = Some(connection);
                }
                result
            }
            Err(error) => Err(error),
        };
        answer(jobs, count, result);
    }
}

/// Answers the senders of one transaction: each its first sequence number, or the transaction's error.
fn answer(jobs: Vec<Job>, count: usize, result: Result<i64, sqlx::Error>) {
    metrics::counter!("iothub_d2c_transactions_total").increment(1);
    match result {
        Ok(first_seq) => {
            metrics::counter!("iothub_d2c_messages_total").increment(count as u64);
            let mut seq = first_seq;
            for job in jobs {
                let n = job.events.len() as i64;
                let _ = job.done.send(Ok(seq));
                seq += n;
            }
        }
        Err(error) => {
            let error = Arc::new(error);
            for job in jobs {
                let _ = job.done.send(Err(Error::Commit(error.clone())));
            }
        }
    }
}

/// One transaction; when the time partition for now is missing (maintenance behind), creates it and retries once.
async fn commit(
    db: &PgPool,
    connection: &mut PgConnection,
    partition: PartitionId,
    events: &[&NewEvent],
    retention_days: u32,
) -> Result<i64, sqlx::Error> {
    match store::append(connection, partition, events).await {
        Err(e) if sqlstate(&e).as_deref() == Some(store::NO_PARTITION_FOR_ROW) => {
            tracing::warn!("no time partition for the current hour; creating it");
            store::maintain(db, retention_days).await?;
            store::append(connection, partition, events).await
        }
        other => other,
    }
}
