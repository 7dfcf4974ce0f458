//! D2C over HTTP: the device's send (IoT Hub's wire format) and the service's read API (an extension).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{self, Event, MAX_MESSAGE_SIZE};
use super::store;
use crate::http::casing::RequestNames;
use crate::http::error::{ApiError, ApiResult, ErrorBody, ErrorCode};
use crate::http::extract::rights::ServiceConnect;
use crate::http::extract::{Device, Json, Path, Query, Service};
use crate::http::wire::format_time;
use crate::http::ApiVersion;
use crate::notify::channel;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(send_events))
        .routes(routes!(endpoint_info))
        .routes(routes!(read_partition))
        .routes(routes!(list_groups))
        .routes(routes!(get_group, put_group, delete_group))
        .routes(routes!(read_group_partition))
        .routes(routes!(put_checkpoint))
        .routes(routes!(super::stream::stream))
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
    request_body(content = Vec<model::BatchItem>, description = "The raw message body, or a batch (JSON array) with `Content-Type: application/vnd.microsoft.iothub.json`",
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
    let events = if model::is_batch(&headers) {
        model::parse_batch(&caller, &body)?
    } else {
        if body.len() > MAX_MESSAGE_SIZE {
            return Err(ApiError::too_large(MAX_MESSAGE_SIZE));
        }
        vec![model::parse_single(
            &caller,
            &headers,
            &names,
            body.to_vec(),
        )?]
    };
    let partition = state.d2c.partition_of(&caller.device_id);
    state.d2c.ingest.submit(partition, events).await?;
    Ok(StatusCode::NO_CONTENT)
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
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn endpoint_info(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
) -> ApiResult<Json<EndpointInfo>> {
    let partitions = store::partitions(&state.db).await?;
    Ok(Json(EndpointInfo {
        partition_count: state.d2c.partitions,
        partition_ids: (0..state.d2c.partitions).map(|p| p.to_string()).collect(),
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
    max: i64,
    wait: Duration,
}

impl ReadQuery {
    fn parse(&self) -> ApiResult<ReadOptions> {
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
        let max = match &self.max_count {
            None => 100,
            Some(s) => s
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| ApiError::invalid("max-count must be 1 to 1000"))?,
        };
        let wait = match &self.wait_ms {
            None => 0,
            Some(s) => s
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= 30_000)
                .ok_or_else(|| ApiError::invalid("wait-ms must be 0 to 30000"))?,
        };
        Ok(ReadOptions {
            from,
            max,
            wait: Duration::from_millis(wait),
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
pub fn checked_partition(state: &AppState, p: &str) -> ApiResult<u32> {
    let n: u32 = p
        .parse()
        .map_err(|_| ApiError::invalid(format!("Partition id '{p}' is not a number")))?;
    if n >= state.d2c.partitions {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "No partition {n}: the hub has {} partitions",
                state.d2c.partitions
            ),
        ));
    }
    Ok(n)
}

async fn resolve(state: &AppState, partition: u32, from: Position) -> ApiResult<i64> {
    Ok(match from {
        Position::Seq(n) => n,
        Position::Start => 0,
        Position::End => store::next_seq(&state.db, partition).await?,
        Position::Time(t) => store::seq_at_time(&state.db, partition, t).await?,
    })
}

/// Reads up to `max` events from `from`; with a wait, answers as soon as one is there (woken by the commit's
/// notification) or empty when the wait ends.
async fn read_page(
    state: &AppState,
    partition: u32,
    from: i64,
    max: i64,
    wait: Duration,
) -> ApiResult<EventPage> {
    // The request timeout bounds every request; end the wait a little before it.
    let wait = wait.min(
        state
            .config
            .request_timeout()
            .saturating_sub(Duration::from_secs(2)),
    );
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before the first look, so a commit between the look and the wait still wakes us.
    let mut sub = state
        .notifier
        .subscribe(channel::D2C, &partition.to_string());
    let mut shutdown = state.shutdown.clone();
    loop {
        let events = store::read(&state.db, partition, from, max).await?;
        if !events.is_empty() || tokio::time::Instant::now() >= deadline || *shutdown.borrow() {
            let next = events.last().map_or(from, |e| e.seq + 1);
            return Ok(EventPage {
                partition_id: partition.to_string(),
                events: events.into_iter().map(Event::from).collect(),
                next_sequence_number: next,
            });
        }
        tokio::select! {
            _ = sub.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct PartitionPath {
    /// Partition id, `0` to partition count − 1.
    pub p: String,
}

/// Read events of one partition from a position (default: the oldest retained event).
#[utoipa::path(get, path = "/messages/events/partitions/{p}", tag = "telemetry",
    params(PartitionPath, ReadQuery, ApiVersion),
    responses(
        (status = 200, description = "Events in sequence order and where to continue", body = EventPage),
        (status = 400, description = "Bad query value or partition id (400004)", body = ErrorBody),
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "No such partition (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn read_partition(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(PartitionPath { p }): Path<PartitionPath>,
    Query(query): Query<ReadQuery>,
) -> ApiResult<Json<EventPage>> {
    let partition = checked_partition(&state, &p)?;
    let options = query.parse()?;
    let from = resolve(&state, partition, options.from.unwrap_or(Position::Start)).await?;
    Ok(Json(
        read_page(&state, partition, from, options.max, options.wait).await?,
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

impl From<store::ConsumerGroup> for ConsumerGroup {
    fn from(g: store::ConsumerGroup) -> Self {
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

pub const DEFAULT_GROUP: &str = "$Default";

/// Consumer group names: `$Default`, or 1–50 letters, digits, `-`, `.`, `_`.
pub fn valid_group_name(name: &str) -> bool {
    name == DEFAULT_GROUP
        || ((1..=50).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')))
}

fn checked_group(name: &str) -> ApiResult<&str> {
    if valid_group_name(name) {
        Ok(name)
    } else {
        Err(ApiError::invalid(format!(
            "Consumer group name '{name}' is invalid: 1-50 letters, digits, '-', '.', '_'"
        )))
    }
}

fn group_not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("No consumer group {name}"))
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
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn list_groups(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
) -> ApiResult<Json<Vec<ConsumerGroup>>> {
    let groups = store::list_groups(&state.db).await?;
    Ok(Json(groups.into_iter().map(ConsumerGroup::from).collect()))
}

/// One consumer group with its checkpoints.
#[utoipa::path(get, path = "/messages/events/consumerGroups/{cg}", tag = "telemetry",
    params(GroupPath, ApiVersion),
    responses(
        (status = 200, description = "The group", body = ConsumerGroup),
        (status = 400, description = "Invalid name (400004)", body = ErrorBody),
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "No such group (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn get_group(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPath { cg }): Path<GroupPath>,
) -> ApiResult<Json<ConsumerGroup>> {
    let group = store::get_group(&state.db, checked_group(&cg)?)
        .await?
        .ok_or_else(|| group_not_found(&cg))?;
    Ok(Json(group.into()))
}

/// Create a consumer group (201), or confirm an existing one (200).
#[utoipa::path(put, path = "/messages/events/consumerGroups/{cg}", tag = "telemetry",
    params(GroupPath, ApiVersion),
    responses(
        (status = 201, description = "Created", body = ConsumerGroup),
        (status = 200, description = "It existed already", body = ConsumerGroup),
        (status = 400, description = "Invalid name (400004)", body = ErrorBody),
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
        (status = 403, description = "The hub has as many groups as it allows (403002)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn put_group(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPath { cg }): Path<GroupPath>,
) -> ApiResult<Response> {
    let name = checked_group(&cg)?;
    let created = store::create_group(&state.db, name, state.d2c.max_consumer_groups).await?;
    let group = store::get_group(&state.db, name)
        .await?
        .ok_or_else(|| group_not_found(name))?;
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
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "No such group (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn delete_group(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPath { cg }): Path<GroupPath>,
) -> ApiResult<StatusCode> {
    let name = checked_group(&cg)?;
    if name == DEFAULT_GROUP {
        return Err(ApiError::invalid("$Default always exists"));
    }
    if store::delete_group(&state.db, name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(group_not_found(name))
    }
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
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "No such group or partition (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn put_checkpoint(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPartitionPath { cg, p }): Path<GroupPartitionPath>,
    Json(input): Json<CheckpointInput>,
) -> ApiResult<Json<Checkpoint>> {
    let name = checked_group(&cg)?;
    let partition = checked_partition(&state, &p)?;
    store::set_checkpoint(&state.db, name, partition, input.sequence_number).await?;
    Ok(Json(Checkpoint {
        consumer_group: name.to_string(),
        partition_id: partition.to_string(),
        sequence_number: input.sequence_number,
    }))
}

/// Read a partition through a group: from just after the group's checkpoint (or the oldest retained event when it
/// has none), unless a `from…` option says otherwise. Reading does not move the checkpoint.
#[utoipa::path(get, path = "/messages/events/consumerGroups/{cg}/partitions/{p}", tag = "telemetry",
    params(GroupPartitionPath, ReadQuery, ApiVersion),
    responses(
        (status = 200, description = "Events in sequence order and where to continue", body = EventPage),
        (status = 400, description = "Bad query value, group name or partition id (400004)", body = ErrorBody),
        (status = 401, description = "Missing or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "No such group or partition (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn read_group_partition(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPartitionPath { cg, p }): Path<GroupPartitionPath>,
    Query(query): Query<ReadQuery>,
) -> ApiResult<Json<EventPage>> {
    let name = checked_group(&cg)?;
    let partition = checked_partition(&state, &p)?;
    let options = query.parse()?;
    store::get_group(&state.db, name)
        .await?
        .ok_or_else(|| group_not_found(name))?;
    let from = match options.from {
        Some(from) => resolve(&state, partition, from).await?,
        None => store::checkpoint(&state.db, name, partition)
            .await?
            .map_or(0, |s| s + 1),
    };
    Ok(Json(
        read_page(&state, partition, from, options.max, options.wait).await?,
    ))
}

pub(super) fn group_missing(name: &str) -> ApiError {
    group_not_found(name)
}

pub(super) fn checked_group_name(name: &str) -> ApiResult<&str> {
    checked_group(name)
}

#[cfg(test)]
mod tests {
    use super::valid_group_name;

    #[test]
    fn group_names() {
        assert!(valid_group_name("$Default"));
        assert!(valid_group_name("analytics-1.v2_x"));
        assert!(valid_group_name(&"a".repeat(50)));
        assert!(!valid_group_name(&"a".repeat(51)));
        assert!(!valid_group_name(""));
        assert!(!valid_group_name("$Other"));
        assert!(!valid_group_name("a b"));
    }
}
