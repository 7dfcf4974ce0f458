//! The HTTP error type, its IoT Hub wire form, and the one place that maps every core error onto it.
//!
//! Every failure a handler or extractor meets ends up as an [`ApiError`]: core errors through the `From` impls
//! below (one per domain: which status and `ErrorCode` each refusal is), and this is the only place that turns one
//! into a response: IoT Hub's body `{"Message","ExceptionMessage"}` plus the `iothub-errorcode` header. `Message`
//! uses the legacy `ErrorCode:{Name};{text}` form, which both the Node and the C# SDKs parse.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::{auth, c2d, d2c, feedback, postgres, registry, throttle};

/// The IoT Hub error codes this hub emits (spec §6.2), with their HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidProtocolVersion,
    ArgumentInvalid,
    ArgumentNull,
    IotHubFormatError,
    IotHubUnauthorizedAccess,
    DeviceMaximumQueueDepthExceeded,
    IotHubQuotaExceeded,
    InvalidMessageExpiryTime,
    DeviceNotFound,
    PolicyNotFound,
    NotFound,
    MethodNotAllowed,
    DeviceAlreadyExists,
    PolicyAlreadyExists,
    PreconditionFailed,
    DeviceMessageLockLost,
    MessageTooLarge,
    UnsupportedMediaType,
    ThrottlingException,
    ServerError,
    ServiceUnavailable,
    GatewayTimeout,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            InvalidProtocolVersion | ArgumentInvalid | ArgumentNull | IotHubFormatError => {
                StatusCode::BAD_REQUEST
            }
            IotHubUnauthorizedAccess => StatusCode::UNAUTHORIZED,
            DeviceMaximumQueueDepthExceeded | IotHubQuotaExceeded | InvalidMessageExpiryTime => {
                StatusCode::FORBIDDEN
            }
            DeviceNotFound | PolicyNotFound | NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            DeviceAlreadyExists | PolicyAlreadyExists => StatusCode::CONFLICT,
            PreconditionFailed | DeviceMessageLockLost => StatusCode::PRECONDITION_FAILED,
            MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ThrottlingException => StatusCode::TOO_MANY_REQUESTS,
            ServerError => StatusCode::INTERNAL_SERVER_ERROR,
            ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// IoT Hub's six-digit code; the name is what goes on the wire, the number is for logs and docs.
    pub fn number(self) -> u32 {
        use ErrorCode::*;
        match self {
            InvalidProtocolVersion => 400001,
            ArgumentInvalid => 400004,
            ArgumentNull => 400005,
            IotHubFormatError => 400006,
            IotHubUnauthorizedAccess => 401002,
            DeviceMaximumQueueDepthExceeded => 403004,
            IotHubQuotaExceeded => 403002,
            InvalidMessageExpiryTime => 403009,
            DeviceNotFound => 404001,
            PolicyNotFound => 404000,
            NotFound => 404000,
            MethodNotAllowed => 405000,
            DeviceAlreadyExists => 409001,
            PolicyAlreadyExists => 409000,
            PreconditionFailed => 412001,
            DeviceMessageLockLost => 412002,
            MessageTooLarge => 413001,
            UnsupportedMediaType => 415000,
            ThrottlingException => 429001,
            ServerError => 500001,
            ServiceUnavailable => 503001,
            GatewayTimeout => 504101,
        }
    }

    pub fn name(self) -> &'static str {
        use ErrorCode::*;
        match self {
            InvalidProtocolVersion => "InvalidProtocolVersion",
            ArgumentInvalid => "ArgumentInvalid",
            ArgumentNull => "ArgumentNull",
            IotHubFormatError => "IotHubFormatError",
            IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            IotHubQuotaExceeded => "IotHubQuotaExceeded",
            InvalidMessageExpiryTime => "InvalidMessageExpiryTime",
            DeviceNotFound => "DeviceNotFound",
            PolicyNotFound => "PolicyNotFound",
            NotFound => "NotFound",
            MethodNotAllowed => "MethodNotAllowed",
            DeviceAlreadyExists => "DeviceAlreadyExists",
            PolicyAlreadyExists => "PolicyAlreadyExists",
            PreconditionFailed => "PreconditionFailed",
            DeviceMessageLockLost => "DeviceMessageLockLost",
            MessageTooLarge => "MessageTooLarge",
            UnsupportedMediaType => "UnsupportedMediaType",
            ThrottlingException => "ThrottlingException",
            ServerError => "ServerError",
            ServiceUnavailable => "ServiceUnavailable",
            GatewayTimeout => "GatewayTimeout",
        }
    }
}

/// An error on its way to the client: what went wrong (the code) and a human-readable text.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds the client should wait before retrying (429 and 503).
    pub retry_after: Option<u64>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::IotHubUnauthorizedAccess, message)
    }
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            ErrorCode::MessageTooLarge,
            format!("Message size exceeds the limit of {limit} bytes"),
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ServerError, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            retry_after: Some(1),
            ..Self::new(ErrorCode::ServiceUnavailable, message)
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code.name(),
            self.code.number(),
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

/// IoT Hub's error body.
#[derive(Debug, Serialize, serde::Deserialize, ToSchema)]
#[schema(example = json!({"Message": "ErrorCode:DeviceNotFound;Device d1 not registered", "ExceptionMessage": "Tracking ID:3f0c9e6a7d1a4a4c8f1f5f8f2b0a1c7e-TimeStamp:2026-11-29T10:00:00.000Z"}))]
pub struct ErrorBody {
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "ExceptionMessage")]
    pub exception_message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        if status.is_server_error() {
            tracing::error!(code = self.code.name(), error = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code.name(), error = %self.message, "request refused");
        }
        let tracking = uuid::Uuid::new_v4().simple();
        let body = ErrorBody {
            message: format!("ErrorCode:{};{}", self.code.name(), self.message),
            exception_message: format!(
                "Tracking ID:{tracking}-TimeStamp:{}",
                crate::http::wire::format_time(chrono::Utc::now())
            ),
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            "iothub-errorcode",
            HeaderValue::from_static(self.code.name()),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Database errors: lost connections and pool exhaustion are the client's to retry (503); anything else is a bug or
/// an unexpected state and is a 500 with the detail kept in the log, not on the wire. Logged here, once.
pub fn database(error: &sqlx::Error) -> ApiError {
    if postgres::is_unavailable(error) {
        tracing::warn!(%error, "database unavailable");
        ApiError::unavailable("The database is unavailable, retry later")
    } else {
        tracing::error!(%error, "database error");
        ApiError::internal("Internal error")
    }
}

/// A refusal of the core, with its own text.
fn refusal(code: ErrorCode, error: impl std::fmt::Display) -> ApiError {
    ApiError::new(code, error.to_string())
}

impl From<registry::Error> for ApiError {
    fn from(error: registry::Error) -> Self {
        use registry::Error::*;
        let code = match &error {
            DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            DeviceExists(_) | CreatedConcurrently(_) => ErrorCode::DeviceAlreadyExists,
            EtagMismatch(_) => ErrorCode::PreconditionFailed,
            Invalid(_) => ErrorCode::ArgumentInvalid,
            MissingThumbprint => ErrorCode::ArgumentNull,
            Database(e) => return database(e),
        };
        refusal(code, error)
    }
}

impl From<registry::InvalidDeviceId> for ApiError {
    fn from(error: registry::InvalidDeviceId) -> Self {
        refusal(ErrorCode::ArgumentInvalid, error)
    }
}

impl From<auth::Error> for ApiError {
    fn from(error: auth::Error) -> Self {
        use auth::Error::*;
        let code = match &error {
            Unauthorized(_) => ErrorCode::IotHubUnauthorizedAccess,
            DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            PolicyNotFound(_) => ErrorCode::PolicyNotFound,
            PolicyExists(_) => ErrorCode::PolicyAlreadyExists,
            LastRegistryWriter => ErrorCode::ArgumentInvalid,
            Database(e) => return database(e),
        };
        refusal(code, error)
    }
}

impl From<c2d::Error> for ApiError {
    fn from(error: c2d::Error) -> Self {
        use c2d::Error::*;
        let code = match &error {
            DeviceNotFound(_) => ErrorCode::DeviceNotFound,
            QueueFull { .. } => ErrorCode::DeviceMaximumQueueDepthExceeded,
            ExpiryOutOfRange { .. } => ErrorCode::InvalidMessageExpiryTime,
            LockLost => ErrorCode::DeviceMessageLockLost,
            MessageNotFound { .. } => ErrorCode::NotFound,
            Busy | ShuttingDown => return ApiError::unavailable(error.to_string()),
            Database(e) => return database(e),
            Commit(e) => return database(e),
        };
        refusal(code, error)
    }
}

impl From<c2d::model::InvalidSequenceNumber> for ApiError {
    fn from(error: c2d::model::InvalidSequenceNumber) -> Self {
        refusal(ErrorCode::ArgumentInvalid, error)
    }
}

impl From<feedback::Error> for ApiError {
    fn from(error: feedback::Error) -> Self {
        match &error {
            feedback::Error::LockLost => refusal(ErrorCode::DeviceMessageLockLost, error),
            feedback::Error::Database(e) => database(e),
        }
    }
}

impl From<d2c::Error> for ApiError {
    fn from(error: d2c::Error) -> Self {
        use d2c::Error::*;
        let code = match &error {
            InvalidMessage(_) | DefaultGroupIsPermanent | NotCommitted { .. } => {
                ErrorCode::ArgumentInvalid
            }
            TooLarge { .. } | BatchTooLarge { .. } => ErrorCode::MessageTooLarge,
            IngestBehind | ShuttingDown => return ApiError::unavailable(error.to_string()),
            NoSuchPartition { .. } | GroupNotFound(_) => ErrorCode::NotFound,
            TooManyGroups { .. } => ErrorCode::IotHubQuotaExceeded,
            Database(e) => return database(e),
            Commit(e) => return database(e),
        };
        refusal(code, error)
    }
}

impl From<d2c::consumer_groups::InvalidGroupName> for ApiError {
    fn from(error: d2c::consumer_groups::InvalidGroupName) -> Self {
        refusal(ErrorCode::ArgumentInvalid, error)
    }
}

impl From<throttle::Throttled> for ApiError {
    fn from(error: throttle::Throttled) -> Self {
        ApiError {
            retry_after: Some(error.wait.as_secs_f64().ceil().max(1.0) as u64),
            ..refusal(ErrorCode::ThrottlingException, error)
        }
    }
}
