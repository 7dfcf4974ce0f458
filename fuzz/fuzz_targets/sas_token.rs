#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = iothub::auth::sas::SasToken::parse(text) {
            let _ = token.resource();
            let _ = token.expired(0);
            let _ = token.signed_by("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
            let _ = iothub::auth::sas::scope_covers(&token.resource().unwrap_or_default(), "hub", &[vec!["devices".into(), "d".into()]]);
        }
    }
});
