//! The connections of one hub process: admission within `IOTHUB_MQTT_MAX_CONNECTIONS`. Which connection holds a
//! device (and take-over across processes) is the registry's ([`crate::registry::connection`]), so it holds
//! however many processes share the database.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct Sessions {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Sessions {
    pub fn new(max_connections: u32) -> Sessions {
        let max = max_connections as usize;
        Sessions {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A place for one more connection, held while it lives; `None` when the process is full.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// Connections open now (every transport, handshakes included).
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }
}
