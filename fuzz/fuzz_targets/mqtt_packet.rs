#![no_main]
use libfuzzer_sys::fuzz_target;

// The body is shared with the stable harness in the hub's tests (`tests/fuzz_targets.rs`).
fuzz_target!(|data: &[u8]| iothub_fuzz::mqtt_packet(data));
