//! Cloud-to-device messaging: a durable queue per device, with locks, delivery counts, expiry, purge and the
//! outcomes that feed the service's feedback queue (spec §4, §5).
//!
//! Every state change of a message is one transaction of [`store`]; [`sweeper`] dead-letters messages whose time
//! ran out even when their device never polls again, and deletes ended messages once their retention has passed.

pub mod model;
pub mod store;
pub mod sweeper;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::registry::DeviceId;

/// Hub-wide C2D settings (spec §4.2); clap checks each range, [`Settings::validate`] the one rule across two.
#[derive(Args, Clone, Debug)]
#[group(id = "c2d_settings")]
pub struct Settings {
    /// How long a received C2D message stays locked (invisible to other receives), in seconds (5–300).
    #[arg(id = "c2d_lock_secs", long = "c2d-lock-secs", env = "IOTHUB_C2D_LOCK_SECS", default_value_t = 60,
        value_parser = clap::value_parser!(u32).range(5..=300))]
    pub lock_secs: u32,

    /// Deliveries of one C2D message before it is dead-lettered when abandoned or its lock expires (1–100).
    #[arg(id = "c2d_max_delivery_count", long = "c2d-max-delivery-count", env = "IOTHUB_C2D_MAX_DELIVERY_COUNT",
        default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_delivery_count: u32,

    /// Time to live of a C2D message whose sender set none, in seconds (1 up to the maximum TTL).
    #[arg(long = "c2d-default-ttl-secs", env = "IOTHUB_C2D_DEFAULT_TTL_SECS", default_value_t = 3600,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_TTL_SECS)))]
    pub default_ttl_secs: u32,

    /// Longest time to live a sender may ask for, in seconds (at most 172800, 48 h).
    #[arg(long = "c2d-max-ttl-secs", env = "IOTHUB_C2D_MAX_TTL_SECS", default_value_t = MAX_TTL_SECS,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_TTL_SECS)))]
    pub max_ttl_secs: u32,

    /// Live (not yet ended) C2D messages per device; one more is refused with 403004 (1–100000).
    #[arg(long = "c2d-max-queue-depth", env = "IOTHUB_C2D_MAX_QUEUE_DEPTH", default_value_t = 50,
        value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_queue_depth: u32,

    /// How often the expiry and clean-up task runs, in milliseconds (100–60000).
    #[arg(long = "c2d-sweep-interval-ms", env = "IOTHUB_C2D_SWEEP_INTERVAL_MS", default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub sweep_interval_ms: u64,
}

/// The most a sender may ask for, as IoT Hub: 48 hours.
pub const MAX_TTL_SECS: u32 = 172_800;

impl Settings {
    /// The rule clap cannot check alone: the default TTL is within the maximum.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.default_ttl_secs > self.max_ttl_secs {
            anyhow::bail!(
                "IOTHUB_C2D_DEFAULT_TTL_SECS ({}) must not exceed IOTHUB_C2D_MAX_TTL_SECS ({})",
                self.default_ttl_secs,
                self.max_ttl_secs
            );
        }
        Ok(())
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }
}

/// What a C2D operation can refuse, or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Device {0} not registered")]
    DeviceNotFound(DeviceId),
    #[error("Device {device} already has {queued} messages queued (the maximum is {max})")]
    QueueFull {
        device: DeviceId,
        queued: i64,
        max: u32,
    },
    #[error("The expiry time must be after the enqueue time and at most {max_ttl_secs} seconds after it")]
    ExpiryOutOfRange { max_ttl_secs: u32 },
    #[error("The lock token is unknown, expired, or the message was already settled")]
    LockLost,
    #[error(
        "Device {device} has no message with sequence number {seq} (or it ended too long ago)"
    )]
    MessageNotFound { device: DeviceId, seq: i64 },
    /// A writer's queue stayed full for [`writer::QUEUE_WAIT`]: the database is behind.
    #[error("The hub is busy writing C2D messages; retry later")]
    Busy,
    #[error("The hub is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The group commit that held an enqueue failed; every enqueue in it shares the one error.
    #[error("{0}")]
    Commit(Arc<sqlx::Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        settings: super::Settings,
    }

    #[test]
    fn defaults_are_valid_and_ranges_are_checked() {
        let settings = Wrapper::parse_from(["iothub"]).settings;
        settings.validate().unwrap();
        assert_eq!(settings.lock_secs, 60);
        assert_eq!(settings.max_queue_depth, 50);
        assert!(Wrapper::try_parse_from(["iothub", "--c2d-lock-secs", "4"]).is_err());
        assert!(Wrapper::try_parse_from(["iothub", "--c2d-max-delivery-count", "101"]).is_err());
        let mut bad = settings.clone();
        bad.default_ttl_secs = 7200;
        bad.max_ttl_secs = 3600;
        assert!(bad.validate().is_err());
    }
}
