//! Device-to-cloud telemetry against a real PostgreSQL: sends (single and batch), stamping, errors, device auth,
//! per-device order, the read API, consumer groups and checkpoints, partition count and retention.

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// A registered device and a token for it.
struct Dev {
    id: String,
    token: String,
}

async fn device(hub: &TestHub, id: &str) -> Dev {
    let created = hub.create_device(id).await;
    Dev {
        id: id.to_string(),
        token: device_token(id, &primary_key(&created)),
    }
}

fn events_path(id: &str) -> String {
    format!("{}/messages/events", device_path(id))
}

async fn send(hub: &TestHub, dev: &Dev, body: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = hub
        .request(Method::POST, &events_path(&dev.id), &dev.token)
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn send_batch(hub: &TestHub, dev: &Dev, batch: &Value) -> reqwest::Response {
    hub.request(Method::POST, &events_path(&dev.id), &dev.token)
        .header(
            "Content-Type",
            "application/vnd.microsoft.iothub.json; charset=utf-8",
        )
        .body(batch.to_string())
        .send()
        .await
        .unwrap()
}

async fn get_json(hub: &TestHub, path: &str) -> Value {
    let token = hub.policy_token("service").await;
    let response = hub.request(Method::GET, path, &token).send().await.unwrap();
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// Every event of the device's partition, from the start.
async fn partition_events(hub: &TestHub, device_id: &str) -> Vec<Value> {
    let p = iothub::d2c::partition_for(device_id, 4);
    let page = get_json(
        hub,
        &format!("/messages/events/partitions/{p}?from=start&max-count=1000"),
    )
    .await;
    page["events"].as_array().unwrap().clone()
}

/// Transactions of this test's database waiting for a lock (a partition writer blocked behind the test's own).
async fn lock_waiters(hub: &TestHub) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(&hub.db)
    .await
    .unwrap()
}

/// Waits until a partition writer's transaction waits for the partition row the test holds.
async fn wait_for_blocked_writer(hub: &TestHub) {
    wait_until(
        "a writer's transaction to wait for the held row",
        move || async move { lock_waiters(hub).await == 1 },
    )
    .await
}

/// The sequence numbers of a read page's events, in the page's order.
fn sequence_numbers(page: &Value) -> Vec<i64> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sequenceNumber"].as_i64().unwrap())
        .collect()
}

fn of_device<'a>(events: &'a [Value], id: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["deviceId"] == id).collect()
}

#[tokio::test]
async fn single_message_is_stored_with_its_properties_and_the_hubs_stamps() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "thermostat-1").await;
    let response = send(
        &hub,
        &dev,
        r#"{"t":21.5}"#,
        &[
            ("Content-Type", "application/octet-stream"),
            ("iothub-messageid", "msg-1"),
            ("iothub-correlationid", "corr-1"),
            ("iothub-contenttype", "application/json"),
            ("iothub-contentencoding", "utf-8"),
            ("iothub-app-alert", "high"),
            ("dt-subject", "sensor1"),
            (
                "iothub-interface-id",
                "urn:azureiot:Security:SecurityAgent:1",
            ),
            // Spoofing attempts: replaced by the hub's stamps.
            ("iothub-connection-device-id", "someone-else"),
            ("iothub-connection-auth-method", "forged"),
            ("iothub-message-source", "twinChangeEvents"),
        ],
    )
    .await;
    assert_eq!(response.status(), 204);
    assert!(response.text().await.unwrap().is_empty());

    let events = partition_events(&hub, "thermostat-1").await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e["sequenceNumber"], 0);
    assert_eq!(e["offset"], "0");
    assert_eq!(e["deviceId"], "thermostat-1");
    assert_eq!(e["contentType"], "application/json");
    assert_eq!(e["bodyJson"], json!({"t": 21.5}));
    assert_eq!(e["bodyText"], r#"{"t":21.5}"#);
    assert_eq!(
        BASE64.decode(e["body"].as_str().unwrap()).unwrap(),
        br#"{"t":21.5}"#
    );
    assert_eq!(e["properties"], json!({"alert": "high"}));
    let sys = &e["systemProperties"];
    assert_eq!(sys["iothub-messageid"], "msg-1");
    assert_eq!(sys["iothub-correlationid"], "corr-1");
    assert_eq!(sys["iothub-contentencoding"], "utf-8");
    assert_eq!(sys["dt-subject"], "sensor1");
    assert_eq!(
        sys["iothub-interface-id"],
        "urn:azureiot:Security:SecurityAgent:1"
    );
    assert_eq!(sys["iothub-connection-device-id"], "thermostat-1");
    assert_eq!(sys["iothub-message-source"], "Telemetry");
    assert_eq!(sys["iothub-enqueuedtime"], e["enqueuedTimeUtc"]);
    let method: Value =
        serde_json::from_str(sys["iothub-connection-auth-method"].as_str().unwrap()).unwrap();
    assert_eq!(
        method,
        json!({"scope": "device", "type": "sas", "issuer": "iothub", "acceptingIpFilterRule": null})
    );
    let registry: Value = hub
        .request(
            Method::GET,
            &device_path("thermostat-1"),
            &hub.owner().await,
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        sys["iothub-connection-auth-generation-id"],
        registry["generationId"]
    );
    // The HTTP Content-Type is not the message's content type, and no other header leaks in.
    assert!(sys.get("content-type").is_none());

    // A message without any header or body is fine too.
    let response = send(&hub, &dev, "", &[]).await;
    assert_eq!(response.status(), 204);
    let events = partition_events(&hub, "thermostat-1").await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["sequenceNumber"], 1);
    assert_eq!(events[1]["body"], "");
    assert!(events[1].get("contentType").is_none());
}

/// The stamps are stored once per row in columns of their own, not as JSON among the system properties; events
/// stored before that (stamps in the JSON, the columns NULL) read exactly as new ones do.
#[tokio::test]
async fn stamps_are_columns_and_older_events_read_the_same() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "thermostat-2").await;
    let response = send(&hub, &dev, "21.5", &[("iothub-messageid", "m-1")]).await;
    assert_eq!(response.status(), 204);
    let (system, generation, scope): (Value, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT system_properties, auth_generation_id, auth_scope FROM d2c_events WHERE device_id = $1",
    )
    .bind("thermostat-2")
    .fetch_one(&hub.db)
    .await
    .unwrap();
    assert_eq!(system, json!({"iothub-messageid": "m-1"}));
    assert!(generation.is_some_and(|g| !g.is_empty()));
    assert_eq!(scope.as_deref(), Some("device"));
    let read = partition_events(&hub, "thermostat-2").await;
    let stamped = &read[0]["systemProperties"];
    assert_eq!(stamped["iothub-connection-device-id"], "thermostat-2");
    assert_eq!(stamped["iothub-message-source"], "Telemetry");

    // The same event as an earlier version of the hub stored it.
    let older = stamped
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "iothub-enqueuedtime")
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect::<serde_json::Map<_, _>>();
    sqlx::query(
        "UPDATE d2c_events SET system_properties = $2, auth_generation_id = NULL, auth_scope = NULL
          WHERE device_id = $1",
    )
    .bind("thermostat-2")
    .bind(Value::Object(older))
    .execute(&hub.db)
    .await
    .unwrap();
    assert_eq!(partition_events(&hub, "thermostat-2").await, read);
}

#[tokio::test]
async fn batch_elements_become_messages_in_order() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "batcher").await;
    let batch = json!([
        {"body": BASE64.encode("one"), "properties": {"iothub-app-n": "1", "iothub-messageid": "b-1",
            "iothub-contenttype": "text/plain", "iothub-connection-device-id": "spoofed"}},
        {"body": "two", "base64Encoded": false, "properties": {"iothub-app-n": "2"}},
        {"body": BASE64.encode([0u8, 255, 1])}
    ]);
    let response = send_batch(&hub, &dev, &batch).await;
    assert_eq!(response.status(), 204);
    let events = partition_events(&hub, "batcher").await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["systemProperties"]["iothub-messageid"], "b-1");
    assert_eq!(events[0]["bodyText"], "one");
    assert_eq!(events[0]["properties"], json!({"n": "1"}));
    assert_eq!(
        events[0]["systemProperties"]["iothub-connection-device-id"],
        "batcher"
    );
    assert_eq!(events[1]["body"], BASE64.encode("two"));
    assert_eq!(events[1]["properties"], json!({"n": "2"}));
    assert_eq!(events[2]["body"], BASE64.encode([0u8, 255, 1]));
    let seqs: Vec<i64> = events
        .iter()
        .map(|e| e["sequenceNumber"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![0, 1, 2]);
}

#[tokio::test]
async fn bad_sends_are_refused_in_iot_hub_shape_and_store_nothing() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "sloppy").await;

    let malformed = hub
        .request(Method::POST, &events_path("sloppy"), &dev.token)
        .header("Content-Type", "application/vnd.microsoft.iothub.json")
        .body("[{\"body\": ")
        .send()
        .await
        .unwrap();
    assert_error(malformed, 400, "ArgumentInvalid").await;
    let not_base64 = send_batch(&hub, &dev, &json!([{"body": "%%%"}])).await;
    assert_error(not_base64, 400, "ArgumentInvalid").await;
    let bad_name = send_batch(
        &hub,
        &dev,
        &json!([{"body": "", "properties": {"iothub-app-a b": "x"}}]),
    )
    .await;
    assert_error(bad_name, 400, "ArgumentInvalid").await;
    // NUL can be written in JSON but not stored in PostgreSQL's jsonb: refused, not a server error.
    let nul_value = send_batch(
        &hub,
        &dev,
        &json!([{"body": "", "properties": {"iothub-app-k": "a\u{0}b"}}]),
    )
    .await;
    assert_error(nul_value, 400, "ArgumentInvalid").await;
    let bad_id = send(&hub, &dev, "x", &[("iothub-messageid", "has space")]).await;
    assert_error(bad_id, 400, "ArgumentInvalid").await;

    // 256 KB exactly passes; one byte more (body, or body plus a property) is 413.
    let limit = 262_144;
    assert_eq!(
        send(&hub, &dev, &"x".repeat(limit), &[]).await.status(),
        204
    );
    assert_error(
        send(&hub, &dev, &"x".repeat(limit + 1), &[]).await,
        413,
        "MessageTooLarge",
    )
    .await;
    assert_error(
        send(
            &hub,
            &dev,
            &"x".repeat(limit - 3),
            &[("iothub-app-ab", "cd")],
        )
        .await,
        413,
        "MessageTooLarge",
    )
    .await;
    // A batch whose messages are each small but together over the limit.
    let item = json!({"body": "y".repeat(100_000), "base64Encoded": false});
    let big_batch = send_batch(&hub, &dev, &json!([item.clone(), item.clone(), item])).await;
    assert_error(big_batch, 413, "MessageTooLarge").await;

    let events = partition_events(&hub, "sloppy").await;
    assert_eq!(events.len(), 1, "only the message at the limit was stored");
}

#[tokio::test]
async fn devices_send_only_as_themselves() {
    let hub = TestHub::start().await;
    let a = device(&hub, "dev-a").await;
    let b = device(&hub, "dev-b").await;

    // A's token on B's path.
    let response = hub
        .request(Method::POST, &events_path("dev-b"), &a.token)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
    let response = hub
        .request(
            Method::POST,
            &events_path("dev-a"),
            "SharedAccessSignature sr=x&sig=y&se=1",
        )
        .body("x")
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;

    // A disabled device cannot send.
    hub.disable_device("dev-b").await;
    assert_error(
        send(&hub, &b, "x", &[]).await,
        401,
        "IotHubUnauthorizedAccess",
    )
    .await;

    // A policy with DeviceConnect may send on a device's behalf: the auth method says scope "hub".
    let policy = hub.policy_token("device").await;
    let response = hub
        .request(Method::POST, &events_path("dev-a"), &policy)
        .body("via policy")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let events = partition_events(&hub, "dev-a").await;
    let mine = of_device(&events, "dev-a");
    assert_eq!(mine.len(), 1);
    let method: Value = serde_json::from_str(
        mine[0]["systemProperties"]["iothub-connection-auth-method"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(method["scope"], "hub");
    assert!(of_device(&partition_events(&hub, "dev-b").await, "dev-b").is_empty());
}

#[tokio::test]
async fn concurrent_senders_keep_each_devices_order() {
    let hub = TestHub::start().await;
    let mut devices = Vec::new();
    for i in 0..8 {
        devices.push(device(&hub, &format!("ordered-{i}")).await);
    }
    let per_device = 40;
    let mut tasks = Vec::new();
    for dev in devices {
        let http = hub.http.clone();
        let base = hub.base.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..per_device {
                let response = http
                    .post(format!(
                        "{base}{}?api-version=2021-04-12",
                        events_path(&dev.id)
                    ))
                    .header("Authorization", &dev.token)
                    .body(n.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 204);
            }
            dev.id
        }));
    }
    let ids: Vec<String> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for id in ids {
        let events = partition_events(&hub, &id).await;
        let bodies: Vec<String> = of_device(&events, &id)
            .iter()
            .map(|e| {
                String::from_utf8(BASE64.decode(e["body"].as_str().unwrap()).unwrap()).unwrap()
            })
            .collect();
        let expected: Vec<String> = (0..per_device).map(|n| n.to_string()).collect();
        assert_eq!(bodies, expected, "order of {id}");
    }
    // Sequence numbers of each partition are 0..n without gaps.
    for p in 0..4 {
        let page = get_json(
            &hub,
            &format!("/messages/events/partitions/{p}?max-count=1000"),
        )
        .await;
        let seqs = sequence_numbers(&page);
        assert_eq!(seqs, (0..seqs.len() as i64).collect::<Vec<_>>());
        assert_eq!(page["nextSequenceNumber"], seqs.len() as i64);
    }
}

#[tokio::test]
async fn read_api_positions_limits_and_errors() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "reader-src").await;
    let p = iothub::d2c::partition_for("reader-src", 4);
    let base = format!("/messages/events/partitions/{p}");
    for n in 0..3 {
        assert_eq!(send(&hub, &dev, &format!("m{n}"), &[]).await.status(), 204);
    }
    // A time strictly between the first three events and the last two: after the third's enqueued time (reported
    // to the millisecond, stored below the next one), and passed on the database's clock before the fourth is sent.
    let third = get_json(&hub, &format!("{base}?from-sequence-number=2")).await["events"][0]
        ["enqueuedTimeUtc"]
        .clone();
    let boundary = api_time(&third) + chrono::Duration::milliseconds(1);
    wait_for_db_time(&hub.db, boundary).await;
    for n in 3..5 {
        assert_eq!(send(&hub, &dev, &format!("m{n}"), &[]).await.status(), 204);
    }
    let page = get_json(&hub, &format!("{base}?from-sequence-number=2&max-count=2")).await;
    let seqs = sequence_numbers(&page);
    assert_eq!(seqs, vec![2, 3]);
    assert_eq!(page["nextSequenceNumber"], 4);
    assert_eq!(page["partitionId"], p.to_string());

    let end = get_json(&hub, &format!("{base}?from=end")).await;
    assert!(end["events"].as_array().unwrap().is_empty());
    assert_eq!(end["nextSequenceNumber"], 5);

    // All five are in the stream; from the boundary on, only the last two.
    assert_eq!(
        sequence_numbers(&get_json(&hub, &format!("{base}?from=start")).await),
        vec![0, 1, 2, 3, 4]
    );
    let boundary = boundary.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let by_time = get_json(&hub, &format!("{base}?from-enqueued-time={boundary}")).await;
    assert_eq!(sequence_numbers(&by_time), vec![3, 4], "from {boundary}");
    assert_eq!(
        BASE64
            .decode(by_time["events"][0]["body"].as_str().unwrap())
            .unwrap(),
        b"m3"
    );
    let future = get_json(
        &hub,
        &format!("{base}?from-enqueued-time=2999-01-01T00:00:00Z"),
    )
    .await;
    assert!(future["events"].as_array().unwrap().is_empty());
    assert_eq!(future["nextSequenceNumber"], 5);

    let info = get_json(&hub, "/messages/events").await;
    assert_eq!(info["partitionCount"], 4);
    assert_eq!(info["partitionIds"], json!(["0", "1", "2", "3"]));
    assert_eq!(info["retentionTimeInDays"], 1);
    let mine = &info["partitions"][p as usize];
    assert_eq!(mine["firstSequenceNumber"], 0);
    assert_eq!(mine["lastSequenceNumber"], 4);

    let token = hub.policy_token("service").await;
    for bad in [
        "?max-count=0",
        "?max-count=1001",
        "?wait-ms=30001",
        "?from-sequence-number=-1",
        "?from-sequence-number=x",
        "?from=middle",
        "?from-enqueued-time=yesterday",
        "?from=start&from-sequence-number=1",
    ] {
        let response = hub
            .request(Method::GET, &format!("{base}{bad}"), &token)
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "ArgumentInvalid").await;
    }
    let response = hub
        .request(Method::GET, "/messages/events/partitions/4", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    let response = hub
        .request(Method::GET, "/messages/events/partitions/x", &token)
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
    // A device token cannot read.
    let response = hub
        .request(Method::GET, &base, &dev.token)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "IotHubUnauthorizedAccess").await;
}

/// The body fields an event carries, with their values.
fn body_fields(event: &Value) -> Value {
    let mut fields = serde_json::Map::new();
    for name in ["body", "bodyJson", "bodyText"] {
        if let Some(value) = event.get(name) {
            fields.insert(name.to_string(), value.clone());
        }
    }
    Value::Object(fields)
}

#[tokio::test]
async fn reads_carry_the_body_in_the_forms_asked_for() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "forms").await;
    let json_body = r#"{"t":21.5}"#;
    let binary = [0u8, 255, 1];
    let batch = json!([
        {"body": json_body, "base64Encoded": false, "properties": {"iothub-contenttype": "application/json"}},
        {"body": "hello", "base64Encoded": false, "properties": {"iothub-contenttype": "text/plain; charset=utf-8"}},
        {"body": BASE64.encode(binary), "properties": {"iothub-contenttype": "application/octet-stream"}},
    ]);
    assert_eq!(send_batch(&hub, &dev, &batch).await.status(), 204);
    let (b64_json, b64_text, b64_binary) = (
        BASE64.encode(json_body),
        BASE64.encode("hello"),
        BASE64.encode(binary),
    );
    let all = [
        json!({"body": b64_json, "bodyJson": {"t": 21.5}, "bodyText": json_body}),
        json!({"body": b64_text, "bodyText": "hello"}),
        json!({"body": b64_binary}),
    ];
    let expected = [
        // Without the parameter: every form that applies, as before it existed.
        ("", all.clone()),
        ("&body=all", all.clone()),
        (
            "&body=base64",
            [
                json!({"body": b64_json}),
                json!({"body": b64_text}),
                json!({"body": b64_binary}),
            ],
        ),
        // Every body in exactly one form.
        (
            "&body=decoded",
            [
                json!({"bodyJson": {"t": 21.5}}),
                json!({"bodyText": "hello"}),
                json!({"body": b64_binary}),
            ],
        ),
    ];
    let p = iothub::d2c::partition_for("forms", 4);
    let token = hub.policy_token("service").await;
    for read in [
        format!("/messages/events/partitions/{p}?from=start"),
        format!("/messages/events/consumerGroups/$Default/partitions/{p}?max-count=10"),
    ] {
        for (query, forms) in &expected {
            let page = get_json(&hub, &format!("{read}{query}")).await;
            let events = page["events"].as_array().unwrap();
            let got: Vec<Value> = events.iter().map(body_fields).collect();
            assert_eq!(got, forms.to_vec(), "{read}{query}");
            // Everything but the body is the same whatever the format.
            for event in events {
                assert_eq!(event["deviceId"], "forms");
                assert!(event["systemProperties"]["iothub-contenttype"].is_string());
            }
        }
        for bad in ["&body=json", "&body=", "&body=base64,all"] {
            let response = hub
                .request(Method::GET, &format!("{read}{bad}"), &token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{read}{bad}");
            assert_eq!(response.headers()["iothub-errorcode"], "ArgumentInvalid");
            let body: Value = response.json().await.unwrap();
            let text = body["Message"].as_str().unwrap();
            assert!(
                text.starts_with("ErrorCode:ArgumentInvalid;") && text.contains("body must be"),
                "{text}"
            );
            assert!(body["ExceptionMessage"].is_string());
        }
    }
}

#[tokio::test]
async fn long_poll_wakes_when_an_event_commits() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "waker").await;
    let p = iothub::d2c::partition_for("waker", 4);
    let token = hub.policy_token("service").await;
    let poll = hub
        .request(
            Method::GET,
            &format!("/messages/events/partitions/{p}?from=end&wait-ms={LONG_POLL_MS}"),
            &token,
        )
        .send();
    // The send commits once the poll is in the hub and registered for the partition's wake-ups.
    let (response, _) = tokio::join!(woken(poll), async {
        hub.wait_for_polls(Wake::D2c(p), 1).await;
        assert_eq!(send(&hub, &dev, "wake up", &[]).await.status(), 204);
    });
    let page: Value = response.unwrap().json().await.unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["events"][0]["deviceId"], "waker");

    // With nothing coming, the poll answers empty when the wait ends, not before (the monotonic clock cannot run
    // short).
    let started = Instant::now();
    let page = get_json(
        &hub,
        &format!("/messages/events/partitions/{p}?from=end&wait-ms=300"),
    )
    .await;
    assert!(page["events"].as_array().unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn consumer_groups_checkpoints_and_limits() {
    let hub = TestHub::start_with(|c| c.d2c.max_consumer_groups = 3).await;
    let token = hub.policy_token("service").await;
    let groups = get_json(&hub, "/messages/events/consumerGroups").await;
    assert_eq!(groups.as_array().unwrap().len(), 1);
    assert_eq!(groups[0]["name"], "$Default");

    let put = |name: &str| {
        hub.request(
            Method::PUT,
            &format!("/messages/events/consumerGroups/{name}"),
            &token,
        )
        .send()
    };
    assert_eq!(put("analytics").await.unwrap().status(), 201);
    assert_eq!(put("analytics").await.unwrap().status(), 200);
    assert_eq!(put("archive.v2_x-1").await.unwrap().status(), 201);
    assert_error(
        put("one-too-many").await.unwrap(),
        403,
        "IotHubQuotaExceeded",
    )
    .await;
    assert_error(put("bad%20name").await.unwrap(), 400, "ArgumentInvalid").await;
    assert_error(put(&"n".repeat(51)).await.unwrap(), 400, "ArgumentInvalid").await;
    let response = hub
        .request(
            Method::DELETE,
            "/messages/events/consumerGroups/$Default",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_error(response, 400, "ArgumentInvalid").await;
    let response = hub
        .request(
            Method::DELETE,
            "/messages/events/consumerGroups/archive.v2_x-1",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = hub
        .request(
            Method::DELETE,
            "/messages/events/consumerGroups/archive.v2_x-1",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    assert_eq!(put("room-again").await.unwrap().status(), 201);

    // Checkpoints: a group read starts after the group's checkpoint; other groups are independent.
    let dev = device(&hub, "cp-src").await;
    let p = iothub::d2c::partition_for("cp-src", 4);
    for n in 0..6 {
        assert_eq!(send(&hub, &dev, &format!("m{n}"), &[]).await.status(), 204);
    }
    let group_read = format!("/messages/events/consumerGroups/analytics/partitions/{p}");
    let page = get_json(&hub, &group_read).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 6);
    let checkpoint = |seq: i64| {
        hub.request(Method::PUT, &format!("{group_read}/checkpoint"), &token)
            .json(&json!({"sequenceNumber": seq}))
            .send()
    };
    let response = checkpoint(3).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"consumerGroup": "analytics", "partitionId": p.to_string(), "sequenceNumber": 3})
    );
    let page = get_json(&hub, &group_read).await;
    let seqs = sequence_numbers(&page);
    assert_eq!(seqs, vec![4, 5]);
    // $Default has no checkpoint: it starts at the beginning.
    let page = get_json(
        &hub,
        &format!("/messages/events/consumerGroups/$Default/partitions/{p}"),
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 6);
    // An explicit position wins over the checkpoint.
    let page = get_json(
        &hub,
        &format!("{group_read}?from-sequence-number=1&max-count=1"),
    )
    .await;
    assert_eq!(page["events"][0]["sequenceNumber"], 1);
    let group = get_json(&hub, "/messages/events/consumerGroups/analytics").await;
    assert_eq!(group["checkpoints"][p.to_string()], 3);

    // A checkpoint must name a committed event; unknown group or partition are 404.
    assert_error(checkpoint(6).await.unwrap(), 400, "ArgumentInvalid").await;
    assert_error(checkpoint(-1).await.unwrap(), 400, "ArgumentInvalid").await;
    let response = hub
        .request(
            Method::PUT,
            &format!("/messages/events/consumerGroups/nobody/partitions/{p}/checkpoint"),
            &token,
        )
        .json(&json!({"sequenceNumber": 0}))
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    let response = hub
        .request(
            Method::GET,
            "/messages/events/consumerGroups/nobody/partitions/0",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    let response = hub
        .request(
            Method::GET,
            "/messages/events/consumerGroups/analytics/partitions/9",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_error(response, 404, "NotFound").await;
    // Deleting a group deletes its checkpoints: re-created, it starts over.
    let response = hub
        .request(
            Method::DELETE,
            "/messages/events/consumerGroups/analytics",
            &token,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(put("analytics").await.unwrap().status(), 201);
    let page = get_json(&hub, &group_read).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 6);
}

#[tokio::test]
async fn the_partition_count_is_fixed_by_the_database() {
    let hub = TestHub::start_with(|c| c.d2c.partitions = 3).await;
    let dev = device(&hub, "fixed").await;
    assert_eq!(send(&hub, &dev, "x", &[]).await.status(), 204);
    // A second hub on the same database configured with 8 partitions uses the database's 3.
    let mut config = hub.config.clone();
    config.d2c.partitions = 8;
    let listeners = iothub::Listeners {
        http: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tls: None,
        metrics: None,
        mqtts: None,
        mqtt: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = iothub::launch(config, hub.db.clone(), listeners, async move {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    let token = hub.policy_token("service").await;
    let info: Value = hub
        .http
        .get(format!(
            "http://{}/messages/events?api-version=2021-04-12",
            second.http_addr
        ))
        .header("Authorization", token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["partitionCount"], 3);
    // And its sends land where the first hub's readers look.
    let response = hub
        .http
        .post(format!(
            "http://{}{}?api-version=2021-04-12",
            second.http_addr,
            events_path("fixed")
        ))
        .header("Authorization", &dev.token)
        .body("y")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let p = iothub::d2c::partition_for("fixed", 3);
    let page = get_json(&hub, &format!("/messages/events/partitions/{p}")).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    let _ = stop.send(());
    second.wait().await.unwrap();
}

#[tokio::test]
async fn a_send_that_finds_no_time_partition_creates_it_and_the_writer_goes_on() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "early-bird").await;
    let p = iothub::d2c::partition_for("early-bird", 4);
    assert_eq!(send(&hub, &dev, "before", &[]).await.status(), 204);
    // Maintenance fell behind: the time partition for this hour is gone (and the event in it).
    let hour: chrono::NaiveDateTime =
        sqlx::query_scalar("SELECT date_trunc('hour', now() AT TIME ZONE 'UTC')")
            .fetch_one(&hub.db)
            .await
            .unwrap();
    let name = iothub::d2c::store::time_partition_name(hour);
    sqlx::query(&format!("DROP TABLE {name}"))
        .execute(&hub.db)
        .await
        .unwrap();
    // The writer's insert finds nowhere to go: it rolls back, creates the partition and appends again on the same
    // connection, which must have left the failed transaction first.
    assert_eq!(send(&hub, &dev, "during", &[]).await.status(), 204);
    assert_eq!(send(&hub, &dev, "after", &[]).await.status(), 204);
    let partitions = iothub::d2c::store::time_partitions(&hub.db).await.unwrap();
    assert!(partitions.contains(&name), "{partitions:?}");
    let page = get_json(&hub, &format!("/messages/events/partitions/{p}?from=start")).await;
    let seqs = sequence_numbers(&page);
    assert_eq!(seqs, vec![1, 2], "the failed try took no number");
}

#[tokio::test]
async fn retention_drops_whole_time_partitions() {
    let hub = TestHub::start().await;
    let dev = device(&hub, "old-timer").await;
    let p = iothub::d2c::partition_for("old-timer", 4);
    for n in 0..5 {
        assert_eq!(send(&hub, &dev, &format!("m{n}"), &[]).await.status(), 204);
    }
    // Age the first three events by three days: give them a time partition of their own back then and move them
    // there (the database clock decides what is old).
    let then: chrono::NaiveDateTime = sqlx::query_scalar(
        "SELECT date_trunc('hour', (now() - interval '3 days') AT TIME ZONE 'UTC')",
    )
    .fetch_one(&hub.db)
    .await
    .unwrap();
    iothub::d2c::store::create_time_partition(&hub.db, then)
        .await
        .unwrap();
    let old_name = iothub::d2c::store::time_partition_name(then);
    let moved = sqlx::query(
        "UPDATE d2c_events SET enqueued_at = enqueued_at - interval '3 days' WHERE partition_id = $1 AND seq < 3",
    )
    .bind(p as i32)
    .execute(&hub.db)
    .await
    .unwrap();
    assert_eq!(moved.rows_affected(), 3);
    let before = iothub::d2c::store::time_partitions(&hub.db).await.unwrap();
    assert!(before.contains(&old_name));
    // A 7-day retention keeps them; 1 day drops their partition (and nothing else).
    assert!(iothub::d2c::store::maintain(&hub.db, 7)
        .await
        .unwrap()
        .is_empty());
    let dropped = iothub::d2c::store::maintain(&hub.db, 1).await.unwrap();
    assert_eq!(dropped, vec![old_name.clone()]);
    let after = iothub::d2c::store::time_partitions(&hub.db).await.unwrap();
    assert!(!after.contains(&old_name));
    assert_eq!(after.len(), before.len() - 1);

    let page = get_json(&hub, &format!("/messages/events/partitions/{p}?from=start")).await;
    let seqs = sequence_numbers(&page);
    assert_eq!(seqs, vec![3, 4]);
    let info = get_json(&hub, "/messages/events").await;
    assert_eq!(info["partitions"][p as usize]["firstSequenceNumber"], 3);
    assert_eq!(info["partitions"][p as usize]["lastSequenceNumber"], 4);
    // Sending goes on with the next number.
    assert_eq!(send(&hub, &dev, "later", &[]).await.status(), 204);
    let page = get_json(
        &hub,
        &format!("/messages/events/partitions/{p}?from-sequence-number=5"),
    )
    .await;
    assert_eq!(page["events"][0]["sequenceNumber"], 5);
}

#[tokio::test]
async fn cli_sends_as_a_device_and_monitor_prints_events() {
    let hub = TestHub::start().await;
    let device = hub.create_device("cli-dev").await;
    let key = primary_key(&device);
    let device_cs = format!("HostName={HOST};DeviceId=cli-dev;SharedAccessKey={key}");
    let service_key = hub.policy_key("service").await;
    let service_cs =
        format!("HostName={HOST};SharedAccessKeyName=service;SharedAccessKey={service_key}");
    let bin = env!("CARGO_BIN_EXE_iothub");

    let sent = tokio::process::Command::new(bin)
        .args([
            "send",
            "--url",
            &hub.base,
            "--device-connection-string",
            &device_cs,
        ])
        .args(["-p", "alert=high", "--count", "2", r#"{"t":1}"#])
        .output()
        .await
        .unwrap();
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );

    let monitor = tokio::process::Command::new(bin)
        .args([
            "monitor",
            "--url",
            &hub.base,
            "--connection-string",
            &service_cs,
        ])
        .args(["--from-checkpoint", "--properties", "--count", "2"])
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), monitor)
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let printed: Vec<Value> = serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map(Result::unwrap)
        .collect();
    assert_eq!(printed.len(), 2);
    assert_eq!(printed[0]["event"]["origin"], "cli-dev");
    assert_eq!(printed[0]["event"]["payload"], json!({"t": 1}));
    assert_eq!(
        printed[0]["event"]["properties"]["application"],
        json!({"alert": "high"})
    );
}

/// Devices whose messages land in partition `p` (of 4).
fn devices_in_partition(p: u32, n: usize, prefix: &str) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| iothub::d2c::partition_for(id, 4) == p)
        .take(n)
        .collect()
}

#[tokio::test]
async fn concurrent_sends_share_a_transaction() {
    let hub = TestHub::start().await;
    let ids = devices_in_partition(0, 10, "group");
    let mut devs = Vec::new();
    for id in &ids {
        devs.push(device(&hub, id).await);
    }
    // Hold partition 0's counter row: the writer's transaction with the first send waits on it, and the other nine
    // sends queue up behind it, each seen in the hub before the row is let go.
    let mut blocker = hub.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM d2c_partitions WHERE partition_id = 0 FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let (first, rest) = tokio::join!(send(&hub, &devs[0], "x", &[]), async {
        wait_for_blocked_writer(&hub).await;
        let sends = futures::future::join_all(devs[1..].iter().map(|d| send(&hub, d, "x", &[])));
        let release = async {
            wait_until("nine sends queued behind the blocked transaction", || {
                std::future::ready(hub.running().d2c_queued(0) == 9)
            })
            .await;
            blocker.commit().await.unwrap();
        };
        tokio::join!(sends, release).0
    });
    assert_eq!(first.status(), 204);
    assert!(rest.iter().all(|r| r.status() == 204));
    // Events committed together share their transaction's enqueued time: the first send alone, then all nine that
    // waited in one transaction.
    let page = get_json(&hub, "/messages/events/partitions/0?max-count=1000").await;
    let mut per_time = std::collections::BTreeMap::<String, usize>::new();
    for event in page["events"].as_array().unwrap() {
        *per_time
            .entry(event["enqueuedTimeUtc"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        per_time.into_values().collect::<Vec<_>>(),
        vec![1, 9],
        "events per transaction, in order"
    );
}

#[tokio::test]
async fn a_full_queue_pushes_back_with_503_instead_of_growing() {
    let hub = TestHub::start_with(|c| {
        c.d2c.queue_depth = 2;
        c.d2c.enqueue_timeout_ms = 300;
    })
    .await;
    let ids = devices_in_partition(1, 16, "pressure");
    let mut devs = Vec::new();
    for id in &ids {
        devs.push(device(&hub, id).await);
    }
    let mut blocker = hub.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM d2c_partitions WHERE partition_id = 1 FOR UPDATE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    // The writer's transaction holds the first send and waits on the row; of the fifteen sends after it, two fit
    // in the queue and thirteen wait 300 ms for room and are refused rather than held in memory. Nothing can
    // commit meanwhile, so the first thirteen answers are all refusals; then the row is let go.
    let (first, rest) = tokio::join!(send(&hub, &devs[0], "x", &[]), async {
        wait_for_blocked_writer(&hub).await;
        let mut sends: futures::stream::FuturesUnordered<_> =
            devs[1..].iter().map(|d| send(&hub, d, "x", &[])).collect();
        for _ in 0..13 {
            let response = sends.next().await.unwrap();
            assert_eq!(response.headers()["retry-after"], "1");
            assert_error(response, 503, "ServiceUnavailable").await;
        }
        assert_eq!(
            hub.running().d2c_queued(1),
            2,
            "two sends wait in the queue"
        );
        blocker.commit().await.unwrap();
        sends.collect::<Vec<_>>().await
    });
    // The three admitted ones commit, and exactly they are stored.
    assert_eq!(first.status(), 204);
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|r| r.status() == 204));
    let page = get_json(&hub, "/messages/events/partitions/1?max-count=1000").await;
    assert_eq!(page["events"].as_array().unwrap().len(), 3);
}

/// Header names are case-insensitive: `IoTHub-App-Kind` is the application property `Kind`, as `iothub-app-Kind`
/// is (a client such as Python's urllib capitalises header names). Sent on raw bytes, since HTTP client crates
/// lower-case names.
#[tokio::test]
async fn application_properties_are_found_whatever_the_case_of_their_prefix() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = TestHub::start().await;
    let dev = device(&hub, "capitals").await;
    let mut stream = tokio::net::TcpStream::connect(hub.running().http_addr)
        .await
        .unwrap();
    let request = format!(
        "POST {}?api-version={} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\n\
         IoTHub-App-Kind: x\r\nIOTHUB-APP-LEVEL: 2\r\nIotHub-MessageId: m-1\r\nContent-Length: 2\r\n\
         Connection: close\r\n\r\nhi",
        events_path(&dev.id),
        iothub::cli::client::API_VERSION,
        dev.token
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");

    let events = partition_events(&hub, "capitals").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["properties"], json!({"Kind": "x", "LEVEL": "2"}));
    assert_eq!(events[0]["systemProperties"]["iothub-messageid"], "m-1");
}
