//! Property tests: the parsers that face untrusted input never panic, and what they accept round-trips.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use iothub::auth::sas::{self, SasToken};
use iothub::cli::client::ConnectionString;
use iothub::http::normalize::canonical_path;
use iothub::http::wire::IfMatch;
use iothub::registry::valid_device_id;
use proptest::prelude::*;

/// A key the hub could hold: random signatures must never verify under it.
const FIXED_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The OpenAPI document's IoT Hub paths (the ones whose literal segments match in any case, as IoT Hub's do).
fn documented_routes() -> Vec<String> {
    static ROUTES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ROUTES
        .get_or_init(|| {
            let doc = serde_json::to_value(iothub::http::openapi()).unwrap();
            let routes: Vec<String> = doc["paths"]
                .as_object()
                .unwrap()
                .keys()
                .filter(|p| {
                    ["/devices", "/messages", "/statistics", "/policies"]
                        .iter()
                        .any(|root| p.starts_with(root))
                })
                .cloned()
                .collect();
            assert!(routes.len() >= 20, "{routes:?}");
            routes
        })
        .clone()
}

const ID_CHARS: &str = "abcXYZ0189-:.+%_#*?!(),=@;$'";

fn device_id() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        proptest::sample::select(ID_CHARS.chars().collect::<Vec<_>>()),
        1..=128,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sas_parsing_never_panics(header in ".{0,300}") {
        let _ = SasToken::parse(&header);
        let _ = SasToken::parse(&format!("SharedAccessSignature {header}"));
    }

    #[test]
    fn sas_fields_in_any_shape_never_panic(
        sr in "[a-z%0-9/.]{0,40}", sig in "[A-Za-z0-9%+/=]{0,60}", se in "-?[0-9]{0,25}", skn in "[a-zA-Z%]{0,10}"
    ) {
        let header = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={skn}");
        if let Ok(token) = SasToken::parse(&header) {
            let _ = token.resource();
            let _ = token.expired(i64::MAX);
            let _ = token.expired(i64::MIN);
            let _ = token.signed_by(FIXED_KEY);
        }
    }

    /// The key that signed a token verifies it, and stops verifying it once any signed part changes: the resource,
    /// the expiry or one bit of the signature. (A fresh random key would refuse any token, broken check or not.)
    #[test]
    fn a_token_verifies_with_its_own_key_only_while_untampered(
        resource in "[a-z0-9./-]{1,40}",
        expiry in 0i64..4_000_000_000,
        key in proptest::collection::vec(any::<u8>(), 1..=64),
        tamper in 0usize..3,
        bit in 0usize..256,
    ) {
        let key = BASE64.encode(key);
        let token = sas::sign(&resource, &key, Some("p"), expiry).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        prop_assert!(parsed.signed_by(&key), "{token}");

        let mut tampered = SasToken::parse(&token).unwrap();
        match tamper {
            0 => tampered.resource_raw.push('x'),
            1 => tampered.expiry_raw = (expiry + 1).to_string(),
            _ => tampered.signature[(bit / 8) % 32] ^= 1 << (bit % 8),
        }
        prop_assert!(!tampered.signed_by(&key), "tamper #{tamper} of {token} still verifies");
    }

    #[test]
    fn signed_tokens_verify_only_with_their_key(id in device_id(), expiry in 0i64..4_000_000_000) {
        let key = sas::generate_key();
        let token = sas::sign(&format!("hub.example/devices/{id}"), &key, None, expiry).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        prop_assert!(parsed.signed_by(&key));
        prop_assert!(!parsed.signed_by(&sas::generate_key()));
        prop_assert_eq!(parsed.resource().unwrap(), format!("hub.example/devices/{}", id.to_lowercase()));
        prop_assert_eq!(parsed.expiry, expiry);
    }

    #[test]
    fn connection_strings_never_panic_and_round_trip(text in ".{0,200}", id in device_id()) {
        let _ = ConnectionString::parse(&text);
        // ';' separates the fields: no SDK can carry it inside a connection string's device id.
        let id = id.replace(';', "_");
        let key = sas::generate_key();
        let parsed = ConnectionString::parse(&format!("HostName=h.example;DeviceId={id};SharedAccessKey={key}")).unwrap();
        prop_assert_eq!(parsed.device_id.as_deref(), Some(id.as_str()));
        prop_assert_eq!(parsed.key, key);
    }

    #[test]
    fn device_ids_follow_iot_hubs_character_set(id in ".{0,140}") {
        let allowed = !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || ID_CHARS.contains(c));
        prop_assert_eq!(valid_device_id(&id), allowed);
    }

    #[test]
    fn path_normalisation_never_panics(path in "/[a-zA-Z0-9%/._-]{0,80}") {
        if let Some(canonical) = canonical_path(&path) {
            prop_assert_eq!(canonical_path(&canonical), Some(canonical.clone()));
        }
    }

    /// Every documented IoT Hub route, its literal segments in any case, its variable segments anything, with or
    /// without a trailing slash, normalises to the documented spelling, and normalising again changes nothing.
    #[test]
    fn every_documented_route_normalises_in_any_case_and_idempotently(
        route in proptest::sample::select(documented_routes()),
        upper in proptest::collection::vec(any::<bool>(), 8),
        variables in proptest::collection::vec("[a-zA-Z0-9%._-]{1,20}", 8),
        trailing_slash in any::<bool>(),
    ) {
        let segments: Vec<&str> = route.trim_start_matches('/').split('/').collect();
        let mut sent = String::new();
        let mut expected = String::new();
        for (i, segment) in segments.iter().enumerate() {
            let (wire, canonical) = if segment.starts_with('{') {
                (variables[i].clone(), variables[i].clone())
            } else if upper[i] {
                (segment.to_uppercase(), segment.to_string())
            } else {
                (segment.to_lowercase(), segment.to_string())
            };
            sent.push('/');
            sent.push_str(&wire);
            expected.push('/');
            expected.push_str(&canonical);
        }
        if trailing_slash {
            sent.push('/');
        }
        let canonical = canonical_path(&sent);
        prop_assert_eq!(canonical.as_deref(), Some(expected.as_str()), "{} from {}", sent, route);
        let again = canonical_path(&expected);
        prop_assert_eq!(again.as_deref(), Some(expected.as_str()));
    }

    #[test]
    fn if_match_never_panics(value in ".{0,80}") {
        let _ = IfMatch::parse(&value).expected_version();
    }
}
