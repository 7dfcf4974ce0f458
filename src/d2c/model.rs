//! D2C messages as the core knows them: the properties a device may set, the hub's stamps, and stored events.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Error, Result};
use crate::auth::{DeviceCaller, DeviceCredential};

/// IoT Hub's limit for one message and for one batch (spec §3.3).
pub const MAX_MESSAGE_SIZE: usize = 262_144;

pub const APP_PREFIX: &str = "iothub-app-";

/// System properties a device may set, under their header names (spec §3.1).
const DEVICE_SYSTEM_PROPERTIES: &[&str] = &[
    "iothub-messageid",
    "iothub-correlationid",
    "iothub-userid",
    "iothub-contenttype",
    "iothub-contentencoding",
    "iothub-creationtimeutc",
    "iothub-expiry",
    "iothub-messageschema",
    "iothub-interface-id",
    "dt-subject",
];

pub const CONNECTION_DEVICE_ID: &str = "iothub-connection-device-id";
pub const CONNECTION_GENERATION_ID: &str = "iothub-connection-auth-generation-id";
pub const CONNECTION_AUTH_METHOD: &str = "iothub-connection-auth-method";
pub const MESSAGE_SOURCE: &str = "iothub-message-source";
pub const ENQUEUED_TIME: &str = "iothub-enqueuedtime";

/// A message ready to be appended to its partition.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Who sent it: the hub's stamps, shared by the messages of one request.
    pub sender: Arc<Sender>,
    /// The system properties the device set (the stamps are added when the event is read).
    pub system_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

crate::text_enum! {
    /// Whose key signed the sender's token: the device's own, or a shared access policy's (the scope of
    /// `iothub-connection-auth-method`).
    pub enum AuthScope {
        Device = "device",
        Hub = "hub",
    }
}

impl AuthScope {
    pub fn of(credential: &DeviceCredential) -> AuthScope {
        match credential {
            DeviceCredential::DeviceKey => AuthScope::Device,
            DeviceCredential::Policy(_) => AuthScope::Hub,
        }
    }

    /// `iothub-connection-auth-method`: the JSON IoT Hub writes, as a string. Written out rather than built per
    /// message: every message carries one.
    pub fn auth_method(self) -> &'static str {
        match self {
            AuthScope::Device => {
                r#"{"acceptingIpFilterRule":null,"issuer":"iothub","scope":"device","type":"sas"}"#
            }
            AuthScope::Hub => {
                r#"{"acceptingIpFilterRule":null,"issuer":"iothub","scope":"hub","type":"sas"}"#
            }
        }
    }
}

/// What the hub stamps on every message of one sender. Stored as columns of their own rather than among the
/// system properties: as JSON they were most of a row, the same for every message of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub device_id: String,
    pub generation_id: String,
    pub scope: AuthScope,
}

impl Sender {
    pub fn of(caller: &DeviceCaller) -> Arc<Sender> {
        Arc::new(Sender {
            device_id: caller.device_id.to_string(),
            generation_id: caller.generation_id.clone(),
            scope: AuthScope::of(&caller.credential),
        })
    }

    /// Adds the stamps to a stored event's system properties, over anything under their names.
    pub fn stamp(&self, system: &mut BTreeMap<String, String>) {
        system.insert(CONNECTION_DEVICE_ID.into(), self.device_id.clone());
        system.insert(CONNECTION_GENERATION_ID.into(), self.generation_id.clone());
        system.insert(
            CONNECTION_AUTH_METHOD.into(),
            self.scope.auth_method().into(),
        );
        system.insert(MESSAGE_SOURCE.into(), "Telemetry".into());
    }
}

/// Properties as a device sent them, before stamping: what every transport fills, one property at a time.
#[derive(Debug, Default)]
pub struct Properties {
    system: BTreeMap<String, String>,
    app: BTreeMap<String, String>,
}

impl Properties {
    /// Files one property by its name: a device-settable system property, an application property, or ignored
    /// (`iothub-to`, `iothub-ack`, and anything the hub stamps itself, which a device cannot spoof).
    pub fn add(&mut self, name: &str, value: &str) -> Result<()> {
        // JSON can carry NUL (`\u0000`); PostgreSQL's jsonb cannot store it.
        if value.contains('\0') {
            return Err(Error::InvalidMessage(format!(
                "Property '{name}' holds a NUL character"
            )));
        }
        // Prefixes and system names in any case; compared in place, as every property of every message passes here.
        if let Some(app_name) = strip_prefix_ignoring_case(name, APP_PREFIX) {
            if app_name.is_empty() {
                return Err(Error::InvalidMessage(
                    "An application property needs a name".into(),
                ));
            }
            if !is_token(app_name) {
                return Err(Error::InvalidMessage(format!(
                    "Property name '{app_name}' is invalid: names are made of HTTP token characters"
                )));
            }
            self.app.insert(app_name.to_string(), value.to_string());
        } else if let Some(system) = DEVICE_SYSTEM_PROPERTIES
            .iter()
            .find(|known| known.eq_ignore_ascii_case(name))
        {
            if *system == "iothub-messageid" && !valid_message_id(value) {
                return Err(Error::InvalidMessage(
                    "iothub-messageid must be 1-128 ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '"
                        .into(),
                ));
            }
            self.system.insert((*system).to_string(), value.to_string());
        }
        Ok(())
    }

    /// Spec §3.3: body + system-property values + application-property names and values.
    pub fn size(&self, body: &[u8]) -> usize {
        body.len()
            + self.system.values().map(String::len).sum::<usize>()
            + self
                .app
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// The message from `sender`; refused when it is over [`MAX_MESSAGE_SIZE`]. The device cannot set the stamps'
    /// names: [`Properties::add`] ignores them.
    pub fn into_event(self, sender: &Arc<Sender>, body: Vec<u8>) -> Result<NewEvent> {
        if self.size(&body) > MAX_MESSAGE_SIZE {
            return Err(Error::TooLarge {
                limit: MAX_MESSAGE_SIZE,
            });
        }
        Ok(NewEvent {
            sender: sender.clone(),
            system_properties: self.system,
            properties: self.app,
            body,
        })
    }
}

/// `name` without `prefix`, when it starts with it in any case.
fn strip_prefix_ignoring_case<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let head = name.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &name[prefix.len()..])
}

/// HTTP token characters (RFC 9110), the names IoT Hub allows for properties.
pub fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn valid_message_id(id: &str) -> bool {
    // The same character set as device ids.
    crate::registry::valid_device_id(id)
}

/// A stored event, as the store returns it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub partition_id: i32,
    pub seq: i64,
    pub enqueued_at: DateTime<Utc>,
    pub device_id: String,
    /// What the device set plus the hub's stamps (all but the enqueued time, which is `enqueued_at`).
    pub system_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_method_is_the_json_iot_hub_writes() {
        for (credential, scope) in [
            (DeviceCredential::DeviceKey, "device"),
            (DeviceCredential::Policy("registryReadWrite".into()), "hub"),
        ] {
            let written: serde_json::Value =
                serde_json::from_str(AuthScope::of(&credential).auth_method()).unwrap();
            assert_eq!(
                written,
                serde_json::json!({"scope": scope, "type": "sas", "issuer": "iothub", "acceptingIpFilterRule": null})
            );
        }
    }

    #[test]
    fn token_characters() {
        assert!(is_token("a-b_c.d~e!#$%&'*+^`|"));
        assert!(!is_token(""));
        assert!(!is_token("a b"));
        assert!(!is_token("a:b"));
        assert!(!is_token("é"));
    }
}
