//! The registry's SQL. Every write is one transaction; etag checks happen under the device row's lock, so two
//! updates racing with the same etag cannot both succeed.

use rand::Rng;
use sqlx::{PgPool, Postgres, Transaction};

use super::model::{DeviceInput, DeviceRecord};
use crate::auth::sas;
use crate::http::error::{ApiError, ApiResult, ErrorCode};
use crate::http::wire::IfMatch;

const COLUMNS: &str =
    "device_id, generation_id, etag_version, status, status_reason, status_updated_time,
    auth_type, primary_key, secondary_key, primary_thumbprint, secondary_thumbprint, iot_edge,
    last_activity_time,
    (SELECT count(*) FROM c2d_messages m
      WHERE m.device_id = devices.device_id AND m.state IN ('enqueued', 'invisible')) AS c2d_message_count";

/// The writable fields of a device, resolved from a client's input (and the device as it was, for updates).
#[derive(Debug, Clone)]
pub struct DeviceFields {
    pub status: String,
    pub status_reason: Option<String>,
    pub auth_type: String,
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
    /// Validates `input`; `existing` is the device being updated (its keys stay unless new ones are given).
    pub fn resolve(
        input: &DeviceInput,
        existing: Option<&DeviceRecord>,
    ) -> ApiResult<DeviceFields> {
        let status = match input.status.as_deref() {
            None => existing.map_or("enabled".to_string(), |d| d.status.clone()),
            Some(s) if s.eq_ignore_ascii_case("enabled") => "enabled".into(),
            Some(s) if s.eq_ignore_ascii_case("disabled") => "disabled".into(),
            Some(s) => return Err(ApiError::invalid(format!("Invalid device status '{s}'"))),
        };
        if let Some(reason) = &input.status_reason {
            if reason.chars().count() > 128 || reason.contains('\0') {
                return Err(ApiError::invalid(
                    "statusReason must be at most 128 characters, without NUL",
                ));
            }
        }
        let auth = input.authentication.clone().unwrap_or_default();
        let auth_type = match auth.auth_type.as_deref() {
            None => existing.map_or("sas".to_string(), |d| d.auth_type.clone()),
            Some(t) => ["sas", "selfSigned", "certificateAuthority", "none"]
                .iter()
                .find(|known| known.eq_ignore_ascii_case(t))
                .map(|k| k.to_string())
                .ok_or_else(|| ApiError::invalid(format!("Invalid authentication type '{t}'")))?,
        };
        let symmetric = auth.symmetric_key.unwrap_or_default();
        let thumbprints = auth.x509_thumbprint.unwrap_or_default();
        let (mut primary_key, mut secondary_key) = (None, None);
        let (mut primary_thumbprint, mut secondary_thumbprint) = (None, None);
        match auth_type.as_str() {
            "sas" => {
                let given = (
                    non_empty(&symmetric.primary_key),
                    non_empty(&symmetric.secondary_key),
                );
                for key in [&given.0, &given.1].into_iter().flatten() {
                    if !sas::valid_key(key) {
                        return Err(ApiError::invalid(
                            "Symmetric keys must be base64 encodings of 16 to 64 bytes",
                        ));
                    }
                }
                let kept = existing.filter(|d| d.auth_type == "sas");
                primary_key = given
                    .0
                    .or_else(|| kept.and_then(|d| d.primary_key.clone()))
                    .or_else(|| Some(sas::generate_key()));
                secondary_key = given
                    .1
                    .or_else(|| kept.and_then(|d| d.secondary_key.clone()))
                    .or_else(|| Some(sas::generate_key()));
            }
            "selfSigned" => {
                primary_thumbprint = non_empty(&thumbprints.primary_thumbprint);
                secondary_thumbprint = non_empty(&thumbprints.secondary_thumbprint);
                for t in [&primary_thumbprint, &secondary_thumbprint]
                    .into_iter()
                    .flatten()
                {
                    if t.len() > 128 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(ApiError::invalid("Thumbprints must be hexadecimal"));
                    }
                }
                if primary_thumbprint.is_none() {
                    return Err(ApiError::new(
                        ErrorCode::ArgumentNull,
                        "selfSigned authentication needs a primaryThumbprint",
                    ));
                }
            }
            _ => {}
        }
        let iot_edge = input
            .capabilities
            .as_ref()
            .map(|c| c.iot_edge)
            .or(existing.map(|d| d.iot_edge))
            .unwrap_or(false);
        Ok(DeviceFields {
            status,
            status_reason: input
                .status_reason
                .clone()
                .or_else(|| existing.and_then(|d| d.status_reason.clone())),
            auth_type,
            primary_key,
            secondary_key,
            primary_thumbprint,
            secondary_thumbprint,
            iot_edge,
        })
    }
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
    device_id: &str,
    fields: &DeviceFields,
) -> ApiResult<DeviceRecord> {
    let mut tx = db.begin().await?;
    let created = insert(&mut tx, device_id, fields).await?;
    tx.commit().await?;
    created.ok_or_else(|| {
        ApiError::new(
            ErrorCode::DeviceAlreadyExists,
            format!("A device with ID '{device_id}' is already registered"),
        )
    })
}

async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    device_id: &str,
    f: &DeviceFields,
) -> ApiResult<Option<DeviceRecord>> {
    // A random start for the etag counter: a device deleted and created again never repeats an old etag.
    let etag_start: i64 = rand::thread_rng().gen_range(1..1_000_000_000);
    let sql = format!(
        "INSERT INTO devices (device_id, generation_id, etag_version, status, status_reason, auth_type,
             primary_key, secondary_key, primary_thumbprint, secondary_thumbprint, iot_edge)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (device_id) DO NOTHING
         RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(device_id)
        .bind(new_generation_id())
        .bind(etag_start)
        .bind(&f.status)
        .bind(&f.status_reason)
        .bind(&f.auth_type)
        .bind(&f.primary_key)
        .bind(&f.secondary_key)
        .bind(&f.primary_thumbprint)
        .bind(&f.secondary_thumbprint)
        .bind(f.iot_edge)
        .fetch_optional(&mut **tx)
        .await?)
}

pub async fn get(db: &PgPool, device_id: &str) -> ApiResult<Option<DeviceRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE device_id = $1");
    Ok(sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(device_id)
        .fetch_optional(db)
        .await?)
}

async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    device_id: &str,
) -> ApiResult<Option<DeviceRecord>> {
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE device_id = $1 FOR UPDATE");
    Ok(sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(device_id)
        .fetch_optional(&mut **tx)
        .await?)
}

fn check_etag(device: &DeviceRecord, if_match: &IfMatch) -> ApiResult<()> {
    match if_match.expected_version() {
        Some(v) if v != device.etag_version => Err(ApiError::new(
            ErrorCode::PreconditionFailed,
            format!(
                "The etag does not match device '{}' (it was changed since it was read)",
                device.device_id
            ),
        )),
        _ => Ok(()),
    }
}

/// Updates a device under its row lock: 404 when absent, 412 when `if_match` names another version.
pub async fn update(
    db: &PgPool,
    device_id: &str,
    if_match: &IfMatch,
    input: &DeviceInput,
) -> ApiResult<DeviceRecord> {
    let mut tx = db.begin().await?;
    let current = lock(&mut tx, device_id)
        .await?
        .ok_or_else(|| ApiError::device_not_found(device_id))?;
    check_etag(&current, if_match)?;
    let f = DeviceFields::resolve(input, Some(&current))?;
    let updated = write(&mut tx, device_id, &f).await?;
    tx.commit().await?;
    Ok(updated)
}

async fn write(
    tx: &mut Transaction<'_, Postgres>,
    device_id: &str,
    f: &DeviceFields,
) -> ApiResult<DeviceRecord> {
    let sql = format!(
        "UPDATE devices SET
             status_updated_time = CASE WHEN status <> $2 THEN now() ELSE status_updated_time END,
             status = $2, status_reason = $3, auth_type = $4, primary_key = $5, secondary_key = $6,
             primary_thumbprint = $7, secondary_thumbprint = $8, iot_edge = $9,
             etag_version = etag_version + 1
         WHERE device_id = $1
         RETURNING {COLUMNS}"
    );
    Ok(sqlx::query_as::<_, DeviceRecord>(&sql)
        .bind(device_id)
        .bind(&f.status)
        .bind(&f.status_reason)
        .bind(&f.auth_type)
        .bind(&f.primary_key)
        .bind(&f.secondary_key)
        .bind(&f.primary_thumbprint)
        .bind(&f.secondary_thumbprint)
        .bind(f.iot_edge)
        .fetch_one(&mut **tx)
        .await?)
}

/// Deletes a device (and, through foreign keys, everything queued for it): 404 when absent, 412 on etag mismatch.
pub async fn delete(db: &PgPool, device_id: &str, if_match: &IfMatch) -> ApiResult<()> {
    let mut tx = db.begin().await?;
    let current = lock(&mut tx, device_id)
        .await?
        .ok_or_else(|| ApiError::device_not_found(device_id))?;
    check_etag(&current, if_match)?;
    sqlx::query("DELETE FROM devices WHERE device_id = $1")
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// One page of devices in id order, after `after`.
pub async fn list(db: &PgPool, after: Option<&str>, limit: i64) -> ApiResult<Vec<DeviceRecord>> {
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

pub async fn statistics(db: &PgPool) -> ApiResult<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'enabled'),
                count(*) FILTER (WHERE status = 'disabled')
         FROM devices",
    )
    .fetch_one(db)
    .await?)
}

/// What authenticating a device needs: its keys and status, and the database's clock.
#[derive(sqlx::FromRow)]
pub struct DeviceCredentials {
    pub status: String,
    pub generation_id: String,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub db_now: i64,
}

pub async fn credentials(db: &PgPool, device_id: &str) -> ApiResult<Option<DeviceCredentials>> {
    Ok(sqlx::query_as::<_, DeviceCredentials>(
        "SELECT status, generation_id, primary_key, secondary_key,
                extract(epoch FROM now())::bigint AS db_now
         FROM devices WHERE device_id = $1",
    )
    .bind(device_id)
    .fetch_optional(db)
    .await?)
}

pub enum BulkMode {
    Create,
    CreateOrUpdate,
    Update,
    UpdateIfMatchEtag,
    Delete,
    DeleteIfMatchEtag,
}

impl BulkMode {
    pub fn parse(mode: &str) -> Option<BulkMode> {
        Some(match mode.to_ascii_lowercase().as_str() {
            "create" => BulkMode::Create,
            "createorupdate" => BulkMode::CreateOrUpdate,
            "update" => BulkMode::Update,
            "updateifmatchetag" => BulkMode::UpdateIfMatchEtag,
            "delete" => BulkMode::Delete,
            "deleteifmatchetag" => BulkMode::DeleteIfMatchEtag,
            _ => return None,
        })
    }
}

/// Applies one bulk entry in its own transaction (IoT Hub applies entries independently).
pub async fn apply_bulk(
    db: &PgPool,
    device_id: &str,
    mode: &BulkMode,
    etag: Option<&str>,
    input: &DeviceInput,
) -> ApiResult<()> {
    let etag_match = || IfMatch::parse(etag.unwrap_or("\"\""));
    match mode {
        BulkMode::Create => {
            create(db, device_id, &DeviceFields::resolve(input, None)?).await?;
        }
        BulkMode::Update => {
            update(db, device_id, &IfMatch::Any, input).await?;
        }
        BulkMode::UpdateIfMatchEtag => {
            update(db, device_id, &etag_match(), input).await?;
        }
        BulkMode::Delete => delete(db, device_id, &IfMatch::Any).await?,
        BulkMode::DeleteIfMatchEtag => delete(db, device_id, &etag_match()).await?,
        BulkMode::CreateOrUpdate => {
            let mut tx = db.begin().await?;
            match lock(&mut tx, device_id).await? {
                Some(current) => {
                    let f = DeviceFields::resolve(input, Some(&current))?;
                    write(&mut tx, device_id, &f).await?;
                }
                None => {
                    let f = DeviceFields::resolve(input, None)?;
                    // Lost a race with a concurrent create: that device stands, ours reports a conflict.
                    if insert(&mut tx, device_id, &f).await?.is_none() {
                        return Err(ApiError::new(
                            ErrorCode::DeviceAlreadyExists,
                            format!("A device with ID '{device_id}' was created concurrently"),
                        ));
                    }
                }
            }
            tx.commit().await?;
        }
    }
    Ok(())
}
