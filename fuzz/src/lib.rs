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
