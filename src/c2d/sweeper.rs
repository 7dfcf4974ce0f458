//! The expiry and clean-up task: dead-letters messages whose time ran out (with their feedback) within a sweep
//! interval, also for devices that never poll again, and deletes ended messages and feedback once their retention
//! passed. Every step is a bounded set-based statement, safe with any number of hubs sweeping one database.

use sqlx::PgPool;
use tokio::sync::watch;

use super::{store, Settings};
use crate::feedback::Settings as FeedbackSettings;

/// Rows one statement handles at most.
const BATCH: i64 = 500;
/// Statements of one kind per round at most, so one round stays short even with a large backlog.
const ROUNDS: usize = 20;

/// Runs until `shutdown` turns true.
pub async fn run(
    db: PgPool,
    settings: Settings,
    feedback: FeedbackSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(settings.sweep_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = sweep(&db, &settings, &feedback).await {
            tracing::warn!(%error, "C2D sweep failed; retrying at the next interval");
        }
    }
}

/// One round of every sweep.
pub async fn sweep(
    db: &PgPool,
    settings: &Settings,
    feedback: &FeedbackSettings,
) -> Result<(), sqlx::Error> {
    for _ in 0..ROUNDS {
        if store::dead_letter_due(db, settings, feedback, BATCH).await? < BATCH {
            break;
        }
    }
    for _ in 0..ROUNDS {
        if store::delete_ended(db, feedback, BATCH).await? < BATCH as u64 {
            break;
        }
    }
    for _ in 0..ROUNDS {
        if crate::feedback::store::sweep(db, feedback, BATCH).await? < BATCH as u64 {
            break;
        }
    }
    Ok(())
}
