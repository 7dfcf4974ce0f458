//! Operation throttling with token buckets (spec §7): none by default — a self-hosted hub should not invent
//! limits — or IoT Hub's quotas for a tier and a number of units, so applications can be tested against IoT Hub's
//! throttling before they go to the cloud; or explicit rates per operation class, hub-wide and per device.
//!
//! A request is counted after it is authenticated (anonymous traffic cannot drain a device's bucket). Over a limit
//! the answer is 429 (429001 ThrottlingException) with `Retry-After`. Buckets live in each hub process: with several
//! processes behind a load balancer, each enforces the configured rate.

use std::num::NonZeroU32;
use std::time::Duration;

use clap::{Args, ValueEnum};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The operation classes IoT Hub throttles separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    D2cSend,
    C2dSend,
    C2dReceive,
    Registry,
}

impl Operation {
    const ALL: [Operation; 4] = [
        Operation::D2cSend,
        Operation::C2dSend,
        Operation::C2dReceive,
        Operation::Registry,
    ];
    fn index(self) -> usize {
        self as usize
    }
}

/// IoT Hub tiers; Basic and Free throttle like their Standard counterparts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tier {
    F1,
    B1,
    B2,
    B3,
    S1,
    S2,
    S3,
}

impl Tier {
    /// Operations per second for `units` units (spec §7.1).
    pub fn rate(self, operation: Operation, units: u32) -> f64 {
        let units = f64::from(units.max(1));
        let level = match self {
            Tier::F1 | Tier::B1 | Tier::S1 => 1,
            Tier::B2 | Tier::S2 => 2,
            Tier::B3 | Tier::S3 => 3,
        };
        match (operation, level) {
            (Operation::Registry, 3) => 5000.0 / 60.0 * units,
            (Operation::Registry, _) => 100.0 / 60.0 * units,
            (Operation::D2cSend, 1) => (12.0 * units).max(100.0),
            (Operation::D2cSend, 2) => 120.0 * units,
            (Operation::D2cSend, _) => 6000.0 * units,
            (Operation::C2dSend, 3) => 5000.0 / 60.0 * units,
            (Operation::C2dSend, _) => 100.0 / 60.0 * units,
            (Operation::C2dReceive, 3) => 50000.0 / 60.0 * units,
            (Operation::C2dReceive, _) => 1000.0 / 60.0 * units,
        }
    }
}

/// Throttling settings. Explicit rates override the tier's.
#[derive(Args, Debug, Clone, Default)]
pub struct ThrottleConfig {
    /// Reproduce IoT Hub's operation throttles for this tier (F1, B1-B3, S1-S3).
    #[arg(
        long = "throttle-tier",
        env = "IOTHUB_THROTTLE_TIER",
        value_enum,
        ignore_case = true
    )]
    pub tier: Option<Tier>,
    /// Units of the tier.
    #[arg(
        long = "throttle-units",
        env = "IOTHUB_THROTTLE_UNITS",
        default_value_t = 1
    )]
    pub units: u32,
    /// Hub-wide device-to-cloud sends per second.
    #[arg(long = "throttle-d2c-send", env = "IOTHUB_THROTTLE_D2C_SEND")]
    pub d2c_send: Option<f64>,
    /// Hub-wide cloud-to-device sends per second.
    #[arg(long = "throttle-c2d-send", env = "IOTHUB_THROTTLE_C2D_SEND")]
    pub c2d_send: Option<f64>,
    /// Hub-wide cloud-to-device receives (device polls) per second.
    #[arg(long = "throttle-c2d-receive", env = "IOTHUB_THROTTLE_C2D_RECEIVE")]
    pub c2d_receive: Option<f64>,
    /// Hub-wide registry operations per second.
    #[arg(long = "throttle-registry", env = "IOTHUB_THROTTLE_REGISTRY")]
    pub registry: Option<f64>,
    /// Device-to-cloud sends per second per device.
    #[arg(
        long = "throttle-device-d2c-send",
        env = "IOTHUB_THROTTLE_DEVICE_D2C_SEND"
    )]
    pub device_d2c_send: Option<f64>,
    /// Cloud-to-device sends per second to one device.
    #[arg(
        long = "throttle-device-c2d-send",
        env = "IOTHUB_THROTTLE_DEVICE_C2D_SEND"
    )]
    pub device_c2d_send: Option<f64>,
    /// Cloud-to-device receives per second per device.
    #[arg(
        long = "throttle-device-c2d-receive",
        env = "IOTHUB_THROTTLE_DEVICE_C2D_RECEIVE"
    )]
    pub device_c2d_receive: Option<f64>,
}

impl ThrottleConfig {
    fn hub_rate(&self, operation: Operation) -> Option<f64> {
        let explicit = match operation {
            Operation::D2cSend => self.d2c_send,
            Operation::C2dSend => self.c2d_send,
            Operation::C2dReceive => self.c2d_receive,
            Operation::Registry => self.registry,
        };
        explicit.or_else(|| self.tier.map(|t| t.rate(operation, self.units)))
    }

    fn device_rate(&self, operation: Operation) -> Option<f64> {
        match operation {
            Operation::D2cSend => self.device_d2c_send,
            Operation::C2dSend => self.device_c2d_send,
            Operation::C2dReceive => self.device_c2d_receive,
            Operation::Registry => None,
        }
    }
}

/// The buckets of one hub process.
pub struct Throttle {
    hub: [Option<DefaultDirectRateLimiter>; 4],
    device: [Option<DefaultKeyedRateLimiter<String>>; 4],
    /// Built once: building a clock calibrates it (a CPUID instruction, which traps in a virtual machine).
    clock: DefaultClock,
}

/// A bucket refilled at `rate` per second that holds one second's worth (at least one).
fn quota(rate: f64) -> anyhow::Result<Quota> {
    if !(rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0) {
        anyhow::bail!(
            "throttle rates are operations per second, above 0 and at most 1000000 (got {rate})"
        );
    }
    let burst = NonZeroU32::new(rate.ceil() as u32).expect("rate > 0");
    Ok(Quota::with_period(Duration::from_secs_f64(1.0 / rate))
        .expect("a positive period")
        .allow_burst(burst))
}

impl Throttle {
    pub fn new(config: &ThrottleConfig) -> anyhow::Result<Throttle> {
        let mut hub: [Option<DefaultDirectRateLimiter>; 4] = Default::default();
        let mut device: [Option<DefaultKeyedRateLimiter<String>>; 4] = Default::default();
        for op in Operation::ALL {
            if let Some(rate) = config.hub_rate(op) {
                hub[op.index()] = Some(RateLimiter::direct(quota(rate)?));
            }
            if let Some(rate) = config.device_rate(op) {
                device[op.index()] = Some(RateLimiter::keyed(quota(rate)?));
            }
        }
        Ok(Throttle {
            hub,
            device,
            clock: DefaultClock::default(),
        })
    }

    /// Takes one token for `operation` (and for `device`'s bucket); 429 with the wait when a bucket is empty.
    pub fn check(&self, operation: Operation, device: Option<&str>) -> Result<(), Throttled> {
        if let (Some(limiter), Some(device)) = (&self.device[operation.index()], device) {
            if let Err(not_until) = limiter.check_key(&device.to_string()) {
                return Err(Throttled {
                    wait: not_until.wait_time_from(self.clock.now()),
                    whose: "this device",
                });
            }
        }
        if let Some(limiter) = &self.hub[operation.index()] {
            if let Err(not_until) = limiter.check() {
                return Err(Throttled {
                    wait: not_until.wait_time_from(self.clock.now()),
                    whose: "the hub",
                });
            }
        }
        Ok(())
    }

    /// Forgets devices whose buckets are full again, so memory follows recent activity only.
    pub fn forget_idle(&self) {
        for limiter in self.device.iter().flatten() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// A request over its operation's rate: `wait` is how long until the bucket has a token again.
#[derive(Debug, thiserror::Error)]
#[error("Too many requests for {whose}; retry later")]
pub struct Throttled {
    pub wait: Duration,
    pub whose: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_throttled_by_default() {
        let throttle = Throttle::new(&ThrottleConfig::default()).unwrap();
        for _ in 0..10_000 {
            throttle.check(Operation::D2cSend, Some("d")).unwrap();
        }
    }

    #[test]
    fn tiers_reproduce_iot_hub_quotas() {
        assert_eq!(Tier::S1.rate(Operation::D2cSend, 1), 100.0);
        assert_eq!(Tier::S1.rate(Operation::D2cSend, 10), 120.0);
        assert_eq!(Tier::S2.rate(Operation::D2cSend, 2), 240.0);
        assert_eq!(Tier::S3.rate(Operation::D2cSend, 1), 6000.0);
        assert!((Tier::S1.rate(Operation::Registry, 1) - 1.6667).abs() < 0.001);
        assert!((Tier::S3.rate(Operation::C2dReceive, 1) - 833.33).abs() < 0.01);
        assert!((Tier::S2.rate(Operation::C2dSend, 3) - 5.0).abs() < 0.001);
    }

    #[test]
    fn device_buckets_are_separate_and_report_a_wait() {
        let config = ThrottleConfig {
            device_d2c_send: Some(2.0),
            ..Default::default()
        };
        let throttle = Throttle::new(&config).unwrap();
        throttle.check(Operation::D2cSend, Some("a")).unwrap();
        throttle.check(Operation::D2cSend, Some("a")).unwrap();
        let refused = throttle.check(Operation::D2cSend, Some("a")).unwrap_err();
        assert!(refused.wait <= Duration::from_secs(1));
        assert_eq!(refused.whose, "this device");
        // Another device, and another operation class, are unaffected.
        throttle.check(Operation::D2cSend, Some("b")).unwrap();
        throttle.check(Operation::C2dReceive, Some("a")).unwrap();
    }

    #[test]
    fn rates_must_be_positive() {
        for rate in [0.0, -1.0, f64::NAN] {
            let config = ThrottleConfig {
                registry: Some(rate),
                ..Default::default()
            };
            assert!(Throttle::new(&config).is_err());
        }
    }
}
