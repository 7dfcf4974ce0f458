//! IoT Hub's registry REST API (spec §2.2): the device identity on the wire (spec §2.1), and thin handlers over
//! [`crate::registry::store`].

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::c2d;
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::http::extract::rights::{RegistryRead, RegistryWrite};
use crate::http::extract::{Json, Path, Query, Service};
use crate::http::params::{self, PageSize};
use crate::http::wire::{self, IfMatch};
use crate::http::{ApiVersion, AppState};
use crate::registry::model::{AuthType, DeviceChanges, DeviceRecord, Status};
use crate::registry::store::{self, BulkMode, DeviceFields};
use crate::registry::DeviceId;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(get_device, put_device, delete_device))
        .routes(routes!(list_devices, bulk_devices))
        .routes(routes!(device_statistics))
        .routes(routes!(service_statistics))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct DeviceIdPath {
    /// The device id (percent-encoded in the URL).
    #[param(pattern = r"^[A-Za-z0-9\-:.+%_#*?!(),=@;$']{1,128}$")]
    pub id: String,
}

/// The device with its etag header; its C2D message count is read from the C2D queue.
async fn with_etag(state: &AppState, device: DeviceRecord) -> ApiResult<Response> {
    let etag = format!("\"{}\"", wire::etag(device.etag_version));
    let count = c2d::store::live_count(&state.db, &device.device_id)
        .await
        .map_err(c2d::Error::from)?;
    let mut response = Json(Device::new(device, count)).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(http::header::ETAG, value);
    }
    Ok(response)
}

fn if_match(headers: &HeaderMap) -> Option<IfMatch> {
    headers
        .get(http::header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(IfMatch::parse)
}

/// Get a device identity.
#[utoipa::path(get, path = "/devices/{id}", tag = "registry",
    params(DeviceIdPath, ApiVersion),
    responses(
        (status = 200, description = "The device", body = Device, headers(("ETag" = String, description = "The device's etag, quoted"))),
        (status = 400, description = "Invalid device id", body = ErrorBody),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn get_device(
    _caller: Service<RegistryRead>,
    State(state): State<AppState>,
    Path(DeviceIdPath { id }): Path<DeviceIdPath>,
) -> ApiResult<Response> {
    let id: DeviceId = id.parse()?;
    let device = store::get(&state.db, &id)
        .await?
        .ok_or(crate::registry::Error::DeviceNotFound(id))?;
    with_etag(&state, device).await
}

/// Create a device (no `If-Match`) or update it (`If-Match: "<etag>"` or `"*"`).
///
/// On create, symmetric keys that are absent or empty are generated. On update, keys that are absent stay as they
/// were; an etag that is not the device's current one is refused with 412.
#[utoipa::path(put, path = "/devices/{id}", tag = "registry",
    params(DeviceIdPath, ApiVersion,
        ("If-Match" = Option<String>, Header, description = "Absent: create. `\"<etag>\"` or `\"*\"`: update.")),
    request_body(content = DeviceInput, example = json!({"status": "enabled", "statusReason": "installed"})),
    responses(
        (status = 200, description = "The created or updated device", body = Device),
        (status = 400, description = "Invalid id or body (400004)", body = ErrorBody),
        (status = 404, description = "Update of a device that does not exist (404001)", body = ErrorBody),
        (status = 409, description = "DeviceAlreadyExists (409001)", body = ErrorBody),
        (status = 412, description = "PreconditionFailed: etag mismatch (412001)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn put_device(
    _caller: Service<RegistryWrite>,
    State(state): State<AppState>,
    Path(DeviceIdPath { id }): Path<DeviceIdPath>,
    headers: HeaderMap,
    Json(input): Json<DeviceInput>,
) -> ApiResult<Response> {
    let id: DeviceId = id.parse()?;
    if let Some(body_id) = &input.device_id {
        if id != body_id.as_str() {
            return Err(ApiError::invalid(format!(
                "The body's deviceId '{body_id}' does not match the path's '{id}'"
            )));
        }
    }
    let changes = DeviceChanges::try_from(&input)?;
    let device = match if_match(&headers) {
        None => store::create(&state.db, &id, &DeviceFields::resolve(&changes, None)?).await?,
        Some(if_match) => {
            let expected = if_match.expected_version();
            store::update(&state.db, &*state.credentials, &id, expected, &changes).await?
        }
    };
    with_etag(&state, device).await
}

/// Delete a device and everything queued for it.
#[utoipa::path(delete, path = "/devices/{id}", tag = "registry",
    params(DeviceIdPath, ApiVersion,
        ("If-Match" = Option<String>, Header, description = "`\"<etag>\"` deletes only that version; absent or `\"*\"`: any.")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 412, description = "PreconditionFailed: etag mismatch (412001)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn delete_device(
    _caller: Service<RegistryWrite>,
    State(state): State<AppState>,
    Path(DeviceIdPath { id }): Path<DeviceIdPath>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let id: DeviceId = id.parse()?;
    let if_match = if_match(&headers).unwrap_or(IfMatch::Any);
    store::delete(
        &state.db,
        &*state.credentials,
        &id,
        if_match.expected_version(),
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1–1000 (default 1000).
    #[param(minimum = 1, maximum = 1000)]
    pub top: Option<u32>,
    /// Where the previous page ended (the `x-ms-continuation` header of its answer); may also be sent as a header.
    #[serde(rename = "continuationToken")]
    #[param(rename = "continuationToken", pattern = "^[A-Za-z0-9_-]*$")]
    pub continuation_token: Option<String>,
}

/// List devices in id order, a page at a time.
///
/// When more devices follow, the answer has an `x-ms-continuation` header; send it back (as that header or as
/// `continuationToken=`) for the next page.
#[utoipa::path(get, path = "/devices", tag = "registry",
    params(ApiVersion, ListParams,
        ("x-ms-continuation" = Option<String>, Header, description = "Continue after the previous page", pattern = "^[A-Za-z0-9_-]*$")),
    responses(
        (status = 200, description = "A page of devices", body = [Device],
            headers(("x-ms-continuation" = String, description = "Present when more devices follow"))),
        (status = 400, description = "Invalid top or continuation (400004)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn list_devices(
    _caller: Service<RegistryRead>,
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let top = PageSize::parse("top", params.top.map(|t| t.to_string()).as_deref(), 1000)?;
    let after = params::continuation(params.continuation_token, &headers)?;
    // One more than asked tells whether another page follows.
    let found = store::list(&state.db, after.as_deref(), top.0 + 1).await?;
    let ids: Vec<String> = found.iter().map(|d| d.device_id.clone()).collect();
    let counts = c2d::store::live_counts(&state.db, &ids)
        .await
        .map_err(c2d::Error::from)?;
    let devices: Vec<Device> = found
        .into_iter()
        .map(|d| {
            let count = counts.get(&d.device_id).copied().unwrap_or(0);
            Device::new(d, count)
        })
        .collect();
    Ok(params::page(devices, top, |d| d.device_id.clone()))
}

/// The two shapes of a 400 answer to a bulk request (for the OpenAPI document).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
enum BulkFailure {
    Partial(BulkRegistryOperationResult),
    Malformed(ErrorBody),
}

/// A bulk entry's `importMode` (any case), with the etag it names where it matters.
fn bulk_mode(entry: &ExportImportDevice) -> ApiResult<BulkMode> {
    let expected = || IfMatch::parse(entry.etag.as_deref().unwrap_or("\"\"")).expected_version();
    Ok(match entry.import_mode.to_ascii_lowercase().as_str() {
        "create" => BulkMode::Create,
        "createorupdate" => BulkMode::CreateOrUpdate,
        "update" => BulkMode::Update,
        "updateifmatchetag" => BulkMode::UpdateIfMatchEtag(expected()),
        "delete" => BulkMode::Delete,
        "deleteifmatchetag" => BulkMode::DeleteIfMatchEtag(expected()),
        _ => {
            return Err(ApiError::invalid(format!(
                "Unknown importMode '{}'",
                entry.import_mode
            )))
        }
    })
}

/// At most this many entries in one bulk request, as on IoT Hub.
const BULK_LIMIT: usize = 100;

/// Create, update or delete up to 100 devices in one request.
///
/// Each entry is applied on its own; the answer lists the entries that failed. `200` when all succeeded, `400` with
/// the same body when any failed.
#[utoipa::path(post, path = "/devices", tag = "registry",
    params(ApiVersion),
    request_body(content = [ExportImportDevice], example = json!([{"id": "d1", "importMode": "create"}, {"id": "d2", "importMode": "delete"}])),
    responses(
        (status = 200, description = "Every entry applied", body = BulkRegistryOperationResult),
        (status = 400, description = "Some entries failed (a BulkRegistryOperationResult lists them), or the request is malformed (an ErrorBody)", body = BulkFailure),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn bulk_devices(
    _caller: Service<RegistryWrite>,
    State(state): State<AppState>,
    Json(entries): Json<Vec<ExportImportDevice>>,
) -> ApiResult<Response> {
    if entries.is_empty() || entries.len() > BULK_LIMIT {
        return Err(ApiError::invalid(format!(
            "A bulk request takes 1 to {BULK_LIMIT} devices"
        )));
    }
    let mut errors = Vec::new();
    for entry in &entries {
        let outcome = async {
            let id: DeviceId = entry.id.parse()?;
            let mode = bulk_mode(entry)?;
            let changes = DeviceChanges::try_from(entry)?;
            store::apply_bulk(&state.db, &*state.credentials, &id, &mode, &changes).await?;
            Ok::<_, ApiError>(())
        }
        .await;
        if let Err(e) = outcome {
            if e.code.status().is_server_error() {
                return Err(e);
            }
            errors.push(DeviceRegistryOperationError {
                device_id: entry.id.clone(),
                error_code: e.code.name().to_string(),
                error_status: e.message,
            });
        }
    }
    let result = BulkRegistryOperationResult {
        is_successful: errors.is_empty(),
        errors,
        warnings: Vec::new(),
    };
    let status = if result.is_successful {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok((status, Json(result)).into_response())
}

/// Device counts.
#[utoipa::path(get, path = "/statistics/devices", tag = "registry",
    params(ApiVersion),
    responses(
        (status = 200, description = "Counts of devices", body = RegistryStatistics),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn device_statistics(
    _caller: Service<RegistryRead>,
    State(state): State<AppState>,
) -> ApiResult<Json<RegistryStatistics>> {
    let counts = store::statistics(&state.db).await?;
    Ok(Json(RegistryStatistics {
        total_device_count: counts.total,
        enabled_device_count: counts.enabled,
        disabled_device_count: counts.disabled,
    }))
}

/// Service statistics.
#[utoipa::path(get, path = "/statistics/service", tag = "registry",
    params(ApiVersion),
    responses(
        (status = 200, description = "Devices connected over MQTT now", body = ServiceStatistics),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn service_statistics(
    _caller: Service<RegistryRead>,
    State(state): State<AppState>,
) -> ApiResult<Json<ServiceStatistics>> {
    let connected = crate::registry::connection::connected_count(&state.db)
        .await
        .map_err(crate::registry::Error::from)?;
    Ok(Json(ServiceStatistics {
        connected_device_count: connected,
    }))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    #[serde(default)]
    pub primary_key: Option<String>,
    #[serde(default)]
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    #[serde(default)]
    pub primary_thumbprint: Option<String>,
    #[serde(default)]
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(default)]
    pub symmetric_key: Option<SymmetricKey>,
    #[serde(default)]
    pub x509_thumbprint: Option<X509Thumbprint>,
    /// `sas` (default), `selfSigned`, `certificateAuthority` or `none`.
    #[serde(rename = "type", default)]
    pub auth_type: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    #[serde(default)]
    pub iot_edge: bool,
}

/// A device identity on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({
    "deviceId": "thermostat-1", "generationId": "639002304000000000", "etag": "MTIzNDU2Nzg5",
    "connectionState": "Disconnected", "status": "enabled", "statusReason": null,
    "connectionStateUpdatedTime": "0001-01-01T00:00:00Z", "statusUpdatedTime": "0001-01-01T00:00:00Z",
    "lastActivityTime": "0001-01-01T00:00:00Z", "cloudToDeviceMessageCount": 0,
    "authentication": {"symmetricKey": {"primaryKey": "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm8=",
        "secondaryKey": "YmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmE="},
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null}, "type": "sas"},
    "capabilities": {"iotEdge": false}
}))]
pub struct Device {
    pub device_id: String,
    pub generation_id: String,
    pub etag: String,
    /// `Connected` while the device holds an MQTT connection, else `Disconnected`.
    pub connection_state: String,
    pub status: String,
    pub status_reason: Option<String>,
    pub connection_state_updated_time: String,
    pub status_updated_time: String,
    pub last_activity_time: String,
    pub cloud_to_device_message_count: i64,
    pub authentication: Authentication,
    pub capabilities: Capabilities,
}

impl Device {
    /// The wire form of a device record with its count of live C2D messages.
    fn new(r: DeviceRecord, c2d_message_count: i64) -> Device {
        Device {
            etag: wire::etag(r.etag_version),
            device_id: r.device_id,
            generation_id: r.generation_id,
            connection_state: r.connection_state.to_string(),
            status: r.status.to_string(),
            status_reason: r.status_reason,
            connection_state_updated_time: wire::format_optional_time(
                r.connection_state_updated_time,
            ),
            status_updated_time: wire::format_optional_time(r.status_updated_time),
            last_activity_time: wire::format_optional_time(r.last_activity_time),
            cloud_to_device_message_count: c2d_message_count,
            authentication: Authentication {
                symmetric_key: Some(SymmetricKey {
                    primary_key: r.primary_key,
                    secondary_key: r.secondary_key,
                }),
                x509_thumbprint: Some(X509Thumbprint {
                    primary_thumbprint: r.primary_thumbprint,
                    secondary_thumbprint: r.secondary_thumbprint,
                }),
                auth_type: Some(r.auth_type.to_string()),
            },
            capabilities: Capabilities {
                iot_edge: r.iot_edge,
            },
        }
    }
}

/// The core's view of what a client asks to set (the same for a PUT and a bulk entry).
fn changes(
    status: &Option<String>,
    status_reason: &Option<String>,
    authentication: &Option<Authentication>,
    capabilities: &Option<Capabilities>,
) -> ApiResult<DeviceChanges> {
    let auth = authentication.clone().unwrap_or_default();
    let keys = auth.symmetric_key.unwrap_or_default();
    let thumbprints = auth.x509_thumbprint.unwrap_or_default();
    let status = match status.as_deref() {
        None => None,
        Some(s) => Some(
            Status::parse(s)
                .ok_or_else(|| ApiError::invalid(format!("Invalid device status '{s}'")))?,
        ),
    };
    let auth_type = match auth.auth_type.as_deref() {
        None => None,
        Some(t) => Some(
            AuthType::parse(t)
                .ok_or_else(|| ApiError::invalid(format!("Invalid authentication type '{t}'")))?,
        ),
    };
    Ok(DeviceChanges {
        status,
        status_reason: status_reason.clone(),
        auth_type,
        primary_key: keys.primary_key,
        secondary_key: keys.secondary_key,
        primary_thumbprint: thumbprints.primary_thumbprint,
        secondary_thumbprint: thumbprints.secondary_thumbprint,
        iot_edge: capabilities.as_ref().map(|c| c.iot_edge),
    })
}

impl TryFrom<&DeviceInput> for DeviceChanges {
    type Error = ApiError;
    fn try_from(input: &DeviceInput) -> ApiResult<DeviceChanges> {
        changes(
            &input.status,
            &input.status_reason,
            &input.authentication,
            &input.capabilities,
        )
    }
}

impl TryFrom<&ExportImportDevice> for DeviceChanges {
    type Error = ApiError;
    fn try_from(entry: &ExportImportDevice) -> ApiResult<DeviceChanges> {
        changes(
            &entry.status,
            &entry.status_reason,
            &entry.authentication,
            &entry.capabilities,
        )
    }
}

/// What a client sends to create or update a device. Read-only fields (`generationId`, times, counts) are
/// ignored; `etag` in the body is ignored too (the `If-Match` header decides).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceInput {
    #[serde(default)]
    pub device_id: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub authentication: Option<Authentication>,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub etag: Option<String>,
}

/// `GET /statistics/devices`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatistics {
    pub total_device_count: i64,
    pub enabled_device_count: i64,
    pub disabled_device_count: i64,
}

/// `GET /statistics/service`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatistics {
    /// Devices with an open MQTT connection.
    pub connected_device_count: i64,
}

/// One entry of a bulk registry request (`POST /devices`), as the SDKs send it.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportImportDevice {
    pub id: String,
    #[serde(default, rename = "eTag")]
    pub etag: Option<String>,
    /// `create`, `createOrUpdate`, `update`, `updateIfMatchETag`, `delete` or `deleteIfMatchETag`
    /// (case-insensitive).
    pub import_mode: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub status_reason: Option<String>,
    #[serde(default)]
    pub authentication: Option<Authentication>,
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRegistryOperationError {
    pub device_id: String,
    pub error_code: String,
    pub error_status: String,
}

/// The answer to a bulk registry request.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BulkRegistryOperationResult {
    pub is_successful: bool,
    pub errors: Vec<DeviceRegistryOperationError>,
    pub warnings: Vec<DeviceRegistryOperationError>,
}
