//! A device's connection to the hub (MQTT today): which connection holds the device, the state the registry shows,
//! and the C2D subscription a persistent session keeps.
//!
//! Take-over works across hub processes through the database: a connection that starts writes its random id into
//! the device's row and notifies the session channel in the same transaction; every connection of that device, in
//! any process, is woken, reads the row, and closes itself when the id there is no longer its own. A registry
//! change of the device (disabled, deleted) wakes them the same way, through its credentials notification.

use sqlx::PgPool;
use uuid::Uuid;

use super::model::DeviceId;
use crate::notify::{self, channel};

crate::text_enum! {
    /// `connectionState`, as IoT Hub writes it.
    pub enum ConnectionState {
        Connected = "Connected",
        Disconnected = "Disconnected",
    }
}

/// What a new connection learns when it takes the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// A persistent session's C2D subscription is still in force (CleanSession 0 and an earlier SUBSCRIBE).
    pub c2d_subscribed: bool,
}

/// Makes `connection` the device's connection (closing any other, in any process, through the notification) and
/// marks the device Connected. A clean session forgets the stored C2D subscription. `None`: no such device.
pub async fn take(
    db: &PgPool,
    device_id: &DeviceId,
    connection: Uuid,
    clean_session: bool,
) -> Result<Option<Taken>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let subscribed: Option<bool> = sqlx::query_scalar(
        "UPDATE devices SET connection_id = $2, connection_state = 'Connected',
             connection_state_updated_time = now(), last_activity_time = now(),
             session_c2d_subscribed = session_c2d_subscribed AND NOT $3
         WHERE device_id = $1
         RETURNING session_c2d_subscribed",
    )
    .bind(device_id.as_str())
    .bind(connection)
    .bind(clean_session)
    .fetch_optional(&mut *tx)
    .await?;
    notify::notify(&mut tx, channel::SESSION, device_id.as_str()).await?;
    tx.commit().await?;
    Ok(subscribed.map(|c2d_subscribed| Taken { c2d_subscribed }))
}

/// The connection that may hold the device now: `None` when none does, or the device was disabled or deleted.
pub async fn holder(db: &PgPool, device_id: &DeviceId) -> Result<Option<Uuid>, sqlx::Error> {
    let holder: Option<Option<Uuid>> = sqlx::query_scalar(
        "SELECT connection_id FROM devices WHERE device_id = $1 AND status = 'enabled'",
    )
    .bind(device_id.as_str())
    .fetch_optional(db)
    .await?;
    Ok(holder.flatten())
}

/// Marks the device Disconnected, unless another connection has taken it meanwhile.
pub async fn release(
    db: &PgPool,
    device_id: &DeviceId,
    connection: Uuid,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET connection_id = NULL, connection_state = 'Disconnected',
             connection_state_updated_time = now()
         WHERE device_id = $1 AND connection_id = $2",
    )
    .bind(device_id.as_str())
    .bind(connection)
    .execute(db)
    .await?;
    Ok(())
}

/// Records activity of the device (`lastActivityTime`).
pub async fn touch(db: &PgPool, device_id: &DeviceId) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE devices SET last_activity_time = now() WHERE device_id = $1")
        .bind(device_id.as_str())
        .execute(db)
        .await?;
    Ok(())
}

/// Remembers (or forgets) that the device's persistent session subscribes to its C2D messages, while
/// `connection` holds the device.
pub async fn remember_c2d_subscription(
    db: &PgPool,
    device_id: &DeviceId,
    connection: Uuid,
    subscribed: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE devices SET session_c2d_subscribed = $3 WHERE device_id = $1 AND connection_id = $2",
    )
    .bind(device_id.as_str())
    .bind(connection)
    .bind(subscribed)
    .execute(db)
    .await?;
    Ok(())
}

/// Devices connected now (`connectedDeviceCount`).
pub async fn connected_count(db: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM devices WHERE connection_state = 'Connected'")
        .fetch_one(db)
        .await
}
