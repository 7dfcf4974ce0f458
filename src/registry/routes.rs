//! IoT Hub's registry REST API (spec §2.2): thin handlers over [`super::store`].

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::*;
use super::store::{self, BulkMode, DeviceFields};
use super::valid_device_id;
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::http::extract::rights::{RegistryRead, RegistryWrite};
use crate::http::extract::{Json, Path, Query, Service};
use crate::http::wire::{self, IfMatch};
use crate::http::ApiVersion;
use crate::AppState;

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

fn checked_id(id: &str) -> ApiResult<&str> {
    if valid_device_id(id) {
        Ok(id)
    } else {
        Err(ApiError::invalid(format!(
            "Device id '{id}' is invalid: 1-128 ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ '"
        )))
    }
}

fn with_etag(device: DeviceRecord) -> Response {
    let etag = format!("\"{}\"", device.etag());
    let mut response = Json(Device::from(device)).into_response();
    if let Ok(value) = HeaderValue::from_str(&etag) {
        response.headers_mut().insert(http::header::ETAG, value);
    }
    response
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
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "DeviceNotFound (404001)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn get_device(
    _caller: Service<RegistryRead>,
    State(state): State<AppState>,
    Path(DeviceIdPath { id }): Path<DeviceIdPath>,
) -> ApiResult<Response> {
    let device = store::get(&state.db, checked_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::device_not_found(&id))?;
    Ok(with_etag(device))
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
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
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
    let id = checked_id(&id)?;
    if let Some(body_id) = &input.device_id {
        if body_id != id {
            return Err(ApiError::invalid(format!(
                "The body's deviceId '{body_id}' does not match the path's '{id}'"
            )));
        }
    }
    let device = match if_match(&headers) {
        None => store::create(&state.db, id, &DeviceFields::resolve(&input, None)?).await?,
        Some(if_match) => store::update(&state.db, id, &if_match, &input).await?,
    };
    state.credentials.forget_device(id);
    Ok(with_etag(device))
}

/// Delete a device and everything queued for it.
#[utoipa::path(delete, path = "/devices/{id}", tag = "registry",
    params(DeviceIdPath, ApiVersion,
        ("If-Match" = Option<String>, Header, description = "`\"<etag>\"` deletes only that version; absent or `\"*\"`: any.")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 404, description = "DeviceNotFound (404001)", body = ErrorBody),
        (status = 412, description = "PreconditionFailed: etag mismatch (412001)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryWrite"])))]
async fn delete_device(
    _caller: Service<RegistryWrite>,
    State(state): State<AppState>,
    Path(DeviceIdPath { id }): Path<DeviceIdPath>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let if_match = if_match(&headers).unwrap_or(IfMatch::Any);
    store::delete(&state.db, checked_id(&id)?, &if_match).await?;
    state.credentials.forget_device(&id);
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

const CONTINUATION: &str = "x-ms-continuation";

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
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn list_devices(
    _caller: Service<RegistryRead>,
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let top = match params.top {
        None => 1000,
        Some(n) if (1..=1000).contains(&n) => i64::from(n),
        Some(_) => {
            return Err(ApiError::invalid(
                "top must be a whole number from 1 to 1000",
            ))
        }
    };
    let token = params.continuation_token.or_else(|| {
        headers
            .get(CONTINUATION)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    });
    let after = match token.filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(
            wire::decode_continuation(&t)
                .ok_or_else(|| ApiError::invalid("Invalid continuation token"))?,
        ),
    };
    // One more than asked tells whether another page follows.
    let mut page = store::list(&state.db, after.as_deref(), top + 1).await?;
    let more = page.len() as i64 > top;
    page.truncate(top as usize);
    let next =
        more.then(|| wire::encode_continuation(&page.last().expect("a full page").device_id));
    let devices: Vec<Device> = page.into_iter().map(Device::from).collect();
    let mut response = Json(devices).into_response();
    if let Some(next) = next {
        response.headers_mut().insert(
            CONTINUATION,
            HeaderValue::from_str(&next).expect("base64url"),
        );
    }
    Ok(response)
}

/// The two shapes of a 400 answer to a bulk request (for the OpenAPI document).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
#[serde(untagged)]
enum BulkFailure {
    Partial(BulkRegistryOperationResult),
    Malformed(ErrorBody),
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
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
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
            let id = checked_id(&entry.id)?;
            let mode = BulkMode::parse(&entry.import_mode).ok_or_else(|| {
                ApiError::invalid(format!("Unknown importMode '{}'", entry.import_mode))
            })?;
            let input = DeviceInput {
                device_id: Some(entry.id.clone()),
                status: entry.status.clone(),
                status_reason: entry.status_reason.clone(),
                authentication: entry.authentication.clone(),
                capabilities: entry.capabilities.clone(),
                etag: None,
            };
            let applied =
                store::apply_bulk(&state.db, id, &mode, entry.etag.as_deref(), &input).await;
            state.credentials.forget_device(id);
            applied
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
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn device_statistics(
    _caller: Service<RegistryRead>,
    State(state): State<AppState>,
) -> ApiResult<Json<RegistryStatistics>> {
    let (total, enabled, disabled) = store::statistics(&state.db).await?;
    Ok(Json(RegistryStatistics {
        total_device_count: total,
        enabled_device_count: enabled,
        disabled_device_count: disabled,
    }))
}

/// Service statistics.
#[utoipa::path(get, path = "/statistics/service", tag = "registry",
    params(ApiVersion),
    responses(
        (status = 200, description = "Connected devices (always 0: HTTPS devices do not stay connected)", body = ServiceStatistics),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
    ),
    security(("sas" = ["RegistryRead"])))]
async fn service_statistics(_caller: Service<RegistryRead>) -> Json<ServiceStatistics> {
    Json(ServiceStatistics {
        connected_device_count: 0,
    })
}
