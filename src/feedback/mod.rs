//! Delivery feedback (spec §5): the records C2D outcomes produce, and the service's hub-wide feedback queue that
//! hands them out in leased batches of up to 64.

pub mod routes;
pub mod store;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Records per received batch, as IoT Hub.
pub const BATCH_SIZE: i64 = 64;

/// The media type of a feedback batch.
pub const CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// One feedback record, in IoT Hub's JSON form.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"originalMessageId": "order-17", "enqueuedTimeUtc": "2026-11-29T10:00:02.125Z",
    "statusCode": "Success", "description": "Success", "deviceId": "thermostat-1",
    "deviceGenerationId": "639001234567890123"}))]
pub struct FeedbackRecord {
    pub original_message_id: String,
    /// When the outcome happened.
    pub enqueued_time_utc: String,
    /// `Success`, `Expired`, `DeliveryCountExceeded`, `Rejected` or `Purged`.
    pub status_code: String,
    pub description: String,
    pub device_id: String,
    pub device_generation_id: String,
}
