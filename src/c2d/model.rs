//! C2D messages as stored and as the service API writes them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::http::wire::format_time;

/// `iothub-ack`: which outcomes the sender wants feedback for (spec §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    None,
    Positive,
    Negative,
    Full,
}

impl Ack {
    pub fn parse(text: &str) -> Option<Ack> {
        Some(match text.to_ascii_lowercase().as_str() {
            "none" => Ack::None,
            "positive" => Ack::Positive,
            "negative" => Ack::Negative,
            "full" => Ack::Full,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Ack::None => "none",
            Ack::Positive => "positive",
            Ack::Negative => "negative",
            Ack::Full => "full",
        }
    }
}

/// When the message expires, as the sender asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The hub's default TTL.
    Default,
    /// `iothub-expiry`: an absolute time.
    At(DateTime<Utc>),
    /// `iothub-ttl`: seconds from enqueue.
    Ttl(i64),
}

/// A message the service wants enqueued, validated.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub ack: Ack,
    pub expiry: Expiry,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Application properties in the order they were sent, names in the case they arrived in.
    pub app_properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A stored message (every column but the device id).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub seq: i64,
    pub device_generation_id: String,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub ack: String,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub app_properties: sqlx::types::Json<Vec<(String, String)>>,
    pub body: Vec<u8>,
    pub enqueued_at: DateTime<Utc>,
    pub expiry_explicit: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub state: String,
    pub lock_token: Option<uuid::Uuid>,
    pub locked_until: Option<DateTime<Utc>>,
    pub delivery_count: i32,
    pub outcome: Option<String>,
    pub outcome_at: Option<DateTime<Utc>>,
}

/// What `POST /devices/{id}/commands` answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"messageId": "5f0d3c1e-7b9a-4c2e-9f3a-2a1b0c9d8e7f", "sequenceNumber": 1,
    "enqueuedTimeUtc": "2026-11-29T10:00:00.000Z", "expiryTimeUtc": "2026-11-29T11:00:00.000Z"}))]
pub struct Enqueued {
    pub message_id: String,
    pub sequence_number: i64,
    pub enqueued_time_utc: String,
    pub expiry_time_utc: String,
}

/// A message's state and outcome, as the service API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"deviceId": "thermostat-1", "sequenceNumber": 3, "messageId": "order-17",
    "correlationId": null, "userId": null, "ack": "full", "state": "Completed", "deliveryCount": 1,
    "enqueuedTimeUtc": "2026-11-29T10:00:00.000Z", "expiryTimeUtc": "2026-11-29T11:00:00.000Z",
    "lockedUntilUtc": null, "outcome": "Success", "outcomeTimeUtc": "2026-11-29T10:00:02.125Z", "size": 12}))]
pub struct MessageStatus {
    pub device_id: String,
    pub sequence_number: i64,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    /// `none`, `positive`, `negative` or `full`.
    pub ack: String,
    /// `Enqueued`, `Invisible` (locked by a receive), `Completed`, `DeadLettered` or `Purged`.
    pub state: String,
    /// Deliveries so far (each receive counts, also when its lock ran out).
    pub delivery_count: i32,
    pub enqueued_time_utc: String,
    pub expiry_time_utc: String,
    /// While `Invisible`: when the lock runs out.
    pub locked_until_utc: Option<String>,
    /// Once ended: `Success`, `Rejected`, `Expired`, `DeliveryCountExceeded` or `Purged`.
    pub outcome: Option<String>,
    pub outcome_time_utc: Option<String>,
    /// Body bytes.
    pub size: usize,
}

impl MessageStatus {
    pub fn from_row(device_id: &str, row: MessageRow, db_now: DateTime<Utc>) -> MessageStatus {
        // A lock that ran out makes the message receivable again, whatever the row still says.
        let lock_live = row.locked_until.is_some_and(|t| t > db_now);
        let state = match row.state.as_str() {
            "enqueued" => "Enqueued",
            "invisible" if lock_live => "Invisible",
            "invisible" => "Enqueued",
            "completed" => "Completed",
            "dead_lettered" => "DeadLettered",
            _ => "Purged",
        };
        MessageStatus {
            device_id: device_id.to_string(),
            sequence_number: row.seq,
            message_id: row.message_id,
            correlation_id: row.correlation_id,
            user_id: row.user_id,
            ack: row.ack,
            state: state.to_string(),
            delivery_count: row.delivery_count,
            enqueued_time_utc: format_time(row.enqueued_at),
            expiry_time_utc: format_time(row.expires_at),
            locked_until_utc: row.locked_until.filter(|_| lock_live).map(format_time),
            outcome: row.outcome,
            outcome_time_utc: row.outcome_at.map(format_time),
            size: row.body.len(),
        }
    }
}

/// IoT Hub's purge answer (spec §4.6).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"totalMessagesPurged": 3, "deviceId": "thermostat-1", "moduleId": null}))]
pub struct PurgeResult {
    pub total_messages_purged: i64,
    pub device_id: String,
    pub module_id: Option<String>,
}

/// What a receive handed to the device.
#[derive(Debug)]
pub struct Delivery {
    pub row: MessageRow,
}

/// How a device settles a message it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Complete,
    Reject,
    Abandon,
}
