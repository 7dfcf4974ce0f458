//! Group commit for C2D enqueues: a few writer tasks, each draining the enqueues waiting for it into one
//! transaction ([`store::group`]: one commit, one `NOTIFY`). A sender is answered only after the transaction that
//! holds its message has committed, so `201` still means durable; each message is decided (queue depth, expiry,
//! device gone) exactly as if it were enqueued alone.
//!
//! A device's enqueues always go to the same writer, so two writers never wait for the same device's row, and
//! within a group the rows are locked in device-id order, as in every group of every hub process. Memory stays
//! bounded: each writer's queue is a bounded channel, and a sender that finds it full waits for room, at most
//! [`ENQUEUE_WAIT`], then gets a 503.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::model::{Enqueued, NewMessage};
use super::store::{self, GroupFailure};
use super::{Error, Result, Settings};
use crate::registry::DeviceId;

/// Writer tasks (and their connections).
pub const WRITERS: usize = 4;
/// Messages one transaction takes at most. The `NOTIFY` names each device once, and 32 device ids of at most 128
/// bytes stay far below PostgreSQL's 8000-byte payload limit.
const GROUP_MAX: usize = 32;
const _: () = assert!(GROUP_MAX * (128 + 1) < 8000);
/// Enqueues waiting per writer before senders wait for room.
const QUEUE_DEPTH: usize = 256;
/// How long a sender waits for room in a full queue before it is told to retry.
pub const ENQUEUE_WAIT: Duration = Duration::from_secs(5);

struct Job {
    device_id: DeviceId,
    message: NewMessage,
    done: oneshot::Sender<Result<Enqueued>>,
}

/// The handles to the writers.
pub struct Writers {
    queues: Vec<mpsc::Sender<Job>>,
}

impl Writers {
    /// Starts the writers in `tasks` on `db` (connections of their own); they take enqueues until `drained` turns
    /// true (after the listeners have stopped), then finish what is queued and stop.
    pub async fn start(
        db: &PgPool,
        settings: &Settings,
        drained: watch::Receiver<bool>,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<Writers> {
        let db = crate::postgres::writer_pool(db, WRITERS as u32).await?;
        let queues = (0..WRITERS)
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                let writer = writer(db.clone(), settings.clone(), rx, drained.clone());
                tasks.spawn(async move {
                    writer.await;
                    Ok(())
                });
                tx
            })
            .collect();
        Ok(Writers { queues })
    }

    /// Enqueues waiting for the writer that takes `device_id`'s, not yet in a transaction. Tests read it to know
    /// enqueues have arrived before they let the writer go on.
    pub fn queued(&self, device_id: &DeviceId) -> usize {
        let queue = &self.queues[writer_of(device_id)];
        queue.max_capacity() - queue.capacity()
    }

    /// Enqueues `message` for `device_id`; answers once the transaction that holds it has committed.
    pub async fn enqueue(&self, device_id: DeviceId, message: NewMessage) -> Result<Enqueued> {
        let queue = &self.queues[writer_of(&device_id)];
        let (done, answer) = oneshot::channel();
        let job = Job {
            device_id,
            message,
            done,
        };
        match queue.send_timeout(job, ENQUEUE_WAIT).await {
            Ok(()) => {}
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => return Err(Error::Busy),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(Error::ShuttingDown),
        }
        answer.await.unwrap_or(Err(Error::ShuttingDown))
    }
}

/// The writer that takes a device's enqueues: the same one every time.
pub fn writer_of(device_id: &DeviceId) -> usize {
    let mut hasher = std::hash::DefaultHasher::new();
    device_id.as_str().hash(&mut hasher);
    (hasher.finish() % WRITERS as u64) as usize
}

async fn writer(
    db: PgPool,
    settings: Settings,
    mut rx: mpsc::Receiver<Job>,
    mut drained: watch::Receiver<bool>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            // Closed: finish what is already queued, then stop.
            match rx.recv().await {
                Some(job) => job,
                None => return,
            }
        } else {
            tokio::select! {
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
                _ = drained.wait_for(|d| *d) => {
                    stopping = true;
                    rx.close();
                    continue;
                }
            }
        };
        // Everything that queued up while the previous transaction ran goes into this one.
        let mut jobs = vec![first];
        while jobs.len() < GROUP_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        commit(&db, &settings, jobs).await;
    }
}

/// Enqueues `jobs` in one transaction and answers each. When the group fails before its commit (a deadlock with
/// another transaction that locks several devices, a statement only one message makes fail), nothing of it is
/// stored and each message is enqueued alone; when the commit itself fails, its outcome is unknown and every sender
/// is told so.
async fn commit(db: &PgPool, settings: &Settings, mut jobs: Vec<Job>) {
    // Stable: one device's messages keep the order they arrived in.
    jobs.sort_by(|a, b| a.device_id.as_str().cmp(b.device_id.as_str()));
    let messages: Vec<(&DeviceId, &NewMessage)> =
        jobs.iter().map(|j| (&j.device_id, &j.message)).collect();
    let result = store::group(db, settings, &messages).await;
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
                let answer = store::enqueue(db, settings, &job.device_id, &job.message).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_always_has_the_same_writer_and_devices_spread() {
        let ids: Vec<DeviceId> = (0..400).map(|i| format!("d{i}").parse().unwrap()).collect();
        let mut per_writer = [0usize; WRITERS];
        for id in &ids {
            assert_eq!(writer_of(id), writer_of(&id.as_str().parse().unwrap()));
            per_writer[writer_of(id)] += 1;
        }
        assert!(per_writer.iter().all(|&n| n > 50), "{per_writer:?}");
    }
}
