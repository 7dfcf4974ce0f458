//! The bounded queue in front of a group-commit writer task (D2C's partition writers, C2D's writers): a
//! sender hands a job over, waiting a bounded time for room (back-pressure instead of an unbounded backlog), and
//! then waits for the writer's answer; the writer takes jobs until the listeners have drained, then finishes what
//! is queued and stops.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

/// Why a job got no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue stayed full for the whole wait: the writer is behind.
    Full,
    /// The writer has stopped (the hub is shutting down).
    Closed,
}

/// Hands the job `make` builds around its answer's sender to `queue`, waiting at most `wait` for room; then waits
/// for the answer.
pub async fn hand_off<J, T>(
    queue: &mpsc::Sender<J>,
    wait: Duration,
    make: impl FnOnce(oneshot::Sender<T>) -> J,
) -> Result<T, Refused> {
    let (done, answer) = oneshot::channel();
    queue
        .send_timeout(make(done), wait)
        .await
        .map_err(|error| match error {
            mpsc::error::SendTimeoutError::Timeout(_) => Refused::Full,
            mpsc::error::SendTimeoutError::Closed(_) => Refused::Closed,
        })?;
    answer.await.map_err(|_| Refused::Closed)
}

/// The writer's next job; `None` once `drained` has turned true and every job queued before it has been taken.
pub async fn next_job<J>(
    rx: &mut mpsc::Receiver<J>,
    drained: &mut watch::Receiver<bool>,
) -> Option<J> {
    // Biased, the drain first: with both ready, an unbiased select may take a queued job and leave the queue open to
    // new ones; this way it closes as soon as the drain has begun, and only what was queued before is finished.
    let stopping = tokio::select! {
        biased;
        _ = drained.wait_for(|d| *d) => true,
        job = rx.recv() => return job,
    };
    if stopping {
        // No new jobs can come: finish what is queued.
        rx.close();
    }
    rx.recv().await
}

/// The writer's next group: a job, waited for as [`next_job`], with every job queued behind it, `max` at most.
pub async fn next_group<J>(
    rx: &mut mpsc::Receiver<J>,
    drained: &mut watch::Receiver<bool>,
    max: usize,
) -> Option<Vec<J>> {
    let mut jobs = vec![next_job(rx, drained).await?];
    while jobs.len() < max {
        match rx.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_after_the_wait_and_a_stopped_writer_is_closed() {
        let (queue, mut rx) = mpsc::channel::<oneshot::Sender<u8>>(1);
        let (blocker, _answer) = oneshot::channel();
        queue.send(blocker).await.unwrap();
        let full = hand_off(&queue, Duration::from_millis(20), |done| done).await;
        assert_eq!(full, Err(Refused::Full));
        // The writer takes the blocker and drops the next job unanswered.
        drop(rx.recv().await);
        let writer = tokio::spawn(async move { drop(rx.recv().await) });
        let closed = hand_off(&queue, Duration::from_secs(5), |done| done).await;
        assert_eq!(closed, Err(Refused::Closed));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn after_the_drain_the_writer_finishes_what_is_queued_then_stops() {
        let (queue, mut rx) = mpsc::channel(4);
        let (drained_tx, mut drained) = watch::channel(false);
        queue.send(1).await.unwrap();
        queue.send(2).await.unwrap();
        drained_tx.send(true).unwrap();
        assert_eq!(next_job(&mut rx, &mut drained).await, Some(1));
        assert_eq!(next_job(&mut rx, &mut drained).await, Some(2));
        assert!(queue.send(3).await.is_err(), "closed to new jobs");
        assert_eq!(next_job(&mut rx, &mut drained).await, None);
    }
}
