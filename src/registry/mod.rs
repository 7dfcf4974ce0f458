//! Device identities: the registry's domain values, its rules and its SQL.

pub mod connection;
pub mod model;
pub mod store;

pub use model::{valid_device_id, DeviceId, InvalidDeviceId};

/// What a registry operation can refuse, or fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Device {0} not registered")]
    DeviceNotFound(DeviceId),
    #[error("A device with ID '{0}' is already registered")]
    DeviceExists(DeviceId),
    #[error("A device with ID '{0}' was created concurrently")]
    CreatedConcurrently(DeviceId),
    #[error("The etag does not match device '{0}' (it was changed since it was read)")]
    EtagMismatch(DeviceId),
    /// A field of the device is not acceptable; the text says which and why.
    #[error("{0}")]
    Invalid(String),
    #[error("selfSigned authentication needs a primaryThumbprint")]
    MissingThumbprint,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
