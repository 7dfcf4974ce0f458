//! C2D delivery to one subscribed connection. Each delivery is a lease, exactly like an HTTPS receive: the
//! message is claimed with a new lock token (its delivery counted), published at QoS 1, and completed (feedback
//! `Success`) by the device's PUBACK. A lease whose lock runs out before the PUBACK is forgotten here and the
//! message is claimed again (published with DUP), up to the maximum delivery count, after which the claim
//! dead-letters it. When the connection ends, its leases are abandoned at once. Woken by the C2D notification of
//! the device (from any process) and by the end of the earliest lock; never by polling.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::codec::{Publish, QoS};
use super::{messages, Endpoint};
use crate::c2d::model::{Settle, Settlement};
use crate::c2d::{self, store};
use crate::lock_token::LockToken;
use crate::notify::{channel, Subscription};
use crate::registry::DeviceId;

/// Shortest wait for a lock held elsewhere (an HTTPS receive) to run out, so a clock skew cannot make it spin.
const MIN_RETRY: Duration = Duration::from_millis(50);

struct Lease {
    token: LockToken,
    until: Instant,
}

pub struct Delivery {
    device: DeviceId,
    /// The QoS the device subscribed with: at QoS 0 a message is completed as soon as it is written (at most once,
    /// as the device asked).
    qos: QoS,
    wake: Subscription,
    inflight: HashMap<u16, Lease>,
    next_pkid: u16,
    /// When a lock of this device held by someone else runs out.
    retry_at: Option<Instant>,
}

impl Delivery {
    /// Starts listening for the device's C2D messages; call [`Delivery::fill`] next (the subscription comes
    /// first, so nothing committed after it is missed).
    pub fn start(endpoint: &Endpoint, device: &DeviceId, qos: QoS) -> Delivery {
        Delivery {
            device: device.clone(),
            qos,
            wake: endpoint.notifier.subscribe(channel::C2D, device.as_str()),
            inflight: HashMap::new(),
            next_pkid: 0,
            retry_at: None,
        }
    }

    pub fn qos(&self) -> QoS {
        self.qos
    }

    pub fn set_qos(&mut self, qos: QoS) {
        self.qos = qos;
    }

    /// Resolves when there may be something to deliver: a notification, or a lock running out.
    pub async fn woken(&mut self) {
        let due = self
            .inflight
            .values()
            .map(|l| l.until)
            .chain(self.retry_at)
            .min();
        match due {
            Some(at) => tokio::select! {
                _ = self.wake.changed() => {}
                _ = tokio::time::sleep_until(at) => {}
            },
            None => self.wake.changed().await,
        }
    }

    /// Claims deliverable messages while fewer than the in-flight bound are unacknowledged; the PUBLISH packets
    /// to send, in order, each with the id of its lease (its packet id at QoS 1).
    pub async fn fill(&mut self, endpoint: &Endpoint) -> Result<Vec<(u16, Publish)>, c2d::Error> {
        let now = Instant::now();
        // A lease whose lock ran out is the queue's again; a late PUBACK for it finds nothing to settle.
        self.inflight.retain(|_, lease| lease.until > now);
        self.retry_at = None;
        let lock = Duration::from_secs(endpoint.c2d.lock_secs.into());
        let mut out = Vec::new();
        while self.inflight.len() < endpoint.settings.max_inflight as usize {
            let token = LockToken::new();
            let received = store::receive(
                &endpoint.db,
                &endpoint.c2d,
                &endpoint.feedback,
                &self.device,
                token,
                true,
            )
            .await?;
            let row = match received {
                store::Received::Message(row) => row,
                store::Received::Empty { retry_in } => {
                    self.retry_at = retry_in.map(|d| Instant::now() + d.max(MIN_RETRY));
                    break;
                }
            };
            let pkid = self.next_free_pkid();
            self.inflight.insert(
                pkid,
                Lease {
                    token,
                    until: Instant::now() + lock,
                },
            );
            let mut publish = Publish::new(
                messages::devicebound_topic(&self.device, &row),
                self.qos,
                Vec::new(),
            );
            publish.payload = Bytes::from(row.body);
            if self.qos == QoS::AtLeastOnce {
                publish.pkid = pkid;
                // Delivered before (its lock ran out, or a connection dropped): MQTT's redelivery flag.
                publish.dup = row.delivery_count > 1;
            }
            out.push((pkid, publish));
        }
        Ok(out)
    }

    /// The device's PUBACK for `pkid`: completes that delivery. A lease that already ran out (or an unknown id)
    /// is ignored: the message was or will be delivered again.
    pub async fn acknowledge(&mut self, endpoint: &Endpoint, pkid: u16) -> Result<(), c2d::Error> {
        let Some(lease) = self.inflight.remove(&pkid) else {
            tracing::debug!(pkid, "PUBACK for no delivery in flight");
            return Ok(());
        };
        let settlement = Settlement {
            device_id: self.device.clone(),
            lock_token: lease.token,
            action: Settle::Complete,
        };
        match endpoint.c2d_writer.settle(settlement).await {
            Err(c2d::Error::LockLost) => {
                tracing::debug!(pkid, "PUBACK after the lock ran out");
                Ok(())
            }
            other => other,
        }
    }

    /// Ends every lease: the messages are deliverable again at once (their deliveries counted), or dead-lettered
    /// when they reached the maximum delivery count.
    pub async fn release(self, endpoint: &Endpoint) {
        // Handed over together, so the writer abandons them in one transaction.
        let abandons = self.inflight.into_values().map(|lease| {
            endpoint.c2d_writer.settle(Settlement {
                device_id: self.device.clone(),
                lock_token: lease.token,
                action: Settle::Abandon,
            })
        });
        for abandoned in futures::future::join_all(abandons).await {
            match abandoned {
                Ok(()) | Err(c2d::Error::LockLost) => {}
                Err(error) => {
                    tracing::warn!(%error, "a C2D lease could not be released; its lock will run out")
                }
            }
        }
    }

    fn next_free_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}
