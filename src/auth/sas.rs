//! Shared access signature tokens (spec §2.4): parsing, signing and verifying.
//!
//! `SharedAccessSignature sr=<resource>&sig=<signature>&se=<expiry>[&skn=<policy>]`, fields in any order. The
//! signature is HMAC-SHA256 over the `sr` value exactly as it appears in the token, a newline and `se`, keyed with
//! the base64-decoded key. Verification compares in constant time.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Clock skew tolerated on a token's expiry.
pub const EXPIRY_SKEW_SECS: i64 = 300;

/// What `encodeURIComponent` leaves alone; the rest is percent-encoded (as the SDKs do for `sr` and `sig`).
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, URI_COMPONENT).to_string()
}

/// A parsed token. `resource` and `expiry` keep the text the client signed.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    pub resource_raw: String,
    pub signature: Vec<u8>,
    pub expiry_raw: String,
    pub expiry: i64,
    pub key_name: Option<String>,
}

impl std::fmt::Debug for SasToken {
    // The signature is a bearer credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource_raw)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("the Authorization header is not a SharedAccessSignature")]
    NotSas,
    #[error("the token has no {0} field")]
    Missing(&'static str),
    #[error("the token has a malformed {0} field")]
    Malformed(&'static str),
    #[error("the token has the field {0} twice")]
    Duplicate(&'static str),
}

impl SasToken {
    pub fn parse(header: &str) -> Result<SasToken, SasError> {
        let header = header.trim();
        let (scheme, rest) = header
            .split_once(char::is_whitespace)
            .ok_or(SasError::NotSas)?;
        if scheme != "SharedAccessSignature" {
            return Err(SasError::NotSas);
        }
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in rest.trim().split('&') {
            let (key, value) = field.split_once('=').ok_or(SasError::Malformed("field"))?;
            let slot = match key.to_ascii_lowercase().as_str() {
                "sr" => (&mut sr, "sr"),
                "sig" => (&mut sig, "sig"),
                "se" => (&mut se, "se"),
                "skn" => (&mut skn, "skn"),
                _ => continue,
            };
            if slot.0.is_some() {
                return Err(SasError::Duplicate(slot.1));
            }
            *slot.0 = Some(value);
        }
        let resource_raw = sr.ok_or(SasError::Missing("sr"))?;
        let sig = sig.ok_or(SasError::Missing("sig"))?;
        let expiry_raw = se.ok_or(SasError::Missing("se"))?;
        let expiry = expiry_raw
            .parse::<i64>()
            .map_err(|_| SasError::Malformed("se"))?;
        // A literal '+' in sig is a base64 '+', not a space: decode percent escapes only.
        let sig_text = percent_decode_str(sig)
            .decode_utf8()
            .map_err(|_| SasError::Malformed("sig"))?;
        let signature = BASE64
            .decode(sig_text.as_bytes())
            .map_err(|_| SasError::Malformed("sig"))?;
        let key_name = match skn {
            Some(name) => Some(
                percent_decode_str(name)
                    .decode_utf8()
                    .map_err(|_| SasError::Malformed("skn"))?
                    .into_owned(),
            ),
            None => None,
        };
        if key_name.as_deref() == Some("") {
            return Err(SasError::Malformed("skn"));
        }
        Ok(SasToken {
            resource_raw: resource_raw.to_string(),
            signature,
            expiry_raw: expiry_raw.to_string(),
            expiry,
            key_name,
        })
    }

    /// Whether `key` (base64) signed this token. Constant-time in the signature.
    pub fn signed_by(&self, key_base64: &str) -> bool {
        let Ok(key) = BASE64.decode(key_base64) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length");
        mac.update(self.resource_raw.as_bytes());
        mac.update(b"\n");
        mac.update(self.expiry_raw.as_bytes());
        mac.verify_slice(&self.signature).is_ok()
    }

    pub fn expired(&self, now_unix: i64) -> bool {
        self.expiry + EXPIRY_SKEW_SECS < now_unix
    }

    /// The resource, percent-decoded once and lower-cased, as scopes are compared.
    pub fn resource(&self) -> Option<String> {
        percent_decode_str(&self.resource_raw)
            .decode_utf8()
            .ok()
            .map(|s| s.to_lowercase())
    }
}

/// Signs a token for `resource` (unencoded, e.g. `myhub/devices/d1`) the way the SDKs do.
pub fn sign(
    resource: &str,
    key_base64: &str,
    key_name: Option<&str>,
    expiry: i64,
) -> anyhow::Result<String> {
    let key = BASE64
        .decode(key_base64)
        .map_err(|_| anyhow::anyhow!("the key is not base64"))?;
    let sr = encode_component(resource);
    let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length");
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(expiry.to_string().as_bytes());
    let sig = encode_component(&BASE64.encode(mac.finalize().into_bytes()));
    let mut token = format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}");
    if let Some(name) = key_name {
        token.push_str("&skn=");
        token.push_str(&encode_component(name));
    }
    Ok(token)
}

/// Whether a token for resource `scope` (decoded, lower-cased) may act on `target`: the host must be the hub's
/// (with or without a port), and the rest of the scope a segment-wise prefix of the target's path segments.
/// `target` is given as alternatives (a device id raw or percent-encoded, since the C# SDK encodes it twice).
pub fn scope_covers(scope: &str, hostname: &str, target_alternatives: &[Vec<String>]) -> bool {
    let mut segments = scope.trim_end_matches('/').split('/');
    let host = segments.next().unwrap_or("");
    if !host_matches(host, hostname) {
        return false;
    }
    let scope_rest: Vec<&str> = segments.collect();
    target_alternatives.iter().any(|target| {
        scope_rest.len() <= target.len()
            && scope_rest
                .iter()
                .zip(target.iter())
                .all(|(s, t)| *s == t.to_lowercase())
    })
}

fn host_matches(token_host: &str, hostname: &str) -> bool {
    let strip_port = |h: &str| -> String {
        let h = h.to_ascii_lowercase();
        match h.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name.to_string(),
            _ => h,
        }
    };
    !token_host.is_empty() && strip_port(token_host) == strip_port(hostname)
}

pub use crate::keys::{generate_key, valid_key};

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn signs_and_verifies_round_trip() {
        let token = sign("myhub.example/devices/d1", KEY, None, 2_000_000_000).unwrap();
        let parsed = SasToken::parse(&token).unwrap();
        assert!(parsed.signed_by(KEY));
        assert!(!parsed.signed_by(&generate_key()));
        assert_eq!(parsed.resource().unwrap(), "myhub.example/devices/d1");
        assert_eq!(parsed.key_name, None);
    }

    #[test]
    fn any_field_order_and_policy_name() {
        let token = sign("h", KEY, Some("service"), 5).unwrap();
        let body = token.strip_prefix("SharedAccessSignature ").unwrap();
        let mut fields: Vec<&str> = body.split('&').collect();
        fields.reverse();
        let reordered = format!("SharedAccessSignature {}", fields.join("&"));
        let parsed = SasToken::parse(&reordered).unwrap();
        assert_eq!(parsed.key_name.as_deref(), Some("service"));
        assert!(parsed.signed_by(KEY));
    }

    #[test]
    fn signature_covers_the_raw_resource_text() {
        // Same resource with %2F instead of %2f: a different signed string, so a different signature.
        let token = sign("h/devices/d1", KEY, None, 5).unwrap();
        let altered = token.replace("%2F", "%2f");
        assert_ne!(token, altered);
        let parsed = SasToken::parse(&altered).unwrap();
        assert!(!parsed.signed_by(KEY));
    }

    #[test]
    fn rejects_malformed_tokens() {
        assert_eq!(SasToken::parse("Bearer x"), Err(SasError::NotSas));
        assert_eq!(
            SasToken::parse("SharedAccessSignature sig=abc&se=1"),
            Err(SasError::Missing("sr"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=abc&se=soon"),
            Err(SasError::Malformed("se"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=@@@&se=1"),
            Err(SasError::Malformed("sig"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sr=b&sig=abc&se=1"),
            Err(SasError::Duplicate("sr"))
        );
    }

    #[test]
    fn expiry_allows_five_minutes_of_skew() {
        let token = SasToken::parse(&sign("h", KEY, None, 1000).unwrap()).unwrap();
        assert!(!token.expired(1000 + EXPIRY_SKEW_SECS));
        assert!(token.expired(1001 + EXPIRY_SKEW_SECS));
    }

    #[test]
    fn scopes_are_segment_prefixes() {
        let target = vec![vec![
            "devices".to_string(),
            "ab".to_string(),
            "messages".to_string(),
        ]];
        assert!(scope_covers("hub", "hub", &target));
        assert!(scope_covers("hub:443/devices", "HUB", &target));
        assert!(scope_covers("hub/devices/ab", "hub", &target));
        assert!(!scope_covers("hub/devices/a", "hub", &target));
        assert!(!scope_covers("other/devices/ab", "hub", &target));
        assert!(!scope_covers(
            "hub/devices/ab/messages/events/x",
            "hub",
            &target
        ));
    }

    #[test]
    fn keys_must_be_base64_of_16_to_64_bytes() {
        assert!(valid_key(KEY));
        assert!(valid_key(&generate_key()));
        assert!(!valid_key("short"));
        assert!(!valid_key(&BASE64.encode([0u8; 8])));
        assert!(!valid_key(&BASE64.encode([0u8; 65])));
    }
}
