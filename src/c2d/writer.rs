//! Group commit for C2D enqueues: one writer task per hub process takes every enqueue waiting in its queue into
//! one transaction ([`store::group`]: one commit, one `NOTIFY`). A sender is answered only after the transaction
//! that holds its message has committed, so `201` still means durable; each message is decided (queue depth,
//! expiry, device gone) exactly as if it were enqueued alone.
//!
//! One writer, not several: a group holds its devices' rows until it commits, so the groups of several writers
//! that share devices queue behind each other; measured with four or eight writers, the slowest enqueues took
//! about three times as long as one at a time, for no more throughput. One writer's groups grow with the load
//! instead. Within a group the rows are locked in device-id order, as in every hub process's groups, so groups of
//! two processes wait for each other at most, never in a cycle. Memory stays bounded: the queue is a bounded
//! channel, and a sender that finds it full waits for room, at most [`ENQUEUE_WAIT`], then gets a 503.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::model::{Enqueued, NewMessage};
use super::store::{self, GroupFailure};
use super::{Error, Result, Settings};
use crate::postgres::OwnConnection;
use crate::registry::DeviceId;
use crate::writer_queue::{self, Refused};

/// Messages one transaction takes at most. The `NOTIFY` names each device once, and 32 device ids of at most 128
/// bytes stay far below PostgreSQL's 8000-byte payload limit.
const GROUP_MAX: usize = 32;
const _: () = assert!(GROUP_MAX * (128 + 1) < 8000);
/// Enqueues waiting before senders wait for room.
const QUEUE_DEPTH: usize = 1024;
/// How long a sender waits for room in a full queue before it is told to retry.
pub const ENQUEUE_WAIT: Duration = Duration::from_secs(5);

struct Job {
    device_id: DeviceId,
    message: NewMessage,
    done: oneshot::Sender<Result<Enqueued>>,
}

/// The writer's queue.
pub struct Writer {
    queue: mpsc::Sender<Job>,
}

impl Writer {
    /// Starts the writer in `tasks` on a connection of its own to `db`'s database; it takes enqueues until `drained`
    /// turns true (after the listeners have stopped), then finishes what is queued and stops.
    pub async fn start(
        db: &PgPool,
        settings: &Settings,
        mut drained: watch::Receiver<bool>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<Writer> {
        let mut connection = OwnConnection::new(db);
        let (queue, mut rx) = mpsc::channel(QUEUE_DEPTH);
        let settings = settings.clone();
        tasks.spawn(async move {
            while let Some(jobs) = next_group(&mut rx, &mut drained).await {
                commit(&mut connection, &settings, jobs).await;
            }
            Ok(())
        });
        Ok(Writer { queue })
    }

    /// Enqueues waiting for the writer, not yet in a transaction. Tests read it to know enqueues have arrived
    /// before they let the writer go on.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Enqueues `message` for `device_id`; answers once the transaction that holds it has committed.
    pub async fn enqueue(&self, device_id: DeviceId, message: NewMessage) -> Result<Enqueued> {
        let job = |done| Job {
            device_id,
            message,
            done,
        };
        match writer_queue::hand_off(&self.queue, ENQUEUE_WAIT, job).await {
            Ok(answer) => answer,
            Err(Refused::Full) => Err(Error::Busy),
            Err(Refused::Closed) => Err(Error::ShuttingDown),
        }
    }
}

/// Waits for an enqueue, and takes it with everything queued behind it (up to [`GROUP_MAX`]); `None` once the
/// listeners have drained and the queue is empty.
async fn next_group(
    rx: &mut mpsc::Receiver<Job>,
    drained: &mut watch::Receiver<bool>,
) -> Option<Vec<Job>> {
    let mut jobs = vec![writer_queue::next_job(rx, drained).await?];
    while jobs.len() < GROUP_MAX {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// Enqueues `jobs` in one transaction and answers each. When the group fails before its commit (a deadlock with
/// another transaction that locks several devices, a statement only one message makes fail), nothing of it is
/// stored and each message is enqueued alone; when the commit itself fails, its outcome is unknown and every sender
/// is told so.
async fn commit(connection: &mut OwnConnection, settings: &Settings, mut jobs: Vec<Job>) {
    // Stable: one device's messages keep the order they arrived in.
    jobs.sort_by(|a, b| a.device_id.as_str().cmp(b.device_id.as_str()));
    let messages: Vec<(&DeviceId, &NewMessage)> =
        jobs.iter().map(|j| (&j.device_id, &j.message)).collect();
    let result = group(connection, settings, &messages).await;
    metrics::counter!("iothub_c2d_enqueue_transactions_total").increment(1);
    metrics::counter!("iothub_c2d_enqueues_total").increment(jobs.len() as u64);
    match result {
        Ok(answers) => {
            for (job, answer) in jobs.into_iter().zip(answers) {
                let _ = job.done.send(answer);
            }
        }
        Err(GroupFailure::NotCommitted(error)) if jobs.len() > 1 => {
            tracing::warn!(%error, messages = jobs.len(), "a group of C2D enqueues failed; enqueuing each alone");
            for job in jobs {
                let alone = group(connection, settings, &[(&job.device_id, &job.message)]).await;
                let answer = match alone {
                    Ok(mut answers) => answers.pop().expect("one answer per message"),
                    Err(GroupFailure::NotCommitted(error)) => Err(Error::Database(error)),
                    Err(GroupFailure::Commit(error)) => Err(Error::Commit(Arc::new(error))),
                };
                let _ = job.done.send(answer);
            }
        }
        Err(GroupFailure::NotCommitted(error) | GroupFailure::Commit(error)) => {
            let error = Arc::new(error);
            for job in jobs {
                let _ = job.done.send(Err(Error::Commit(error.clone())));
            }
        }
    }
}

/// [`store::group`] on the writer's connection, which is left ready for the next: a transaction that failed before
/// its commit is rolled back, a connection whose commit failed is replaced.
async fn group(
    connection: &mut OwnConnection,
    settings: &Settings,
    messages: &[(&DeviceId, &NewMessage)],
) -> Result<Vec<Result<Enqueued>>, GroupFailure> {
    let open = connection.get().await.map_err(GroupFailure::NotCommitted)?;
    let result = store::group(open, settings, messages).await;
    match &result {
        Ok(_) => {}
        Err(GroupFailure::NotCommitted(_)) => connection.rollback().await,
        Err(GroupFailure::Commit(_)) => connection.discard(),
    }
    result
}
