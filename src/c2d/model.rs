//! C2D messages as the core knows them: what a sender gives, what is stored, and what the service may read back.

use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::lock_token::LockToken;
use crate::registry::DeviceId;

crate::text_enum! {
    /// `iothub-ack`: which outcomes the sender wants feedback for (spec §5.1).
    pub enum Ack {
        None = "none",
        Positive = "positive",
        Negative = "negative",
        Full = "full",
    }
}

crate::text_enum! {
    /// Where a message is in its life. `Enqueued` and `Invisible` are live ([`State::LIVE`]); the others ended.
    pub enum State {
        Enqueued = "enqueued",
        /// Locked by a receive until its lock runs out.
        Invisible = "invisible",
        Completed = "completed",
        DeadLettered = "dead_lettered",
        Purged = "purged",
    }
}

impl State {
    /// The states of a message that has not ended.
    pub const LIVE: [State; 2] = [State::Enqueued, State::Invisible];
}

crate::text_enum! {
    /// How a message ended, as feedback reports it.
    pub enum Outcome {
        Success = "Success",
        Expired = "Expired",
        DeliveryCountExceeded = "DeliveryCountExceeded",
        Rejected = "Rejected",
        Purged = "Purged",
    }
}

/// A message's position in its device's queue, as enqueue assigned it: 1, 2, …
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SequenceNumber(pub i64);

#[derive(Debug, Clone, thiserror::Error)]
#[error("The sequence number must be a whole number, at least 1")]
pub struct InvalidSequenceNumber;

impl FromStr for SequenceNumber {
    type Err = InvalidSequenceNumber;
    fn from_str(text: &str) -> Result<SequenceNumber, InvalidSequenceNumber> {
        match text.parse::<i64>() {
            Ok(n) if n >= 1 => Ok(SequenceNumber(n)),
            _ => Err(InvalidSequenceNumber),
        }
    }
}

/// When the message expires, as the sender asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The hub's default TTL.
    Default,
    /// `iothub-expiry`: an absolute time.
    At(DateTime<Utc>),
    /// `iothub-ttl`: seconds from enqueue.
    Ttl(i64),
}

/// A message the service wants enqueued, already parsed from its wire form.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub ack: Ack,
    pub expiry: Expiry,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Application properties in the order they were sent, names in the case they arrived in.
    pub app_properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A stored message (every column but the device id).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MessageRow {
    pub seq: i64,
    pub device_generation_id: String,
    pub message_id: String,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub ack: Ack,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub app_properties: sqlx::types::Json<Vec<(String, String)>>,
    pub body: Vec<u8>,
    pub enqueued_at: DateTime<Utc>,
    pub expiry_explicit: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub state: State,
    pub lock_token: Option<uuid::Uuid>,
    pub locked_until: Option<DateTime<Utc>>,
    pub delivery_count: i32,
    pub outcome: Option<Outcome>,
    pub outcome_at: Option<DateTime<Utc>>,
}

/// What a device does with a message it holds under a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with it: outcome `Success`.
    Complete,
    /// Refuses it: dead-lettered at once, outcome `Rejected`.
    Reject,
    /// Gives it back: receivable again, or dead-lettered when it was delivered the maximum number of times.
    Abandon,
}

/// A device's settlement of the message it holds under `lock_token`.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub device_id: DeviceId,
    pub lock_token: LockToken,
    pub action: Settle,
}

/// What an enqueue assigned.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub message_id: String,
    pub seq: i64,
    pub enqueued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A message's state as the service sees it: a lock that ran out makes a message `Enqueued` again, whatever its
/// row still says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visible {
    Enqueued,
    Invisible,
    Completed,
    DeadLettered,
    Purged,
}

impl Visible {
    pub fn name(self) -> &'static str {
        match self {
            Visible::Enqueued => "Enqueued",
            Visible::Invisible => "Invisible",
            Visible::Completed => "Completed",
            Visible::DeadLettered => "DeadLettered",
            Visible::Purged => "Purged",
        }
    }
}

/// A message's state and outcome, as the service may read them.
#[derive(Debug, Clone)]
pub struct MessageStatus {
    pub row: MessageRow,
    pub state: Visible,
    /// While `Invisible`: when the lock runs out.
    pub locked_until: Option<DateTime<Utc>>,
}

impl MessageStatus {
    pub fn new(row: MessageRow, db_now: DateTime<Utc>) -> MessageStatus {
        let lock_live = row.locked_until.is_some_and(|t| t > db_now);
        let state = match row.state {
            State::Enqueued => Visible::Enqueued,
            State::Invisible if lock_live => Visible::Invisible,
            State::Invisible => Visible::Enqueued,
            State::Completed => Visible::Completed,
            State::DeadLettered => Visible::DeadLettered,
            State::Purged => Visible::Purged,
        };
        MessageStatus {
            locked_until: row.locked_until.filter(|_| lock_live),
            row,
            state,
        }
    }
}
