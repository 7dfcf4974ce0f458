//! The service's feedback queue over HTTP (IoT Hub's REST calls, spec §5.4): the record's wire form, and thin
//! handlers over [`crate::feedback::store`].

use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::c2d::{wait, WaitParam};
use crate::feedback::store::{self, Batch, Received};
use crate::feedback::{self as core, Error};
use crate::http::error::{ApiResult, ErrorBody};
use crate::http::extract::rights::ServiceConnect;
use crate::http::extract::{Path, Service};
use crate::http::params;
use crate::http::poll::{long_poll, Look};
use crate::http::wire::format_time;
use crate::http::{ApiVersion, AppState};
use crate::lock_token::LockToken;
use crate::notify::channel;

/// The media type of a feedback batch.
pub const CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

/// One feedback record, in IoT Hub's JSON form.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(example = json!({"originalMessageId": "order-17", "enqueuedTimeUtc": "2026-11-29T10:00:02.125Z",
    "statusCode": "Success", "description": "Success", "deviceId": "thermostat-1",
    "deviceGenerationId": "639001234567890123"}))]
pub struct FeedbackRecord {
    pub original_message_id: String,
    /// When the outcome happened.
    pub enqueued_time_utc: String,
    /// `Success`, `Expired`, `DeliveryCountExceeded`, `Rejected` or `Purged`.
    pub status_code: String,
    pub description: String,
    pub device_id: String,
    pub device_generation_id: String,
}

impl From<core::Record> for FeedbackRecord {
    fn from(r: core::Record) -> FeedbackRecord {
        FeedbackRecord {
            original_message_id: r.original_message_id,
            enqueued_time_utc: format_time(r.created_at),
            status_code: r.status_code,
            description: r.description,
            device_id: r.device_id,
            device_generation_id: r.device_generation_id,
        }
    }
}

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
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn receive_feedback(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let wait = wait(query.as_deref(), &state)?;
    let (db, settings) = (&state.db, &state.config.feedback);
    let batch = long_poll(&state, wait, channel::FEEDBACK, "", || async move {
        Ok(
            match store::receive(db, settings, LockToken::new()).await? {
                Received::Batch(batch) => Look::Found(batch),
                Received::Empty { retry_in } => Look::Empty { retry_in },
            },
        )
    })
    .await?;
    Ok(match batch {
        Some(batch) => batch_response(batch, &state.config.hostname),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

fn batch_response(batch: Batch, hostname: &str) -> Response {
    let records: Vec<FeedbackRecord> = batch.records.into_iter().map(Into::into).collect();
    let mut response = axum::Json(&records).into_response();
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
    put("iothub-userid", hostname.to_string());
    response
}

/// Complete a feedback batch (IoT Hub's service call): its records are removed.
#[utoipa::path(delete, path = "/messages/serviceBound/feedback/{lockToken}", tag = "feedback",
    params(FeedbackLockPath, ApiVersion),
    responses(
        (status = 204, description = "Completed"),
        (status = 412, description = "DeviceMessageLockLost (412002): the lock token is unknown, expired or already settled", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn complete_feedback(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(FeedbackLockPath { lock_token }): Path<FeedbackLockPath>,
) -> ApiResult<StatusCode> {
    store::complete(&state.db, params::lock_token(&lock_token, Error::LockLost)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Abandon a feedback batch (IoT Hub's service call): it can be received again at once, until it was received
/// the feedback queue's maximum delivery count times; then its records are discarded.
#[utoipa::path(post, path = "/messages/serviceBound/feedback/{lockToken}/abandon", tag = "feedback",
    params(FeedbackLockPath, ApiVersion),
    responses(
        (status = 204, description = "Abandoned"),
        (status = 412, description = "DeviceMessageLockLost (412002): the lock token is unknown, expired or already settled", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
async fn abandon_feedback(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(FeedbackLockPath { lock_token }): Path<FeedbackLockPath>,
) -> ApiResult<StatusCode> {
    store::abandon(
        &state.db,
        &state.config.feedback,
        params::lock_token(&lock_token, Error::LockLost)?,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
