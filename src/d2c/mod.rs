//! Device-to-cloud telemetry: ingestion with group commit, partitioned durable streams in PostgreSQL, reads,
//! consumer groups with server-side checkpoints, a live Server-Sent Events stream, and retention.
//!
//! The way a message travels: a transport (today `POST /devices/{id}/messages/events`) files its properties
//! through [`model::Properties`], which stamps it → [`ingest`] hands it to its partition's writer, which commits
//! many senders' messages in one transaction → the sender gets its answer once that transaction has committed →
//! readers are woken through the notifier's D2C channel.

pub mod consumer_groups;
pub mod ingest;
pub mod model;
pub mod partition;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use partition::{partition_for, PartitionId};

/// The stream settings (`IOTHUB_*`); clap checks each range.
#[derive(Args, Clone, Debug)]
#[group(id = "d2c_settings")]
pub struct Settings {
    /// Partitions of the event stream (1–128). Fixed when the database is created: a database that already has
    /// streams keeps its count, and a different value here only logs a warning.
    #[arg(long, env = "IOTHUB_PARTITIONS", default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=128))]
    pub partitions: u32,

    /// Days events stay readable (1–7). Retention drops whole hourly time partitions, so events stay up to an
    /// hour longer.
    #[arg(long = "d2c-retention-days", env = "IOTHUB_D2C_RETENTION_DAYS", default_value_t = 1,
        value_parser = clap::value_parser!(u32).range(1..=7))]
    pub retention_days: u32,

    /// Consumer groups at most, `$Default` included.
    #[arg(long, env = "IOTHUB_MAX_CONSUMER_GROUPS", default_value_t = 20,
        value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_consumer_groups: u32,

    /// Messages one ingestion transaction commits at most (group commit).
    #[arg(long = "d2c-batch-max", env = "IOTHUB_D2C_BATCH_MAX", default_value_t = 1000,
        value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_max: u32,

    /// Sends waiting per partition for their transaction; when full, further sends wait (back-pressure).
    #[arg(long = "d2c-queue-depth", env = "IOTHUB_D2C_QUEUE_DEPTH", default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub queue_depth: u32,

    /// How long a send waits for room in a full queue before it is refused with 503, in milliseconds (1–600000).
    #[arg(long = "d2c-enqueue-timeout-ms", env = "IOTHUB_D2C_ENQUEUE_TIMEOUT_MS", default_value_t = 5000,
        value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub enqueue_timeout_ms: u64,

    /// Seconds between runs of the maintenance task (time partitions created ahead, expired ones dropped).
    #[arg(long = "d2c-maintenance-secs", env = "IOTHUB_D2C_MAINTENANCE_SECS", default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub maintenance_secs: u64,
}

/// What a D2C operation can refuse, or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A property or message id the device sent is not acceptable; the text says which.
    #[error("{0}")]
    InvalidMessage(String),
    #[error("Message size exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("The batch exceeds the limit of {limit} bytes")]
    BatchTooLarge { limit: usize },
    #[error("Telemetry ingestion is behind; retry later")]
    IngestBehind,
    #[error("The hub is shutting down")]
    ShuttingDown,
    #[error("No partition {partition}: the hub has {count} partitions")]
    NoSuchPartition { partition: u32, count: u32 },
    #[error("No consumer group {0}")]
    GroupNotFound(consumer_groups::ConsumerGroupName),
    #[error("The hub has {count} consumer groups, the most it allows")]
    TooManyGroups { count: i64 },
    #[error("$Default always exists")]
    DefaultGroupIsPermanent,
    #[error("Sequence number {seq} is not an event of partition {partition} (next is {next})")]
    NotCommitted {
        seq: i64,
        partition: PartitionId,
        next: i64,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The group commit that held a send failed; every send in it shares the one error.
    #[error("{0}")]
    Commit(Arc<sqlx::Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The running stream machinery of one hub process.
pub struct D2c {
    /// The partition count in force (the database's).
    pub partitions: u32,
    pub retention_days: u32,
    pub max_consumer_groups: u32,
    pub ingest: ingest::Ingest,
}

impl D2c {
    /// Reads (or, on a new database, fixes) the partition count, prepares time partitions, and starts the
    /// partition writers and the maintenance task in `tasks`; everything stops when `shutdown` turns true
    /// (`launch` turns it only after the listeners have drained, so a send in flight still commits).
    pub async fn start(
        db: &PgPool,
        config: &Settings,
        shutdown: watch::Receiver<bool>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<D2c> {
        let partitions = store::init_partitions(db, config.partitions).await?;
        if partitions != config.partitions {
            tracing::warn!(
                configured = config.partitions,
                in_database = partitions,
                "IOTHUB_PARTITIONS differs from the partition count fixed in the database; using the database's"
            );
        }
        store::maintain(db, config.retention_days).await?;
        tasks.spawn(maintenance(db.clone(), config.clone(), shutdown.clone()));
        let writers = crate::postgres::writer_pool(db, partitions.min(32)).await?;
        let ingest = ingest::Ingest::start(writers, partitions, config, shutdown, tasks);
        Ok(D2c {
            partitions,
            retention_days: config.retention_days,
            max_consumer_groups: config.max_consumer_groups,
            ingest,
        })
    }

    /// Every partition, in order.
    pub fn partition_ids(&self) -> impl Iterator<Item = PartitionId> {
        (0..self.partitions).map(PartitionId::new)
    }

    /// The partition a device's messages go to.
    pub fn partition_of(&self, device_id: &str) -> PartitionId {
        PartitionId::new(partition_for(device_id, self.partitions))
    }

    /// A partition id as a client names it: [`Error::NoSuchPartition`] when this hub has no such partition.
    pub fn partition(&self, partition: u32) -> Result<PartitionId> {
        if partition < self.partitions {
            Ok(PartitionId::new(partition))
        } else {
            Err(Error::NoSuchPartition {
                partition,
                count: self.partitions,
            })
        }
    }
}

/// Creates time partitions ahead and drops expired ones, every `maintenance_secs`, until `shutdown`.
async fn maintenance(
    db: PgPool,
    config: Settings,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let period = Duration::from_secs(config.maintenance_secs);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(period) => {}
        }
        match store::maintain(&db, config.retention_days).await {
            Ok(dropped) if !dropped.is_empty() => {
                tracing::info!(?dropped, "dropped expired event partitions")
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, "event stream maintenance failed; retrying later")
            }
        }
    }
}
