//! Delivery feedback (spec §5): the records C2D outcomes produce, and the service's hub-wide feedback queue that
//! hands them out in leased batches of up to 64.

pub mod store;

use chrono::{DateTime, Utc};
use clap::Args;

/// Records per received batch, as IoT Hub.
pub const BATCH_SIZE: i64 = 64;

/// The feedback queue's settings (spec §4.2); clap checks each range.
#[derive(Args, Clone, Debug)]
#[group(id = "feedback_settings")]
pub struct Settings {
    /// How long a received feedback batch stays locked, in seconds (5–300).
    #[arg(id = "feedback_lock_secs", long = "feedback-lock-secs", env = "IOTHUB_FEEDBACK_LOCK_SECS",
        default_value_t = 60, value_parser = clap::value_parser!(u32).range(5..=300))]
    pub lock_secs: u32,

    /// How long feedback records, and the outcome of ended C2D messages, are kept, in seconds (1–172800, 48 h).
    #[arg(id = "feedback_ttl_secs", long = "feedback-ttl-secs", env = "IOTHUB_FEEDBACK_TTL_SECS",
        default_value_t = 3600, value_parser = clap::value_parser!(u32).range(1..=172_800))]
    pub ttl_secs: u32,

    /// Receives of one feedback batch before its records are discarded (1–100).
    #[arg(id = "feedback_max_delivery_count", long = "feedback-max-delivery-count",
        env = "IOTHUB_FEEDBACK_MAX_DELIVERY_COUNT", default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_delivery_count: u32,
}

/// One feedback record: the outcome of one C2D message whose sender asked for it.
#[derive(Debug, Clone)]
pub struct Record {
    pub original_message_id: String,
    /// When the outcome happened.
    pub created_at: DateTime<Utc>,
    /// `Success`, `Expired`, `DeliveryCountExceeded`, `Rejected` or `Purged`.
    pub status_code: String,
    pub description: String,
    pub device_id: String,
    pub device_generation_id: String,
}

/// What a feedback operation can refuse, or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("The feedback lock token is unknown, expired, or the batch was already settled")]
    LockLost,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
