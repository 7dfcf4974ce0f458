//! Cloud-to-device messaging: a durable queue per device, with locks, delivery counts, expiry, purge and the
//! outcomes that feed the service's feedback queue (spec §4, §5).
//!
//! Every state change of a message is one transaction of [`store`]; [`sweeper`] dead-letters messages whose time
//! ran out even when their device never polls again, and deletes ended messages once their retention has passed.

pub mod cli;
pub mod model;
pub mod routes;
pub mod store;
pub mod sweeper;

use std::time::Duration;

use anyhow::bail;
use clap::Args;

/// Hub-wide C2D and feedback settings (spec §4.2). Ranges are checked when the hub starts.
#[derive(Args, Clone, Debug)]
pub struct C2dSettings {
    /// How long a received C2D message stays locked (invisible to other receives), in seconds (5–300).
    #[arg(long, env = "IOTHUB_C2D_LOCK_SECS", default_value_t = 60)]
    pub c2d_lock_secs: u32,

    /// Deliveries of one C2D message before it is dead-lettered when abandoned or its lock expires (1–100).
    #[arg(long, env = "IOTHUB_C2D_MAX_DELIVERY_COUNT", default_value_t = 10)]
    pub c2d_max_delivery_count: u32,

    /// Time to live of a C2D message whose sender set none, in seconds (1 up to the maximum TTL).
    #[arg(long, env = "IOTHUB_C2D_DEFAULT_TTL_SECS", default_value_t = 3600)]
    pub c2d_default_ttl_secs: u32,

    /// Longest time to live a sender may ask for, in seconds (at most 172800, 48 h).
    #[arg(long, env = "IOTHUB_C2D_MAX_TTL_SECS", default_value_t = 172_800)]
    pub c2d_max_ttl_secs: u32,

    /// Live (not yet ended) C2D messages per device; one more is refused with 403004 (1–100000).
    #[arg(long, env = "IOTHUB_C2D_MAX_QUEUE_DEPTH", default_value_t = 50)]
    pub c2d_max_queue_depth: u32,

    /// How long a received feedback batch stays locked, in seconds (5–300).
    #[arg(long, env = "IOTHUB_FEEDBACK_LOCK_SECS", default_value_t = 60)]
    pub feedback_lock_secs: u32,

    /// How long feedback records, and the outcome of ended C2D messages, are kept, in seconds (1–172800).
    #[arg(long, env = "IOTHUB_FEEDBACK_TTL_SECS", default_value_t = 3600)]
    pub feedback_ttl_secs: u32,

    /// Receives of one feedback batch before its records are discarded (1–100).
    #[arg(long, env = "IOTHUB_FEEDBACK_MAX_DELIVERY_COUNT", default_value_t = 10)]
    pub feedback_max_delivery_count: u32,

    /// How often the expiry and clean-up task runs, in milliseconds (100–60000).
    #[arg(long, env = "IOTHUB_C2D_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    pub c2d_sweep_interval_ms: u64,
}

/// The most a sender may ask for, as IoT Hub: 48 hours.
pub const MAX_TTL_SECS: u32 = 172_800;

/// Longest long poll a receive may ask for (`wait-ms`).
pub const MAX_WAIT_MS: u64 = 30_000;

impl C2dSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        let check = |name: &str, value: u64, low: u64, high: u64| -> anyhow::Result<()> {
            if !(low..=high).contains(&value) {
                bail!("{name} must be between {low} and {high}, not {value}");
            }
            Ok(())
        };
        check("IOTHUB_C2D_LOCK_SECS", self.c2d_lock_secs.into(), 5, 300)?;
        check(
            "IOTHUB_C2D_MAX_DELIVERY_COUNT",
            self.c2d_max_delivery_count.into(),
            1,
            100,
        )?;
        check(
            "IOTHUB_C2D_MAX_TTL_SECS",
            self.c2d_max_ttl_secs.into(),
            1,
            MAX_TTL_SECS.into(),
        )?;
        check(
            "IOTHUB_C2D_DEFAULT_TTL_SECS",
            self.c2d_default_ttl_secs.into(),
            1,
            self.c2d_max_ttl_secs.into(),
        )?;
        check(
            "IOTHUB_C2D_MAX_QUEUE_DEPTH",
            self.c2d_max_queue_depth.into(),
            1,
            100_000,
        )?;
        check(
            "IOTHUB_FEEDBACK_LOCK_SECS",
            self.feedback_lock_secs.into(),
            5,
            300,
        )?;
        check(
            "IOTHUB_FEEDBACK_TTL_SECS",
            self.feedback_ttl_secs.into(),
            1,
            MAX_TTL_SECS.into(),
        )?;
        check(
            "IOTHUB_FEEDBACK_MAX_DELIVERY_COUNT",
            self.feedback_max_delivery_count.into(),
            1,
            100,
        )?;
        check(
            "IOTHUB_C2D_SWEEP_INTERVAL_MS",
            self.c2d_sweep_interval_ms,
            100,
            60_000,
        )?;
        Ok(())
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.c2d_sweep_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn defaults_are_valid_and_ranges_are_checked() {
        let config = crate::Config::with_database("postgres://unused");
        config.c2d.validate().unwrap();
        assert_eq!(config.c2d.c2d_lock_secs, 60);
        assert_eq!(config.c2d.c2d_max_queue_depth, 50);
        let mut bad = config.c2d.clone();
        bad.c2d_lock_secs = 4;
        assert!(bad.validate().is_err());
        let mut bad = config.c2d.clone();
        bad.c2d_default_ttl_secs = 7200;
        bad.c2d_max_ttl_secs = 3600;
        assert!(bad.validate().is_err());
        let mut bad = config.c2d.clone();
        bad.feedback_max_delivery_count = 101;
        assert!(bad.validate().is_err());
    }
}
