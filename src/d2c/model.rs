//! D2C messages on the wire: parsing a device's send (one message or a batch), the hub's stamps, and the event
//! representation readers get back.

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chrono::{DateTime, Utc};
use http::HeaderMap;

use crate::http::casing::RequestNames;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{DeviceCaller, DeviceCredential};
use crate::http::error::{ApiError, ApiResult};

/// IoT Hub's limit for one message and for one batch (spec §3.3).
pub const MAX_MESSAGE_SIZE: usize = 262_144;

/// The batch content type (parameters ignored).
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

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
    pub device_id: String,
    /// What the device set plus the hub's stamps (the enqueued time is added when it commits).
    pub system_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

/// Properties as a device sent them, before stamping.
#[derive(Debug, Default)]
struct Sent {
    system: BTreeMap<String, String>,
    app: BTreeMap<String, String>,
}

impl Sent {
    /// Files one property by its name: a device-settable system property, an application property, or ignored
    /// (`iothub-to`, `iothub-ack`, and anything the hub stamps itself, which a device cannot spoof).
    fn add(&mut self, name: &str, value: &str) -> ApiResult<()> {
        let lower = name.to_ascii_lowercase();
        if lower.len() > APP_PREFIX.len() && lower.starts_with(APP_PREFIX) {
            let app_name = &name[APP_PREFIX.len()..];
            if !is_token(app_name) {
                return Err(ApiError::invalid(format!(
                    "Property name '{app_name}' is invalid: names are made of HTTP token characters"
                )));
            }
            self.app.insert(app_name.to_string(), value.to_string());
        } else if lower == APP_PREFIX {
            return Err(ApiError::invalid("An application property needs a name"));
        } else if DEVICE_SYSTEM_PROPERTIES.contains(&lower.as_str()) {
            if lower == "iothub-messageid" && !valid_message_id(value) {
                return Err(ApiError::invalid(
                    "iothub-messageid must be 1-128 ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '",
                ));
            }
            self.system.insert(lower, value.to_string());
        }
        Ok(())
    }

    /// Spec §3.3: body + system-property values + application-property names and values.
    fn size(&self, body: &[u8]) -> usize {
        body.len()
            + self.system.values().map(String::len).sum::<usize>()
            + self
                .app
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    fn stamp(self, caller: &DeviceCaller, body: Vec<u8>) -> NewEvent {
        let mut system = self.system;
        system.insert(CONNECTION_DEVICE_ID.into(), caller.device_id.clone());
        system.insert(
            CONNECTION_GENERATION_ID.into(),
            caller.generation_id.clone(),
        );
        system.insert(
            CONNECTION_AUTH_METHOD.into(),
            auth_method(&caller.credential),
        );
        system.insert(MESSAGE_SOURCE.into(), "Telemetry".into());
        NewEvent {
            device_id: caller.device_id.clone(),
            system_properties: system,
            properties: self.app,
            body,
        }
    }
}

/// `iothub-connection-auth-method`: a JSON string, scope "device" for the device's own key, "hub" for a policy.
pub fn auth_method(credential: &DeviceCredential) -> String {
    let scope = match credential {
        DeviceCredential::DeviceKey => "device",
        DeviceCredential::Policy(_) => "hub",
    };
    serde_json::json!({"scope": scope, "type": "sas", "issuer": "iothub", "acceptingIpFilterRule": null})
        .to_string()
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

/// Whether a request's `Content-Type` makes it a batch.
pub fn is_batch(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE))
}

/// One message sent as the request body with its properties in headers.
pub fn parse_single(
    caller: &DeviceCaller,
    headers: &HeaderMap,
    names: &RequestNames,
    body: Vec<u8>,
) -> ApiResult<NewEvent> {
    let mut sent = Sent::default();
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in headers {
        // The client's spelling: application property names are case-sensitive.
        let occurrence = seen.iter().filter(|n| **n == name.as_str()).count();
        seen.push(name.as_str());
        let name = names.original(name.as_str(), occurrence);
        let lower_is_ours = name.starts_with("iothub-") || name == "dt-subject";
        if !lower_is_ours {
            continue;
        }
        let value = value
            .to_str()
            .map_err(|_| ApiError::invalid(format!("Header {name} is not ASCII")))?;
        sent.add(name, value)?;
    }
    if sent.size(&body) > MAX_MESSAGE_SIZE {
        return Err(ApiError::too_large(MAX_MESSAGE_SIZE));
    }
    Ok(sent.stamp(caller, body))
}

/// One element of a batch (spec §3.2).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchItem {
    /// Base64 of the payload, or the payload as a string when `base64Encoded` is false.
    pub body: String,
    /// Default true.
    #[serde(default)]
    pub base64_encoded: Option<bool>,
    /// `iothub-app-{name}` keys are application properties; system-property header names are honoured too.
    #[serde(default)]
    pub properties: Option<BTreeMap<String, String>>,
}

/// A batch: a JSON array of [`BatchItem`]; one message per element, in order.
pub fn parse_batch(caller: &DeviceCaller, body: &[u8]) -> ApiResult<Vec<NewEvent>> {
    let items: Vec<BatchItem> = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("Malformed batch: {e}")))?;
    if items.is_empty() {
        return Err(ApiError::invalid("A batch holds at least one message"));
    }
    let mut total = 0usize;
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let payload = if item.base64_encoded.unwrap_or(true) {
            BASE64.decode(item.body.trim()).map_err(|_| {
                ApiError::invalid(format!("Batch element {index}: body is not valid base64"))
            })?
        } else {
            item.body.into_bytes()
        };
        let mut sent = Sent::default();
        for (name, value) in item.properties.iter().flatten() {
            sent.add(name, value)?;
        }
        let size = sent.size(&payload);
        if size > MAX_MESSAGE_SIZE {
            return Err(ApiError::too_large(MAX_MESSAGE_SIZE));
        }
        total += size;
        if total > MAX_MESSAGE_SIZE {
            return Err(ApiError::new(
                crate::http::error::ErrorCode::MessageTooLarge,
                format!("The batch exceeds the limit of {MAX_MESSAGE_SIZE} bytes"),
            ));
        }
        events.push(sent.stamp(caller, payload));
    }
    Ok(events)
}

/// An event as readers get it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({
    "partitionId": "2", "sequenceNumber": 41, "offset": "41", "enqueuedTimeUtc": "2026-11-29T10:00:00.123Z",
    "deviceId": "thermostat-1",
    "systemProperties": {"iothub-connection-device-id": "thermostat-1", "iothub-contenttype": "application/json",
        "iothub-enqueuedtime": "2026-11-29T10:00:00.123Z", "iothub-message-source": "Telemetry"},
    "properties": {"alert": "high"}, "contentType": "application/json",
    "body": "eyJ0IjoyMS41fQ==", "bodyJson": {"t": 21.5}}))]
pub struct Event {
    pub partition_id: String,
    pub sequence_number: i64,
    /// Opaque, increasing; the sequence number as a string.
    pub offset: String,
    pub enqueued_time_utc: String,
    pub device_id: String,
    pub system_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// The body, base64.
    pub body: String,
    /// The body parsed, when the content type is JSON and it parses.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub body_json: Option<serde_json::Value>,
    /// The body as text, when the content type is text (or JSON) and it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
}

/// A stored event, as the store returns it.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub partition_id: i32,
    pub seq: i64,
    pub enqueued_at: DateTime<Utc>,
    pub device_id: String,
    pub system_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl From<StoredEvent> for Event {
    fn from(e: StoredEvent) -> Event {
        let enqueued = crate::http::wire::format_time(e.enqueued_at);
        let mut system = e.system_properties;
        system.insert(ENQUEUED_TIME.into(), enqueued.clone());
        let content_type = system.get("iothub-contenttype").cloned();
        let content_encoding = system.get("iothub-contentencoding").cloned();
        let media = content_type
            .as_deref()
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let is_json = media == "application/json" || media.ends_with("+json");
        let is_text = media.starts_with("text/") || is_json;
        let text = is_text
            .then(|| String::from_utf8(e.body.clone()).ok())
            .flatten();
        let body_json = if is_json {
            serde_json::from_slice(&e.body).ok()
        } else {
            None
        };
        Event {
            partition_id: e.partition_id.to_string(),
            sequence_number: e.seq,
            offset: e.seq.to_string(),
            enqueued_time_utc: enqueued,
            device_id: e.device_id,
            system_properties: system,
            properties: e.properties,
            content_type,
            content_encoding,
            body: BASE64.encode(&e.body),
            body_json,
            body_text: text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> DeviceCaller {
        DeviceCaller {
            device_id: "dev-1".into(),
            generation_id: "638000000000000000".into(),
            credential: DeviceCredential::DeviceKey,
        }
    }

    #[test]
    fn single_message_headers_are_filed_and_stamps_win() {
        let mut headers = HeaderMap::new();
        headers.insert("iothub-messageid", "m1".parse().unwrap());
        headers.insert("iothub-contenttype", "application/json".parse().unwrap());
        headers.insert("content-type", "application/octet-stream".parse().unwrap());
        headers.insert("iothub-app-alert", "high".parse().unwrap());
        headers.insert(
            "iothub-connection-device-id",
            "someone-else".parse().unwrap(),
        );
        headers.insert(
            "iothub-to",
            "/devices/dev-1/messages/events".parse().unwrap(),
        );
        headers.insert("dt-subject", "thermostat1".parse().unwrap());
        let event = parse_single(
            &caller(),
            &headers,
            &RequestNames::default(),
            b"{}".to_vec(),
        )
        .unwrap();
        assert_eq!(event.system_properties["iothub-messageid"], "m1");
        assert_eq!(
            event.system_properties["iothub-contenttype"],
            "application/json"
        );
        assert_eq!(event.system_properties["dt-subject"], "thermostat1");
        assert_eq!(event.system_properties[CONNECTION_DEVICE_ID], "dev-1");
        assert!(!event.system_properties.contains_key("iothub-to"));
        // hyper hands header names over in lower case.
        assert_eq!(event.properties["alert"], "high");
        let method: serde_json::Value =
            serde_json::from_str(&event.system_properties[CONNECTION_AUTH_METHOD]).unwrap();
        assert_eq!(method["scope"], "device");
    }

    #[test]
    fn batch_elements_and_size_accounting() {
        let body = serde_json::json!([
            {"body": BASE64.encode("a"), "properties": {"iothub-app-Kind": "x", "iothub-messageid": "b1"}},
            {"body": "plain", "base64Encoded": false}
        ]);
        let events = parse_batch(&caller(), body.to_string().as_bytes()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].body, b"a");
        assert_eq!(events[0].properties["Kind"], "x");
        assert_eq!(events[0].system_properties["iothub-messageid"], "b1");
        assert_eq!(events[1].body, b"plain");

        let bad_name = serde_json::json!([{"body": "", "properties": {"iothub-app-a b": "x"}}]);
        assert!(parse_batch(&caller(), bad_name.to_string().as_bytes()).is_err());
        assert!(parse_batch(&caller(), b"{not json").is_err());
        assert!(parse_batch(&caller(), b"[{\"body\": \"***\"}]").is_err());

        // Exactly at the limit: body + property name + value.
        let exact = serde_json::json!([{"body": "x".repeat(MAX_MESSAGE_SIZE - 5), "base64Encoded": false,
            "properties": {"iothub-app-k": "1234"}}]);
        assert!(parse_batch(&caller(), exact.to_string().as_bytes()).is_ok());
        let over = serde_json::json!([{"body": "x".repeat(MAX_MESSAGE_SIZE - 4), "base64Encoded": false,
            "properties": {"iothub-app-k": "1234"}}]);
        let error = parse_batch(&caller(), over.to_string().as_bytes()).unwrap_err();
        assert_eq!(error.code, crate::http::error::ErrorCode::MessageTooLarge);
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
