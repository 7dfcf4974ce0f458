//! Shared access policies: the hub's five defaults (spec §2.3), created with fresh keys on first start, plus any the
//! operator adds. The SQL for the `policies` table lives here only. Changing or deleting one commits through
//! [`notify::commit_credential_change`], so no hub process keeps authenticating with what it was; creating one needs no
//! notification (absent policies are never cached).

use sqlx::PgPool;

use super::{Error, Result, Right, Rights};
use crate::keys;
use crate::notify::{self, CredentialCache, CredentialChange};
use crate::postgres::{sqlstate, UNIQUE_VIOLATION};

#[derive(Clone)]
pub struct Policy {
    pub name: String,
    pub rights: Rights,
    pub primary_key: String,
    pub secondary_key: String,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("rights", &self.rights.to_string())
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// IoT Hub's service connection string for this policy.
    pub fn connection_string(&self, hostname: &str) -> String {
        format!(
            "HostName={hostname};SharedAccessKeyName={};SharedAccessKey={}",
            self.name, self.primary_key
        )
    }
}

/// A policy's keys and rights, with the database's clock for checking a token's expiry.
pub struct PolicyKeys {
    pub rights: Rights,
    pub primary_key: String,
    pub secondary_key: String,
    pub db_now: i64,
}

pub fn defaults() -> Vec<(&'static str, Rights)> {
    use Right::*;
    vec![
        (
            "iothubowner",
            Rights::of(&[RegistryWrite, ServiceConnect, DeviceConnect]),
        ),
        ("service", Rights::of(&[ServiceConnect])),
        ("device", Rights::of(&[DeviceConnect])),
        ("registryRead", Rights::of(&[RegistryRead])),
        (
            "registryReadWrite",
            Rights::of(&[RegistryRead, RegistryWrite]),
        ),
    ]
}

/// Creates the default policies that do not exist yet; safe when several hub processes start at once.
pub async fn ensure_defaults(db: &PgPool) -> anyhow::Result<()> {
    for (name, rights) in defaults() {
        sqlx::query(
            "INSERT INTO policies (name, rights, primary_key, secondary_key) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(rights.bits())
        .bind(keys::generate_key())
        .bind(keys::generate_key())
        .execute(db)
        .await?;
    }
    Ok(())
}

type PolicyRow = (String, i16, String, String);

fn from_row((name, rights, primary_key, secondary_key): PolicyRow) -> Policy {
    Policy {
        name,
        rights: Rights::from_bits(rights),
        primary_key,
        secondary_key,
    }
}

pub async fn list(db: &PgPool) -> Result<Vec<Policy>> {
    let rows: Vec<PolicyRow> = sqlx::query_as(
        "SELECT name, rights, primary_key, secondary_key FROM policies ORDER BY created_at, name",
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(from_row).collect())
}

pub async fn get(db: &PgPool, name: &str) -> Result<Option<Policy>> {
    let row: Option<PolicyRow> = sqlx::query_as(
        "SELECT name, rights, primary_key, secondary_key FROM policies WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(db)
    .await?;
    Ok(row.map(from_row))
}

pub async fn keys(db: &PgPool, name: &str) -> Result<Option<PolicyKeys>, sqlx::Error> {
    let row: Option<(i16, String, String, i64)> = sqlx::query_as(
        "SELECT rights, primary_key, secondary_key, extract(epoch FROM now())::bigint
         FROM policies WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(db)
    .await?;
    Ok(
        row.map(|(rights, primary_key, secondary_key, db_now)| PolicyKeys {
            rights: Rights::from_bits(rights),
            primary_key,
            secondary_key,
            db_now,
        }),
    )
}

pub async fn create(db: &PgPool, policy: &Policy) -> Result<Policy> {
    let row: PolicyRow = sqlx::query_as(
        "INSERT INTO policies (name, rights, primary_key, secondary_key) VALUES ($1, $2, $3, $4)
         RETURNING name, rights, primary_key, secondary_key",
    )
    .bind(&policy.name)
    .bind(policy.rights.bits())
    .bind(&policy.primary_key)
    .bind(&policy.secondary_key)
    .fetch_one(db)
    .await
    .map_err(|e| match sqlstate(&e).as_deref() {
        Some(UNIQUE_VIOLATION) => Error::PolicyExists(policy.name.clone()),
        _ => e.into(),
    })?;
    Ok(from_row(row))
}

/// Changes a policy's rights and, where given, its keys.
pub async fn update(
    db: &PgPool,
    credentials: &dyn CredentialCache,
    name: &str,
    rights: Rights,
    primary_key: Option<&str>,
    secondary_key: Option<&str>,
) -> Result<Policy> {
    let mut tx = db.begin().await?;
    let row: Option<PolicyRow> = sqlx::query_as(
        "UPDATE policies SET rights = $2, primary_key = coalesce($3, primary_key),
                secondary_key = coalesce($4, secondary_key), updated_at = now()
         WHERE name = $1 RETURNING name, rights, primary_key, secondary_key",
    )
    .bind(name)
    .bind(rights.bits())
    .bind(primary_key)
    .bind(secondary_key)
    .fetch_optional(&mut *tx)
    .await?;
    let policy = row
        .map(from_row)
        .ok_or_else(|| Error::PolicyNotFound(name.to_string()))?;
    notify::commit_credential_change(tx, credentials, CredentialChange::Policy(name)).await?;
    Ok(policy)
}

/// Deletes a policy, unless it is the last one that can manage the registry (the hub would be locked for good).
pub async fn delete(db: &PgPool, credentials: &dyn CredentialCache, name: &str) -> Result<()> {
    let mut tx = db.begin().await?;
    let deleted = sqlx::query("DELETE FROM policies WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if deleted == 0 {
        return Err(Error::PolicyNotFound(name.to_string()));
    }
    let writers: i64 = sqlx::query_scalar("SELECT count(*) FROM policies WHERE rights & 2 <> 0")
        .fetch_one(&mut *tx)
        .await?;
    if writers == 0 {
        return Err(Error::LastRegistryWriter);
    }
    notify::commit_credential_change(tx, credentials, CredentialChange::Policy(name)).await?;
    Ok(())
}

/// Policy names as IoT Hub allows them: 1–64 of letters, digits and `_ - @ .`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'@' | b'.'))
}
