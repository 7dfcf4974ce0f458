//! The registry's domain values: device ids, the stored device, and what a client may change.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

/// Device ids as IoT Hub allows them: 1–128 ASCII letters, digits and `- : . + % _ # * ? ! ( ) , = @ ; $ '`,
/// case-sensitive.
pub fn valid_device_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b':'
                        | b'.'
                        | b'+'
                        | b'%'
                        | b'_'
                        | b'#'
                        | b'*'
                        | b'?'
                        | b'!'
                        | b'('
                        | b')'
                        | b','
                        | b'='
                        | b'@'
                        | b';'
                        | b'$'
                        | b'\''
                )
        })
}

/// A device id that is valid by construction: parse it once where it enters the hub.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "Device id '{0}' is invalid: 1-128 ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '"
)]
pub struct InvalidDeviceId(pub String);

impl DeviceId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DeviceId {
    type Err = InvalidDeviceId;
    fn from_str(id: &str) -> Result<DeviceId, InvalidDeviceId> {
        if valid_device_id(id) {
            Ok(DeviceId(id.to_string()))
        } else {
            Err(InvalidDeviceId(id.to_string()))
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for DeviceId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for DeviceId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

crate::text_enum! {
    /// Whether a device may connect.
    pub enum Status {
        Enabled = "enabled",
        Disabled = "disabled",
    }
}

crate::text_enum! {
    /// How a device authenticates. Only `sas` devices have keys the hub checks; the others are stored for
    /// compatibility.
    pub enum AuthType {
        Sas = "sas",
        SelfSigned = "selfSigned",
        CertificateAuthority = "certificateAuthority",
        None = "none",
    }
}

/// A device identity, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceRecord {
    pub device_id: String,
    pub generation_id: String,
    pub etag_version: i64,
    pub status: Status,
    pub status_reason: Option<String>,
    pub status_updated_time: Option<DateTime<Utc>>,
    pub auth_type: AuthType,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    pub iot_edge: bool,
    pub last_activity_time: Option<DateTime<Utc>>,
    pub connection_state: super::connection::ConnectionState,
    pub connection_state_updated_time: Option<DateTime<Utc>>,
}

impl DeviceRecord {
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

/// What a client asks to set on a device; `None` keeps what the device has (or the default, on create).
#[derive(Debug, Clone, Default)]
pub struct DeviceChanges {
    pub status: Option<Status>,
    pub status_reason: Option<String>,
    pub auth_type: Option<AuthType>,
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
    pub iot_edge: Option<bool>,
}

/// Device counts.
#[derive(Debug, Clone, Copy)]
pub struct Statistics {
    pub total: i64,
    pub enabled: i64,
    pub disabled: i64,
}

#[cfg(test)]
mod tests {
    use super::valid_device_id;

    #[test]
    fn device_id_character_set() {
        assert!(valid_device_id("a-b:c.d+e%f_g#h*i?j!k(l)m,n=o@p;q$r's"));
        assert!(valid_device_id(&"x".repeat(128)));
        assert!(!valid_device_id(&"x".repeat(129)));
        assert!(!valid_device_id(""));
        assert!(!valid_device_id("a/b"));
        assert!(!valid_device_id("a b"));
        assert!(!valid_device_id("é"));
    }
}
