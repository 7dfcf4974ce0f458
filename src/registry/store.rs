//! The registry's SQL. Every write is one transaction; etag checks happen under the device row's lock, so two
//! updates racing with the same etag cannot both succeed. A write that changes an existing device commits through
//! [`notify::commit_credential_change`]: every hub process's credential cache forgets the device, and its connections look again
//! (closing when it was disabled or deleted). Creating one needs neither: absent devices are never cached.

use rand::Rng;
use sqlx::{PgPool, Postgres, Transaction};

use super::model::{AuthType, DeviceChanges, DeviceId, DeviceRecord, Statistics, Status};
use super::{Error, Result};
use crate::keys;
use crate::notify::{self, CredentialCache, CredentialChange};

const COLUMNS: &str =
    "device_id, generation_id, etag_version, status, status_reason, status_updated_time,
    auth_type, primary_key, secondary_key, primary_thumbprint, secondary_thumbprint, iot_edge,
    last_activity_time, connection_state, connection_state_updated_time";

/// The writable fields of a device, resolved from a client's input (and the device as it was, for updates).
#[derive(Debug, Clone)]
pub struct DeviceFields {
    pub status: Status,
    pub status_reason: Option<String>,
    pub auth_type: AuthType,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    pub iot_edge: bool,
}

fn non_empty(s: &Option<String>) -> Option<String> {
    s.as_ref().filter(|s| !s.is_empty()).cloned()
}

impl DeviceFields {
    /// Checks `changes`; `existing` is the device being updated (its keys stay unless new ones are given).
    pub fn resolve(
        changes: &DeviceChanges,
        existing: Option<&DeviceRecord>,
    ) -> Result<DeviceFields> {
        let status = changes
            .status
            .or(existing.map(|d| d.status))
            .unwrap_or(Status::Enabled);
        if let Some(reason) = &changes.status_reason {
            if reason.chars().count() > 128 || reason.contains('\0') {
                return Err(Error::Invalid(
                    "statusReason must be at most 128 characters, without NUL".into(),
                ));
            }
        }
        let auth_type = changes
            .auth_type
            .or(existing.map(|d| d.auth_type))
            .unwrap_or(AuthType::Sas);
        let (mut primary_key, mut secondary_key) = (None, None);
        let (mut primary_thumbprint, mut secondary_thumbprint) = (None, None);
        match auth_type {
            AuthType::Sas => {
                let kept = existing.filter(|d| d.auth_type == AuthType::Sas);
                (primary_key, secondary_key) = keys_of(changes, kept)?;
            }
            AuthType::SelfSigned => {
                (primary_thumbprint, secondary_thumbprint) = thumbprints_of(changes)?;
            }
            AuthType::CertificateAuthority | AuthType::None => {}
        }
        Ok(DeviceFields {
            status,
            status_reason: changes
                .status_reason
                .clone()
                .or_else(|| existing.and_then(|d| d.status_reason.clone())),
            auth_type,
            primary_key,
            secondary_key,
            primary_thumbprint,
            secondary_thumbprint,
            iot_edge: changes
                .iot_edge
                .or(existing.map(|d| d.iot_edge))
                .unwrap_or(false),
        })
    }
}

impl DeviceFields {
    /// Binds the fields, in their column order, as the next parameters of `query`.
    fn bind<'q>(&'q self, query: DeviceQuery<'q>) -> DeviceQuery<'q> {
        query
            .bind(self.status)
            .bind(&self.status_reason)
            .bind(self.auth_type)
            .bind(&self.primary_key)
            .bind(&self.secondary_key)
            .bind(&self.primary_thumbprint)
            .bind(&self.secondary_thumbprint)
            .bind(self.iot_edge)
    }
}

type DeviceQuery<'q> =
    sqlx::query::QueryAs<'q, Postgres, DeviceRecord, sqlx::postgres::PgArguments>;

type Pair = (Option<String>, Option<String>);

/// SAS keys: the ones given, else the ones `kept` had, else new ones.
fn keys_of(changes: &DeviceChanges, kept: Option<&DeviceRecord>) -> Result<Pair> {
    let given = (
        non_empty(&changes.primary_key),
        non_empty(&changes.secondary_key),
    );
    for key in [&given.0, &given.1].into_iter().flatten() {
        if !keys::valid_key(key) {
            return Err(Error::Invalid(
                "Symmetric keys must be base64 encodings of 16 to 64 bytes".into(),
            ));
        }
    }
    let primary = given
        .0
        .or_else(|| kept.and_then(|d| d.primary_key.clone()))
        .unwrap_or_else(keys::generate_key);
    let secondary = given
        .1
        .or_else(|| kept.and_then(|d| d.secondary_key.clone()))
        .unwrap_or_else(keys::generate_key);
    Ok((Some(primary), Some(secondary)))
}

/// X.509 thumbprints of a selfSigned device: hexadecimal, the primary one required.
fn thumbprints_of(changes: &DeviceChanges) -> Result<Pair> {
    let primary = non_empty(&changes.primary_thumbprint);
    let secondary = non_empty(&changes.secondary_thumbprint);
    for t in [&primary, &secondary].into_iter().flatten() {
        if t.len() > 128 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::Invalid("Thumbprints must be hexadecimal".into()));
        }
    }
    if primary.is_none() {
        return Err(Error::MissingThumbprint);
    }
    Ok((primary, secondary))
}

/// A generation id in IoT Hub's observed form: .NET ticks (100 ns since year 1) at creation.
fn new_generation_id() -> String {
    const UNIX_EPOCH_TICKS: i64 = 621_355_968_000_000_000;
    let now = chrono::Utc::now();
    let ticks = UNIX_EPOCH_TICKS
        + now.timestamp() * 10_000_000
        + i64::from(now.timestamp_subsec_nanos() / 100);
    ticks.to_string()
}

pub async fn create(
    db: &PgPool,
    device_id: &DeviceId,
    fields: &DeviceFields,
) -> Result<DeviceRecord> {
    let mut tx = db.begin().await?;
    let created = insert(&mut tx, device_id, fields).await?;
    tx.commit().await?;
    created.ok_or_else(|| Error::DeviceExists(device_id.clone()))
}

async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    device_id: &DeviceId,
    f: &DeviceFields,
) -> Result<Option<DeviceRecord>> {
    // A random start for the etag counter: a device deleted and created again never repeats an old etag.
    let etag_start: i64 = rand::thread_rng().gen_range(1..1_000_000_000);
    let sql = format!(
        "INSERT INTO devices (device_id, generation_id, etag_version, status, status_reason, auth_type,
             primary_key, secondary_key, primary_thumbprint, secondary_thumbprint, iot_edge)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (device_id) DO NOTHING
         RETURNING {COLUMNS}"
    );
    let query = sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(device_id.as_str())
        .bind(new_generation_id())
        .bind(etag_start);
    Ok(f.bind(query).fetch_optional(&mut **tx).await?)
}

pub async fn get(db: &PgPool, device_id: &DeviceId) -> Result<Option<DeviceRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE device_id = $1");
    Ok(sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(device_id.as_str())
        .fetch_optional(db)
        .await?)
}

async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    device_id: &DeviceId,
) -> Result<Option<DeviceRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE device_id = $1 FOR UPDATE");
    Ok(sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(device_id.as_str())
        .fetch_optional(&mut **tx)
        .await?)
}

/// `expected`: the etag version the caller read (`None`: any version will do).
fn check_etag(device: &DeviceRecord, device_id: &DeviceId, expected: Option<i64>) -> Result<()> {
    match expected {
        Some(v) if v != device.etag_version => Err(Error::EtagMismatch(device_id.clone())),
        _ => Ok(()),
    }
}

/// Updates a device under its row lock: not found when absent, an etag mismatch when `expected` names another
/// version.
pub async fn update(
    db: &PgPool,
    credentials: &dyn CredentialCache,
    device_id: &DeviceId,
    expected: Option<i64>,
    changes: &DeviceChanges,
) -> Result<DeviceRecord> {
    let mut tx = db.begin().await?;
    let current = lock(&mut tx, device_id)
        .await?
        .ok_or_else(|| Error::DeviceNotFound(device_id.clone()))?;
    check_etag(&current, device_id, expected)?;
    let f = DeviceFields::resolve(changes, Some(&current))?;
    let updated = write(&mut tx, device_id, &f).await?;
    notify::commit_credential_change(
        tx,
        credentials,
        CredentialChange::Device(device_id.as_str()),
    )
    .await?;
    Ok(updated)
}

async fn write(
    tx: &mut Transaction<'_, Postgres>,
    device_id: &DeviceId,
    f: &DeviceFields,
) -> Result<DeviceRecord> {
    let sql = format!(
        "UPDATE devices SET
             status_updated_time = CASE WHEN status <> $2 THEN now() ELSE status_updated_time END,
             status = $2, status_reason = $3, auth_type = $4, primary_key = $5, secondary_key = $6,
             primary_thumbprint = $7, secondary_thumbprint = $8, iot_edge = $9,
             etag_version = etag_version + 1
         WHERE device_id = $1
         RETURNING {COLUMNS}"
    );
    let query = sqlx::query_as::<_, DeviceRecord>(&sql).bind(device_id.as_str());
    Ok(f.bind(query).fetch_one(&mut **tx).await?)
}

/// Deletes a device (and, through foreign keys, everything queued for it): not found when absent, an etag
/// mismatch when `expected` names another version.
pub async fn delete(
    db: &PgPool,
    credentials: &dyn CredentialCache,
    device_id: &DeviceId,
    expected: Option<i64>,
) -> Result<()> {
    let mut tx = db.begin().await?;
    let current = lock(&mut tx, device_id)
        .await?
        .ok_or_else(|| Error::DeviceNotFound(device_id.clone()))?;
    check_etag(&current, device_id, expected)?;
    sqlx::query("DELETE FROM devices WHERE device_id = $1")
        .bind(device_id.as_str())
        .execute(&mut *tx)
        .await?;
    notify::commit_credential_change(
        tx,
        credentials,
        CredentialChange::Device(device_id.as_str()),
    )
    .await?;
    Ok(())
}

/// One page of devices in id order, after `after`.
pub async fn list(db: &PgPool, after: Option<&str>, limit: i64) -> Result<Vec<DeviceRecord>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM devices WHERE ($1::text IS NULL OR device_id > $1)
         ORDER BY device_id LIMIT $2"
    );
    Ok(sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

pub async fn statistics(db: &PgPool) -> Result<Statistics> {
    let (total, enabled, disabled) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'enabled'),
                count(*) FILTER (WHERE status = 'disabled')
         FROM devices",
    )
    .fetch_one(db)
    .await?;
    Ok(Statistics {
        total,
        enabled,
        disabled,
    })
}

/// What authenticating a device needs: its keys and status, and the database's clock.
#[derive(sqlx::FromRow)]
pub struct DeviceCredentials {
    pub status: Status,
    pub generation_id: String,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub db_now: i64,
}

/// The credentials of the device named `device_id`, if it exists (any text: an id that is not valid names none).
pub async fn credentials(
    db: &PgPool,
    device_id: &str,
) -> Result<Option<DeviceCredentials>, sqlx::Error> {
    sqlx::query_as::<_, DeviceCredentials>(
        "SELECT status, generation_id, primary_key, secondary_key,
                extract(epoch FROM now())::bigint AS db_now
         FROM devices WHERE device_id = $1",
    )
    .bind(device_id)
    .fetch_optional(db)
    .await
}

/// How one entry of a bulk request applies.
pub enum BulkMode {
    Create,
    CreateOrUpdate,
    Update,
    /// Update only the version the entry names (`None`: any version).
    UpdateIfMatchEtag(Option<i64>),
    Delete,
    /// Delete only the version the entry names (`None`: any version).
    DeleteIfMatchEtag(Option<i64>),
}

/// Applies one bulk entry in its own transaction (IoT Hub applies entries independently), so each change sends
/// its own notification.
pub async fn apply_bulk(
    db: &PgPool,
    credentials: &dyn CredentialCache,
    device_id: &DeviceId,
    mode: &BulkMode,
    changes: &DeviceChanges,
) -> Result<()> {
    match mode {
        BulkMode::Create => {
            create(db, device_id, &DeviceFields::resolve(changes, None)?).await?;
        }
        BulkMode::Update => {
            update(db, credentials, device_id, None, changes).await?;
        }
        BulkMode::UpdateIfMatchEtag(v) => {
            update(db, credentials, device_id, *v, changes).await?;
        }
        BulkMode::Delete => delete(db, credentials, device_id, None).await?,
        BulkMode::DeleteIfMatchEtag(v) => delete(db, credentials, device_id, *v).await?,
        BulkMode::CreateOrUpdate => create_or_update(db, credentials, device_id, changes).await?,
    }
    Ok(())
}

async fn create_or_update(
    db: &PgPool,
    credentials: &dyn CredentialCache,
    device_id: &DeviceId,
    changes: &DeviceChanges,
) -> Result<()> {
    let mut tx = db.begin().await?;
    match lock(&mut tx, device_id).await? {
        Some(current) => {
            let f = DeviceFields::resolve(changes, Some(&current))?;
            write(&mut tx, device_id, &f).await?;
            notify::commit_credential_change(
                tx,
                credentials,
                CredentialChange::Device(device_id.as_str()),
            )
            .await?;
        }
        None => {
            let f = DeviceFields::resolve(changes, None)?;
            // Lost a race with a concurrent create: that device stands, ours reports a conflict.
            if insert(&mut tx, device_id, &f).await?.is_none() {
                return Err(Error::CreatedConcurrently(device_id.clone()));
            }
            tx.commit().await?;
        }
    }
    Ok(())
}
