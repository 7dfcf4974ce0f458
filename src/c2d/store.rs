//! The C2D queue's SQL. Each function is one transaction; the outcome of a message and its feedback record are
//! written by the same statement, so one never exists without the other.
//!
//! Claims lock the candidate row with `FOR UPDATE SKIP LOCKED` and every statement names its device, so two
//! receivers of one device never hold the same message and devices never wait on each other.

use chrono::{DateTime, Utc};
use sqlx::{Executor, PgConnection, PgPool, Postgres, Transaction};

use super::model::{
    Enqueued, Expiry, MessageRow, MessageStatus, NewMessage, Outcome, SequenceNumber, Settle,
    Settlement, State,
};
use super::{Error, Result, Settings};
use crate::feedback::Settings as FeedbackSettings;
use crate::lock_token::LockToken;
use crate::notify::{self, channel};
use crate::postgres::GroupFailure;
use crate::registry::DeviceId;

/// Every column of a message but the device id (the caller knows it).
const ROW: &str = "seq, device_generation_id, message_id, correlation_id, user_id, ack, content_type,
    content_encoding, app_properties, body, enqueued_at, expiry_explicit, expires_at, state, lock_token,
    locked_until, delivery_count, outcome, outcome_at";

/// The condition on a message's `state` that it has not ended: [`State::LIVE`], the one definition of "live" in
/// SQL (and the partial indexes' predicate in the migrations).
pub const LIVE: &str = "state IN ('enqueued', 'invisible')";

/// An `INSERT` for a writable CTE: a feedback record for each row of `from` (ended C2D messages, all columns)
/// whose ack mode asks for its outcome, kept for `ttl_param` seconds. Its rows count the records written.
fn record_outcomes(from: &str, ttl_param: &str) -> String {
    format!(
        "INSERT INTO feedback_records (device_id, device_generation_id, seq, original_message_id, status_code,
             description, created_at, expires_at)
         SELECT device_id, device_generation_id, seq, message_id, outcome,
             CASE outcome WHEN 'Success' THEN 'Success'
                          WHEN 'Rejected' THEN 'Message rejected'
                          WHEN 'Expired' THEN 'Message expired'
                          WHEN 'DeliveryCountExceeded' THEN 'Message delivery count exceeded'
                          ELSE 'Message purged' END,
             outcome_at, outcome_at + {ttl_param}::int * interval '1 second'
         FROM {from}
         WHERE outcome IS NOT NULL
           AND (ack = 'full' OR (ack = 'positive' AND outcome = 'Success')
                OR (ack = 'negative' AND outcome <> 'Success'))
         ON CONFLICT DO NOTHING
         RETURNING 1"
    )
}

/// Locks the device's row (the per-device serialisation point): no enqueue for the device runs until `tx` ends.
async fn lock_device(tx: &mut Transaction<'_, Postgres>, device_id: &DeviceId) -> Result<()> {
    sqlx::query_scalar::<_, i32>("SELECT 1 FROM devices WHERE device_id = $1 FOR UPDATE")
        .bind(device_id.as_str())
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| Error::DeviceNotFound(device_id.clone()))?;
    Ok(())
}

/// Enqueues one or more messages in one transaction on `connection` (a writer's own): one statement per message
/// checks its queue depth and expiry against the database's clock under its device's row lock and assigns the next
/// sequence number, so each is decided as if enqueued alone, in the order given. One notification naming every
/// device that got a message (long polls, MQTT connections wait for it) commits with them, sent with the `COMMIT`
/// in one round trip: `BEGIN`, then k statements, then one more. The devices' rows are held to the commit, so
/// callers give them sorted by device id: two groups then never wait on each other in a cycle.
pub async fn group(
    connection: &mut PgConnection,
    settings: &Settings,
    messages: &[(&DeviceId, &NewMessage)],
) -> Result<Vec<Result<Enqueued>>, GroupFailure> {
    use GroupFailure::NotCommitted;
    connection.execute("BEGIN").await.map_err(NotCommitted)?;
    let mut outcomes = Vec::with_capacity(messages.len());
    let mut woken: Vec<&str> = Vec::new();
    for (device_id, message) in messages {
        let outcome = enqueue_in(connection, settings, device_id, message)
            .await
            .map_err(NotCommitted)?;
        if outcome.as_ref().is_some_and(|o| o.inserted > 0) && !woken.contains(&device_id.as_str())
        {
            woken.push(device_id.as_str());
        }
        outcomes.push(outcome);
    }
    notify::notify_and_commit(connection, channel::C2D, &woken)
        .await
        .map_err(GroupFailure::Commit)?;
    Ok(outcomes
        .into_iter()
        .zip(messages)
        .map(|(outcome, (device_id, message))| admitted(outcome, settings, device_id, message))
        .collect())
}

/// Runs [`ENQUEUE_SQL`] on `connection`, inside its transaction; `None` when the device is not registered.
async fn enqueue_in(
    connection: &mut PgConnection,
    settings: &Settings,
    device_id: &DeviceId,
    message: &NewMessage,
) -> Result<Option<EnqueueOutcome>, sqlx::Error> {
    let max_ttl = i64::from(settings.max_ttl_secs);
    // The statement checks the expiry against the database's clock; a relative one out of range is clamped to a
    // value just as far out of range, so the interval arithmetic cannot overflow.
    let (explicit, ttl_secs) = match message.expiry {
        Expiry::Default => (None, i64::from(settings.default_ttl_secs)),
        Expiry::Ttl(secs) => (None, secs.clamp(0, max_ttl + 1)),
        Expiry::At(at) => (Some(at), 0),
    };
    sqlx::query_as(ENQUEUE_SQL.as_str())
        .bind(device_id.as_str())
        .bind(&message.message_id)
        .bind(&message.correlation_id)
        .bind(&message.user_id)
        .bind(message.ack)
        .bind(&message.content_type)
        .bind(&message.content_encoding)
        .bind(sqlx::types::Json(&message.app_properties))
        .bind(&message.body)
        .bind(explicit)
        .bind(ttl_secs)
        .bind(i64::from(settings.max_queue_depth))
        .bind(max_ttl)
        .fetch_optional(connection)
        .await
}

/// What the statement decided for one message, as the sender learns it.
fn admitted(
    outcome: Option<EnqueueOutcome>,
    settings: &Settings,
    device_id: &DeviceId,
    message: &NewMessage,
) -> Result<Enqueued> {
    let r = outcome.ok_or_else(|| Error::DeviceNotFound(device_id.clone()))?;
    if r.inserted == 0 && r.live >= i64::from(settings.max_queue_depth) {
        return Err(Error::QueueFull {
            device: device_id.clone(),
            queued: r.live,
            max: settings.max_queue_depth,
        });
    }
    if r.inserted == 0 {
        return Err(Error::ExpiryOutOfRange {
            max_ttl_secs: settings.max_ttl_secs,
        });
    }
    Ok(Enqueued {
        message_id: message.message_id.clone(),
        seq: r.seq,
        enqueued_at: r.now,
        expires_at: r.expires_at,
    })
}

#[derive(sqlx::FromRow)]
struct EnqueueOutcome {
    seq: i64,
    live: i64,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    inserted: i64,
}

/// The statement of one enqueue in a [`group`]. The device's row is the per-device lock: it serialises the depth
/// count and the sequence counter. The message (`$2`–`$9`) expires at `$10`, or `$11` seconds from now; it is
/// inserted only when fewer than `$12` live messages are queued and its expiry lies within `$13` seconds from now.
static ENQUEUE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH device AS (
             SELECT generation_id, c2d_next_seq AS seq, now() AS now,
                 (SELECT count(*) FROM c2d_messages m
                   WHERE m.device_id = $1 AND m.{LIVE} AND m.expires_at > now()) AS live
             FROM devices WHERE device_id = $1 FOR UPDATE
         ), checked AS (
             SELECT *, coalesce($10::timestamptz, now + $11::bigint * interval '1 second') AS expires_at FROM device
         ), admitted AS (
             SELECT * FROM checked
             WHERE live < $12 AND expires_at > now AND expires_at <= now + $13::bigint * interval '1 second'
         ), inserted AS (
             INSERT INTO c2d_messages (device_id, seq, device_generation_id, message_id, correlation_id, user_id,
                 ack, content_type, content_encoding, app_properties, body, enqueued_at, expiry_explicit,
                 expires_at, state)
             SELECT $1, seq, generation_id, $2, $3, $4, $5, $6, $7, $8, $9, now, $10, expires_at, 'enqueued'
             FROM admitted
             RETURNING 1
         ), counted AS (
             UPDATE devices SET c2d_next_seq = admitted.seq + 1 FROM admitted WHERE devices.device_id = $1
         )
         SELECT seq, live, now, expires_at, (SELECT count(*) FROM inserted) AS inserted
         FROM checked"
    )
});

/// What one receive found.
pub enum Received {
    Message(Box<MessageRow>),
    /// Nothing deliverable; `retry_in` is how long until the earliest lock of this device runs out, if any.
    Empty {
        retry_in: Option<std::time::Duration>,
    },
}

/// Receives the device's next deliverable message with a new lock `lock_token`. When there is none and the caller
/// `will_wait`, says how long until the earliest lock of the device runs out.
///
/// Candidates are taken in sequence order. A candidate that expired, or whose lock ran out after its last allowed
/// delivery, is dead-lettered (with its feedback) in this same transaction instead of delivered, and the next one
/// is looked at.
pub async fn receive(
    db: &PgPool,
    settings: &Settings,
    feedback: &FeedbackSettings,
    device_id: &DeviceId,
    lock_token: LockToken,
    will_wait: bool,
) -> Result<Received> {
    let sql = claim_sql();
    // Each claim is one statement, so one transaction of its own: a dead-lettered candidate and its feedback
    // commit together, and a delivery needs no more round trips than the statement.
    let mut dead_lettered = 0;
    let mut found = Received::Empty { retry_in: None };
    // Bounded: each round ends one message for good, and a queue holds at most the configured depth (plus what
    // expired meanwhile); the bound only guards against surprises.
    for _ in 0..10_000 {
        let row = sqlx::query(&sql)
            .bind(device_id.as_str())
            .bind(lock_token.0)
            .bind(settings.max_delivery_count as i32)
            .bind(settings.lock_secs as i32)
            .bind(feedback.ttl_secs as i32)
            .bind(will_wait)
            .fetch_one(db)
            .await?;
        match claimed(&row)? {
            Claimed::DeadLettered => dead_lettered += 1,
            Claimed::Delivered(message) => {
                found = Received::Message(message);
                break;
            }
            Claimed::Nothing { retry_in } => {
                found = Received::Empty { retry_in };
                break;
            }
        }
    }
    // Rare, so the receivers are woken whether or not the message's ack mode asked for a record.
    wake_feedback(db, dead_lettered).await?;
    Ok(found)
}

/// What one claim statement did.
enum Claimed {
    Delivered(Box<MessageRow>),
    DeadLettered,
    /// No candidate; `retry_in` as in [`Received::Empty`] (asked only of a caller that will wait).
    Nothing {
        retry_in: Option<std::time::Duration>,
    },
}

/// Reads the claim's one row: a message's columns, or NULLs and the time until the device's earliest lock ends.
fn claimed(row: &sqlx::postgres::PgRow) -> Result<Claimed, sqlx::Error> {
    use sqlx::{FromRow, Row};
    if row.try_get::<Option<i64>, _>("seq")?.is_none() {
        let retry_in: Option<f64> = row.try_get("retry_in")?;
        return Ok(Claimed::Nothing {
            retry_in: retry_in.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
        });
    }
    let message = MessageRow::from_row(row)?;
    Ok(match message.state {
        State::DeadLettered => Claimed::DeadLettered,
        _ => Claimed::Delivered(Box::new(message)),
    })
}

/// The claim of [`receive`]: the device's first receivable message is delivered under lock `$2` for `$4` seconds,
/// or dead-lettered with its feedback (kept `$5` seconds) when it expired or was delivered `$3` times. Always one
/// row: the message's columns, or NULLs and, when `$6` (the caller will wait), the seconds until the device's
/// earliest lock runs out; so an empty long poll costs one round trip, not two.
fn claim_sql() -> String {
    format!(
        "WITH candidate AS (
             SELECT seq FROM c2d_messages
             WHERE device_id = $1 AND {LIVE}
               AND (state = 'enqueued' OR locked_until <= now())
             ORDER BY seq LIMIT 1
             FOR UPDATE SKIP LOCKED
         ), taken AS (
             UPDATE c2d_messages m SET
                 state = CASE WHEN m.expires_at <= now() OR m.delivery_count >= $3
                              THEN 'dead_lettered' ELSE 'invisible' END,
                 outcome = CASE WHEN m.expires_at <= now() THEN 'Expired'
                                WHEN m.delivery_count >= $3 THEN 'DeliveryCountExceeded' END,
                 outcome_at = CASE WHEN m.expires_at <= now() OR m.delivery_count >= $3 THEN now() END,
                 lock_token = CASE WHEN m.expires_at <= now() OR m.delivery_count >= $3 THEN NULL ELSE $2::uuid END,
                 locked_until = CASE WHEN m.expires_at <= now() OR m.delivery_count >= $3 THEN NULL
                                     ELSE now() + $4::int * interval '1 second' END,
                 delivery_count = CASE WHEN m.expires_at <= now() OR m.delivery_count >= $3
                                       THEN m.delivery_count ELSE m.delivery_count + 1 END
             FROM candidate c
             WHERE m.device_id = $1 AND m.seq = c.seq
             RETURNING m.*
         ), feedback AS ({feedback})
         SELECT {ROW},
             CASE WHEN taken.seq IS NULL AND $6 THEN
                 (SELECT extract(epoch FROM min(locked_until) - now())::float8 FROM c2d_messages
                  WHERE device_id = $1 AND state = 'invisible')
             END AS retry_in
         FROM (VALUES (true)) AS one LEFT JOIN taken ON true",
        feedback = record_outcomes("taken", "$5"),
    )
}

/// Wakes the service's feedback receivers after a statement that wrote feedback records has committed. Not in the
/// statement: a NOTIFY inside a query over a per-device table would run where no hub listens once the table is
/// distributed. A receiver that misses it (the hub died in between) finds the records when its long poll ends.
async fn wake_feedback(db: &PgPool, fed: i64) -> Result<()> {
    if fed > 0 {
        notify::after_commit(db, channel::FEEDBACK, "").await?;
    }
    Ok(())
}

/// Settles one or more messages, each decided as if alone: [`Error::LockLost`] for one whose lock is not current.
/// Each settlement is one statement that writes the outcome together with its feedback record. A group of one
/// completion or rejection is that statement alone, one round trip. Any other group runs in one transaction, which
/// commits with one notification in the same round trip: to the devices whose messages went back to their queue (a
/// waiting MQTT connection looks for nothing else), or else to the feedback receivers when records were written.
/// Callers sort a group by device and lock token, so the groups of two hub processes never wait on each other in a
/// cycle.
pub async fn settle_group(
    connection: &mut PgConnection,
    settings: &Settings,
    feedback: &FeedbackSettings,
    settlements: &[&Settlement],
) -> Result<Vec<Result<()>>, GroupFailure> {
    use GroupFailure::NotCommitted;
    let alone = matches!(settlements, [one] if one.action != Settle::Abandon);
    if !alone {
        connection.execute("BEGIN").await.map_err(NotCommitted)?;
    }
    let mut answers = Vec::with_capacity(settlements.len());
    let mut requeued: Vec<&str> = Vec::new();
    let mut fed = 0;
    for settlement in settlements {
        let (settled, back, records) = settle_in(connection, settings, feedback, settlement)
            .await
            .map_err(NotCommitted)?;
        let device = settlement.device_id.as_str();
        if back > 0 && !requeued.contains(&device) {
            requeued.push(device);
        }
        fed += records;
        answers.push(if settled > 0 {
            Ok(())
        } else {
            Err(Error::LockLost)
        });
    }
    if !alone {
        let (channel, keys) = if !requeued.is_empty() {
            (channel::C2D, requeued)
        } else {
            (channel::FEEDBACK, if fed > 0 { vec![""] } else { vec![] })
        };
        notify::notify_and_commit(connection, channel, &keys)
            .await
            .map_err(GroupFailure::Commit)?;
        if channel == channel::FEEDBACK {
            fed = 0; // woken with the commit
        }
    }
    // Feedback receivers not yet woken: their long polls look again by themselves, so a failed wake-up only delays
    // them, and the settlements stand.
    if fed > 0 {
        if let Err(error) = notify::after_commit(&mut *connection, channel::FEEDBACK, "").await {
            tracing::warn!(%error, "the feedback receivers were not woken after a settlement");
        }
    }
    Ok(answers)
}

/// Runs the statement of one settlement on `connection`: how many messages it settled (0 or 1), how many of them
/// went back to the queue, and how many feedback records it wrote.
async fn settle_in(
    connection: &mut PgConnection,
    settings: &Settings,
    feedback: &FeedbackSettings,
    settlement: &Settlement,
) -> Result<(i64, i64, i64), sqlx::Error> {
    let ttl = feedback.ttl_secs as i32;
    let (device_id, token) = (settlement.device_id.as_str(), settlement.lock_token.0);
    let ended = |state, outcome| {
        sqlx::query_as(&END_HELD_SQL)
            .bind(device_id)
            .bind(token)
            .bind(state)
            .bind(outcome)
            .bind(ttl)
    };
    match settlement.action {
        Settle::Complete => {
            ended(State::Completed, Outcome::Success)
                .fetch_one(connection)
                .await
        }
        Settle::Reject => {
            ended(State::DeadLettered, Outcome::Rejected)
                .fetch_one(connection)
                .await
        }
        Settle::Abandon => {
            sqlx::query_as(&ABANDON_SQL)
                .bind(device_id)
                .bind(token)
                .bind(settings.max_delivery_count as i32)
                .bind(ttl)
                .fetch_one(connection)
                .await
        }
    }
}

/// Ends the message of device `$1` held under lock `$2` with state `$3` and outcome `$4`, and writes its feedback,
/// kept `$5` seconds.
static END_HELD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    end_sql(
        "$3",
        "$4",
        "state = 'invisible' AND lock_token = $2 AND locked_until > now()",
        "$5",
    )
});

/// One statement that ends the device's (`$1`) live messages that `condition` selects, with `state` and `outcome`
/// (SQL expressions), and writes their feedback, kept `ttl_param` seconds: the outcome and its feedback record
/// commit together. It answers how many ended, none of them back in the queue, and how many feedback records it
/// wrote.
fn end_sql(state: &str, outcome: &str, condition: &str, ttl_param: &str) -> String {
    format!(
        "WITH ended AS (
             UPDATE c2d_messages SET state = {state}, outcome = {outcome}, outcome_at = now(),
                 lock_token = NULL, locked_until = NULL
             WHERE device_id = $1 AND {LIVE} AND {condition}
             RETURNING *
         ), feedback AS ({feedback})
         SELECT (SELECT count(*) FROM ended), 0::bigint, (SELECT count(*) FROM feedback)",
        feedback = record_outcomes("ended", ttl_param),
    )
}

/// Abandons the message of device `$1` held under lock `$2`: it is receivable again, or dead-lettered with its
/// feedback (kept `$4` seconds) when it has already been delivered `$3` times.
static ABANDON_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH abandoned AS (
             UPDATE c2d_messages SET
                 state = CASE WHEN delivery_count >= $3 THEN 'dead_lettered' ELSE 'enqueued' END,
                 outcome = CASE WHEN delivery_count >= $3 THEN 'DeliveryCountExceeded' END,
                 outcome_at = CASE WHEN delivery_count >= $3 THEN now() END,
                 lock_token = NULL, locked_until = NULL
             WHERE device_id = $1 AND {LIVE} AND state = 'invisible' AND lock_token = $2
               AND locked_until > now()
             RETURNING *
         ), feedback AS ({feedback})
         SELECT (SELECT count(*) FROM abandoned),
             (SELECT count(*) FROM abandoned WHERE state = 'enqueued'), (SELECT count(*) FROM feedback)",
        feedback = record_outcomes("abandoned", "$4"),
    )
});

/// Purges the device's queue: every live message ends with outcome `Purged` (feedback for `negative`/`full`).
/// Messages already expired are left to the expiry sweep, which reports them as `Expired`.
pub async fn purge(db: &PgPool, feedback: &FeedbackSettings, device_id: &DeviceId) -> Result<i64> {
    let mut tx = db.begin().await?;
    lock_device(&mut tx, device_id).await?;
    let sql = end_sql("'purged'", "'Purged'", "expires_at > now()", "$2");
    let (purged, _, fed): (i64, i64, i64) = sqlx::query_as(&sql)
        .bind(device_id.as_str())
        .bind(feedback.ttl_secs as i32)
        .fetch_one(&mut *tx)
        .await?;
    if fed > 0 {
        notify::notify(&mut tx, channel::FEEDBACK, "").await?;
    }
    tx.commit().await?;
    Ok(purged)
}

async fn device_exists(db: &PgPool, device_id: &DeviceId) -> Result<DateTime<Utc>> {
    sqlx::query_scalar("SELECT now() FROM devices WHERE device_id = $1")
        .bind(device_id.as_str())
        .fetch_optional(db)
        .await?
        .ok_or_else(|| Error::DeviceNotFound(device_id.clone()))
}

/// One message's status, live or ended (ended ones are kept for the feedback TTL).
pub async fn status(
    db: &PgPool,
    device_id: &DeviceId,
    SequenceNumber(seq): SequenceNumber,
) -> Result<MessageStatus> {
    let found: Option<MessageRowAt> = sqlx::query_as(&format!(
        "SELECT {ROW}, now() AS db_now FROM c2d_messages WHERE device_id = $1 AND seq = $2"
    ))
    .bind(device_id.as_str())
    .bind(seq)
    .fetch_optional(db)
    .await?;
    match found {
        Some(r) => Ok(MessageStatus::new(r.row, r.db_now)),
        None => {
            device_exists(db, device_id).await?;
            Err(Error::MessageNotFound {
                device: device_id.clone(),
                seq,
            })
        }
    }
}

#[derive(sqlx::FromRow)]
struct MessageRowAt {
    #[sqlx(flatten)]
    row: MessageRow,
    db_now: DateTime<Utc>,
}

/// A page of the device's live messages in sequence order, after `after`.
pub async fn list(
    db: &PgPool,
    device_id: &DeviceId,
    after: i64,
    limit: i64,
) -> Result<Vec<MessageStatus>> {
    let now = device_exists(db, device_id).await?;
    let rows: Vec<MessageRow> = sqlx::query_as(&format!(
        "SELECT {ROW} FROM c2d_messages WHERE device_id = $1 AND {LIVE} AND seq > $2 ORDER BY seq LIMIT $3"
    ))
    .bind(device_id.as_str())
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| MessageStatus::new(r, now))
        .collect())
}

/// Dead-letters, hub-wide, up to `batch` live messages whose time ran out: expired ones (`Expired`) and locked ones
/// whose lock ran out after their last allowed delivery (`DeliveryCountExceeded`), with their feedback, in one
/// statement. Returns how many ended. Safe with several hubs sweeping at once: the outer `UPDATE` re-checks each
/// row's state after waiting for its lock, so a row another hub (or a receive) ended meanwhile is skipped.
pub async fn dead_letter_due(
    db: &PgPool,
    settings: &Settings,
    feedback: &FeedbackSettings,
    batch: i64,
) -> Result<i64, sqlx::Error> {
    // SKIP LOCKED: a row a receive, a settlement or another hub's sweep holds is left for the next round, so the
    // sweep never waits on (or deadlocks with) them.
    let sql = format!(
        "WITH expired AS (
             SELECT device_id, seq FROM c2d_messages
             WHERE {LIVE} AND expires_at <= now()
             ORDER BY expires_at LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), exhausted AS (
             SELECT device_id, seq FROM c2d_messages
             WHERE state = 'invisible' AND locked_until <= now() AND delivery_count >= $1
             ORDER BY locked_until LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), due AS (
             SELECT device_id, seq FROM expired UNION SELECT device_id, seq FROM exhausted
         ), ended AS (
             UPDATE c2d_messages m SET
                 state = 'dead_lettered',
                 outcome = CASE WHEN m.expires_at <= now() THEN 'Expired' ELSE 'DeliveryCountExceeded' END,
                 outcome_at = now(), lock_token = NULL, locked_until = NULL
             FROM due
             WHERE m.device_id = due.device_id AND m.seq = due.seq
               AND m.{LIVE}
               AND (m.expires_at <= now()
                    OR (m.state = 'invisible' AND m.locked_until <= now() AND m.delivery_count >= $1))
             RETURNING m.*
         ), feedback AS ({feedback})
         SELECT (SELECT count(*) FROM ended), (SELECT count(*) FROM feedback)",
        feedback = record_outcomes("ended", "$3"),
    );
    let (ended, fed): (i64, i64) = sqlx::query_as(&sql)
        .bind(settings.max_delivery_count as i32)
        .bind(batch)
        .bind(feedback.ttl_secs as i32)
        .fetch_one(db)
        .await?;
    if fed > 0 {
        notify::after_commit(db, channel::FEEDBACK, "").await?;
    }
    Ok(ended)
}

/// Deletes up to `batch` ended messages whose outcome is older than the feedback TTL. Returns how many.
pub async fn delete_ended(
    db: &PgPool,
    feedback: &FeedbackSettings,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM c2d_messages m USING (
             SELECT device_id, seq FROM c2d_messages
             WHERE state IN ('completed', 'dead_lettered', 'purged')
               AND outcome_at <= now() - $1::int * interval '1 second'
             ORDER BY outcome_at LIMIT $2
         ) old
         WHERE m.device_id = old.device_id AND m.seq = old.seq",
    )
    .bind(feedback.ttl_secs as i32)
    .bind(batch)
    .execute(db)
    .await?;
    Ok(done.rows_affected())
}

/// Live messages of `device_id` (the registry shows the count as `cloudToDeviceMessageCount`).
pub async fn live_count(db: &PgPool, device_id: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM c2d_messages WHERE device_id = $1 AND {LIVE}"
    ))
    .bind(device_id)
    .fetch_one(db)
    .await
}

/// Live messages of each of `device_ids` that has any.
pub async fn live_counts(
    db: &PgPool,
    device_ids: &[String],
) -> Result<std::collections::HashMap<String, i64>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT device_id, count(*) FROM c2d_messages WHERE device_id = ANY($1) AND {LIVE}
         GROUP BY device_id"
    ))
    .bind(device_ids)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}
