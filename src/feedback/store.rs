//! The feedback queue's SQL. Records are written by the C2D statements that end a message (in the C2D store, which
//! owns the message states they report); the service receives them in batches leased with
//! `FOR UPDATE SKIP LOCKED`.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use super::{Error, Record, Result, Settings, BATCH_SIZE};
use crate::lock_token::LockToken;
use crate::notify::{self, channel};

/// A leased batch.
pub struct Batch {
    pub lock_token: LockToken,
    /// Receives of this batch before this one.
    pub earlier_deliveries: i32,
    pub created_at: DateTime<Utc>,
    pub records: Vec<Record>,
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

impl From<RecordRow> for Record {
    fn from(r: RecordRow) -> Self {
        Record {
            original_message_id: r.original_message_id,
            created_at: r.created_at,
            status_code: r.status_code,
            description: r.description,
            device_id: r.device_id,
            device_generation_id: r.device_generation_id,
        }
    }
}

const RECORD: &str =
    "device_id, device_generation_id, original_message_id, status_code, description, created_at";

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
pub async fn receive(db: &PgPool, settings: &Settings, lock_token: LockToken) -> Result<Received> {
    let mut tx = db.begin().await?;
    if let Some(batch) = release_stale(&mut tx, settings, lock_token).await? {
        tx.commit().await?;
        return Ok(Received::Batch(batch));
    }
    match new_batch(&mut tx, settings, lock_token).await? {
        Some(batch) => {
            tx.commit().await?;
            Ok(Received::Batch(batch))
        }
        None => {
            let retry_in: Option<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM min(locked_until) - now())::float8 FROM feedback_batches",
            )
            .fetch_one(&mut *tx)
            .await?;
            tx.rollback().await?;
            Ok(Received::Empty {
                retry_in: retry_in.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))),
            })
        }
    }
}

/// Leases again, under `lock_token`, the oldest batch whose lease ran out and that still holds records; batches
/// received the maximum number of times, or left with expired records only, are discarded on the way.
async fn release_stale(
    tx: &mut Transaction<'_, Postgres>,
    settings: &Settings,
    lock_token: LockToken,
) -> Result<Option<Batch>> {
    for _ in 0..1000 {
        let stale: Option<(Uuid, i32)> = sqlx::query_as(
            "SELECT batch_id, delivery_count FROM feedback_batches WHERE locked_until <= now()
             ORDER BY locked_until LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut **tx)
        .await?;
        let Some((batch_id, count)) = stale else {
            return Ok(None);
        };
        if count < settings.max_delivery_count as i32 {
            let (delivery_count, created_at): (i32, DateTime<Utc>) = sqlx::query_as(
                "UPDATE feedback_batches SET lock_token = $2, locked_until = now() + $3::int * interval '1 second',
                     delivery_count = delivery_count + 1
                 WHERE batch_id = $1 RETURNING delivery_count, created_at",
            )
            .bind(batch_id)
            .bind(lock_token.0)
            .bind(settings.lock_secs as i32)
            .fetch_one(&mut **tx)
            .await?;
            let rows: Vec<RecordRow> = sqlx::query_as(&format!(
                "SELECT {RECORD} FROM feedback_records WHERE batch_id = $1 AND expires_at > now()
                 ORDER BY created_at, device_id, seq"
            ))
            .bind(batch_id)
            .fetch_all(&mut **tx)
            .await?;
            if !rows.is_empty() {
                return Ok(Some(Batch {
                    lock_token,
                    earlier_deliveries: delivery_count - 1,
                    created_at,
                    records: rows.into_iter().map(Record::from).collect(),
                }));
            }
        }
        // Received too often, or every record in it expired: its records are discarded with it.
        sqlx::query("DELETE FROM feedback_batches WHERE batch_id = $1")
            .bind(batch_id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(None)
}

/// A new batch, leased under `lock_token`, of the oldest records in no batch; `None` when there are none.
async fn new_batch(
    tx: &mut Transaction<'_, Postgres>,
    settings: &Settings,
    lock_token: LockToken,
) -> Result<Option<Batch>> {
    let batch_id = Uuid::new_v4();
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO feedback_batches (batch_id, lock_token, locked_until, delivery_count, created_at)
         VALUES ($1, $2, now() + $3::int * interval '1 second', 1, now())
         RETURNING created_at",
    )
    .bind(batch_id)
    .bind(lock_token.0)
    .bind(settings.lock_secs as i32)
    .fetch_one(&mut **tx)
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
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|r| (r.record, r.seq))
    .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    rows.sort_by(|a, b| {
        (a.0.created_at, &a.0.device_id, a.1).cmp(&(b.0.created_at, &b.0.device_id, b.1))
    });
    Ok(Some(Batch {
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

/// Completes a batch: its records are gone for good. [`Error::LockLost`] when the lease is not current.
pub async fn complete(db: &PgPool, lock_token: LockToken) -> Result<()> {
    let done =
        sqlx::query("DELETE FROM feedback_batches WHERE lock_token = $1 AND locked_until > now()")
            .bind(lock_token.0)
            .execute(db)
            .await?;
    if done.rows_affected() == 0 {
        return Err(Error::LockLost);
    }
    Ok(())
}

/// Abandons a batch: receivable again at once, or discarded when it was received the maximum number of times.
pub async fn abandon(db: &PgPool, settings: &Settings, lock_token: LockToken) -> Result<()> {
    let mut tx = db.begin().await?;
    let found: Option<(Uuid, i32)> = sqlx::query_as(
        "UPDATE feedback_batches SET locked_until = now()
         WHERE lock_token = $1 AND locked_until > now()
         RETURNING batch_id, delivery_count",
    )
    .bind(lock_token.0)
    .fetch_optional(&mut *tx)
    .await?;
    let (batch_id, count) = found.ok_or(Error::LockLost)?;
    if count >= settings.max_delivery_count as i32 {
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
pub async fn sweep(db: &PgPool, settings: &Settings, batch: i64) -> Result<u64, sqlx::Error> {
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
    .bind(settings.max_delivery_count as i32)
    .bind(batch)
    .execute(db)
    .await?
    .rows_affected();
    Ok(records + batches)
}
