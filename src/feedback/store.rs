//! The feedback queue's SQL. Records are written by the C2D statements that end a message (see
//! [`record_outcomes`]); the service receives them in batches leased with `FOR UPDATE SKIP LOCKED`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::{FeedbackRecord, BATCH_SIZE};
use crate::c2d::C2dSettings;
use crate::http::error::{ApiError, ApiResult, ErrorCode};
use crate::http::wire::format_time;
use crate::notify::{self, channel};

/// An `INSERT` for a writable CTE: a feedback record for each row of `from` (ended C2D messages, all columns)
/// whose ack mode asks for its outcome, kept for `ttl_param` seconds. Its rows count the records written.
pub fn record_outcomes(from: &str, ttl_param: &str) -> String {
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

/// A leased batch.
pub struct Batch {
    pub lock_token: Uuid,
    /// Receives of this batch before this one.
    pub earlier_deliveries: i32,
    pub created_at: DateTime<Utc>,
    pub records: Vec<FeedbackRecord>,
}

#[derive(sqlx::FromRow)]
struct RecordRow {
    device_id: String,
    device_generation_id: String,
    original_message_id: String,
    status_code: String,
    description: String,
    created_at: DateTime<Utc>,
}

impl From<RecordRow> for FeedbackRecord {
    fn from(r: RecordRow) -> Self {
        FeedbackRecord {
            original_message_id: r.original_message_id,
            enqueued_time_utc: format_time(r.created_at),
            status_code: r.status_code,
            description: r.description,
            device_id: r.device_id,
            device_generation_id: r.device_generation_id,
        }
    }
}

const RECORD: &str =
    "device_id, device_generation_id, original_message_id, status_code, description, created_at";

fn lock_lost() -> ApiError {
    ApiError::new(
        ErrorCode::DeviceMessageLockLost,
        "The feedback lock token is unknown, expired, or the batch was already settled",
    )
}

/// What one feedback receive found.
pub enum Received {
    Batch(Batch),
    /// Nothing receivable; `retry_in`: until the earliest lease of a batch runs out, if any.
    Empty {
        retry_in: Option<std::time::Duration>,
    },
}

/// Leases the next batch under `lock_token`, in one transaction: first a batch whose lease ran out (discarded
/// instead when it was received the maximum number of times), else a new batch of the oldest unbatched records.
pub async fn receive(db: &PgPool, settings: &C2dSettings, lock_token: Uuid) -> ApiResult<Received> {
    let mut tx = db.begin().await?;
    for _ in 0..1000 {
        let stale: Option<(Uuid, i32)> = sqlx::query_as(
            "SELECT batch_id, delivery_count FROM feedback_batches WHERE locked_until <= now()
             ORDER BY locked_until LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((batch_id, count)) = stale else {
            break;
        };
        if count < settings.feedback_max_delivery_count as i32 {
            let (delivery_count, created_at): (i32, DateTime<Utc>) = sqlx::query_as(
                "UPDATE feedback_batches SET lock_token = $2, locked_until = now() + $3::int * interval '1 second',
                     delivery_count = delivery_count + 1
                 WHERE batch_id = $1 RETURNING delivery_count, created_at",
            )
            .bind(batch_id)
            .bind(lock_token)
            .bind(settings.feedback_lock_secs as i32)
            .fetch_one(&mut *tx)
            .await?;
            let rows: Vec<RecordRow> = sqlx::query_as(&format!(
                "SELECT {RECORD} FROM feedback_records WHERE batch_id = $1 AND expires_at > now()
                 ORDER BY created_at, device_id, seq"
            ))
            .bind(batch_id)
            .fetch_all(&mut *tx)
            .await?;
            if !rows.is_empty() {
                tx.commit().await?;
                return Ok(Received::Batch(Batch {
                    lock_token,
                    earlier_deliveries: delivery_count - 1,
                    created_at,
                    records: rows.into_iter().map(FeedbackRecord::from).collect(),
                }));
            }
        }
        // Received too often, or every record in it expired: its records are discarded with it.
        sqlx::query("DELETE FROM feedback_batches WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&mut *tx)
            .await?;
    }

    let batch_id = Uuid::new_v4();
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO feedback_batches (batch_id, lock_token, locked_until, delivery_count, created_at)
         VALUES ($1, $2, now() + $3::int * interval '1 second', 1, now())
         RETURNING created_at",
    )
    .bind(batch_id)
    .bind(lock_token)
    .bind(settings.feedback_lock_secs as i32)
    .fetch_one(&mut *tx)
    .await?;
    let mut rows: Vec<(RecordRow, i64)> = sqlx::query_as::<_, RecordRowSeq>(
        "WITH picked AS (
             SELECT device_id, device_generation_id, seq FROM feedback_records
             WHERE batch_id IS NULL AND expires_at > now()
             ORDER BY created_at LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE feedback_records f SET batch_id = $1 FROM picked p
         WHERE f.device_id = p.device_id AND f.device_generation_id = p.device_generation_id AND f.seq = p.seq
         RETURNING f.device_id, f.device_generation_id, f.original_message_id, f.status_code, f.description,
             f.created_at, f.seq",
    )
    .bind(batch_id)
    .bind(BATCH_SIZE)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| (r.record, r.seq))
    .collect();
    if rows.is_empty() {
        let retry_in: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM min(locked_until) - now())::float8 FROM feedback_batches",
        )
        .fetch_one(&mut *tx)
        .await?;
        tx.rollback().await?;
        return Ok(Received::Empty {
            retry_in: retry_in.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
        });
    }
    tx.commit().await?;
    rows.sort_by(|a, b| {
        (a.0.created_at, &a.0.device_id, a.1).cmp(&(b.0.created_at, &b.0.device_id, b.1))
    });
    Ok(Received::Batch(Batch {
        lock_token,
        earlier_deliveries: 0,
        created_at,
        records: rows.into_iter().map(|(r, _)| r.into()).collect(),
    }))
}

#[derive(sqlx::FromRow)]
struct RecordRowSeq {
    #[sqlx(flatten)]
    record: RecordRow,
    seq: i64,
}

fn parse(token: &str) -> ApiResult<Uuid> {
    Uuid::parse_str(token.trim_matches('"')).map_err(|_| lock_lost())
}

/// Completes a batch: its records are gone for good. 412 when the lease is not current.
pub async fn complete(db: &PgPool, lock_token: &str) -> ApiResult<()> {
    let token = parse(lock_token)?;
    let done =
        sqlx::query("DELETE FROM feedback_batches WHERE lock_token = $1 AND locked_until > now()")
            .bind(token)
            .execute(db)
            .await?;
    if done.rows_affected() == 0 {
        return Err(lock_lost());
    }
    Ok(())
}

/// Abandons a batch: receivable again at once, or discarded when it was received the maximum number of times.
pub async fn abandon(db: &PgPool, settings: &C2dSettings, lock_token: &str) -> ApiResult<()> {
    let token = parse(lock_token)?;
    let mut tx = db.begin().await?;
    let found: Option<(Uuid, i32)> = sqlx::query_as(
        "UPDATE feedback_batches SET locked_until = now()
         WHERE lock_token = $1 AND locked_until > now()
         RETURNING batch_id, delivery_count",
    )
    .bind(token)
    .fetch_optional(&mut *tx)
    .await?;
    let (batch_id, count) = found.ok_or_else(lock_lost)?;
    if count >= settings.feedback_max_delivery_count as i32 {
        sqlx::query("DELETE FROM feedback_batches WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&mut *tx)
            .await?;
    } else {
        notify::notify(&mut tx, channel::FEEDBACK, "").await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Clean-up, in bounded batches: expired records, batches received too often whose lease ran out, and batches
/// left empty. Returns how many rows went.
pub async fn sweep(db: &PgPool, settings: &C2dSettings, batch: i64) -> ApiResult<u64> {
    let records = sqlx::query(
        "DELETE FROM feedback_records f USING (
             SELECT device_id, device_generation_id, seq FROM feedback_records
             WHERE expires_at <= now() ORDER BY expires_at LIMIT $1
         ) old
         WHERE f.device_id = old.device_id AND f.device_generation_id = old.device_generation_id
           AND f.seq = old.seq",
    )
    .bind(batch)
    .execute(db)
    .await?
    .rows_affected();
    let batches = sqlx::query(
        "DELETE FROM feedback_batches b USING (
             SELECT batch_id FROM feedback_batches
             WHERE locked_until <= now()
               AND (delivery_count >= $1
                    OR NOT EXISTS (SELECT 1 FROM feedback_records r WHERE r.batch_id = feedback_batches.batch_id))
             ORDER BY locked_until LIMIT $2
         ) old
         WHERE b.batch_id = old.batch_id AND b.locked_until <= now()",
    )
    .bind(settings.feedback_max_delivery_count as i32)
    .bind(batch)
    .execute(db)
    .await?
    .rows_affected();
    Ok(records + batches)
}
