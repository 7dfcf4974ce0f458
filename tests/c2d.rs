//! Cloud-to-device messaging over HTTP against a real PostgreSQL: enqueue, receive, settle, locks, delivery
//! counts, expiry, purge, queue depth, isolation between devices, long polls and the service's queue calls.

mod common;

use std::time::{Duration, Instant};

use chrono::Duration as Span;

use common::*;
use iothub::auth::sas;
use reqwest::{Method, Response};
use serde_json::Value;

/// A hub with a service token and helpers for one test.
struct C2d {
    hub: TestHub,
    service: String,
}

impl C2d {
    async fn start() -> C2d {
        Self::start_with(|_| {}).await
    }

    async fn start_with(adjust: impl FnOnce(&mut iothub::Config)) -> C2d {
        let hub = TestHub::start_with(adjust).await;
        let service = hub.policy_token("service").await;
        C2d { hub, service }
    }

    /// Registers a device; returns its token.
    async fn device(&self, id: &str) -> String {
        let device = self.hub.create_device(id).await;
        device_token(id, &primary_key(&device))
    }

    async fn send(&self, id: &str, headers: &[(&str, &str)], body: &str) -> Response {
        let mut request = self
            .hub
            .request(
                Method::POST,
                &format!("{}/commands", device_path(id)),
                &self.service,
            )
            .body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Enqueues and asserts 201; returns the answer's JSON.
    async fn enqueue(&self, id: &str, headers: &[(&str, &str)], body: &str) -> Value {
        let response = self.send(id, headers, body).await;
        assert_eq!(response.status(), 201, "enqueue for {id}");
        response.json().await.unwrap()
    }

    async fn receive_query(&self, id: &str, token: &str, query: &str) -> Response {
        self.hub
            .request(
                Method::GET,
                &format!("{}/messages/deviceBound{query}", device_path(id)),
                token,
            )
            .send()
            .await
            .unwrap()
    }

    async fn receive(&self, id: &str, token: &str) -> Response {
        self.receive_query(id, token, "").await
    }

    /// Receives and asserts a message came; returns (lock token, headers, body).
    async fn take(&self, id: &str, token: &str) -> (String, reqwest::header::HeaderMap, String) {
        let response = self.receive(id, token).await;
        assert_eq!(response.status(), 200, "a message for {id}");
        let headers = response.headers().clone();
        let etag = headers["etag"].to_str().unwrap().to_string();
        assert!(
            etag.starts_with('"') && etag.ends_with('"'),
            "quoted ETag: {etag}"
        );
        let lock = etag.trim_matches('"').to_string();
        (lock, headers, response.text().await.unwrap())
    }

    async fn settle(&self, id: &str, token: &str, lock: &str, action: &str) -> Response {
        let base = format!("{}/messages/deviceBound/{lock}", device_path(id));
        let (method, path) = match action {
            "complete" => (Method::DELETE, base),
            "reject" => (Method::DELETE, format!("{base}?reject")),
            "reject=" => (Method::DELETE, format!("{base}?reject=")),
            "reject=true" => (Method::DELETE, format!("{base}?reject=true")),
            "abandon" => (Method::POST, format!("{base}/abandon")),
            other => panic!("unknown action {other}"),
        };
        self.hub.request(method, &path, token).send().await.unwrap()
    }

    async fn status(&self, id: &str, seq: i64) -> Value {
        let response = self
            .hub
            .request(
                Method::GET,
                &format!("{}/commands/{seq}", device_path(id)),
                &self.service,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "status of {id}/{seq}");
        response.json().await.unwrap()
    }

    async fn queue(&self, id: &str, query: &str) -> Response {
        self.hub
            .request(
                Method::GET,
                &format!("{}/commands{query}", device_path(id)),
                &self.service,
            )
            .send()
            .await
            .unwrap()
    }

    /// Waits until `check` holds for the message's status (read on the database's clock); returns that status.
    async fn wait_status(&self, id: &str, seq: i64, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + LIVENESS;
        loop {
            let status = self.status(id, seq).await;
            if check(&status) {
                return status;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited {LIVENESS:?}; the status is still {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every feedback record currently receivable (receives and completes batches until 204).
    async fn drain_feedback(&self) -> Vec<Value> {
        let mut all = Vec::new();
        loop {
            let response = self
                .hub
                .request(
                    Method::GET,
                    "/messages/serviceBound/feedback",
                    &self.service,
                )
                .send()
                .await
                .unwrap();
            if response.status() == 204 {
                return all;
            }
            assert_eq!(response.status(), 200);
            let lock = response.headers()["etag"]
                .to_str()
                .unwrap()
                .trim_matches('"')
                .to_string();
            let batch: Vec<Value> = response.json().await.unwrap();
            all.extend(batch);
            let done = self
                .hub
                .request(
                    Method::DELETE,
                    &format!("/messages/serviceBound/feedback/{lock}"),
                    &self.service,
                )
                .send()
                .await
                .unwrap();
            assert_eq!(done.status(), 204);
        }
    }
}

fn header<'h>(headers: &'h reqwest::header::HeaderMap, name: &str) -> &'h str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn a_message_travels_with_every_property() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;

    let response = t
        .send(
            "dev-1",
            &[
                ("iothub-messageid", "order-17"),
                ("iothub-correlationid", "corr-1"),
                ("iothub-userid", "backend"),
                ("iothub-ack", "full"),
                ("iothub-contenttype", "application/json"),
                ("iothub-contentencoding", "utf-8"),
                ("iothub-app-Temperature", "21.5"),
                ("iothub-app-mode", "eco"),
            ],
            "{\"setpoint\":21}",
        )
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        header(response.headers(), "location"),
        "/devices/dev-1/commands/1"
    );
    let enqueued: Value = response.json().await.unwrap();
    assert_eq!(enqueued["messageId"], "order-17");
    assert_eq!(enqueued["sequenceNumber"], 1);
    assert!(enqueued["enqueuedTimeUtc"].as_str().unwrap().ends_with('Z'));
    // Default TTL: one hour after enqueue.
    let enqueued_at =
        chrono::DateTime::parse_from_rfc3339(enqueued["enqueuedTimeUtc"].as_str().unwrap())
            .unwrap();
    let expiry =
        chrono::DateTime::parse_from_rfc3339(enqueued["expiryTimeUtc"].as_str().unwrap()).unwrap();
    assert_eq!((expiry - enqueued_at).num_seconds(), 3600);

    let (lock, headers, body) = t.take("dev-1", &token).await;
    assert_eq!(body, "{\"setpoint\":21}");
    assert!(uuid::Uuid::parse_str(&lock).is_ok());
    assert_eq!(header(&headers, "iothub-messageid"), "order-17");
    assert_eq!(header(&headers, "iothub-correlationid"), "corr-1");
    assert_eq!(header(&headers, "iothub-userid"), "backend");
    assert_eq!(header(&headers, "iothub-sequencenumber"), "1");
    assert_eq!(
        header(&headers, "iothub-to"),
        "/devices/dev-1/messages/devicebound"
    );
    assert_eq!(header(&headers, "iothub-ack"), "full");
    // No expiry from the sender: empty, although the default TTL applies.
    assert_eq!(header(&headers, "iothub-expiry"), "");
    assert_eq!(header(&headers, "iothub-deliverycount"), "0");
    assert_eq!(
        header(&headers, "iothub-enqueuedtime"),
        enqueued["enqueuedTimeUtc"].as_str().unwrap()
    );
    assert_eq!(header(&headers, "contenttype"), "application/json");
    assert_eq!(header(&headers, "contentencoding"), "utf-8");
    assert_eq!(header(&headers, "iothub-app-temperature"), "21.5");
    assert_eq!(header(&headers, "iothub-app-mode"), "eco");

    let status = t.status("dev-1", 1).await;
    assert_eq!(status["state"], "Invisible");
    assert_eq!(status["deliveryCount"], 1);
    assert!(status["lockedUntilUtc"].is_string());

    assert_eq!(
        t.settle("dev-1", &token, &lock, "complete").await.status(),
        204
    );
    assert_eq!(t.receive("dev-1", &token).await.status(), 204);
    let status = t.status("dev-1", 1).await;
    assert_eq!(status["state"], "Completed");
    assert_eq!(status["outcome"], "Success");
    assert!(status["outcomeTimeUtc"].is_string());

    // A generated message id, and an absolute expiry echoed back as sent.
    let at = (chrono::Utc::now() + chrono::Duration::minutes(10))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let second = t.enqueue("dev-1", &[("iothub-expiry", &at)], "two").await;
    assert!(uuid::Uuid::parse_str(second["messageId"].as_str().unwrap()).is_ok());
    assert_eq!(second["sequenceNumber"], 2);
    assert_eq!(second["expiryTimeUtc"], at.as_str());
    let (_, headers, _) = t.take("dev-1", &token).await;
    assert_eq!(header(&headers, "iothub-expiry"), at.as_str());
    assert_eq!(header(&headers, "iothub-ack"), "none");
    assert!(headers.get("contenttype").is_none());
}

#[tokio::test]
async fn response_header_names_keep_their_exact_case() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;
    t.enqueue(
        "dev-1",
        &[
            ("iothub-contenttype", "text/plain"),
            ("iothub-app-mode", "eco"),
        ],
        "x",
    )
    .await;
    // A raw HTTP/1.1 exchange: the C SDK compares response header names case-sensitively.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = t.hub.base.trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "GET /devices/dev-1/messages/devicebound?api-version=2016-11-14 HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for name in [
        "\r\nETag: \"",
        "\r\nContentType: text/plain",
        "\r\niothub-app-mode: eco",
        "\r\niothub-messageid: ",
    ] {
        assert!(text.contains(name), "{name:?} in {text}");
    }
}

#[tokio::test]
async fn enqueue_refuses_bad_input_with_iot_hub_errors() {
    let t = C2d::start().await;
    t.device("dev-1").await;

    assert_error(t.send("nobody", &[], "x").await, 404, "DeviceNotFound").await;
    assert_error(
        t.send("dev-1", &[("iothub-ack", "sometimes")], "x").await,
        400,
        "ArgumentInvalid",
    )
    .await;
    assert_error(
        t.send("dev-1", &[("iothub-ttl", "soon")], "x").await,
        400,
        "ArgumentInvalid",
    )
    .await;
    assert_error(
        t.send("dev-1", &[("iothub-ttl", "0")], "x").await,
        400,
        "ArgumentInvalid",
    )
    .await;
    assert_error(
        t.send("dev-1", &[("iothub-ttl", "172801")], "x").await,
        403,
        "InvalidMessageExpiryTime",
    )
    .await;
    assert_error(
        t.send("dev-1", &[("iothub-expiry", "tomorrow")], "x").await,
        400,
        "ArgumentInvalid",
    )
    .await;
    assert_error(
        t.send("dev-1", &[("iothub-expiry", "2001-01-01T00:00:00Z")], "x")
            .await,
        403,
        "InvalidMessageExpiryTime",
    )
    .await;
    let far = (chrono::Utc::now() + chrono::Duration::hours(49)).to_rfc3339();
    assert_error(
        t.send("dev-1", &[("iothub-expiry", &far)], "x").await,
        403,
        "InvalidMessageExpiryTime",
    )
    .await;
    assert_error(
        t.send(
            "dev-1",
            &[("iothub-expiry", &far), ("iothub-ttl", "5")],
            "x",
        )
        .await,
        400,
        "ArgumentInvalid",
    )
    .await;
    assert_error(
        t.send("dev-1", &[("iothub-app-", "x")], "x").await,
        400,
        "ArgumentInvalid",
    )
    .await;
    let long_id = "m".repeat(129);
    assert_error(
        t.send("dev-1", &[("iothub-messageid", &long_id)], "x")
            .await,
        400,
        "ArgumentInvalid",
    )
    .await;

    // 64 KB, counted as body + system property values + application property names and values.
    let body = "b".repeat(65536 - 10);
    t.enqueue("dev-1", &[("iothub-messageid", "0123456789")], &body)
        .await;
    assert_error(
        t.send("dev-1", &[("iothub-messageid", "0123456789x")], &body)
            .await,
        413,
        "MessageTooLarge",
    )
    .await;
    assert_error(
        t.send(
            "dev-1",
            &[("iothub-messageid", "0123456789"), ("iothub-app-a", "")],
            &body,
        )
        .await,
        413,
        "MessageTooLarge",
    )
    .await;
    assert_error(
        t.send("dev-1", &[], &"b".repeat(70_000)).await,
        413,
        "MessageTooLarge",
    )
    .await;

    // Only ServiceConnect may enqueue: a device's own token or a registry policy is refused.
    let device_token = t.device("dev-2").await;
    let response = t
        .hub
        .request(Method::POST, "/devices/dev-2/commands", &device_token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    let registry = t.hub.policy_token("registryReadWrite").await;
    let response = t
        .hub
        .request(Method::POST, "/devices/dev-2/commands", &registry)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    // Nothing of the refused sends was queued.
    let queue: Vec<Value> = t.queue("dev-1", "").await.json().await.unwrap();
    assert_eq!(queue.len(), 1);
}

#[tokio::test]
async fn the_queue_depth_is_enforced_on_live_messages() {
    let t = C2d::start_with(|c| c.c2d.max_queue_depth = 3).await;
    let token = t.device("dev-1").await;
    for _ in 0..3 {
        t.enqueue("dev-1", &[], "x").await;
    }
    assert_error(
        t.send("dev-1", &[], "x").await,
        403,
        "DeviceMaximumQueueDepthExceeded",
    )
    .await;
    // A locked message is still live; a completed one is not.
    let (lock, _, _) = t.take("dev-1", &token).await;
    assert_error(
        t.send("dev-1", &[], "x").await,
        403,
        "DeviceMaximumQueueDepthExceeded",
    )
    .await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "complete").await.status(),
        204
    );
    let fourth = t.enqueue("dev-1", &[], "x").await;
    assert_eq!(fourth["sequenceNumber"], 4);
    // Depth is per device.
    t.device("dev-2").await;
    t.enqueue("dev-2", &[], "x").await;
}

#[tokio::test]
async fn messages_come_in_order_and_a_lock_hides_a_message() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;
    assert_eq!(t.receive("dev-1", &token).await.status(), 204);
    for body in ["one", "two", "three"] {
        t.enqueue("dev-1", &[], body).await;
    }
    let (lock1, h1, b1) = t.take("dev-1", &token).await;
    let (lock2, h2, b2) = t.take("dev-1", &token).await;
    let (_lock3, h3, b3) = t.take("dev-1", &token).await;
    assert_eq!(
        (b1.as_str(), b2.as_str(), b3.as_str()),
        ("one", "two", "three")
    );
    assert_eq!(header(&h1, "iothub-sequencenumber"), "1");
    assert_eq!(header(&h2, "iothub-sequencenumber"), "2");
    assert_eq!(header(&h3, "iothub-sequencenumber"), "3");
    // All three are locked: nothing more to receive.
    assert_eq!(t.receive("dev-1", &token).await.status(), 204);
    // Abandoning the second makes it the next one delivered, with one earlier delivery.
    assert_eq!(
        t.settle("dev-1", &token, &lock2, "abandon").await.status(),
        204
    );
    let (_, again, body) = t.take("dev-1", &token).await;
    assert_eq!(body, "two");
    assert_eq!(header(&again, "iothub-deliverycount"), "1");
    assert_eq!(t.status("dev-1", 2).await["deliveryCount"], 2);
    assert_eq!(
        t.settle("dev-1", &token, &lock1, "complete").await.status(),
        204
    );
}

#[tokio::test]
async fn settlement_needs_the_current_lock_token() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;
    for _ in 0..5 {
        t.enqueue("dev-1", &[("iothub-ack", "full")], "x").await;
    }
    let unknown = uuid::Uuid::new_v4().to_string();
    for action in ["complete", "reject", "abandon"] {
        assert_error(
            t.settle("dev-1", &token, &unknown, action).await,
            412,
            "DeviceMessageLockLost",
        )
        .await;
        assert_error(
            t.settle("dev-1", &token, "not-a-guid", action).await,
            412,
            "DeviceMessageLockLost",
        )
        .await;
    }

    // Complete, then every settlement with that token is stale.
    let (lock, _, _) = t.take("dev-1", &token).await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "complete").await.status(),
        204
    );
    for action in ["complete", "reject", "abandon"] {
        assert_error(
            t.settle("dev-1", &token, &lock, action).await,
            412,
            "DeviceMessageLockLost",
        )
        .await;
    }

    // Reject in its three spellings dead-letters at once.
    for (seq, action) in [(2, "reject"), (3, "reject="), (4, "reject=true")] {
        let (lock, _, _) = t.take("dev-1", &token).await;
        assert_eq!(
            t.settle("dev-1", &token, &lock, action).await.status(),
            204,
            "{action}"
        );
        let status = t.status("dev-1", seq).await;
        assert_eq!(status["state"], "DeadLettered");
        assert_eq!(status["outcome"], "Rejected");
        assert_error(
            t.settle("dev-1", &token, &lock, "complete").await,
            412,
            "DeviceMessageLockLost",
        )
        .await;
    }

    // The token of an abandoned delivery is stale, and so is the one before a redelivery.
    let (lock, _, _) = t.take("dev-1", &token).await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "abandon").await.status(),
        204
    );
    assert_error(
        t.settle("dev-1", &token, &lock, "complete").await,
        412,
        "DeviceMessageLockLost",
    )
    .await;
    let (fresh, _, _) = t.take("dev-1", &token).await;
    assert_ne!(fresh, lock);
    // A quoted token (as some SDKs put the ETag back) is accepted; If-Match is never needed.
    let quoted = format!("%22{fresh}%22");
    assert_eq!(
        t.settle("dev-1", &token, &quoted, "complete")
            .await
            .status(),
        204
    );

    let feedback = t.drain_feedback().await;
    let codes: Vec<&str> = feedback
        .iter()
        .map(|r| r["statusCode"].as_str().unwrap())
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == "Success").count(), 2);
    assert_eq!(codes.iter().filter(|c| **c == "Rejected").count(), 3);
    assert_eq!(codes.len(), 5);
}

#[tokio::test]
async fn a_device_cannot_receive_or_settle_another_devices_messages() {
    let t = C2d::start().await;
    let token_a = t.device("dev-a").await;
    let token_b = t.device("dev-b").await;
    t.enqueue("dev-b", &[], "for b").await;
    // A's token on B's path is refused; A's own queue is empty.
    assert_error(
        t.receive("dev-b", &token_a).await,
        401,
        "IotHubUnauthorizedAccess",
    )
    .await;
    assert_eq!(t.receive("dev-a", &token_a).await.status(), 204);
    let (lock_b, _, _) = t.take("dev-b", &token_b).await;
    // B's lock token on A's path: A holds no such message.
    for action in ["complete", "reject", "abandon"] {
        assert_error(
            t.settle("dev-a", &token_a, &lock_b, action).await,
            412,
            "DeviceMessageLockLost",
        )
        .await;
    }
    assert_eq!(t.status("dev-b", 1).await["state"], "Invisible");
    assert_eq!(
        t.settle("dev-b", &token_b, &lock_b, "complete")
            .await
            .status(),
        204
    );
}

#[tokio::test]
async fn sixteen_concurrent_receivers_never_hold_the_same_message() {
    let t = C2d::start_with(|c| c.c2d.max_queue_depth = 100).await;
    let token = t.device("dev-1").await;
    const MESSAGES: usize = 60;
    for i in 0..MESSAGES {
        t.enqueue("dev-1", &[], &format!("m{i}")).await;
    }
    let t = std::sync::Arc::new(t);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let t = t.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let response = t.receive("dev-1", &token).await;
                if response.status() == 204 {
                    return got;
                }
                assert_eq!(response.status(), 200);
                let lock = response.headers()["etag"]
                    .to_str()
                    .unwrap()
                    .trim_matches('"')
                    .to_string();
                let seq: i64 = header(response.headers(), "iothub-sequencenumber")
                    .parse()
                    .unwrap();
                got.push((seq, lock));
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let mut seqs: Vec<i64> = all.iter().map(|(s, _)| *s).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(
        seqs.len(),
        all.len(),
        "a message was handed to two receivers"
    );
    assert_eq!(all.len(), MESSAGES, "every message was received once");
    for (_, lock) in &all {
        assert_eq!(
            t.settle("dev-1", &token, lock, "complete").await.status(),
            204
        );
    }
}

#[tokio::test]
async fn an_unsettled_message_comes_back_after_its_lock_and_counts_a_delivery() {
    let t = C2d::start_with(|c| c.c2d.lock_secs = 5).await;
    let token = t.device("dev-1").await;
    t.enqueue("dev-1", &[], "x").await;
    let (first, headers, _) = t.take("dev-1", &token).await;
    assert_eq!(header(&headers, "iothub-deliverycount"), "0");
    let locked_until = api_time(&t.status("dev-1", 1).await["lockedUntilUtc"]);
    assert_eq!(t.receive("dev-1", &token).await.status(), 204);
    // A long poll wakes when the lock runs out (the database says when), with no enqueue to wake it.
    let response =
        woken(t.receive_query("dev-1", &token, &format!("?wait-ms={LONG_POLL_MS}"))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "iothub-deliverycount"), "1");
    let second = response.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert_ne!(first, second);
    // Not before the lock ran out, on the database's clock: the new lock started (5 s before it ends) no earlier
    // than the old one ended.
    let relocked_until = api_time(&t.status("dev-1", 1).await["lockedUntilUtc"]);
    assert!(
        relocked_until - Span::seconds(5) >= locked_until,
        "redelivered at {} while locked until {locked_until}",
        relocked_until - Span::seconds(5)
    );
    assert_error(
        t.settle("dev-1", &token, &first, "complete").await,
        412,
        "DeviceMessageLockLost",
    )
    .await;
    assert_eq!(
        t.settle("dev-1", &token, &second, "complete")
            .await
            .status(),
        204
    );
    assert_eq!(t.status("dev-1", 1).await["deliveryCount"], 2);
}

#[tokio::test]
async fn abandoning_the_last_allowed_delivery_dead_letters() {
    let t = C2d::start_with(|c| c.c2d.max_delivery_count = 2).await;
    let token = t.device("dev-1").await;
    t.enqueue(
        "dev-1",
        &[("iothub-ack", "negative"), ("iothub-messageid", "m-1")],
        "x",
    )
    .await;
    let (lock, _, _) = t.take("dev-1", &token).await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "abandon").await.status(),
        204
    );
    assert_eq!(t.status("dev-1", 1).await["state"], "Enqueued");
    let (lock, headers, _) = t.take("dev-1", &token).await;
    assert_eq!(header(&headers, "iothub-deliverycount"), "1");
    assert_eq!(
        t.settle("dev-1", &token, &lock, "abandon").await.status(),
        204
    );
    let status = t.status("dev-1", 1).await;
    assert_eq!(status["state"], "DeadLettered");
    assert_eq!(status["outcome"], "DeliveryCountExceeded");
    assert_eq!(status["deliveryCount"], 2);
    assert_eq!(t.receive("dev-1", &token).await.status(), 204);
    let feedback = t.drain_feedback().await;
    assert_eq!(feedback.len(), 1);
    assert_eq!(feedback[0]["statusCode"], "DeliveryCountExceeded");
    assert_eq!(feedback[0]["originalMessageId"], "m-1");
    assert_eq!(feedback[0]["deviceId"], "dev-1");
}

#[tokio::test]
async fn a_lapsed_last_delivery_is_dead_lettered_even_if_the_device_never_polls_again() {
    let t = C2d::start_with(|c| {
        c.c2d.lock_secs = 5;
        c.c2d.max_delivery_count = 1;
        c.c2d.sweep_interval_ms = 200;
    })
    .await;
    let token = t.device("dev-1").await;
    t.enqueue(
        "dev-1",
        &[("iothub-ack", "full"), ("iothub-messageid", "lapsed")],
        "x",
    )
    .await;
    let (_lock, _, _) = t.take("dev-1", &token).await;
    let locked_until = api_time(&t.status("dev-1", 1).await["lockedUntilUtc"]);
    // Never settled, never polled again: the sweeper ends it after the lock ran out (and not before).
    let status = t
        .wait_status("dev-1", 1, |s| s["state"] == "DeadLettered")
        .await;
    assert_eq!(status["outcome"], "DeliveryCountExceeded");
    assert!(api_time(&status["outcomeTimeUtc"]) >= locked_until);
    let feedback = t.drain_feedback().await;
    assert_eq!(feedback.len(), 1);
    assert_eq!(feedback[0]["statusCode"], "DeliveryCountExceeded");
    assert_eq!(feedback[0]["originalMessageId"], "lapsed");
}

#[tokio::test]
async fn a_lapsed_last_delivery_is_dead_lettered_at_the_next_receive() {
    // The sweeper is slow here, so the receive has to do it, in its own transaction.
    let t = C2d::start_with(|c| {
        c.c2d.lock_secs = 5;
        c.c2d.max_delivery_count = 1;
        c.c2d.sweep_interval_ms = 60_000;
    })
    .await;
    let token = t.device("dev-1").await;
    t.enqueue("dev-1", &[("iothub-ack", "negative")], "first")
        .await;
    t.enqueue("dev-1", &[], "second").await;
    let (_lock, _, body) = t.take("dev-1", &token).await;
    assert_eq!(body, "first");
    // Until the lock runs out on the database's clock (the status reads it), "first" is merely locked.
    t.wait_status("dev-1", 1, |s| s["state"] == "Enqueued")
        .await;
    let (_, headers, body) = t.take("dev-1", &token).await;
    assert_eq!(
        body, "second",
        "the exhausted message is not delivered again"
    );
    assert_eq!(header(&headers, "iothub-sequencenumber"), "2");
    assert_eq!(
        t.status("dev-1", 1).await["outcome"],
        "DeliveryCountExceeded"
    );
    assert_eq!(t.drain_feedback().await.len(), 1);
}

#[tokio::test]
async fn an_expired_message_is_never_delivered_and_is_reported() {
    let t = C2d::start_with(|c| c.c2d.sweep_interval_ms = 60_000).await;
    let token = t.device("dev-1").await;
    let old = t
        .enqueue(
            "dev-1",
            &[
                ("iothub-ttl", "1"),
                ("iothub-ack", "negative"),
                ("iothub-messageid", "old"),
            ],
            "x",
        )
        .await;
    t.enqueue("dev-1", &[("iothub-ack", "full")], "fresh").await;
    // Until the database's clock passes the expiry (reported to the millisecond, stored below the next one).
    wait_for_db_time(
        &t.hub.db,
        api_time(&old["expiryTimeUtc"]) + Span::milliseconds(1),
    )
    .await;
    let (_, _, body) = t.take("dev-1", &token).await;
    assert_eq!(body, "fresh");
    let status = t.status("dev-1", 1).await;
    assert_eq!(status["state"], "DeadLettered");
    assert_eq!(status["outcome"], "Expired");
    let feedback = t.drain_feedback().await;
    assert_eq!(feedback.len(), 1);
    assert_eq!(feedback[0]["statusCode"], "Expired");
    assert_eq!(feedback[0]["originalMessageId"], "old");
}

#[tokio::test]
async fn the_sweeper_expires_messages_of_devices_that_never_poll() {
    let t = C2d::start_with(|c| c.c2d.sweep_interval_ms = 200).await;
    t.device("dev-1").await;
    t.enqueue("dev-1", &[("iothub-ttl", "1"), ("iothub-ack", "full")], "x")
        .await;
    let status = t
        .wait_status("dev-1", 1, |s| s["state"] == "DeadLettered")
        .await;
    assert_eq!(status["outcome"], "Expired");
    // Not before it expired, on the database's clock.
    assert!(api_time(&status["outcomeTimeUtc"]) >= api_time(&status["expiryTimeUtc"]));
    let feedback = t.drain_feedback().await;
    assert_eq!(feedback.len(), 1);
    assert_eq!(feedback[0]["statusCode"], "Expired");
    assert_eq!(feedback[0]["description"], "Message expired");
}

#[tokio::test]
async fn purge_ends_every_live_message() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;
    t.device("dev-2").await;
    for _ in 0..3 {
        t.enqueue("dev-1", &[("iothub-ack", "negative")], "x").await;
    }
    t.enqueue("dev-2", &[], "kept").await;
    let (lock, _, _) = t.take("dev-1", &token).await;
    let response = t
        .hub
        .request(Method::DELETE, "/devices/dev-1/commands", &t.service)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"totalMessagesPurged": 3, "deviceId": "dev-1", "moduleId": null})
    );
    assert_eq!(t.receive("dev-1", &token).await.status(), 204);
    assert_error(
        t.settle("dev-1", &token, &lock, "complete").await,
        412,
        "DeviceMessageLockLost",
    )
    .await;
    assert_eq!(t.status("dev-1", 1).await["outcome"], "Purged");
    let feedback = t.drain_feedback().await;
    assert_eq!(feedback.len(), 3);
    assert!(feedback.iter().all(|r| r["statusCode"] == "Purged"));
    // Other devices keep theirs; purging an empty queue purges nothing; an unknown device is a 404.
    let queue: Vec<Value> = t.queue("dev-2", "").await.json().await.unwrap();
    assert_eq!(queue.len(), 1);
    let again: Value = t
        .hub
        .request(Method::DELETE, "/devices/dev-1/commands", &t.service)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["totalMessagesPurged"], 0);
    let response = t
        .hub
        .request(Method::DELETE, "/devices/nobody/commands", &t.service)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "DeviceNotFound").await;
}

#[tokio::test]
async fn the_queue_lists_live_messages_in_pages_and_status_reports_outcomes() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;
    for i in 1..=5 {
        t.enqueue("dev-1", &[("iothub-messageid", &format!("m{i}"))], "x")
            .await;
    }
    let (lock, _, _) = t.take("dev-1", &token).await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "complete").await.status(),
        204
    );
    t.take("dev-1", &token).await;

    let response = t.queue("dev-1", "?top=2").await;
    assert_eq!(response.status(), 200);
    let next = header(response.headers(), "x-ms-continuation").to_string();
    let page: Vec<Value> = response.json().await.unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["sequenceNumber"], 2);
    assert_eq!(page[0]["state"], "Invisible");
    assert_eq!(page[0]["deliveryCount"], 1);
    assert_eq!(page[1]["sequenceNumber"], 3);
    assert_eq!(page[1]["state"], "Enqueued");
    assert_eq!(page[1]["deliveryCount"], 0);
    let response = t
        .queue("dev-1", &format!("?top=2&continuationToken={next}"))
        .await;
    assert!(response.headers().get("x-ms-continuation").is_none());
    let page: Vec<Value> = response.json().await.unwrap();
    let seqs: Vec<i64> = page
        .iter()
        .map(|m| m["sequenceNumber"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 5]);

    // The completed message is out of the queue but its status stays readable.
    assert_eq!(t.status("dev-1", 1).await["outcome"], "Success");
    assert_eq!(t.status("dev-1", 1).await["messageId"], "m1");
    let response = t
        .hub
        .request(Method::GET, "/devices/dev-1/commands/99", &t.service)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    let response = t
        .hub
        .request(Method::GET, "/devices/dev-1/commands/abc", &t.service)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
    let response = t
        .hub
        .request(Method::GET, "/devices/nobody/commands/1", &t.service)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "DeviceNotFound").await;
    assert_error(t.queue("nobody", "").await, 404, "DeviceNotFound").await;
    assert_error(t.queue("dev-1", "?top=0").await, 400, "ArgumentInvalid").await;
    for bad in ["%25%25", "AA", "YQA"] {
        assert_error(
            t.queue("dev-1", &format!("?continuationToken={bad}")).await,
            400,
            "ArgumentInvalid",
        )
        .await;
    }
}

#[tokio::test]
async fn ended_messages_are_deleted_after_the_feedback_ttl() {
    let t = C2d::start_with(|c| {
        c.c2d.sweep_interval_ms = 200;
        c.feedback.ttl_secs = 2;
    })
    .await;
    let token = t.device("dev-1").await;
    t.enqueue("dev-1", &[("iothub-ack", "full")], "x").await;
    let (lock, _, _) = t.take("dev-1", &token).await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "complete").await.status(),
        204
    );
    let status = t.status("dev-1", 1).await;
    assert_eq!(status["outcome"], "Success");
    let ended = api_time(&status["outcomeTimeUtc"]);
    // Kept for the TTL, then deleted by the sweeper. Each look reads the database's clock after its answer: a
    // look that found the message gone while that clock was still short of the TTL shows an early delete.
    let kept_until = ended + Span::seconds(2);
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let response = t
            .hub
            .request(Method::GET, "/devices/dev-1/commands/1", &t.service)
            .send()
            .await
            .unwrap();
        let after = t.hub.db_now().await;
        if response.status() != 200 {
            assert!(
                after >= kept_until,
                "deleted before its feedback TTL ran out: gone at {after}, kept until {kept_until}"
            );
            assert_error(response, 404, "NotFound").await;
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not deleted within {LIVENESS:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM c2d_messages")
        .fetch_one(&t.hub.db)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    // Its feedback record expired too: never handed out.
    assert!(t.drain_feedback().await.is_empty());
}

/// Registers each of `ids` and starts a long poll of its own for each, returned once every poll waits in the hub for
/// its device's wake-up; each answers its status and body.
async fn waiting_long_polls(
    t: &std::sync::Arc<C2d>,
    ids: &[&'static str],
) -> Vec<tokio::task::JoinHandle<(reqwest::StatusCode, String)>> {
    let mut polls = Vec::new();
    for &id in ids {
        let token = t.device(id).await;
        let t = t.clone();
        polls.push(tokio::spawn(async move {
            let wait = format!("?wait-ms={LONG_POLL_MS}");
            let response = t.receive_query(id, &token, &wait).await;
            (response.status(), response.text().await.unwrap())
        }));
    }
    for &id in ids {
        t.hub.wait_for_polls(Wake::C2d(id), 1).await;
    }
    polls
}

/// The wake-up of an enqueue travels as SQL text (with the commit, in one round trip), so a device id is quoted there:
/// ids may hold quotes, parentheses and semicolons.
#[tokio::test]
async fn device_ids_that_look_like_sql_are_woken_by_their_own_enqueues() {
    let t = std::sync::Arc::new(C2d::start().await);
    // Unquoted, the second would notify "x" and run a statement of its own.
    let ids = ["o'brien", "x');SELECT('1"];
    let polls = waiting_long_polls(&t, &ids).await;
    for (id, poll) in ids.iter().zip(polls) {
        t.enqueue(id, &[], id).await;
        let (status, body) = woken(poll).await.unwrap();
        assert_eq!((status.as_u16(), body.as_str()), (200, *id));
    }
    // The quoting reads back as the same text, backslashes included.
    for text in ["plain", "it's", "a\\'b\\\\n", "''", "\\"] {
        let sql = format!("SELECT {}", iothub::postgres::literal(text));
        let read: String = sqlx::query_scalar(&sql).fetch_one(&t.hub.db).await.unwrap();
        assert_eq!(read, text, "{sql}");
    }
}

#[tokio::test]
async fn a_long_poll_answers_the_moment_a_message_is_enqueued() {
    let t = std::sync::Arc::new(C2d::start().await);
    let token = t.device("dev-1").await;
    let other_token = t.device("dev-2").await;
    let poll = |id: &'static str, token: String| {
        let t = t.clone();
        tokio::spawn(async move {
            let wait = format!("?wait-ms={LONG_POLL_MS}");
            let response = t.receive_query(id, &token, &wait).await;
            (response.status(), response.text().await.unwrap())
        })
    };
    let poller = poll("dev-1", token.clone());
    let other = poll("dev-2", other_token);
    // Both polls are in the hub, registered for their device's wake-ups, before anything is enqueued.
    t.hub.wait_for_polls(Wake::C2d("dev-1"), 1).await;
    t.hub.wait_for_polls(Wake::C2d("dev-2"), 1).await;
    // A message for another device answers that device's poll, and leaves this one waiting.
    t.enqueue("dev-2", &[], "not yours").await;
    let (status, body) = woken(other).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "not yours"));
    assert_eq!(
        t.hub.polls_waiting(Wake::C2d("dev-1")),
        1,
        "dev-1's poll ended on another device's message"
    );
    t.enqueue("dev-1", &[], "now").await;
    let (status, body) = woken(poller).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "now");

    // An empty wait ends with 204, not before the time asked for (the monotonic clock cannot run short).
    let start = Instant::now();
    assert_eq!(
        t.receive_query("dev-1", &token, "?wait-ms=300")
            .await
            .status(),
        204
    );
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_error(
        t.receive_query("dev-1", &token, "?wait-ms=30001").await,
        400,
        "ArgumentInvalid",
    )
    .await;
    assert_error(
        t.receive_query("dev-1", &token, "?wait-ms=-1").await,
        400,
        "ArgumentInvalid",
    )
    .await;
}

#[tokio::test]
async fn an_abandoned_message_wakes_a_waiting_long_poll() {
    let t = std::sync::Arc::new(C2d::start().await);
    let token = t.device("dev-1").await;
    t.enqueue("dev-1", &[], "again").await;
    let (lock, _, _) = t.take("dev-1", &token).await;
    let poller = {
        let (t, token) = (t.clone(), token.clone());
        tokio::spawn(async move {
            let wait = format!("?wait-ms={LONG_POLL_MS}");
            let response = t.receive_query("dev-1", &token, &wait).await;
            (response.status(), response.text().await.unwrap())
        })
    };
    // The only message is locked (for a minute): the poll waits, until the abandon puts it back.
    t.hub.wait_for_polls(Wake::C2d("dev-1"), 1).await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "abandon").await.status(),
        204
    );
    let (status, body) = woken(poller).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (200, "again"));
}

#[tokio::test]
async fn long_polls_end_when_the_hub_shuts_down() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;
    let url = format!(
        "{}/devices/dev-1/messages/deviceBound?api-version=2021-04-12&wait-ms={LONG_POLL_MS}",
        t.hub.base
    );
    let http = t.hub.http.clone();
    let poller = tokio::spawn(async move {
        let response = http
            .get(url)
            .header("Authorization", token)
            .send()
            .await
            .unwrap();
        response.status()
    });
    t.hub.wait_for_polls(Wake::C2d("dev-1"), 1).await;
    // Shutdown ends the wait: the poll is answered and the hub stops, both before the poll's wait runs out.
    let stop = async {
        t.hub.shutdown().await;
        poller.await.unwrap()
    };
    let status = woken(stop).await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn the_registry_counts_live_messages_and_deleting_a_device_deletes_its_queue() {
    let t = C2d::start().await;
    let token = t.device("dev-1").await;
    for _ in 0..3 {
        t.enqueue("dev-1", &[("iothub-ack", "full")], "x").await;
    }
    let (lock, _, _) = t.take("dev-1", &token).await;
    assert_eq!(
        t.settle("dev-1", &token, &lock, "complete").await.status(),
        204
    );
    let owner = t.hub.owner().await;
    let device: Value = t
        .hub
        .request(Method::GET, "/devices/dev-1", &owner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(device["cloudToDeviceMessageCount"], 2);

    let response = t
        .hub
        .request(Method::DELETE, "/devices/dev-1", &owner)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM c2d_messages")
        .fetch_one(&t.hub.db)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    // A new device with the same id starts a new queue at sequence number 1.
    t.device("dev-1").await;
    let first = t.enqueue("dev-1", &[("iothub-ack", "full")], "x").await;
    assert_eq!(first["sequenceNumber"], 1);
    let device: Value = t
        .hub
        .request(Method::GET, "/devices/dev-1", &owner)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(device["cloudToDeviceMessageCount"], 1);
}

#[tokio::test]
async fn two_hub_processes_on_one_database_behave_as_one_hub() {
    let t = std::sync::Arc::new(C2d::start().await);
    let token = t.device("dev-1").await;
    // A second hub on the same database, with its own listener and its own LISTEN connection.
    let listeners = iothub::Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls: None,
        metrics: None,
        mqtts: None,
        mqtt: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let other = iothub::launch(
        t.hub.config.clone(),
        t.hub.db.clone(),
        listeners,
        async move {
            let _ = stopped.await;
        },
    )
    .await
    .unwrap();
    let other_base = format!("http://{}", other.http_addr);
    let receive_on_other = {
        let http = t.hub.http.clone();
        let url = format!(
            "{other_base}/devices/dev-1/messages/deviceBound?api-version=2021-04-12&wait-ms={LONG_POLL_MS}"
        );
        let token = token.clone();
        move || {
            let (http, url, token) = (http.clone(), url.clone(), token.clone());
            async move {
                http.get(url)
                    .header("Authorization", token)
                    .send()
                    .await
                    .unwrap()
            }
        }
    };
    // A long poll on the second hub wakes on an enqueue through the first.
    let poller = tokio::spawn(receive_on_other());
    wait_for_polls(&other, Wake::C2d("dev-1"), 1).await;
    t.enqueue("dev-1", &[], "one").await;
    let response = woken(poller).await.unwrap();
    assert_eq!(response.status(), 200);
    let lock = response.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_string();
    // The lock taken through the second hub hides the message from the first, and settles through the first.
    assert_eq!(t.receive("dev-1", &token).await.status(), 204);
    assert_eq!(
        t.settle("dev-1", &token, &lock, "complete").await.status(),
        204
    );
    assert_eq!(t.status("dev-1", 1).await["state"], "Completed");
    let _ = stop.send(());
    other.wait().await.unwrap();
}

#[tokio::test]
async fn the_cli_sends_lists_reports_purges_and_watches_feedback() {
    let t = C2d::start().await;
    t.device("dev-1").await;
    let key = t.hub.policy_key("service").await;
    let connection = format!("HostName={HOST};SharedAccessKeyName=service;SharedAccessKey={key}");
    let base = t.hub.base.clone();
    let cli = |args: &'static [&'static str]| {
        let (base, connection) = (base.clone(), connection.clone());
        async move {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_iothub"))
                .args(args)
                .args(["--url", &base, "--connection-string", &connection])
                .output()
                .await
                .unwrap();
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap()
        }
    };
    let sent: Value = serde_json::from_str(
        &cli(&[
            "c2d",
            "send",
            "dev-1",
            "--body",
            "hello",
            "--ack",
            "full",
            "--ttl",
            "600",
            "--message-id",
            "cli-1",
            "--property",
            "mode=eco",
        ])
        .await,
    )
    .unwrap();
    assert_eq!(sent["sequenceNumber"], 1);
    assert_eq!(sent["messageId"], "cli-1");
    let listed: Value = serde_json::from_str(&cli(&["c2d", "list", "dev-1"]).await).unwrap();
    assert_eq!(listed[0]["messageId"], "cli-1");
    assert_eq!(listed[0]["state"], "Enqueued");
    let purged: Value = serde_json::from_str(&cli(&["c2d", "purge", "dev-1"]).await).unwrap();
    assert_eq!(purged["totalMessagesPurged"], 1);
    let status: Value = serde_json::from_str(&cli(&["c2d", "status", "dev-1", "1"]).await).unwrap();
    assert_eq!(status["outcome"], "Purged");
    let watched = cli(&["feedback", "watch", "--count", "1", "--wait-ms", "5000"]).await;
    let record: Value = serde_json::from_str(watched.lines().next().unwrap()).unwrap();
    assert_eq!(record["originalMessageId"], "cli-1");
    assert_eq!(record["statusCode"], "Purged");
    // The batch was completed: nothing left to receive.
    assert!(t.drain_feedback().await.is_empty());
}

/// libfaketime, which shifts the clock of the process it is preloaded into (`.ci/run` installs it).
/// libfaketime's library. A developer's machine may lack it (the README's test command needs only PostgreSQL):
/// then the clock test says so and is skipped — but never in CI, where `.ci/run` installs it and `CI` is set.
fn libfaketime() -> Option<std::path::PathBuf> {
    let found = std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(|entry| Some(entry.ok()?.path().join("faketime/libfaketime.so.1")))
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is installed in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED: the clock test needs libfaketime (apt-get install libfaketime)");
    }
    found
}

/// The clock of a hub process, as its HTTP `Date` header shows it.
async fn hub_clock(base: &str) -> chrono::DateTime<chrono::Utc> {
    let response = reqwest::get(format!("{base}/health/ready")).await.unwrap();
    let date = response.headers()["date"].to_str().unwrap().to_string();
    chrono::DateTime::parse_from_rfc2822(&date)
        .unwrap_or_else(|e| panic!("Date: {date}: {e}"))
        .with_timezone(&chrono::Utc)
}

/// Two hub processes on one database, one with its clock two hours ahead of the database's and one two hours
/// behind, agree on every C2D time rule, and with the database: enqueue's expiry check, the times the API reports,
/// expiry at delivery and the lock's length. A hub that reasoned with its own clock fails each step below in the
/// way its comment says. What this cannot show: which clock a rule reads when both clocks agree.
#[tokio::test]
async fn expiry_locks_and_tokens_follow_the_databases_clock_not_the_hubs() {
    let database = TestDb::create().await;
    let db = database.pool().await;
    let data_dir =
        std::env::temp_dir().join(format!("iothub-clocks-{}", uuid::Uuid::new_v4().simple()));
    let Some(lib) = libfaketime() else {
        return;
    };
    let shifted = |offset: &'static str| {
        let (url, data_dir, lib) = (database.url(), data_dir.clone(), lib.clone());
        async move {
            HubProcess::start_with(
                &url,
                &data_dir,
                &[
                    ("LD_PRELOAD", lib.to_str().unwrap()),
                    ("FAKETIME", offset),
                    ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
                ],
                None,
            )
            .await
        }
    };
    let ahead = shifted("+2h").await;
    let behind = shifted("-2h").await;
    // The shift is in effect: otherwise this test would show nothing.
    let now = db_now(&db).await;
    let off = |hub: chrono::DateTime<chrono::Utc>, by: i64| (hub - now - Span::hours(by)).abs();
    assert!(off(hub_clock(&ahead.base).await, 2) < Span::minutes(1));
    assert!(off(hub_clock(&behind.base).await, -2) < Span::minutes(1));

    // Tokens valid for the shifted clocks too; the shared default policies.
    let key = |name: &'static str| {
        let db = db.clone();
        async move {
            iothub::auth::policies::get(&db, name)
                .await
                .unwrap()
                .unwrap()
                .primary_key
        }
    };
    let expiry = now.timestamp() + 3 * 3600;
    let owner = sas::sign(HOST, &key("iothubowner").await, Some("iothubowner"), expiry).unwrap();
    let service = sas::sign(HOST, &key("service").await, Some("service"), expiry).unwrap();
    let http = reqwest::Client::new();
    let call = |base: &str, method: Method, path: &str, token: &str| {
        http.request(method, format!("{base}{path}?api-version=2021-04-12"))
            .header("Authorization", token)
    };
    let mut devices = std::collections::HashMap::new();
    for id in ["dev-a", "dev-b", "dev-c"] {
        let created: Value = call(&ahead.base, Method::PUT, &device_path(id), &owner)
            .json(&serde_json::json!({"deviceId": id}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = sas::sign(
            &format!("{HOST}/devices/{id}"),
            &primary_key(&created),
            None,
            expiry,
        )
        .unwrap();
        devices.insert(id, token);
    }
    let enqueue = |base: &str, id: &str, header: (&'static str, String)| {
        call(
            base,
            Method::POST,
            &format!("/devices/{id}/commands"),
            &service,
        )
        .header(header.0, header.1)
        .body(id.to_string())
        .send()
    };
    let receive = |base: &str, id: &str| {
        call(
            base,
            Method::GET,
            &format!("/devices/{id}/messages/deviceBound"),
            &devices[id],
        )
        .send()
    };
    let status = |id: &str, seq: i64| {
        let request = call(
            &ahead.base,
            Method::GET,
            &format!("/devices/{id}/commands/{seq}"),
            &service,
        );
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let rfc3339 =
        |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);

    // Ahead: an absolute expiry 10 minutes away on the database's clock is accepted (on the hub's own clock it
    // passed 1 h 50 min ago: 403), and the message is delivered, not expired.
    let at = db_now(&db).await + Span::minutes(10);
    let response = enqueue(&ahead.base, "dev-a", ("iothub-expiry", rfc3339(at)))
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let before = db_now(&db).await;
    let response = receive(&ahead.base, "dev-a").await.unwrap();
    let after = db_now(&db).await;
    assert_eq!(response.status(), 200);
    // The lock runs 5 s (IOTHUB_C2D_LOCK_SECS) from the database's now(), not from the hub's.
    let locked_until = api_time(&status("dev-a", 1).await["lockedUntilUtc"]);
    assert!(
        locked_until >= before + Span::seconds(5) - Span::milliseconds(1)
            && locked_until <= after + Span::seconds(5),
        "locked until {locked_until}, received between {before} and {after}"
    );
    // ... and holds: on the ahead hub's clock it ran out long ago, yet the message stays locked.
    assert_eq!(receive(&ahead.base, "dev-a").await.unwrap().status(), 204);

    // Ahead: a TTL counts from the database's now(), and so does the reported enqueue time.
    let before = db_now(&db).await;
    let enqueued: Value = enqueue(&ahead.base, "dev-b", ("iothub-ttl", "600".into()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let after = db_now(&db).await;
    let enqueued_at = api_time(&enqueued["enqueuedTimeUtc"]);
    assert!(
        enqueued_at >= before - Span::milliseconds(1) && enqueued_at <= after,
        "enqueued at {enqueued_at}, sent between {before} and {after}"
    );
    assert_eq!(
        api_time(&enqueued["expiryTimeUtc"]) - enqueued_at,
        Span::seconds(600)
    );

    // Behind: an absolute expiry 10 minutes past on the database's clock is refused (on the hub's own clock it
    // is 1 h 50 min away: accepted).
    let past = db_now(&db).await - Span::minutes(10);
    let response = enqueue(&behind.base, "dev-c", ("iothub-expiry", rfc3339(past)))
        .await
        .unwrap();
    assert_error(response, 403, "InvalidMessageExpiryTime").await;
    // Behind: a message expired on the database's clock is not delivered (on the hub's own clock it has two hours
    // left).
    let stale: Value = enqueue(&behind.base, "dev-c", ("iothub-ttl", "1".into()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    wait_for_db_time(
        &db,
        api_time(&stale["expiryTimeUtc"]) + Span::milliseconds(1),
    )
    .await;
    assert_eq!(receive(&behind.base, "dev-c").await.unwrap().status(), 204);
    let seq = stale["sequenceNumber"].as_i64().unwrap();
    assert_eq!(status("dev-c", seq).await["outcome"], "Expired");

    // Behind: the lock taken through the other hub runs out on the database's clock (on the hub's own clock it
    // has two hours left), and the message is delivered again.
    wait_for_db_time(&db, locked_until + Span::milliseconds(1)).await;
    let response = receive(&behind.base, "dev-a").await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(response.headers(), "iothub-deliverycount"), "1");

    // Token expiry reads the database's clock too. Ahead: a token that runs out in 1 h is accepted (on the hub's
    // own clock it ran out an hour ago, beyond the 5 minutes of skew). Behind: one that ran out 1 h ago is refused
    // (on the hub's own clock it has an hour left).
    let in_an_hour = (db_now(&db).await + Span::hours(1)).timestamp();
    let token = sas::sign(HOST, &key("service").await, Some("service"), in_an_hour).unwrap();
    let response = call(&ahead.base, Method::GET, "/devices/dev-a/commands", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "a token valid on the database's clock"
    );
    let an_hour_ago = (db_now(&db).await - Span::hours(1)).timestamp();
    let token = sas::sign(HOST, &key("service").await, Some("service"), an_hour_ago).unwrap();
    let response = call(&behind.base, Method::GET, "/devices/dev-a/commands", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;

    ahead.kill().await;
    behind.kill().await;
    let _ = std::fs::remove_dir_all(&data_dir);
}

/// Holds `device`'s row lock in a transaction of the test's own and sends an enqueue for it: the writer takes it and
/// waits for the lock, so what is sent meanwhile queues up and goes into one transaction together once the test
/// releases the lock.
async fn hold_writer(
    t: &std::sync::Arc<C2d>,
    device: &str,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<Response>,
) {
    let mut held = t.hub.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM devices WHERE device_id = $1 FOR UPDATE")
        .bind(device)
        .execute(&mut *held)
        .await
        .unwrap();
    let first = send_later(t, device, "first");
    wait_for_lock_waits(&t.hub.db, 1).await;
    (held, first)
}

/// Sends an enqueue for `device` with message id `id` in a task of its own.
fn send_later(
    t: &std::sync::Arc<C2d>,
    device: &str,
    id: &str,
) -> tokio::task::JoinHandle<Response> {
    let (t, device, id) = (t.clone(), device.to_string(), id.to_string());
    tokio::spawn(async move { t.send(&device, &[("iothub-messageid", &id)], &id).await })
}

/// Waits until `n` enqueues wait for the writer.
async fn wait_queued(t: &C2d, n: usize) {
    wait_for_writer("enqueues", n, || t.hub.running().c2d_queued()).await;
}

/// Waits until `queued` says `n` requests (`what`) wait for a writer.
async fn wait_for_writer(what: &str, n: usize, queued: impl Fn() -> usize) {
    wait_until(&format!("{n} {what} queued"), || {
        let queued = queued();
        async move { queued == n }
    })
    .await;
}

#[tokio::test]
async fn enqueues_that_wait_together_commit_together_each_decided_as_if_alone() {
    let t = std::sync::Arc::new(C2d::start_with(|c| c.c2d.max_queue_depth = 2).await);
    t.device("held").await;
    t.device("dev-1").await;
    let (held, first) = hold_writer(&t, "held").await;
    let waiting: Vec<_> = (0..4)
        .map(|i| send_later(&t, "dev-1", &format!("m{i}")))
        .collect();
    wait_queued(&t, 4).await;
    held.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().status(), 201);

    let mut accepted = Vec::new();
    let mut refused = 0;
    for response in waiting {
        let response = response.await.unwrap();
        if response.status() == 201 {
            accepted.push(response.json::<Value>().await.unwrap());
        } else {
            assert_error(response, 403, "DeviceMaximumQueueDepthExceeded").await;
            refused += 1;
        }
    }
    // One transaction, and the depth counted the messages before them in it.
    assert_eq!((accepted.len(), refused), (2, 2), "{accepted:?}");
    let mut seqs: Vec<i64> = accepted
        .iter()
        .map(|a| a["sequenceNumber"].as_i64().unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, [1, 2], "gap-free sequence numbers");
    // A transaction's start is the enqueued time of what it enqueues (in microseconds in the database).
    let times: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT enqueued_at::text FROM c2d_messages
          WHERE device_id = 'dev-1'",
    )
    .fetch_all(&t.hub.db)
    .await
    .unwrap();
    assert_eq!(times.len(), 1, "enqueued by one transaction: {times:?}");
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM c2d_messages WHERE device_id = 'dev-1'")
            .fetch_one(&t.hub.db)
            .await
            .unwrap();
    assert_eq!(stored, 2);
}

#[tokio::test]
async fn one_group_wakes_the_long_polls_of_every_device_it_enqueued_for() {
    let t = std::sync::Arc::new(C2d::start().await);
    t.device("held").await;
    let devices = ["dev-1", "dev-2"];
    let polls = waiting_long_polls(&t, &devices).await;
    let (held, first) = hold_writer(&t, "held").await;
    let sent: Vec<_> = devices
        .iter()
        .map(|id| send_later(&t, id, &format!("for-{id}")))
        .collect();
    wait_queued(&t, 2).await;
    held.rollback().await.unwrap();
    assert_eq!(first.await.unwrap().status(), 201);
    for response in sent {
        assert_eq!(response.await.unwrap().status(), 201);
    }
    let times: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT enqueued_at::text FROM c2d_messages WHERE device_id <> 'held'",
    )
    .fetch_all(&t.hub.db)
    .await
    .unwrap();
    assert_eq!(times.len(), 1, "one transaction enqueued both");
    // Its one notification named both devices: each poll answers at once, long before its wait ends.
    for (id, poll) in devices.iter().zip(polls) {
        let (status, body) = woken(poll).await.unwrap();
        assert_eq!((status.as_u16(), body), (200, format!("for-{id}")));
    }
}

#[tokio::test]
async fn a_message_that_fails_its_group_fails_alone() {
    let t = std::sync::Arc::new(C2d::start().await);
    t.device("held").await;
    t.device("dev-1").await;
    // A fault only one message meets: the insert of a message with this id fails.
    sqlx::raw_sql(
        "CREATE FUNCTION poisoned() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.message_id = 'poison' THEN RAISE EXCEPTION 'poisoned message'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER poisoned BEFORE INSERT ON c2d_messages FOR EACH ROW EXECUTE FUNCTION poisoned();",
    )
    .execute(&t.hub.db)
    .await
    .unwrap();
    let (held, first) = hold_writer(&t, "held").await;
    let good = send_later(&t, "dev-1", "good");
    wait_queued(&t, 1).await;
    let poison = send_later(&t, "dev-1", "poison");
    wait_queued(&t, 2).await;
    held.rollback().await.unwrap();

    assert_eq!(first.await.unwrap().status(), 201);
    assert_eq!(
        good.await.unwrap().status(),
        201,
        "the good message is stored"
    );
    assert_error(poison.await.unwrap(), 500, "ServerError").await;
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT message_id FROM c2d_messages WHERE device_id = 'dev-1' ORDER BY seq",
    )
    .fetch_all(&t.hub.db)
    .await
    .unwrap();
    assert_eq!(stored, ["good"]);
}

/// Keeps every settlement writer busy: registers a device per writer with a message taken, holds those messages'
/// rows in a transaction of the test's own and sends their completions. Each writer takes one and waits for its
/// row, so settlements sent meanwhile queue up and go into one transaction together once the test lets go.
async fn hold_settlements(
    t: &std::sync::Arc<C2d>,
) -> (
    sqlx::Transaction<'static, sqlx::Postgres>,
    Vec<tokio::task::JoinHandle<Response>>,
) {
    let mut held = t.hub.db.begin().await.unwrap();
    let mut first = Vec::new();
    for n in 0..iothub::c2d::writer::SETTLEMENT_WRITERS {
        let device = format!("held-{n}");
        let token = t.device(&device).await;
        t.enqueue(&device, &[], "held").await;
        let (lock, _, _) = t.take(&device, &token).await;
        sqlx::query("SELECT 1 FROM c2d_messages WHERE device_id = $1 FOR UPDATE")
            .bind(&device)
            .execute(&mut *held)
            .await
            .unwrap();
        first.push(settle_later(t, &device, &token, &lock, "complete"));
        wait_for_lock_waits(&t.hub.db, n as i64 + 1).await;
    }
    (held, first)
}

/// Waits until `n` transactions of the test's database wait for a lock (a writer's, for a row the test holds).
async fn wait_for_lock_waits(db: &sqlx::PgPool, n: i64) {
    wait_until("a writer to wait for the held row", || async move {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(db)
        .await
        .unwrap();
        waiting == n
    })
    .await;
}

/// Sends a settlement in a task of its own.
fn settle_later(
    t: &std::sync::Arc<C2d>,
    device: &str,
    token: &str,
    lock: &str,
    action: &str,
) -> tokio::task::JoinHandle<Response> {
    let (t2, device, token, lock, action) = (
        t.clone(),
        device.to_string(),
        token.to_string(),
        lock.to_string(),
        action.to_string(),
    );
    tokio::spawn(async move { t2.settle(&device, &token, &lock, &action).await })
}

/// Waits until `n` settlements wait for the writers.
async fn wait_settlements_queued(t: &C2d, n: usize) {
    wait_for_writer("settlements", n, || {
        t.hub.running().c2d_settlements_queued()
    })
    .await;
}

/// Settlements that arrive while the writer is busy commit in one transaction, and each is decided as if alone: a
/// completion, a rejection and an abandon of one device, another device's completion, a stale token and the same
/// completion twice. The abandon's wake-up commits with the group: the device's waiting long poll gets the message.
#[tokio::test]
async fn settlements_that_wait_together_commit_together_each_decided_as_if_alone() {
    let t = std::sync::Arc::new(C2d::start().await);
    let token = t.device("dev-1").await;
    let other_token = t.device("dev-2").await;
    let full = [("iothub-ack", "full")];
    for body in ["completed", "rejected", "abandoned"] {
        t.enqueue("dev-1", &full, body).await;
    }
    t.enqueue("dev-2", &full, "other").await;
    let mut locks = Vec::new();
    for _ in 0..3 {
        locks.push(t.take("dev-1", &token).await.0);
    }
    let (other_lock, _, _) = t.take("dev-2", &other_token).await;
    // Every message of dev-1 is locked: this poll waits until one is back in the queue.
    let poll = {
        let (t, token) = (t.clone(), token.clone());
        tokio::spawn(async move {
            let response = t
                .receive_query("dev-1", &token, &format!("?wait-ms={LONG_POLL_MS}"))
                .await;
            (response.status(), response.text().await.unwrap())
        })
    };
    t.hub.wait_for_polls(Wake::C2d("dev-1"), 1).await;

    let (held, first) = hold_settlements(&t).await;
    let stale = uuid::Uuid::new_v4().to_string();
    let sent = [
        ("dev-1", &token, &locks[0], "complete"),
        ("dev-1", &token, &locks[1], "reject"),
        ("dev-1", &token, &locks[2], "abandon"),
        ("dev-2", &other_token, &other_lock, "complete"),
        ("dev-2", &other_token, &stale, "complete"),
        ("dev-1", &token, &locks[0], "complete"),
    ];
    let mut answers = Vec::new();
    for (n, (device, token, lock, action)) in sent.into_iter().enumerate() {
        answers.push(settle_later(&t, device, token, lock, action));
        wait_settlements_queued(&t, n + 1).await;
    }
    held.rollback().await.unwrap();
    for first in first {
        assert_eq!(first.await.unwrap().status(), 204);
    }
    let mut statuses = Vec::new();
    for answer in answers {
        let response = answer.await.unwrap();
        if response.status() == 412 {
            statuses.push(412);
            assert_error(response, 412, "DeviceMessageLockLost").await;
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    // The same completion twice: the first settles, the second finds the lock gone.
    assert_eq!(statuses, [204, 204, 204, 204, 412, 412]);

    for (device, seq, state, outcome) in [
        ("dev-1", 1, "Completed", "Success"),
        ("dev-1", 2, "DeadLettered", "Rejected"),
        ("dev-2", 1, "Completed", "Success"),
    ] {
        let status = t.status(device, seq).await;
        assert_eq!(
            (&status["state"], &status["outcome"]),
            (&state.into(), &outcome.into())
        );
    }
    let (status, body) = woken(poll).await.unwrap();
    assert_eq!(
        (status.as_u16(), body.as_str()),
        (200, "abandoned"),
        "the abandoned message, delivered again"
    );
    // One transaction: every outcome and feedback record of the group carries its one start time.
    let times: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT outcome_at::text FROM c2d_messages WHERE device_id LIKE 'dev-%' AND outcome_at IS NOT NULL
         UNION SELECT DISTINCT created_at::text FROM feedback_records",
    )
    .fetch_all(&t.hub.db)
    .await
    .unwrap();
    assert_eq!(times.len(), 1, "settled by one transaction: {times:?}");
    let records: i64 = sqlx::query_scalar("SELECT count(*) FROM feedback_records")
        .fetch_one(&t.hub.db)
        .await
        .unwrap();
    assert_eq!(
        records, 3,
        "a record for each message that ended, with its outcome"
    );
}

/// A settlement whose statement fails takes its group down before the commit; the others are then settled alone
/// and stand, and only it fails.
#[tokio::test]
async fn a_settlement_that_fails_its_group_fails_alone() {
    let t = std::sync::Arc::new(C2d::start().await);
    let token = t.device("dev-1").await;
    // A fault only one message meets: completing the message with this id fails.
    sqlx::raw_sql(
        "CREATE FUNCTION poisoned() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.message_id = 'poison' AND NEW.state = 'completed' THEN RAISE EXCEPTION 'poisoned'; END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER poisoned BEFORE UPDATE ON c2d_messages FOR EACH ROW EXECUTE FUNCTION poisoned();",
    )
    .execute(&t.hub.db)
    .await
    .unwrap();
    t.enqueue("dev-1", &[("iothub-messageid", "good")], "good")
        .await;
    t.enqueue("dev-1", &[("iothub-messageid", "poison")], "poison")
        .await;
    let (good_lock, _, _) = t.take("dev-1", &token).await;
    let (poison_lock, _, _) = t.take("dev-1", &token).await;

    let (held, first) = hold_settlements(&t).await;
    let good = settle_later(&t, "dev-1", &token, &good_lock, "complete");
    wait_settlements_queued(&t, 1).await;
    let poison = settle_later(&t, "dev-1", &token, &poison_lock, "complete");
    wait_settlements_queued(&t, 2).await;
    held.rollback().await.unwrap();

    for first in first {
        assert_eq!(first.await.unwrap().status(), 204);
    }
    assert_eq!(
        good.await.unwrap().status(),
        204,
        "the good settlement stands"
    );
    assert_error(poison.await.unwrap(), 500, "ServerError").await;
    assert_eq!(t.status("dev-1", 1).await["state"], "Completed");
    assert_eq!(
        t.status("dev-1", 2).await["state"],
        "Invisible",
        "still locked, as before"
    );
}
