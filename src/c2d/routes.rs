//! C2D over HTTP: the service's enqueue, queue, status and purge calls (an extension, and IoT Hub's purge), and the
//! device's receive and settlement calls, wire-compatible with IoT Hub (spec §4.4–4.6). Thin handlers over
//! [`super::store`].

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::time::Instant;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::model::*;
use super::store::{self, Received};
use crate::auth::sas::encode_component;
use crate::http::casing::ExactNames;
use crate::http::casing::RequestNames;
use crate::http::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::http::extract::rights::ServiceConnect;
use crate::http::extract::{Device, Json, Path, Query, Service};
use crate::http::normalize::{query_has, query_value};
use crate::http::wire::{self, format_time};
use crate::http::ApiVersion;
use crate::notify::channel;
use crate::registry::valid_device_id;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(enqueue, list_queue, purge))
        .routes(routes!(message_status))
        .routes(routes!(receive))
        .routes(routes!(complete))
        .routes(routes!(abandon))
}

/// C2D message size limit (spec §7.3): body, system property values, application property names and values.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// Longest message id, correlation id or user id accepted.
const MAX_ID_LEN: usize = 128;

const APP_PREFIX: &str = "iothub-app-";

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DevicePath {
    /// The device id (percent-encoded in the URL).
    pub id: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct MessagePath {
    /// The device id (percent-encoded in the URL).
    pub id: String,
    /// The message's sequence number, as `POST …/commands` returned it.
    #[serde(rename = "sequenceNumber")]
    #[param(rename = "sequenceNumber")]
    pub sequence_number: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct LockPath {
    /// The device id (percent-encoded in the URL).
    pub id: String,
    /// The lock token from the receive's `ETag` (without its quotes).
    #[serde(rename = "lockToken")]
    #[param(rename = "lockToken")]
    pub lock_token: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitParam {
    /// Long poll: wait up to this many milliseconds (at most 30000) for a message when none is ready.
    #[serde(rename = "wait-ms")]
    #[param(rename = "wait-ms")]
    pub wait_ms: Option<String>,
}

fn checked_id(id: &str) -> ApiResult<&str> {
    if valid_device_id(id) {
        Ok(id)
    } else {
        Err(ApiError::invalid(format!("Device id '{id}' is invalid")))
    }
}

fn header_text<'h>(headers: &'h HeaderMap, name: &str) -> ApiResult<Option<&'h str>> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| ApiError::invalid(format!("Header {name} must be visible ASCII"))),
    }
}

fn id_header(headers: &HeaderMap, name: &str) -> ApiResult<Option<String>> {
    match header_text(headers, name)? {
        None => Ok(None),
        Some(v) if v.is_empty() || v.len() > MAX_ID_LEN => Err(ApiError::invalid(format!(
            "Header {name} must have 1 to {MAX_ID_LEN} characters"
        ))),
        Some(v) => Ok(Some(v.to_string())),
    }
}

/// Reads a message to enqueue from the request's `iothub-*` headers and body.
pub fn parse_message(
    headers: &HeaderMap,
    names: &RequestNames,
    body: Bytes,
    max_ttl_secs: u32,
) -> ApiResult<NewMessage> {
    let message_id =
        id_header(headers, "iothub-messageid")?.unwrap_or_else(|| Uuid::new_v4().to_string());
    let correlation_id = id_header(headers, "iothub-correlationid")?;
    let user_id = id_header(headers, "iothub-userid")?;
    let ack_text = header_text(headers, "iothub-ack")?;
    let ack = match ack_text {
        None => Ack::None,
        Some(a) => Ack::parse(a).ok_or_else(|| {
            ApiError::invalid(format!(
                "iothub-ack must be none, positive, negative or full, not '{a}'"
            ))
        })?,
    };
    let expiry_text = header_text(headers, "iothub-expiry")?;
    let ttl_text = header_text(headers, "iothub-ttl")?;
    let expiry = match (expiry_text, ttl_text) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "Send iothub-expiry or iothub-ttl, not both",
            ))
        }
        (Some(at), None) => Expiry::At(
            chrono::DateTime::parse_from_rfc3339(at.trim())
                .map_err(|_| ApiError::invalid("iothub-expiry must be an RFC 3339 date and time"))?
                .with_timezone(&chrono::Utc),
        ),
        (None, Some(ttl)) => match ttl.trim().parse::<u32>() {
            Ok(0) | Err(_) => {
                return Err(ApiError::invalid(
                    "iothub-ttl must be a whole number of seconds, at least 1",
                ))
            }
            Ok(secs) if secs > max_ttl_secs => {
                return Err(ApiError::new(
                    ErrorCode::InvalidMessageExpiryTime,
                    format!("iothub-ttl must be at most {max_ttl_secs} seconds"),
                ))
            }
            Ok(secs) => Expiry::Ttl(secs.into()),
        },
        (None, None) => Expiry::Default,
    };
    let content_type = header_text(headers, "iothub-contenttype")?.map(String::from);
    let content_encoding = header_text(headers, "iothub-contentencoding")?.map(String::from);
    let mut app_properties: Vec<(String, String)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in headers {
        if !name.as_str().starts_with(APP_PREFIX) {
            continue;
        }
        // The client's spelling: property names are case-sensitive.
        let occurrence = seen.iter().filter(|n| **n == name.as_str()).count();
        seen.push(name.as_str());
        let original = names.original(name.as_str(), occurrence);
        let property = &original[APP_PREFIX.len()..];
        // Header names are HTTP tokens by construction; an empty name is the only way to get one wrong.
        if property.is_empty() {
            return Err(ApiError::invalid(
                "An application property needs a name after iothub-app-",
            ));
        }
        if app_properties
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(property))
        {
            return Err(ApiError::invalid(format!(
                "Application property '{property}' is given twice"
            )));
        }
        let value = value.to_str().map_err(|_| {
            ApiError::invalid(format!(
                "Application property '{property}' must be visible ASCII"
            ))
        })?;
        app_properties.push((property.to_string(), value.to_string()));
    }
    let size = body.len()
        + [
            Some(message_id.as_str()),
            correlation_id.as_deref(),
            user_id.as_deref(),
            ack_text,
            expiry_text,
            ttl_text,
            content_type.as_deref(),
            content_encoding.as_deref(),
        ]
        .iter()
        .flatten()
        .map(|v| v.len())
        .sum::<usize>()
        + app_properties
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>();
    if size > MAX_MESSAGE_SIZE {
        return Err(ApiError::too_large(MAX_MESSAGE_SIZE));
    }
    Ok(NewMessage {
        message_id,
        correlation_id,
        user_id,
        ack,
        expiry,
        content_type,
        content_encoding,
        app_properties,
        body: body.to_vec(),
    })
}

/// Enqueue a cloud-to-device message for a device (extension).
///
/// The body is the message. Headers (all optional): `iothub-messageid` (a UUID when absent),
/// `iothub-correlationid`, `iothub-userid`, `iothub-ack` (`none`, `positive`, `negative`, `full`),
/// `iothub-expiry` (RFC 3339) or `iothub-ttl` (seconds, at least 1), `iothub-contenttype`,
/// `iothub-contentencoding`, and `iothub-app-{name}` per application property.
#[utoipa::path(post, path = "/devices/{id}/commands", tag = "c2d",
    params(DevicePath, ApiVersion,
        ("iothub-messageid" = Option<String>, Header, description = "Message id (1–128 characters); a UUID when absent"),
        ("iothub-correlationid" = Option<String>, Header, description = "Correlation id"),
        ("iothub-userid" = Option<String>, Header, description = "User id"),
        ("iothub-ack" = Option<String>, Header, description = "Feedback wanted: none (default), positive, negative, full"),
        ("iothub-expiry" = Option<String>, Header, description = "Absolute expiry, RFC 3339 (after now, within the maximum TTL)"),
        ("iothub-ttl" = Option<String>, Header, description = "Time to live in seconds (1 up to the maximum TTL, 48 h by default)"),
        ("iothub-contenttype" = Option<String>, Header, description = "Content type of the body"),
        ("iothub-contentencoding" = Option<String>, Header, description = "Content encoding of the body"),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The message body (at most 64 KB with its properties)"),
    responses(
        (status = 201, description = "Enqueued", body = Enqueued,
            headers(("Location" = String, description = "The message's status: /devices/{id}/commands/{sequenceNumber}"))),
        (status = 400, description = "Invalid header: ack, ttl, expiry format, property (400004)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 403, description = "DeviceMaximumQueueDepthExceeded (403004), or InvalidMessageExpiryTime (403009): expiry not in the future or beyond the maximum TTL", body = ErrorBody),
        (status = 404, description = "DeviceNotFound (404001)", body = ErrorBody),
        (status = 413, description = "MessageTooLarge (413001): over 64 KB", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn enqueue(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(DevicePath { id }): Path<DevicePath>,
    headers: HeaderMap,
    names: RequestNames,
    body: Bytes,
) -> ApiResult<Response> {
    let id = checked_id(&id)?;
    let message = parse_message(&headers, &names, body, state.config.c2d.c2d_max_ttl_secs)?;
    let enqueued = store::enqueue(&state.db, &state.config.c2d, id, &message).await?;
    let location = format!(
        "/devices/{}/commands/{}",
        encode_component(id),
        enqueued.sequence_number
    );
    let mut response = (StatusCode::CREATED, Json(enqueued)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(http::header::LOCATION, value);
    }
    Ok(response)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct QueueParams {
    /// Page size, 1–1000 (default 100).
    pub top: Option<String>,
    /// Where the previous page ended (its `x-ms-continuation` header).
    #[serde(rename = "continuationToken")]
    #[param(rename = "continuationToken")]
    pub continuation_token: Option<String>,
}

const CONTINUATION: &str = "x-ms-continuation";

/// List a device's queue (extension): its live messages in delivery order, with state and delivery count.
///
/// When more messages follow, the answer has an `x-ms-continuation` header; send it back as
/// `continuationToken=` (or that header) for the next page.
#[utoipa::path(get, path = "/devices/{id}/commands", tag = "c2d",
    params(DevicePath, ApiVersion, QueueParams),
    responses(
        (status = 200, description = "A page of the device's live messages", body = [MessageStatus],
            headers(("x-ms-continuation" = String, description = "Present when more messages follow"))),
        (status = 400, description = "Invalid top or continuation (400004)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "DeviceNotFound (404001)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn list_queue(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(DevicePath { id }): Path<DevicePath>,
    Query(params): Query<QueueParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id = checked_id(&id)?;
    let top = match params.top.as_deref() {
        None => 100,
        Some(t) => match t.parse::<i64>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "top must be a whole number from 1 to 1000",
                ))
            }
        },
    };
    let token = params.continuation_token.or_else(|| {
        headers
            .get(CONTINUATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    });
    let after = match token.filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => wire::decode_continuation(&t)
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| ApiError::invalid("Invalid continuation token"))?,
    };
    let mut page = store::list(&state.db, id, after, top + 1).await?;
    let more = page.len() as i64 > top;
    page.truncate(top as usize);
    let next = page
        .last()
        .filter(|_| more)
        .map(|m| wire::encode_continuation(&m.sequence_number.to_string()));
    let mut response = Json(page).into_response();
    if let Some(next) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(CONTINUATION, next);
    }
    Ok(response)
}

/// Purge a device's queue (IoT Hub's call): every live message ends with outcome `Purged`.
#[utoipa::path(delete, path = "/devices/{id}/commands", tag = "c2d",
    params(DevicePath, ApiVersion),
    responses(
        (status = 200, description = "Purged", body = PurgeResult),
        (status = 400, description = "Invalid device id (400004)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "DeviceNotFound (404001)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn purge(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(DevicePath { id }): Path<DevicePath>,
) -> ApiResult<Json<PurgeResult>> {
    let id = checked_id(&id)?;
    Ok(Json(store::purge(&state.db, &state.config.c2d, id).await?))
}

/// One message's state and outcome (extension); ended messages stay readable for the feedback TTL.
#[utoipa::path(get, path = "/devices/{id}/commands/{sequenceNumber}", tag = "c2d",
    params(MessagePath, ApiVersion),
    responses(
        (status = 200, description = "The message's status", body = MessageStatus),
        (status = 400, description = "Invalid device id or sequence number (400004)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "DeviceNotFound (404001), or no such message (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn message_status(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(MessagePath {
        id,
        sequence_number,
    }): Path<MessagePath>,
) -> ApiResult<Json<MessageStatus>> {
    let id = checked_id(&id)?;
    let seq = sequence_number
        .parse::<i64>()
        .ok()
        .filter(|s| *s >= 1)
        .ok_or_else(|| {
            ApiError::invalid("The sequence number must be a whole number, at least 1")
        })?;
    Ok(Json(store::status(&state.db, id, seq).await?))
}

/// The long-poll wait a request asks for; bounded by the request timeout so the answer always beats it.
pub fn wait_param(query: Option<&str>, request_timeout: Duration) -> ApiResult<Option<Duration>> {
    let Some(text) = query_value(query, "wait-ms") else {
        return Ok(None);
    };
    let ms = text
        .parse::<u64>()
        .ok()
        .filter(|ms| *ms <= super::MAX_WAIT_MS)
        .ok_or_else(|| ApiError::invalid("wait-ms must be a whole number from 0 to 30000"))?;
    let ceiling = request_timeout.saturating_sub(Duration::from_millis(500));
    Ok(Some(Duration::from_millis(ms).min(ceiling)))
}

/// Receive the next C2D message (IoT Hub's device call), locked for this device until completed, rejected,
/// abandoned, or the lock runs out.
///
/// `204` when nothing is ready. With `wait-ms=N` (an extension) the call waits up to N ms and answers the moment a
/// message is enqueued. The answer's `ETag` is the quoted lock token; `iothub-deliverycount` counts the earlier
/// deliveries (each delivery counts, including those whose lock ran out).
#[utoipa::path(get, path = "/devices/{id}/messages/deviceBound", tag = "c2d",
    params(DevicePath, ApiVersion, WaitParam),
    responses(
        (status = 200, description = "A message: the body, with its properties as headers", content_type = "application/octet-stream",
            headers(
                ("ETag" = String, description = "The lock token, quoted"),
                ("iothub-messageid" = String, description = "Message id"),
                ("iothub-correlationid" = String, description = "Correlation id, empty when none"),
                ("iothub-userid" = String, description = "User id, empty when none"),
                ("iothub-sequencenumber" = String, description = "Sequence number in the device's queue"),
                ("iothub-to" = String, description = "/devices/{id}/messages/devicebound"),
                ("iothub-ack" = String, description = "The sender's ack mode"),
                ("iothub-expiry" = String, description = "The sender's absolute expiry; empty when the default TTL applies"),
                ("iothub-deliverycount" = String, description = "Earlier deliveries of this message (0 on the first)"),
                ("iothub-enqueuedtime" = String, description = "When it was enqueued"),
                ("ContentType" = String, description = "Content type, when set"),
                ("ContentEncoding" = String, description = "Content encoding, when set"),
            )),
        (status = 204, description = "No message ready (after the wait, with wait-ms)"),
        (status = 400, description = "Invalid wait-ms (400004)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or insufficient token, or device disabled (401002)", body = ErrorBody),
    ),
    security(("sas" = ["DeviceConnect"])))]
async fn receive(
    Device(caller): Device,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let wait = wait_param(query.as_deref(), state.config.request_timeout())?;
    let device_id = caller.device_id;
    let deadline = wait.map(|w| Instant::now() + w);
    // Subscribe before looking, so an enqueue committed between the look and the wait still wakes us.
    let mut subscription = deadline.map(|_| state.notifier.subscribe(channel::C2D, &device_id));
    let mut shutdown = state.shutdown.clone();
    loop {
        let received = store::receive(
            &state.db,
            &state.config.c2d,
            &device_id,
            Uuid::new_v4(),
            deadline.is_some(),
        )
        .await?;
        let retry_in = match received {
            Received::Message(row) => return Ok(delivery(&device_id, *row)),
            Received::Empty { retry_in } => retry_in,
        };
        let (Some(deadline), Some(subscription)) = (deadline, subscription.as_mut()) else {
            return Ok(StatusCode::NO_CONTENT.into_response());
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        // A locked message becomes receivable again when its lock runs out: look again then (the database said
        // when), besides whenever an enqueue or abandon for this device commits.
        let until = match retry_in {
            Some(r) => deadline.min(now + r + Duration::from_millis(10)),
            None => deadline,
        };
        tokio::select! {
            _ = subscription.changed() => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

/// A received message in IoT Hub's wire form.
fn delivery(device_id: &str, row: MessageRow) -> Response {
    let mut headers = HeaderMap::new();
    let mut exact = Vec::new();
    let mut put = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    };
    let token = row.lock_token.map(|t| t.to_string()).unwrap_or_default();
    put("etag", &format!("\"{token}\""));
    put("iothub-messageid", &row.message_id);
    put(
        "iothub-correlationid",
        row.correlation_id.as_deref().unwrap_or(""),
    );
    put("iothub-userid", row.user_id.as_deref().unwrap_or(""));
    put("iothub-sequencenumber", &row.seq.to_string());
    put(
        "iothub-to",
        &format!("/devices/{device_id}/messages/devicebound"),
    );
    put("iothub-ack", &row.ack);
    put(
        "iothub-expiry",
        &row.expiry_explicit.map(format_time).unwrap_or_default(),
    );
    put(
        "iothub-deliverycount",
        &(row.delivery_count - 1).max(0).to_string(),
    );
    put("iothub-enqueuedtime", &format_time(row.enqueued_at));
    if let Some(ct) = &row.content_type {
        put("contenttype", ct);
    }
    if let Some(ce) = &row.content_encoding {
        put("contentencoding", ce);
    }
    for (name, value) in &row.app_properties.0 {
        let header = format!("{APP_PREFIX}{name}");
        put(&header, value);
        exact.push(header);
    }
    let mut response = (StatusCode::OK, headers, row.body).into_response();
    response.extensions_mut().insert(ExactNames(exact));
    response
}

fn lock_token(text: &str) -> Option<Uuid> {
    Uuid::parse_str(text.trim().trim_matches('"')).ok()
}

/// Complete a received message (IoT Hub's device call), or reject it with `?reject` (with or without a value).
///
/// `If-Match` is not required. A rejected message is dead-lettered at once.
#[utoipa::path(delete, path = "/devices/{id}/messages/deviceBound/{lockToken}", tag = "c2d",
    params(LockPath, ApiVersion,
        ("reject" = Option<String>, Query, description = "Present (any value, or none): reject instead of complete")),
    responses(
        (status = 204, description = "Completed (or rejected)"),
        (status = 401, description = "Missing, invalid or insufficient token, or device disabled (401002)", body = ErrorBody),
        (status = 412, description = "DeviceMessageLockLost (412002): the lock token is unknown, expired or already settled", body = ErrorBody),
    ),
    security(("sas" = ["DeviceConnect"])))]
async fn complete(
    Device(caller): Device,
    State(state): State<AppState>,
    Path(LockPath {
        lock_token: token, ..
    }): Path<LockPath>,
    RawQuery(query): RawQuery,
) -> ApiResult<StatusCode> {
    let reject = query_has(query.as_deref(), "reject");
    store::settle(
        &state.db,
        &state.config.c2d,
        &caller.device_id,
        lock_token(&token),
        reject,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Abandon a received message (IoT Hub's device call): it is receivable again, or dead-lettered when it was
/// already delivered the maximum number of times.
#[utoipa::path(post, path = "/devices/{id}/messages/deviceBound/{lockToken}/abandon", tag = "c2d",
    params(LockPath, ApiVersion),
    responses(
        (status = 204, description = "Abandoned"),
        (status = 401, description = "Missing, invalid or insufficient token, or device disabled (401002)", body = ErrorBody),
        (status = 412, description = "DeviceMessageLockLost (412002): the lock token is unknown, expired or already settled", body = ErrorBody),
    ),
    security(("sas" = ["DeviceConnect"])))]
async fn abandon(
    Device(caller): Device,
    State(state): State<AppState>,
    Path(LockPath {
        lock_token: token, ..
    }): Path<LockPath>,
) -> ApiResult<StatusCode> {
    store::abandon(
        &state.db,
        &state.config.c2d,
        &caller.device_id,
        lock_token(&token),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
