#![no_main]
use libfuzzer_sys::fuzz_target;

// Paths, query strings, device ids and If-Match values: everything the hub reads from a request line and headers.
fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = iothub::http::normalize::canonical_path(text);
        let _ = iothub::http::normalize::query_value(Some(text), "api-version");
        let _ = iothub::http::normalize::query_has(Some(text), "reject");
        let _ = iothub::registry::valid_device_id(text);
        let _ = iothub::http::wire::IfMatch::parse(text).expected_version();
        let _ = iothub::http::wire::decode_continuation(text);
    }
});
