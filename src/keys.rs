//! Symmetric keys, as devices and shared access policies hold them: base64 of random bytes.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

/// A new random 32-byte key, base64, as IoT Hub generates them.
pub fn generate_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    BASE64.encode(bytes)
}

/// Checks a key supplied by a client: base64 of 16 to 64 bytes (the C# SDK's rule).
pub fn valid_key(key: &str) -> bool {
    matches!(BASE64.decode(key), Ok(bytes) if (16..=64).contains(&bytes.len()))
}
