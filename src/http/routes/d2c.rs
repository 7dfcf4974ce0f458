//! D2C over HTTP: the device's send (IoT Hub's wire format, one message or a batch) and the service's read API
//! (an extension): partitions, consumer groups with checkpoints, and the live stream ([`stream`]).

mod body;
mod stream;

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::DeviceCaller;
use crate::d2c::consumer_groups::{self, ConsumerGroupName};
use crate::d2c::model::{
    NewEvent, Properties, Sender, StoredEvent, ENQUEUED_TIME, MAX_MESSAGE_SIZE,
};
use crate::d2c::{store, Error, PartitionId};
use crate::http::casing::RequestNames;
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::http::extract::rights::ServiceConnect;
use crate::http::extract::{Device, Json, Path, Query, Service};
use crate::http::params::{LongPoll, PageSize};
use crate::http::poll::{long_poll, Look};
use crate::http::wire::format_time;
use crate::http::{ApiVersion, AppState};
use crate::notify::channel;
use body::ContentKind;
pub use body::{BodyFormat, BodyQuery};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send_events))
        .routes(routes!(endpoint_info))
        .routes(routes!(read_partition))
        .routes(routes!(list_groups))
        .routes(routes!(get_group, put_group, delete_group))
        .routes(routes!(read_group_partition))
        .routes(routes!(put_checkpoint))
        .routes(routes!(stream::stream))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DeviceIdPath {
    /// The sending device's id (percent-encoded in the URL).
    pub id: String,
}

/// Send telemetry: one message (the body, properties in `iothub-*` headers) or a batch
/// (`Content-Type: application/vnd.microsoft.iothub.json`, a JSON array of `{body, base64Encoded, properties}`).
///
/// `204` means the message is durably committed to its partition. The hub stamps `iothub-connection-device-id`,
/// `iothub-connection-auth-generation-id`, `iothub-connection-auth-method`, `iothub-enqueuedtime` and
/// `iothub-message-source`; values a device sends for them are replaced.
#[utoipa::path(post, path = "/devices/{id}/messages/events", tag = "telemetry",
    params(DeviceIdPath, ApiVersion,
        ("iothub-messageid" = Option<String>, Header, description = "Message id"),
        ("iothub-correlationid" = Option<String>, Header, description = "Correlation id"),
        ("iothub-contenttype" = Option<String>, Header, description = "The message's content type (not the HTTP Content-Type)"),
        ("iothub-contentencoding" = Option<String>, Header, description = "The message's content encoding; \
            application properties travel as `iothub-app-<name>` headers")),
    request_body(content = Vec<BatchItem>, description = "The raw message body, or a batch (JSON array) with `Content-Type: application/vnd.microsoft.iothub.json`",
        example = json!([{"body": "eyJ0IjoyMS41fQ==", "properties": {"iothub-app-alert": "high"}}])),
    responses(
        (status = 204, description = "Durably committed"),
        (status = 400, description = "Bad property name, message id or malformed batch (400004)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token, or disabled device (401002)", body = ErrorBody),
        (status = 404, description = "Unknown device (policy token) (404001)", body = ErrorBody),
        (status = 413, description = "Message or batch over 256 KB (413001)", body = ErrorBody),
        (status = 503, description = "Ingestion is behind or the hub is stopping; retry (503001)", body = ErrorBody),
    ),
    security(("sas" = ["DeviceConnect"])))]
async fn send_events(
    Device(caller): Device,
    State(state): State<AppState>,
    headers: HeaderMap,
    names: RequestNames,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let body = body?;
    let events = if is_batch(&headers) {
        parse_batch(&caller, &body)?
    } else {
        if body.len() > MAX_MESSAGE_SIZE {
            return Err(ApiError::too_large(MAX_MESSAGE_SIZE));
        }
        vec![parse_single(&caller, &headers, &names, body.to_vec())?]
    };
    let partition = state.d2c.partition_of(caller.device_id.as_str());
    state.d2c.ingest.submit(partition, events).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The batch content type (parameters ignored).
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

/// Whether a request's `Content-Type` makes it a batch.
pub fn is_batch(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(BATCH_CONTENT_TYPE))
}

/// One message sent as the request body with its properties in headers.
pub fn parse_single(
    caller: &DeviceCaller,
    headers: &HeaderMap,
    names: &RequestNames,
    body: Vec<u8>,
) -> Result<NewEvent, Error> {
    let mut sent = Properties::default();
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in headers {
        // Header names are case-insensitive (hyper gives them in lower case); property names are not, so the
        // client's spelling is what is stored.
        if !(name.as_str().starts_with("iothub-") || name.as_str() == "dt-subject") {
            continue;
        }
        let occurrence = seen.iter().filter(|n| **n == name.as_str()).count();
        seen.push(name.as_str());
        let name = names.original(name.as_str(), occurrence);
        let value = value
            .to_str()
            .map_err(|_| Error::InvalidMessage(format!("Header {name} is not ASCII")))?;
        sent.add(name, value)?;
    }
    sent.into_event(&Sender::of(caller), body)
}

// Its strings borrow from the request body where JSON lets them (no escapes): a batch holds many messages, and each
// would otherwise copy its body and properties once more.
/// One element of a batch (spec §3.2).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchItem<'a> {
    /// Base64 of the payload, or the payload as a string when `base64Encoded` is false.
    #[serde(borrow)]
    #[schema(value_type = String)]
    pub body: Cow<'a, str>,
    /// Default true.
    #[serde(default)]
    pub base64_encoded: Option<bool>,
    /// `iothub-app-{name}` keys are application properties; system-property header names are honoured too.
    #[serde(default, borrow)]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub properties: Option<BTreeMap<Cow<'a, str>, Cow<'a, str>>>,
}

/// A batch: a JSON array of [`BatchItem`]; one message per element, in order.
pub fn parse_batch(caller: &DeviceCaller, body: &[u8]) -> Result<Vec<NewEvent>, Error> {
    let items: Vec<BatchItem> = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidMessage(format!("Malformed batch: {e}")))?;
    if items.is_empty() {
        return Err(Error::InvalidMessage(
            "A batch holds at least one message".into(),
        ));
    }
    let sender = Sender::of(caller);
    let mut total = 0usize;
    let mut events = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let payload = if item.base64_encoded.unwrap_or(true) {
            BASE64.decode(item.body.trim()).map_err(|_| {
                Error::InvalidMessage(format!("Batch element {index}: body is not valid base64"))
            })?
        } else {
            item.body.into_owned().into_bytes()
        };
        let mut sent = Properties::default();
        for (name, value) in item.properties.iter().flatten() {
            sent.add(name, value)?;
        }
        total += sent.size(&payload);
        let event = sent.into_event(&sender, payload)?;
        if total > MAX_MESSAGE_SIZE {
            return Err(Error::BatchTooLarge {
                limit: MAX_MESSAGE_SIZE,
            });
        }
        events.push(event);
    }
    Ok(events)
}

/// An event as readers get it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({
    "partitionId": "2", "sequenceNumber": 41, "offset": "41", "enqueuedTimeUtc": "2026-11-29T10:00:00.123Z",
    "deviceId": "thermostat-1",
    "systemProperties": {"iothub-connection-device-id": "thermostat-1", "iothub-contenttype": "application/json",
        "iothub-enqueuedtime": "2026-11-29T10:00:00.123Z", "iothub-message-source": "Telemetry"},
    "properties": {"alert": "high"}, "contentType": "application/json",
    "body": "eyJ0IjoyMS41fQ==", "bodyJson": {"t": 21.5}}))]
pub struct Event {
    pub partition_id: String,
    pub sequence_number: i64,
    /// Opaque, increasing; the sequence number as a string.
    pub offset: String,
    pub enqueued_time_utc: String,
    pub device_id: String,
    pub system_properties: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    /// The body, base64: with `body=all` and `body=base64` always, with `body=decoded` only when the body is
    /// neither JSON nor text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The body parsed, when the content type is JSON and it parses (`body=all` or `body=decoded`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub body_json: Option<serde_json::Value>,
    /// The body as text, when the content type is text (or JSON) and it is UTF-8: with `body=all`; with
    /// `body=decoded` only when there is no `bodyJson`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_text: Option<String>,
}

impl Event {
    /// A stored event as readers get it, its body in the forms `format` asks for.
    pub fn new(e: StoredEvent, format: BodyFormat) -> Event {
        let enqueued = crate::http::wire::format_time(e.enqueued_at);
        let mut system = e.system_properties;
        system.insert(ENQUEUED_TIME.into(), enqueued.clone());
        let content_type = system.get("iothub-contenttype").cloned();
        let content_encoding = system.get("iothub-contentencoding").cloned();
        let body = format.encode(ContentKind::of(content_type.as_deref()), e.body);
        Event {
            partition_id: e.partition_id.to_string(),
            sequence_number: e.seq,
            offset: e.seq.to_string(),
            enqueued_time_utc: enqueued,
            device_id: e.device_id,
            system_properties: system,
            properties: e.properties,
            content_type,
            content_encoding,
            body: body.base64,
            body_json: body.json,
            body_text: body.text,
        }
    }
}

/// One partition in [`EndpointInfo`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartitionInfo {
    pub partition_id: String,
    /// First sequence number still retained; absent when the partition holds nothing.
    pub first_sequence_number: Option<i64>,
    /// Last sequence number committed; absent when nothing was ever written.
    pub last_sequence_number: Option<i64>,
    pub last_enqueued_time_utc: Option<String>,
}

/// The built-in event endpoint.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointInfo {
    pub partition_count: u32,
    pub partition_ids: Vec<String>,
    pub retention_time_in_days: u32,
    pub max_consumer_groups: u32,
    pub partitions: Vec<PartitionInfo>,
}

/// The event endpoint: partitions with their first and last sequence numbers, retention and limits.
#[utoipa::path(get, path = "/messages/events", tag = "telemetry",
    params(ApiVersion),
    responses(
        (status = 200, description = "The endpoint", body = EndpointInfo, example = json!({
            "partitionCount": 4, "partitionIds": ["0", "1", "2", "3"], "retentionTimeInDays": 1,
            "maxConsumerGroups": 20, "partitions": [{"partitionId": "0", "firstSequenceNumber": 0,
            "lastSequenceNumber": 41, "lastEnqueuedTimeUtc": "2026-11-29T10:00:00.123Z"}]})),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn endpoint_info(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
) -> ApiResult<Json<EndpointInfo>> {
    let partitions = store::partitions(&state.db).await.map_err(Error::from)?;
    Ok(Json(EndpointInfo {
        partition_count: state.d2c.partitions,
        partition_ids: state.d2c.partition_ids().map(|p| p.to_string()).collect(),
        retention_time_in_days: state.d2c.retention_days,
        max_consumer_groups: state.d2c.max_consumer_groups,
        partitions: partitions
            .into_iter()
            .filter(|p| (p.partition_id as u32) < state.d2c.partitions)
            .map(|p| PartitionInfo {
                partition_id: p.partition_id.to_string(),
                first_sequence_number: p.first_seq,
                last_sequence_number: p.last_seq,
                last_enqueued_time_utc: p.last_enqueued_at.map(format_time),
            })
            .collect(),
    }))
}

/// Where a read starts and how much it takes. At most one of the `from…` options.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// Start at this sequence number (inclusive).
    #[serde(rename = "from-sequence-number")]
    #[param(rename = "from-sequence-number")]
    pub from_sequence_number: Option<String>,
    /// Start at the first event enqueued at or after this time (RFC 3339).
    #[serde(rename = "from-enqueued-time")]
    #[param(rename = "from-enqueued-time")]
    pub from_enqueued_time: Option<String>,
    /// `start` (the oldest retained event) or `end` (only events that come after the call).
    pub from: Option<String>,
    /// Events at most, 1–1000 (default 100).
    #[serde(rename = "max-count")]
    #[param(rename = "max-count")]
    pub max_count: Option<String>,
    /// Long poll: wait up to this many milliseconds (at most 30000) for at least one event.
    #[serde(rename = "wait-ms")]
    #[param(rename = "wait-ms")]
    pub wait_ms: Option<String>,
}

/// A read's position, before it is resolved against the database.
enum Position {
    Seq(i64),
    Time(DateTime<Utc>),
    Start,
    End,
}

struct ReadOptions {
    from: Option<Position>,
    max: PageSize,
    wait: LongPoll,
}

impl ReadQuery {
    fn parse(&self, state: &AppState) -> ApiResult<ReadOptions> {
        let given = [
            self.from_sequence_number.is_some(),
            self.from_enqueued_time.is_some(),
            self.from.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(ApiError::invalid(
                "Give at most one of from-sequence-number, from-enqueued-time and from",
            ));
        }
        let from = if let Some(s) = &self.from_sequence_number {
            let n: i64 =
                s.parse().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    ApiError::invalid("from-sequence-number must be a number >= 0")
                })?;
            Some(Position::Seq(n))
        } else if let Some(t) = &self.from_enqueued_time {
            let t = DateTime::parse_from_rfc3339(t)
                .map_err(|_| ApiError::invalid("from-enqueued-time must be an RFC 3339 time"))?;
            Some(Position::Time(t.with_timezone(&Utc)))
        } else if let Some(f) = &self.from {
            match f.to_ascii_lowercase().as_str() {
                "start" => Some(Position::Start),
                "end" => Some(Position::End),
                _ => return Err(ApiError::invalid("from must be start or end")),
            }
        } else {
            None
        };
        Ok(ReadOptions {
            from,
            max: PageSize::parse("max-count", self.max_count.as_deref(), 100)?,
            wait: LongPoll::parse(self.wait_ms.as_deref(), state.config.request_timeout())?,
        })
    }
}

/// A page of events.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventPage {
    pub partition_id: String,
    pub events: Vec<Event>,
    /// Where to continue: pass it as `from-sequence-number` next time.
    pub next_sequence_number: i64,
}

/// A partition id from the path: 400 when it is not a number, 404 when the hub has no such partition.
pub fn partition(state: &AppState, p: &str) -> ApiResult<PartitionId> {
    let n: u32 = p
        .parse()
        .map_err(|_| ApiError::invalid(format!("Partition id '{p}' is not a number")))?;
    Ok(state.d2c.partition(n)?)
}

async fn resolve(state: &AppState, partition: PartitionId, from: Position) -> ApiResult<i64> {
    Ok(match from {
        Position::Seq(n) => n,
        Position::Start => 0,
        Position::End => store::next_seq(&state.db, partition)
            .await
            .map_err(Error::from)?,
        Position::Time(t) => store::seq_at_time(&state.db, partition, t)
            .await
            .map_err(Error::from)?,
    })
}

/// Reads up to `max` events from `from`; with a wait, answers as soon as one is there (woken by the commit's
/// notification) or empty when the wait ends.
async fn read_page(
    state: &AppState,
    partition: PartitionId,
    from: i64,
    max: PageSize,
    wait: LongPoll,
    format: BodyFormat,
) -> ApiResult<EventPage> {
    let key = partition.to_string();
    let db = &state.db;
    let found = long_poll(state, wait, channel::D2C, &key, || async move {
        let events = store::read(db, partition, from, max.0)
            .await
            .map_err(Error::from)?;
        Ok(if events.is_empty() {
            Look::Empty { retry_in: None }
        } else {
            Look::Found(events)
        })
    })
    .await?
    .unwrap_or_default();
    let next = found.last().map_or(from, |e| e.seq + 1);
    Ok(EventPage {
        partition_id: key,
        events: found.into_iter().map(|e| Event::new(e, format)).collect(),
        next_sequence_number: next,
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PartitionPath {
    /// Partition id, `0` to partition count − 1.
    pub p: String,
}

/// Read events of one partition from a position (default: the oldest retained event).
#[utoipa::path(get, path = "/messages/events/partitions/{p}", tag = "telemetry",
    params(PartitionPath, ReadQuery, BodyQuery, ApiVersion),
    responses(
        (status = 200, description = "Events in sequence order and where to continue", body = EventPage),
        (status = 400, description = "Bad query value or partition id (400004)", body = ErrorBody),
        (status = 404, description = "No such partition (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn read_partition(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(PartitionPath { p }): Path<PartitionPath>,
    Query(query): Query<ReadQuery>,
    Query(body): Query<BodyQuery>,
) -> ApiResult<Json<EventPage>> {
    let partition = partition(&state, &p)?;
    let options = query.parse(&state)?;
    let format = body.parse()?;
    let from = resolve(&state, partition, options.from.unwrap_or(Position::Start)).await?;
    Ok(Json(
        read_page(&state, partition, from, options.max, options.wait, format).await?,
    ))
}

// ---------------------------------------------------------------------------------------------------------
// Consumer groups

/// A consumer group with its checkpoints.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroup {
    pub name: String,
    pub created_time_utc: String,
    /// Partition id → the last sequence number the group has processed.
    pub checkpoints: BTreeMap<String, i64>,
}

impl From<consumer_groups::ConsumerGroup> for ConsumerGroup {
    fn from(g: consumer_groups::ConsumerGroup) -> Self {
        ConsumerGroup {
            name: g.name,
            created_time_utc: format_time(g.created_at),
            checkpoints: g
                .checkpoints
                .into_iter()
                .map(|(p, s)| (p.to_string(), s))
                .collect(),
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct GroupPath {
    /// Consumer group name.
    pub cg: String,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct GroupPartitionPath {
    /// Consumer group name.
    pub cg: String,
    /// Partition id.
    pub p: String,
}

/// List the consumer groups with their checkpoints.
#[utoipa::path(get, path = "/messages/events/consumerGroups", tag = "telemetry",
    params(ApiVersion),
    responses(
        (status = 200, description = "The groups", body = Vec<ConsumerGroup>, example = json!([
            {"name": "$Default", "createdTimeUtc": "2026-11-29T10:00:00.000Z", "checkpoints": {"0": 41}}])),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn list_groups(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<ConsumerGroup>>> {
    let groups = consumer_groups::list(&state.db)
        .await
        .map_err(Error::from)?;
    Ok(Json(groups.into_iter().map(ConsumerGroup::from).collect()))
}

/// One consumer group with its checkpoints.
#[utoipa::path(get, path = "/messages/events/consumerGroups/{cg}", tag = "telemetry",
    params(GroupPath, ApiVersion),
    responses(
        (status = 200, description = "The group", body = ConsumerGroup),
        (status = 400, description = "Invalid name (400004)", body = ErrorBody),
        (status = 404, description = "No such group (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn get_group(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPath { cg }): Path<GroupPath>,
) -> ApiResult<Json<ConsumerGroup>> {
    let group = consumer_groups::get(&state.db, &cg.parse()?).await?;
    Ok(Json(group.into()))
}

/// Create a consumer group (201), or confirm an existing one (200).
#[utoipa::path(put, path = "/messages/events/consumerGroups/{cg}", tag = "telemetry",
    params(GroupPath, ApiVersion),
    responses(
        (status = 201, description = "Created", body = ConsumerGroup),
        (status = 200, description = "It existed already", body = ConsumerGroup),
        (status = 400, description = "Invalid name (400004)", body = ErrorBody),
        (status = 403, description = "The hub has as many groups as it allows (403002)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn put_group(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPath { cg }): Path<GroupPath>,
) -> ApiResult<Response> {
    let name: ConsumerGroupName = cg.parse()?;
    let created = consumer_groups::create(&state.db, &name, state.d2c.max_consumer_groups).await?;
    let group = consumer_groups::get(&state.db, &name).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ConsumerGroup::from(group))).into_response())
}

/// Delete a consumer group and its checkpoints (`$Default` cannot be deleted).
#[utoipa::path(delete, path = "/messages/events/consumerGroups/{cg}", tag = "telemetry",
    params(GroupPath, ApiVersion),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid name, or `$Default` (400004)", body = ErrorBody),
        (status = 404, description = "No such group (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn delete_group(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPath { cg }): Path<GroupPath>,
) -> ApiResult<StatusCode> {
    consumer_groups::delete(&state.db, &cg.parse()?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A checkpoint: the last sequence number the group has processed in a partition.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"sequenceNumber": 41}))]
pub struct CheckpointInput {
    pub sequence_number: i64,
}

/// A stored checkpoint.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub consumer_group: String,
    pub partition_id: String,
    pub sequence_number: i64,
}

/// Store the group's checkpoint for a partition; reads through the group continue after it.
#[utoipa::path(put, path = "/messages/events/consumerGroups/{cg}/partitions/{p}/checkpoint", tag = "telemetry",
    params(GroupPartitionPath, ApiVersion),
    request_body = CheckpointInput,
    responses(
        (status = 200, description = "Stored", body = Checkpoint),
        (status = 400, description = "Bad body, or not a committed sequence number (400004)", body = ErrorBody),
        (status = 404, description = "No such group or partition (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn put_checkpoint(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPartitionPath { cg, p }): Path<GroupPartitionPath>,
    Json(input): Json<CheckpointInput>,
) -> ApiResult<Json<Checkpoint>> {
    let name: ConsumerGroupName = cg.parse()?;
    let partition = partition(&state, &p)?;
    consumer_groups::set_checkpoint(&state.db, &name, partition, input.sequence_number).await?;
    Ok(Json(Checkpoint {
        consumer_group: name.to_string(),
        partition_id: partition.to_string(),
        sequence_number: input.sequence_number,
    }))
}

/// Read a partition through a group: from just after the group's checkpoint (or the oldest retained event when it
/// has none), unless a `from…` option says otherwise. Reading does not move the checkpoint.
#[utoipa::path(get, path = "/messages/events/consumerGroups/{cg}/partitions/{p}", tag = "telemetry",
    params(GroupPartitionPath, ReadQuery, BodyQuery, ApiVersion),
    responses(
        (status = 200, description = "Events in sequence order and where to continue", body = EventPage),
        (status = 400, description = "Bad query value, group name or partition id (400004)", body = ErrorBody),
        (status = 404, description = "No such group or partition (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn read_group_partition(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPartitionPath { cg, p }): Path<GroupPartitionPath>,
    Query(query): Query<ReadQuery>,
    Query(body): Query<BodyQuery>,
) -> ApiResult<Json<EventPage>> {
    let name: ConsumerGroupName = cg.parse()?;
    let partition = partition(&state, &p)?;
    let options = query.parse(&state)?;
    let format = body.parse()?;
    consumer_groups::get(&state.db, &name).await?;
    let from = match options.from {
        Some(from) => resolve(&state, partition, from).await?,
        None => consumer_groups::checkpoint(&state.db, &name, partition)
            .await
            .map_err(Error::from)?
            .map_or(0, |s| s + 1),
    };
    Ok(Json(
        read_page(&state, partition, from, options.max, options.wait, format).await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::DeviceCredential;
    use crate::d2c::model::{AuthScope, CONNECTION_DEVICE_ID};

    fn caller() -> DeviceCaller {
        DeviceCaller {
            device_id: "dev-1".parse().unwrap(),
            generation_id: "638000000000000000".into(),
            credential: DeviceCredential::DeviceKey,
        }
    }

    #[test]
    fn single_message_headers_are_filed_and_stamps_win() {
        let mut headers = HeaderMap::new();
        headers.insert("iothub-messageid", "m1".parse().unwrap());
        headers.insert("iothub-contenttype", "application/json".parse().unwrap());
        headers.insert("content-type", "application/octet-stream".parse().unwrap());
        headers.insert("iothub-app-alert", "high".parse().unwrap());
        headers.insert(
            "iothub-connection-device-id",
            "someone-else".parse().unwrap(),
        );
        headers.insert(
            "iothub-to",
            "/devices/dev-1/messages/events".parse().unwrap(),
        );
        headers.insert("dt-subject", "thermostat1".parse().unwrap());
        let event = parse_single(
            &caller(),
            &headers,
            &RequestNames::default(),
            b"{}".to_vec(),
        )
        .unwrap();
        assert_eq!(event.system_properties["iothub-messageid"], "m1");
        assert_eq!(
            event.system_properties["iothub-contenttype"],
            "application/json"
        );
        assert_eq!(event.system_properties["dt-subject"], "thermostat1");
        // The stamps are the sender's; a device's value under their names is not kept.
        assert_eq!(event.sender.device_id, "dev-1");
        assert_eq!(event.sender.scope, AuthScope::Device);
        assert!(!event.system_properties.contains_key(CONNECTION_DEVICE_ID));
        assert!(!event.system_properties.contains_key("iothub-to"));
        // hyper hands header names over in lower case.
        assert_eq!(event.properties["alert"], "high");
    }

    #[test]
    fn batch_elements_and_size_accounting() {
        let body = serde_json::json!([
            {"body": BASE64.encode("a"), "properties": {"iothub-app-Kind": "x", "iothub-messageid": "b1"}},
            {"body": "plain", "base64Encoded": false}
        ]);
        let events = parse_batch(&caller(), body.to_string().as_bytes()).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].body, b"a");
        assert_eq!(events[0].properties["Kind"], "x");
        assert_eq!(events[0].system_properties["iothub-messageid"], "b1");
        assert_eq!(events[1].body, b"plain");

        let bad_name = serde_json::json!([{"body": "", "properties": {"iothub-app-a b": "x"}}]);
        assert!(parse_batch(&caller(), bad_name.to_string().as_bytes()).is_err());
        assert!(parse_batch(&caller(), b"{not json").is_err());
        assert!(parse_batch(&caller(), b"[{\"body\": \"***\"}]").is_err());

        // Exactly at the limit: body + property name + value.
        let exact = serde_json::json!([{"body": "x".repeat(MAX_MESSAGE_SIZE - 5), "base64Encoded": false,
            "properties": {"iothub-app-k": "1234"}}]);
        assert!(parse_batch(&caller(), exact.to_string().as_bytes()).is_ok());
        let over = serde_json::json!([{"body": "x".repeat(MAX_MESSAGE_SIZE - 4), "base64Encoded": false,
            "properties": {"iothub-app-k": "1234"}}]);
        let error = parse_batch(&caller(), over.to_string().as_bytes()).unwrap_err();
        // Over the limit, as one message or as the batch: 413 either way.
        assert!(matches!(
            error,
            Error::TooLarge { .. } | Error::BatchTooLarge { .. }
        ));
    }
}
