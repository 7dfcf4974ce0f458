//! `GET /messages/events/consumerGroups/{cg}/stream`: every partition's events as Server-Sent Events.
//!
//! Event ids carry the position of every partition, so a client that reconnects with `Last-Event-ID` resumes
//! exactly where it stopped on all partitions: `{p}:{seq}` of the event itself first, then `,{q}:{seq}` for each
//! other partition, where `seq` is the last sequence number already delivered (or processed) there, `-1` for none.
//! Example: `2:41,0:17,1:-1,3:8`. A partition missing from `Last-Event-ID` starts after the group's checkpoint.
//! Without `Last-Event-ID` every partition starts after the group's checkpoint (or at the oldest retained event).
//! The body's forms (`body=`) are the connection's choice, not part of the position: a client reconnects with the
//! URL it used (as `EventSource` does) and keeps its format, or names another.
//!
//! Memory stays bounded: one page of one partition is held at a time; when nothing is new the stream waits on the
//! notifier's D2C channel for any partition.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::stream::{self, Stream};

use super::{BodyFormat, BodyQuery, Event, GroupPath};
use crate::d2c::consumer_groups::{self, ConsumerGroupName};
use crate::d2c::{store, PartitionId};
use crate::http::error::{ApiError, ApiResult, ErrorBody};
use crate::http::extract::rights::ServiceConnect;
use crate::http::extract::{Path, Query, Service};
use crate::http::{ApiVersion, AppState};
use crate::notify::{channel, Subscription};

/// Events one read takes from one partition.
const PAGE: i64 = 50;

/// Parses a `Last-Event-ID` into (partition, last delivered sequence number) pairs.
pub fn parse_positions(text: &str, partitions: u32) -> ApiResult<Vec<(u32, i64)>> {
    let bad = || {
        ApiError::invalid(format!(
            "Last-Event-ID '{text}' is not a list of partition:sequence"
        ))
    };
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (p, s) = pair.split_once(':').ok_or_else(bad)?;
            let p: u32 = p.parse().map_err(|_| bad())?;
            let s: i64 = s.parse().map_err(|_| bad())?;
            if p >= partitions || s < -1 {
                return Err(bad());
            }
            Ok((p, s))
        })
        .collect()
}

/// The id of an event from partition `current`, given the next position of every partition.
pub fn event_id(current: u32, next: &[i64]) -> String {
    let mut id = format!("{current}:{}", next[current as usize] - 1);
    for (p, n) in next.iter().enumerate() {
        if p as u32 != current {
            id.push_str(&format!(",{p}:{}", n - 1));
        }
    }
    id
}

struct Cursor {
    state: AppState,
    partitions: Vec<PartitionId>,
    /// Next sequence number to read, per partition.
    next: Vec<i64>,
    /// Partition to look at first next time (round robin, so one busy partition cannot starve the others).
    turn: usize,
    buffer: VecDeque<Event>,
    /// The forms of the body each event carries, as the connection asked.
    format: BodyFormat,
    subs: Vec<Subscription>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Cursor {
    /// The next event, waiting for one when none is there; `None` when the hub stops.
    async fn next_event(&mut self) -> Option<Result<SseEvent, Infallible>> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                let p: u32 = event.partition_id.parse().unwrap_or(0);
                self.next[p as usize] = event.sequence_number + 1;
                let data = serde_json::to_string(&event).unwrap_or_default();
                return Some(Ok(SseEvent::default()
                    .id(event_id(p, &self.next))
                    .event("event")
                    .data(data)));
            }
            if *self.shutdown.borrow() {
                return None;
            }
            if self.fill().await {
                continue;
            }
            // Nothing anywhere: wait for a commit on any partition (subscribed before the reads above).
            let wakes =
                futures::future::select_all(self.subs.iter_mut().map(|s| Box::pin(s.changed())));
            tokio::select! {
                _ = wakes => {}
                _ = self.shutdown.changed() => {}
                // A database hiccup during fill() is retried after a pause rather than ending the stream.
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    }

    /// Reads one page from the first partition (in turn) that has something; false when none has.
    async fn fill(&mut self) -> bool {
        let n = self.next.len();
        for i in 0..n {
            let p = (self.turn + i) % n;
            match store::read(&self.state.db, self.partitions[p], self.next[p], PAGE).await {
                Ok(events) if !events.is_empty() => {
                    let format = self.format;
                    self.buffer
                        .extend(events.into_iter().map(|e| Event::new(e, format)));
                    self.turn = (p + 1) % n;
                    return true;
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "event stream read failed");
                    return false;
                }
            }
        }
        false
    }
}

/// One Server-Sent Events message of the stream, as the OpenAPI document describes it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SseMessage {
    /// The stream position after this event: `partition:sequenceNumber` for every partition, this one first.
    #[schema(example = "2:41,0:17,1:-1,3:8")]
    id: String,
    /// Always `event`.
    #[schema(example = "event")]
    event: String,
    /// The event as JSON (the same object a partition read returns).
    data: String,
}

/// Live events of every partition through a consumer group, as Server-Sent Events (`text/event-stream`).
///
/// Each event's `data` is the event JSON (as in partition reads); its `id` holds the position of every partition
/// (`{p}:{seq}` of the event first, then the others' last delivered sequence numbers), so reconnecting with
/// `Last-Event-ID` resumes every partition where it stopped. Without it, each partition starts after the group's
/// checkpoint. The stream does not move checkpoints. `body=` chooses the forms of each event's body, as in
/// partition reads; the id holds positions only, so a reconnection keeps the format its URL names.
#[utoipa::path(get, path = "/messages/events/consumerGroups/{cg}/stream", tag = "telemetry",
    params(GroupPath, BodyQuery, ApiVersion,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event id, e.g. `2:41,0:17,1:-1,3:8`")),
    responses(
        (status = 200, description = "An endless `text/event-stream`: each event's `id` is the stream position \
            (e.g. `2:41,0:17,1:-1,3:8`), its `data` one event as JSON", content_type = "text/event-stream", body = SseMessage),
        (status = 400, description = "Invalid group name, `body` or Last-Event-ID (400004)", body = ErrorBody),
        (status = 404, description = "No such group (404000)", body = ErrorBody),
    ),
    security(("sas" = ["ServiceConnect"])))]
pub async fn stream(
    _caller: Service<ServiceConnect>,
    State(state): State<AppState>,
    Path(GroupPath { cg }): Path<GroupPath>,
    Query(body): Query<BodyQuery>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let name: ConsumerGroupName = cg.parse()?;
    let format = body.parse()?;
    let group = consumer_groups::get(&state.db, &name).await?;
    let partitions = state.d2c.partitions;
    let mut next: Vec<i64> = (0..partitions as i32)
        .map(|p| group.checkpoints.get(&p).map_or(0, |s| s + 1))
        .collect();
    if let Some(last) = headers.get("last-event-id") {
        let text = last
            .to_str()
            .map_err(|_| ApiError::invalid("Last-Event-ID is not ASCII"))?;
        for (p, seq) in parse_positions(text, partitions)? {
            next[p as usize] = seq + 1;
        }
    }
    let subs = (0..partitions)
        .map(|p| state.notifier.subscribe(channel::D2C, &p.to_string()))
        .collect();
    let cursor = Cursor {
        partitions: state.d2c.partition_ids().collect(),
        shutdown: state.shutdown.clone(),
        state,
        next,
        turn: 0,
        buffer: VecDeque::new(),
        format,
        subs,
    };
    let events = stream::unfold(cursor, |mut cursor| async move {
        cursor.next_event().await.map(|e| (e, cursor))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        let next = vec![18, 0, 42, 9];
        let id = event_id(2, &next);
        assert_eq!(id, "2:41,0:17,1:-1,3:8");
        let parsed = parse_positions(&id, 4).unwrap();
        assert_eq!(parsed, vec![(2, 41), (0, 17), (1, -1), (3, 8)]);
        assert!(parse_positions("9:1", 4).is_err());
        assert!(parse_positions("1:x", 4).is_err());
        assert!(parse_positions("1:-2", 4).is_err());
    }
}
