//! The service's feedback queue over HTTP (IoT Hub's REST calls, spec §5.4). Thin handlers over [`super::store`].

use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::time::Instant;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::store::{self, Received};
use super::{FeedbackRecord, CONTENT_TYPE};
use crate::c2d::routes::{wait_param, WaitParam};
use crate::http::error::{ApiResult, ErrorBody};
use crate::http::extract::rights::ServiceConnect;
use crate::http::extract::{Path, Service};
use crate::http::wire::format_time;
use crate::http::ApiVersion;
use crate::notify::channel;
use crate::AppState;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(receive_feedback))
        .routes(routes!(complete_feedback))
        .routes(routes!(abandon_feedback))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct FeedbackLockPath {
    /// The lock token from the receive's `ETag` (without its quotes).
    #[serde(rename = "lockToken")]
    #[param(rename = "lockToken")]
    pub lock_token: String,
}

/// Receive a batch of delivery feedback (IoT Hub's service call): up to 64 records, locked until completed,
/// abandoned, or the feedback lock runs out.
///
/// Each record is receivable as soon as the outcome it reports has happened. `204` when none is waiting; with
/// `wait-ms=N` (an extension) the call waits up to N ms for one.
#[utoipa::path(get, path = "/messages/serviceBound/feedback", tag = "feedback",
    params(ApiVersion, WaitParam),
    responses(
        (status = 200, description = "A batch of records", body = [FeedbackRecord],
            content_type = "application/vnd.microsoft.iothub.feedback.json",
            headers(
                ("ETag" = String, description = "The batch's lock token, quoted"),
                ("iothub-enqueuedtime" = String, description = "When the batch was formed"),
                ("iothub-deliverycount" = String, description = "Earlier receives of this batch"),
                ("iothub-userid" = String, description = "The hub's host name"),
            )),
        (status = 204, description = "No feedback waiting"),
        (status = 400, description = "Invalid wait-ms (400004)", body = ErrorBody),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn receive_feedback(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let wait = wait_param(query.as_deref(), state.config.request_timeout())?;
    let deadline = wait.map(|w| Instant::now() + w);
    let mut subscription = deadline.map(|_| state.notifier.subscribe(channel::FEEDBACK, ""));
    let mut shutdown = state.shutdown.clone();
    loop {
        let retry_in = match store::receive(&state.db, &state.config.c2d, Uuid::new_v4()).await? {
            Received::Batch(batch) => {
                let mut response = axum::Json(&batch.records).into_response();
                let headers = response.headers_mut();
                let mut put = |name: &'static str, value: String| {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(name, v);
                    }
                };
                put("content-type", CONTENT_TYPE.to_string());
                put("etag", format!("\"{}\"", batch.lock_token));
                put("iothub-enqueuedtime", format_time(batch.created_at));
                put("iothub-deliverycount", batch.earlier_deliveries.to_string());
                put("iothub-userid", state.config.hostname.clone());
                return Ok(response);
            }
            Received::Empty { retry_in } => retry_in,
        };
        let (Some(deadline), Some(subscription)) = (deadline, subscription.as_mut()) else {
            return Ok(StatusCode::NO_CONTENT.into_response());
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let until = match retry_in {
            Some(r) => deadline.min(now + r + std::time::Duration::from_millis(10)),
            None => deadline,
        };
        tokio::select! {
            _ = subscription.changed() => {}
            _ = tokio::time::sleep_until(until) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

/// Complete a feedback batch (IoT Hub's service call): its records are removed.
#[utoipa::path(delete, path = "/messages/serviceBound/feedback/{lockToken}", tag = "feedback",
    params(FeedbackLockPath, ApiVersion),
    responses(
        (status = 204, description = "Completed"),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 412, description = "DeviceMessageLockLost (412002): the lock token is unknown, expired or already settled", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn complete_feedback(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(FeedbackLockPath { lock_token }): Path<FeedbackLockPath>,
) -> ApiResult<StatusCode> {
    store::complete(&state.db, &lock_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Abandon a feedback batch (IoT Hub's service call): it can be received again at once, until it was received
/// the feedback queue's maximum delivery count times; then its records are discarded.
#[utoipa::path(post, path = "/messages/serviceBound/feedback/{lockToken}/abandon", tag = "feedback",
    params(FeedbackLockPath, ApiVersion),
    responses(
        (status = 204, description = "Abandoned"),
        (status = 401, description = "Missing, invalid or insufficient token (401002)", body = ErrorBody),
        (status = 412, description = "DeviceMessageLockLost (412002): the lock token is unknown, expired or already settled", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn abandon_feedback(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(FeedbackLockPath { lock_token }): Path<FeedbackLockPath>,
) -> ApiResult<StatusCode> {
    store::abandon(&state.db, &state.config.c2d, &lock_token).await?;
    Ok(StatusCode::NO_CONTENT)
}
