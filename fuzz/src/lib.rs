//! The fuzz targets' bodies, shared by the cargo-fuzz binaries (`fuzz_targets/`, nightly) and by the stable
//! harness that runs them in every `cargo test` (`tests/fuzz_targets.rs` includes this file). Each body feeds one
//! input to the parsers that face untrusted text: it must never panic, and what the parsers accept must hold
//! together (checked by the assertions here).

use iothub::auth::sas::{self, SasToken};
use iothub::cli::client::ConnectionString;
use iothub::http::normalize::{canonical_path, query_has, query_value};

/// A key for signing checks: what a token of unknown origin is verified against.
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// An `Authorization` header: parsing never panics, and a parsed token's parts can be used.
pub fn sas_token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = SasToken::parse(text) {
        let resource = token.resource();
        let _ = token.expired(0);
        let _ = token.expired(i64::MAX);
        let _ = token.signed_by(KEY);
        let _ = sas::scope_covers(
            &resource.unwrap_or_default(),
            "hub",
            &[vec!["devices".into(), "d".into()]],
        );
    }
}

/// A connection string: parsing never panics, and a token made from one that parses is a token signed with its
/// key (when the key is base64, as the hub's are).
pub fn connection_string(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = ConnectionString::parse(text) else {
        return;
    };
    if let Ok(token) = parsed.token(60) {
        let token = SasToken::parse(&token).expect("a token the client signed parses");
        assert!(token.signed_by(&parsed.key), "signed with its own key");
    }
}

/// Paths, query strings, device ids and If-Match values: everything the hub reads from a request line and
/// headers. A path normalises to a fixed point, differing from the input in letter case only.
pub fn request_path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(canonical) = canonical_path(text) {
        assert_eq!(
            canonical_path(&canonical).as_deref(),
            Some(canonical.as_str())
        );
        assert!(
            canonical.eq_ignore_ascii_case(text.strip_suffix('/').unwrap_or(text)),
            "{text:?} became {canonical:?}"
        );
    }
    let _ = query_value(Some(text), "api-version");
    let _ = query_has(Some(text), "reject");
    let _ = text.parse::<iothub::registry::DeviceId>();
    let _ = iothub::http::wire::IfMatch::parse(text).expected_version();
    let _ = iothub::http::wire::decode_continuation(text);
}

/// An MQTT property bag (the end of a topic): parsing never panics, a parsed bag survives writing and parsing
/// again unchanged, and a bag a device sends becomes a message or a refusal, never a panic.
pub fn property_bag(data: &[u8]) {
    use iothub::mqtt::{messages, properties};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parsed) = properties::parse(text) {
        let written = properties::write(parsed.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        assert_eq!(
            properties::parse(&written).as_ref(),
            Ok(&parsed),
            "{text:?}"
        );
    }
    let caller = iothub::auth::DeviceCaller {
        device_id: "dev".parse().unwrap(),
        generation_id: "1".into(),
        credential: iothub::auth::DeviceCredential::DeviceKey,
    };
    let _ = messages::telemetry(&caller, text, data.to_vec());
}

/// Bytes from an MQTT client: the codec never panics, never takes a packet over its size bound, and whatever it
/// takes out of the buffer is one whole packet that writes back to bytes it reads again the same.
pub fn mqtt_packet(data: &[u8]) {
    use iothub::mqtt::codec;
    let mut buffer = bytes::BytesMut::from(data);
    for _ in 0..16 {
        match codec::decode(&mut buffer, 4096) {
            Ok(Some(packet)) => {
                let mut out = bytes::BytesMut::new();
                codec::encode(&packet, &mut out);
                if let Ok(Some(again)) = codec::decode(&mut out, usize::MAX) {
                    assert_eq!(again, packet);
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}
