//! How a read's events carry their bodies (`body=`): as base64 only, decoded (each body in exactly one form), or
//! in every form that applies. Only the forms asked for are encoded: every body costs a base64 encoding, a UTF-8
//! check and a JSON parse when all forms are produced.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::http::error::{ApiError, ApiResult};

/// The forms of its body an event carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    /// `body` (base64) only.
    Base64,
    /// One form per event: `bodyJson` when the content type is JSON and the body parses, else `bodyText` when the
    /// content type is text (or JSON) and the body is UTF-8, else `body` (base64).
    Decoded,
    /// `body` (base64), and also `bodyJson` / `bodyText` where they apply (as `decoded` chooses them).
    #[default]
    All,
}

/// The `body` query parameter of every read (partition, consumer group, stream).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BodyQuery {
    /// How each event carries its body: `all` (`body` in base64, plus `bodyJson` / `bodyText` for JSON and text
    /// content), `base64` (`body` only) or `decoded` (`bodyJson` for JSON, `bodyText` for text, `body` in base64
    /// only for other content: every body in exactly one form).
    #[param(inline, value_type = Option<BodyFormat>, default = "all")]
    pub body: Option<String>,
}

impl BodyQuery {
    pub fn parse(&self) -> ApiResult<BodyFormat> {
        match self.body.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => Ok(BodyFormat::All),
            Some("all") => Ok(BodyFormat::All),
            Some("base64") => Ok(BodyFormat::Base64),
            Some("decoded") => Ok(BodyFormat::Decoded),
            Some(_) => Err(ApiError::invalid("body must be all, base64 or decoded")),
        }
    }
}

/// What a message's content type (`iothub-contenttype`) says its body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentKind {
    Json,
    Text,
    Other,
}

impl ContentKind {
    pub fn of(content_type: Option<&str>) -> ContentKind {
        let media = content_type
            .and_then(|c| c.split(';').next())
            .map(|c| c.trim().to_ascii_lowercase())
            .unwrap_or_default();
        if media == "application/json" || media.ends_with("+json") {
            ContentKind::Json
        } else if media.starts_with("text/") {
            ContentKind::Text
        } else {
            ContentKind::Other
        }
    }
}

/// A body in the forms asked for.
#[derive(Debug, Default, PartialEq)]
pub struct BodyForms {
    pub base64: Option<String>,
    pub json: Option<serde_json::Value>,
    pub text: Option<String>,
}

impl BodyFormat {
    /// Encodes `body` in this format's forms, and in no other.
    pub fn encode(self, kind: ContentKind, body: Vec<u8>) -> BodyForms {
        match self {
            BodyFormat::Base64 => base64_only(&body),
            BodyFormat::Decoded => decoded(kind, body),
            BodyFormat::All => {
                let base64 = Some(BASE64.encode(&body));
                let text = (kind != ContentKind::Other)
                    .then(|| String::from_utf8(body).ok())
                    .flatten();
                let json = text
                    .as_deref()
                    .filter(|_| kind == ContentKind::Json)
                    .and_then(|t| serde_json::from_str(t).ok());
                BodyForms { base64, json, text }
            }
        }
    }
}

/// The body in one form: parsed JSON, else text, else base64.
fn decoded(kind: ContentKind, body: Vec<u8>) -> BodyForms {
    if kind == ContentKind::Other {
        return base64_only(&body);
    }
    let text = match String::from_utf8(body) {
        Ok(text) => text,
        Err(not_utf8) => return base64_only(not_utf8.as_bytes()),
    };
    if kind == ContentKind::Json {
        if let Ok(json) = serde_json::from_str(&text) {
            return BodyForms {
                json: Some(json),
                ..BodyForms::default()
            };
        }
    }
    BodyForms {
        text: Some(text),
        ..BodyForms::default()
    }
}

fn base64_only(body: &[u8]) -> BodyForms {
    BodyForms {
        base64: Some(BASE64.encode(body)),
        ..BodyForms::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(body: Option<&str>) -> BodyQuery {
        BodyQuery {
            body: body.map(String::from),
        }
    }

    #[test]
    fn the_parameter_parses_once_into_a_format() {
        assert_eq!(query(None).parse().unwrap(), BodyFormat::All);
        assert_eq!(query(Some("all")).parse().unwrap(), BodyFormat::All);
        assert_eq!(query(Some("base64")).parse().unwrap(), BodyFormat::Base64);
        assert_eq!(query(Some("Decoded")).parse().unwrap(), BodyFormat::Decoded);
        for bad in ["", "json", "base 64", "all,base64"] {
            assert!(query(Some(bad)).parse().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn content_kinds() {
        assert_eq!(ContentKind::of(Some("application/json")), ContentKind::Json);
        assert_eq!(
            ContentKind::of(Some("Application/CloudEvents+JSON; charset=utf-8")),
            ContentKind::Json
        );
        assert_eq!(ContentKind::of(Some("text/plain")), ContentKind::Text);
        assert_eq!(
            ContentKind::of(Some("application/octet-stream")),
            ContentKind::Other
        );
        assert_eq!(ContentKind::of(None), ContentKind::Other);
    }

    fn forms(
        base64: Option<&[u8]>,
        json: Option<serde_json::Value>,
        text: Option<&str>,
    ) -> BodyForms {
        BodyForms {
            base64: base64.map(|b| BASE64.encode(b)),
            json,
            text: text.map(String::from),
        }
    }

    #[test]
    fn each_format_encodes_exactly_its_forms() {
        use BodyFormat::*;
        use ContentKind::*;
        let json = br#"{"t":1}"#;
        let parsed = Some(serde_json::json!({"t": 1}));
        let cases: [(ContentKind, &[u8], [BodyForms; 3]); 5] = [
            (
                Json,
                json,
                [
                    forms(Some(json), None, None),
                    forms(None, parsed.clone(), None),
                    forms(Some(json), parsed.clone(), Some(r#"{"t":1}"#)),
                ],
            ),
            // JSON content that does not parse is still text.
            (
                Json,
                b"{oops",
                [
                    forms(Some(b"{oops"), None, None),
                    forms(None, None, Some("{oops")),
                    forms(Some(b"{oops"), None, Some("{oops")),
                ],
            ),
            (
                Text,
                b"hello",
                [
                    forms(Some(b"hello"), None, None),
                    forms(None, None, Some("hello")),
                    forms(Some(b"hello"), None, Some("hello")),
                ],
            ),
            // Text content that is not UTF-8 has only its base64 form.
            (
                Text,
                &[0xff, 0xfe],
                [
                    forms(Some(&[0xff, 0xfe]), None, None),
                    forms(Some(&[0xff, 0xfe]), None, None),
                    forms(Some(&[0xff, 0xfe]), None, None),
                ],
            ),
            (
                Other,
                b"hello",
                [
                    forms(Some(b"hello"), None, None),
                    forms(Some(b"hello"), None, None),
                    forms(Some(b"hello"), None, None),
                ],
            ),
        ];
        for (kind, body, expected) in cases {
            for (format, expected) in [Base64, Decoded, All].into_iter().zip(expected) {
                assert_eq!(
                    format.encode(kind, body.to_vec()),
                    expected,
                    "{format:?} of {kind:?} {body:?}"
                );
            }
        }
    }
}
