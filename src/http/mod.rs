//! The HTTP way in: IoT Hub's HTTPS API and the hub's REST extensions, over the core.
//!
//! [`routes`] holds one file per domain (handlers and their OpenAPI annotations); the rest is what every route
//! shares: router assembly, the error type and its mapping of core errors, extractors, query parameters, long
//! polls, header casing, OpenAPI, and the listeners.

pub mod casing;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod normalize;
pub mod params;
pub mod poll;
pub mod routes;
pub mod serve;
pub mod wire;

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use error::{ApiError, ErrorCode};
use routes::ops;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState(pub Arc<AppInner>);

pub struct AppInner {
    pub db: sqlx::PgPool,
    pub config: crate::config::Config,
    /// Turns true when the hub is stopping, so long polls can end early.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Wake-ups for long polls when a transaction commits something they wait for.
    pub notifier: crate::notify::Notifier,
    /// Keys and statuses for authentication, cached briefly.
    pub credentials: Arc<crate::auth::Credentials>,
    /// Token buckets per operation class (empty unless configured).
    pub throttle: Arc<crate::throttle::Throttle>,
    /// Device-to-cloud streams: partition writers and stream settings.
    pub d2c: Arc<crate::d2c::D2c>,
    /// Cloud-to-device enqueues: the group-commit writer.
    pub c2d: Arc<crate::c2d::writer::Writer>,
    /// MQTT, for connections that arrive as WebSockets.
    pub mqtt: Arc<crate::mqtt::Endpoint>,
}

impl Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// Registry and policy bodies can be large (bulk requests of 100 devices); message routes check their own limits.
const BODY_LIMIT: usize = 1024 * 1024;

/// The `api-version` query parameter every IoT Hub path takes.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ApiVersion {
    /// One of the versions the Azure SDKs send, e.g. `2021-04-12`.
    #[serde(rename = "api-version")]
    #[param(rename = "api-version", example = "2021-04-12")]
    pub api_version: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "iothub",
        description = "A self-hosted IoT messaging hub, wire-compatible with Azure IoT Hub's HTTPS device and \
            registry API. Every call but the operations endpoints needs `Authorization: SharedAccessSignature ...` \
            (print one with `iothub token`) and `?api-version=` (e.g. 2021-04-12). Errors have IoT Hub's body \
            `{\"Message\": \"ErrorCode:<Name>;<text>\", \"ExceptionMessage\": ...}` and an `iothub-errorcode` header."
    ),
    modifiers(&SasSecurity),
    tags(
        (name = "registry", description = "Device identities (IoT Hub's registry API)"),
        (name = "policies", description = "Shared access policies (an extension)"),
        (name = "c2d", description = "Cloud-to-device messages: the service's queue calls and the device's receive and settlement"),
        (name = "feedback", description = "Delivery feedback for cloud-to-device messages"),
        (name = "operations", description = "Health, readiness and metrics"),
        (name = "telemetry", description = "Device-to-cloud telemetry: device sends (IoT Hub's) and the event stream read API (an extension)"),
    )
)]
struct ApiDoc;

struct SasSecurity;

impl Modify for SasSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "sas",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "`SharedAccessSignature sr=...&sig=...&se=...[&skn=policy]`",
            ))),
        );
    }
}

/// What every IoT Hub route can answer besides its own responses, added to each operation in one place: bad
/// `api-version` or input (400), authorization (401), throttling (429), database unavailable (503), and for
/// routes with a body, too large (413) or not JSON (415). Also pins `api-version` to the versions accepted.
struct StandardResponses;

impl Modify for StandardResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let per_device = path.starts_with("/devices/{id}");
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                add_standard_responses(op, per_device);
            }
        }
    }
}

/// The answers every authenticated IoT Hub operation can give, unless the operation describes them itself.
fn add_standard_responses(op: &mut utoipa::openapi::path::Operation, per_device: bool) {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

    if op.security.is_none() {
        return;
    }
    let mut add = |status: &str, description: &str| {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| {
                let body = ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build();
                RefOr::T(
                    ResponseBuilder::new()
                        .description(description)
                        .content("application/json", body)
                        .build(),
                )
            });
    };
    add("400", "Missing or unsupported api-version (InvalidProtocolVersion, 400001), or invalid input (ArgumentInvalid, 400004)");
    add(
        "401",
        "Missing, invalid, expired or insufficient token (IotHubUnauthorizedAccess, 401002)",
    );
    add(
        "429",
        "Throttled (ThrottlingException, 429001); see Retry-After",
    );
    add(
        "503",
        "The database is unavailable (ServiceUnavailable, 503001); see Retry-After",
    );
    if per_device {
        add("404", "No such device (DeviceNotFound, 404001)");
    }
    if op.request_body.is_some() {
        add("413", "The body is too large (MessageTooLarge, 413001)");
        add("415", "The body is not JSON (UnsupportedMediaType)");
    }
    let versions = ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(normalize::API_VERSIONS.iter().copied()))
        .build();
    for parameter in op.parameters.iter_mut().flatten() {
        if parameter.name == "api-version" {
            parameter.schema = Some(RefOr::T(versions.clone().into()));
        }
    }
}

/// Every API route with its OpenAPI description.
fn api() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(routes::registry::router())
        .merge(routes::c2d::router())
        .merge(routes::feedback::router())
        .merge(routes::policies::router())
        .merge(routes::d2c::router())
        .merge(ops::router())
        .merge(routes::websocket::router())
        .split_for_parts();
    // After the merge: the document's paths exist only now.
    StandardResponses.modify(&mut doc);
    (router, doc)
}

/// The OpenAPI document, as served at `/openapi.json` and committed in `openapi/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api().1
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let (api, doc) = api();
    let timeout = state.config.request_timeout();
    let concurrency = state.config.max_concurrent_requests;
    let inner = api
        .merge(SwaggerUi::new("/docs").url("/openapi.json", doc))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(move |r, n| with_timeout(timeout, r, n)))
        .layer(middleware::from_fn(metrics::track))
        .layer(middleware::from_fn(casing::exact_header_case))
        .layer(middleware::from_fn(casing::recover_request_case))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(concurrency))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("Internal error").into_response()
        }))
        .with_state(state);
    // Path normalisation must run before routing, so it wraps the router instead of being one of its layers.
    Router::new()
        .fallback_service(inner)
        .layer(middleware::from_fn(normalize::normalize))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
            }),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Tokens travel in this header: keep them out of every log line.
        .layer(SetSensitiveRequestHeadersLayer::new([http::header::AUTHORIZATION]))
}

async fn with_timeout(timeout: Duration, request: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            ApiError::new(ErrorCode::GatewayTimeout, "The request took too long").into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "No such resource")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "Method not allowed on this resource",
    )
}
