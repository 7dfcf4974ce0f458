//! C2D over HTTP: the service's enqueue, queue, status and purge calls (an extension, and IoT Hub's purge), and the
//! device's receive and settlement calls, wire-compatible with IoT Hub (spec §4.4–4.6). Thin handlers over
//! [`crate::c2d::store`].

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::c2d::model::{
    self as core, Ack, Expiry, MessageRow, NewMessage, SequenceNumber, Settle, Settlement,
};
use crate::c2d::store::{self, Received};
use crate::http::casing::{ExactNames, RequestNames};
use crate::http::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::http::extract::rights::ServiceConnect;
use crate::http::extract::{Device, Json, Path, Query, Service};
use crate::http::normalize::{query_has, query_value};
use crate::http::params::{self, LongPoll, PageSize};
use crate::http::poll::{long_poll, Look};
use crate::http::wire::{self, format_time};
use crate::http::{ApiVersion, AppState};
use crate::lock_token::LockToken;
use crate::notify::channel;
use crate::registry::DeviceId;

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

/// The `wait-ms` of a raw query (its name in any case, as IoT Hub's other parameters).
pub fn wait(query: Option<&str>, state: &AppState) -> ApiResult<LongPoll> {
    LongPoll::parse(
        query_value(query, "wait-ms").as_deref(),
        state.config.request_timeout(),
    )
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

/// The HTTP codec's conversion of a message to enqueue: its `iothub-*` headers and body into the core's
/// [`NewMessage`]. Every property is parsed here, once; sizes count as IoT Hub counts them (spec §7.3).
pub fn new_message(
    headers: &HeaderMap,
    names: &RequestNames,
    body: Bytes,
    max_ttl_secs: u32,
) -> ApiResult<NewMessage> {
    let message_id =
        id_header(headers, "iothub-messageid")?.unwrap_or_else(|| Uuid::new_v4().to_string());
    let message = NewMessage {
        correlation_id: id_header(headers, "iothub-correlationid")?,
        user_id: id_header(headers, "iothub-userid")?,
        ack: ack(header_text(headers, "iothub-ack")?)?,
        expiry: expiry(headers, max_ttl_secs)?,
        content_type: header_text(headers, "iothub-contenttype")?.map(String::from),
        content_encoding: header_text(headers, "iothub-contentencoding")?.map(String::from),
        app_properties: app_properties(headers, names)?,
        body: body.to_vec(),
        message_id,
    };
    // What counts is what was sent: the header texts, not their parsed values.
    let sent: usize = ["iothub-ack", "iothub-expiry", "iothub-ttl"]
        .iter()
        .filter_map(|name| headers.get(*name))
        .map(|v| v.len())
        .sum();
    let size = message.body.len()
        + sent
        + [
            Some(message.message_id.as_str()),
            message.correlation_id.as_deref(),
            message.user_id.as_deref(),
            message.content_type.as_deref(),
            message.content_encoding.as_deref(),
        ]
        .iter()
        .flatten()
        .map(|v| v.len())
        .sum::<usize>()
        + message
            .app_properties
            .iter()
            .map(|(n, v)| n.len() + v.len())
            .sum::<usize>();
    if size > MAX_MESSAGE_SIZE {
        return Err(ApiError::too_large(MAX_MESSAGE_SIZE));
    }
    Ok(message)
}

fn ack(text: Option<&str>) -> ApiResult<Ack> {
    match text {
        None => Ok(Ack::None),
        Some(a) => Ack::parse(a).ok_or_else(|| {
            ApiError::invalid(format!(
                "iothub-ack must be none, positive, negative or full, not '{a}'"
            ))
        }),
    }
}

/// `iothub-expiry` (an RFC 3339 time) or `iothub-ttl` (seconds, 1 up to `max_ttl_secs`), not both.
fn expiry(headers: &HeaderMap, max_ttl_secs: u32) -> ApiResult<Expiry> {
    let at = header_text(headers, "iothub-expiry")?;
    let ttl = header_text(headers, "iothub-ttl")?;
    Ok(match (at, ttl) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "Send iothub-expiry or iothub-ttl, not both",
            ))
        }
        (Some(at), None) => Expiry::At(
            DateTime::parse_from_rfc3339(at.trim())
                .map_err(|_| ApiError::invalid("iothub-expiry must be an RFC 3339 date and time"))?
                .with_timezone(&Utc),
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
    })
}

/// `iothub-app-{name}` headers in the order sent, each name in the client's spelling (names are case-sensitive,
/// but two that differ only in case are one property given twice).
fn app_properties(headers: &HeaderMap, names: &RequestNames) -> ApiResult<Vec<(String, String)>> {
    let mut properties: Vec<(String, String)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in headers {
        if !name.as_str().starts_with(APP_PREFIX) {
            continue;
        }
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
        if properties
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
        properties.push((property.to_string(), value.to_string()));
    }
    Ok(properties)
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
        (status = 403, description = "DeviceMaximumQueueDepthExceeded (403004), or InvalidMessageExpiryTime (403009): expiry not in the future or beyond the maximum TTL", body = ErrorBody),
        (status = 413, description = "MessageTooLarge (413001): over 64 KB", body = ErrorBody),
        (status = 503, description = "ServiceUnavailable: the enqueue writer stayed busy for 5 s (the database is behind), or the hub is stopping; retry after `Retry-After`", body = ErrorBody),
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
    let id: DeviceId = id.parse()?;
    let message = new_message(&headers, &names, body, state.config.c2d.max_ttl_secs)?;
    let location = wire::device_path(id.as_str());
    let enqueued = state.c2d.enqueue(id, message).await?;
    let location = format!("{location}/commands/{}", enqueued.seq);
    let mut response = (StatusCode::CREATED, Json(Enqueued::from(enqueued))).into_response();
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
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn list_queue(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(DevicePath { id }): Path<DevicePath>,
    Query(params): Query<QueueParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let id: DeviceId = id.parse()?;
    let top = PageSize::parse("top", params.top.as_deref(), 100)?;
    let after = match params::continuation(params.continuation_token, &headers)? {
        None => 0,
        Some(key) => key
            .parse::<i64>()
            .map_err(|_| ApiError::invalid("Invalid continuation token"))?,
    };
    let found = store::list(&state.db, &id, after, top.0 + 1).await?;
    let statuses: Vec<MessageStatus> = found
        .into_iter()
        .map(|m| MessageStatus::new(&id, m))
        .collect();
    Ok(params::page(statuses, top, |m| {
        m.sequence_number.to_string()
    }))
}

/// Purge a device's queue (IoT Hub's call): every live message ends with outcome `Purged`.
#[utoipa::path(delete, path = "/devices/{id}/commands", tag = "c2d",
    params(DevicePath, ApiVersion),
    responses(
        (status = 200, description = "Purged", body = PurgeResult),
        (status = 400, description = "Invalid device id (400004)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn purge(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(DevicePath { id }): Path<DevicePath>,
) -> ApiResult<Json<PurgeResult>> {
    let id: DeviceId = id.parse()?;
    let purged = store::purge(&state.db, &state.config.feedback, &id).await?;
    Ok(Json(PurgeResult {
        total_messages_purged: purged,
        device_id: id.to_string(),
        module_id: None,
    }))
}

/// One message's state and outcome (extension); ended messages stay readable for the feedback TTL.
#[utoipa::path(get, path = "/devices/{id}/commands/{sequenceNumber}", tag = "c2d",
    params(MessagePath, ApiVersion),
    responses(
        (status = 200, description = "The message's status", body = MessageStatus),
        (status = 400, description = "Invalid device id or sequence number (400004)", body = ErrorBody),
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
    let id: DeviceId = id.parse()?;
    let seq: SequenceNumber = sequence_number.parse()?;
    let status = store::status(&state.db, &id, seq).await?;
    Ok(Json(MessageStatus::new(&id, status)))
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
    let wait = wait(query.as_deref(), &state)?;
    let device = &caller.device_id;
    let config = &state.config;
    let db = &state.db;
    let received = long_poll(&state, wait, channel::C2D, device.as_str(), || async move {
        let found = store::receive(
            db,
            &config.c2d,
            &config.feedback,
            device,
            LockToken::new(),
            wait.waits(),
        )
        .await?;
        Ok(match found {
            Received::Message(row) => Look::Found(row),
            // A locked message becomes receivable again when its lock runs out: look again then.
            Received::Empty { retry_in } => Look::Empty { retry_in },
        })
    })
    .await?;
    Ok(match received {
        Some(row) => delivery(device.as_str(), *row),
        None => StatusCode::NO_CONTENT.into_response(),
    })
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
    put("iothub-ack", row.ack.as_str());
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
        (status = 503, description = "ServiceUnavailable: the database is unavailable (503001), the settlement writers stayed busy for 5 s (the database is behind), or the hub is stopping; retry after `Retry-After`", body = ErrorBody),
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
    let action = if query_has(query.as_deref(), "reject") {
        Settle::Reject
    } else {
        Settle::Complete
    };
    settle(&state, caller.device_id, &token, action).await
}

/// Abandon a received message (IoT Hub's device call): it is receivable again, or dead-lettered when it was
/// already delivered the maximum number of times.
#[utoipa::path(post, path = "/devices/{id}/messages/deviceBound/{lockToken}/abandon", tag = "c2d",
    params(LockPath, ApiVersion),
    responses(
        (status = 204, description = "Abandoned"),
        (status = 401, description = "Missing, invalid or insufficient token, or device disabled (401002)", body = ErrorBody),
        (status = 412, description = "DeviceMessageLockLost (412002): the lock token is unknown, expired or already settled", body = ErrorBody),
        (status = 503, description = "ServiceUnavailable: the database is unavailable (503001), the settlement writers stayed busy for 5 s (the database is behind), or the hub is stopping; retry after `Retry-After`", body = ErrorBody),
    ),
    security(("sas" = ["DeviceConnect"])))]
async fn abandon(
    Device(caller): Device,
    State(state): State<AppState>,
    Path(LockPath {
        lock_token: token, ..
    }): Path<LockPath>,
) -> ApiResult<StatusCode> {
    settle(&state, caller.device_id, &token, Settle::Abandon).await
}

/// Hands the settlement of the message `device_id` holds under `token` to the writer.
async fn settle(
    state: &AppState,
    device_id: DeviceId,
    token: &str,
    action: Settle,
) -> ApiResult<StatusCode> {
    let settlement = Settlement {
        device_id,
        lock_token: params::lock_token(token, crate::c2d::Error::LockLost)?,
        action,
    };
    state.c2d.settle(settlement).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What `POST /devices/{id}/commands` answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"messageId": "5f0d3c1e-7b9a-4c2e-9f3a-2a1b0c9d8e7f", "sequenceNumber": 1,
    "enqueuedTimeUtc": "2026-11-29T10:00:00.000Z", "expiryTimeUtc": "2026-11-29T11:00:00.000Z"}))]
pub struct Enqueued {
    pub message_id: String,
    pub sequence_number: i64,
    pub enqueued_time_utc: String,
    pub expiry_time_utc: String,
}

impl From<core::Enqueued> for Enqueued {
    fn from(e: core::Enqueued) -> Enqueued {
        Enqueued {
            message_id: e.message_id,
            sequence_number: e.seq,
            enqueued_time_utc: format_time(e.enqueued_at),
            expiry_time_utc: format_time(e.expires_at),
        }
    }
}

/// A message's state and outcome, as the service API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"deviceId": "thermostat-1", "sequenceNumber": 3, "messageId": "order-17",
    "correlationId": null, "userId": null, "ack": "full", "state": "Completed", "deliveryCount": 1,
    "enqueuedTimeUtc": "2026-11-29T10:00:00.000Z", "expiryTimeUtc": "2026-11-29T11:00:00.000Z",
    "lockedUntilUtc": null, "outcome": "Success", "outcomeTimeUtc": "2026-11-29T10:00:02.125Z", "size": 12}))]
pub struct MessageStatus {
    pub device_id: String,
    pub sequence_number: i64,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    /// `none`, `positive`, `negative` or `full`.
    pub ack: String,
    /// `Enqueued`, `Invisible` (locked by a receive), `Completed`, `DeadLettered` or `Purged`.
    pub state: String,
    /// Deliveries so far (each receive counts, also when its lock ran out).
    pub delivery_count: i32,
    pub enqueued_time_utc: String,
    pub expiry_time_utc: String,
    /// While `Invisible`: when the lock runs out.
    pub locked_until_utc: Option<String>,
    /// Once ended: `Success`, `Rejected`, `Expired`, `DeliveryCountExceeded` or `Purged`.
    pub outcome: Option<String>,
    pub outcome_time_utc: Option<String>,
    /// Body bytes.
    pub size: usize,
}

impl MessageStatus {
    fn new(device_id: &DeviceId, status: core::MessageStatus) -> MessageStatus {
        let row = status.row;
        MessageStatus {
            device_id: device_id.to_string(),
            sequence_number: row.seq,
            message_id: row.message_id,
            correlation_id: row.correlation_id,
            user_id: row.user_id,
            ack: row.ack.to_string(),
            state: status.state.name().to_string(),
            delivery_count: row.delivery_count,
            enqueued_time_utc: format_time(row.enqueued_at),
            expiry_time_utc: format_time(row.expires_at),
            locked_until_utc: status.locked_until.map(format_time),
            outcome: row.outcome.map(|o| o.to_string()),
            outcome_time_utc: row.outcome_at.map(format_time),
            size: row.body.len(),
        }
    }
}

/// IoT Hub's purge answer (spec §4.6).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"totalMessagesPurged": 3, "deviceId": "thermostat-1", "moduleId": null}))]
pub struct PurgeResult {
    pub total_messages_purged: i64,
    pub device_id: String,
    pub module_id: Option<String>,
}
