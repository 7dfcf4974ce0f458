//! IoT Hub's MQTT topics for one device: what it may publish to and subscribe to.

use crate::registry::DeviceId;

/// Topic names the hub reads at most, in bytes: room for a full property bag, small enough to bound memory.
pub const MAX_TOPIC_LEN: usize = 16 * 1024;

/// Why a PUBLISH's topic is refused (the connection closes, as IoT Hub does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("the topic is longer than {MAX_TOPIC_LEN} bytes")]
    TooLong,
    #[error("the topic names another device")]
    OtherDevice,
    #[error("twin and direct method topics are not served")]
    Unsupported,
    #[error("the topic is not one IoT Hub serves")]
    Unknown,
}

/// The property bag of a telemetry PUBLISH by `device` to `devices/{id}/messages/events/{bag}`.
pub fn events_bag<'t>(device: &DeviceId, topic: &'t str) -> Result<&'t str, TopicError> {
    if topic.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong);
    }
    if topic.starts_with("$iothub/") {
        return Err(TopicError::Unsupported);
    }
    let Some(rest) = topic.strip_prefix("devices/") else {
        return Err(TopicError::Unknown);
    };
    let Some(rest) = rest
        .strip_prefix(device.as_str())
        .and_then(|r| r.strip_prefix('/'))
    else {
        return Err(TopicError::OtherDevice);
    };
    match rest.strip_prefix("messages/events") {
        Some("") => Ok(""),
        Some(bag) => bag.strip_prefix('/').ok_or(TopicError::Unknown),
        None => Err(TopicError::Unknown),
    }
}

/// A subscription a device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `devices/{id}/messages/devicebound/#`: its C2D messages.
    C2d,
    /// Twin, direct methods, another device's or any other topic: refused with SUBACK failure (0x80).
    Refused,
}

pub fn filter(device: &DeviceId, path: &str) -> Filter {
    let c2d = format!("devices/{}/messages/devicebound/#", device.as_str());
    if path == c2d {
        Filter::C2d
    } else {
        Filter::Refused
    }
}

/// The topic a C2D message is delivered on: `devices/{id}/messages/devicebound/{bag}`.
pub fn devicebound(device: &DeviceId, bag: &str) -> String {
    format!("devices/{}/messages/devicebound/{bag}", device.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_publishes_to_its_own_events_only() {
        let dev: DeviceId = "dev-1".parse().unwrap();
        assert_eq!(events_bag(&dev, "devices/dev-1/messages/events/"), Ok(""));
        assert_eq!(events_bag(&dev, "devices/dev-1/messages/events"), Ok(""));
        assert_eq!(
            events_bag(&dev, "devices/dev-1/messages/events/%24.mid=1&a=b"),
            Ok("%24.mid=1&a=b")
        );
        assert_eq!(
            events_bag(&dev, "devices/dev-2/messages/events/"),
            Err(TopicError::OtherDevice)
        );
        assert_eq!(
            events_bag(&dev, "devices/dev-10/messages/events/"),
            Err(TopicError::OtherDevice)
        );
        assert_eq!(
            events_bag(&dev, "devices/dev-1/messages/eventsX"),
            Err(TopicError::Unknown)
        );
        assert_eq!(
            events_bag(&dev, "$iothub/twin/GET/?$rid=1"),
            Err(TopicError::Unsupported)
        );
        assert_eq!(events_bag(&dev, "a/b"), Err(TopicError::Unknown));
        let long = format!(
            "devices/dev-1/messages/events/{}",
            "a".repeat(MAX_TOPIC_LEN)
        );
        assert_eq!(events_bag(&dev, &long), Err(TopicError::TooLong));
    }

    #[test]
    fn only_the_devices_c2d_filter_is_served() {
        let dev: DeviceId = "dev-1".parse().unwrap();
        assert_eq!(
            filter(&dev, "devices/dev-1/messages/devicebound/#"),
            Filter::C2d
        );
        assert_eq!(
            filter(&dev, "devices/dev-2/messages/devicebound/#"),
            Filter::Refused
        );
        assert_eq!(filter(&dev, "$iothub/twin/res/#"), Filter::Refused);
        assert_eq!(filter(&dev, "#"), Filter::Refused);
    }
}
