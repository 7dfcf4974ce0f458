//! Operations endpoints: liveness, readiness (the database answers) and Prometheus metrics.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::error::{ApiError, ErrorBody, ErrorCode};
use crate::http::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

/// The process is up.
#[utoipa::path(get, path = "/health/live", tag = "operations",
    responses((status = 200, description = "Alive", body = String, example = "ok")))]
async fn live() -> &'static str {
    "ok"
}

/// The hub can serve: its database answers.
#[utoipa::path(get, path = "/health/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = String, example = "ok"),
        (status = 503, description = "The database does not answer (503001)", body = ErrorBody),
    ))]
async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    let ping = sqlx::query("SELECT 1").execute(&state.db);
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => Ok("ok"),
        _ => Err(ApiError::unavailable("The database does not answer")),
    }
}

/// Prometheus metrics (here unless `IOTHUB_METRICS_LISTEN` gives them a listener of their own).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 404, description = "Metrics are served on their own listener", body = ErrorBody),
    ))]
async fn metrics(State(state): State<AppState>) -> Response {
    if state.config.metrics_listen.is_some() {
        return ApiError::new(
            ErrorCode::NotFound,
            "Metrics are served on their own listener",
        )
        .into_response();
    }
    metrics_text(State(state)).await
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::http::metrics::render(&state.db),
    )
        .into_response()
}

/// The metrics listener's whole application.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics_text))
        .with_state(state)
}
