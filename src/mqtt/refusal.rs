//! The one place that turns what goes wrong into MQTT's answers: a refused CONNECT's return code, and the
//! reason a connection is closed (MQTT 3.1.1 has no other way to refuse a packet), for the log.

use super::codec::{CodecError, ConnectReturnCode};
use super::messages::Invalid;
use super::topic::TopicError;
use crate::auth;

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not MQTT 3.1.1.
    Protocol,
    /// The client id is no valid device id.
    ClientId,
    /// User name or password missing or malformed.
    BadCredentials,
    /// A well-formed token that may not connect this device (bad signature, expired, other scope, unknown or
    /// disabled device).
    NotAuthorized,
    /// The hub cannot take the connection now (connection limit, database unavailable, stopping).
    Unavailable,
}

impl Refusal {
    pub fn code(self) -> ConnectReturnCode {
        match self {
            Refusal::Protocol => ConnectReturnCode::RefusedProtocolVersion,
            Refusal::ClientId => ConnectReturnCode::BadClientId,
            Refusal::Unavailable => ConnectReturnCode::ServiceUnavailable,
            Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
            Refusal::NotAuthorized => ConnectReturnCode::NotAuthorized,
        }
    }
}

impl From<auth::Error> for Refusal {
    fn from(error: auth::Error) -> Refusal {
        match error {
            auth::Error::Database(error) => {
                tracing::warn!(%error, "MQTT CONNECT: the database is unavailable");
                Refusal::Unavailable
            }
            _ => Refusal::NotAuthorized,
        }
    }
}

/// Why a connection ended. Texts never hold a token or key.
#[derive(Debug, thiserror::Error)]
pub enum Close {
    #[error("the client disconnected")]
    Disconnected,
    #[error("the client closed the connection without DISCONNECT")]
    Dropped,
    #[error("the connection was closed or failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client did not read what the hub wrote in time")]
    WriteTimeout,
    #[error("no packet within 1.5 times the keep-alive")]
    KeepAlive,
    #[error("another connection of the device took over")]
    TakenOver,
    #[error("the device was disabled or deleted")]
    DeviceGone,
    #[error("the hub is stopping")]
    ShuttingDown,
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("PUBLISH refused: {0}")]
    Topic(#[from] TopicError),
    #[error("PUBLISH refused: {0}")]
    Message(#[from] Invalid),
    #[error("QoS 2 is not supported")]
    QoS2,
    #[error("unexpected {0} packet")]
    Unexpected(&'static str),
    #[error("SUBSCRIBE with more than {0} filters")]
    TooManyFilters(usize),
    #[error("telemetry not stored: {0}")]
    Telemetry(crate::d2c::Error),
    #[error("C2D delivery failed: {0}")]
    Delivery(#[from] crate::c2d::Error),
    #[error("the database is unavailable: {0}")]
    Database(#[from] sqlx::Error),
}

impl Close {
    /// A short name of the reason, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Close::Disconnected => "disconnected",
            Close::Dropped => "dropped",
            Close::Io(_) => "io",
            Close::WriteTimeout => "write_timeout",
            Close::KeepAlive => "keep_alive",
            Close::TakenOver => "taken_over",
            Close::DeviceGone => "device_gone",
            Close::ShuttingDown => "shutting_down",
            Close::Codec(_) => "malformed",
            Close::Topic(_) => "topic",
            Close::Message(_) => "message",
            Close::QoS2 => "qos2",
            Close::Unexpected(_) => "unexpected_packet",
            Close::TooManyFilters(_) => "too_many_filters",
            Close::Telemetry(_) => "telemetry",
            Close::Delivery(_) => "delivery",
            Close::Database(_) => "database",
        }
    }

    /// Whether the device's last will is sent: it did not say goodbye with DISCONNECT, the hub is not stopping, and
    /// the device still may send.
    pub fn sends_will(&self) -> bool {
        !matches!(
            self,
            Close::Disconnected | Close::ShuttingDown | Close::DeviceGone
        )
    }

    /// Whether the client or the hub ended the connection as the protocol intends (logged at debug, not warn).
    pub fn is_orderly(&self) -> bool {
        matches!(
            self,
            Close::Disconnected
                | Close::Dropped
                | Close::Io(_)
                | Close::TakenOver
                | Close::DeviceGone
                | Close::ShuttingDown
        )
    }
}
