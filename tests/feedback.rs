//! Delivery feedback against a real PostgreSQL: which ack mode hears which outcome, the record's fields, and the
//! service's feedback queue (batches, locks, abandon, delivery count, long poll).

mod common;

use chrono::{DateTime, Duration as Span, Utc};
use std::collections::BTreeSet;

use common::*;
use reqwest::{Method, Response};
use serde_json::Value;

struct Hub {
    hub: TestHub,
    service: String,
}

impl Hub {
    async fn start_with(adjust: impl FnOnce(&mut iothub::Config)) -> Hub {
        let hub = TestHub::start_with(adjust).await;
        let service = hub.policy_token("service").await;
        Hub { hub, service }
    }

    /// Registers a device; returns (token, generation id).
    async fn device(&self, id: &str) -> (String, String) {
        let device = self.hub.create_device(id).await;
        (
            device_token(id, &primary_key(&device)),
            device["generationId"].as_str().unwrap().to_string(),
        )
    }

    async fn enqueue(&self, id: &str, headers: &[(&str, &str)]) {
        let mut request = self
            .hub
            .request(
                Method::POST,
                &format!("/devices/{id}/commands"),
                &self.service,
            )
            .body("x");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        assert_eq!(request.send().await.unwrap().status(), 201);
    }

    async fn status(&self, id: &str, seq: i64) -> Value {
        let response = self
            .hub
            .request(
                Method::GET,
                &format!("/devices/{id}/commands/{seq}"),
                &self.service,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "status of {id}/{seq}");
        response.json().await.unwrap()
    }

    /// Waits until the sweeper (the only one to end messages of a device that never polls) dead-lettered `seq`.
    async fn wait_dead_lettered(&self, id: &str, seq: i64) {
        wait_until(
            &format!("{id}/{seq} to be dead-lettered"),
            move || async move { self.status(id, seq).await["state"] == "DeadLettered" },
        )
        .await
    }

    /// The feedback queue's lease on its one batch, on the database's clock.
    async fn batch_locked_until(&self) -> DateTime<Utc> {
        sqlx::query_scalar("SELECT locked_until FROM feedback_batches")
            .fetch_one(&self.hub.db)
            .await
            .unwrap()
    }

    async fn take(&self, id: &str, token: &str) -> String {
        let response = self
            .hub
            .request(
                Method::GET,
                &format!("/devices/{id}/messages/deviceBound"),
                token,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.headers()["etag"]
            .to_str()
            .unwrap()
            .trim_matches('"')
            .to_string()
    }

    async fn device_call(&self, method: Method, path: &str, token: &str) {
        let response = self.hub.request(method, path, token).send().await.unwrap();
        assert!(
            response.status() == 204 || response.status() == 200,
            "{path}: {}",
            response.status()
        );
    }

    async fn receive(&self, query: &str) -> Response {
        self.hub
            .request(
                Method::GET,
                &format!("/messages/serviceBound/feedback{query}"),
                &self.service,
            )
            .send()
            .await
            .unwrap()
    }

    /// Receives a batch; returns (lock token, records, iothub-deliverycount).
    async fn batch(&self) -> (String, Vec<Value>, String) {
        let response = self.receive("").await;
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(
            headers["content-type"],
            "application/vnd.microsoft.iothub.feedback.json"
        );
        let etag = headers["etag"].to_str().unwrap();
        assert!(etag.starts_with('"') && etag.ends_with('"'));
        let count = headers["iothub-deliverycount"]
            .to_str()
            .unwrap()
            .to_string();
        (
            etag.trim_matches('"').to_string(),
            response.json().await.unwrap(),
            count,
        )
    }

    async fn settle(&self, lock: &str, abandon: bool) -> Response {
        let (method, path) = if abandon {
            (
                Method::POST,
                format!("/messages/serviceBound/feedback/{lock}/abandon"),
            )
        } else {
            (
                Method::DELETE,
                format!("/messages/serviceBound/feedback/{lock}"),
            )
        };
        self.hub
            .request(method, &path, &self.service)
            .send()
            .await
            .unwrap()
    }

    async fn drain(&self) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let response = self.receive("").await;
            if response.status() == 204 {
                return all;
            }
            let lock = response.headers()["etag"]
                .to_str()
                .unwrap()
                .trim_matches('"')
                .to_string();
            all.extend(response.json::<Vec<Value>>().await.unwrap());
            assert_eq!(self.settle(&lock, false).await.status(), 204);
        }
    }
}

const OUTCOMES: [&str; 5] = [
    "Success",
    "Rejected",
    "Expired",
    "DeliveryCountExceeded",
    "Purged",
];

#[tokio::test]
async fn each_ack_mode_hears_exactly_the_outcomes_it_asks_for() {
    let t = Hub::start_with(|c| {
        c.c2d.max_delivery_count = 1;
        c.c2d.sweep_interval_ms = 200;
    })
    .await;
    let mut generations = std::collections::HashMap::new();
    let mut tokens = std::collections::HashMap::new();
    for outcome in OUTCOMES {
        let (token, generation) = t.device(outcome).await;
        generations.insert(outcome.to_string(), generation);
        tokens.insert(outcome, token);
    }
    let acks = ["none", "positive", "negative", "full"];
    for ack in acks {
        for outcome in OUTCOMES {
            let id = format!("{ack}-{outcome}");
            let mut headers = vec![("iothub-ack", ack), ("iothub-messageid", id.as_str())];
            if outcome == "Expired" {
                headers.push(("iothub-ttl", "1"));
            }
            t.enqueue(outcome, &headers).await;
        }
    }
    for _ in acks {
        let token = &tokens["Success"];
        let lock = t.take("Success", token).await;
        t.device_call(
            Method::DELETE,
            &format!("/devices/Success/messages/deviceBound/{lock}"),
            token,
        )
        .await;
        let token = &tokens["Rejected"];
        let lock = t.take("Rejected", token).await;
        t.device_call(
            Method::DELETE,
            &format!("/devices/Rejected/messages/deviceBound/{lock}?reject"),
            token,
        )
        .await;
        let token = &tokens["DeliveryCountExceeded"];
        let lock = t.take("DeliveryCountExceeded", token).await;
        t.device_call(
            Method::POST,
            &format!("/devices/DeliveryCountExceeded/messages/deviceBound/{lock}/abandon"),
            token,
        )
        .await;
    }
    t.device_call(Method::DELETE, "/devices/Purged/commands", &t.service)
        .await;
    // Expiry comes from the sweeper: wait until it ended the four (one per ack mode).
    for seq in 1..=acks.len() as i64 {
        t.wait_dead_lettered("Expired", seq).await;
    }
    let expected: BTreeSet<(String, String)> = acks
        .iter()
        .flat_map(|ack| {
            OUTCOMES.iter().filter_map(move |outcome| {
                let wanted = match *ack {
                    "none" => false,
                    "positive" => *outcome == "Success",
                    "negative" => *outcome != "Success",
                    _ => true,
                };
                wanted.then(|| (format!("{ack}-{outcome}"), outcome.to_string()))
            })
        })
        .collect();
    let records = t.drain().await;
    let got: BTreeSet<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r["originalMessageId"].as_str().unwrap().to_string(),
                r["statusCode"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(records.len(), expected.len(), "one record per outcome");
    for record in &records {
        let outcome = record["statusCode"].as_str().unwrap();
        assert_eq!(record["deviceId"], outcome);
        assert_eq!(record["deviceGenerationId"], generations[outcome].as_str());
        let description = match outcome {
            "Success" => "Success",
            "Rejected" => "Message rejected",
            "Expired" => "Message expired",
            "DeliveryCountExceeded" => "Message delivery count exceeded",
            _ => "Message purged",
        };
        assert_eq!(record["description"], description);
        assert!(
            chrono::DateTime::parse_from_rfc3339(record["enqueuedTimeUtc"].as_str().unwrap())
                .is_ok()
        );
    }
    // Nothing more arrives later: a sweep that ran after the drain (it dead-lettered a message that expired after
    // it) added no record.
    t.device("canary").await;
    t.enqueue("canary", &[("iothub-ttl", "1")]).await;
    t.wait_dead_lettered("canary", 1).await;
    assert!(t.drain().await.is_empty());
}

#[tokio::test]
async fn batches_hold_up_to_64_records_under_a_lock() {
    let t = Hub::start_with(|c| c.c2d.max_queue_depth = 100).await;
    t.device("d1").await;
    for i in 0..70 {
        t.enqueue(
            "d1",
            &[
                ("iothub-ack", "negative"),
                ("iothub-messageid", &format!("m{i}")),
            ],
        )
        .await;
    }
    t.device_call(Method::DELETE, "/devices/d1/commands", &t.service)
        .await;

    let (first, records, count) = t.batch().await;
    assert_eq!(records.len(), 64);
    assert_eq!(count, "0");
    // Oldest first.
    assert_eq!(records[0]["statusCode"], "Purged");
    let (second, rest, _) = t.batch().await;
    assert_eq!(rest.len(), 6);
    let ids: BTreeSet<&str> = records
        .iter()
        .chain(&rest)
        .map(|r| r["originalMessageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 70, "no record in two batches");
    // Both locked: nothing else to receive.
    assert_eq!(t.receive("").await.status(), 204);

    // Abandon: the same batch comes back, counted.
    assert_eq!(t.settle(&first, true).await.status(), 204);
    let (again, records_again, count) = t.batch().await;
    assert_ne!(again, first);
    assert_eq!(count, "1");
    assert_eq!(records_again, records);
    // Stale, unknown and malformed tokens.
    for stale in [
        first.as_str(),
        "not-a-guid",
        &uuid::Uuid::new_v4().to_string(),
    ] {
        for abandon in [false, true] {
            assert_error(t.settle(stale, abandon).await, 412, "DeviceMessageLockLost").await;
        }
    }
    assert_eq!(t.settle(&again, false).await.status(), 204);
    assert_error(t.settle(&again, false).await, 412, "DeviceMessageLockLost").await;
    assert_eq!(t.settle(&second, false).await.status(), 204);
    assert_eq!(t.receive("").await.status(), 204);

    // Only ServiceConnect may read feedback.
    let (token, _) = t.device("d2").await;
    let response = t
        .hub
        .request(Method::GET, "/messages/serviceBound/feedback", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    assert_error(t.receive("?wait-ms=30001").await, 400, "ArgumentInvalid").await;
}

#[tokio::test]
async fn an_unsettled_batch_comes_back_after_its_lock_and_is_discarded_after_max_deliveries() {
    let t = Hub::start_with(|c| {
        c.feedback.lock_secs = 5;
        c.feedback.max_delivery_count = 2;
    })
    .await;
    t.device("d1").await;
    t.enqueue(
        "d1",
        &[("iothub-ack", "negative"), ("iothub-messageid", "a")],
    )
    .await;
    t.device_call(Method::DELETE, "/devices/d1/commands", &t.service)
        .await;
    let (lock, records, _) = t.batch().await;
    assert_eq!(records.len(), 1);
    let locked_until = t.batch_locked_until().await;
    // Lock runs out: a long poll wakes when it does (nothing else would wake it), and the batch comes back counted.
    let response = woken(t.receive(&format!("?wait-ms={LONG_POLL_MS}"))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["iothub-deliverycount"], "1");
    // Not before the lease ran out, on the database's clock: the new 5 s lease began no earlier than the old one
    // ended.
    let relocked_until = t.batch_locked_until().await;
    assert!(
        relocked_until - Span::seconds(5) >= locked_until,
        "received again at {} while leased until {locked_until}",
        relocked_until - Span::seconds(5)
    );
    let second = response.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert_error(t.settle(&lock, false).await, 412, "DeviceMessageLockLost").await;
    // The second receive was the last allowed: abandoning it discards the records.
    assert_eq!(t.settle(&second, true).await.status(), 204);
    assert_eq!(t.receive("").await.status(), 204);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM feedback_records")
        .fetch_one(&t.hub.db)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_feedback_long_poll_answers_when_an_outcome_commits() {
    let t = std::sync::Arc::new(Hub::start_with(|_| {}).await);
    let (token, _) = t.device("d1").await;
    t.enqueue(
        "d1",
        &[("iothub-ack", "positive"), ("iothub-messageid", "ok")],
    )
    .await;
    let lock = t.take("d1", &token).await;
    let poller = {
        let t = t.clone();
        tokio::spawn(async move {
            let response = t.receive(&format!("?wait-ms={LONG_POLL_MS}")).await;
            (response.status(), response.text().await.unwrap())
        })
    };
    // The poll is in the hub and registered for wake-ups before the outcome commits.
    t.hub.wait_for_polls(Wake::Feedback, 1).await;
    t.device_call(
        Method::DELETE,
        &format!("/devices/d1/messages/deviceBound/{lock}"),
        &token,
    )
    .await;
    let (status, body) = woken(poller).await.unwrap();
    assert_eq!(status, 200);
    let records: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(records[0]["originalMessageId"], "ok");
    assert_eq!(records[0]["statusCode"], "Success");
}
