//! Typed extractors: who is calling (with which right), and request parts parsed with errors in IoT Hub's shape.

use std::marker::PhantomData;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::request::Parts;
use percent_encoding::percent_decode_str;
use serde::Deserialize;

use super::error::{ApiError, ErrorCode};
use super::AppState;
use crate::auth::{self, DeviceCaller, PolicyCaller, Right};
use crate::throttle::Operation;

/// The right a service endpoint needs; see [`Service`].
pub trait NeedsRight: Send + Sync + 'static {
    const RIGHT: Right;
}

/// Marker types naming rights at the type level: `Service<RegistryWrite>`.
pub mod rights {
    use super::*;
    pub struct RegistryRead;
    pub struct RegistryWrite;
    pub struct ServiceConnect;
    impl NeedsRight for RegistryRead {
        const RIGHT: Right = Right::RegistryRead;
    }
    impl NeedsRight for RegistryWrite {
        const RIGHT: Right = Right::RegistryWrite;
    }
    impl NeedsRight for ServiceConnect {
        const RIGHT: Right = Right::ServiceConnect;
    }
}

/// A caller holding a policy token with right `R` whose scope covers the request path.
pub struct Service<R: NeedsRight> {
    pub caller: PolicyCaller,
    _right: PhantomData<R>,
}

impl<R: NeedsRight> FromRequestParts<AppState> for Service<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = auth::authorize_policy(
            &state.credentials,
            &state.config.hostname,
            authorization(parts),
            &target(parts),
            R::RIGHT,
        )
        .await?;
        throttle(parts, state, None)?;
        Ok(Service {
            caller,
            _right: PhantomData,
        })
    }
}

/// A caller allowed to act as the device named by the path's `{id}`.
pub struct Device(pub DeviceCaller);

#[derive(Deserialize)]
struct DeviceIdParam {
    id: String,
}

impl FromRequestParts<AppState> for Device {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(DeviceIdParam { id }) = Path::from_request_parts(parts, state).await?;
        let caller = auth::authorize_device(
            &state.credentials,
            &state.config.hostname,
            authorization(parts),
            &id,
            &target(parts),
        )
        .await?;
        throttle(parts, state, Some(caller.device_id.as_str()))?;
        Ok(Device(caller))
    }
}

/// Counts an authenticated request against the throttle of its operation class (after authentication, so
/// anonymous traffic cannot drain a device's bucket).
fn throttle(parts: &Parts, state: &AppState, device: Option<&str>) -> Result<(), ApiError> {
    let Some(route) = parts.extensions.get::<axum::extract::MatchedPath>() else {
        return Ok(());
    };
    let Some(operation) = operation(&parts.method, route.as_str()) else {
        return Ok(());
    };
    // Service calls on one device's resources (C2D send) count against that device too.
    let path_device = device.map(str::to_string).or_else(|| {
        let mut segments = parts.uri.path().trim_start_matches('/').split('/');
        (segments.next() == Some("devices"))
            .then(|| segments.next())
            .flatten()
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
    });
    Ok(state.throttle.check(operation, path_device.as_deref())?)
}

/// The operation class a request counts against, from its method and route template.
fn operation(method: &http::Method, route: &str) -> Option<Operation> {
    use http::Method;
    match (method, route) {
        (&Method::POST, "/devices/{id}/messages/events") => Some(Operation::D2cSend),
        (&Method::GET, "/devices/{id}/messages/deviceBound") => Some(Operation::C2dReceive),
        (&Method::POST, "/devices/{id}/commands") => Some(Operation::C2dSend),
        (_, "/devices" | "/devices/{id}" | "/statistics/devices" | "/statistics/service") => {
            Some(Operation::Registry)
        }
        _ => None,
    }
}

fn authorization(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The request path as decoded segments: the resource a token's scope must cover.
fn target(parts: &Parts) -> Vec<String> {
    parts
        .uri
        .path()
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect()
}

/// `axum::Json` with IoT Hub errors.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: serde::Serialize> axum::response::IntoResponse for Json<T> {
    fn into_response(self) -> axum::response::Response {
        axum::Json(self.0).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match &rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "Expected Content-Type: application/json",
            ),
            JsonRejection::BytesRejection(_) if rejection.status() == 413 => {
                ApiError::new(ErrorCode::MessageTooLarge, "The request body is too large")
            }
            _ => ApiError::invalid(format!("Malformed JSON body: {}", rejection.body_text())),
        }
    }
}

/// `axum::extract::Path` with IoT Hub errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::invalid(format!("Invalid path: {}", rejection.body_text()))
    }
}

/// `axum::extract::Query` with IoT Hub errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid(format!("Invalid query: {}", rejection.body_text()))
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::BytesRejection) -> Self {
        if rejection.status() == 413 {
            ApiError::new(ErrorCode::MessageTooLarge, "The request body is too large")
        } else {
            ApiError::invalid(format!(
                "Cannot read the request body: {}",
                rejection.body_text()
            ))
        }
    }
}
