//! What happens to a request before routing: IoT Hub's literal path segments match case-insensitively
//! (`deviceBound` / `devicebound`), and IoT Hub paths require a known `api-version`.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::Uri;

use super::error::{ApiError, ErrorCode};

/// The hub's routes as segment patterns: literals in their canonical case, `*` for a variable segment. A request
/// path that matches one case-insensitively (literals only) is rewritten to the canonical case.
const ROUTES: &[&str] = &[
    "devices",
    "devices/*",
    "devices/*/messages/events",
    "devices/*/messages/deviceBound",
    "devices/*/messages/deviceBound/*",
    "devices/*/messages/deviceBound/*/abandon",
    "devices/*/commands",
    "devices/*/commands/*",
    "messages/serviceBound/feedback",
    "messages/serviceBound/feedback/*",
    "messages/serviceBound/feedback/*/abandon",
    "messages/events",
    "messages/events/partitions/*",
    "messages/events/consumerGroups",
    "messages/events/consumerGroups/*",
    "messages/events/consumerGroups/*/partitions/*",
    "messages/events/consumerGroups/*/partitions/*/checkpoint",
    "messages/events/consumerGroups/*/stream",
    "statistics/devices",
    "statistics/service",
    "policies",
    "policies/*",
    "policies/*/regenerateKey",
    "$iothub/websocket",
];

/// First path segments of IoT Hub's API (and our extensions to it): these need `api-version`.
const API_ROOTS: &[&str] = &["devices", "messages", "statistics", "policies"];

/// The `api-version` values the Azure SDKs and tools send (spec §8), and the ones between them.
pub const API_VERSIONS: &[&str] = &[
    "2015-08-15-preview",
    "2016-02-03",
    "2016-11-14",
    "2017-06-30",
    "2017-11-08-preview",
    "2018-01-26",
    "2018-04-01",
    "2018-06-30",
    "2018-08-30-preview",
    "2019-03-30",
    "2019-07-01-preview",
    "2019-10-01",
    "2020-03-13",
    "2020-05-31-preview",
    "2020-06-30-preview",
    "2020-09-30",
    "2021-04-12",
    "2021-04-30",
    "2022-04-30-preview",
];

/// Rewrites the path's literal segments to their canonical case, without a trailing slash (the Node SDK lists
/// devices with `GET /devices/`).
pub fn canonical_path(path: &str) -> Option<String> {
    let trimmed = path.strip_prefix('/')?;
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    let segments: Vec<&str> = trimmed.split('/').collect();
    for route in ROUTES {
        let pattern: Vec<&str> = route.split('/').collect();
        if pattern.len() != segments.len() {
            continue;
        }
        let matches = pattern
            .iter()
            .zip(&segments)
            // A variable segment is never empty: `/feedback//` is not a lock token's route (and, taken for one,
            // would normalise to `/feedback/`, which normalises again to `/feedback`).
            .all(|(p, s)| (*p == "*" && !s.is_empty()) || p.eq_ignore_ascii_case(s));
        if matches {
            let rewritten: Vec<&str> = pattern
                .iter()
                .zip(&segments)
                .map(|(p, s)| if *p == "*" { *s } else { *p })
                .collect();
            return Some(format!("/{}", rewritten.join("/")));
        }
    }
    None
}

/// The value of `name` in a raw query string (no `+`-to-space: IoT Hub values never contain spaces).
pub fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<std::borrow::Cow<'q, str>> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        key.eq_ignore_ascii_case(name)
            .then(|| percent_encoding::percent_decode_str(value).decode_utf8_lossy())
    })
}

/// Whether the raw query has `name` as a key, with or without a value (`?reject`, `?reject=`).
pub fn query_has(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            pair.split('=')
                .next()
                .unwrap_or("")
                .eq_ignore_ascii_case(name)
        })
    })
}

pub async fn normalize(mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let is_api = API_ROOTS.iter().any(|r| r.eq_ignore_ascii_case(first));
    if is_api {
        match query_value(request.uri().query(), "api-version") {
            None => {
                return ApiError::new(
                    ErrorCode::InvalidProtocolVersion,
                    "The api-version query parameter is required",
                )
                .into_response()
            }
            Some(v) if !API_VERSIONS.contains(&v.as_ref()) => {
                return ApiError::new(
                    ErrorCode::InvalidProtocolVersion,
                    format!("api-version {v} is not supported"),
                )
                .into_response()
            }
            Some(_) => {}
        }
    }
    if let Some(canonical) = canonical_path(path) {
        if canonical != path {
            let mut parts = request.uri().clone().into_parts();
            let pq = match request.uri().query() {
                Some(q) => format!("{canonical}?{q}"),
                None => canonical,
            };
            if let Ok(pq) = pq.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = Uri::from_parts(parts) {
                    *request.uri_mut() = uri;
                }
            }
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_segments_match_in_any_case() {
        assert_eq!(
            canonical_path("/devices/My%20Dev/messages/devicebound/abc/ABANDON").as_deref(),
            Some("/devices/My%20Dev/messages/deviceBound/abc/abandon")
        );
        assert_eq!(
            canonical_path("/MESSAGES/servicebound/Feedback").as_deref(),
            Some("/messages/serviceBound/feedback")
        );
        // Variable segments keep their case: device ids are case-sensitive.
        assert_eq!(
            canonical_path("/devices/Messages").as_deref(),
            Some("/devices/Messages")
        );
        assert_eq!(canonical_path("/nothing/here"), None);
        assert_eq!(canonical_path("/devices/").as_deref(), Some("/devices"));
        assert_eq!(canonical_path("/messages/serviceBound/feedback//"), None);
    }

    #[test]
    fn query_flags_with_and_without_values() {
        assert!(query_has(Some("api-version=1&reject"), "reject"));
        assert!(query_has(Some("reject=&api-version=1"), "reject"));
        assert!(!query_has(Some("api-version=1"), "reject"));
        assert_eq!(
            query_value(Some("a=1&api-version=2021-04-12"), "api-version").as_deref(),
            Some("2021-04-12")
        );
    }
}
