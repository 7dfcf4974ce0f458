//! Consumer groups: named readers of the event stream, each with a server-side checkpoint per partition.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::{store, Error, PartitionId, Result};
use crate::postgres::{sqlstate, FOREIGN_KEY_VIOLATION, UNIQUE_VIOLATION};

/// The group every hub has, which cannot be deleted.
pub const DEFAULT_GROUP: &str = "$Default";

/// Consumer group names: `$Default`, or 1–50 letters, digits, `-`, `.`, `_`.
pub fn valid_group_name(name: &str) -> bool {
    name == DEFAULT_GROUP
        || ((1..=50).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')))
}

/// A consumer group name that is valid by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerGroupName(String);

#[derive(Debug, Clone, thiserror::Error)]
#[error("Consumer group name '{0}' is invalid: 1-50 letters, digits, '-', '.', '_'")]
pub struct InvalidGroupName(pub String);

impl ConsumerGroupName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn is_default(&self) -> bool {
        self.0 == DEFAULT_GROUP
    }
}

impl FromStr for ConsumerGroupName {
    type Err = InvalidGroupName;
    fn from_str(name: &str) -> Result<ConsumerGroupName, InvalidGroupName> {
        if valid_group_name(name) {
            Ok(ConsumerGroupName(name.to_string()))
        } else {
            Err(InvalidGroupName(name.to_string()))
        }
    }
}

impl fmt::Display for ConsumerGroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone)]
pub struct ConsumerGroup {
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// partition → last processed sequence number
    pub checkpoints: BTreeMap<i32, i64>,
}

pub async fn list(db: &PgPool) -> Result<Vec<ConsumerGroup>, sqlx::Error> {
    let groups = sqlx::query("SELECT name, created_at FROM d2c_consumer_groups ORDER BY name")
        .fetch_all(db)
        .await?;
    let checkpoints = sqlx::query("SELECT consumer_group, partition_id, seq FROM d2c_checkpoints")
        .fetch_all(db)
        .await?;
    let mut out: Vec<ConsumerGroup> = groups
        .iter()
        .map(|r| {
            Ok(ConsumerGroup {
                name: r.try_get("name")?,
                created_at: r.try_get("created_at")?,
                checkpoints: BTreeMap::new(),
            })
        })
        .collect::<Result<_, sqlx::Error>>()?;
    for row in checkpoints {
        let group: String = row.try_get("consumer_group")?;
        if let Some(g) = out.iter_mut().find(|g| g.name == group) {
            g.checkpoints
                .insert(row.try_get("partition_id")?, row.try_get("seq")?);
        }
    }
    Ok(out)
}

/// The group with its checkpoints; [`Error::GroupNotFound`] when there is none.
pub async fn get(db: &PgPool, name: &ConsumerGroupName) -> Result<ConsumerGroup> {
    let Some(row) = sqlx::query("SELECT name, created_at FROM d2c_consumer_groups WHERE name = $1")
        .bind(name.as_str())
        .fetch_optional(db)
        .await?
    else {
        return Err(Error::GroupNotFound(name.clone()));
    };
    let checkpoints =
        sqlx::query("SELECT partition_id, seq FROM d2c_checkpoints WHERE consumer_group = $1")
            .bind(name.as_str())
            .fetch_all(db)
            .await?;
    let mut map = BTreeMap::new();
    for c in checkpoints {
        map.insert(c.try_get("partition_id")?, c.try_get("seq")?);
    }
    Ok(ConsumerGroup {
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        checkpoints: map,
    })
}

/// Creates a group unless `limit` groups exist; `Ok(false)` when it already existed.
pub async fn create(db: &PgPool, name: &ConsumerGroupName, limit: u32) -> Result<bool> {
    let mut tx = db.begin().await?;
    // Serialise creations on the settings row so two racing creations cannot both pass the count.
    sqlx::query("SELECT 1 FROM d2c_settings WHERE id = 1 FOR UPDATE")
        .execute(&mut *tx)
        .await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM d2c_consumer_groups WHERE name = $1)")
            .bind(name.as_str())
            .fetch_one(&mut *tx)
            .await?;
    if exists {
        return Ok(false);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM d2c_consumer_groups")
        .fetch_one(&mut *tx)
        .await?;
    if count >= limit as i64 {
        return Err(Error::TooManyGroups { count });
    }
    match sqlx::query("INSERT INTO d2c_consumer_groups (name) VALUES ($1)")
        .bind(name.as_str())
        .execute(&mut *tx)
        .await
    {
        Ok(_) => {}
        Err(e) if sqlstate(&e).as_deref() == Some(UNIQUE_VIOLATION) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    tx.commit().await?;
    Ok(true)
}

/// Deletes a group and its checkpoints; `$Default` stays.
pub async fn delete(db: &PgPool, name: &ConsumerGroupName) -> Result<()> {
    if name.is_default() {
        return Err(Error::DefaultGroupIsPermanent);
    }
    let done = sqlx::query("DELETE FROM d2c_consumer_groups WHERE name = $1")
        .bind(name.as_str())
        .execute(db)
        .await?;
    if done.rows_affected() == 0 {
        return Err(Error::GroupNotFound(name.clone()));
    }
    Ok(())
}

/// Stores the group's checkpoint for a partition. `seq` must be an event that was committed.
pub async fn set_checkpoint(
    db: &PgPool,
    group: &ConsumerGroupName,
    partition: PartitionId,
    seq: i64,
) -> Result<()> {
    let next = store::next_seq(db, partition).await?;
    if seq < 0 || seq >= next {
        return Err(Error::NotCommitted {
            seq,
            partition,
            next,
        });
    }
    let result = sqlx::query(
        "INSERT INTO d2c_checkpoints (partition_id, consumer_group, seq) VALUES ($1, $2, $3)
         ON CONFLICT (partition_id, consumer_group) DO UPDATE SET seq = EXCLUDED.seq, updated_at = now()",
    )
    .bind(partition)
    .bind(group.as_str())
    .bind(seq)
    .execute(db)
    .await;
    match result {
        Ok(_) => Ok(()),
        Err(e) if sqlstate(&e).as_deref() == Some(FOREIGN_KEY_VIOLATION) => {
            Err(Error::GroupNotFound(group.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn checkpoint(
    db: &PgPool,
    group: &ConsumerGroupName,
    partition: PartitionId,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT seq FROM d2c_checkpoints WHERE partition_id = $1 AND consumer_group = $2",
    )
    .bind(partition)
    .bind(group.as_str())
    .fetch_optional(db)
    .await
}

#[cfg(test)]
mod tests {
    use super::valid_group_name;

    #[test]
    fn group_names() {
        assert!(valid_group_name("$Default"));
        assert!(valid_group_name("analytics-1.v2_x"));
        assert!(valid_group_name(&"a".repeat(50)));
        assert!(!valid_group_name(&"a".repeat(51)));
        assert!(!valid_group_name(""));
        assert!(!valid_group_name("$Other"));
        assert!(!valid_group_name("a b"));
    }
}
