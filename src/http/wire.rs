//! Wire formats shared by every route: dates, etags, continuation tokens.

use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD};
use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};

/// RFC 3339 UTC with milliseconds, the hub's one date format on the wire.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// IoT Hub's "never" in registry records.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

pub fn format_optional_time(t: Option<DateTime<Utc>>) -> String {
    t.map(format_time).unwrap_or_else(|| ZERO_TIME.to_string())
}

/// IoT Hub's etag form: base64 of a decimal counter (`OTg0MjI1NzE1` = "984225715").
pub fn etag(version: i64) -> String {
    BASE64.encode(version.to_string())
}

/// What an `If-Match` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    Any,
    /// The version named by the etag; `None` when the etag is not one this hub issued (it matches nothing).
    Version(Option<i64>),
}

impl IfMatch {
    pub fn parse(header: &str) -> IfMatch {
        let value = header.trim();
        let value = value.strip_prefix("W/").unwrap_or(value);
        let value = value.trim_matches('"');
        if value == "*" {
            return IfMatch::Any;
        }
        let version = BASE64
            .decode(value)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<i64>().ok());
        IfMatch::Version(version)
    }

    /// The version a store should compare against: `None` for "any", `Some(-1)` for an etag that matches nothing.
    pub fn expected_version(&self) -> Option<i64> {
        match self {
            IfMatch::Any => None,
            IfMatch::Version(v) => Some(v.unwrap_or(-1)),
        }
    }
}

/// The path of a device's resources, its id percent-encoded: the one place a device URL is built.
pub fn device_path(device_id: &str) -> String {
    format!("/devices/{}", crate::auth::sas::encode_component(device_id))
}

/// An opaque continuation token over a string key.
pub fn encode_continuation(key: &str) -> String {
    URL_SAFE_NO_PAD.encode(key)
}

pub fn decode_continuation(token: &str) -> Option<String> {
    // Lossy: any well-formed token is a position to continue from, even one this hub did not issue — but not one
    // holding NUL, which no key has and PostgreSQL text cannot hold.
    URL_SAFE_NO_PAD
        .decode(token.trim())
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .filter(|key| !key.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_round_trip_through_if_match() {
        assert_eq!(etag(984225715), "OTg0MjI1NzE1");
        assert_eq!(
            IfMatch::parse("\"OTg0MjI1NzE1\""),
            IfMatch::Version(Some(984225715))
        );
        assert_eq!(
            IfMatch::parse("W/\"OTg0MjI1NzE1\""),
            IfMatch::Version(Some(984225715))
        );
        assert_eq!(IfMatch::parse("\"*\""), IfMatch::Any);
        assert_eq!(IfMatch::parse("*"), IfMatch::Any);
        assert_eq!(IfMatch::parse("\"garbage\"").expected_version(), Some(-1));
    }

    #[test]
    fn times_have_milliseconds_and_z() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678901Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_time(t), "2026-01-02T03:04:05.678Z");
    }
}
