//! Property tests: the parsers that face untrusted input never panic, and what they accept round-trips.

use iothub::auth::sas::{self, SasToken};
use iothub::cli::client::ConnectionString;
use iothub::http::normalize::canonical_path;
use iothub::http::wire::IfMatch;
use iothub::registry::valid_device_id;
use proptest::prelude::*;

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
            prop_assert!(!token.signed_by(&sas::generate_key()));
        }
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
    fn path_normalisation_never_panics_and_is_idempotent(path in "/[a-zA-Z0-9%/._-]{0,80}") {
        if let Some(canonical) = canonical_path(&path) {
            prop_assert_eq!(canonical_path(&canonical), Some(canonical.clone()));
            prop_assert_eq!(canonical.to_lowercase(), path.trim_end_matches('/').to_lowercase());
        }
    }

    #[test]
    fn if_match_never_panics(value in ".{0,80}") {
        let _ = IfMatch::parse(&value).expected_version();
    }
}
