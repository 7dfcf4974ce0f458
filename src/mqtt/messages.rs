//! Messages between the core and MQTT's wire form: a telemetry PUBLISH's bag and payload become a
//! [`NewEvent`] (through the same [`Properties`] as HTTPS), and a C2D message becomes its devicebound topic.

use chrono::SecondsFormat;

use super::properties::{self, BagError};
use super::topic::{self, TopicError};
use crate::auth::DeviceCaller;
use crate::c2d::model::MessageRow;
use crate::d2c::model::{NewEvent, Properties, Sender, APP_PREFIX};

/// System properties of a telemetry bag, and the names the core files them under.
const SYSTEM: &[(&str, &str)] = &[
    ("$.mid", "iothub-messageid"),
    ("$.cid", "iothub-correlationid"),
    ("$.uid", "iothub-userid"),
    ("$.ct", "iothub-contenttype"),
    ("$.ce", "iothub-contentencoding"),
    ("$.ctime", "iothub-creationtimeutc"),
    ("$.exp", "iothub-expiry"),
    ("$.schema", "iothub-messageschema"),
    ("$.ifid", "iothub-interface-id"),
    ("$.sub", "dt-subject"),
];

/// Why a telemetry PUBLISH is not a message.
#[derive(Debug, thiserror::Error)]
pub enum Invalid {
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error(transparent)]
    Bag(#[from] BagError),
    #[error(transparent)]
    Message(#[from] crate::d2c::Error),
}

/// The telemetry message a device sent with property bag `bag`, stamped as HTTPS stamps it.
pub fn telemetry(caller: &DeviceCaller, bag: &str, payload: Vec<u8>) -> Result<NewEvent, Invalid> {
    let mut sent = Properties::default();
    for (name, value) in properties::parse(bag)? {
        match SYSTEM.iter().find(|(short, _)| *short == name) {
            Some((_, core_name)) => sent.add(core_name, &value)?,
            // `$.to` and other system names a device cannot set are dropped, as over HTTPS.
            None if name.starts_with("$.") => {}
            None => sent.add(&format!("{APP_PREFIX}{name}"), &value)?,
        }
    }
    Ok(sent.into_event(&Sender::of(caller), payload)?)
}

/// A CONNECT's last will, as the telemetry message IoT Hub makes of it when the device drops: published to the
/// device's own events topic, marked with the application property `iothub-MessageType: Will`.
pub fn will(
    caller: &DeviceCaller,
    will_topic: &str,
    payload: Vec<u8>,
) -> Result<NewEvent, Invalid> {
    let bag = topic::events_bag(&caller.device_id, will_topic)?;
    let mut event = telemetry(caller, bag, payload)?;
    event
        .properties
        .insert("iothub-MessageType".into(), "Will".into());
    Ok(event)
}

/// The topic that delivers `message` to `device`: its properties as the SDKs read them.
pub fn devicebound_topic(device: &crate::registry::DeviceId, message: &MessageRow) -> String {
    let to = format!("/devices/{}/messages/devicebound", device.as_str());
    let expiry = message
        .expiry_explicit
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true));
    let mut bag: Vec<(&str, &str)> = vec![("$.mid", &message.message_id)];
    let optional = [
        ("$.cid", message.correlation_id.as_deref()),
        ("$.uid", message.user_id.as_deref()),
        ("$.to", Some(to.as_str())),
        ("$.ct", message.content_type.as_deref()),
        ("$.ce", message.content_encoding.as_deref()),
        ("$.exp", expiry.as_deref()),
        ("iothub-ack", Some(message.ack.as_str())),
    ];
    bag.extend(optional.iter().filter_map(|(n, v)| v.map(|v| (*n, v))));
    bag.extend(
        message
            .app_properties
            .0
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str())),
    );
    topic::devicebound(device, &properties::write(bag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::DeviceCredential;

    fn caller() -> DeviceCaller {
        DeviceCaller {
            device_id: "dev".parse().unwrap(),
            generation_id: "1".into(),
            credential: DeviceCredential::DeviceKey,
        }
    }

    #[test]
    fn files_system_and_application_properties() {
        let bag = "%24.mid=m1&%24.ct=application%2Fjson&%24.to=x&%24.nope=y&alert=high";
        let event = telemetry(&caller(), bag, b"{}".to_vec()).unwrap();
        assert_eq!(event.system_properties["iothub-messageid"], "m1");
        assert_eq!(
            event.system_properties["iothub-contenttype"],
            "application/json"
        );
        assert_eq!(event.sender.device_id, "dev");
        assert!(!event.system_properties.contains_key("iothub-to"));
        assert_eq!(event.properties.len(), 1);
        assert_eq!(event.properties["alert"], "high");
        assert!(telemetry(&caller(), "bad%20name=1", vec![]).is_err());
        assert!(telemetry(&caller(), "%24.mid=%2F%2F", vec![]).is_err());
    }
}
