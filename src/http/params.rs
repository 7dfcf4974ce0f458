//! Query parameters every route reads the same way, each parsed once into a type: the long-poll wait, the page
//! size, and continuation tokens (with the page answer that hands the next one out).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::{ApiError, ApiResult};
use super::wire;

/// Longest long poll a request may ask for (`wait-ms`).
pub const MAX_WAIT_MS: u64 = 30_000;

/// How much of the request timeout a long poll leaves for answering, so its answer always beats the timeout.
pub const ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// A long poll's wait (`wait-ms`), the one rule for every long poll: 0 to 30000 ms (absent: 0, answer at once),
/// ending at the latest [`ANSWER_MARGIN`] before the request timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPoll(pub Duration);

impl LongPoll {
    pub fn parse(text: Option<&str>, request_timeout: Duration) -> ApiResult<LongPoll> {
        let ms = match text {
            None => 0,
            Some(text) => text
                .parse::<u64>()
                .ok()
                .filter(|ms| *ms <= MAX_WAIT_MS)
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "wait-ms must be a whole number from 0 to {MAX_WAIT_MS}"
                    ))
                })?,
        };
        let ceiling = request_timeout.saturating_sub(ANSWER_MARGIN);
        Ok(LongPoll(Duration::from_millis(ms).min(ceiling)))
    }

    pub fn waits(self) -> bool {
        !self.0.is_zero()
    }
}

/// How many items a page holds: 1 to 1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(pub i64);

impl PageSize {
    pub const MAX: i64 = 1000;

    /// `name`'s value, `default` when absent.
    pub fn parse(name: &str, text: Option<&str>, default: i64) -> ApiResult<PageSize> {
        match text {
            None => Ok(PageSize(default)),
            Some(text) => text
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=Self::MAX).contains(n))
                .map(PageSize)
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "{name} must be a whole number from 1 to {}",
                        Self::MAX
                    ))
                }),
        }
    }
}

/// A lock token from a path: one this hub could not have issued names a lock that is lost (`lost`).
pub fn lock_token<E>(text: &str, lost: E) -> Result<crate::lock_token::LockToken, E> {
    text.parse().map_err(|_| lost)
}

/// The header that carries a continuation token (in answers, and optionally in requests).
pub const CONTINUATION: &str = "x-ms-continuation";

/// Where the previous page ended: the `continuationToken` parameter, else the `x-ms-continuation` header; `None`
/// for the first page.
pub fn continuation(param: Option<String>, headers: &HeaderMap) -> ApiResult<Option<String>> {
    let token = param.or_else(|| {
        headers
            .get(CONTINUATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    });
    match token.filter(|t| !t.is_empty()) {
        None => Ok(None),
        Some(t) => wire::decode_continuation(&t)
            .map(Some)
            .ok_or_else(|| ApiError::invalid("Invalid continuation token")),
    }
}

/// A page as JSON. `items` were read with one more than `size` asked: when that one is there, another page follows
/// and the answer's `x-ms-continuation` holds `key` of the page's last item.
pub fn page<T: Serialize>(
    mut items: Vec<T>,
    size: PageSize,
    key: impl Fn(&T) -> String,
) -> Response {
    let more = items.len() as i64 > size.0;
    items.truncate(size.0 as usize);
    let next = items
        .last()
        .filter(|_| more)
        .map(|last| wire::encode_continuation(&key(last)));
    let mut response = axum::Json(items).into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(CONTINUATION, next);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_long_poll_rule() {
        let timeout = Duration::from_secs(45);
        assert_eq!(LongPoll::parse(None, timeout).unwrap().0, Duration::ZERO);
        assert_eq!(
            LongPoll::parse(Some("30000"), timeout).unwrap().0,
            Duration::from_secs(30)
        );
        assert!(LongPoll::parse(Some("30001"), timeout).is_err());
        assert!(LongPoll::parse(Some("-1"), timeout).is_err());
        // Never longer than the request timeout allows.
        let short = Duration::from_secs(5);
        assert_eq!(
            LongPoll::parse(Some("30000"), short).unwrap().0,
            Duration::from_secs(3)
        );
    }

    #[test]
    fn page_sizes() {
        assert_eq!(PageSize::parse("top", None, 100).unwrap(), PageSize(100));
        assert_eq!(
            PageSize::parse("top", Some("1000"), 100).unwrap(),
            PageSize(1000)
        );
        assert!(PageSize::parse("top", Some("0"), 100).is_err());
        assert!(PageSize::parse("top", Some("1001"), 100).is_err());
        assert!(PageSize::parse("top", Some("x"), 100).is_err());
    }
}
