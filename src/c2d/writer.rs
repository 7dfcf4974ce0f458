//! Group commit for C2D writes. One writer task per hub process takes every enqueue waiting in its queue into one
//! transaction ([`store::group`]: one commit, one `NOTIFY`). A sender is answered only after the transaction that
//! holds its message has committed, so `201` still means durable; each message is decided (queue depth, expiry,
//! device gone) exactly as if it were enqueued alone. Settlements (complete, reject, abandon:
//! [`store::settle_group`]) have writers of their own ([`SETTLEMENT_WRITERS`]), each on a connection of its own, so
//! neither kind waits behind the other's locks; a device is answered once its settlement has committed.
//!
//! One enqueue writer, not several: a group holds its devices' rows until it commits, so the groups of several
//! writers that share devices queue behind each other; measured with four or eight writers, the slowest enqueues
//! took about three times as long as one at a time, for no more throughput. One writer's groups grow with the load
//! instead. Within a group the rows are locked in device-id order, as in every hub process's groups, so groups of
//! two processes wait for each other at most, never in a cycle. Memory stays bounded: each queue is a bounded
//! channel, and a sender (or settling device) that finds it full waits for room, at most [`QUEUE_WAIT`], then gets a
//! 503.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinSet;

use super::model::{Enqueued, NewMessage, Settlement};
use super::store;
use super::{Error, Result, Settings};
use crate::feedback::Settings as FeedbackSettings;
use crate::postgres::{GroupFailure, OwnConnection};
use crate::registry::DeviceId;
use crate::writer_queue::{self, Refused};

/// Enqueues (or settlements) one transaction takes at most. The `NOTIFY` names each device once, and 32 device ids
/// of at most 128 bytes stay far below PostgreSQL's 8000-byte payload limit.
const GROUP_MAX: usize = 32;
const _: () = assert!(GROUP_MAX * (128 + 1) < 8000);
/// Settlement writers per hub process, sharing one queue. A settlement group locks only the messages it settles,
/// never a device's row, so these writers do not queue behind each other as enqueue writers would; while one runs
/// its group, the other takes what arrives meanwhile instead of letting it wait for that group's commit.
pub const SETTLEMENT_WRITERS: usize = 2;
/// Enqueues (or settlements) waiting before senders wait for room.
const QUEUE_DEPTH: usize = 1024;
/// How long a sender waits for room in a full queue before it is told to retry.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// A request waiting for a writer (`W`, what to write) and where its answer goes.
struct Job<W, T> {
    work: W,
    done: oneshot::Sender<Result<T>>,
}

type EnqueueJob = Job<(DeviceId, NewMessage), Enqueued>;
type SettleJob = Job<Settlement, ()>;

/// The writers' queues.
pub struct Writer {
    queue: mpsc::Sender<EnqueueJob>,
    settlements: mpsc::Sender<SettleJob>,
}

impl Writer {
    /// Starts the writers in `tasks`, each on a connection of its own to `db`'s database; they take work until
    /// `drained` turns true (after the listeners have stopped), then finish what is queued and stop.
    pub async fn start(
        db: &PgPool,
        settings: &Settings,
        feedback: &FeedbackSettings,
        drained: watch::Receiver<bool>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<Writer> {
        let (queue, mut rx) = mpsc::channel(QUEUE_DEPTH);
        let (mut connection, mut until) = (OwnConnection::new(db), drained.clone());
        let enqueue_settings = settings.clone();
        tasks.spawn(async move {
            while let Some(jobs) = writer_queue::next_group(&mut rx, &mut until, GROUP_MAX).await {
                commit(&mut connection, &enqueue_settings, jobs).await;
            }
            Ok(())
        });
        let (settlements, rx) = mpsc::channel(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new((rx, drained)));
        for _ in 0..SETTLEMENT_WRITERS {
            let (mut connection, rx) = (OwnConnection::new(db), rx.clone());
            let (settings, feedback) = (settings.clone(), feedback.clone());
            tasks.spawn(async move {
                loop {
                    // One writer at a time waits for the queue; the others run their groups meanwhile.
                    let jobs = {
                        let (rx, until) = &mut *rx.lock().await;
                        writer_queue::next_group(rx, until, GROUP_MAX).await
                    };
                    let Some(jobs) = jobs else { return Ok(()) };
                    settle(&mut connection, &settings, &feedback, jobs).await;
                }
            });
        }
        Ok(Writer { queue, settlements })
    }

    /// Enqueues waiting for the writer, not yet in a transaction. Tests read it to know enqueues have arrived
    /// before they let the writer go on.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// Settlements waiting for their writer. Tests read it as [`Writer::queued`].
    pub fn settlements_queued(&self) -> usize {
        self.settlements.max_capacity() - self.settlements.capacity()
    }

    /// Enqueues `message` for `device_id`; answers once the transaction that holds it has committed.
    pub async fn enqueue(&self, device_id: DeviceId, message: NewMessage) -> Result<Enqueued> {
        let job = |done| Job {
            work: (device_id, message),
            done,
        };
        answered(writer_queue::hand_off(&self.queue, QUEUE_WAIT, job).await)
    }

    /// Settles a message as `settlement` says; answers once the transaction that holds it has committed.
    pub async fn settle(&self, settlement: Settlement) -> Result<()> {
        let job = |done| Job {
            work: settlement,
            done,
        };
        answered(writer_queue::hand_off(&self.settlements, QUEUE_WAIT, job).await)
    }
}

/// A writer's answer, or why there is none.
fn answered<T>(handed: Result<Result<T>, Refused>) -> Result<T> {
    match handed {
        Ok(answer) => answer,
        Err(Refused::Full) => Err(Error::Busy),
        Err(Refused::Closed) => Err(Error::ShuttingDown),
    }
}

/// Enqueues `jobs` in one transaction and answers each ([`answer`]).
async fn commit(connection: &mut OwnConnection, settings: &Settings, mut jobs: Vec<EnqueueJob>) {
    // Stable: one device's messages keep the order they arrived in.
    jobs.sort_by(|a, b| a.work.0.as_str().cmp(b.work.0.as_str()));
    let messages: Vec<(&DeviceId, &NewMessage)> =
        jobs.iter().map(|j| (&j.work.0, &j.work.1)).collect();
    let result = group(connection, settings, &messages).await;
    metrics::counter!("iothub_c2d_enqueue_transactions_total").increment(1);
    metrics::counter!("iothub_c2d_enqueues_total").increment(jobs.len() as u64);
    for job in answer(jobs, result) {
        let (device_id, message) = &job.work;
        let alone = group(connection, settings, &[(device_id, message)]).await;
        job.answer_alone(alone);
    }
}

/// Answers the jobs of one group: each its own answer. When the group failed before its commit (a deadlock with
/// another transaction, a statement only one request makes fail), nothing of it is stored: the jobs come back, to
/// be written alone so that only the one at fault fails. When the commit itself failed, its outcome is unknown and
/// every caller is told so.
fn answer<W, T>(
    jobs: Vec<Job<W, T>>,
    result: Result<Vec<Result<T>>, GroupFailure>,
) -> Vec<Job<W, T>> {
    match result {
        Ok(answers) => {
            for (job, answer) in jobs.into_iter().zip(answers) {
                let _ = job.done.send(answer);
            }
        }
        Err(GroupFailure::NotCommitted(error)) if jobs.len() > 1 => {
            tracing::warn!(%error, requests = jobs.len(), "a group of C2D writes failed; writing each alone");
            return jobs;
        }
        Err(GroupFailure::NotCommitted(error) | GroupFailure::Commit(error)) => {
            let error = Arc::new(error);
            for job in jobs {
                let _ = job.done.send(Err(Error::Commit(error.clone())));
            }
        }
    }
    Vec::new()
}

impl<W, T> Job<W, T> {
    /// Answers a job that was written alone after its group failed.
    fn answer_alone(self, alone: Result<Vec<Result<T>>, GroupFailure>) {
        let answer = match alone {
            Ok(mut answers) => answers.pop().expect("one answer per request"),
            Err(GroupFailure::NotCommitted(error)) => Err(Error::Database(error)),
            Err(GroupFailure::Commit(error)) => Err(Error::Commit(Arc::new(error))),
        };
        let _ = self.done.send(answer);
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
    if let Err(failure) = &result {
        connection.recover(failure).await;
    }
    result
}

/// Settles `jobs` in one transaction and answers each ([`answer`]).
async fn settle(
    connection: &mut OwnConnection,
    settings: &Settings,
    feedback: &FeedbackSettings,
    mut jobs: Vec<SettleJob>,
) {
    // The order in which every hub process locks a group's rows.
    jobs.sort_by(|a, b| {
        let (a, b) = (&a.work, &b.work);
        (a.device_id.as_str(), a.lock_token.0).cmp(&(b.device_id.as_str(), b.lock_token.0))
    });
    let settlements: Vec<&Settlement> = jobs.iter().map(|j| &j.work).collect();
    let result = settle_group(connection, settings, feedback, &settlements).await;
    metrics::counter!("iothub_c2d_settlement_transactions_total").increment(1);
    metrics::counter!("iothub_c2d_settlements_total").increment(jobs.len() as u64);
    for job in answer(jobs, result) {
        let alone = settle_group(connection, settings, feedback, &[&job.work]).await;
        job.answer_alone(alone);
    }
}

/// [`store::settle_group`] on the writer's connection, left ready for the next as in [`group`].
async fn settle_group(
    connection: &mut OwnConnection,
    settings: &Settings,
    feedback: &FeedbackSettings,
    settlements: &[&Settlement],
) -> Result<Vec<Result<()>>, GroupFailure> {
    let open = connection.get().await.map_err(GroupFailure::NotCommitted)?;
    let result = store::settle_group(open, settings, feedback, settlements).await;
    if let Err(failure) = &result {
        connection.recover(failure).await;
    }
    result
}
