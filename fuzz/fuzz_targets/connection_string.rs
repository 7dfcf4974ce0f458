#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(parsed) = iothub::cli::client::ConnectionString::parse(text) {
            let _ = parsed.token(60);
        }
    }
});
