//! The stream's SQL: partition counters, appends, reads and time partitions.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDateTime, Timelike, Utc};
use sqlx::{Executor, PgConnection, PgPool, Row};

use super::model::{AuthScope, NewEvent, Sender, StoredEvent};
use super::PartitionId;
use crate::notify;
use crate::postgres::{sqlstate, UNIQUE_VIOLATION};

/// Fixes the partition count on a new database (and creates the counter rows); returns the count in force.
pub async fn init_partitions(db: &PgPool, wanted: u32) -> Result<u32, sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query(
        "INSERT INTO d2c_settings (id, partition_count) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
    )
    .bind(wanted as i32)
    .execute(&mut *tx)
    .await?;
    let count: i32 = sqlx::query_scalar("SELECT partition_count FROM d2c_settings WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO d2c_partitions (partition_id) SELECT generate_series(0, $1 - 1)
         ON CONFLICT (partition_id) DO NOTHING",
    )
    .bind(count)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(count as u32)
}

/// SQLSTATE of an insert that found no time partition for its row.
pub const NO_PARTITION_FOR_ROW: &str = "23514";

/// Appends `events` (all of partition `partition`) in one transaction; returns the first sequence number.
///
/// No reader ever skips an event: sequence numbers come from the partition's counter row, updated in the same
/// transaction as the insert. The row lock that update takes is held until commit, so a second transaction on the
/// same partition (from this process or another) cannot take numbers until the first has committed or rolled
/// back. Commits on a partition therefore happen in sequence-number order, and a reader that has seen number n
/// can never later find a smaller one appear. A transaction that rolls back takes its counter update with it, so
/// numbers stay gap-free as well.
///
/// The transaction is `BEGIN`, the append, and the wake-up with the `COMMIT` in one simple query
/// ([`notify::notify_and_commit`]): three round trips. After a failure it is rolled back, so `connection` (a pooled
/// one) can go back to its pool.
pub async fn append(
    connection: &mut PgConnection,
    partition: PartitionId,
    events: &[&NewEvent],
) -> Result<i64, sqlx::Error> {
    connection.execute("BEGIN").await?;
    // The wake-up is a statement of its own in the same transaction (never part of the append, which may run on
    // another node once the stream is distributed): readers learn of the events exactly when they commit.
    let appended = match append_in(connection, partition, events).await {
        Ok(first) => {
            notify::notify_and_commit(connection, notify::channel::D2C, &[&partition.to_string()])
                .await
                .map(|()| first)
        }
        Err(error) => Err(error),
    };
    if appended.is_err() {
        crate::postgres::rollback(connection).await;
    }
    appended
}

/// The append's one statement, in the caller's transaction.
async fn append_in(
    connection: &mut PgConnection,
    partition: PartitionId,
    events: &[&NewEvent],
) -> Result<i64, sqlx::Error> {
    let n = events.len() as i64;
    let mut devices = Vec::with_capacity(events.len());
    let mut generations = Vec::with_capacity(events.len());
    let mut scopes = Vec::with_capacity(events.len());
    let mut systems = Vec::with_capacity(events.len());
    let mut props = Vec::with_capacity(events.len());
    let mut bodies: Vec<&[u8]> = Vec::with_capacity(events.len());
    for e in events {
        devices.push(e.sender.device_id.as_str());
        generations.push(e.sender.generation_id.as_str());
        scopes.push(e.sender.scope.as_str());
        systems.push(json_object(&e.system_properties));
        props.push(json_object(&e.properties));
        bodies.push(&e.body);
    }
    // Enqueued times never go backwards along the sequence: a transaction that started earlier (its now() is older)
    // but got the lock later takes the previous event's time.
    let row = sqlx::query(
        "WITH c AS (
             UPDATE d2c_partitions
                SET next_seq = next_seq + $2, last_enqueued_at = GREATEST(now(), last_enqueued_at)
              WHERE partition_id = $1
          RETURNING next_seq - $2 AS first_seq, last_enqueued_at
         ), i AS (
             INSERT INTO d2c_events (partition_id, seq, enqueued_at, device_id, auth_generation_id, auth_scope,
                                     system_properties, properties, body)
             SELECT $1, c.first_seq + u.ord - 1, c.last_enqueued_at, u.device_id, u.generation, u.scope,
                    u.sys::jsonb, u.props::jsonb, u.body
               FROM c, unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bytea[])
                       WITH ORDINALITY AS u(device_id, generation, scope, sys, props, body, ord)
             RETURNING 1
         )
         SELECT (SELECT first_seq FROM c) AS first_seq, (SELECT count(*) FROM i) AS inserted",
    )
    .bind(partition)
    .bind(n)
    .bind(&devices)
    .bind(&generations)
    .bind(&scopes)
    .bind(&systems)
    .bind(&props)
    .bind(&bodies)
    .fetch_one(connection)
    .await?;
    let first: Option<i64> = row.try_get("first_seq")?;
    let inserted: i64 = row.try_get("inserted")?;
    let Some(first) = first.filter(|_| inserted == n) else {
        return Err(sqlx::Error::Protocol(format!(
            "partition {partition} has no counter row"
        )));
    };
    Ok(first)
}

/// Properties as the JSON object stored for them; most messages have none.
fn json_object(map: &BTreeMap<String, String>) -> Cow<'static, str> {
    if map.is_empty() {
        Cow::Borrowed("{}")
    } else {
        // A map of strings always serialises.
        Cow::Owned(serde_json::to_string(map).unwrap_or_default())
    }
}

fn stored(row: &sqlx::postgres::PgRow) -> Result<StoredEvent, sqlx::Error> {
    let mut system: sqlx::types::Json<BTreeMap<String, String>> =
        row.try_get("system_properties")?;
    let properties: sqlx::types::Json<BTreeMap<String, String>> = row.try_get("properties")?;
    let device_id: String = row.try_get("device_id")?;
    // Events written before the stamps had columns keep them among their system properties, and NULL here.
    let generation_id: Option<String> = row.try_get("auth_generation_id")?;
    let scope: Option<AuthScope> = row.try_get("auth_scope")?;
    if let (Some(generation_id), Some(scope)) = (generation_id, scope) {
        let sender = Sender {
            device_id: device_id.clone(),
            generation_id,
            scope,
        };
        sender.stamp(&mut system.0);
    }
    Ok(StoredEvent {
        partition_id: row.try_get("partition_id")?,
        seq: row.try_get("seq")?,
        enqueued_at: row.try_get("enqueued_at")?,
        device_id,
        system_properties: system.0,
        properties: properties.0,
        body: row.try_get("body")?,
    })
}

/// Up to `max` events of `partition` from sequence number `from` on, in order.
pub async fn read(
    db: &PgPool,
    partition: PartitionId,
    from: i64,
    max: i64,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT partition_id, seq, enqueued_at, device_id, auth_generation_id, auth_scope, system_properties,
                properties, body
           FROM d2c_events WHERE partition_id = $1 AND seq >= $2 ORDER BY seq LIMIT $3",
    )
    .bind(partition)
    .bind(from)
    .bind(max)
    .fetch_all(db)
    .await?;
    rows.iter().map(stored).collect()
}

/// The first sequence number enqueued at or after `time` (the next one to come if none is).
pub async fn seq_at_time(
    db: &PgPool,
    partition: PartitionId,
    time: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(
             (SELECT seq FROM d2c_events WHERE partition_id = $1 AND enqueued_at >= $2
               ORDER BY enqueued_at, seq LIMIT 1),
             (SELECT next_seq FROM d2c_partitions WHERE partition_id = $1))",
    )
    .bind(partition)
    .bind(time)
    .fetch_one(db)
    .await
}

/// The sequence number the next event of `partition` will get.
pub async fn next_seq(db: &PgPool, partition: PartitionId) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT next_seq FROM d2c_partitions WHERE partition_id = $1")
        .bind(partition)
        .fetch_one(db)
        .await
}

/// What one partition holds.
#[derive(Debug, Clone)]
pub struct PartitionInfo {
    pub partition_id: i32,
    /// First retained sequence number (None when empty).
    pub first_seq: Option<i64>,
    /// Last committed sequence number (None when nothing was ever written).
    pub last_seq: Option<i64>,
    pub last_enqueued_at: Option<DateTime<Utc>>,
}

pub async fn partitions(db: &PgPool) -> Result<Vec<PartitionInfo>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.partition_id, p.next_seq, p.last_enqueued_at,
                (SELECT min(e.seq) FROM d2c_events e WHERE e.partition_id = p.partition_id) AS first_seq
           FROM d2c_partitions p ORDER BY p.partition_id",
    )
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            let next: i64 = row.try_get("next_seq")?;
            let last_enqueued: Option<DateTime<Utc>> = row.try_get("last_enqueued_at")?;
            Ok(PartitionInfo {
                partition_id: row.try_get("partition_id")?,
                first_seq: row.try_get("first_seq")?,
                last_seq: (next > 0).then_some(next - 1),
                last_enqueued_at: last_enqueued,
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------
// Time partitions and retention

/// Time partitions are one hour wide; this many are kept ready ahead of the database clock.
const HOURS_AHEAD: i64 = 3;

/// The name of the time partition that starts at `hour` (UTC, truncated to the hour).
pub fn time_partition_name(hour: NaiveDateTime) -> String {
    format!("d2c_events_{}", hour.format("%Y%m%d%H"))
}

fn parse_time_partition(name: &str) -> Option<NaiveDateTime> {
    let stamp = name.strip_prefix("d2c_events_")?;
    NaiveDateTime::parse_from_str(&format!("{stamp}0000"), "%Y%m%d%H%M%S").ok()
}

/// Creates the hourly time partition starting at `hour` if it does not exist yet.
pub async fn create_time_partition(db: &PgPool, hour: NaiveDateTime) -> Result<(), sqlx::Error> {
    let hour = hour
        .with_minute(0)
        .and_then(|h| h.with_second(0))
        .and_then(|h| h.with_nanosecond(0))
        .unwrap_or(hour);
    let name = time_partition_name(hour);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(db)
        .await?;
    if exists {
        return Ok(());
    }
    let from = hour.format("%Y-%m-%d %H:00:00+00");
    let to = (hour + Duration::hours(1)).format("%Y-%m-%d %H:00:00+00");
    let mut tx = db.begin().await?;
    // Writers wait behind DDL on the parent table: give up quickly and retry at the next run instead.
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    let ddl = format!(
        "CREATE TABLE IF NOT EXISTS {name} PARTITION OF d2c_events FOR VALUES FROM ('{from}') TO ('{to}')"
    );
    match sqlx::query(&ddl).execute(&mut *tx).await {
        Ok(_) => tx.commit().await,
        // Another hub process created it at the same moment.
        Err(e)
            if matches!(
                sqlstate(&e).as_deref(),
                Some("42P07") | Some(UNIQUE_VIOLATION)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// One maintenance run: makes sure the time partitions from an hour ago to a few hours ahead of the database
/// clock exist, and drops every time partition that ended more than `retention_days` ago (by the database clock).
/// Returns the names of the dropped partitions.
pub async fn maintain(db: &PgPool, retention_days: u32) -> Result<Vec<String>, sqlx::Error> {
    let now: NaiveDateTime =
        sqlx::query_scalar("SELECT date_trunc('hour', now() AT TIME ZONE 'UTC')")
            .fetch_one(db)
            .await?;
    for h in -1..=HOURS_AHEAD {
        create_time_partition(db, now + Duration::hours(h)).await?;
    }
    drop_expired(db, retention_days).await
}

/// Drops the time partitions whose whole hour is older than the retention.
pub async fn drop_expired(db: &PgPool, retention_days: u32) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT c.relname::text AS name, (now() AT TIME ZONE 'UTC') - make_interval(days => $1) AS horizon
           FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'd2c_events'::regclass",
    )
    .bind(retention_days as i32)
    .fetch_all(db)
    .await?;
    let mut dropped = Vec::new();
    for row in rows {
        let name: String = row.try_get("name")?;
        let horizon: NaiveDateTime = row.try_get("horizon")?;
        let Some(start) = parse_time_partition(&name) else {
            continue;
        };
        if start + Duration::hours(1) <= horizon {
            let mut tx = db.begin().await?;
            sqlx::query("SET LOCAL lock_timeout = '5s'")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("DROP TABLE IF EXISTS {name}"))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            dropped.push(name);
        }
    }
    Ok(dropped)
}

/// Names of the existing time partitions, oldest first.
pub async fn time_partitions(db: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
          WHERE i.inhparent = 'd2c_events'::regclass ORDER BY 1",
    )
    .fetch_all(db)
    .await
}
