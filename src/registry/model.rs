//! The device identity as IoT Hub writes it on the wire (spec §2.1), and what clients may send.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::http::wire;

/// A device identity, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceRecord {
    pub device_id: String,
    pub generation_id: String,
    pub etag_version: i64,
    pub status: String,
    pub status_reason: Option<String>,
    pub status_updated_time: Option<DateTime<Utc>>,
    pub auth_type: String,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    pub iot_edge: bool,
    pub last_activity_time: Option<DateTime<Utc>>,
    pub c2d_message_count: i64,
}

impl DeviceRecord {
    pub fn etag(&self) -> String {
        wire::etag(self.etag_version)
    }

    /// The device's connection string with its primary key (for `iothub device create` and the docs).
    pub fn connection_string(&self, hostname: &str) -> Option<String> {
        self.primary_key.as_ref().map(|key| {
            format!(
                "HostName={hostname};DeviceId={};SharedAccessKey={key}",
                self.device_id
            )
        })
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    #[serde(default)]
    pub primary_key: Option<String>,
    #[serde(default)]
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(default)]
    pub symmetric_key: Option<SymmetricKey>,
    #[serde(default)]
    pub x509_thumbprint: Option<X509Thumbprint>,
    /// `sas` (default), `selfSigned`, `certificateAuthority` or `none`.
    #[serde(rename = "type", default)]
    pub auth_type: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

/// A device identity on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({
    "deviceId": "thermostat-1", "generationId": "639002304000000000", "etag": "MTIzNDU2Nzg5",
    "connectionState": "Disconnected", "status": "enabled", "statusReason": null,
    "connectionStateUpdatedTime": "0001-01-01T00:00:00Z", "statusUpdatedTime": "0001-01-01T00:00:00Z",
    "lastActivityTime": "0001-01-01T00:00:00Z", "cloudToDeviceMessageCount": 0,
    "authentication": {"symmetricKey": {"primaryKey": "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm8=",
        "secondaryKey": "YmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmE="},
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}, "type": "sas"},
    "capabilities": {"iotEdge": false}
}))]
pub struct Device {
    pub device_id: String,
    pub generation_id: String,
    pub etag: String,
    /// Always `Disconnected`: only MQTT and AMQP connections move it, and this hub speaks HTTPS.
    pub connection_state: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub connection_state_updated_time: String,
    pub status_updated_time: String,
    pub last_activity_time: String,
    pub cloud_to_device_message_count: i64,
    pub authentication: Authentication,
    pub capabilities: Capabilities,
}

impl From<DeviceRecord> for Device {
    fn from(r: DeviceRecord) -> Device {
        Device {
            etag: r.etag(),
            device_id: r.device_id,
            generation_id: r.generation_id,
            connection_state: "Disconnected".into(),
            status: r.status,
            status_reason: r.status_reason,
            connection_state_updated_time: wire::ZERO_TIME.into(),
            status_updated_time: wire::format_optional_time(r.status_updated_time),
            last_activity_time: wire::format_optional_time(r.last_activity_time),
            cloud_to_device_message_count: r.c2d_message_count,
            authentication: Authentication {
                symmetric_key: Some(SymmetricKey {
                    primary_key: r.primary_key,
                    secondary_key: r.secondary_key,
                }),
                x509_thumbprint: Some(X509Thumbprint {
                    primary_thumbprint: r.primary_thumbprint,
                    secondary_thumbprint: r.secondary_thumbprint,
                }),
                auth_type: Some(r.auth_type),
            },
            capabilities: Capabilities {
                iot_edge: r.iot_edge,
            },
        }
    }
}

/// What a client sends to create or update a device. Read-only fields (`generationId`, times, counts) are
/// ignored; `etag` in the body is ignored too (the `If-Match` header decides).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInput {
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub authentication: Option<Authentication>,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub etag: Option<String>,
}

/// `GET /statistics/devices`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatistics {
    pub total_device_count: i64,
    pub enabled_device_count: i64,
    pub disabled_device_count: i64,
}

/// `GET /statistics/service`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatistics {
    /// Devices with an open MQTT or AMQP connection: always 0 on this HTTPS-only hub.
    pub connected_device_count: i64,
}

/// One entry of a bulk registry request (`POST /devices`), as the SDKs send it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportImportDevice {
    pub id: String,
    #[serde(default, rename = "eTag")]
    pub etag: Option<String>,
    /// `create`, `createOrUpdate`, `update`, `updateIfMatchETag`, `delete` or `deleteIfMatchETag`
    /// (case-insensitive).
    pub import_mode: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub authentication: Option<Authentication>,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistryOperationError {
    pub device_id: String,
    pub error_code: String,
    pub error_status: String,
}

/// The answer to a bulk registry request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkRegistryOperationResult {
    pub is_successful: bool,
    pub errors: Vec<DeviceRegistryOperationError>,
    pub warnings: Vec<DeviceRegistryOperationError>,
}
